//! Hyena (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models",
//! arXiv 2302.10866): a gated recurrence of implicitly parametrized long convolutions.
//!
//! For `x: [B, T, D]` (`d = D`, order `N`), the official `HyenaOperator` (safari
//! `src/models/sequence/hyena.py`, `model.options.form = "official"`, the default):
//!
//! ```text
//! (x_0, ..., x_{N-1}, v) = short_conv(in_proj(x))    in_proj: d -> (N+1) d, each chunk [B, T, d]
//! z_0 = v
//! z_{n+1} = h_n * (x_{N-1-n} (.) z_n) + b_n (.) (x_{N-1-n} (.) z_n)    n = 0..N-2, * = causal conv
//! y = out_proj(x_0 (.) z_{N-1})
//! ```
//!
//! so the gate comes before each convolution and order N has **N - 1** long filters: order 2
//! is `y = x_0 (.) (h * (x_1 (.) v) + ..)`, one FFT convolution (N >= 2).
//!
//! `form = "paper"` reads the paper's Definition 3.1 literally (this code's operator before
//! issue 19): N filters, each convolution followed by its gate,
//! `z_{n+1} = x_n (.) (h_n * z_n + b_n (.) z_n)` for `n = 0..N-1`, `z_0 = v`,
//! `y = out_proj(z_N)` (order 2: two convolutions; order 1 allowed).
//!
//! - `short_conv` is a depthwise causal convolution of width K = 3 over all (N+1) d
//!   channels, with a bias (PyTorch `Conv1d`, padding K - 1, truncated to T).
//! - `h_n(t) = FFN(PE(t)) (.) window(t)`, the implicit long filter, one channel per width
//!   channel and filter: `PE(t) = [t / (L-1), cos(f_k w_t), -sin(f_k w_t)]` with
//!   `w_t = 2 pi t / L`, `f_k = linspace(1e-4, bands - 1, bands)`, `bands = (E - 1) / 2`;
//!   the FFN is `Linear(E, F), sin, (Linear(F, F), sin) x inner, Linear(F, M d, no bias)`
//!   (M filters: N - 1, or N in the paper form) where every `sin` is `sin(freq (.) x)` with
//!   one trainable `freq: [F]` shared by all of them (initialised to 14);
//!   `window(t) = exp(-t/(L-1) |delta_c|) + shift` with
//!   `delta_c = linspace(ln(target) / slow, ln(target) / fast, M d)` over all filter
//!   channels (fast 0.3, slow 1.5, target 1e-2, shift 0), so each channel decays at its own
//!   rate; `b_n` is the per-channel bias term (the "D" skip, N(0, 1) initialised).
//!   Filter channels are laid out `(v o)` (channel `v M + o` is width channel v of filter
//!   o), as in the official HyenaOperator, so every filter gets the whole range of decays.
//! - `PE` is a trainable `[L, E]` parameter (`filter_fn.pos_emb.z`), as the official
//!   `PositionalEmbedding` registers it. Optimizer groups as the official ones (`_optim`
//!   hooks): the filter FFN and `freq` with the filter's rate (`filter_lr_scale`) and no
//!   weight decay, `z` with its own (`pos_emb_lr_scale`) and no weight decay. The official
//!   language-model config sets both rates to the optimizer's (`lr: ${optimizer.lr}`,
//!   `lr_pos_emb: ${optimizer.lr}`), hence multiples 1; `pos_emb_lr_scale = 0` fixes `PE`
//!   (the official `lr_pos_emb = 0` makes it a buffer).
//! - Filters are generated for the training context `L = model.context` (the positional
//!   features depend on L); a sequence of T <= L tokens uses their first T taps.
//! - The filter, the short convolution and the decoding step are shared with M2
//!   ([`super::long_conv`]).
//!
//! Defaults are the paper's language-modelling ones (the official `configs/experiment/pile/
//! hyena.yaml` with `HyenaOperator`/`HyenaFilter`): order 2, filter FFN width 64 and depth 4
//! (2 inner layers), positional embedding dimension 33, sine frequency 14, short filter 3.
//! Initialisation follows the official LM: every linear layer (filter FFN included)
//! N(0, 0.02) with zero biases, `out_proj` N(0, 0.02 / sqrt(2 depth)); the short convolution
//! keeps PyTorch's `Conv1d` default U(+-1/sqrt(K)). Weight names follow the official
//! checkpoints (`in_proj`, `short_filter`, `filter_fn.implicit_filter.{0,2,4,6}`,
//! `filter_fn.implicit_filter.1.freq`, `filter_fn.pos_emb.z` (here `[L, E]`, officially
//! `[1, L, E]`), `filter_fn.bias`, `out_proj`).
//!
//! Modes. Parallel: the long convolutions by FFT ([`crate::ops::fftconv`]),
//! O(M d T log T) (`model.options.long_conv` = `direct` or `monarch` for the other forms).
//! Recurrent: Hyena has no constant-size recurrence; `step` computes the exact output of the
//! next position by *direct* convolution over the cached inputs of every filter, O(M d T)
//! per token. The state holds the short-convolution tail (`K - 1` projected inputs), the
//! history of every convolution's input (`[B, t, d]` each, growing with t), and the filters
//! generated once at prefill (`[L, M d]`, reversed in time).

