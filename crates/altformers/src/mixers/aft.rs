//! Attention Free Transformer (Zhai et al. 2021, arXiv 2105.14103), causal, all four variants:
//!
//! ```text
//! Y_t = sigmoid(Q_t) (.) sum_{t'<=t} exp(K_t' + w_{t,t'}) (.) V_t' / sum_{t'<=t} exp(K_t' + w_{t,t'})
//! ```
//!
//! then an output projection. `Q, K, V = X W_Q, X W_K, X W_V` (`query`, `key`, `value`).
//! Order enters through `w` and, as in the paper's language models, through learned absolute
//! position embeddings added to the token embeddings (`pos_emb.weight`, the default stack's):
//! without them AFT-simple would know nothing of order beyond causality. They cap the context
//! at the table's length (`model.context`); a longer input is an error.
//!
//! - **aft-full**: `w = U V^T` (`pos_u`, `pos_v`, `[context, d']`, `model.options.rank`, default
//!   d' = 128: the paper's factorised form, which its enwik8 table finds better than the full
//!   matrix), or with `rank = 0` a learned `[context, context]` matrix (`pos_bias`). The
//!   parallel form runs over key blocks ([`blocked`]): nothing `[B, T, T]` is materialised,
//!   and with the factorised `w` nothing `T x T` at all. Decoding keeps every key and value.
//! - **aft-simple**: `w = 0`: a softmax over time per channel, i.e. the normalised decayed sum
//!   of [`crate::ops::decayed`] with no decay and no bonus: `O(T d)` (chunkwise), `O(d)`
//!   decode state.
//! - **aft-local**: `w_{t,t'}` learned (`pos_bias`, or factorised as aft-full's with
//!   `model.options.rank > 0`) only inside the window `t - t' < s`, **zero outside** (not
//!   masked: AFT-local keeps global connectivity). Computed as the AFT-simple prefix sum up to
//!   `t - s` (from the shared primitive) plus the `s` windowed terms: `O(T s d)`, decode state
//!   `O(s d)`.
//! - **aft-conv**: the paper's multi-head form: **one key channel per head** (`K: [T, h]`, each
//!   head's weights `exp(K + w)` shared by its `d/h` value channels) and the windowed bias
//!   shared across positions per head, `w_{t,t'} = kernel[h, t - t']` for `t - t' < s`, zero
//!   outside (the causal 1-D form of the paper's depthwise convolution `conv(e^K (.) V, e^w -
//!   1) + sum e^K (.) V`). The kernel is reparameterised as the paper does (it calls this
//!   important): `w = gamma (w - mean(w)) / std(w) + beta` per head, `gamma, beta` starting at
//!   0 (`conv_gamma`, `conv_beta`; `model.options.reparam = false` learns `w` directly). The
//!   same windowed computation as aft-local, `O(T s d)`, decode state `O(s d)`.
//!
//! Every exponential has a maximum subtracted first, and no maximum looks at a later position
//! (so causality is exact): in the pairwise form, each key position's largest channel (of its
//! group) and each row's largest biased weight; in the windowed form, per channel the largest of
//! the window's exponents and the prefix's log-scale. The pairwise form with each variant's
//! `w` written out as a `[T, T]` matrix is the quadratic reference every variant is tested
//! against.

use anyhow::{bail, Result as AnyResult};
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Options, Position};
use crate::nn::{gather_rows, Linear};
use crate::ops::decayed::{self, Weighting, WkvState, EMPTY_LOG_SCALE};
use crate::params::ParamBuilder;

mod blocked;
pub use blocked::blocked;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Full,
    Simple,
    Local,
    Conv,
}

pub const DEFAULT_CHUNK: usize = 32;
pub const DEFAULT_WINDOW: usize = 32;
/// Covers the comparison's contexts (LM 256, recall up to 256) and the scaling bench's shortest.
pub const DEFAULT_DENSE_BELOW: usize = 512;
/// The inner width d' of aft-full's factorised bias (the paper's).
pub const DEFAULT_RANK: usize = 128;
/// Key positions per block of aft-full's blocked form.
pub const DEFAULT_BLOCK: usize = 128;
/// Added to the variance in aft-conv's kernel reparameterisation (a window of 1, or a constant
/// kernel, has none); small beside the raw kernel's initial variance (4e-4).
const KERNEL_EPS: f64 = 1e-9;

/// `model.options` of `aft-full`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FullOptions {
    /// Inner width d' of the factorised bias `w = U V^T`; 0 learns the full matrix.
    pub rank: usize,
    /// Key (and query) positions per block of the blocked parallel form: peak memory
    /// `O(T d + block^2)` per batch row and group.
    pub block: usize,
}

impl Default for FullOptions {
    fn default() -> Self {
        Self { rank: DEFAULT_RANK, block: DEFAULT_BLOCK }
    }
}

impl Options for FullOptions {
    fn check(&self) -> AnyResult<()> {
        if self.block == 0 {
            bail!("model.options.block must be positive");
        }
        Ok(())
    }
}

/// `model.options` of `aft-simple`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleOptions {
    /// Chunk length of the chunkwise prefix sums.
    pub chunk: usize,
}

impl Default for SimpleOptions {
    fn default() -> Self {
        Self { chunk: DEFAULT_CHUNK }
    }
}

impl Options for SimpleOptions {
    fn check(&self) -> AnyResult<()> {
        positive_chunk(self.chunk)
    }
}

fn positive_chunk(chunk: usize) -> AnyResult<()> {
    if chunk == 0 {
        bail!("model.options.chunk must be positive");
    }
    Ok(())
}

fn check_window(window: usize, chunk: usize) -> AnyResult<()> {
    if window == 0 {
        bail!("model.options.window must be positive");
    }
    positive_chunk(chunk)
}

/// `model.options` of `aft-local`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalOptions {
    /// Window `s`: `w_{t,t'}` is learned for `0 <= t - t' < s`.
    pub window: usize,
    /// Chunk length of the chunkwise prefix sums.
    pub chunk: usize,
    /// Sequences up to this length run the exact dense pairwise form in `forward` (see
    /// [`ConvOptions::dense_below`]). 0: never.
    pub dense_below: usize,
    /// Inner width of a factorised bias `w = U V^T` (as aft-full's); 0 learns the matrix.
    pub rank: usize,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self { window: DEFAULT_WINDOW, chunk: DEFAULT_CHUNK, dense_below: DEFAULT_DENSE_BELOW, rank: 0 }
    }
}

impl Options for LocalOptions {
    fn check(&self) -> AnyResult<()> {
        check_window(self.window, self.chunk)
    }
}

/// `model.options` of `aft-conv`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConvOptions {
    /// Window `s`: the kernel's size.
    pub window: usize,
    /// Chunk length of the chunkwise prefix sums.
    pub chunk: usize,
    /// Sequences up to this length run the exact dense pairwise form in `forward`: O(T^2 d)
    /// in a few large matmuls. Its `[B, T, T]` weights are smaller than the chunkwise prefix
    /// sums' per-channel `[B, T, C, chunk]` ones until T ~ C chunk, and on 2 CPU cores its
    /// forward is 2-13x faster than the windowed form's at T = 1024..128 (16K tokens of 64
    /// channels, s = 32; the windowed form's prefix sums take most of its time). 0: never.
    pub dense_below: usize,
    /// The paper's reparameterisation `w = gamma (w - mean(w)) / std(w) + beta` per head.
    pub reparam: bool,
}

impl Default for ConvOptions {
    fn default() -> Self {
        Self { window: DEFAULT_WINDOW, chunk: DEFAULT_CHUNK, dense_below: DEFAULT_DENSE_BELOW, reparam: true }
    }
}

