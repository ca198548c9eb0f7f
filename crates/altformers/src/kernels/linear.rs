//! The mixed-precision product of training on a GPU, `x W^T` for bf16 activations `x: [R, K]`
//! and an f32 master weight `W: [N, K]`, as one custom op whose backward makes `W`'s gradient
//! in `W`'s own layout and dtype.
//!
//! Written as tensor operations (cast the weight to bf16, `x.matmul(w.t())`), candle's
//! backward hands the weight's gradient to the cast as a transposed bf16 view (`x^T dy`,
//! `[K, N]`): it is copied into `[N, K]` and cast to f32 by kernels reading across rows
//! (about 2 ms of a GPT-2-small step of 37 on the H200, a third of what separated us from
//! torch.compile outside attention: bench/results/2026-12-03-h200-train-speed, call 9).
//! Here the backward has cuBLAS write `dy^T x` (`[N, K]`, reading `dy` transposed in place)
//! straight into f32 (bf16 operands, f32 accumulation as before, but no rounding of the sums
//! to bf16 before the master weight takes them: candle's cast of the bf16 gradient ran at
//! about a tenth of the bandwidth, 1.3 ms a step). The forward casts the weight to bf16 with
//! 16-byte accesses (`linear.cu`).
use std::ffi::c_void;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

use super::launch::{self, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_linear";

/// Whether [`mixed_linear`] runs: `x: [R, K]` bf16 and `w: [N, K]` f32 (contiguous, at any
/// offset: a block of a weight's rows) on a CUDA device, unless switched off
/// (`ALTFORMERS_UNFUSED=linear`).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && w.is_contiguous()
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
        let w16 = to_bf16(ws, wl)?;
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
        Ok((Some(dx), Some(weight_grad_f32(&grad, &x.contiguous()?)?)))
    }
}

/// The f32 weight `[N, K]` (contiguous, at any offset) in bf16, one launch of 16-byte reads.
fn to_bf16(ws: &CudaStorage, wl: &Layout) -> Result<CudaStorage> {
    let dev = launch::device(ws);
    let w = launch::view::<f32>(ws, wl)?;
    let n = w.len();
    let mut out = launch::uninit::<half::bf16>(dev, n)?;
    if n > 0 {
        let func = launch::func(dev, MODULE, ptx::LINEAR, "f32_to_bf16")?;
        let n_i = n as i64;
        let mut b = func.builder();
        b.arg(&w).arg(&mut out).arg(&n_i);
        // SAFETY: w and out hold n elements; every element is written.
        unsafe { b.launch(launch::elementwise_config(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `dy^T x` in f32: `dy: [R, N]` and `x: [R, K]`, contiguous bf16 -> `[N, K]`.
fn weight_grad_f32(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, n) = dy.dims2()?;
    let (_, k) = x.dims2()?;
    let candle_core::Device::Cuda(dev) = x.device() else { candle_core::bail!("mixed linear: not on CUDA") };
    let mut dw = launch::uninit::<f32>(dev, n * k)?;
    {
        let (gs, gl) = dy.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let g = launch::view::<half::bf16>(launch::storage(&gs, "mixed linear backward", "the gradient")?, gl)?;
        let xv = launch::view::<half::bf16>(launch::storage(&xs, "mixed linear backward", "x")?, xl)?;
        gemm_f32_out(dev, (k, n, rows), &xv, &g, &mut dw)?;
    }
    Ok(launch::tensor(dw, dev, (n, k)))
}

/// Row-major `C[N, K] = G^T X` for row-major `X: [R, K]` and `G: [R, N]`: in cuBLAS's
/// column-major terms `C^T (K x N) = X^T (K x R, as stored) op(G^T) (R x N, G stored N x R,
/// transposed)`.
fn gemm_f32_out(
    dev: &CudaDevice,
    (k, n, rows): (usize, usize, usize),
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<half::bf16>,
    g: &candle_core::cuda_backend::cudarc::driver::CudaView<half::bf16>,
    c: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
) -> Result<()> {
    let int =
        |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("mixed linear: {v} exceeds i32")));
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (alpha, beta) = (1f32, 0f32);
    let (xp, _xg) = x.device_ptr(&stream);
    let (gp, _gg) = g.device_ptr(&stream);
    let (cp, _cg) = c.device_ptr_mut(&stream);
    // SAFETY: X holds R x K, G holds R x N and C N x K elements, with the leading dimensions
    // given; alpha and beta are f32 as the f32 compute type requires; all on the handle's stream.
    unsafe {
        gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_N,
            sys::cublasOperation_t::CUBLAS_OP_T,
            int(k)?,
            int(n)?,
            int(rows)?,
            &alpha as *const f32 as *const c_void,
            xp as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            int(k)?,
            gp as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            int(n)?,
            &beta as *const f32 as *const c_void,
            cp as *mut c_void,
            sys::cudaDataType_t::CUDA_R_32F,
            int(k)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("mixed linear: cuBLAS weight gradient: {e:?}")))
}