use anyhow::{bail, Result as AnyResult};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

pub use super::long_conv::LongConv;
use super::long_conv::{self, FilterSpec, ImplicitFilter, ShortConv};
use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Position};
use crate::nn::Linear;
use crate::ops::fftconv;
use crate::params::ParamBuilder;

/// Which reading of the operator a `hyena` layer computes (module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HyenaForm {
    /// The official `HyenaOperator`: N - 1 filters, gate then convolve, `x_0` gates last.
    Official,
    /// Definition 3.1 read literally: N filters, convolve then gate.
    Paper,
}

/// One stage of the operator: multiply by a projection, or convolve with a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Gate by projection chunk `x_i`.
    Gate(usize),
    /// Long convolution with filter `o` (plus its bias term).
    Conv(usize),
}

impl HyenaForm {
    /// Long filters at order `n`.
    fn filters(self, n: usize) -> usize {
        match self {
            HyenaForm::Official => n - 1,
            HyenaForm::Paper => n,
        }
    }

    /// The stages applied to `v`, in order.
    fn stages(self, n: usize) -> Vec<Stage> {
        match self {
            HyenaForm::Official => {
                (0..n - 1).flat_map(|o| [Stage::Gate(n - 1 - o), Stage::Conv(o)]).chain([Stage::Gate(0)]).collect()
            }
            HyenaForm::Paper => (0..n).flat_map(|o| [Stage::Conv(o), Stage::Gate(o)]).collect(),
        }
    }
}

/// `model.options` of the `hyena` mixer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HyenaOptions {
    /// N: the paper's order, the number of gating projections besides `v` (2 in its
    /// experiments): N - 1 long convolutions in the official form, N in the paper's.
    pub order: usize,
    /// `official` (default) or `paper` (module documentation).
    pub form: HyenaForm,
    /// E: dimension of the positional features fed to the filter FFN (odd, >= 3).
    pub filter_emb_dim: usize,
    /// F: width of the filter FFN (the official `filter_order`).
    pub filter_width: usize,
    /// Hidden F x F layers of the filter FFN (2: four linear layers in all).
    pub filter_inner_layers: usize,
    /// Initial frequency of the sine activations.
    pub filter_sine_freq: f64,
    /// K: width of the short depthwise causal convolution.
    pub short_kernel: usize,
    /// Window decay rates: from ln(target)/slow to ln(target)/fast across the channels.
    pub fast_decay_pct: f64,
    pub slow_decay_pct: f64,
    pub decay_target: f64,
    /// Constant added to the window (0: pure exponential decay).
    pub decay_shift: f64,
    /// How the parallel form evaluates the long convolutions: `fft` (O(T log T)), `direct`
    /// (O(T^2), a Toeplitz product; bit-exactly causal, runs on any device) or `monarch`
    /// (M2's Monarch DFTs, O(T^{3/2})).
    pub long_conv: LongConv,
    /// Learning-rate multiple of the filter FFN and its sine frequencies (official `lr`).
    pub filter_lr_scale: f64,
    /// Learning-rate multiple of the positional features `z` (official `lr_pos_emb`); 0
    /// keeps them fixed.
    pub pos_emb_lr_scale: f64,
}

impl Default for HyenaOptions {
    fn default() -> Self {
        Self {
            order: 2,
            form: HyenaForm::Official,
            filter_emb_dim: 33,
            filter_width: 64,
            filter_inner_layers: 2,
            filter_sine_freq: 14.0,
            short_kernel: 3,
            fast_decay_pct: 0.3,
            slow_decay_pct: 1.5,
            decay_target: 1e-2,
            decay_shift: 0.0,
            long_conv: LongConv::Fft,
            filter_lr_scale: 1.0,
            pos_emb_lr_scale: 1.0,
        }
    }
}