impl Options for ConvOptions {
    fn check(&self) -> AnyResult<()> {
        check_window(self.window, self.chunk)
    }
}

/// AFT replaces attention in a GPT-style block; its language models add learned absolute
/// positions to the embeddings, as the paper's do, besides the order in `w`.
pub fn adjust_defaults(cfg: &mut ModelConfig) {
    cfg.position = Position::Learned;
}

/// aft-conv's kernel `[H, s]` and, reparameterised, its per-head `gamma, beta: [H, 1]`.
struct ConvKernel {
    raw: Tensor,
    affine: Option<(Tensor, Tensor)>,
}

impl ConvKernel {
    /// The kernel the layer uses, `[H, s]` in `dtype`: `gamma (w - mean(w)) / std(w) + beta`
    /// over each head's `s` taps (population std), or `w` itself.
    fn effective(&self, dtype: DType) -> Result<Tensor> {
        let raw = self.raw.to_dtype(dtype)?;
        let Some((gamma, beta)) = &self.affine else { return Ok(raw) };
        let centred = raw.broadcast_sub(&raw.mean_keepdim(1)?)?;
        let std = (centred.sqr()?.mean_keepdim(1)? + KERNEL_EPS)?.sqrt()?;
        centred.broadcast_div(&std)?.broadcast_mul(&gamma.to_dtype(dtype)?)?.broadcast_add(&beta.to_dtype(dtype)?)
    }
}

/// The learned position bias of each variant.
enum PosBias {
    Zero,
    /// `[context, context]` (aft-full, aft-local).
    Matrix(Tensor),
    /// `U, V: [context, rank]` (factorised aft-full, aft-local).
    Factors(Tensor, Tensor),
    /// `[H, s]` (aft-conv).
    Kernel(ConvKernel),
}

pub struct Aft {
    pub variant: Variant,
    query: Linear,
    /// `d -> d`, or `d -> H` for aft-conv (one key channel per head).
    key: Linear,
    value: Linear,
    output: Linear,
    bias: PosBias,
    /// Window `s` (aft-local, aft-conv).
    window: usize,
    pub chunk: usize,
    /// Channel groups sharing one bias (the heads of aft-conv; 1 otherwise).
    groups: usize,
    /// aft-local/conv: `forward` runs the dense pairwise form up to this length.
    dense_below: usize,
    /// aft-full: key positions per block of the blocked form.
    block: usize,
    context: usize,
    /// aft-local/conv's window offsets `s - 1, ..., 0` (u32, on the model's device), made once:
    /// a step replayed from a CUDA graph must not upload from the host.
    offsets: Tensor,
}

impl Aft {
    pub fn new(cfg: &ModelConfig, variant: Variant, pb: &ParamBuilder) -> AnyResult<Self> {
        let (d, ctx) = (cfg.width, cfg.context);
        let (mut window, mut chunk, mut groups, mut dense_below, mut block) = (1, DEFAULT_CHUNK, 1, 0, DEFAULT_BLOCK);
        let matrix_or_factors = |rank: usize| -> AnyResult<PosBias> {
            Ok(if rank == 0 {
                PosBias::Matrix(pb.zeros("pos_bias", &[ctx, ctx])?)
            } else {
                PosBias::Factors(
                    pb.normal_no_decay("pos_u", &[ctx, rank], 0.01)?,
                    pb.normal_no_decay("pos_v", &[ctx, rank], 0.01)?,
                )
            })
        };
        let bias = match variant {
            Variant::Full => {
                let o: FullOptions = cfg.options()?;
                block = o.block;
                matrix_or_factors(o.rank)?
            }
            Variant::Simple => {
                let o: SimpleOptions = cfg.options()?;
                chunk = o.chunk;
                PosBias::Zero
            }
            Variant::Local => {
                let o: LocalOptions = cfg.options()?;
                (window, chunk, dense_below) = (o.window, o.chunk, o.dense_below);
                matrix_or_factors(o.rank)?
            }
            Variant::Conv => {
                let o: ConvOptions = cfg.options()?;
                (window, chunk, dense_below, groups) = (o.window, o.chunk, o.dense_below, cfg.heads);
                // std-normalised, so the raw kernel's scale only sets how fast Adam moves it
                let raw = if o.reparam {
                    pb.normal_no_decay("conv_kernel", &[cfg.heads, window], 0.02)?
                } else {
                    pb.zeros("conv_kernel", &[cfg.heads, window])?
                };
                let affine = if o.reparam {
                    Some((pb.zeros("conv_gamma", &[cfg.heads, 1])?, pb.zeros("conv_beta", &[cfg.heads, 1])?))
                } else {
                    None
                };
                PosBias::Kernel(ConvKernel { raw, affine })
            }
        };
        let out_std = 0.02 / (2.0 * cfg.depth as f64).sqrt();
        let key_width = if variant == Variant::Conv { cfg.heads } else { d };
        let offsets = Tensor::from_vec((0..window as u32).rev().collect::<Vec<_>>(), window, &pb.device)?;
        Ok(Self {
            variant,
            query: Linear::new(pb, "query", d, d, 0.02, cfg.bias)?,
            key: Linear::new(pb, "key", d, key_width, 0.02, cfg.bias)?,
            value: Linear::new(pb, "value", d, d, 0.02, cfg.bias)?,
            output: Linear::new(pb, "output", d, d, out_std, cfg.bias)?,
            bias,
            window,
            chunk,
            groups,
            dense_below,
            block,
            context: ctx,
            offsets,
        })
    }

