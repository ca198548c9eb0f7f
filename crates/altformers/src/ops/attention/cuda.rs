//! Fused causal softmax attention (kernels in `flash_attention.cu`; the Hopper wgmma forward
//! at widths 64 and 128 and backward at width 64, the defaults there, in
//! `flash_attention_sm90a.cu`),
//! the FlashAttention-2 algorithm (Dao
//! 2023, arXiv 2307.08691) on sm_90 tensor cores, bf16 in and out with f32 accumulation,
//! head widths 64 and 128, grouped/multi-query K/V, any `T`, any `offset`.
//!
//! Why it is shaped this way:
//! - Forward: a CTA owns a block of query rows and streams the visible key/value blocks
//!   through shared memory, keeping a running row max and sum (online softmax), so the
//!   `[T, S]` scores never exist in memory: only the output and one log-sum-exp per row are
//!   written, and the backward recomputes the probabilities from them (O(T) memory). Each warp
//!   owns 16 query rows, which is exactly one `mma.m16n8k16` row block, so the row max/sum
//!   need only a shuffle among the 4 lanes sharing a row, and the score accumulators are
//!   reused as the A operand of `P V` without a trip through shared memory. Key blocks past
//!   the causal frontier are never loaded; only the diagonal block (and a ragged tail) pays
//!   for masking.
//! - Backward: a CTA owns a block of keys and walks every query block that sees them, for
//!   every query head of the GQA group, so dK and dV are summed over the group in registers
//!   and written once (no atomics, no K/V copies). It computes the transposed scores
//!   `K Q^T`, so that `P^T` and `dS^T` are directly the A operands of `dV += P^T dO` and
//!   `dK += dS^T Q`; `dQ += dS K` needs `dS` the other way round, so `dS^T` goes through
//!   shared memory once and dQ is added to an f32 buffer with atomics (then scaled and
//!   rounded to bf16 by a tiny pass), two columns per atomic (sm_90's vector `atomicAdd`).
//!   `D = rowsum(dO * O)` is a separate one-warp-per-row pass, as in FA2. Only the steps on
//!   the diagonal evaluate the causal mask; the others take a block-uniform path without it
//!   (with the mask everywhere the backward executed 1.5x SDPA's instructions at the same
//!   issue rate; `bench/results/2026-11-29-h200-attention-ncu`).
//! - Tiles ([`Tiles`]): forward width 64: 4 warps of 16 query rows, 64 keys per step, Q
//!   fragments held in registers. Width 128: 4 warps of 32 query rows (two m-tiles), 32 keys
//!   per step (FA2's tiling for this width), so every K and V fragment read from shared memory
//!   feeds two mmas: with 16 rows per warp and 64 keys the forward read 32 KB of K and V per
//!   warp for every 0.5 MFLOP (16 flops per byte, where the tensor cores need about 23 from
//!   shared memory's 128 bytes per clock; it measured 28% of the matmul ceiling); now 24 KB
//!   with Q re-read each step (the accumulators take the registers: 243, no spills), 22
//!   flops per byte. Backward width 64: 64 keys (4 warps) x 64
//!   queries per step; width 128: 128 keys (8 warps) x 64 queries, 255 registers without
//!   spilling (each warp's dK and dV accumulators alone take 128; the 16 x 64 score and dP
//!   tiles 64 more), which halves the steps, and their barriers and pipeline waits, of the
//!   32-query tiling.
//! - Hopper (`flash_attention_sm90a.cu`, [`AttentionKernel::Wgmma`]): the `mma.sync` kernels
//!   load every operand fragment from shared memory with `ldmatrix`, per warp, which bounds
//!   them (the width-64 backward at about 120 TFLOP/s on the H200, against cuDNN's 290 in the
//!   same GPT-2-small step; more warps sharing a tile did not help). The warpgroup MMA reads
//!   its shared operands itself (swizzled tiles, no padding) and keeps P^T and dS^T in
//!   registers as A operands. The backward at width 64 has two warpgroups of 64 keys share each
//!   Q and dO tile; their dQ shares are summed in shared memory, each adding half the columns
//!   with atomics. It measured 1.29x the `mma.sync` backward, still about half cuDNN's speed:
//!   one CTA per SM (190 registers) whose GEMM and elementwise phases run in turn
//!   (bench/results/2026-12-03-h200-train-speed, session 44).
//! - Shared tiles are row-padded by 8 bf16 (16 bytes) rather than swizzled: `ldmatrix` then
//!   reads 8 rows in distinct banks and `cp.async` 16-byte chunks stay aligned. Loads of the
//!   next block (K/V forward, Q/dO/lse/D backward) overlap the current block's math (two
//!   stages); out-of-range rows are zero-filled by `cp.async`, so ragged `T` and `S` need no
//!   special path and padding never produces NaN.
//!
//! - Layout: the kernels read q, k and v in place at any strides whose rows of `d_h` are
//!   contiguous and 16-byte aligned, and write the output and the gradients token-major
//!   (`[B, T, H, d_h]`). The attention mixer's heads are views of its projections' outputs
//!   (`[B, T, H d_h]` seen as `[B, H, T, d_h]`) and the output projection reads `[B, T, H
//!   d_h]`, so no transpose is copied either way: the copies into and out of a head-major
//!   layout (and their gradients') took more of a GPT-2-small training step on the H200 than
//!   the attention kernels (bench/results/2026-12-03-h200-train-speed).
//!
//! The log-sum-exp is kept in log2 units of the scaled scores
//! (`p = exp2(s * scale * log2 e - lse)`), matching the `exp2` the kernels use. It is held by
//! the op between forward and backward rather than returned, since a custom op has one output.
use std::sync::Mutex;

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

