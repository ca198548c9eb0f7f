//! Fused GELU (erf form) and SiLU (`activations.cu`): the same forward as candle's, and a
//! backward of one launch instead of candle's chain of elementwise ops. f32 or bf16.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_activations";
const THREADS: u32 = 256;

#[derive(Clone, Copy)]
pub enum Activation {
    Gelu,
    Silu,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }
}

/// Whether [`apply`] runs fused: f32 or bf16 on a CUDA device, unless switched off.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && super::enabled("activations")
}

/// `act(x)` elementwise; requires [`supports`].
pub fn apply(x: &Tensor, act: Activation) -> Result<Tensor> {
    if !supports(x) {
        bail!("fused {}: needs an f32 or bf16 tensor on CUDA (got {:?})", act.name(), x.dtype())
    }
    x.contiguous()?.apply_op1(Forward(act))
}

struct Forward(Activation);
/// `(x, g) -> g act'(x)`.
struct Backward(Activation);

fn config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
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
        unsafe { b.launch(config(n)) }.w()?;
    }
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "fused-activation"
    }

    launch::cuda_only!("fused activation: CUDA only (the CPU uses candle's)", _);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(s);
        let name = self.0.name();
        let out = launch::f32_or_bf16!(
            sfx,
            [x = (s, l)],
            launch_elementwise(dev, &format!("{name}_fwd_{sfx}"), &[x])?,
            "fused activation: f32 or bf16 only"
        );
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &Backward(self.0))?))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "fused-activation-grad"
    }

    launch::cuda_only!("fused activation: CUDA only", _, _);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(xs);
        let name = self.0.name();
        let out = launch::f32_or_bf16!(
            sfx,
            [x = (xs, xl), g = (gs, gl)],
            launch_elementwise(dev, &format!("{name}_bwd_{sfx}"), &[x, g])?,
            "fused activation backward: x and the gradient must share an f32 or bf16 dtype"
        );
        Ok((out, xl.shape().clone()))
    }
}