    /// `x: [B, T, D]` -> `(sigmoid(Q), K, V)`, each `[B, T, D]`; `K, V` in the accumulation
    /// dtype (f32 under bf16 activations), `sigmoid(Q)` in `x`'s. aft-conv's `[B, T, H]` keys
    /// are repeated over their heads' channels: the weights are then per channel as in the
    /// other variants (each head's channels share them) and every form below serves all four.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let acc = decayed::accumulation_dtype(x.dtype());
        let sq = candle_nn::ops::sigmoid(&self.query.forward(x)?)?;
        let k = self.key.forward(x)?.to_dtype(acc)?;
        let v = self.value.forward(x)?.to_dtype(acc)?;
        let k = if self.variant == Variant::Conv {
            let (b, t, h) = k.dims3()?;
            let d = v.dim(2)?;
            k.unsqueeze(3)?.broadcast_as((b, t, h, d / h))?.reshape((b, t, d))?
        } else {
            k
        };
        Ok((sq, k, v))
    }

    fn finish(&self, sq: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.output.forward(&(sq * y.to_dtype(sq.dtype())?)?)
    }

    fn check_positions(&self, end: usize) -> Result<()> {
        if matches!(self.bias, PosBias::Matrix(_) | PosBias::Factors(..)) && end > self.context {
            candle_core::bail!("position {} is beyond the learned position bias ({} positions)", end - 1, self.context);
        }
        Ok(())
    }

    /// Each variant's `w_{t,t'}` for `t, t' < T` as a `[G, T, T]` matrix (entries above the
    /// diagonal are ignored), in `like`'s dtype.
    pub fn bias_matrix(&self, t: usize, like: &Tensor) -> Result<Tensor> {
        self.check_positions(t)?;
        let s = self.window;
        let (dtype, dev) = (like.dtype(), like.device());
        let in_window = |p: usize| p / t >= p % t && p / t - p % t < s;
        // aft-local's w is zero outside the window
        let banded = |w: Tensor| -> Result<Tensor> {
            if self.variant != Variant::Local {
                return w.unsqueeze(0);
            }
            let band: Vec<f64> = (0..t * t).map(|p| if in_window(p) { 1.0 } else { 0.0 }).collect();
            w.mul(&Tensor::from_vec(band, (t, t), dev)?.to_dtype(dtype)?)?.unsqueeze(0)
        };
        match &self.bias {
            PosBias::Zero => Tensor::zeros((1, t, t), dtype, dev),
            PosBias::Matrix(w) => banded(w.narrow(0, 0, t)?.narrow(1, 0, t)?.to_dtype(dtype)?),
            PosBias::Factors(u, v) => {
                let (u, v) = (u.narrow(0, 0, t)?.to_dtype(dtype)?, v.narrow(0, 0, t)?.to_dtype(dtype)?);
                banded(u.matmul(&v.t()?)?)
            }
            PosBias::Kernel(kernel) => {
                // kernel[h, t - t'] inside the window, 0 outside (index s of the zero-padded kernel)
                let padded = kernel.effective(dtype)?.pad_with_zeros(1, 0, 1)?;
                let idx: Vec<u32> =
                    (0..t * t).map(|p| if in_window(p) { (p / t - p % t) as u32 } else { s as u32 }).collect();
                let idx = Tensor::from_vec(idx, t * t, dev)?;
                // as rows of the transposed kernel: the gradient then scatters in parallel on
                // a GPU (candle's index_add would give each of the G rows one thread for T^2 ids)
                gather_rows(&padded.t()?.contiguous()?, &idx)?.t()?.reshape((self.groups, t, t))
            }
        }
    }

    /// The windowed bias for query positions `offset..offset+len`: `[G, len, s]`,
    /// `band[g, j, o] = w_{p, p-o}` with `p = offset + j` (arbitrary where `p < o`).
    fn band(&self, offset: usize, len: usize, like: &Tensor) -> Result<Tensor> {
        let s = self.window;
        // (query row, key row) of each (j, o)
        let rows =
            || (0..len * s).map(move |q| (offset + q / s, q % s)).map(|(p, o)| (p, if p >= o { p - o } else { p }));
        let ids = |v: Vec<u32>| Tensor::from_vec(v, len * s, like.device());
        match &self.bias {
            PosBias::Matrix(w) => {
                self.check_positions(offset + len)?;
                let ctx = self.context;
                let idx = ids(rows().map(|(p, k)| (p * ctx + k) as u32).collect())?;
                // one-element rows, so that the gradient scatters in parallel on a GPU
                let flat = w.to_dtype(like.dtype())?.reshape((ctx * ctx, 1))?;
                gather_rows(&flat, &idx)?.reshape((1, len, s))
            }
            PosBias::Factors(u, v) => {
                // w_{p, k} = U_p . V_k: O(len s d') rather than the [len, T] rows
                self.check_positions(offset + len)?;
                let uq = gather_rows(&u.to_dtype(like.dtype())?, &ids(rows().map(|(p, _)| p as u32).collect())?)?;
                let vk = gather_rows(&v.to_dtype(like.dtype())?, &ids(rows().map(|(_, k)| k as u32).collect())?)?;
                (uq * vk)?.sum(1)?.reshape((1, len, s))
            }
            PosBias::Kernel(kernel) => {
                kernel.effective(like.dtype())?.unsqueeze(1)?.broadcast_as((self.groups, len, s))?.contiguous()
            }
            PosBias::Zero => candle_core::bail!("only aft-local and aft-conv have a windowed bias"),
        }
    }

    /// aft-full's `w_{p, t'}` for `t' <= p`: `[1, 1, p + 1]` (one row, not the whole matrix).
    fn bias_row(&self, p: usize, like: &Tensor) -> Result<Tensor> {
        self.check_positions(p + 1)?;
        let row = match &self.bias {
            PosBias::Matrix(w) => w.narrow(0, p, 1)?.narrow(1, 0, p + 1)?.to_dtype(like.dtype())?,
            PosBias::Factors(u, v) => {
                let (u, v) =
                    (u.narrow(0, p, 1)?.to_dtype(like.dtype())?, v.narrow(0, 0, p + 1)?.to_dtype(like.dtype())?);
                u.matmul(&v.t()?)?
            }
            _ => candle_core::bail!("only aft-full has a bias row"),
        };
        row.unsqueeze(0)
    }

    /// aft-full's parallel form over key blocks ([`blocked`]): `k, v: [B, T, D]` -> `[B, T, D]`.
    fn blocked_full(&self, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let t = k.dim(1)?;
        self.check_positions(t)?;
        let (bias, factored) = match &self.bias {
            PosBias::Matrix(w) => (w.narrow(0, 0, t)?.narrow(1, 0, t)?, false),
            PosBias::Factors(u, v) => (Tensor::cat(&[u.narrow(0, 0, t)?, v.narrow(0, 0, t)?], 0)?, true),
            _ => candle_core::bail!("only aft-full runs the blocked form"),
        };
        blocked(k, v, &bias.to_dtype(k.dtype())?, factored, self.block)
    }

    /// The quadratic reference: the pairwise form with this variant's `w` as a matrix.
    /// `x: [B, T, D] -> [B, T, D]`.
    pub fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let (sq, k, v) = self.project(x)?;
        let w = self.bias_matrix(x.dim(1)?, &k)?;
        self.finish(&sq, &pairwise(&k, &v, &w, 0)?)
    }

    /// Parallel form with prefix sums in chunks of `chunk`; with `keep_state`, also the decode
    /// state (empty otherwise: training's forward has no use for it).
    fn run(&self, x: &Tensor, chunk: usize, keep_state: bool) -> Result<(Tensor, MixerState)> {
        let t = x.dim(1)?;
        let (sq, k, v) = self.project(x)?;
        let (y, tensors) = match self.variant {
            Variant::Full => (self.blocked_full(&k, &v)?, vec![k, v]),
            Variant::Simple => {
                let (y, s) = decayed::wkv_chunked(&k, &v, Weighting::default(), chunk, None)?;
                (y, s.to_vec())
            }
            Variant::Local | Variant::Conv => {
                let (parts, _) = decayed::wkv_chunked_parts(&k, &v, Weighting::default(), chunk, None)?;
                let band = self.band(0, t, &k)?;
                let y = ratio_with_f64_fallback(k.dtype(), |dtype| {
                    if dtype == k.dtype() {
                        return banded_parts(&k, &v, &parts, &band);
                    }
                    let (k, v) = (k.to_dtype(dtype)?, v.to_dtype(dtype)?);
                    let (parts, _) = decayed::wkv_chunked_parts(&k, &v, Weighting::default(), chunk, None)?;
                    banded_parts(&k, &v, &parts, &band.to_dtype(dtype)?)
                })?;
                if !keep_state {
                    return Ok((self.finish(&sq, &y)?, MixerState::default()));
                }
                // decode state: the prefix up to t - s, and the last s - 1 keys and values
                let s = self.window;
                let prefix = if t >= s {
                    let at = |x: &Tensor| x.narrow(1, t - s, 1).and_then(|x| x.squeeze(1));
                    WkvState { aa: at(&parts.num)?, bb: at(&parts.den)?, pp: at(&parts.log_scale)? }
                } else {
                    WkvState::empty(k.dim(0)?, k.dim(2)?, &k)?
                };
                let keep = (s - 1).min(t);
                let (kc, vc) = (k.narrow(1, t - keep, keep)?, v.narrow(1, t - keep, keep)?);
                (y, self.window_state(prefix, kc, vc, t)?.into_vec())
            }
        };
        Ok((self.finish(&sq, &y)?, MixerState { tensors, pos: t }))
    }
}

