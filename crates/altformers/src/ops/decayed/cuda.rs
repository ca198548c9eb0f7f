//! Fused forms of the chunkwise paths of [`super`] (`ops::decayed`), which calls them from
//! [`super::linear_chunked`] and [`super::wkv_chunked`]:
//!
//! - [`linear`]: retention with one scalar decay per head (`linear_chunked`). bf16 runs on
//!   tensor cores (`decayed_tc.cu`): a sequential pass stores the state before every chunk of
//!   64 tokens, then every chunk's outputs are computed at once. f32 (or widths past 256) runs
//!   the CUDA-core scan (`decayed.cu`): one sequential pass per value tile. With `dO` the
//!   output gradient, the backward is `dq = scan(dO, v, k)`, `dk = rev(scan(rev v, rev dO,
//!   rev q))`, `dv = rev(scan(rev k, rev q, rev dO))` (`rev` reverses time: sums over `i <= t`
//!   become sums over `i >= t`); on tensor cores the states of the last two are one
//!   computation and its transpose. The decay gets no gradient (RetNet's is fixed).
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
use candle_core::{bail, CustomOp3, DType, Device, IndexOp, Layout, Result, Shape, Storage, Tensor};

use super::{Weighting, WkvState};
use crate::kernels::launch::{self, LaunchConfig, PushKernelArg};
use crate::kernels::ptx;

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
const TC_THREADS: u32 = 256;
const TC_PAD: usize = 8;
const TC_LDF: usize = TC_TILE + 4;

/// Shared memory of a state CTA: two stages of K and V tiles, one f32 staging tile.
fn tc_states_shared_bytes() -> usize {
    2 * (4 * CHUNK * (TC_TILE + TC_PAD)) + 4 * CHUNK * TC_LDF
}

/// Shared memory of an output CTA of query/key width `width`: the Q chunk, the K chunk or
/// (later, in its place) the f32 staging tile, the V tile, the state tile and the decayed
/// scores (bf16).
fn tc_outputs_shared_bytes(width: usize) -> usize {
    let k_or_staging = (2 * CHUNK * (width + TC_PAD)).max(4 * CHUNK * TC_LDF);
    2 * CHUNK * (width + TC_PAD)
        + k_or_staging
        + 2 * (CHUNK * (TC_TILE + TC_PAD) + width * (TC_TILE + TC_PAD) + CHUNK * (TC_TILE + TC_PAD))
}

/// `func` may use `shared` bytes of dynamic shared memory, and prefers the largest shared
/// memory carve-out (so that as many CTAs fit per SM as `__launch_bounds__` asks for).
fn set_shared(func: &launch::Kernel, shared: usize) -> Result<()> {
    func.max_shared(shared as i32)?;
    func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100).w()?;
    Ok(())
}

/// Dynamic shared memory a CTA may use on sm_90.
const MAX_SHARED_BYTES: usize = 227 * 1024;
/// Threads per block of the WKV kernels (one thread per channel).
const WKV_THREADS: u32 = 128;

/// Shared memory of one retention CTA whose contraction (query/key) width is `width`.
fn retention_shared_bytes(width: usize) -> usize {
    4 * (2 * width * TSTRIDE + CHUNK * VTILE + CHUNK * TSTRIDE + width * VTILE + CHUNK + 4)
}

/// The f32 device memory of `t` (held by an op beside its inputs), while `guard` lives.
fn held_f32<'a>(guard: &'a candle_core::StorageRef<'_>, l: &Layout) -> Result<CudaView<'a, f32>> {
    match &**guard {
        Storage::Cuda(CudaStorage { slice: CudaStorageSlice::F32(s), .. }) => launch::slice(s, l),
        _ => bail!("fused kernel: expected an f32 tensor on the CUDA device"),
    }
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("fused kernel: size {x} exceeds i32")))
}

// ---------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------

