//! Fused forms of [`crate::primitives::decayed`]'s chunkwise paths (kernels in `decayed.cu`):
//!
//! - [`linear`]: retention with one scalar decay per head (`linear_chunked`), f32 or bf16
//!   (accumulated in f32). Forward: one scan over chunks of 64 tokens per (value tile, head,
//!   batch). Backward: the same scan three times, since with `dO` the output gradient
//!   `dq = scan(dO, v, k)`, `dk = rev(scan(rev v, rev dO, rev q))`,
//!   `dv = rev(scan(rev k, rev q, rev dO))` (`rev` reverses time: the sums over `i <= t`
//!   become sums over `i >= t`). The decay gets no gradient (RetNet's is fixed).
//! - [`wkv`]: RWKV-4's normalised WKV (`wkv_chunked` with a bonus, or with neither decay nor
//!   bonus as AFT-simple), f32, one thread per (batch, channel); the backward gives `k, v`,
//!   the decay and the bonus their gradients.
//!
//! Each returns `None` when the fused kernel does not apply (not on CUDA, another dtype, an
//! initial state, ...), and the caller runs the tensor code. The final state is returned
//! detached: gradients flow through the outputs only.
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, CpuStorage, CustomOp3, DType, IndexOp, Layout, Result, Shape, Storage, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;
use crate::primitives::decayed::{Weighting, WkvState};

const MODULE: &str = "altformers_decayed";

/// Tokens per chunk, value columns per CTA, threads per CTA and the padded row stride of the
/// transposed tiles: as `decayed.cu`.
const CHUNK: usize = 64;
const VTILE: usize = 64;
const THREADS: u32 = 256;
const TSTRIDE: usize = CHUNK + 4;
/// The tensor-core kernels' tile edge (state tiles, output value columns) and threads per
/// CTA, as `decayed_tc.cu`, and their padded bf16 / f32 row strides.
const MODULE_TC: &str = "altformers_decayed_tc";
const TC_TILE: usize = 64;
const TC_THREADS: u32 = 128;
const TC_PAD: usize = 8;
const TC_LDF: usize = TC_TILE + 4;

/// Shared memory of a state CTA: two stages of K and V tiles, one f32 staging tile.
fn tc_states_shared_bytes() -> usize {
    2 * (4 * CHUNK * (TC_TILE + TC_PAD)) + 4 * CHUNK * TC_LDF
}

/// Shared memory of an output CTA of query/key width `width`: Q and K chunks, the V tile,
/// the state tile, the decayed scores (bf16) and the f32 staging tile.
fn tc_outputs_shared_bytes(width: usize) -> usize {
    2 * (2 * CHUNK * (width + TC_PAD) + CHUNK * (TC_TILE + TC_PAD) + width * (TC_TILE + TC_PAD) + CHUNK * (TC_TILE + TC_PAD)) + 4 * CHUNK * TC_LDF
}

/// Dynamic shared memory a CTA may use on sm_90.
const MAX_SHARED_BYTES: usize = 227 * 1024;
/// Threads per block of the WKV kernels (one thread per channel).
const WKV_THREADS: u32 = 128;

/// Shared memory of one retention CTA whose contraction (query/key) width is `width`.
fn retention_shared_bytes(width: usize) -> usize {
    4 * (2 * width * TSTRIDE + CHUNK * VTILE + CHUNK * TSTRIDE + width * VTILE + CHUNK + 4)
}

/// The device memory of a contiguous tensor's storage, from its start offset.
fn contiguous<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("fused kernel: input is not contiguous (layout {l:?})")
    };
    Ok(s.slice(start..end))
}

/// The f32 device memory of `t` (held by an op beside its inputs), while `guard` lives.
fn held_f32<'a>(guard: &'a candle_core::StorageRef<'_>, l: &Layout) -> Result<CudaView<'a, f32>> {
    match &**guard {
        Storage::Cuda(CudaStorage { slice: CudaStorageSlice::F32(s), .. }) => contiguous(s, l),
        _ => bail!("fused kernel: expected an f32 tensor on the CUDA device"),
    }
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("fused kernel: size {x} exceeds i32")))
}

