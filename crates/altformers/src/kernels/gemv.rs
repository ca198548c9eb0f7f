//! `x W^T` for at most [`MAX_ROWS`] rows of `x` (`gemv.cu`): the products of a decoding step
//! (one row per sequence), where cuBLAS's general GEMM is slower than a matrix-vector
//! kernel, in bf16 markedly. A custom op with candle's products as its backward, so a small
//! batch that is differentiated stays correct.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_gemv";
/// As `gemv.cu`'s `GEMV_MAX_ROWS`.
pub const MAX_ROWS: usize = 8;

/// Whether [`gemv`] runs for `x: [R, K]` against `w: [N, K]`: both bf16 on a CUDA device,
/// `R <= MAX_ROWS`. In f32 cuBLAS's product was the faster (an RWKV-4 12 x 768 decoding step
/// 0.77 ms with it, 0.91 with this kernel; in bf16 0.996 against 0.962:
/// bench/results/2026-12-03-h200-decode), so f32 keeps it; [`gemv`] itself takes both.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.dtype() == w.dtype()
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(0).is_ok_and(|r| (1..=MAX_ROWS).contains(&r))
        && x.dim(1).ok() == w.dim(1).ok()
        && super::enabled("gemv")
}

/// `x W^T`: `x: [R, K]`, `w: [N, K]` -> `[R, N]`.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Gemv)
}

struct Gemv;

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv"
    }

    launch::cuda_only!("gemv runs on CUDA only (the CPU path is a matmul)", _, _);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || rows > MAX_ROWS {
            candle_core::bail!("gemv: x {:?} against w {:?} (at most {MAX_ROWS} rows)", xl.shape(), wl.shape());
        }
        let dev = launch::device(xs);
        let storage = launch::f32_or_bf16!(
            sfx,
            [x = (xs, xl), w = (ws, wl)],
            launch_gemv(dev, sfx, &x, &w, (rows, k, n))?,
            "gemv: x and w must share an f32 or bf16 dtype"
        );
        Ok((storage, Shape::from((rows, n))))
    }

    /// `dx = dy W`, `dW = dy^T x` (candle's products: a backward at a few rows is rare).
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(w)?), Some(dy.t()?.matmul(x)?)))
    }
}

fn launch_gemv<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    sfx: &str,
    x: &CudaView<T>,
    w: &CudaView<T>,
    (rows, k, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    let mut y = launch::uninit::<T>(dev, rows * n)?;
    let func = launch::func(dev, MODULE, ptx::GEMV, &format!("gemv_{sfx}"))?;
    let (rows_i, k_i, n_i) = (rows as i32, k as i32, n as i32);
    let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(x).arg(w).arg(&mut y).arg(&rows_i).arg(&k_i).arg(&n_i);
    // SAFETY: x holds rows x k, w n x k, y rows x n elements, each written once.
    unsafe { b.launch(cfg) }.w()?;
    Ok(T::wrap_cuda_slice(y, dev.clone()))
}
