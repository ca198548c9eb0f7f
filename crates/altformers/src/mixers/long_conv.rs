//! What Hyena ([`super::hyena`]) and Monarch Mixer ([`super::m2`]) share: the implicit long
//! filter, the short depthwise causal convolution, the choice of how the long convolution is
//! evaluated, and its decoding step by direct convolution over the cached inputs.
//!
//! The implicit filter (the official `HyenaFilter` of both code bases):
//! `h(t) = FFN(PE(t)) (.) window(t)`, one channel per filter channel, with
//! `PE(t) = [t / (L-1), cos(f_k w_t), -sin(f_k w_t)]`, `w_t = 2 pi t / L`,
//! `f_k = linspace(1e-4, bands - 1, bands)`, `bands = (E - 1) / 2`; the FFN is
//! `Linear(E, F), sin, (Linear(F, F), sin) x inner, Linear(F, C, no bias)` where every `sin`
//! is `sin(freq (.) x)` with one trainable `freq: [F]` shared by all of them;
//! `window(t) = exp(-t/(L-1) |delta_c|) + shift`, `delta_c = linspace(ln(target) / slow,
//! ln(target) / fast, C)`, so each channel decays at its own rate. M2-BERT's bidirectional
//! filter adds a second FFN (`implicit_filter_rev`) with the same features, window and sine
//! frequencies. Filters are generated for the training context `L`; `T <= L` tokens use
//! their first `T` taps. The positional features `PE` are a trainable `[L, E]` parameter
//! (`pos_emb.z`, no weight decay, its own learning-rate multiple) where the caller asks for
//! one, as the official `PositionalEmbedding` registers them, and fixed where the multiple
//! is 0 (the official `lr_pos_emb = 0` makes them a buffer).

use anyhow::{bail, Result as AnyResult};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::Linear;
use crate::ops::{fftconv, monarch};
use crate::params::ParamBuilder;

/// How a mixer's parallel form evaluates its long convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongConv {
    /// Real FFTs of length `>= 2T` (realfft on the CPU, cuFFT on CUDA): O(T log T).
    Fft,
    /// A Toeplitz product: O(T^2), bit-exactly causal, any device.
    Direct,
    /// DFTs as Monarch products of length `m^2 >= 2T` (M2): O(T^{3/2}) in matrix products.
    Monarch,
}

impl LongConv {
    /// The causal convolution of `x: [B, C, T]` with `h: [C, L]` -> `[B, C, T]`.
    pub fn causal(self, x: &Tensor, h: &Tensor) -> Result<Tensor> {
        match self {
            LongConv::Fft => fftconv::causal_conv(x, h),
            LongConv::Direct => fftconv::causal_conv_direct(x, h),
            LongConv::Monarch => monarch::dft::causal_conv(x, h),
        }
    }

    /// The causal convolution with `h` plus the anti-causal one with `h_rev`
    /// (`y[t] += sum_j h_rev[j] x[t + 1 + j]`), `x: [B, C, T]`, `h, h_rev: [C, L]`.
    pub fn two_sided(self, x: &Tensor, h: &Tensor, h_rev: &Tensor) -> Result<Tensor> {
        match self {
            LongConv::Monarch => monarch::dft::two_sided_conv(x, h, h_rev),
            _ => self.causal(x, h)? + fftconv::anti_causal_conv(x, h_rev, |x, h| self.causal(x, h))?,
        }
    }
}

/// The implicit filter's hyperparameters (each mixer's options hold them under these names).
#[derive(Clone, Copy, Debug)]
pub struct FilterSpec {
    /// E: positional features fed to the FFN (odd, >= 3).
    pub emb_dim: usize,
    /// F: width of the FFN.
    pub width: usize,
    /// Hidden F x F layers.
    pub inner_layers: usize,
    /// Initial frequency of the sine activations.
    pub sine_freq: f64,
    pub fast_decay_pct: f64,
    pub slow_decay_pct: f64,
    pub decay_target: f64,
    pub decay_shift: f64,
}

impl FilterSpec {
    /// What the types cannot rule out, in `model.options.*` names.
    pub fn check(&self) -> AnyResult<()> {
        if self.emb_dim < 3 || self.emb_dim.is_multiple_of(2) {
            bail!("model.options.filter_emb_dim must be odd and at least 3 (time, cosine, sine), got {}", self.emb_dim);
        }
        if self.width == 0 {
            bail!("model.options.filter_width must be positive");
        }
        if !(self.fast_decay_pct > 0.0 && self.slow_decay_pct > 0.0) {
            bail!("model.options.fast_decay_pct and slow_decay_pct must be positive");
        }
        if !(self.decay_target > 0.0 && self.decay_target < 1.0) {
            bail!("model.options.decay_target must be in (0, 1), got {}", self.decay_target);
        }
        Ok(())
    }
}

