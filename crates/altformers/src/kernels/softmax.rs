//! Fused softmax over the last dimension with a one-launch backward (`softmax.cu`), for
//! [`crate::nn::softmax`] on a GPU: f32 or bf16 data, f32 arithmetic.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_softmax";
/// 8 warps per block, one row each at a time; rows beyond the grid are walked.
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 65535;

/// Whether [`softmax_last_dim`] runs fused: f32 or bf16 on a CUDA device, unless switched off.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && x.dims().last().is_some_and(|&d| d > 0 && d <= i32::MAX as usize)
        && super::enabled("softmax")
}

/// Softmax over the last dimension; requires [`supports`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !supports(x) {
        bail!("fused softmax: needs an f32 or bf16 tensor on CUDA (got {:?} {:?})", x.dtype(), x.shape())
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;
/// `(y, g) -> (g - sum(g y)) y` row by row.
struct SoftmaxGrad;

/// Runs `name` over rows of `d` of the (contiguous, same-sized) inputs into a new buffer.
fn launch_rows<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    inputs: &[CudaView<T>],
    d: usize,
) -> Result<CudaStorage> {
    let n = inputs[0].len();
    let rows = n / d;
    let mut out = launch::uninit::<T>(dev, n)?;
    if n > 0 {
        let func = launch::func(dev, MODULE, ptx::SOFTMAX, name)?;
        let (rows_i, d_i) = (rows as i64, d as i32);
        let blocks = rows.div_ceil(THREADS as usize / 32).clamp(1, MAX_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        for x in inputs {
            b.arg(x);
        }
        b.arg(&mut out).arg(&rows_i).arg(&d_i);
        // SAFETY: every input and the output hold rows x d elements; every row is written.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

fn width(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    launch::cuda_only!("fused softmax: CUDA only (the CPU uses the tensor expression)", _);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(s);
        let out = launch::f32_or_bf16!(
            sfx,
            [x = (s, l)],
            launch_rows(dev, &format!("softmax_fwd_{sfx}"), &[x], width(l))?,
            "fused softmax: f32 or bf16 only"
        );
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(res.dtype())?.contiguous()?;
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad, &SoftmaxGrad)?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    launch::cuda_only!("fused softmax: CUDA only", _, _);

    fn cuda_fwd(&self, ys: &CudaStorage, yl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = launch::device(ys);
        let d = width(yl);
        let out = launch::f32_or_bf16!(
            sfx,
            [y = (ys, yl), g = (gs, gl)],
            launch_rows(dev, &format!("softmax_bwd_{sfx}"), &[y, g], d)?,
            "fused softmax backward: y and the gradient must share an f32 or bf16 dtype"
        );
        Ok((out, yl.shape().clone()))
    }
}