/// The pairwise (AFT-full) form, `O(S Tq C)`: queries at positions `offset..offset+Tq`
/// see keys `t' <= t`.
///
/// `k, v: [B, S, C]` (positions `0..S`), `bias: [G, Tq, S]` (`w_{t,t'}`; the `C` channels
/// split into `G` equal groups, group `g` using `bias[g]`) -> `[B, Tq, C]`.
pub fn pairwise(k: &Tensor, v: &Tensor, bias: &Tensor, offset: usize) -> Result<Tensor> {
    let ratio = ratio_with_f64_fallback(k.dtype(), |dtype| {
        let (num, den, _) = pairwise_parts(&k.to_dtype(dtype)?, &v.to_dtype(dtype)?, &bias.to_dtype(dtype)?, offset)?;
        Ok((num, den))
    })?;
    ungroup(&ratio)
}

/// A denominator below this (each is scaled so that its largest possible term is 1) has lost
/// terms to underflow: [`pairwise_parts`] stabilises each key position by its largest channel,
/// so a channel whose keys sit far below the others' (about 35 nats here, 87 to lose
/// everything) keeps only tiny terms. 1e-15 rather than smaller: the quotient's gradient
/// divides by `den^2`, which must stay a normal f32. The likely cause (not yet reproduced) of
/// AFT-conv's NaN gradient on MQAR (256, 16) at lr 3e-3, its loss falling smoothly until then.
const UNDERFLOW: f64 = 1e-15;

/// `num / den` of `parts(dtype)` computed in the keys' `dtype`, except where a denominator is
/// below [`UNDERFLOW`]: those elements come from the same parts in f64 (exact to keys ~700
/// nats apart, gradients to ~350), computed only when some element needs them (one host read
/// of a flag per call, a device sync on a GPU). Element by element, so as causal as the parts;
/// where f32 is exact nothing changes.
fn ratio_with_f64_fallback(dtype: DType, parts: impl Fn(DType) -> Result<(Tensor, Tensor)>) -> Result<Tensor> {
    let (num, den) = parts(dtype)?;
    if dtype == DType::F64 {
        return num / den;
    }
    let low = den.lt(UNDERFLOW)?;
    if low.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? == 0.0 {
        return num / den;
    }
    let (num64, den64) = parts(DType::F64)?;
    let exact = (num64 / den64)?.to_dtype(dtype)?;
    // the replaced f32 quotients divide by 1, so their (unused) gradients stay finite
    let den = low.where_cond(&den.ones_like()?, &den)?;
    low.where_cond(&exact, &(num / den)?)
}

/// [`pairwise`] before its division: numerator and denominator `[B, G, Tq, C/G]`, each
/// scaled down by `e^{log_scale}` (`log_scale: [B, G, Tq, 1]`). `bias` is `[G, Tq, S]`, or
/// `[B, G, Tq, S]` for a bias of each batch row.
///
/// `exp(K_t' + w_{t,t'}) = exp(K_t' - mk_t') exp(w_{t,t'} + mk_t')` with `mk_t'` the largest
/// key of position `t'` (in its group); the second factor has its row maximum (the log-scale)
/// subtracted. Both factors are at most 1, and the denominator is at least `exp(-(spread of
/// the keys at one position))`, so keys up to about +-15 are exact in f32; past that
/// [`ratio_with_f64_fallback`] takes the elements whose denominators fell too low from f64.
fn pairwise_parts(k: &Tensor, v: &Tensor, bias: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, c) = k.dims3()?;
    let bias = if bias.rank() == 3 { bias.unsqueeze(0)? } else { bias.clone() };
    let (_, g, tq, _) = bias.dims4()?;
    let split = |x: &Tensor| x.reshape((b, s, g, c / g))?.transpose(1, 2)?.contiguous(); // [B, G, S, C/G]
    let (kg, vg) = (split(k)?, split(v)?);
    let mk = kg.max_keepdim(D::Minus1)?.detach(); // [B, G, S, 1]
    let ek = kg.broadcast_sub(&mk)?.exp()?;
    let mask: Vec<f64> =
        (0..tq).flat_map(|j| (0..s).map(move |i| if i <= offset + j { 0.0 } else { f64::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (1, 1, tq, s), k.device())?.to_dtype(k.dtype())?;
    let wp = bias.broadcast_add(&mk.transpose(2, 3)?)?.broadcast_add(&mask)?; // [B, G, Tq, S]
    let m = wp.max_keepdim(D::Minus1)?.detach();
    let a = wp.broadcast_sub(&m)?.exp()?;
    Ok((a.matmul(&(&ek * &vg)?)?, a.matmul(&ek)?, m))
}

/// `[B, G, Tq, C/G] -> [B, Tq, C]`, the channel groups side by side again.
fn ungroup(x: &Tensor) -> Result<Tensor> {
    let (b, g, tq, cg) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, tq, g * cg))
}

/// The windowed form (AFT-local, AFT-conv), `O(T s C)`: the prefix sums over `t' <= t - s`
/// (weight `e^{K_t'}`) plus the window `t - s < t' <= t` (weight `e^{K_t' + w_{t,t'}}`).
///
/// `k, v: [B, T, C]`; `prefix`: [`decayed::wkv_chunked_parts`] of `k, v` without decay or
/// bonus (the sums over `t' <= t` at every `t`); `band: [G, T, s]` with
/// `band[g, t, o] = w_{t, t-o}` -> numerator and denominator `[B, T, C]`, on a common scale.
pub fn banded_parts(k: &Tensor, v: &Tensor, prefix: &decayed::WkvParts, band: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, c) = k.dims3()?;
    let (g, _, s) = band.dims3()?;
    let fill = |n: usize, value: f64| -> Result<Tensor> { Tensor::zeros((b, n, c), k.dtype(), k.device())? + value };
    // the prefix sums up to t - s
    let shifted = |x: &Tensor, value: f64| -> Result<Tensor> {
        if t > s {
            Tensor::cat(&[fill(s, value)?, x.narrow(1, 0, t - s)?], 1)
        } else {
            fill(t, value)
        }
    };
    let (pnum, pden, pscale) =
        (shifted(&prefix.num, 0.0)?, shifted(&prefix.den, 0.0)?, shifted(&prefix.log_scale, EMPTY_LOG_SCALE)?);
    // The window, as the pairwise form on blocks: the queries of a block of s positions see
    // the 2s - 1 keys ending at its last one, with w inside the window and -inf outside (or
    // before position 0). O(T s C) in batched matmuls; materialising each position's s keys
    // instead (s copies of the sequence) took 12x as long (1 s vs 80 ms forward for 16K
    // tokens of 64 channels, s = 32, 2 CPU cores).
    let (l, n, pad) = decayed::chunk_layout(t, s);
    let sl = l + s - 1; // keys per block
    let rows = s - 1 + n * l; // padded sequence: s - 1 before, `pad` after (zeros: finite)
    let ids: Vec<u32> = (0..b * n * sl).map(|i| ((i / (n * sl)) * rows + (i / sl) % n * l + i % sl) as u32).collect();
    let ids = Tensor::from_vec(ids, b * n * sl, k.device())?;
    // [B N, 2s - 1, C]: block n of batch row b
    let blocks = |x: &Tensor| {
        gather_rows(&x.pad_with_zeros(1, s - 1, pad)?.reshape((b * rows, c))?, &ids)?.reshape((b * n, sl, c))
    };

    // bias[n, g, j, r]: query t = n l + j, key t' = n l + r - (s - 1), offset o = t - t'
    let outside = (g * t * s) as u32; // index of the appended -inf
    let bias_ids: Vec<u32> = (0..n * g * l * sl)
        .map(|i| {
            let (ni, gi, j, r) = (i / (g * l * sl), (i / (l * sl)) % g, (i / sl) % l, i % sl);
            let (q, o) = (ni * l + j, (j + s - 1).wrapping_sub(r));
            if o < s && q + r >= j + s - 1 {
                (gi * t * s + q.min(t - 1) * s + o) as u32 // padded queries reuse the last row
            } else {
                outside
            }
        })
        .collect();
    let flat =
        Tensor::cat(&[band.flatten_all()?, Tensor::full(f32::NEG_INFINITY, 1, k.device())?.to_dtype(k.dtype())?], 0)?;
    let bias = gather_rows(&flat.unsqueeze(1)?, &Tensor::from_vec(bias_ids, n * g * l * sl, k.device())?)?
        .reshape((1, n, g, l, sl))?
        .broadcast_as((b, n, g, l, sl))?
        .reshape((b * n, g, l, sl))?;
    // queries at block positions j see keys r <= j + s - 1 (the mask of `pairwise_parts`)
    let (wnum, wden, mw) = pairwise_parts(&blocks(k)?, &blocks(v)?, &bias, s - 1)?;
    let back = |x: &Tensor| -> Result<Tensor> { ungroup(x)?.reshape((b, n * l, c))?.narrow(1, 0, t) };
    let mw = back(&mw.broadcast_as(wnum.shape())?.contiguous()?)?;
    let (wnum, wden) = (back(&wnum)?, back(&wden)?);
    // merge with the prefix up to t - s on a common scale
    let m = mw.maximum(&pscale)?.detach();
    let (fw, fp) = ((mw - &m)?.exp()?, (pscale - &m)?.exp()?);
    let num = ((&fp * pnum)? + (&fw * wnum)?)?;
    let den = ((fp * pden)? + (fw * wden)?)?;
    Ok((num, den))
}

