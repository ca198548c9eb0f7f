#![cfg(feature = "cuda")]
//! The fused CUDA kernels against their CPU references, one test binary (packed by
//! `scripts/gpu-package.sh`, run on the GPU machine by `.gpu/run-tests.sh`): one binary
//! instead of one per kernel keeps the package small enough to carry two builds at once.

mod activations;
mod adamw;
mod aft;
mod decayed;
mod fftconv;
mod flash_attention;
mod gather;
mod layernorm;
mod softmax;

use candle_core::{DType, Device, Tensor, Var};

/// `(y, dx)` of `sum(f(x) * r)`, `x` taken to `dtype` on `dev` (`f` must keep its dtype),
/// both returned in f32: an elementwise or row-wise kernel's output and input gradient.
fn value_and_input_grad(
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    r: &Tensor,
    dev: &Device,
    dtype: DType,
) -> anyhow::Result<[Tensor; 2]> {
    let xv = Var::from_tensor(&x.to_dtype(dtype)?.to_device(dev)?)?;
    let y = f(xv.as_tensor())?;
    anyhow::ensure!(y.dtype() == dtype, "output dtype {:?}, expected {dtype:?}", y.dtype());
    let grads = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
    let dx = grads.get(xv.as_tensor()).expect("dx").to_dtype(DType::F32)?;
    Ok([y.to_dtype(DType::F32)?, dx])
}