use super::Dims;
use crate::kernels::launch::{self, LaunchConfig, PushKernelArg};
use crate::kernels::ptx;
use crate::ops::dropout::Dropout;

const MODULE: &str = "altformers_flash_attention";
const MODULE_SM90A: &str = "altformers_flash_attention_sm90a";
/// Largest sequence length or offset: the kernels index rows with 32-bit ints.
const MAX_POSITIONS: usize = 1 << 30;
/// Largest grid y/z extent (heads, batch).
const MAX_GRID_YZ: usize = 65535;

/// Tile configuration per head width; must match `FLASH_ENTRY_POINTS` in the `.cu` file.
struct Tiles {
    head_dim: usize,
    fwd_warps: usize,
    /// m-tiles (16 query rows each) per forward warp.
    fwd_row_tiles: usize,
    fwd_keys: usize,
    bwd_warps: usize,
    bwd_queries: usize,
}

impl Tiles {
    fn for_head_dim(head_dim: usize) -> Result<Self> {
        match head_dim {
            64 => Ok(Self { head_dim, fwd_warps: 4, fwd_row_tiles: 1, fwd_keys: 64, bwd_warps: 4, bwd_queries: 64 }),
            128 => Ok(Self { head_dim, fwd_warps: 4, fwd_row_tiles: 2, fwd_keys: 32, bwd_warps: 8, bwd_queries: 64 }),
            _ => bail!("flash attention: head width {head_dim} unsupported (64 or 128)"),
        }
    }

    /// Padded shared-memory row length (elements) of a `[rows, d_h]` tile.
    fn row(&self) -> usize {
        self.head_dim + 8
    }

    fn fwd_rows(&self) -> usize {
        16 * self.fwd_row_tiles * self.fwd_warps
    }

    /// Q tile plus two stages of K and V tiles.
    fn fwd_shared_bytes(&self) -> usize {
        2 * (self.fwd_rows() + 4 * self.fwd_keys) * self.row()
    }

    fn bwd_keys(&self) -> usize {
        16 * self.bwd_warps
    }

    /// K and V tiles, two stages of Q and dO tiles, the dS^T tile, two stages of lse and D.
    fn bwd_shared_bytes(&self) -> usize {
        2 * (2 * self.bwd_keys() + 4 * self.bwd_queries) * self.row()
            + 2 * self.bwd_keys() * (self.bwd_queries + 8)
            + 4 * 4 * self.bwd_queries
    }
}

/// Whether [`causal_attention`] runs fused for these inputs: on a CUDA device, all bf16, head
/// width 64 or 128, non-empty.
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let bf16 = [q, k, v].iter().all(|t| t.dtype() == DType::BF16);
    let width_ok = matches!(q.dims().last(), Some(64 | 128));
    let non_empty = q.elem_count() > 0 && k.elem_count() > 0;
    q.device().is_cuda() && bf16 && width_ok && non_empty && crate::kernels::enabled("attention")
}

/// Which kernel family computes one direction of the attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `Wgmma` where it can run (the direction's wgmma kernel exists for this head width, and
    /// a build for compute capability 9.0 on such a device), else `MmaSync`. The default.
    Auto,
    /// FlashAttention-2's structure on `mma.sync` tensor-core instructions (any sm_80+).
    MmaSync,
    /// Hopper's warpgroup MMA (`wgmma`), its operands read from shared memory by the tensor
    /// cores: the forward at head widths 128 (1.2x the `mma.sync` forward on the H200,
    /// bench/results/2026-11-29-h200-attention-wgmma) and 64, the backward at width 64.
    Wgmma,
}

/// The kernels of the forward and of the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    pub forward: AttentionKernel,
    pub backward: AttentionKernel,
}

