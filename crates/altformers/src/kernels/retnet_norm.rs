//! The CUDA side of RetNet's output normalisations and group norm
//! (`mixers::retnet::Retention::finish_normalised`), `retnet_norm.cu`: one pass forward, one
//! backward, token-major output. f32 (the retention's accumulation dtype).
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_retnet_norm";
/// Rows (warps) per block.
const ROWS: usize = 8;

/// Whether the kernels take `o1`: f32 on a CUDA device, a row normalisation that needs no
/// gradient, unless switched off (`ALTFORMERS_UNFUSED=retnet-norm`).
pub fn applies(o1: &Tensor, c: &Tensor) -> bool {
    o1.device().is_cuda() && o1.dtype() == DType::F32 && !c.track_op() && super::enabled("retnet-norm")
}

/// `o1: [B, H, T, dv + 1]`, `c` broadcastable to `[1, H, T, 1]` -> `z: [B, T, H dv]`, the
/// normalised and group-normed outputs (before the group norm's affine). Requires [`applies`].
pub fn normalise(o1: &Tensor, c: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, h, t, dv1) = o1.dims4()?;
    if dv1 < 2 {
        bail!("retnet norm: o1 {:?} has no value columns", o1.shape());
    }
    let c = c.to_dtype(DType::F32)?.broadcast_as((1, h, t, 1))?.reshape((h, t))?.contiguous()?.detach();
    let z = o1.contiguous()?.apply_op2(&c, Norm { eps: eps as f32 })?;
    z.reshape((b, t, h * (dv1 - 1)))
}

struct Norm {
    eps: f32,
}

/// `(o1, c, dz) -> d o1`.
struct NormBackward {
    eps: f32,
}

fn config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS) as u32, 1, 1),
        block_dim: (32 * ROWS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// (rows, T, H, dv) of `o1: [B, H, T, dv + 1]` as the kernels' ints.
fn sizes(l: &Layout) -> Result<[i32; 4]> {
    let &[b, h, t, dv1] = l.shape().dims() else { bail!("retnet norm: o1 {:?} is not 4-d", l.shape()) };
    let int = |x: usize| i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("retnet norm: size {x}")));
    Ok([int(b * h * t)?, int(t)?, int(h)?, int(dv1 - 1)?])
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "retnet-norm"
    }

    launch::cuda_only!("retnet norm: the fused kernel runs on CUDA only", _, _);

    fn cuda_fwd(&self, os: &CudaStorage, ol: &Layout, cs: &CudaStorage, cl: &Layout) -> Result<(CudaStorage, Shape)> {
        let [rows, t, h, dv] = sizes(ol)?;
        let dims = ol.shape().dims();
        let (o, c) = (launch::view::<f32>(os, ol)?, launch::view::<f32>(cs, cl)?);
        let dev = launch::device(os);
        let mut z = launch::uninit::<f32>(dev, rows as usize * dv as usize)?;
        let func = launch::func(dev, MODULE, ptx::RETNET_NORM, "retnet_norm_fwd")?;
        let mut b = func.builder();
        b.arg(&o).arg(&c).arg(&mut z).arg(&rows).arg(&t).arg(&h).arg(&dv).arg(&self.eps);
        // SAFETY: o holds rows x (dv + 1), c H x T, z rows x dv values; each row written by its warp.
        unsafe { b.launch(config(rows as usize)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(z, dev.clone()), Shape::from((dims[0], dims[2], dims[1], dims[3] - 1))))
    }

    fn bwd(&self, o1: &Tensor, c: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = grad.to_dtype(DType::F32)?.contiguous()?;
        Ok((Some(o1.apply_op3_no_bwd(c, &dz, &NormBackward { eps: self.eps })?), None))
    }
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        "retnet-norm-backward"
    }

    launch::cuda_only!("retnet norm: the fused kernel runs on CUDA only", _, _, _);

    fn cuda_fwd(
        &self,
        os: &CudaStorage,
        ol: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let [rows, t, h, dv] = sizes(ol)?;
        let (o, c, dz) = (launch::view::<f32>(os, ol)?, launch::view::<f32>(cs, cl)?, launch::view::<f32>(gs, gl)?);
        let dev = launch::device(os);
        let mut d_o = launch::uninit::<f32>(dev, o.len())?;
        let func = launch::func(dev, MODULE, ptx::RETNET_NORM, "retnet_norm_bwd")?;
        let mut b = func.builder();
        b.arg(&o).arg(&c).arg(&dz).arg(&mut d_o).arg(&rows).arg(&t).arg(&h).arg(&dv).arg(&self.eps);
        // SAFETY: as the forward; d_o holds rows x (dv + 1), each row written by its warp.
        unsafe { b.launch(config(rows as usize)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(d_o, dev.clone()), ol.shape().clone()))
    }
}