/// One decoding token of [`super::linear_step`] fused (`retention_step` in `decayed.cu`: the
/// state read and written once): `q, k: [B, H, 1, d_k]`, `v: [B, H, 1, d_v]`, `log_decay: [H]`,
/// `state: [B, H, d_k, d_v]` (`None`: empty) -> `(o: [B, H, 1, d_v], next state)`. `None`
/// where it does not apply: off CUDA, not f32, or anything tracking a gradient (it has no
/// backward; decoding needs none).
pub fn linear_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    state: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let inputs = [Some(q), Some(k), Some(v), Some(log_decay), state];
    let applies = q.device().is_cuda()
        && inputs.iter().flatten().all(|t| t.dtype() == DType::F32 && !t.track_op())
        && crate::kernels::enabled("retention-step");
    if !applies {
        return Ok(None);
    }
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    if t != 1 || k.dims() != [b, h, 1, dk] || v.dims() != [b, h, 1, dv] || log_decay.dims() != [h] {
        bail!(
            "retention step: q {:?}, k {:?}, v {:?}, log_decay {:?} are not one token of [B, H] heads",
            q.shape(),
            k.shape(),
            v.shape(),
            log_decay.shape()
        );
    }
    if let Some(s) = state {
        if s.dims() != [b, h, dk, dv] {
            bail!("retention step: state {:?} is not [{b}, {h}, {dk}, {dv}]", s.shape());
        }
    }
    let Device::Cuda(dev) = q.device() else { unreachable!("checked above") };
    let rows = b * h;
    let (q, k, v, log_decay) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, log_decay.contiguous()?);
    let state = state.map(|s| s.contiguous()).transpose()?;
    let o = launch::tensor(launch::uninit::<f32>(dev, rows * dv)?, dev, (b, h, 1, dv));
    let next = launch::tensor(launch::uninit::<f32>(dev, rows * dk * dv)?, dev, (b, h, dk, dv));
    let threads = (dv.next_multiple_of(32)).min(256);
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(rows).map_err(|_| candle_core::Error::Msg(format!("retention step: {rows} rows")))?,
            dv.div_ceil(threads) as u32,
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: (2 * dk * 4) as u32,
    };
    let (heads, dk_i, dv_i) = (int(h)?, int(dk)?, int(dv)?);
    let tensors = [Some(&q), Some(&k), Some(&v), Some(&log_decay), state.as_ref(), Some(&o), Some(&next)];
    launch::with_addresses(dev, "retention step", &tensors, |addresses| {
        let func = launch::func(dev, MODULE, ptx::DECAYED, "retention_step")?;
        if 2 * dk * 4 > 48 * 1024 {
            func.max_shared((2 * dk * 4) as i32)?;
        }
        let mut builder = func.builder();
        for address in addresses {
            builder.arg(address);
        }
        builder.arg(&heads).arg(&dk_i).arg(&dv_i);
        // SAFETY: the shapes are checked above; every element of `o` and `next` is written
        // (one thread per value column, each walking every key row).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok(Some((o, next)))
}

/// The fused [`super::chunk::linear_chunked`] (any chunk size: the result does
/// not depend on it): `q, k: [B, H, T, d_k]`, `v: [B, H, T, d_v]`, `log_decay: [H]` ->
/// `(y: [B, H, T, d_v], final state: [B, H, d_k, d_v])`, or `None` where it does not apply.
pub fn linear(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    state: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let dtype_ok = matches!(q.dtype(), DType::F32 | DType::BF16) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    // the backward contracts over d_v as the forward does over d_k
    let tensor_cores = q.dtype() == DType::BF16 && tensor_cores_apply(b * h, &[dk, dv]);
    // without a backward to follow (nothing tracks a gradient) only the forward's d_k counts
    let keep_states = q.track_op() || k.track_op() || v.track_op();
    let width = if keep_states { dk.max(dv) } else { dk };
    let fits = tensor_cores || retention_shared_bytes(width) <= MAX_SHARED_BYTES;
    if !q.device().is_cuda()
        || !dtype_ok
        || !fits
        || state.is_some()
        || t == 0
        || log_decay.track_op()
        || !crate::kernels::enabled("retention")
    {
        return Ok(None);
    }
    if log_decay.dims() != [h] {
        bail!("retention: log_decay {:?} is not [{h}]", log_decay.shape());
    }
    let op = Retention {
        log_decay: log_decay.to_device(q.device())?.to_dtype(DType::F32)?.contiguous()?,
        final_state: Default::default(),
        keep_states,
        chunk_states: Default::default(),
    };
    let final_state = op.final_state.clone();
    let y = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    let s = final_state.lock().expect("retention: state lock poisoned").take();
    let Some(s) = s else { bail!("retention: the forward left no final state") };
    Ok(Some((y, s)))
}

/// `o_t = sum_{i<=t} gamma_h^(t-i) (q_t . k_i) v_i` as a custom op with output `[B, H, T, d_v]`;
/// the forward leaves the state after the last token (detached) in `final_state`, so that
/// the output needs no slicing (whose backward would cost a padded copy of the gradient).
struct Retention {
    /// `[H]`, f32, on the inputs' device
    log_decay: Tensor,
    final_state: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
    /// Whether a backward will follow (some input tracks gradients): then the forward keeps
    /// its chunk states (tensor cores only), which are `dq`'s states transposed, in
    /// `chunk_states` (flat bf16), and the backward skips one of its three state passes.
    keep_states: bool,
    chunk_states: std::sync::Mutex<Option<Tensor>>,
}

/// The query/key width the tensor-core kernels are compiled for that holds `dk` (zero
/// columns pad the rest), or `None` past 256 (then the CUDA-core scan runs).
fn tensor_core_width(dk: usize) -> Option<usize> {
    match dk {
        1..=64 => Some(64),
        65..=128 => Some(128),
        129..=256 => Some(256),
        _ => None,
    }
}

/// The element types of the retention kernels (f32, bf16).
trait Elem: CudaDType + DeviceRepr + candle_core::WithDType {}
impl<T: CudaDType + DeviceRepr + candle_core::WithDType> Elem for T {}

/// Whether the tensor-core kernels take `rows = B H` sequences (one grid dimension, at most
/// 65535) contracting over each of `widths`, unless switched off.
fn tensor_cores_apply(rows: usize, widths: &[usize]) -> bool {
    rows <= 65535 && widths.iter().all(|&w| tensor_core_width(w).is_some()) && crate::kernels::enabled("retention-tc")
}

/// `[B, H, T, d]` of one input.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    t: usize,
}

