//! Fused layer normalization (`layernorm.cu`) for [`crate::nn::LayerNorm`] on a GPU: two
//! launches per norm and direction instead of candle's tens. f32 or bf16 activations, f32
//! weight and bias, f32 statistics; the row means and inverse deviations are kept by the op
//! between forward and backward.
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_layernorm";
/// Threads per block (8 warps, one row each at a time), and the most blocks launched (rows
/// beyond are walked by the warps: fewer blocks, fewer atomics for dw and db).
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 1024;
/// Widest row: the backward sums dw and db for a row in shared memory (2 d floats).
const MAX_WIDTH: usize = 6144;
/// Rows up to this wide: the backward keeps 2 d floats per warp (`kPrivateWidth` in the kernel).
const PRIVATE_WIDTH: usize = 768;

/// Whether [`layer_norm`] runs fused: `x` f32 or bf16 on a CUDA device, weight (and bias)
/// of the last dimension's width in f32 or in `x`'s dtype, at most [`MAX_WIDTH`] wide, unless switched off.
pub fn supports(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    let d = x.dims().last().copied().unwrap_or(0);
    // f32 parameters (mixed precision), or bf16 ones under bf16 activations (a bf16 model)
    let param = |t: &Tensor| (t.dtype() == DType::F32 || t.dtype() == x.dtype()) && t.dims() == [d];
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && d > 0
        && d <= MAX_WIDTH
        && x.elem_count() > 0
        && param(weight)
        && bias.is_none_or(param)
        && super::enabled("layernorm")
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension, in `x`'s dtype;
/// requires [`supports`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if !supports(x, weight, bias) {
        bail!("fused layer norm: unsupported inputs (x {:?} {:?}, weight {:?})", x.dtype(), x.shape(), weight.shape())
    }
    let op = LayerNormOp { eps: eps as f32, has_bias: bias.is_some(), stats: Mutex::new(None) };
    // the kernels read f32 parameters: a bf16 model's are cast (two small launches, where
    // the unfused norm of a bf16 model was about ten; the casts carry the gradients back)
    let weight = weight.to_dtype(DType::F32)?;
    let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
    // without a bias the weight stands in as the third argument (ignored, no gradient)
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.as_ref().unwrap_or(&weight).contiguous()?, op)
}

struct LayerNormOp {
    eps: f32,
    has_bias: bool,
    /// `(mean, 1 / std)` per row, from the forward.
    stats: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
}

/// Blocks for `rows` rows (8 per block and pass), at most `max_blocks`.
fn config(rows: usize, max_blocks: usize, shared: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(THREADS as usize / 32).clamp(1, max_blocks) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared as u32 }
}

/// The register-resident backward's blocks: as many as are resident at once (two per SM, the
/// kernel's launch bounds below four chunks), each warp walking several rows: its dw and db sums
/// stay in registers across them, and each block adds 2 d atomics at the end.
fn vector_backward_blocks(dev: &CudaDevice, chunks: usize) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let sms =
        dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?;
    Ok(sms.max(1) as usize * if chunks < 4 { 2 } else { 1 })
}

/// Chunks of 8 columns per lane of the register-resident kernels (`layer_norm_*_v{C}`) for rows
/// of `d` whose operands start at the element offsets `starts` (`x` and `g` in their dtype,
/// weight and bias in f32), where they apply: `d` a multiple of 8 up to 1024, every row start
/// on a 16-byte boundary.
fn vector_chunks(d: usize, starts: &[usize], f32_starts: &[usize]) -> Option<usize> {
    let aligned = starts.iter().all(|s| s % 8 == 0) && f32_starts.iter().all(|s| s % 4 == 0);
    (d.is_multiple_of(8) && d <= 1024 && aligned && super::enabled("layernorm-vector")).then(|| d.div_ceil(256))
}

/// `layer_norm_{dir}_{suffix}`, or its register-resident form with `chunks`.
fn kernel_name(dir: &str, suffix: &str, chunks: Option<usize>) -> String {
    match chunks {
        Some(c) => format!("layer_norm_{dir}_{suffix}_v{c}"),
        None => format!("layer_norm_{dir}_{suffix}"),
    }
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("fused layer norm: width {x} exceeds i32")))
}

#[allow(clippy::too_many_arguments)]
fn forward<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    x: &CudaView<T>,
    w: &CudaView<f32>,
    b: &CudaView<f32>,
    (rows, d): (usize, usize),
    eps: f32,
    has_bias: bool,
    chunks: Option<usize>,
) -> Result<(CudaSlice<T>, CudaSlice<f32>, CudaSlice<f32>)> {
    let mut y = launch::uninit::<T>(dev, rows * d)?;
    let mut mean = launch::uninit::<f32>(dev, rows)?;
    let mut rstd = launch::uninit::<f32>(dev, rows)?;
    let func = launch::func(dev, MODULE, ptx::LAYERNORM, &kernel_name("fwd", suffix, chunks))?;
    let (rows_i, d_i, bias_i) = (rows as i64, int(d)?, has_bias as i32);
    let mut builder = func.builder();
    builder.arg(x).arg(w).arg(b).arg(&mut y).arg(&mut mean).arg(&mut rstd);
    builder.arg(&rows_i).arg(&d_i).arg(&eps).arg(&bias_i);
    // SAFETY: x and y hold rows x d elements, mean and rstd rows, w and b d; every row is written.
    unsafe { builder.launch(config(rows, MAX_BLOCKS, 0)) }.w()?;
    Ok((y, mean, rstd))
}