impl Kernels {
    /// `ALTFORMERS_ATTENTION_FWD` and `ALTFORMERS_ATTENTION_BWD` (`auto`, `wgmma` or `mma`),
    /// read once; `Auto` where unset.
    pub fn from_env() -> Result<Self> {
        static CHOICE: std::sync::OnceLock<std::result::Result<Kernels, String>> = std::sync::OnceLock::new();
        let parse = |var: &str| match std::env::var(var).as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(AttentionKernel::Auto),
            Ok("mma") => Ok(AttentionKernel::MmaSync),
            Ok("wgmma") => Ok(AttentionKernel::Wgmma),
            Ok(other) => Err(format!("{var}={other}: expected `auto`, `mma` or `wgmma`")),
        };
        CHOICE
            .get_or_init(|| {
                Ok(Kernels {
                    forward: parse("ALTFORMERS_ATTENTION_FWD")?,
                    backward: parse("ALTFORMERS_ATTENTION_BWD")?,
                })
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    /// The same kernel family both ways.
    pub fn both(kernel: AttentionKernel) -> Self {
        Self { forward: kernel, backward: kernel }
    }
}

/// A direction of the attention: the wgmma kernels exist for some head widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

impl AttentionKernel {
    /// The kernel that runs `direction` at head width `dh` on `dev` (`Auto` resolved; `Wgmma`
    /// where no wgmma kernel has this width: `MmaSync`).
    pub fn resolve(self, dev: &CudaDevice, dh: usize, direction: Direction) -> Result<Self> {
        let has_wgmma = match direction {
            Direction::Forward => dh == 64 || dh == 128,
            Direction::Backward => dh == 64,
        };
        let capability = dev.cuda_stream().context().compute_capability().w()?;
        let can_wgmma = capability == (9, 0) && !ptx::FLASH_ATTENTION_SM90A.is_empty();
        Ok(match self {
            _ if !has_wgmma => AttentionKernel::MmaSync,
            AttentionKernel::Auto if can_wgmma => AttentionKernel::Wgmma,
            AttentionKernel::Auto => AttentionKernel::MmaSync,
            AttentionKernel::Wgmma if !can_wgmma => bail!(
                "flash attention: the wgmma kernels need compute capability 9.0 and a build for it \
                 (CUDA_COMPUTE_CAP=90); this device is {}.{}",
                capability.0,
                capability.1
            ),
            chosen => chosen,
        })
    }
}

/// Causal attention of `q: [B, H, T, d_h]` at positions `offset..offset+T` over `k, v:
/// [B, KVH, S, d_h]` (query t sees keys s <= offset + t; query head h uses K/V head
/// h / (H / KVH)), scale 1/sqrt(d_h), fused forward and backward, with `dropout` on the
/// probabilities (the mask of [`crate::ops::dropout`] over the `[B, H, T, S]` probabilities,
/// as the unfused path draws it; the `mma.sync` forward then, which has it), `first` the
/// batch's first sequence in the mask (a data-parallel worker's slice). Requires [`supports`].
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    dropout: Option<Dropout>,
    first: usize,
) -> Result<Tensor> {
    let kernels = Kernels::from_env()?;
    let b = q.dim(0)?;
    if b <= MAX_GRID_YZ {
        return causal_attention_with(q, k, v, offset, kernels, dropout, first);
    }
    // The grid's batch axis holds 65535 sequences; more (MegaByte's local model runs one per
    // patch: 16 x 64K bytes in patches of 8 is 131072) go in slices of the batch.
    let slices = (0..b)
        .step_by(MAX_GRID_YZ)
        .map(|start| {
            let n = MAX_GRID_YZ.min(b - start);
            let part = |x: &Tensor| x.narrow(0, start, n);
            causal_attention_with(&part(q)?, &part(k)?, &part(v)?, offset, kernels, dropout, first + start)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&slices, 0)
}

/// [`causal_attention`] with the kernels named, for the sequences `first..first + B`
/// of a batch (the mask's coordinates).
pub fn causal_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    kernels: Kernels,
    dropout: Option<Dropout>,
    first: usize,
) -> Result<Tensor> {
    if !supports(q, k, v) {
        bail!("flash attention: needs bf16 CUDA tensors with head width 64 or 128 (q {:?} {:?})", q.dtype(), q.shape())
    }
    let Dims { b, h, t, s, .. } = Dims::of(q, k, v, "flash attention")?;
    if t >= MAX_POSITIONS || s >= MAX_POSITIONS || offset >= MAX_POSITIONS || h > MAX_GRID_YZ || b > MAX_GRID_YZ {
        bail!("flash attention: sizes out of range (B {b}, H {h}, T {t}, S {s}, offset {offset})")
    }
    if first >= MAX_POSITIONS {
        bail!("flash attention: batch start {first} out of range")
    }
    let op = FlashAttention::new(offset, kernels, dropout, first);
    // The op works token-major: `[B, T, H, d_h]` views of the head-major operands, read in
    // place where their strides allow; its output back to head-major as a view.
    let [q, k, v] = [q, k, v].map(|x| readable_in_place(&x.transpose(1, 2)?));
    q?.apply_op3(&k?, &v?, op)?.transpose(1, 2)
}

/// Whether [`causal_attention_packed`] runs for a fused projection's output `qkv: [B, T, (H +
/// 2 KVH) d_h]` of head width `dh`: as [`supports`], and the batch within the grid.
pub fn supports_packed(qkv: &Tensor, dh: usize) -> bool {
    let in_grid = qkv.dims().first().is_some_and(|&b| b <= MAX_GRID_YZ);
    qkv.device().is_cuda()
        && qkv.dtype() == DType::BF16
        && matches!(dh, 64 | 128)
        && qkv.elem_count() > 0
        && in_grid
        && crate::kernels::enabled("attention")
        && crate::kernels::enabled("attention-packed")
}

/// Causal attention over one fused projection's output `qkv: [B, T, (H + 2 KVH) d_h]`
/// (queries, keys and values in consecutive blocks of features, positions from 0) -> `[B, T,
/// H d_h]`, token-major: [`causal_attention`] on the three blocks read in place, with
/// `dropout` and `first` as there. The backward writes qkv's gradient as one tensor, so the
/// projection's backward is one product each way: the three blocks as views would come back
/// as three gradients, each zero-padded to the full width and summed (the weight's rows cut
/// into three products instead cost 72 more products a GPT-2-small step). Requires
/// [`supports_packed`].
pub fn causal_attention_packed(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    kernels: Kernels,
    dropout: Option<Dropout>,
    first: usize,
) -> Result<Tensor> {
    let dims = Dims::packed(qkv.shape(), heads, kv_heads, "flash attention")?;
    if !supports_packed(qkv, dims.dh) {
        bail!(
            "flash attention: needs a bf16 CUDA qkv with head width 64 or 128 (qkv {:?} {:?})",
            qkv.dtype(),
            qkv.shape()
        )
    }
    if dims.t >= MAX_POSITIONS || heads > MAX_GRID_YZ || first >= MAX_POSITIONS {
        bail!("flash attention: sizes out of range (qkv {:?}, batch start {first})", qkv.shape())
    }
    let attention = FlashAttention::new(0, kernels, dropout, first);
    let qkv = readable_in_place(qkv)?;
    qkv.apply_op1(PackedFlashAttention { attention, dims })
}

/// `x` if the kernels can read it where it is (rows contiguous; strides and start on 16-byte
/// boundaries), else a contiguous copy.
fn readable_in_place(x: &Tensor) -> Result<Tensor> {
    let layout = x.layout();
    let aligned = |n: &usize| n.is_multiple_of(8);
    let (row, outer) = layout.stride().split_last().expect("attention operands have dimensions");
    if *row == 1 && outer.iter().all(aligned) && aligned(&layout.start_offset()) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

struct FlashAttention {
    offset: usize,
    kernels: Kernels,
    dropout: DropoutArgs,
    /// `[B, H, T]` log-sum-exp from the forward, for the backward.
    lse: Mutex<Option<CudaSlice<f32>>>,
}

impl FlashAttention {
    fn new(offset: usize, kernels: Kernels, dropout: Option<Dropout>, first: usize) -> Self {
        // the wgmma forward has no dropout; the wgmma backward has
        let forward = if dropout.is_some() { AttentionKernel::MmaSync } else { kernels.forward };
        let kernels = Kernels { forward, ..kernels };
        Self { offset, kernels, dropout: DropoutArgs::new(dropout, first), lse: Mutex::new(None) }
    }
}

/// The kernels' dropout arguments: the seed's halves, the keep threshold (0: no dropout),
/// the scale and the batch's first sequence.
#[derive(Clone, Copy)]
struct DropoutArgs {
    seed_lo: u32,
    seed_hi: u32,
    threshold: u32,
    scale: f32,
    first: i32,
}

impl DropoutArgs {
    fn new(dropout: Option<Dropout>, first: usize) -> Self {
        let first = first as i32;
        match dropout {
            Some(d) if d.threshold > 0 => Self {
                seed_lo: d.seed as u32,
                seed_hi: (d.seed >> 32) as u32,
                threshold: d.threshold,
                scale: d.scale as f32,
                first,
            },
            _ => Self { seed_lo: 0, seed_hi: 0, threshold: 0, scale: 1.0, first },
        }
    }

    fn push<'a>(&'a self, b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>) {
        b.arg(&self.seed_lo).arg(&self.seed_hi).arg(&self.threshold).arg(&self.scale).arg(&self.first);
    }
}

/// Element strides of a token-major operand `[B, rows, heads, d_h]` (as `Strides` in the
/// kernels): sequence, head, row.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Strides {
    batch: i64,
    head: i64,
    row: i64,
}