impl crate::config::Options for HyenaOptions {
    fn check(&self) -> AnyResult<()> {
        if self.order == 0 {
            bail!("model.options.order must be at least 1");
        }
        if self.order == 1 && self.form == HyenaForm::Official {
            bail!("model.options.order must be at least 2 in the official form (order N has N - 1 long filters); order 1 exists in form = \"paper\"");
        }
        for (name, v) in [("filter_lr_scale", self.filter_lr_scale), ("pos_emb_lr_scale", self.pos_emb_lr_scale)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("model.options.{name} must be a finite multiple >= 0, got {v}");
            }
        }
        if self.short_kernel < 2 {
            bail!("model.options.short_kernel must be at least 2, got {}", self.short_kernel);
        }
        self.filter_spec().check()
    }
}

impl HyenaOptions {
    fn filter_spec(&self) -> FilterSpec {
        FilterSpec {
            emb_dim: self.filter_emb_dim,
            width: self.filter_width,
            inner_layers: self.filter_inner_layers,
            sine_freq: self.filter_sine_freq,
            fast_decay_pct: self.fast_decay_pct,
            slow_decay_pct: self.slow_decay_pct,
            decay_target: self.decay_target,
            decay_shift: self.decay_shift,
        }
    }
}

pub struct Hyena {
    /// `d -> (N+1) d`: chunks `[x_1 | ... | x_N | v]`.
    in_proj: Linear,
    /// Over all `(N+1) d` channels.
    short: ShortConv,
    filter: ImplicitFilter,
    /// `[M d]` (M filters), layout `(v o)`.
    filter_bias: Tensor,
    out_proj: Linear,
    order: usize,
    /// M: long filters.
    filters: usize,
    stages: Vec<Stage>,
    width: usize,
    context: usize,
    long_conv: LongConv,
}

impl Hyena {
    pub fn new(cfg: &ModelConfig, pb: &ParamBuilder) -> AnyResult<Self> {
        let o: HyenaOptions = cfg.options()?;
        let (d, n, k, l) = (cfg.width, o.order, o.short_kernel, cfg.context);
        let in_proj = Linear::new(pb, "in_proj", d, (n + 1) * d, 0.02, cfg.bias)?;
        let short = ShortConv::new(pb, (n + 1) * d, k)?;
        let m = o.form.filters(n);
        let fp = pb.pp("filter_fn");
        // The filter FFN is not weight-decayed (the official HyenaFilter sets wd = 0) and
        // trains at the filter's rate; the bias term is an ordinary parameter there.
        let filter = ImplicitFilter::new(
            &fp.with_lr_scale(o.filter_lr_scale)?,
            &o.filter_spec(),
            m * d,
            l,
            false,
            false,
            o.pos_emb_lr_scale,
        )?;
        let filter_bias = fp.normal_no_decay("bias", &[m * d], 1.0)?;
        let out_proj = Linear::new(pb, "out_proj", d, d, 0.02 / (2.0 * cfg.depth as f64).sqrt(), cfg.bias)?;
        Ok(Self {
            in_proj,
            short,
            filter,
            filter_bias,
            out_proj,
            order: n,
            filters: m,
            stages: o.form.stages(n),
            width: d,
            context: l,
            long_conv: o.long_conv,
        })
    }

    /// Per-filter views of the filters `[T, M d]` -> filter `o`'s `[T, d]`.
    fn order_filter(&self, filters: &Tensor, o: usize) -> Result<Tensor> {
        let t = filters.dim(0)?;
        filters.reshape((t, self.width, self.filters))?.narrow(2, o, 1)?.squeeze(2)
    }

    /// Filter `o`'s bias term, `[d]`.
    fn order_bias(&self, o: usize) -> Result<Tensor> {
        self.filter_bias.reshape((self.width, self.filters))?.narrow(1, o, 1)?.squeeze(1)
    }

    /// `z (.) x_i` for chunk `i` of the short-convolved projections `uc: [B, T, (N+1) d]`.
    fn gate(&self, uc: &Tensor, i: usize, z: &Tensor) -> Result<Tensor> {
        uc.narrow(2, i * self.width, self.width)? * z
    }

