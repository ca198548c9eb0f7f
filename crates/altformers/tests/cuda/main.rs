#![cfg(feature = "cuda")]
//! The fused CUDA kernels against their CPU references, one test binary (packed by
//! `scripts/gpu-package.sh`, run on the GPU machine by `.gpu/run-tests.sh`): one binary
//! instead of one per kernel keeps the package small enough to carry two builds at once.

mod activations;
mod adamw;
mod aft;
mod cross_entropy;
mod decayed;
mod decoder;
mod dropout;
mod fftconv;
mod flash_attention;
mod gather;
mod gemv;
mod layernorm;
mod linear;
mod models;
mod nccl;
mod reformer;
mod retnet;
mod rotary;
mod softmax;
mod train_graph;

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

/// `f`'s output and input gradient on `gpu` against the CPU's in f32, in f32 (within 1e-4)
/// and bf16 (2e-2), both sides fed the same rounded inputs; errors are labelled `label`.
fn gpu_matches_cpu(
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    r: &Tensor,
    gpu: &Device,
    label: &str,
) -> anyhow::Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
        let x = x.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let cpu = value_and_input_grad(f, &x, r, &Device::Cpu, DType::F32)?;
        let ours = value_and_input_grad(f, &x, r, gpu, dtype)?;
        for (what, (o, c)) in ["y", "dx"].iter().zip(ours.iter().zip(cpu.iter())) {
            let err = altformers::testing::device_rel_err(o, c)?;
            anyhow::ensure!(err < tol, "{label} {dtype:?}: {what} rel err {err}");
        }
    }
    Ok(())
}