// ---------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------

/// The fused [`crate::primitives::decayed::linear_chunked`] (any chunk size: the result does
/// not depend on it): `q, k: [B, H, T, d_k]`, `v: [B, H, T, d_v]`, `log_decay: [H]` ->
/// `(y: [B, H, T, d_v], final state: [B, H, d_k, d_v])`, or `None` where it does not apply.
pub fn linear(q: &Tensor, k: &Tensor, v: &Tensor, log_decay: &Tensor, state: Option<&Tensor>) -> Result<Option<(Tensor, Tensor)>> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let dtype_ok = matches!(q.dtype(), DType::F32 | DType::BF16) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    // the backward contracts over d_v as the forward does over d_k
    let fits = retention_shared_bytes(dk.max(dv)) <= MAX_SHARED_BYTES;
    if !q.device().is_cuda() || !dtype_ok || !fits || state.is_some() || t == 0 || log_decay.track_op() || !super::enabled("retention") {
        return Ok(None);
    }
    let op = RetentionScan { log_decay: log_decay.to_device(q.device())?.to_dtype(DType::F32)?.contiguous()?, reverse: false };
    let out = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    let outputs = b * h * t * dv;
    let y = out.narrow(0, 0, outputs)?.reshape((b, h, t, dv))?;
    let s = out.narrow(0, outputs, b * h * dk * dv)?.reshape((b, h, dk, dv))?.detach();
    Ok(Some((y, s)))
}

/// `o_t = sum_{i<=t} gamma_h^(t-i) (q_t . k_i) v_i` (with `reverse`, over `i >= t`), as one
/// flat tensor: the outputs `[B, H, T, d_v]` then the state after the scan `[B, H, d_k, d_v]`.
struct RetentionScan {
    /// `[H]`, f32, on the inputs' device
    log_decay: Tensor,
    reverse: bool,
}

impl RetentionScan {
    /// The outputs of this scan over `(q, k, v)`, without its state and without autograd.
    fn outputs(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, t, _) = q.dims4()?;
        let dv = v.dim(3)?;
        q.apply_op3_no_bwd(k, v, self)?.narrow(0, 0, b * h * t * dv)?.reshape((b, h, t, dv))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        kernel: &str,
        (q, lq): (&CudaSlice<T>, &Layout),
        (k, lk): (&CudaSlice<T>, &Layout),
        (v, lv): (&CudaSlice<T>, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, t, dk) = lq.shape().dims4()?;
        let (b2, h2, t2, dv) = lv.shape().dims4()?;
        if lk.shape().dims() != lq.shape().dims() || (b2, h2, t2) != (b, h, t) {
            bail!("retention_scan: q {:?}, k {:?}, v {:?} do not match", lq.shape(), lk.shape(), lv.shape());
        }
        let shared = retention_shared_bytes(dk);
        if shared > MAX_SHARED_BYTES {
            bail!("retention_scan: query/key width {dk} needs {shared} bytes of shared memory (at most {MAX_SHARED_BYTES})");
        }
        if self.log_decay.dims() != [h] {
            bail!("retention_scan: log_decay {:?} is not [{h}]", self.log_decay.shape());
        }
        let (ld_storage, ld_layout) = self.log_decay.storage_and_layout();
        let log_decay = held_f32(&ld_storage, ld_layout)?;
        let (q, k, v) = (contiguous(q, lq)?, contiguous(k, lk)?, contiguous(v, lv)?);
        let len = b * h * t * dv + b * h * dk * dv;
        let mut out = launch::uninit::<T>(dev, len)?;
        let func = launch::func(dev, MODULE, ptx::DECAYED, kernel)?;
        func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).w()?;
        let cfg = LaunchConfig {
            grid_dim: (dv.div_ceil(VTILE) as u32, h as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (heads, len_t, dk_i, dv_i, reverse) = (int(h)?, int(t)?, int(dk)?, int(dv)?, self.reverse as i32);
        let mut builder = func.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&log_decay).arg(&mut out);
        builder.arg(&heads).arg(&len_t).arg(&dk_i).arg(&dv_i).arg(&reverse);
        // SAFETY: the buffers hold the sizes the kernel indexes (checked above); the kernel
        // writes every element of `out`.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(len)))
    }
}