    /// Parallel form; with `keep`, also the decode state after the last token.
    fn run(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<MixerState>)> {
        let (_, t, _) = x.dims3()?;
        if t > self.context {
            candle_core::bail!("hyena: {t} tokens but the filters are generated for model.context = {}", self.context);
        }
        let (d, n, k) = (self.width, self.order, self.short.kernel);
        let u = self.in_proj.forward(x)?;
        let padded = u.pad_with_zeros(1, k - 1, 0)?;
        let uc = self.short.forward(&padded)?;
        // The long convolutions run in the filters' (parameters') precision: f32 under bf16
        // activations.
        let filters = self.filter.generate(t)?;
        let mut z = uc.narrow(2, n * d, d)?;
        let mut history = Vec::new();
        for &stage in &self.stages {
            z = match stage {
                Stage::Gate(i) => self.gate(&uc, i, &z)?,
                Stage::Conv(o) => {
                    let h = self.order_filter(&filters, o)?.t()?.contiguous()?; // [d, T]
                    let zc = z.to_dtype(filters.dtype())?;
                    let zt = zc.transpose(1, 2)?.contiguous()?; // [B, d, T]
                    let conv = self.long_conv.causal(&zt, &h)?.transpose(1, 2)?;
                    if keep {
                        history.push(zc.contiguous()?);
                    }
                    (conv + zc.broadcast_mul(&self.order_bias(o)?)?)?.to_dtype(x.dtype())?
                }
            };
        }
        let out = self.out_proj.forward(&z)?;
        let state = if keep {
            let tail = padded.narrow(1, t, k - 1)?.contiguous()?;
            let mut tensors = vec![self.reversed_filters()?, tail];
            tensors.extend(history);
            Some(MixerState { tensors, pos: t })
        } else {
            None
        };
        Ok((out, state))
    }

    /// The filters for the whole context, reversed in time ([`long_conv::reversed`]).
    fn reversed_filters(&self) -> Result<Tensor> {
        long_conv::reversed(&self.filter.generate(self.context)?)
    }
}

impl SequenceMixer for Hyena {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, false)?.0)
    }

    /// State: `[filters reversed [L, M d], short-conv tail [B, K-1, (N+1) d], the M
    /// convolutions' input histories [B, t, d]]`.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        let (y, state) = self.run(x, true)?;
        Ok((y, state.expect("kept")))
    }

    /// Exact next output by direct convolution over the cached inputs: O(M d t).
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let (d, n, k, l) = (self.width, self.order, self.short.kernel, self.context);
        let p = state.pos;
        if p >= l {
            candle_core::bail!("hyena: position {p} is beyond the filters, generated for model.context = {l}");
        }
        if state.tensors.is_empty() {
            let tail = Tensor::zeros((b, k - 1, (n + 1) * d), x.dtype(), x.device())?;
            state.tensors = vec![self.reversed_filters()?, tail];
        }
        let u = self.in_proj.forward(x)?; // [B, 1, (N+1) d]
        let padded = Tensor::cat(&[&state.tensors[1], &u], 1)?; // [B, K, (N+1) d]
        let uc = self.short.forward(&padded)?;
        state.tensors[1] = padded.narrow(1, 1, k - 1)?.contiguous()?;
        let taps = long_conv::taps_at(&state.tensors[0], p)?; // [p+1, M d], tap p - tau at row tau
        let mut z = uc.narrow(2, n * d, d)?;
        for &stage in &self.stages {
            z = match stage {
                Stage::Gate(i) => self.gate(&uc, i, &z)?,
                Stage::Conv(o) => {
                    let zc = z.to_dtype(taps.dtype())?;
                    let (conv, history) =
                        long_conv::direct_step(&self.order_filter(&taps, o)?, state.tensors.get(2 + o), &zc)?;
                    if state.tensors.len() > 2 + o {
                        state.tensors[2 + o] = history;
                    } else {
                        state.tensors.push(history);
                    }
                    (conv + zc.broadcast_mul(&self.order_bias(o)?)?)?.to_dtype(x.dtype())?
                }
            };
        }
        state.pos += 1;
        self.out_proj.forward(&z)
    }
}

pub fn build(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Hyena::new(cfg, pb)?))
}

/// The official Hyena language model has no positional embeddings (the filters carry
/// position).
pub fn adjust_defaults(cfg: &mut ModelConfig) {
    cfg.position = Position::None;
}

