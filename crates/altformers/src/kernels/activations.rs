//! The CUDA side of [`crate::ops::activation`] (`activations.cu`): GELU (erf form) and SiLU
//! forward, and their backward `g act'(x)` in one launch. f32 or bf16. Also the sum of two
//! tensors with 16-byte accesses ([`sum`]), for residual adds and the backward's gradient sums.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor};

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

/// Whether [`sum`] runs: `a` and `b` contiguous, of one shape and dtype (f32 or bf16), on one
/// CUDA device, unless switched off (`ALTFORMERS_UNFUSED=sum`).
pub fn sum_applies(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cuda()
        && a.device().same_device(b.device())
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
        && a.is_contiguous()
        && b.is_contiguous()
        && super::enabled("sum")
}

/// `a + b` (its backward hands the gradient to both). Requires [`sum_applies`].
pub fn sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !sum_applies(a, b) {
        candle_core::bail!("fused sum: {:?} {:?} and {:?} {:?}", a.dtype(), a.shape(), b.dtype(), b.shape())
    }
    a.apply_op2(b, Sum)
}

/// The sum of two gradients of one tensor for candle's backward (the patched candle-core's
/// `GRADIENT_SUM`, set by [`crate::device`] with a CUDA device): [`sum`] where it applies,
/// `None` (candle's add) otherwise, and for gradients that record a graph themselves
/// (`CANDLE_GRAD_DO_NOT_DETACH`: second-order gradients, which a detached sum would cut). The
/// same sums as candle's add, except that the kernels' fast-math build flushes results below
/// 1.2e-38 to zero.
pub fn gradient_sum(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !sum_applies(a, b) || a.track_op() || b.track_op() {
        return Ok(None);
    }
    a.detach().apply_op2_no_bwd(&b.detach(), &Sum).map(Some)
}

struct Sum;

impl CustomOp2 for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }

    launch::cuda_only!("the fused sum runs on CUDA only", _, _);

    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(a);
        let out = launch::f32_or_bf16!(
            sfx,
            [x = (a, al), y = (b, bl)],
            launch_elementwise(dev, &format!("sum2_{sfx}"), &[x, y])?,
            "fused sum: both f32 or both bf16"
        );
        Ok((out, al.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.clone())))
    }
}