/// The query/key width the tensor-core kernels are compiled for that holds `dk` (zero
/// columns pad the rest), or `None` past 128 (then the CUDA-core scan runs).
fn tensor_core_width(dk: usize) -> Option<usize> {
    match dk {
        1..=64 => Some(64),
        65..=128 => Some(128),
        _ => None,
    }
}

impl RetentionScan {
    /// bf16 (`T`) on tensor cores (`decayed_tc.cu`): the chunk states in one sequential
    /// pass, then every chunk's outputs in parallel.
    fn launch_tensor_cores<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        (q, lq): (&CudaSlice<T>, &Layout),
        (k, lk): (&CudaSlice<T>, &Layout),
        (v, lv): (&CudaSlice<T>, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, t, dk) = lq.shape().dims4()?;
        let (b2, h2, t2, dv) = lv.shape().dims4()?;
        if lk.shape().dims() != lq.shape().dims() || (b2, h2, t2) != (b, h, t) {
            bail!("retention_scan: q {:?}, k {:?}, v {:?} do not match", lq.shape(), lk.shape(), lv.shape());
        }
        if self.log_decay.dims() != [h] {
            bail!("retention_scan: log_decay {:?} is not [{h}]", self.log_decay.shape());
        }
        let Some(width) = tensor_core_width(dk) else { bail!("retention_scan: no tensor-core kernel for d_k {dk}") };
        let (ld_storage, ld_layout) = self.log_decay.storage_and_layout();
        let log_decay = held_f32(&ld_storage, ld_layout)?;
        let (q, k, v) = (contiguous(q, lq)?, contiguous(k, lk)?, contiguous(v, lv)?);
        let (k_tiles, v_tiles, chunks) = (dk.div_ceil(TC_TILE), dv.div_ceil(TC_TILE), t.div_ceil(CHUNK));
        let states_len = b * h * chunks * k_tiles * v_tiles * TC_TILE * TC_TILE;
        let states = launch::uninit::<T>(dev, states_len)?;
        let outputs = b * h * t * dv;
        let mut out = launch::uninit::<T>(dev, outputs + b * h * dk * dv)?;
        let (heads, len_t, dk_i, dv_i, reverse) = (int(h)?, int(t)?, int(dk)?, int(dv)?, self.reverse as i32);
        {
            let (y, mut final_state) = out.split_at_mut(outputs);
            let func = launch::func(dev, MODULE_TC, ptx::DECAYED_TC, "retention_states_bf16")?;
            let shared = tc_states_shared_bytes();
            func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).w()?;
            let cfg = LaunchConfig { grid_dim: (k_tiles as u32, v_tiles as u32, (b * h) as u32), block_dim: (TC_THREADS, 1, 1), shared_mem_bytes: shared as u32 };
            let mut builder = func.builder();
            builder.arg(&k).arg(&v).arg(&log_decay).arg(&states).arg(&mut final_state);
            builder.arg(&heads).arg(&len_t).arg(&dk_i).arg(&dv_i).arg(&reverse);
            // SAFETY: `states` holds every (chunk, padded tile) the grid writes; `final_state`
            // holds [B, H, d_k, d_v]; the inputs their shapes (checked above).
            unsafe { builder.launch(cfg) }.w()?;

            let name = format!("retention_outputs_bf16_d{width}");
            let func = launch::func(dev, MODULE_TC, ptx::DECAYED_TC, &name)?;
            let shared = tc_outputs_shared_bytes(width);
            func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).w()?;
            let cfg = LaunchConfig { grid_dim: (chunks as u32, v_tiles as u32, (b * h) as u32), block_dim: (TC_THREADS, 1, 1), shared_mem_bytes: shared as u32 };
            let mut y = y;
            let mut builder = func.builder();
            builder.arg(&q).arg(&k).arg(&v).arg(&states).arg(&log_decay).arg(&mut y);
            builder.arg(&heads).arg(&len_t).arg(&dk_i).arg(&dv_i).arg(&reverse);
            // SAFETY: as above; the states were written by the launch before, on this stream;
            // every output row of every chunk is written.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(outputs + b * h * dk * dv)))
    }
}

