//! Fused cross-entropy of logits against integer targets (`cross_entropy.cu`), for
//! [`crate::nn::cross_entropy`] on a GPU: one launch each way where candle's log-softmax and
//! gather were about twenty over `[N, V]`. f32 or bf16 logits, f32 losses; each row's
//! log-sum-exp is kept by the op between forward and backward.
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_cross_entropy";
/// 8 warps per block, one row each at a time; rows beyond the grid are walked.
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 4096;

/// Whether [`row_losses`] runs fused: `logits: [N, V]` f32 or bf16 on a CUDA device, `targets:
/// [N]` u32, unless switched off.
pub fn supports(logits: &Tensor, targets: &Tensor) -> bool {
    let shapes_ok =
        matches!((logits.dims(), targets.dims()), ([n, v], [m]) if n == m && *v > 0 && *v <= i32::MAX as usize);
    logits.device().is_cuda()
        && matches!(logits.dtype(), DType::F32 | DType::BF16)
        && targets.dtype() == DType::U32
        && shapes_ok
        && super::enabled("cross-entropy")
}

/// Each row's `log sum_c exp(logits[r, c]) - logits[r, targets[r]]`, `[N]` f32 (NaN where a
/// target is outside `[0, V)`); requires [`supports`].
pub fn row_losses(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !supports(logits, targets) {
        bail!("fused cross-entropy: needs [N, V] f32 or bf16 logits and [N] u32 targets on CUDA (got {:?} {:?}, {:?} {:?})",
            logits.dtype(), logits.shape(), targets.dtype(), targets.shape())
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy { lse: Mutex::new(None) })
}

struct CrossEntropy {
    /// Each row's log-sum-exp, from the forward.
    lse: Mutex<Option<CudaSlice<f32>>>,
}

fn config(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(THREADS as usize / 32).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn forward<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    sfx: &str,
    x: &CudaView<T>,
    targets: &CudaView<u32>,
    (rows, v): (usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let mut loss = launch::uninit::<f32>(dev, rows)?;
    let mut lse = launch::uninit::<f32>(dev, rows)?;
    let func = launch::func(dev, MODULE, ptx::CROSS_ENTROPY, &format!("cross_entropy_fwd_{sfx}"))?;
    let (rows_i, v_i) = (rows as i64, v as i32);
    let mut b = func.builder();
    b.arg(x).arg(targets).arg(&mut loss).arg(&mut lse).arg(&rows_i).arg(&v_i);
    // SAFETY: x holds rows x v elements, targets, loss and lse rows; every row is written.
    unsafe { b.launch(config(rows)) }.w()?;
    Ok((loss, lse))
}

#[allow(clippy::too_many_arguments)]
fn backward<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    sfx: &str,
    x: &CudaView<T>,
    targets: &CudaView<u32>,
    lse: &CudaSlice<f32>,
    g: &CudaView<f32>,
    (rows, v): (usize, usize),
) -> Result<CudaSlice<T>> {
    let mut dx = launch::uninit::<T>(dev, rows * v)?;
    let func = launch::func(dev, MODULE, ptx::CROSS_ENTROPY, &format!("cross_entropy_bwd_{sfx}"))?;
    let (rows_i, v_i) = (rows as i64, v as i32);
    let mut b = func.builder();
    b.arg(x).arg(targets).arg(lse).arg(g).arg(&mut dx).arg(&rows_i).arg(&v_i);
    // SAFETY: x and dx hold rows x v elements, targets, lse and g rows; every element is written.
    unsafe { b.launch(config(rows)) }.w()?;
    Ok(dx)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    launch::cuda_only!("fused cross-entropy: CUDA only (the CPU uses candle's log-softmax)", _, _);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ts: &CudaStorage, tl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, v) = xl.shape().dims2()?;
        let dev = launch::device(xs);
        let targets = launch::view::<u32>(ts, tl)?;
        let (loss, lse) = launch::f32_or_bf16!(
            sfx,
            [x = (xs, xl)],
            forward(dev, sfx, &x, &targets, (rows, v))?,
            "fused cross-entropy: logits must be f32 or bf16"
        );
        *self.lse.lock().expect("cross-entropy: lse lock poisoned") = Some(lse);
        Ok((f32::wrap_cuda_slice(loss, dev.clone()), Shape::from(rows)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().expect("cross-entropy: lse lock poisoned");
        let Some(lse) = lse.as_ref() else { bail!("fused cross-entropy backward: no forward log-sum-exp held") };
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let (rows, v) = x.dims2()?;
        let guards = [x, targets, &grad].map(|t| t.storage_and_layout());
        let [(xg, xl), (tg, tl), (gg, gl)] = &guards;
        let what = "fused cross-entropy backward";
        let xs = launch::storage(xg, what, "logits")?;
        let dev = launch::device(xs);
        let t = launch::view::<u32>(launch::storage(tg, what, "targets")?, tl)?;
        let g = launch::view::<f32>(launch::storage(gg, what, "the loss gradient")?, gl)?;
        let dx = launch::f32_or_bf16!(
            sfx,
            [x_ = (xs, xl)],
            launch::tensor(backward(dev, sfx, &x_, &t, lse, &g, (rows, v))?, dev, x.shape()),
            "fused cross-entropy backward: logits must be f32 or bf16"
        );
        Ok((Some(dx), None))
    }
}
