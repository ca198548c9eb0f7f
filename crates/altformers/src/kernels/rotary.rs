//! The CUDA side of [`crate::primitives::rotary::apply_tables`] (`rotary.cu`): every pair of
//! a head vector rotated in one pass, forward and backward (the backward is the rotation by
//! minus the angle). f32 or bf16 activations, f32 tables.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{bail, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_rotary";

/// Whether the kernel takes `x`: f32 or bf16 on a CUDA device, unless switched off
/// (`ALTFORMERS_UNFUSED=rotary`).
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && super::enabled("rotary")
}

/// `x: [B, H, T, d]` rotated pairwise by `cos, sin: [T, d/2]` (constants: they get no
/// gradient). Requires [`applies`].
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        bail!(
            "rotary: x {:?} with tables {:?} / {:?} (expected [{t}, {}])",
            x.shape(),
            cos.shape(),
            sin.shape(),
            d / 2
        );
    }
    let tables = Tensor::stack(&[cos, sin], 0)?.to_dtype(DType::F32)?.to_device(x.device())?.contiguous()?.detach();
    x.contiguous()?.apply_op2(&tables, Rotate { back: false })
}

/// `(x, tables: [2, T, d/2]) -> x` rotated; `back` rotates by minus the angles.
struct Rotate {
    back: bool,
}

impl CustomOp2 for Rotate {
    fn name(&self) -> &'static str {
        "rotary"
    }

    launch::cuda_only!("rotary: the fused rotation runs on CUDA only", _, _);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ts: &CudaStorage, tl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = xl.shape().dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let tables = launch::view::<f32>(ts, tl)?;
        let dev = launch::device(xs);
        let pairs = (xl.shape().elem_count() / 2) as i64;
        let (t_i, half, sign) = (t as i32, (d / 2) as i32, if self.back { -1f32 } else { 1f32 });
        let cfg = launch::LaunchConfig {
            grid_dim: ((pairs as usize).div_ceil(256).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($ty:ty, $name:literal) => {{
                let x = launch::view::<$ty>(xs, xl)?;
                let mut y = launch::uninit::<$ty>(dev, x.len())?;
                let func = launch::func(dev, MODULE, ptx::ROTARY, $name)?;
                let mut b = func.builder();
                b.arg(&x).arg(&tables).arg(&mut y).arg(&pairs).arg(&t_i).arg(&half).arg(&sign);
                // SAFETY: x and y hold 2 * pairs elements, the tables 2 * t * half; each pair
                // is written once.
                unsafe { b.launch(cfg) }.w()?;
                <$ty>::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => run!(f32, "rotary_f32"),
            DType::BF16 => run!(half::bf16, "rotary_bf16"),
            other => bail!("rotary: {other:?} is not supported (f32 or bf16)"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        tables: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        Ok((Some(grad.apply_op2_no_bwd(tables, &Rotate { back: !self.back })?), None))
    }
}