// SAFETY: plain data, the kernels' `struct Strides { long long batch, head, row; }`.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Strides {}

impl Strides {
    fn of(layout: &Layout) -> Result<Self> {
        let st = layout.stride();
        if st.len() != 4 || st[3] != 1 {
            bail!("flash attention: operand rows must be contiguous (layout {layout:?})")
        }
        Ok(Self { batch: st[0] as i64, head: st[2] as i64, row: st[1] as i64 })
    }
}

/// The bf16 device memory of an operand from its start offset (read at its strides), with
/// its [`Strides`].
macro_rules! bf16_strided {
    ($storage:expr, $layout:expr, $what:literal) => {{
        let CudaStorageSlice::BF16(slice) = &$storage.slice else {
            bail!(concat!("flash attention: ", $what, " must be bf16"))
        };
        (slice.slice($layout.start_offset()..), Strides::of($layout)?)
    }};
}

/// The bf16 device memory of a contiguous tensor, from its start offset.
macro_rules! bf16_view {
    ($storage:expr, $layout:expr, $what:literal) => {{
        let CudaStorageSlice::BF16(slice) = &$storage.slice else {
            bail!(concat!("flash attention: ", $what, " must be bf16"))
        };
        let Some((start, end)) = $layout.contiguous_offsets() else {
            bail!(concat!("flash attention: ", $what, " must be contiguous"))
        };
        slice.slice(start..end)
    }};
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("flash attention: size {x} exceeds i32")))
}