/// Costs at the default options (the official form at N = 2: one long filter, so one long
/// convolution; E = 33, F = 64, two inner layers, K = 3); the filter length is the sequence
/// length. The filter FFN and the filter's FFT are computed once per call, shared by the
/// batch.
pub const COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("Hyena"),
        judgement: Judgement::Imprecise(
            "only the running value is convolved (the x_i are gates); the filter is window(t) * FFN(PE(t)); its \"4086 to 8196\" means 4096 to 8192",
        ),
    },
    true_time: "O(N d T (log T + d)) per sequence, plus O(T F (E + F + N d)) per call for the implicit filter (F = 64 the filter FFN's width), shared by the batch: at the benchmark's fixed tokens per batch (B = tokens / T) that term is O(T^2) per sequence, and the FLOP count's own slope over T 2K-8K is 1.30, not T log T's 1.1; decode O(N d T) per token (direct convolution over the cache)",
    true_space: "O(N d T); decode state O(N d T) (input history of every filter)",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let (n, m, e, f, inner, k) = (2.0, 1.0, 33.0, 64.0, 2.0, 3.0);
        let len = fftconv::fft_len(s.seq, s.seq) as f64;
        let fft = 2.5 * len * len.log2(); // one real FFT of length `len`
        let projections = 2.0 * t * d * (n + 1.0) * d + 2.0 * t * d * d;
        let short = 2.0 * k * (n + 1.0) * d * t;
        let filter_ffn = 2.0 * t * (e * f + inner * f * f + f * m * d);
        // per filter: forward FFT of the input, inverse FFT, the filter's FFT, the spectral
        // product (6 FLOPs per complex bin), bias (2 per element); the N gates (1 each)
        let long = m * ((2.0 * b + 1.0) * d * fft + 6.0 * b * d * (len / 2.0 + 1.0) + 2.0 * b * t * d);
        b * (projections + short + n * t * d) + filter_ffn + long
    },
    memory: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let (n, m, f, inner) = (2.0, 1.0, 64.0, 2.0);
        let len = fftconv::fft_len(s.seq, s.seq) as f64;
        // projections and short conv (2 (N+1) d per token), per filter: transposed input,
        // its spectrum (len/2+1 complex = len reals), convolution, gate; the filter FFN.
        b * (2.0 * (n + 1.0) * t * d + m * d * (3.0 * t + len))
            + t * (2.0 * (inner + 1.0) * f + 2.0 * m * d)
            + b * t * d
    },
    state: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let (n, m, k) = (2.0, 1.0, 3.0);
        b * (k - 1.0) * (n + 1.0) * d + m * b * t * d + m * d * t
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::*;
    use candle_core::{DType, Device};

    fn tiny(sets: &[&str]) -> AnyResult<ModelConfig> {
        // small filter FFN keeps the f64 gradient check fast
        let mut all = vec!["model.options.filter_width=8", "model.options.filter_emb_dim=5"];
        all.extend_from_slice(sets);
        tiny_config("hyena", &all)
    }

    #[test]
    fn recurrent_form_equals_parallel_form() -> AnyResult<()> {
        for sets in [
            &[][..],
            &["model.options.order=3", "model.options.short_kernel=4"],
            &["model.options.form=paper"],
            &["model.options.form=paper", "model.options.order=3", "model.options.short_kernel=4"],
            &["model.options.form=paper", "model.options.order=1", "model.bias=true"],
        ] {
            let cfg = tiny(sets)?;
            let hyena = Hyena::new(&cfg, &ParamBuilder::new(3, &Device::Cpu, DType::F32))?;
            let x = randn(&[2, 19, cfg.width], 5, DType::F32)?;
            assert_mixer_modes_agree(&hyena, &x, &[0, 1, 2, 8])?;
            // the full context, too
            let x = randn(&[1, cfg.context, cfg.width], 6, DType::F32)?;
            assert!(mixer_modes_err(&hyena, &x, 5)? < 1e-4);
            let m = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            let tokens = random_tokens(2, 17, 256, 7)?;
            assert_modes_agree(&m, &tokens, &[0, 1, 9])?;
        }
        Ok(())
    }

    /// The direct form is bit-exactly causal. The FFT form computes the same function, but
    /// every output's rounding depends on the whole padded transform, so later inputs move
    /// earlier outputs at the level of f32 rounding (and no more).
    #[test]
    fn is_causal() -> AnyResult<()> {
        let direct = tiny(&["model.options.long_conv=direct"])?;
        let fft = tiny(&[])?;
        let pb = |seed| ParamBuilder::new(seed, &Device::Cpu, DType::F32);
        let (hd, hf) = (Hyena::new(&direct, &pb(4))?, Hyena::new(&fft, &pb(4))?);
        let x = randn(&[2, 20, direct.width], 8, DType::F32)?;
        assert_causal(&|x| Ok(hd.forward(x)?), &x)?;
        let y = hf.forward(&x)?;
        assert!(rel_err(&y, &hd.forward(&x)?)? < 1e-5);
        // M2's Monarch evaluation of the same convolutions
        let hm = Hyena::new(&tiny(&["model.options.long_conv=monarch"])?, &pb(4))?;
        assert!(rel_err(&hm.forward(&x)?, &y)? < 1e-5);
        for t in [0, 7, 18] {
            let later = (randn(&[2, 20 - t - 1, direct.width], 9, DType::F32)? * 3.0)?;
            let x2 = Tensor::cat(&[x.narrow(1, 0, t + 1)?, (x.narrow(1, t + 1, 20 - t - 1)? + later)?], 1)?;
            let y2 = hf.forward(&x2)?;
            let scale = y.abs()?.max_all()?.to_scalar::<f32>()?;
            let early = (y.narrow(1, 0, t + 1)? - y2.narrow(1, 0, t + 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let late = (y.narrow(1, t + 1, 20 - t - 1)? - y2.narrow(1, t + 1, 20 - t - 1)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(early <= 1e-5 * scale, "t {t}: earlier outputs moved by {early} (scale {scale})");
            assert!(late > 1e-2 * scale, "t {t}: later outputs did not move");
        }
        Ok(())
    }

    /// Finite differences with step 1e-4: Hyena's gradients at initialisation are mostly
    /// under 1e-6 (three gated factors of 0.02-scale projections), where the default step
    /// 1e-5 measures the loss's f64 rounding noise (~1e-15 / 1e-5) instead; 1e-4 keeps the
    /// truncation error of the sine filter FFN (frequency 14) well inside the tolerance.
    /// Then the FFT form's gradients must equal the direct form's, parameter by parameter.
    #[test]
    fn gradients_match_finite_differences() -> AnyResult<()> {
        for sets in [&[][..], &["model.options.order=3", "model.bias=true"], &["model.options.form=paper"]] {
            let err = model_gradient_err_with_step(&tiny_config("hyena", sets)?, 3, 1e-4)?;
            assert!(err < 1e-4, "{sets:?}: {err}");
            let mut direct = sets.to_vec();
            direct.push("model.options.long_conv=direct");
            let grads = |sets: &[&str]| -> AnyResult<Vec<(String, Tensor)>> {
                let m = Model::new(&tiny_config("hyena", sets)?, 3, &Device::Cpu, DType::F64)?;
                let loss =
                    Model::loss(&m.forward(&random_tokens(2, 20, 256, 1)?, None)?, &random_tokens(2, 20, 256, 2)?)?;
                let g = loss.backward()?;
                Ok(m.params
                    .vars()
                    .into_iter()
                    .map(|(name, p)| (name, g.get(p.var.as_tensor()).unwrap().clone()))
                    .collect())
            };
            for ((name, a), (_, b)) in grads(sets)?.iter().zip(grads(&direct)?.iter()) {
                let err = rel_err(a, b)?;
                assert!(err < 1e-9, "{sets:?} {name}: FFT and direct gradients differ by {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn decode_state_grows_with_length_and_stops_at_the_context() -> AnyResult<()> {
        let cfg = tiny(&[])?;
        let hyena = Hyena::new(&cfg, &ParamBuilder::new(5, &Device::Cpu, DType::F32))?;
        let x = randn(&[1, cfg.context, cfg.width], 9, DType::F32)?;
        let (_, s8) = hyena.prefill(&x.narrow(1, 0, 8)?)?;
        let (_, mut s16) = hyena.prefill(&x.narrow(1, 0, 16)?)?;
        assert!(s16.bytes() > s8.bytes());
        // histories: one filter at order 2 x 8 more positions x d channels x 4 bytes
        assert_eq!(s16.bytes() - s8.bytes(), 8 * cfg.width * 4);
        let (_, mut full) = hyena.prefill(&x)?;
        assert!(hyena.step(&x.narrow(1, 0, 1)?, &mut full).is_err(), "stepping past the context must fail");
        assert!(hyena.step(&x.narrow(1, 0, 1)?, &mut s16).is_ok());
        assert!(hyena.forward(&randn(&[1, cfg.context + 1, cfg.width], 1, DType::F32)?).is_err());
        Ok(())
    }

    #[test]
    fn filters_decay_and_default_options_are_the_papers() -> AnyResult<()> {
        let o = HyenaOptions::default();
        assert_eq!(
            (o.order, o.filter_emb_dim, o.filter_width, o.filter_inner_layers, o.short_kernel),
            (2, 33, 64, 2, 3)
        );
        let w = long_conv::decay_window(10, 4, &o.filter_spec());
        // first channel decays slowest (to 1e-2 at 1.5 x L), the last fastest (at 0.3 x L)
        assert!((w[0] - 1.0).abs() < 1e-12 && (w[9 * 4] - 0.01f64.powf(1.0 / 1.5)).abs() < 1e-12);
        assert!((w[9 * 4 + 3] - 0.01f64.powf(1.0 / 0.3)).abs() < 1e-12);
        let z = long_conv::positional_features(4, 5);
        assert_eq!(z.len(), 20);
        assert_eq!(&z[0..5], &[0.0, 1.0, 1.0, -0.0, -0.0]);
        Ok(())
    }

    #[test]
    fn long_sequence_forward_is_fast() -> AnyResult<()> {
        let cfg = tiny_config("hyena", &["model.width=64", "model.context=16384"])?;
        let hyena = Hyena::new(&cfg, &ParamBuilder::new(6, &Device::Cpu, DType::F32))?;
        let x = randn(&[1, 16384, 64], 10, DType::F32)?;
        let start = std::time::Instant::now();
        let y = hyena.forward(&x)?;
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(y.dims(), &[1, 16384, 64]);
        assert!(secs < 20.0, "one Hyena layer at T = 16384 took {secs:.1} s");
        Ok(())
    }

    /// The operator written out by hand from the layer's own pieces (projections, short
    /// convolution, filters, bias terms), direct convolutions, for order 2 and 3 of both
    /// forms: official order 2 is `x_0 (h_0 * (x_1 v))`, one filter; the paper's is
    /// `x_1 (h_1 * (x_0 (h_0 * v)))`, two.
    #[test]
    fn operator_gates_and_convolves_in_the_official_order() -> AnyResult<()> {
        for (sets, filters) in [
            (&["model.options.long_conv=direct"][..], 1),
            (&["model.options.long_conv=direct", "model.options.order=3"], 2),
            (&["model.options.long_conv=direct", "model.options.form=paper"], 2),
            (&["model.options.long_conv=direct", "model.options.form=paper", "model.options.order=3"], 3),
        ] {
            let cfg = tiny(sets)?;
            let pb = ParamBuilder::new(7, &Device::Cpu, DType::F64);
            let hy = Hyena::new(&cfg, &pb)?;
            let store = pb.into_store();
            let d = cfg.width;
            assert_eq!(store.params["filter_fn.bias"].var.dims(), &[filters * d], "{sets:?}");
            assert_eq!(store.params["filter_fn.implicit_filter.6.weight"].var.dims(), &[filters * d, 8]);
            let t = 13;
            let x = randn(&[2, t, d], 3, DType::F64)?;
            let uc = hy.short.forward(&hy.in_proj.forward(&x)?.pad_with_zeros(1, hy.short.kernel - 1, 0)?)?;
            let chunk = |i: usize| uc.narrow(2, i * d, d);
            let v = chunk(hy.order)?;
            let filt = hy.filter.generate(t)?;
            // h_o * z + b_o z, z: [B, T, d]
            let conv = |o: usize, z: &Tensor| -> AnyResult<Tensor> {
                let h = hy.order_filter(&filt, o)?.t()?.contiguous()?;
                let c = fftconv::causal_conv_direct(&z.transpose(1, 2)?.contiguous()?, &h)?.transpose(1, 2)?;
                Ok((c + z.broadcast_mul(&hy.order_bias(o)?)?)?)
            };
            let paper = sets.contains(&"model.options.form=paper");
            let want = match (paper, hy.order) {
                (false, 2) => (chunk(0)? * conv(0, &(chunk(1)? * &v)?)?)?,
                (false, 3) => (chunk(0)? * conv(1, &(chunk(1)? * conv(0, &(chunk(2)? * &v)?)?)?)?)?,
                (true, 2) => (chunk(1)? * conv(1, &(chunk(0)? * conv(0, &v)?)?)?)?,
                (true, 3) => (chunk(2)? * conv(2, &(chunk(1)? * conv(1, &(chunk(0)? * conv(0, &v)?)?)?)?)?)?,
                _ => unreachable!(),
            };
            let err = rel_err(&hy.forward(&x)?, &hy.out_proj.forward(&want)?)?;
            assert!(err < 1e-12, "{sets:?}: {err}");
        }
        // the official operator needs a filter: order 1 is the paper form's only
        let err = format!("{:#}", tiny(&["model.options.order=1"]).expect_err("order 1 is refused"));
        assert!(err.contains("form = \"paper\""), "{err}");
        Ok(())
    }

    /// The positional features are a parameter trained at their own multiple without decay,
    /// the filter FFN and its frequencies at the filter's, as the official optimizer groups
    /// (`_optim` hooks); they receive gradients; multiple 0 fixes them (no parameter).
    #[test]
    fn positional_features_train_in_the_filters_optimizer_group() -> AnyResult<()> {
        let cfg = tiny(&["model.options.filter_lr_scale=0.5", "model.options.pos_emb_lr_scale=0.25"])?;
        let m = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let params = m.params.vars();
        let find =
            |suffix: &str| params.iter().filter(|(n, _)| n.ends_with(suffix)).map(|(_, p)| p).collect::<Vec<_>>();
        let z = find("filter_fn.pos_emb.z");
        assert_eq!(z.len(), cfg.depth);
        for p in &z {
            assert_eq!((p.var.dims(), p.decay, p.lr_scale), (&[cfg.context, 5][..], false, 0.25));
        }
        for suffix in ["implicit_filter.0.weight", "implicit_filter.6.weight", "implicit_filter.1.freq"] {
            assert!(find(suffix).iter().all(|p| !p.decay && p.lr_scale == 0.5), "{suffix}");
        }
        assert!(find("in_proj.weight").iter().all(|p| p.decay && p.lr_scale == 1.0));
        let loss = Model::loss(&m.forward(&random_tokens(2, 20, 256, 1)?, None)?, &random_tokens(2, 20, 256, 2)?)?;
        let grads = loss.backward()?;
        let gz = grads.get(z[0].var.as_tensor()).expect("z has a gradient");
        assert!(gz.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        // fixed features: no parameter, as the official lr_pos_emb = 0 (a buffer)
        let fixed = Model::new(&tiny(&["model.options.pos_emb_lr_scale=0"])?, 1, &Device::Cpu, DType::F32)?;
        assert!(fixed.params.vars().iter().all(|(n, _)| !n.contains("pos_emb")));
        assert_eq!(m.params.num_elements() - fixed.params.num_elements(), cfg.depth * cfg.context * 5);
        assert!(tiny(&["model.options.pos_emb_lr_scale=-1"]).is_err());
        Ok(())
    }

    /// Where one layer's forward time goes at the quick preset's scaling shape (width 64,
    /// B = 8192 / T sequences, and B = 1): the filter generation (once per call, whatever
    /// B), the long convolution alone, the whole layer; the fastest of 15 runs (a shared
    /// machine only ever slows a run down). A measurement, not a check:
    /// `cargo test --release -p altformers hyena::tests::time_split -- --ignored --nocapture`
    /// (`bench/results/2026-12-02-cpu-hyena/`).
    #[test]
    #[ignore]
    fn time_split() -> AnyResult<()> {
        let fastest = |f: &dyn Fn() -> Result<Tensor>| -> AnyResult<f64> {
            f()?;
            let mut best = f64::INFINITY;
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                f()?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        println!("| T | B | filter generation | FFT convolution | one transpose [B, T, d] -> [B, d, T] | projection and short convolution | layer | layer per sequence |");
        println!("|---|---|---|---|---|---|---|---|");
        for t in [1024, 2048, 4096, 8192, 16384] {
            for b in [(8192 / t).max(1), 1] {
                let cfg = tiny_config("hyena", &["model.width=64", &format!("model.context={t}")])?;
                let hy = Hyena::new(&cfg, &ParamBuilder::new(0, &Device::Cpu, DType::F32))?;
                let x = randn(&[b, t, 64], 1, DType::F32)?;
                let h = hy.order_filter(&hy.filter.generate(t)?, 0)?.t()?.contiguous()?;
                let z = randn(&[b, 64, t], 2, DType::F32)?;
                let gen = fastest(&|| hy.filter.generate(t))?;
                let conv = fastest(&|| hy.long_conv.causal(&z, &h))?;
                let transpose = fastest(&|| x.transpose(1, 2)?.contiguous())?;
                let proj = fastest(&|| hy.short.forward(&hy.in_proj.forward(&x)?.pad_with_zeros(1, 2, 0)?))?;
                let all = fastest(&|| hy.forward(&x))?;
                let ms = |s: f64| format!("{:.1} ms", s * 1e3);
                println!(
                    "| {t} | {b} | {} | {} | {} | {} | {} | {} |",
                    ms(gen),
                    ms(conv),
                    ms(transpose),
                    ms(proj),
                    ms(all),
                    ms(all / b as f64)
                );
                if b == 1 {
                    break;
                }
            }
        }
        Ok(())
    }
}
