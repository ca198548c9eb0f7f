//! Fused GELU (erf form) and SiLU (`activations.cu`): the same forward as candle's, and a
//! backward of one launch instead of candle's chain of elementwise ops. f32 or bf16.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

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

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("fused activation: CUDA only (the CPU uses candle's)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(s);
        let out = match &s.slice {
            CudaStorageSlice::F32(x) => {
                launch_elementwise(dev, &format!("{}_fwd_f32", self.0.name()), &[launch::slice(x, l)?])?
            }
            CudaStorageSlice::BF16(x) => {
                launch_elementwise(dev, &format!("{}_fwd_bf16", self.0.name()), &[launch::slice(x, l)?])?
            }
            _ => bail!("fused activation: f32 or bf16 only"),
        };
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

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("fused activation: CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(xs);
        let out = match (&xs.slice, &gs.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(g)) => launch_elementwise(
                dev,
                &format!("{}_bwd_f32", self.0.name()),
                &[launch::slice(x, xl)?, launch::slice(g, gl)?],
            )?,
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(g)) => launch_elementwise(
                dev,
                &format!("{}_bwd_bf16", self.0.name()),
                &[launch::slice(x, xl)?, launch::slice(g, gl)?],
            )?,
            _ => bail!("fused activation backward: x and the gradient must share an f32 or bf16 dtype"),
        };
        Ok((out, xl.shape().clone()))
    }
}
