//! The CUDA side of [`crate::ops::dropout`] (`dropout.cu`): the counter-based mask applied in
//! one pass. f32 or bf16.
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Tensor};

use super::launch::{self, PushKernelArg};
use super::ptx;
use crate::ops::dropout::Dropout;

const MODULE: &str = "altformers_dropout";

/// Whether the kernel takes `x`: f32 or bf16 on a CUDA device, unless switched off.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && super::enabled("dropout")
}

/// `op` applied to a contiguous `x`.
pub fn forward(s: &CudaStorage, l: &Layout, op: &Dropout) -> Result<CudaStorage> {
    let dev = launch::device(s);
    Ok(launch::f32_or_bf16!(sfx, [x = (s, l)], run(dev, sfx, &x, op)?, "fused dropout: f32 or bf16 only"))
}

fn run<T: CudaDType + DeviceRepr>(dev: &CudaDevice, sfx: &str, x: &CudaView<T>, op: &Dropout) -> Result<CudaStorage> {
    let n = x.len();
    let mut out = launch::uninit::<T>(dev, n)?;
    if n > 0 {
        let func = launch::func(dev, MODULE, ptx::DROPOUT, &format!("dropout_{sfx}"))?;
        let (n_i, lo, hi, scale) = (n as i64, op.seed as u32, (op.seed >> 32) as u32, op.scale as f32);
        let mut b = func.builder();
        b.arg(x)
            .arg(&mut out)
            .arg(&n_i)
            .arg(&lo)
            .arg(&hi)
            .arg(&op.threshold)
            .arg(&scale)
            .arg(&op.first)
            .arg(&op.row)
            .arg(&op.stride);
        // SAFETY: the input and the output hold n elements; every element is written.
        unsafe { b.launch(launch::elementwise_config(n)) }.w()?;
    }
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}