impl CustomOp3 for RetentionScan {
    fn name(&self) -> &'static str {
        "retention-scan"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("retention-scan runs on CUDA only (the CPU path is decayed::linear_chunked)")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        use CudaStorageSlice::{BF16, F32};
        let dev = launch::device(s1);
        match (&s1.slice, &s2.slice, &s3.slice) {
            (F32(q), F32(k), F32(v)) => self.launch(dev, "retention_scan_f32", (q, l1), (k, l2), (v, l3)),
            (BF16(q), BF16(k), BF16(v)) if tensor_core_width(l1.shape().dims()[3]).is_some() && super::enabled("retention-tc") => {
                self.launch_tensor_cores(dev, (q, l1), (k, l2), (v, l3))
            }
            (BF16(q), BF16(k), BF16(v)) => self.launch(dev, "retention_scan_bf16", (q, l1), (k, l2), (v, l3)),
            _ => bail!("retention-scan: q, k, v must all be f32 or all bf16"),
        }
    }

    /// Gradients of the outputs (the state is detached by [`linear`]): three more scans.
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.reverse {
            bail!("retention-scan: only the forward-time scan has a backward");
        }
        let (b, h, t, _) = q.dims4()?;
        let dv = v.dim(3)?;
        let d_out = grad_res.narrow(0, 0, b * h * t * dv)?.reshape((b, h, t, dv))?.contiguous()?;
        let backward = RetentionScan { log_decay: self.log_decay.clone(), reverse: true };
        let dq = self.outputs(&d_out, v, k)?;
        let dk = backward.outputs(v, &d_out, q)?;
        let dv = backward.outputs(k, q, &d_out)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

// ---------------------------------------------------------------------------------------
// WKV
// ---------------------------------------------------------------------------------------

/// The fused [`crate::primitives::decayed::wkv_chunked`]: `k, v: [B, T, C]` f32 ->
/// `(y: [B, T, C], final state)`, or `None` where it does not apply (a decay without a
/// bonus, an initial state, another dtype, not on CUDA).
pub fn wkv(k: &Tensor, v: &Tensor, wt: Weighting, state: Option<&WkvState>) -> Result<Option<(Tensor, WkvState)>> {
    let (b, t, c) = k.dims3()?;
    // without a bonus the current token weighs e^{k_t}: the bonus form with u = 0 only when
    // nothing decays either
    let weighting_ok = wt.bonus.is_some() || wt.decay.is_none();
    if !k.device().is_cuda() || k.dtype() != DType::F32 || v.dtype() != DType::F32 || !weighting_ok || state.is_some() || t == 0 || !super::enabled("wkv") {
        return Ok(None);
    }
    let param = |p: Option<&Tensor>| -> Result<Tensor> {
        match p {
            Some(p) => p.to_dtype(DType::F32),
            None => Tensor::zeros(c, DType::F32, k.device()),
        }
    };
    let decay_bonus = Tensor::stack(&[param(wt.decay)?, param(wt.bonus)?], 0)?.contiguous()?;
    let out = k.contiguous()?.apply_op3(&v.contiguous()?, &decay_bonus, WkvForward)?;
    let outputs = b * t * c;
    let y = out.narrow(0, 0, outputs)?.reshape((b, t, c))?;
    let s = out.narrow(0, outputs, 3 * b * c)?.reshape((3, b, c))?.detach();
    Ok(Some((y, WkvState { aa: s.i(0)?, bb: s.i(1)?, pp: s.i(2)? })))
}