/// A new uninitialised bf16 buffer of `shape` (the kernels write every element).
fn bf16_output(dev: &CudaDevice, shape: &Shape) -> Result<CudaStorage> {
    // SAFETY: every element is written by the kernel launched right after.
    unsafe { dev.alloc_uninit(shape, DType::BF16) }
}

fn kernel(dev: &CudaDevice, name: &str, shared_bytes: usize) -> Result<launch::Kernel> {
    module_kernel(dev, MODULE, ptx::FLASH_ATTENTION, name, shared_bytes)
}

/// A wgmma kernel (`flash_attention_sm90a.cu`), built only for compute capability 9.0
/// ([`AttentionKernel::resolve`] has checked that the build and the device have it).
fn wgmma_kernel(dev: &CudaDevice, name: &str, shared_bytes: usize) -> Result<launch::Kernel> {
    module_kernel(dev, MODULE_SM90A, ptx::FLASH_ATTENTION_SM90A, name, shared_bytes)
}

fn module_kernel(dev: &CudaDevice, module: &str, ptx: &str, name: &str, shared_bytes: usize) -> Result<launch::Kernel> {
    let func = launch::func(dev, module, ptx, name)?;
    if shared_bytes > 48 * 1024 {
        func.max_shared(int(shared_bytes)?)?;
    }
    Ok(func)
}

impl Dims {
    fn scale(&self) -> f32 {
        1.0 / (self.dh as f32).sqrt()
    }

    /// `(T, S, H, KVH, offset)` as the kernels take them.
    fn ints(&self, offset: usize) -> Result<[i32; 5]> {
        Ok([int(self.t)?, int(self.s)?, int(self.h)?, int(self.kvh)?, int(offset)?])
    }
}

/// q, k and v as the kernels read them: each operand's memory from its first element, at
/// its [`Strides`] (token-major `[B, rows, heads, d_h]`).
struct Operands<'a> {
    q: CudaView<'a, bf16>,
    k: CudaView<'a, bf16>,
    v: CudaView<'a, bf16>,
    strides: [Strides; 3],
}

