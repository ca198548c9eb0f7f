//! The CUDA side of [`crate::ops::activation`] (`activations.cu`): GELU (erf form) and SiLU
//! forward, and their backward `g act'(x)` in one launch. f32 or bf16.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Tensor};

use super::launch::{self, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_activations";

/// Whether the kernels take `x`: f32 or bf16 on a CUDA device, unless switched off.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && super::enabled("activations")
}

/// `name(x)` (`gelu` or `silu`) of a contiguous `x`.
pub fn forward(s: &CudaStorage, l: &Layout, name: &str) -> Result<CudaStorage> {
    let dev = launch::device(s);
    Ok(launch::f32_or_bf16!(
        sfx,
        [x = (s, l)],
        launch_elementwise(dev, &format!("{name}_fwd_{sfx}"), &[x])?,
        "fused activation: f32 or bf16 only"
    ))
}

/// `g name'(x)` of contiguous `x` and `g`.
pub fn backward(xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout, name: &str) -> Result<CudaStorage> {
    let dev = launch::device(xs);
    Ok(launch::f32_or_bf16!(
        sfx,
        [x = (xs, xl), g = (gs, gl)],
        launch_elementwise(dev, &format!("{name}_bwd_{sfx}"), &[x, g])?,
        "fused activation backward: x and the gradient must share an f32 or bf16 dtype"
    ))
}

/// Launches `name` over `inputs` (each `n` elements) into a new buffer of `n`.
fn launch_elementwise<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    inputs: &[CudaView<T>],
) -> Result<CudaStorage> {
    let n = inputs[0].len();
    let mut out = launch::uninit::<T>(dev, n)?;
    if n > 0 {
        let func = launch::func(dev, MODULE, ptx::ACTIVATIONS, name)?;
        let n_i = n as i64;
        let mut b = func.builder();
        for x in inputs {
            b.arg(x);
        }
        b.arg(&mut out).arg(&n_i);
        // SAFETY: every input and the output hold n elements; every element is written.
        unsafe { b.launch(launch::elementwise_config(n)) }.w()?;
    }
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}