impl SequenceMixer for Aft {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(1)? <= self.dense_below {
            return self.reference(x);
        }
        Ok(self.run(x, self.chunk, false)?.0)
    }

    /// State: aft-full `[K, V]` (`[B, T, D]` each, grows with T); aft-simple `[aa, bb, pp]`
    /// (`[B, D]` each); aft-local/conv `[aa, bb, pp]` of the prefix up to `T - s`, the last
    /// `s - 1` keys and values `[B, s - 1, D]` (empty entries first while `T < s - 1`) and
    /// aft-local's position ([`WindowState`]): bounded by the window.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        self.run(x, self.chunk, true)
    }

    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        let p = state.pos;
        let (sq, k, v) = self.project(x)?;
        let y = match self.variant {
            Variant::Full => {
                let (kc, vc) = match state.tensors.as_slice() {
                    [kc, vc] => (Tensor::cat(&[kc, &k], 1)?, Tensor::cat(&[vc, &v], 1)?),
                    _ => (k.clone(), v.clone()),
                };
                let w = self.bias_row(p, &k)?;
                let y = pairwise(&kc, &vc, &w, p)?;
                state.tensors = vec![kc, vc];
                y
            }
            Variant::Simple => {
                let (b, _, c) = k.dims3()?;
                let mut s = if state.tensors.is_empty() {
                    WkvState::empty(b, c, &k)?
                } else {
                    WkvState::from_slice(&state.tensors)?
                };
                let y = decayed::wkv_step(&mut s, &k.squeeze(1)?, &v.squeeze(1)?, Weighting::default())?;
                state.tensors = s.to_vec();
                y.unsqueeze(1)?
            }
            Variant::Local | Variant::Conv => self.window_step(&k, &v, state)?,
        };
        state.pos = p + 1;
        self.finish(&sq, &y)
    }

    /// AFT-simple's state is three `[B, D]` running sums, AFT-local/conv's the prefix's sums
    /// and a window of fixed length ([`WindowState`]); AFT-full keeps keys that grow.
    fn static_step(&self) -> bool {
        self.variant != Variant::Full
    }

    fn chunked(&self, x: &Tensor, chunk: usize) -> Option<Result<Tensor>> {
        match self.variant {
            Variant::Full => None,
            _ => Some(self.run(x, chunk, false).map(|(y, _)| y)),
        }
    }
}

/// aft-local/conv's decoding state. The cache always holds `s - 1` keys and values, the
/// oldest first; before the sequence has `s - 1` tokens its first entries are empty (key
/// `-inf`: weight 0 in the window, and nothing added when folded into the prefix). So the step
/// has the same shapes at every position and is replayed from a CUDA graph.
struct WindowState {
    /// Sums over the keys older than the window.
    prefix: WkvState,
    /// `[B, s - 1, C]` each; `None` for a window of one.
    cache: Option<(Tensor, Tensor)>,
    /// aft-local's position as a one-element f32 tensor (its bias `w_{t,t'}` depends on `t`).
    position: Option<Tensor>,
}

impl WindowState {
    fn into_vec(self) -> Vec<Tensor> {
        let mut tensors = self.prefix.to_vec();
        tensors.extend(self.cache.into_iter().flat_map(|(k, v)| [k, v]));
        tensors.extend(self.position);
        tensors
    }
}

impl Aft {
    /// The state after `pos` tokens from the prefix sums and the last `min(pos, s - 1)` keys
    /// and values `[B, n, C]`, padded with empty entries to `s - 1`.
    fn window_state(&self, prefix: WkvState, k: Tensor, v: Tensor, pos: usize) -> Result<WindowState> {
        let s = self.window;
        let cache = if s > 1 {
            let (b, n, c) = k.dims3()?;
            let empty = s - 1 - n;
            let none = (Tensor::zeros((b, empty, c), k.dtype(), k.device())? + f64::NEG_INFINITY)?;
            Some((Tensor::cat(&[&none, &k], 1)?, v.pad_with_zeros(1, empty, 0)?))
        } else {
            None
        };
        let position = match self.variant {
            Variant::Local => Some(super::device_position(None, pos, k.device())?),
            _ => None,
        };
        Ok(WindowState { prefix, cache, position })
    }

    fn read_window_state(&self, tensors: &[Tensor], like: &Tensor, pos: usize) -> Result<WindowState> {
        let (b, _, c) = like.dims3()?;
        if tensors.is_empty() {
            let none = |n: usize| Tensor::zeros((b, n, c), like.dtype(), like.device());
            return self.window_state(WkvState::empty(b, c, like)?, none(0)?, none(0)?, pos);
        }
        let cached = 2 * (self.window > 1) as usize;
        let local = (self.variant == Variant::Local) as usize;
        if tensors.len() != 3 + cached + local {
            candle_core::bail!("aft window state has {} tensors", tensors.len());
        }
        Ok(WindowState {
            prefix: WkvState::from_slice(&tensors[..3])?,
            cache: (cached > 0).then(|| (tensors[3].clone(), tensors[4].clone())),
            position: (local > 0).then(|| tensors[3 + cached].clone()),
        })
    }

    /// The window's bias for the keys at `p - s + 1 ..= p`, oldest first: `[G, s]`. aft-conv's
    /// depends on the offset only; aft-local's is read at the device position `p` (keys
    /// before position 0 read key column 0: their weight is zero anyway).
    fn window_bias(&self, position: Option<&Tensor>, like: &Tensor) -> Result<Tensor> {
        let s = self.window;
        let Some(p) = position else {
            return self.band(0, 1, like)?.squeeze(1)?.index_select(&self.offsets, 1);
        };
        let offsets = self.offsets.to_dtype(DType::F32)?;
        let keys = p.broadcast_sub(&offsets)?.maximum(0.0)?.to_dtype(DType::U32)?;
        let row = p.to_dtype(DType::U32)?;
        match &self.bias {
            PosBias::Matrix(w) => w.index_select(&row, 0)?.index_select(&keys, 1)?.to_dtype(like.dtype()),
            PosBias::Factors(u, v) => {
                // summed in `like`'s dtype (f32 under bf16), as the prefill's band is
                let u = u.index_select(&row, 0)?.to_dtype(like.dtype())?;
                let v = v.index_select(&keys, 0)?.to_dtype(like.dtype())?;
                u.broadcast_mul(&v)?.sum(1)?.reshape((1, s))
            }
            _ => candle_core::bail!("only aft-local reads its bias at a position"),
        }
    }