/// The retention kernels of one device and one set of decays. Every scan runs either on
/// tensor cores (`decayed_tc.cu`, bf16: the chunk states in one sequential pass, then every
/// chunk's outputs in parallel) or on CUDA cores (`decayed.cu`, one sequential pass per
/// value tile doing both).
struct Kernels<'a> {
    dev: &'a CudaDevice,
    log_decay: CudaView<'a, f32>,
    dims: Dims,
}

impl Kernels<'_> {
    /// The chunk states of `sum_i gamma^(.) k_i v_i^T` (`k: [.., d_k]`, `v: [.., d_v]`) before
    /// each chunk, bf16 `[B H, chunks, d_k, d_v]` with both widths padded to 64; and the state
    /// after the last token (`[B H, d_k, d_v]`) when `final_state` is given.
    fn states<T: Elem>(
        &self,
        k: &CudaView<T>,
        v: &CudaView<T>,
        (dk, dv): (usize, usize),
        reverse: bool,
        final_state: Option<&mut CudaSlice<T>>,
    ) -> Result<CudaSlice<T>> {
        let Dims { b, h, t } = self.dims;
        let (k_tiles, v_tiles) = (dk.div_ceil(TC_TILE), dv.div_ceil(TC_TILE));
        let states = launch::uninit::<T>(self.dev, b * h * t.div_ceil(CHUNK) * k_tiles * v_tiles * TC_TILE * TC_TILE)?;
        let func = launch::func(self.dev, MODULE_TC, ptx::DECAYED_TC, "retention_states_bf16")?;
        let shared = tc_states_shared_bytes();
        set_shared(&func, shared)?;
        let cfg = LaunchConfig {
            grid_dim: (k_tiles as u32, v_tiles as u32, (b * h) as u32),
            block_dim: (TC_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (heads, len_t, dk_i, dv_i, reverse) = (int(h)?, int(t)?, int(dk)?, int(dv)?, reverse as i32);
        let no_state = 0u64;
        let mut builder = func.builder();
        builder.arg(k).arg(v).arg(&self.log_decay).arg(&states);
        match final_state {
            Some(s) => builder.arg(s),
            None => builder.arg(&no_state), // a null pointer: the kernel skips the final state
        };
        builder.arg(&heads).arg(&len_t).arg(&dk_i).arg(&dv_i).arg(&reverse);
        // SAFETY: `states` holds every (chunk, padded tile) of the grid; `final_state` (when
        // given) [B H, d_k, d_v]; the inputs [B H, T, d_k | d_v] (checked by the callers).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(states)
    }

    /// The outputs `(Q K^T (.) D) V + (Q (.) gamma^(j+1)) S` of every chunk at once from the
    /// states of [`Kernels::states`] (`q, k: [.., d_k]`, `v: [.., d_v]`, states `[d_k, d_v]`
    /// or, `transposed`, `[d_v, d_k]` used as their transpose) -> `[B H, T, d_v]`.
    #[allow(clippy::too_many_arguments)]
    fn outputs<T: Elem>(
        &self,
        q: &CudaView<T>,
        k: &CudaView<T>,
        v: &CudaView<T>,
        states: &CudaSlice<T>,
        (dk, dv): (usize, usize),
        reverse: bool,
        transposed: bool,
    ) -> Result<CudaSlice<T>> {
        let Dims { b, h, t } = self.dims;
        let Some(width) = tensor_core_width(dk) else { bail!("retention: no tensor-core kernel for width {dk}") };
        let mut y = launch::uninit::<T>(self.dev, b * h * t * dv)?;
        let name = format!("retention_outputs_bf16_d{width}{}", if transposed { "_t" } else { "" });
        let func = launch::func(self.dev, MODULE_TC, ptx::DECAYED_TC, &name)?;
        let shared = tc_outputs_shared_bytes(width);
        set_shared(&func, shared)?;
        let cfg = LaunchConfig {
            // one CTA per chunk; it walks the value columns (scores computed once)
            grid_dim: (t.div_ceil(CHUNK) as u32, 1, (b * h) as u32),
            block_dim: (TC_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (heads, len_t, dk_i, dv_i, reverse) = (int(h)?, int(t)?, int(dk)?, int(dv)?, reverse as i32);
        let mut builder = func.builder();
        builder.arg(q).arg(k).arg(v).arg(states).arg(&self.log_decay).arg(&mut y);
        builder.arg(&heads).arg(&len_t).arg(&dk_i).arg(&dv_i).arg(&reverse);
        // SAFETY: the states were written before on this stream, with the padded widths the
        // kernel derives from `dk` and `dv` (swapped when `transposed`); every row of `y` is written.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(y)
    }

    /// The whole scan on CUDA cores -> (outputs `[B H, T, d_v]`, final state `[B H, d_k, d_v]`).
    fn cuda_core<T: Elem>(
        &self,
        q: &CudaView<T>,
        k: &CudaView<T>,
        v: &CudaView<T>,
        (dk, dv): (usize, usize),
        reverse: bool,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        let Dims { b, h, t } = self.dims;
        let shared = retention_shared_bytes(dk);
        if shared > MAX_SHARED_BYTES {
            bail!("retention: query/key width {dk} needs {shared} bytes of shared memory (at most {MAX_SHARED_BYTES})");
        }
        let mut y = launch::uninit::<T>(self.dev, b * h * t * dv)?;
        let mut state = launch::uninit::<T>(self.dev, b * h * dk * dv)?;
        let kernel = if T::DTYPE == DType::F32 { "retention_scan_f32" } else { "retention_scan_bf16" };
        let func = launch::func(self.dev, MODULE, ptx::DECAYED, kernel)?;
        func.max_shared(shared as i32)?;
        let cfg = LaunchConfig {
            grid_dim: (dv.div_ceil(VTILE) as u32, h as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (heads, len_t, dk_i, dv_i, reverse) = (int(h)?, int(t)?, int(dk)?, int(dv)?, reverse as i32);
        let mut builder = func.builder();
        builder.arg(q).arg(k).arg(v).arg(&self.log_decay).arg(&mut y).arg(&mut state);
        builder.arg(&heads).arg(&len_t).arg(&dk_i).arg(&dv_i).arg(&reverse);
        // SAFETY: the buffers hold the sizes the kernel indexes; it writes every element of both.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((y, state))
    }

    /// The forward scan -> (outputs, final state, the chunk states on tensor cores).
    #[allow(clippy::type_complexity)]
    fn forward<T: Elem>(
        &self,
        q: &CudaView<T>,
        k: &CudaView<T>,
        v: &CudaView<T>,
        widths: (usize, usize),
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, Option<CudaSlice<T>>)> {
        if !self.tensor_cores::<T>(&[widths.0]) {
            let (y, final_state) = self.cuda_core(q, k, v, widths, false)?;
            return Ok((y, final_state, None));
        }
        let Dims { b, h, .. } = self.dims;
        let mut final_state = launch::uninit::<T>(self.dev, b * h * widths.0 * widths.1)?;
        let states = self.states(k, v, widths, false, Some(&mut final_state))?;
        let y = self.outputs(q, k, v, &states, widths, false, false)?;
        Ok((y, final_state, Some(states)))
    }

    /// `(dq, dk, dv)` from the output gradient `g`: `dq = scan(g, v, k)`;
    /// `dk = rev(scan(rev v, rev g, rev q))` and `dv = rev(scan(rev k, rev q, rev g))`, whose
    /// states (`sum q g^T` and `sum g q^T`) are one computation and its transpose. `dq`'s
    /// states (`sum v k^T`) are the forward's (`sum k v^T`) transposed: `forward_states`, when
    /// the forward kept them, saves their pass.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Elem>(
        &self,
        q: &CudaView<T>,
        k: &CudaView<T>,
        v: &CudaView<T>,
        g: &CudaView<T>,
        (dk, dv): (usize, usize),
        forward_states: Option<&CudaSlice<T>>,
    ) -> Result<[CudaSlice<T>; 3]> {
        if !self.tensor_cores::<T>(&[dk, dv]) {
            let (dq, _) = self.cuda_core(g, v, k, (dv, dk), false)?;
            let (dk_, _) = self.cuda_core(v, g, q, (dv, dk), true)?;
            let (dv_, _) = self.cuda_core(k, q, g, (dk, dv), true)?;
            return Ok([dq, dk_, dv_]);
        }
        let dq = match forward_states {
            Some(states_kv) => self.outputs(g, v, k, states_kv, (dv, dk), false, true)?,
            None => {
                let states_vk = self.states(v, k, (dv, dk), false, None)?;
                self.outputs(g, v, k, &states_vk, (dv, dk), false, false)?
            }
        };
        let states_qg = self.states(q, g, (dk, dv), true, None)?;
        let dv_ = self.outputs(k, q, g, &states_qg, (dk, dv), true, false)?;
        let dk_ = self.outputs(v, g, q, &states_qg, (dv, dk), true, true)?;
        Ok([dq, dk_, dv_])
    }

    /// Whether the tensor-core kernels run: bf16, every contraction width at most 256, B H
    /// within a grid dimension, and not switched off.
    fn tensor_cores<T: Elem>(&self, widths: &[usize]) -> bool {
        T::DTYPE == DType::BF16 && tensor_cores_apply(self.dims.b * self.dims.h, widths)
    }
}

impl Retention {
    fn kernels<'a>(
        &self,
        dev: &'a CudaDevice,
        guard: &'a candle_core::StorageRef<'_>,
        l: &Layout,
        dims: Dims,
    ) -> Result<Kernels<'a>> {
        Ok(Kernels { dev, log_decay: held_f32(guard, l)?, dims })
    }
}

impl CustomOp3 for Retention {
    fn name(&self) -> &'static str {
        "retention"
    }

    launch::cuda_only!("retention runs on CUDA only (the CPU path is decayed::linear_chunked)", _, _, _);

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, t, dk) = l1.shape().dims4()?;
        let (b2, h2, t2, dv) = l3.shape().dims4()?;
        if l2.shape().dims() != l1.shape().dims() || (b2, h2, t2) != (b, h, t) {
            bail!("retention: q {:?}, k {:?}, v {:?} do not match", l1.shape(), l2.shape(), l3.shape());
        }
        let dev = launch::device(s1);
        let (ld_guard, ld_layout) = self.log_decay.storage_and_layout();
        let kernels = self.kernels(dev, &ld_guard, ld_layout, Dims { b, h, t })?;
        let out_shape = Shape::from((b, h, t, dv));
        let (y, state) = launch::f32_or_bf16!(
            _sfx,
            [q = (s1, l1), k = (s2, l2), v = (s3, l3)],
            {
                // the chunk states come from the tensor-core path only (bf16)
                let (y, s, states) = kernels.forward(&q, &k, &v, (dk, dv))?;
                if let (true, Some(states)) = (self.keep_states, states) {
                    let n = states.len();
                    *self.chunk_states.lock().expect("retention: states lock poisoned") =
                        Some(launch::tensor(states, dev, &[n]));
                }
                (CudaDType::wrap_cuda_slice(y, dev.clone()), launch::tensor(s, dev, &[b, h, dk, dv]))
            },
            "retention: q, k, v must all be f32 or all bf16"
        );
        *self.final_state.lock().expect("retention: state lock poisoned") = Some(state);
        Ok((y, out_shape))
    }

    /// Gradients of the outputs (the final state is detached by [`linear`]).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, dk) = q.dims4()?;
        let dv = v.dim(3)?;
        let grad = grad_res.to_dtype(q.dtype())?.contiguous()?;
        let guards = [q, k, v, &grad].map(|t| t.storage_and_layout());
        let [(qg, ql), (kg, kl), (vg, vl), (gg, gl)] = &guards;
        let (qs, ks, vs, gs) = (
            launch::storage(qg, "retention", "q")?,
            launch::storage(kg, "retention", "k")?,
            launch::storage(vg, "retention", "v")?,
            launch::storage(gg, "retention", "the output gradient")?,
        );
        let dev = launch::device(qs);
        let (ld_guard, ld_layout) = self.log_decay.storage_and_layout();
        let kernels = self.kernels(dev, &ld_guard, ld_layout, Dims { b, h, t })?;
        let (qd, vd) = ([b, h, t, dk], [b, h, t, dv]);
        let kept = self.chunk_states.lock().expect("retention: states lock poisoned").clone();
        let held_states = kept.as_ref().map(|s| s.storage_and_layout());
        let [dq, dk_, dv_] = launch::f32_or_bf16!(
            _sfx,
            [q = (qs, ql), k = (ks, kl), v = (vs, vl), g = (gs, gl)],
            {
                // kept by a bf16 forward on tensor cores only
                let forward_states = match &held_states {
                    Some((guard, _)) => {
                        Some(launch::storage(guard, "retention backward", "the kept chunk states")?.as_cuda_slice()?)
                    }
                    None => None,
                };
                let [a, b_, c] = kernels.backward(&q, &k, &v, &g, (dk, dv), forward_states)?;
                [launch::tensor(a, dev, &qd), launch::tensor(b_, dev, &qd), launch::tensor(c, dev, &vd)]
            },
            "retention backward: q, k, v and the gradient must all be f32 or all bf16"
        );
        Ok((Some(dq), Some(dk_), Some(dv_)))
    }
}

