//! The mixed-precision product of training on a GPU, `x W^T` for bf16 activations `x: [R, K]`
//! and an f32 master weight `W: [N, K]`, as one custom op whose backward makes `W`'s gradient
//! in `W`'s own layout and dtype.
//!
//! Written as tensor operations (cast the weight to bf16, `x.matmul(w.t())`), candle's
//! backward hands the weight's gradient to the cast as a transposed bf16 view (`x^T dy`,
//! `[K, N]`): it is copied into `[N, K]` and cast to f32 by kernels reading across rows
//! (about 2 ms of a GPT-2-small step of 37 on the H200, a third of what separated us from
//! torch.compile outside attention: bench/results/2026-12-03-h200-train-speed, call 9).
//! Here the backward takes `dy^T x` (`[N, K]`, cuBLAS reading `dy` transposed in place) and
//! casts it contiguous. The same products, so the same numbers up to cuBLAS's order of
//! summation.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

use super::launch;

/// Whether [`mixed_linear`] runs: `x: [R, K]` bf16 and `w: [N, K]` f32 on a CUDA device,
/// unless switched off (`ALTFORMERS_UNFUSED=linear`).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(1).ok() == w.dim(1).ok()
        && super::enabled("linear")
}

/// `x W^T` in bf16 (`x: [R, K]` bf16, `w: [N, K]` f32) -> `[R, N]`; gradients: `x`'s in
/// bf16, `w`'s in f32. Requires [`applies`].
pub fn mixed_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !applies(x, w) {
        candle_core::bail!("mixed linear: x {:?} {:?} against w {:?} {:?}", x.dtype(), x.shape(), w.dtype(), w.shape())
    }
    x.contiguous()?.apply_op2(w, MixedLinear { weight_bf16: Mutex::new(None) })
}

struct MixedLinear {
    /// The weight in bf16, made by the forward, kept for the backward's `dx = dy W`.
    weight_bf16: Mutex<Option<Tensor>>,
}

impl CustomOp2 for MixedLinear {
    fn name(&self) -> &'static str {
        "mixed-linear"
    }

    launch::cuda_only!("the mixed-precision product runs on CUDA only (the CPU path is a matmul)", _, _);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, _) = wl.shape().dims2()?;
        let w16 = ws.to_dtype(wl, DType::BF16)?;
        // W^T as a view of the contiguous bf16 copy: cuBLAS reads it transposed in place
        let w16_t = Layout::contiguous((n, k)).transpose(0, 1)?;
        let y = xs.matmul(&w16, (1, rows, n, k), xl, &w16_t)?;
        let kept = Tensor::from_storage(Storage::Cuda(w16), (n, k), BackpropOp::none(), false);
        *self.weight_bf16.lock().expect("mixed linear: lock poisoned") = Some(kept);
        Ok((y, Shape::from((rows, n))))
    }

    fn bwd(&self, x: &Tensor, _w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w16 = self.weight_bf16.lock().expect("mixed linear: lock poisoned").clone();
        let Some(w16) = w16 else { candle_core::bail!("mixed linear backward: the forward kept no weight") };
        let grad = grad.to_dtype(DType::BF16)?.contiguous()?;
        let dx = grad.matmul(&w16)?;
        let dw = grad.t()?.matmul(x)?.to_dtype(DType::F32)?;
        Ok((Some(dx), Some(dw)))
    }
}