#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn backward<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    x: &CudaView<T>,
    g: &CudaView<T>,
    w: &CudaView<f32>,
    (mean, rstd): &(CudaSlice<f32>, CudaSlice<f32>),
    (rows, d): (usize, usize),
    has_bias: bool,
    chunks: Option<usize>,
) -> Result<(CudaSlice<T>, CudaSlice<f32>, CudaSlice<f32>)> {
    let mut dx = launch::uninit::<T>(dev, rows * d)?;
    let mut dw = launch::zeros::<f32>(dev, d)?;
    let mut db = launch::zeros::<f32>(dev, d)?;
    let func = launch::func(dev, MODULE, ptx::LAYERNORM, &kernel_name("bwd", suffix, chunks))?;
    let (rows_i, d_i, bias_i) = (rows as i64, int(d)?, has_bias as i32);
    let mut builder = func.builder();
    builder.arg(x).arg(g).arg(w).arg(mean).arg(rstd).arg(&mut dx).arg(&mut dw).arg(&mut db);
    builder.arg(&rows_i).arg(&d_i).arg(&bias_i);
    // SAFETY: x, g and dx hold rows x d elements, mean and rstd rows, w, dw and db d; the
    // shared memory holds the 2 d partial sums (one pair per warp up to PRIVATE_WIDTH in the
    // scalar kernel).
    let cfg = match chunks {
        Some(c) => config(rows, vector_backward_blocks(dev, c)?, 2 * d * 4),
        None => config(rows, MAX_BLOCKS, if d <= PRIVATE_WIDTH { THREADS as usize / 32 } else { 1 } * 2 * d * 4),
    };
    unsafe { builder.launch(cfg) }.w()?;
    Ok((dx, dw, db))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    launch::cuda_only!("fused layer norm runs on CUDA only (the CPU uses nn::LayerNorm's tensor expression)", _, _, _);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = xl.shape().dims().last().copied().unwrap_or(0);
        let rows = xl.shape().elem_count() / d.max(1);
        let dev = launch::device(xs);
        let (w, b) = (launch::view::<f32>(ws, wl)?, launch::view::<f32>(bs, bl)?);
        let chunks = vector_chunks(d, &[xl.start_offset()], &[wl.start_offset(), bl.start_offset()]);
        let (y, stats) = launch::f32_or_bf16!(
            sfx,
            [x = (xs, xl)],
            {
                let (y, m, r) = forward(dev, sfx, &x, &w, &b, (rows, d), self.eps, self.has_bias, chunks)?;
                (CudaDType::wrap_cuda_slice(y, dev.clone()), (m, r))
            },
            "fused layer norm: x must be f32 or bf16"
        );
        *self.stats.lock().expect("layer norm: stats lock poisoned") = Some(stats);
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("layer norm: stats lock poisoned");
        let Some(stats) = stats.as_ref() else { bail!("fused layer norm backward: no forward statistics held") };
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let d = weight.elem_count();
        let rows = x.elem_count() / d.max(1);
        let guards = [x, weight, &grad].map(|t| t.storage_and_layout());
        let [(xg, xl), (wg, wl), (gg, gl)] = &guards;
        let xs = launch::storage(xg, "fused layer norm backward", "x")?;
        let dev = launch::device(xs);
        let w = launch::view::<f32>(launch::storage(wg, "fused layer norm backward", "weight")?, wl)?;
        let gs = launch::storage(gg, "fused layer norm backward", "the output gradient")?;
        let chunks = vector_chunks(d, &[xl.start_offset(), gl.start_offset()], &[wl.start_offset()]);
        let (dx, dw, db) = launch::f32_or_bf16!(
            sfx,
            [x_ = (xs, xl), g = (gs, gl)],
            {
                let (dx, dw, db) = backward(dev, sfx, &x_, &g, &w, stats, (rows, d), self.has_bias, chunks)?;
                (launch::tensor(dx, dev, x.shape()), dw, db)
            },
            "fused layer norm backward: x and the gradient must both be f32 or both bf16"
        );
        let param = Shape::from(d);
        let db = self.has_bias.then(|| launch::tensor(db, dev, &param));
        Ok((Some(dx), Some(launch::tensor(dw, dev, &param)), db))
    }
}