    /// One token of aft-local/conv: `k, v: [B, 1, C]` -> `[B, 1, C]`, advancing the prefix
    /// and the window cache.
    fn window_step(&self, k: &Tensor, v: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        let (_, _, c) = k.dims3()?;
        let (s, g) = (self.window, self.groups);
        if self.variant == Variant::Local {
            self.check_positions(state.pos + 1)?;
        }
        let WindowState { prefix, cache, position } = self.read_window_state(&state.tensors, k, state.pos)?;
        // keys and values at p - s + 1 ..= p, oldest first: [B, s, C]
        let (kw, vw) = match &cache {
            Some((kc, vc)) => (Tensor::cat(&[kc, k], 1)?, Tensor::cat(&[vc, v], 1)?),
            None => (k.clone(), v.clone()),
        };
        let band = self.window_bias(position.as_ref(), k)?; // [G, s]
        let bias = band.t()?.unsqueeze(2)?.broadcast_as((s, g, c / g))?.reshape((1, s, c))?;
        let e = kw.broadcast_add(&bias)?;
        let m = e.max_keepdim(1)?.squeeze(1)?.maximum(&prefix.pp)?.detach(); // [B, C]
        let pe = e.broadcast_sub(&m.unsqueeze(1)?)?.exp()?;
        let fp = (&prefix.pp - &m)?.exp()?;
        let num = ((&fp * &prefix.aa)? + (&pe * &vw)?.sum(1)?)?;
        let den = ((fp * &prefix.bb)? + pe.sum(1)?)?;
        let y = (num / den)?.unsqueeze(1)?;
        // advance: the oldest key leaves the window for the prefix (an empty one adds nothing)
        let prefix =
            decayed::wkv_fold(&prefix, &kw.narrow(1, 0, 1)?.squeeze(1)?, &vw.narrow(1, 0, 1)?.squeeze(1)?, None)?;
        // contiguous (a batch's narrow is strided): a CUDA graph's capture copies the new state
        // into its buffers, and a strided copy there would need a layout the warm-up never saw
        let keep = |x: &Tensor| x.narrow(1, 1, s - 1)?.contiguous();
        let cache = (s > 1).then(|| Ok::<_, candle_core::Error>((keep(&kw)?, keep(&vw)?)));
        let position = position.map(|p| p + 1.0).transpose()?;
        state.tensors = WindowState { prefix, cache: cache.transpose()?, position }.into_vec();
        Ok(y)
    }
}

pub fn build_full(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Aft::new(cfg, Variant::Full, pb)?))
}

pub fn build_simple(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Aft::new(cfg, Variant::Simple, pb)?))
}

pub fn build_local(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Aft::new(cfg, Variant::Local, pb)?))
}

pub fn build_conv(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Aft::new(cfg, Variant::Conv, pb)?))
}

fn shape(s: &CostShape) -> (f64, f64, f64) {
    (s.batch as f64, s.seq as f64, s.width as f64)
}

/// q, k, v, output projections: 4 d^2 MACs per token.
fn projections(s: &CostShape) -> f64 {
    let (b, t, d) = shape(s);
    2.0 * 4.0 * b * t * d * d
}

pub const FULL_COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("AFT"),
        judgement: Judgement::Wrong(
            "space: the T x T pairwise bias w alone is O(T^2) unless factorised (w = U V^T); the review also leaves out AFT's normaliser and sigma(Q), and the name is Attention Free Transformer",
        ),
    },
    true_time: "O(T^2 d + T d^2)",
    true_space: "O(T d + T d') with the factorised w = U V^T (keys in blocks: O(block^2) weights at a time); the full matrix w is O(T^2) parameters; decode O(T d) cache",
    flops: |s: &CostShape| {
        let (b, t, d) = shape(s);
        projections(s) + b * 4.0 * t * t * d
    },
    memory: |s: &CostShape| {
        let (b, t, d) = shape(s);
        let block = (DEFAULT_BLOCK as f64).min(t);
        b * (8.0 * t * d + 4.0 * block * block) + 2.0 * t * DEFAULT_RANK as f64
    },
    state: |s: &CostShape| 2.0 * (s.batch * s.seq * s.width) as f64,
};

pub const SIMPLE_COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("AFT"),
        judgement: Judgement::Imprecise(
            "O(Td) omits the O(T d^2) projections; the review leaves out AFT's normaliser and sigma(Q), and the name is Attention Free Transformer",
        ),
    },
    true_time: "O(T d^2) projections + O(T d) (chunkwise prefix sums here: O(T C d), C = chunk)",
    true_space: "O(T C d) training (chunkwise); O(d) state per layer decoding",
    flops: |s: &CostShape| {
        let (b, t, d) = shape(s);
        projections(s) + b * 4.0 * t * DEFAULT_CHUNK as f64 * d
    },
    memory: |s: &CostShape| {
        let (b, t, d) = shape(s);
        b * (2.0 * t * DEFAULT_CHUNK as f64 * d + 6.0 * t * d)
    },
    state: |s: &CostShape| 3.0 * (s.batch * s.width) as f64,
};