impl<'a> Operands<'a> {
    /// Three tensors' memory at their layouts' strides.
    fn separate(
        (qs, ql): (&'a CudaStorage, &Layout),
        (ks, kl): (&'a CudaStorage, &Layout),
        (vs, vl): (&'a CudaStorage, &Layout),
    ) -> Result<Self> {
        let ((q, q_st), (k, k_st), (v, v_st)) =
            (bf16_strided!(qs, ql, "q"), bf16_strided!(ks, kl, "k"), bf16_strided!(vs, vl, "v"));
        Ok(Self { q, k, v, strides: [q_st, k_st, v_st] })
    }

    /// The three consecutive blocks of features of one fused projection's output `qkv: [B, T,
    /// (H + 2 KVH) d_h]` (rows contiguous).
    fn packed(storage: &'a CudaStorage, layout: &Layout, dims: &Dims) -> Result<Self> {
        let CudaStorageSlice::BF16(slice) = &storage.slice else { bail!("flash attention: qkv must be bf16") };
        let st = layout.stride();
        if st.len() != 3 || st[2] != 1 {
            bail!("flash attention: qkv's rows must be contiguous (layout {layout:?})")
        }
        let strides = Strides { batch: st[0] as i64, head: dims.dh as i64, row: st[1] as i64 };
        let at = |heads: usize| slice.slice(layout.start_offset() + heads * dims.dh..);
        Ok(Self { q: at(0), k: at(dims.h), v: at(dims.h + dims.kvh), strides: [strides; 3] })
    }
}

/// Where the backward writes dq, dk and dv: device addresses and token-major strides (dk's and
/// dv's the same).
struct GradTargets {
    dq: u64,
    dk: u64,
    dv: u64,
    dq_strides: Strides,
    kv_strides: Strides,
}

impl GradTargets {
    /// Contiguous `[B, T, H, d_h]`, `[B, S, KVH, d_h]` and `[B, S, KVH, d_h]` at `[dq, dk, dv]`.
    fn separate([dq, dk, dv]: [u64; 3], dims: &Dims) -> Self {
        let contiguous = |rows: usize, heads: usize| Strides {
            batch: (rows * heads * dims.dh) as i64,
            head: dims.dh as i64,
            row: (heads * dims.dh) as i64,
        };
        Self { dq, dk, dv, dq_strides: contiguous(dims.t, dims.h), kv_strides: contiguous(dims.s, dims.kvh) }
    }

    /// The blocks of one contiguous `[B, T, (H + 2 KVH) d_h]` bf16 gradient at `base`.
    fn packed(base: u64, dims: &Dims) -> Self {
        let width = (dims.h + 2 * dims.kvh) * dims.dh;
        let strides = Strides { batch: (dims.t * width) as i64, head: dims.dh as i64, row: width as i64 };
        let at = |heads: usize| base + (heads * dims.dh * 2) as u64;
        Self { dq: at(0), dk: at(dims.h), dv: at(dims.h + dims.kvh), dq_strides: strides, kv_strides: strides }
    }
}

impl FlashAttention {
    /// The forward kernel on `ops` (sizes `dims`): the output, contiguous `[B, T, H, d_h]`; the
    /// log-sum-exp is kept for the backward.
    fn forward(&self, dev: &CudaDevice, dims: &Dims, ops: &Operands) -> Result<CudaStorage> {
        let tiles = Tiles::for_head_dim(dims.dh)?;
        let mut out = bf16_output(dev, &Shape::from_dims(&[dims.b, dims.t, dims.h, dims.dh]))?;
        let mut lse = launch::uninit::<f32>(dev, dims.b * dims.h * dims.t)?;
        let forward = self.kernels.forward.resolve(dev, dims.dh, Direction::Forward)?;
        let (func, cfg) = if forward == AttentionKernel::Wgmma {
            // 128 query rows (two warpgroups) per CTA; Q and two stages of K and V tiles of
            // 128 x d_h bf16, plus 1 KB to align them to the swizzle's 1024-byte period.
            let shared = 5 * 128 * dims.dh * 2 + 1024;
            let cfg = LaunchConfig {
                grid_dim: (int(dims.t.div_ceil(128))? as u32, dims.h as u32, dims.b as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            (wgmma_kernel(dev, &format!("flash_attention_fwd_wgmma_d{}", dims.dh), shared)?, cfg)
        } else {
            let shared = tiles.fwd_shared_bytes();
            let cfg = LaunchConfig {
                grid_dim: (int(dims.t.div_ceil(tiles.fwd_rows()))? as u32, dims.h as u32, dims.b as u32),
                block_dim: (32 * tiles.fwd_warps as u32, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            (kernel(dev, &format!("flash_attention_fwd_d{}", dims.dh), shared)?, cfg)
        };
        let [t, s, h, kvh, offset] = dims.ints(self.offset)?;
        let scale_log2 = dims.scale() * std::f32::consts::LOG2_E;
        {
            let CudaStorageSlice::BF16(o) = &mut out.slice else { bail!("flash attention: output is not bf16") };
            let [q_st, k_st, v_st] = &ops.strides;
            let mut b = func.builder();
            b.arg(&ops.q).arg(&ops.k).arg(&ops.v).arg(q_st).arg(k_st).arg(v_st).arg(o).arg(&mut lse);
            b.arg(&t).arg(&s).arg(&h).arg(&kvh).arg(&offset).arg(&scale_log2);
            if forward == AttentionKernel::MmaSync {
                self.dropout.push(&mut b);
            }
            // SAFETY: argument list matches flash_attention_fwd_d{64,128} (with the dropout
            // arguments) and flash_attention_fwd_wgmma_d{64,128} (without: never with dropout);
            // buffers sized above.
            unsafe { b.launch(cfg) }.w()?;
        }
        *self.lse.lock().expect("flash attention: lse lock poisoned") = Some(lse);
        Ok(out)
    }

    /// The backward kernels: `D = rowsum(dO * O)`, dK and dV (and dQ's f32 sums), dQ in bf16,
    /// the gradients written at `grads`. `out` and `grad_out` as the op's output.
    fn backward(
        &self,
        dims: &Dims,
        ops: &Operands,
        out: &Tensor,
        grad_out: &Tensor,
        grads: &GradTargets,
    ) -> Result<()> {
        let lse_guard = self.lse.lock().expect("flash attention: lse lock poisoned");
        let Some(lse) = lse_guard.as_ref() else { bail!("flash attention backward: no forward log-sum-exp held") };
        let tiles = Tiles::for_head_dim(dims.dh)?;
        let guards = [out, grad_out].map(|t| t.storage_and_layout());
        let [(og, ol), (gg, gl)] = &guards;
        let os = launch::storage(og, "flash attention backward", "output")?;
        let dev = launch::device(os);
        let o_view = bf16_view!(os, ol, "output");
        let do_view =
            bf16_view!(launch::storage(gg, "flash attention backward", "output gradient")?, gl, "output gradient");
        let lse_view: CudaView<'_, f32> = lse.slice(..);

        let rows = dims.b * dims.h * dims.t;
        let mut delta = launch::uninit::<f32>(dev, rows)?;
        {
            let func = kernel(dev, &format!("flash_attention_bwd_delta_d{}", dims.dh), 0)?;
            let rows_per_block = 8;
            let cfg = LaunchConfig {
                grid_dim: (int(rows.div_ceil(rows_per_block))? as u32, 1, 1),
                block_dim: (32 * rows_per_block as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows, t, h) = (int(rows)?, int(dims.t)?, int(dims.h)?);
            let mut b = func.builder();
            b.arg(&o_view).arg(&do_view).arg(&mut delta).arg(&rows).arg(&t).arg(&h);
            // SAFETY: argument list matches flash_attention_bwd_delta_d{64,128}.
            unsafe { b.launch(cfg) }.w()?;
        }

        let mut dq_accum = launch::zeros::<f32>(dev, rows * dims.dh)?;
        {
            let (func, cfg) =
                if self.kernels.backward.resolve(dev, dims.dh, Direction::Backward)? == AttentionKernel::Wgmma {
                    // 128 keys (two warpgroups) per CTA: K, V and dS^T tiles of 128 x 64 bf16, two
                    // stages of Q and dO tiles of 64 x 64, two of lse and D (64 floats each), dQ's
                    // exchange (2 x 16 floats x 128 threads), plus 1 KB to align the tiles to the
                    // swizzle's 1024-byte period.
                    let shared = 3 * 128 * 64 * 2 + 4 * 64 * 64 * 2 + 4 * 64 * 4 + 2 * 16 * 128 * 4 + 1024;
                    let cfg = LaunchConfig {
                        grid_dim: (int(dims.s.div_ceil(128))? as u32, dims.kvh as u32, dims.b as u32),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: shared as u32,
                    };
                    (wgmma_kernel(dev, "flash_attention_bwd_wgmma_d64", shared)?, cfg)
                } else {
                    let shared = tiles.bwd_shared_bytes();
                    let cfg = LaunchConfig {
                        grid_dim: (int(dims.s.div_ceil(tiles.bwd_keys()))? as u32, dims.kvh as u32, dims.b as u32),
                        block_dim: (32 * tiles.bwd_warps as u32, 1, 1),
                        shared_mem_bytes: shared as u32,
                    };
                    (kernel(dev, &format!("flash_attention_bwd_d{}", dims.dh), shared)?, cfg)
                };
            let [t, s, h, kvh, offset] = dims.ints(self.offset)?;
            let (scale, scale_log2) = (dims.scale(), dims.scale() * std::f32::consts::LOG2_E);
            let [q_st, k_st, v_st] = &ops.strides;
            let mut b = func.builder();
            b.arg(&ops.q).arg(&ops.k).arg(&ops.v).arg(q_st).arg(k_st).arg(v_st);
            b.arg(&do_view).arg(&lse_view).arg(&delta);
            b.arg(&mut dq_accum).arg(&grads.dk).arg(&grads.dv).arg(&grads.kv_strides);
            b.arg(&t).arg(&s).arg(&h).arg(&kvh).arg(&offset).arg(&scale_log2).arg(&scale);
            self.dropout.push(&mut b);
            // SAFETY: argument list matches flash_attention_bwd_d{64,128} and
            // flash_attention_bwd_wgmma_d64; dk and dv are the addresses of bf16 buffers holding
            // [B, S, KVH, d_h] at `kv_strides`, which the caller holds; the rest sized above.
            unsafe { b.launch(cfg) }.w()?;
        }
        {
            let func = kernel(dev, "flash_attention_bwd_dq_convert", 0)?;
            let n = rows * dims.dh;
            // four elements a thread, counted in 32 bits (with room for the grid's stride)
            if n / 4 > (u32::MAX / 2) as usize {
                bail!("flash attention: {n} query-gradient elements exceed the conversion's 32-bit count");
            }
            let threads = 256;
            let cfg = LaunchConfig {
                grid_dim: ((n / 4).div_ceil(threads).min(1 << 20) as u32, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (scale, t, h, dh) = (dims.scale(), int(dims.t)?, int(dims.h)?, int(dims.dh)?);
            let mut b = func.builder();
            b.arg(&dq_accum).arg(&grads.dq).arg(&grads.dq_strides).arg(&scale).arg(&n).arg(&t).arg(&h).arg(&dh);
            // SAFETY: argument list matches flash_attention_bwd_dq_convert; dq is the address of a
            // bf16 buffer holding [B, T, H, d_h] at `dq_strides`, which the caller holds.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(())
    }
}

/// A new tensor of `shape` the backward kernels fill (uninitialised: they write every element).
fn gradient(dev: &CudaDevice, shape: &Shape) -> Result<Tensor> {
    Ok(Tensor::from_storage(Storage::Cuda(bf16_output(dev, shape)?), shape.clone(), BackpropOp::none(), false))
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    launch::cuda_only!("flash attention: CUDA only (CPU tensors take the reference expression)", _, _, _);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = Dims::token_major(ql.shape(), kl.shape())?;
        let out = self.forward(launch::device(qs), &dims, &Operands::separate((qs, ql), (ks, kl), (vs, vl))?)?;
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_out = grad_out.to_dtype(DType::BF16)?.contiguous()?;
        let out = out.contiguous()?;
        let dims = Dims::token_major(q.shape(), k.shape())?;
        let guards = [q, k, v].map(|t| t.storage_and_layout());
        let [(qg, ql), (kg, kl), (vg, vl)] = &guards;
        let what = "flash attention backward";
        let (qs, ks, vs) =
            (launch::storage(qg, what, "q")?, launch::storage(kg, what, "k")?, launch::storage(vg, what, "v")?);
        let dev = launch::device(qs);
        let ops = Operands::separate((qs, ql), (ks, kl), (vs, vl))?;
        let [dq, dk, dv] = [q, k, v].map(|x| gradient(dev, x.shape()));
        let (dq, dk, dv) = (dq?, dk?, dv?);
        launch::with_addresses(dev, what, &[Some(&dq), Some(&dk), Some(&dv)], |at| {
            self.backward(&dims, &ops, &out, &grad_out, &GradTargets::separate([at[0], at[1], at[2]], &dims))
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`FlashAttention`] over one fused projection's output `qkv: [B, T, (H + 2 KVH) d_h]`
/// (queries, keys and values in consecutive blocks of features), output `[B, T, H d_h]`; its
/// gradient is one tensor of qkv's shape, each block written by the kernel that makes it.
struct PackedFlashAttention {
    attention: FlashAttention,
    /// The sizes, from qkv's shape ([`Dims::packed`]).
    dims: Dims,
}

impl CustomOp1 for PackedFlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention-packed"
    }

    launch::cuda_only!("flash attention: CUDA only (CPU tensors take the reference expression)", _);

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = self.dims;
        let out = self.attention.forward(launch::device(storage), &dims, &Operands::packed(storage, layout, &dims)?)?;
        Ok((out, Shape::from_dims(&[dims.b, dims.t, dims.h * dims.dh])))
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let grad_out = grad_out.to_dtype(DType::BF16)?.contiguous()?;
        let out = out.contiguous()?;
        let dims = self.dims;
        let (storage, layout) = qkv.storage_and_layout();
        let what = "flash attention backward";
        let storage = launch::storage(&storage, what, "qkv")?;
        let dev = launch::device(storage);
        let ops = Operands::packed(storage, layout, &dims)?;
        let grad = gradient(dev, qkv.shape())?;
        launch::with_addresses(dev, what, &[Some(&grad)], |at| {
            self.attention.backward(&dims, &ops, &out, &grad_out, &GradTargets::packed(at[0], &dims))
        })?;
        Ok(Some(grad))
    }
}