/// The implicit filter generator: positional features -> sine FFN -> decay window.
pub struct ImplicitFilter {
    /// `E -> F`, `inner x (F -> F)`, `F -> C` (the last without bias).
    ffn: Vec<Linear>,
    /// The anti-causal filter's FFN (M2-BERT's `implicit_filter_rev`), where built.
    ffn_rev: Option<Vec<Linear>>,
    /// `[F]`, shared by every sine activation (of both FFNs).
    freq: Tensor,
    /// Positional features `[L, E]`: a parameter, or fixed.
    z: Tensor,
    /// Decay window `[L, C]` (fixed).
    window: Tensor,
}

impl ImplicitFilter {
    /// `channels` filters for a context of `context` tokens, parameters under `pb` (the
    /// official `filter_fn`, with the learning-rate multiple the caller gives the filter):
    /// `implicit_filter.{0,2,..}` (and `implicit_filter_rev.{0,2,..}` with `reverse`),
    /// `implicit_filter.1.freq`. N(0, 0.02) weights and zero biases; `decay` says whether
    /// AdamW decays them. With `pos_emb_lr_scale > 0` the positional features are the
    /// parameter `pos_emb.z` (not decayed) training at that multiple of the run's rate;
    /// with 0 they are fixed.
    pub fn new(
        pb: &ParamBuilder,
        spec: &FilterSpec,
        channels: usize,
        context: usize,
        decay: bool,
        reverse: bool,
        pos_emb_lr_scale: f64,
    ) -> AnyResult<Self> {
        let (e, f) = (spec.emb_dim, spec.width);
        let linear = |name: &str, index: usize, d_in: usize, d_out: usize, bias: bool| -> AnyResult<Linear> {
            let lp = pb.pp(format!("{name}.{index}"));
            let weight = if decay {
                lp.normal("weight", &[d_out, d_in], 0.02)?
            } else {
                lp.normal_no_decay("weight", &[d_out, d_in], 0.02)?
            };
            Ok(Linear { weight, bias: if bias { Some(lp.zeros("bias", &[d_out])?) } else { None } })
        };
        let stack = |name: &str| -> AnyResult<Vec<Linear>> {
            let mut layers = vec![linear(name, 0, e, f, true)?];
            for i in 0..spec.inner_layers {
                layers.push(linear(name, 2 * (i + 1), f, f, true)?);
            }
            layers.push(linear(name, 2 * (spec.inner_layers + 1), f, channels, false)?);
            Ok(layers)
        };
        // the hidden layers together, before the first is built (10^12 of them would build
        // until memory ran out)
        let hidden = || "the implicit filter's hidden layers (model.options.filter_inner_layers)".to_string();
        crate::model::size::check_tensor(hidden, &[spec.inner_layers, f, f + 1], 4 + pb.dtype.size_in_bytes())?;
        let ffn = stack("implicit_filter")?;
        let freq = pb.constant("implicit_filter.1.freq", &[f], spec.sine_freq as f32)?;
        let ffn_rev = if reverse { Some(stack("implicit_filter_rev")?) } else { None };
        let constant = |v: Vec<f64>, dims: (usize, usize)| -> Result<Tensor> {
            Tensor::from_vec(v, dims, &pb.device)?.to_dtype(pb.dtype)
        };
        let features = positional_features(context, e);
        let z = if pos_emb_lr_scale > 0.0 {
            let values = features.into_iter().map(|v| v as f32).collect();
            pb.pp("pos_emb").with_lr_scale(pos_emb_lr_scale)?.from_values("z", &[context, e], values, false)?
        } else {
            constant(features, (context, e))?
        };
        Ok(Self {
            ffn,
            ffn_rev,
            freq,
            z,
            window: constant(decay_window(context, channels, spec), (context, channels))?,
        })
    }

    /// Filters for positions `0..len`: `[len, C]`.
    pub fn generate(&self, len: usize) -> Result<Tensor> {
        self.run(&self.ffn, len)
    }

    /// The anti-causal filters `[len, C]`, where the filter has them.
    pub fn generate_rev(&self, len: usize) -> Result<Option<Tensor>> {
        self.ffn_rev.as_ref().map(|ffn| self.run(ffn, len)).transpose()
    }

    fn run(&self, ffn: &[Linear], len: usize) -> Result<Tensor> {
        let mut h = self.z.narrow(0, 0, len)?;
        let last = ffn.len() - 1;
        for (i, layer) in ffn.iter().enumerate() {
            h = layer.forward(&h)?;
            if i < last {
                h = h.broadcast_mul(&self.freq)?.sin()?;
            }
        }
        h * self.window.narrow(0, 0, len)?
    }
}