// ---------------------------------------------------------------------------------------
// WKV
// ---------------------------------------------------------------------------------------

/// The fused [`super::chunk::wkv_chunked`]: `k, v: [B, T, C]` f32 ->
/// `(y: [B, T, C], final state)`, or `None` where it does not apply (a decay without a
/// bonus, an initial state, another dtype, not on CUDA).
pub fn wkv(k: &Tensor, v: &Tensor, wt: Weighting, state: Option<&WkvState>) -> Result<Option<(Tensor, WkvState)>> {
    let (b, t, c) = k.dims3()?;
    // without a bonus the current token weighs e^{k_t}: the bonus form with u = 0 only when
    // nothing decays either
    let weighting_ok = wt.bonus.is_some() || wt.decay.is_none();
    if !k.device().is_cuda()
        || k.dtype() != DType::F32
        || v.dtype() != DType::F32
        || !weighting_ok
        || state.is_some()
        || t == 0
        || !crate::kernels::enabled("wkv")
    {
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

/// Launches the WKV kernel `name` over `(B, T, C)`, one thread per (batch, channel), on the
/// f32 `inputs` (in the kernel's order) into a new flat buffer of `len` floats.
fn launch_wkv(
    dev: &CudaDevice,
    name: &str,
    inputs: &[&CudaView<f32>],
    len: usize,
    (b, t, c): (usize, usize, usize),
) -> Result<CudaStorage> {
    let mut out = launch::uninit::<f32>(dev, len)?;
    let func = launch::func(dev, MODULE, ptx::DECAYED, name)?;
    let (batch, len_t, channels) = (int(b)?, int(t)?, int(c)?);
    let mut builder = func.builder();
    for x in inputs {
        builder.arg(*x);
    }
    builder.arg(&mut out).arg(&batch).arg(&len_t).arg(&channels);
    let cfg = LaunchConfig {
        grid_dim: (((b * c) as u32).div_ceil(WKV_THREADS), 1, 1),
        block_dim: (WKV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the callers check the sizes; each thread writes its channel's part of `out`
    // (its outputs and state, or its gradients).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `(k, v, decay_bonus: [2, C])` -> one flat tensor: `y [B, T, C]` then `aa, bb, pp`, `[B, C]`
/// each.
struct WkvForward;

impl CustomOp3 for WkvForward {
    fn name(&self) -> &'static str {
        "wkv"
    }

    launch::cuda_only!("wkv runs on CUDA only (the CPU path is decayed::wkv_chunked)", _, _, _);

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, t, c) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, t, c] || l3.shape().dims() != [2, c] {
            bail!("wkv: k {:?}, v {:?}, decay/bonus {:?} do not match", l1.shape(), l2.shape(), l3.shape());
        }
        let dev = launch::device(s1);
        let (k, v, decay_bonus) =
            (launch::view::<f32>(s1, l1)?, launch::view::<f32>(s2, l2)?, launch::view::<f32>(s3, l3)?);
        let len = b * t * c + 3 * b * c;
        Ok((launch_wkv(dev, "wkv_forward", &[&k, &v, &decay_bonus], len, (b, t, c))?, Shape::from(len)))
    }

    /// Gradients of `y` (the state is detached by [`wkv`]); the decay's and the bonus's are
    /// summed over the batch.
    fn bwd(
        &self,
        k: &Tensor,
        v: &Tensor,
        decay_bonus: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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

    launch::cuda_only!("wkv-backward runs on CUDA only", _, _, _);

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, t, c) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, t, c] || l3.shape().dims() != [b, t, c] || self.decay_bonus.dims() != [2, c] {
            bail!(
                "wkv-backward: k {:?}, v {:?}, dy {:?}, decay/bonus {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.decay_bonus.shape()
            );
        }
        let dev = launch::device(s1);
        let (k, v, gy) = (launch::view::<f32>(s1, l1)?, launch::view::<f32>(s2, l2)?, launch::view::<f32>(s3, l3)?);
        let (db_storage, db_layout) = self.decay_bonus.storage_and_layout();
        let decay_bonus = held_f32(&db_storage, db_layout)?;
        let len = 2 * b * t * c + 2 * b * c;
        Ok((launch_wkv(dev, "wkv_backward", &[&k, &v, &gy, &decay_bonus], len, (b, t, c))?, Shape::from(len)))
    }
}