pub const WINDOW_COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("AFT"),
        judgement: Judgement::Imprecise(
            "no figure for AFT-local or AFT-conv (O(T s d) for a window s); w is a pairwise position bias, relative only in AFT-conv; the normaliser and sigma(Q) are left out",
        ),
    },
    true_time: "O(T s d + T d^2) (window s; prefix sums O(T C d) chunkwise)",
    true_space: "O(T (s + C) d) training; O(s d) state per layer decoding",
    flops: |s: &CostShape| {
        let (b, t, d) = shape(s);
        projections(s) + b * t * d * (4.0 * DEFAULT_CHUNK as f64 + 4.0 * DEFAULT_WINDOW as f64)
    },
    memory: |s: &CostShape| {
        let (b, t, d) = shape(s);
        b * t * d * (2.0 * DEFAULT_CHUNK as f64 + 3.0 * DEFAULT_WINDOW as f64 + 6.0)
    },
    state: |s: &CostShape| ((3 + 2 * (DEFAULT_WINDOW - 1).min(s.seq)) * s.batch * s.width) as f64,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{self, randn, random_tokens, rel_err, tiny_config};
    use candle_core::{DType, Device};

    const VARIANTS: [(&str, Variant); 4] = [
        ("aft-full", Variant::Full),
        ("aft-simple", Variant::Simple),
        ("aft-local", Variant::Local),
        ("aft-conv", Variant::Conv),
    ];

    fn tiny(name: &str, sets: &[&str]) -> ModelConfig {
        let mut all: Vec<&str> = match name {
            "aft-local" | "aft-conv" => {
                vec!["model.options.window=5", "model.options.chunk=4", "model.options.dense_below=0"]
            }
            "aft-simple" => vec!["model.options.chunk=4"],
            // blocks of 4 positions: several, the last one short, at every T tested
            _ => vec!["model.options.block=4"],
        };
        all.extend_from_slice(sets);
        tiny_config(name, &all).unwrap()
    }

    /// A mixer with random (not zero) position biases and larger keys, so every term matters.
    fn mixer(name: &str, variant: Variant, sets: &[&str], dtype: DType) -> Aft {
        let cfg = tiny(name, sets);
        let mut m = Aft::new(&cfg, variant, &ParamBuilder::new(3, &Device::Cpu, dtype)).unwrap();
        let r = |dims: &[usize], seed| randn(dims, seed, dtype).unwrap();
        m.bias = match &m.bias {
            PosBias::Zero => PosBias::Zero,
            PosBias::Matrix(w) => PosBias::Matrix(r(w.dims(), 4)),
            PosBias::Factors(u, v) => PosBias::Factors(r(u.dims(), 4), r(v.dims(), 5)),
            PosBias::Kernel(k) => PosBias::Kernel(ConvKernel {
                raw: r(k.raw.dims(), 4),
                affine: k.affine.as_ref().map(|(g, b)| (r(g.dims(), 5), r(b.dims(), 6))),
            }),
        };
        m.key = Linear { weight: (m.key.weight.clone() * 50.0).unwrap(), bias: None };
        m
    }

    /// The key projection's identity: `[16, 16]`, or aft-conv's first `H` rows (head `h`'s
    /// key is channel `h`).
    fn key_eye(m: &Aft, dtype: DType) -> Result<Tensor> {
        let rows = m.key.weight.dim(0)?;
        Tensor::eye(16, dtype, &Device::Cpu)?.narrow(0, 0, rows)
    }

    #[test]
    fn aft_modes_agree_with_the_reference() -> AnyResult<()> {
        for (name, variant) in VARIANTS {
            let options: &[&[&str]] = match variant {
                Variant::Full => &[&[], &["model.options.rank=0"], &["model.options.rank=3"]],
                Variant::Local => &[&[], &["model.options.rank=3"]],
                Variant::Conv => &[&[], &["model.options.reparam=false"]],
                Variant::Simple => &[&[]],
            };
            for &sets in options {
                let m = mixer(name, variant, sets, DType::F32);
                for t in [10, 13] {
                    let x = randn(&[2, t, 16], 1, DType::F32)?;
                    let reference = m.reference(&x)?;
                    assert!(rel_err(&m.forward(&x)?, &reference)? < 1e-4, "{name} forward, T {t}");
                    if let Some(y) = m.chunked(&x, 3) {
                        assert!(rel_err(&y?, &reference)? < 1e-4, "{name} chunked, T {t}");
                    }
                    testing::assert_mixer_modes_agree(&m, &x, &[0, 1, 4, 7]).map_err(|e| e.context(name))?;
                }
                let cfg = tiny(name, sets);
                let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
                for t in [10, 13] {
                    let tokens = random_tokens(2, t, cfg.vocab, 5)?;
                    testing::assert_modes_agree(&model, &tokens, &[3]).map_err(|e| e.context(name))?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn aft_is_causal() -> AnyResult<()> {
        for (name, variant) in VARIANTS {
            let m = mixer(name, variant, &[], DType::F32);
            let x = randn(&[2, 13, 16], 2, DType::F32)?;
            testing::assert_causal(&|x| Ok(m.forward(x)?), &x)?;
            testing::assert_causal(&|x| Ok(m.reference(x)?), &x)?;
        }
        Ok(())
    }

    #[test]
    fn aft_gradients_match_finite_differences() -> AnyResult<()> {
        for (name, _) in VARIANTS {
            let e = testing::model_gradient_err(&tiny(name, &[]), 7)?;
            assert!(e < 1e-4, "{name}: {e}");
        }
        for (name, sets) in [("aft-full", "model.options.rank=0"), ("aft-local", "model.options.rank=2")] {
            let e = testing::model_gradient_err(&tiny(name, &[sets]), 7)?;
            assert!(e < 1e-4, "{name} {sets}: {e}");
        }
        Ok(())
    }

    #[test]
    fn aft_decode_state_sizes() -> AnyResult<()> {
        for (name, variant) in VARIANTS {
            let cfg = tiny(name, &[]);
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            let bytes =
                |t: usize| -> AnyResult<usize> { Ok(model.prefill(&random_tokens(1, t, cfg.vocab, 1)?)?.1.bytes()) };
            let (short, long, longer) = (bytes(2)?, bytes(12)?, bytes(20)?);
            match variant {
                // the whole key/value history
                Variant::Full => assert!(short < long && long < longer, "{name}"),
                Variant::Simple => assert!(short == long && long == longer, "{name}"),
                // bounded by the window (5): s - 1 entries from the first token (the empty
                // ones first), so the step has one shape at every position
                Variant::Local | Variant::Conv => assert!(short == long && long == longer, "{name}"),
            }
        }
        Ok(())
    }

    #[test]
    fn aft_large_keys_stay_finite() -> AnyResult<()> {
        for (name, variant) in VARIANTS {
            let mut m = mixer(name, variant, &[], DType::F32);
            m.key = Linear { weight: (key_eye(&m, DType::F32)? * 30.0)?, bias: None };
            let x = (randn(&[2, 24, 16], 9, DType::F32)?.sign()?
                + randn(&[2, 24, 16], 10, DType::F32)?.affine(0.05, 0.0)?)?;
            let ys = [m.forward(&x)?, m.reference(&x)?, testing::mixer_recurrent(&m, &x, 6)?];
            for y in &ys {
                assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()), "{name}");
            }
            assert!(rel_err(&ys[0], &ys[1])? < 1e-4 && rel_err(&ys[2], &ys[1])? < 1e-4, "{name}");
        }
        Ok(())
    }

    /// A channel whose keys sit 150 below the others' at every position (a spread a long run
    /// at a high learning rate can reach): every form stays finite and equal to f64, and so
    /// do the gradients.
    #[test]
    fn aft_dominated_channel_stays_exact() -> AnyResult<()> {
        for (name, variant) in VARIANTS {
            let mut outs = Vec::new();
            for dtype in [DType::F32, DType::F64] {
                let mut m = mixer(name, variant, &[], dtype);
                m.key = Linear { weight: key_eye(&m, dtype)?, bias: None };
                let levels: Vec<f64> = (0..16).map(|c| if c == 0 { -100.0 } else { 50.0 }).collect();
                let levels = Tensor::from_vec(levels, 16, &Device::Cpu)?.to_dtype(dtype)?;
                let x = candle_core::Var::from_tensor(&randn(&[2, 24, 16], 10, dtype)?.broadcast_add(&levels)?)?;
                let y = m.forward(&x)?;
                let dx = y.sqr()?.sum_all()?.backward()?.get(&x).expect("x gets a gradient").clone();
                // with the fallback taking some elements, still causal to the bit
                testing::assert_causal(&|x| Ok(m.forward(x)?), &x)?;
                testing::assert_causal(&|x| Ok(m.reference(x)?), &x)?;
                outs.push([y, m.reference(&x)?, testing::mixer_recurrent(&m, &x, 6)?, dx]);
            }
            for (i, (got, exact)) in outs[0].iter().zip(&outs[1]).enumerate() {
                assert!(got.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()), "{name} output {i}");
                let err = rel_err(&got.to_dtype(DType::F64)?, exact)?;
                assert!(err < 1e-4, "{name} output {i}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn aft_conv_bias_is_toeplitz_per_head_and_local_bias_is_banded() -> AnyResult<()> {
        let m = mixer("aft-conv", Variant::Conv, &[], DType::F32);
        let like = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        let w: Vec<Vec<Vec<f32>>> = m.bias_matrix(9, &like)?.to_vec3()?;
        let PosBias::Kernel(kernel) = &m.bias else { unreachable!() };
        let kernel: Vec<Vec<f32>> = kernel.effective(DType::F32)?.to_vec2()?;
        for h in 0..2 {
            for t in 0..9 {
                for u in 0..=t {
                    let expect = if t - u < 5 { kernel[h][t - u] } else { 0.0 };
                    assert_eq!(w[h][t][u], expect);
                }
            }
        }
        let m = mixer("aft-local", Variant::Local, &[], DType::F32);
        let w: Vec<Vec<f32>> = m.bias_matrix(9, &like)?.squeeze(0)?.to_vec2()?;
        assert!(w[8][3] == 0.0 && w[8][4] != 0.0 && w[8][8] != 0.0);
        Ok(())
    }

    #[test]
    fn aft_runs_under_mixed_precision() -> AnyResult<()> {
        for (name, _) in VARIANTS {
            let cfg = tiny(name, &[]);
            let (e, _) = crate::testing::mixed_precision_errs(&cfg)?;
            assert!(e < 0.05, "{name}: {e}");
        }
        Ok(())
    }

    /// aft-conv (paper, section 3.4): the key projection has one output per head, shared by
    /// the head's d/h channels.
    #[test]
    fn aft_conv_keys_are_one_channel_per_head() -> AnyResult<()> {
        let m = mixer("aft-conv", Variant::Conv, &[], DType::F32);
        assert_eq!(m.key.weight.dims(), &[2, 16]);
        let (_, k, _) = m.project(&randn(&[2, 5, 16], 1, DType::F32)?)?;
        let k: Vec<Vec<Vec<f32>>> = k.to_vec3()?;
        for row in k.iter().flatten() {
            for (c, value) in row.iter().enumerate() {
                assert_eq!(*value, row[c / 8 * 8], "channel {c}");
            }
        }
        Ok(())
    }

    /// aft-conv's kernel `gamma (w - mean(w)) / std(w) + beta` per head, `gamma, beta`
    /// parameters starting at 0: the bias is zero at initialisation although `w` is random.
    #[test]
    fn aft_conv_kernel_is_reparameterised() -> AnyResult<()> {
        let cfg = tiny("aft-conv", &[]);
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let params = model.params.tensors();
        for name in ["conv_gamma", "conv_beta"] {
            let found: Vec<_> = params.iter().filter(|(n, _)| n.ends_with(name)).collect();
            assert_eq!(found.len(), cfg.depth, "{name}");
            assert!(found.iter().all(|(_, t)| t.dims() == [2, 1]), "{name}");
        }
        let m = Aft::new(&cfg, Variant::Conv, &ParamBuilder::new(3, &Device::Cpu, DType::F32))?;
        let like = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        assert_eq!(m.bias_matrix(9, &like)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let PosBias::Kernel(k) = &m.bias else { unreachable!() };
        assert!(k.affine.is_some() && k.raw.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // with gamma = (2, 3) and beta = (0.5, -1), each head's taps have that std and mean
        let column = |a: f32, b: f32| Tensor::new(&[[a], [b]], &Device::Cpu);
        let k = ConvKernel { raw: k.raw.clone(), affine: Some((column(2.0, 3.0)?, column(0.5, -1.0)?)) };
        let w: Vec<Vec<f32>> = k.effective(DType::F32)?.to_vec2()?;
        for (h, (g, b)) in [(2.0f32, 0.5f32), (3.0, -1.0)].into_iter().enumerate() {
            let n = w[h].len() as f32;
            let mean = w[h].iter().sum::<f32>() / n;
            let std = (w[h].iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
            assert!((mean - b).abs() < 1e-5 && (std - g).abs() < 1e-3, "head {h}: mean {mean}, std {std}");
        }
        Ok(())
    }

    /// Learned absolute positions, as the paper's language models: fed one token repeated,
    /// every variant's logits change along the sequence (without positions AFT-simple's
    /// would not: each position averages the same values); longer than the table is an error.
    #[test]
    fn aft_models_have_learned_positions() -> AnyResult<()> {
        for (name, _) in VARIANTS {
            let cfg = tiny(name, &[]);
            assert_eq!(cfg.position, Position::Learned, "{name}");
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            assert!(model.params.tensors().contains_key("pos_emb.weight"), "{name}");
            let same = Tensor::full(7u32, (1, 6), &Device::Cpu)?;
            let logits = model.forward(&same, None)?.squeeze(0)?; // [T, V]
            let spread = logits.broadcast_sub(&logits.narrow(0, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(spread > 1e-4, "{name}: {spread}");
            let long = random_tokens(1, cfg.context + 1, cfg.vocab, 1)?;
            let err = model.prefill(&long).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("beyond the learned position"), "{name}: {err:?}");
        }
        Ok(())
    }

    /// aft-full's default bias is the paper's factorised `U V^T` with inner width 128;
    /// aft-local offers it (`model.options.rank`).
    #[test]
    fn aft_full_bias_is_factorised_by_default() -> AnyResult<()> {
        let names = |cfg: &ModelConfig| -> AnyResult<Vec<(String, Vec<usize>)>> {
            let model = Model::new(cfg, 1, &Device::Cpu, DType::F32)?;
            Ok(model.params.tensors().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect())
        };
        let full = names(&tiny("aft-full", &[]))?;
        assert!(full.iter().any(|(n, d)| n.ends_with("pos_u") && d == &[24, 128]), "{full:?}");
        assert!(!full.iter().any(|(n, _)| n.ends_with("pos_bias")));
        let local = names(&tiny("aft-local", &["model.options.rank=3"]))?;
        assert!(local.iter().any(|(n, d)| n.ends_with("pos_v") && d == &[24, 3]), "{local:?}");
        Ok(())
    }

    /// The blocked form equals the pairwise one, forward and gradients, for a matrix and a
    /// factorised bias, at block sizes that divide T, do not, and exceed it.
    #[test]
    fn aft_full_blocked_equals_pairwise() -> AnyResult<()> {
        let (k, v) = (randn(&[2, 11, 6], 1, DType::F64)?.affine(3.0, 0.0)?, randn(&[2, 11, 6], 2, DType::F64)?);
        let (u, vf) = (randn(&[11, 3], 3, DType::F64)?, randn(&[11, 3], 4, DType::F64)?);
        let weights = randn(&[2, 11, 6], 5, DType::F64)?;
        for factored in [false, true] {
            let bias = if factored { Tensor::cat(&[&u, &vf], 0)? } else { randn(&[11, 11], 6, DType::F64)? };
            let grads = |blocked_form: Option<usize>| -> AnyResult<Vec<Tensor>> {
                let vars: Vec<candle_core::Var> =
                    [&k, &v, &bias].iter().map(|t| candle_core::Var::from_tensor(t)).collect::<Result<_>>()?;
                let (kt, vt, bt) = (vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
                let y = match blocked_form {
                    Some(block) => blocked(kt, vt, bt, factored, block)?,
                    None => {
                        let w = if factored {
                            bt.narrow(0, 0, 11)?.matmul(&bt.narrow(0, 11, 11)?.t()?)?
                        } else {
                            bt.clone()
                        };
                        pairwise(kt, vt, &w.unsqueeze(0)?, 0)?
                    }
                };
                let g = (&y * &weights)?.sum_all()?.backward()?;
                let mut out = vec![y];
                out.extend(vars.iter().map(|x| g.get(x).expect("a gradient").clone()));
                Ok(out)
            };
            let want = grads(None)?;
            for block in [1, 4, 11, 16] {
                for (i, (got, want)) in grads(Some(block))?.iter().zip(&want).enumerate() {
                    let err = rel_err(got, want)?;
                    assert!(err < 1e-10, "factored {factored}, block {block}, output {i}: {err}");
                }
            }
        }
        Ok(())
    }
}