fn wkv_launch_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).div_ceil(WKV_THREADS), 1, 1), block_dim: (WKV_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `(k, v, decay_bonus: [2, C])` -> one flat tensor: `y [B, T, C]` then `aa, bb, pp`, `[B, C]`
/// each.
struct WkvForward;

impl CustomOp3 for WkvForward {
    fn name(&self) -> &'static str {
        "wkv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("wkv runs on CUDA only (the CPU path is decayed::wkv_chunked)")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let (b, t, c) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, t, c] || l3.shape().dims() != [2, c] {
            bail!("wkv: k {:?}, v {:?}, decay/bonus {:?} do not match", l1.shape(), l2.shape(), l3.shape());
        }
        let dev = launch::device(s1);
        let (k, v, decay_bonus) = (launch::view::<f32>(s1, l1)?, launch::view::<f32>(s2, l2)?, launch::view::<f32>(s3, l3)?);
        let len = b * t * c + 3 * b * c;
        let mut out = launch::uninit::<f32>(dev, len)?;
        let func = launch::func(dev, MODULE, ptx::DECAYED, "wkv_forward")?;
        let (batch, len_t, channels) = (int(b)?, int(t)?, int(c)?);
        let mut builder = func.builder();
        builder.arg(&k).arg(&v).arg(&decay_bonus).arg(&mut out).arg(&batch).arg(&len_t).arg(&channels);
        // SAFETY: sizes checked above; each thread writes its channel's outputs and state.
        unsafe { builder.launch(wkv_launch_config(b * c)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(len)))
    }

    /// Gradients of `y` (the state is detached by [`wkv`]); the decay's and the bonus's are
    /// summed over the batch.
    fn bwd(&self, k: &Tensor, v: &Tensor, decay_bonus: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, c) = k.dims3()?;
        let volume = b * t * c;
        let gy = grad_res.narrow(0, 0, volume)?.reshape((b, t, c))?.contiguous()?;
        let grads = k.apply_op3_no_bwd(v, &gy, &WkvBackward { decay_bonus: decay_bonus.clone() })?;
        let dk = grads.narrow(0, 0, volume)?.reshape((b, t, c))?;
        let dv = grads.narrow(0, volume, volume)?.reshape((b, t, c))?;
        let d_decay_bonus = grads.narrow(0, 2 * volume, 2 * b * c)?.reshape((2, b, c))?.sum(1)?;
        Ok((Some(dk), Some(dv), Some(d_decay_bonus)))
    }
}

/// `(k, v, dL/dy)` -> one flat tensor: `dk, dv [B, T, C]` then per-sequence `d decay,
/// d bonus`, `[B, C]` each.
struct WkvBackward {
    /// `[2, C]`, f32, on the inputs' device
    decay_bonus: Tensor,
}

impl CustomOp3 for WkvBackward {
    fn name(&self) -> &'static str {
        "wkv-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("wkv-backward runs on CUDA only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let (b, t, c) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, t, c] || l3.shape().dims() != [b, t, c] || self.decay_bonus.dims() != [2, c] {
            bail!("wkv-backward: k {:?}, v {:?}, dy {:?}, decay/bonus {:?} do not match", l1.shape(), l2.shape(), l3.shape(), self.decay_bonus.shape());
        }
        let dev = launch::device(s1);
        let (k, v, gy) = (launch::view::<f32>(s1, l1)?, launch::view::<f32>(s2, l2)?, launch::view::<f32>(s3, l3)?);
        let (db_storage, db_layout) = self.decay_bonus.storage_and_layout();
        let decay_bonus = held_f32(&db_storage, db_layout)?;
        let len = 2 * b * t * c + 2 * b * c;
        let mut grads = launch::uninit::<f32>(dev, len)?;
        let func = launch::func(dev, MODULE, ptx::DECAYED, "wkv_backward")?;
        let (batch, len_t, channels) = (int(b)?, int(t)?, int(c)?);
        let mut builder = func.builder();
        builder.arg(&k).arg(&v).arg(&gy).arg(&decay_bonus).arg(&mut grads).arg(&batch).arg(&len_t).arg(&channels);
        // SAFETY: sizes checked above; each thread writes its channel's gradients.
        unsafe { builder.launch(wkv_launch_config(b * c)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(grads, dev.clone()), Shape::from(len)))
    }
}