/// Positional features `[L, E]` of the official `PositionalEmbedding`.
pub fn positional_features(l: usize, e: usize) -> Vec<f64> {
    let bands = (e - 1) / 2;
    let f: Vec<f64> = (0..bands)
        .map(|k| if bands == 1 { 1e-4 } else { 1e-4 + k as f64 * ((bands - 1) as f64 - 1e-4) / (bands - 1) as f64 })
        .collect();
    let mut z = Vec::with_capacity(l * e);
    for t in 0..l {
        let tn = if l > 1 { t as f64 / (l - 1) as f64 } else { 0.0 };
        let w = 2.0 * std::f64::consts::PI * t as f64 / l as f64;
        z.push(tn);
        z.extend(f.iter().map(|fk| (fk * w).cos()));
        z.extend(f.iter().map(|fk| -(fk * w).sin()));
    }
    z
}

/// Decay window `[L, C]` of the official `ExponentialModulation`.
pub fn decay_window(l: usize, c: usize, o: &FilterSpec) -> Vec<f64> {
    let max_decay = o.decay_target.ln() / o.fast_decay_pct;
    let min_decay = o.decay_target.ln() / o.slow_decay_pct;
    let delta = |i: usize| {
        if c > 1 {
            min_decay + i as f64 * (max_decay - min_decay) / (c - 1) as f64
        } else {
            min_decay
        }
    };
    let mut w = Vec::with_capacity(l * c);
    for t in 0..l {
        let tn = if l > 1 { t as f64 / (l - 1) as f64 } else { 0.0 };
        w.extend((0..c).map(|i| (-tn * delta(i).abs()).exp() + o.decay_shift));
    }
    w
}

/// The short depthwise causal convolution (PyTorch `Conv1d(C, C, K, groups=C, padding=K-1)`,
/// truncated to T), parameters `short_filter.{weight,bias}` with `Conv1d`'s default
/// U(+-1/sqrt(K)).
pub struct ShortConv {
    /// `[C, 1, K]` and `[C]`.
    weight: Tensor,
    bias: Tensor,
    pub kernel: usize,
}

impl ShortConv {
    pub fn new(pb: &ParamBuilder, channels: usize, kernel: usize) -> AnyResult<Self> {
        let bound = 1.0 / (kernel as f64).sqrt();
        let weight = pb.uniform("short_filter.weight", &[channels, 1, kernel], -bound, bound)?;
        let bias = pb.uniform_no_decay("short_filter.bias", &[channels], -bound, bound)?;
        Ok(Self { weight, bias, kernel })
    }

    /// `padded: [B, T + K - 1, C]` (K - 1 earlier inputs, zeros before the start, then the T
    /// current ones) -> `[B, T, C]`.
    pub fn forward(&self, padded: &Tensor) -> Result<Tensor> {
        let t = padded.dim(1)? + 1 - self.kernel;
        let c = self.weight.dim(0)?;
        let dtype = padded.dtype();
        let w = self.weight.to_dtype(dtype)?.reshape((c, self.kernel))?.t()?; // [K, C]
        let mut y = self.bias.to_dtype(dtype)?.reshape((1, 1, c))?;
        for j in 0..self.kernel {
            y = padded.narrow(1, j, t)?.broadcast_mul(&w.narrow(0, j, 1)?.reshape((1, 1, c))?)?.broadcast_add(&y)?;
        }
        Ok(y)
    }
}

/// Filters `[L, C]` reversed in time: row `L - 1 - s` holds tap s, so the taps for position
/// p are the contiguous rows `L-1-p..L` ([`taps_at`]).
pub fn reversed(filters: &Tensor) -> Result<Tensor> {
    let l = filters.dim(0)?;
    let rev: Vec<u32> = (0..l as u32).rev().collect();
    filters.index_select(&Tensor::from_vec(rev, l, filters.device())?, 0)?.contiguous()
}

/// The taps that weigh inputs `0..=pos` for the output at `pos`, in input order:
/// `[pos + 1, C]` from the reversed filters.
pub fn taps_at(reversed: &Tensor, pos: usize) -> Result<Tensor> {
    let l = reversed.dim(0)?;
    reversed.narrow(0, l - 1 - pos, pos + 1)
}

/// One decoding step of a causal long convolution by direct convolution over the cache:
/// appends `x: [B, 1, C]` to `history: [B, t, C]` (none before the first) and returns the
/// output at the new position `[B, 1, C]` (`taps: [t + 1, C]`, [`taps_at`]) and the history.
pub fn direct_step(taps: &Tensor, history: Option<&Tensor>, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let history = match history {
        Some(h) => Tensor::cat(&[h, x], 1)?,
        None => x.contiguous()?,
    };
    let y = history.broadcast_mul(&taps.unsqueeze(0)?)?.sum_keepdim(1)?;
    Ok((y, history))
}
