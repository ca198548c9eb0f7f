//! Monarch Mixer's sequence mixer (Fu et al. 2023, "Monarch Mixer: A Simple Sub-Quadratic
//! GEMM-Based Architecture", arXiv 2310.12109; the official `MonarchMixerSequenceMixing`):
//! short convolution, gate, long convolution with an implicit filter, gate.
//!
//! For `x: [B, T, D]` (`d = D`):
//!
//! ```text
//! (x_1, x_2, v) = short_conv(in_linear(x))          in_linear: d -> 3 d, each chunk [B, T, d]
//! u = v (.) x_1
//! y = x_2 (.) (h * u + b (.) u)                     * = long convolution in time
//! out = out_linear(y)
//! ```
//!
//! - `short_conv`: depthwise causal convolution of width 3 over all 3 d channels, with bias.
//! - `h`: the implicit filter of [`super::long_conv`] (shared with Hyena), one channel per
//!   width channel; `b`: the per-channel skip (`filter_fn.bias`, N(0, 1)).
//! - Causal (M2-GPT, the registered `m2`): `h * u` is the causal convolution, evaluated by
//!   default with DFTs as Monarch products of length `m^2 >= 2T`
//!   ([`crate::ops::monarch::dft`]): the polynomial-evaluation view, exactly causal as a
//!   function; `long_conv = direct` is bit-exactly causal, `fft` the FFT.
//! - Bidirectional (M2-BERT; `model.options.bidirectional`): a second filter FFN
//!   (`implicit_filter_rev`, the same features, window and sine frequencies) gives anti-causal
//!   taps, `y[t] += sum_j h_rev[j] u[t + 1 + j]`, the official kernel
//!   `pad(k_fwd, (0, L)) + pad(k_rev.flip(-1), (L, 0))`. It has no recurrent form; the
//!   registry's `m2-bert` builds it ([`build_bidirectional`]), `m2` refuses it ([`build`]).
//!   Padding (`forward_padded`, `keep: [B, T]`): the projected inputs and `u` are zeroed at
//!   padded positions, so neither the short nor the long convolution carries anything from
//!   them (`b (.) u` and the gates are position-wise).
//!
//! Defaults are the official M2-BERT-base recipe's (`monarch-mixer-pretrain-786dim-80m-
//! parameters.yaml`): filter FFN width 128 with 2 inner layers (`hyena_filter_order`),
//! positional features 5 (`hyena_emb_dim`), sine frequency 10 (`hyena_w`), the filter FFN
//! weight-decayed (`hyena_wd` 0.1: here the run's decay), the modulation's defaults; its
//! `residual_long_conv` (a second long convolution of the layer's input) is off, as the
//! mixer's own default. The causal model keeps no learned positions (the filters carry
//! position, as in the Hyena language model M2-GPT is built on) and takes the Monarch MLP as
//! its channel mixer. Initialisation: the projections N(0, 0.02) with zero biases
//! (`out_linear` scaled by 1/sqrt(2 depth) as in the GPT models here), the filter FFN
//! N(0, 0.02), the short convolution PyTorch's `Conv1d` default. Weight names are the
//! official ones (`in_linear`, `short_filter`, `filter_fn.implicit_filter.{0,2,4,6}`,
//! `filter_fn.implicit_filter_rev.*`, `filter_fn.implicit_filter.1.freq`, `filter_fn.bias`,
//! `out_linear`).
//!
//! Modes. Parallel: O(d T^{3/2}) for the Monarch long convolution, O(T d^2) projections.
//! Recurrent: like Hyena, no constant-size recurrence; `step` computes the next output by
//! direct convolution over the cached gated inputs `u`, O(d T) per token. State: the filters
//! reversed in time `[L, d]`, the short convolution's tail `[B, K-1, 3d]`, the history of `u`
//! `[B, t, d]`.

use anyhow::{bail, Result as AnyResult};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::long_conv::{self, FilterSpec, ImplicitFilter, LongConv, ShortConv};
use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Review};
use crate::config::{ModelConfig, Position};
use crate::nn::Linear;
use crate::ops::monarch::dft::conv_len;
use crate::params::ParamBuilder;
use crate::rng::Rng;

/// `model.options` of the `m2` mixer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct M2Options {
    /// E: positional features fed to the filter FFN (odd, >= 3).
    pub filter_emb_dim: usize,
    /// F: width of the filter FFN (the official `hyena_filter_order`).
    pub filter_width: usize,
    /// Hidden F x F layers of the filter FFN.
    pub filter_inner_layers: usize,
    /// Initial frequency of the sine activations (`hyena_w`).
    pub filter_sine_freq: f64,
    /// K: width of the short depthwise causal convolution.
    pub short_kernel: usize,
    /// Window decay rates: from ln(target)/slow to ln(target)/fast across the channels.
    pub fast_decay_pct: f64,
    pub slow_decay_pct: f64,
    pub decay_target: f64,
    pub decay_shift: f64,
    /// M2-BERT's two-sided long convolution (an encoder: no causal model, no decoding).
    pub bidirectional: bool,
    /// How the parallel form evaluates the long convolution: `monarch` (the paper's),
    /// `fft` or `direct` (bit-exactly causal).
    pub long_conv: LongConv,
}

impl Default for M2Options {
    fn default() -> Self {
        Self {
            filter_emb_dim: 5,
            filter_width: 128,
            filter_inner_layers: 2,
            filter_sine_freq: 10.0,
            short_kernel: 3,
            fast_decay_pct: 0.3,
            slow_decay_pct: 1.5,
            decay_target: 1e-2,
            decay_shift: 0.0,
            bidirectional: false,
            long_conv: LongConv::Monarch,
        }
    }
}

impl crate::config::Options for M2Options {
    fn check(&self) -> AnyResult<()> {
        if self.short_kernel < 2 {
            bail!("model.options.short_kernel must be at least 2, got {}", self.short_kernel);
        }
        self.filter_spec().check()
    }
}

impl M2Options {
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

pub struct M2 {
    /// `d -> 3 d`: chunks `[x_1 | x_2 | v]`.
    in_linear: Linear,
    short: ShortConv,
    filter: ImplicitFilter,
    /// `[d]`, the skip term.
    bias: Tensor,
    out_linear: Linear,
    width: usize,
    context: usize,
    long_conv: LongConv,
    bidirectional: bool,
}

impl M2 {
    /// The mixer `cfg`'s options describe, causal or bidirectional, parameters under `pb`.
    pub fn new(cfg: &ModelConfig, pb: &ParamBuilder) -> AnyResult<Self> {
        let o: M2Options = cfg.options()?;
        let (d, l) = (cfg.width, cfg.context);
        let in_linear = Linear::new(pb, "in_linear", d, 3 * d, 0.02, cfg.bias)?;
        let short = ShortConv::new(pb, 3 * d, o.short_kernel)?;
        let fp = pb.pp("filter_fn");
        // Positional features fixed (multiple 0): issue 19 made Hyena's trainable; M2's
        // recipe was not re-read for them.
        let filter = ImplicitFilter::new(&fp, &o.filter_spec(), d, l, true, o.bidirectional, 0.0)?;
        let bias = fp.normal_no_decay("bias", &[d], 1.0)?;
        let out_linear = Linear::new(pb, "out_linear", d, d, 0.02 / (2.0 * cfg.depth as f64).sqrt(), cfg.bias)?;
        Ok(Self {
            in_linear,
            short,
            filter,
            bias,
            out_linear,
            width: d,
            context: l,
            long_conv: o.long_conv,
            bidirectional: o.bidirectional,
        })
    }

    /// Parallel form, padded positions zeroed where `mask: [B, T]` is 0; with `keep`, also
    /// the decode state after the last token.
    fn run(&self, x: &Tensor, mask: Option<&Tensor>, keep: bool) -> Result<(Tensor, Option<MixerState>)> {
        let (_, t, _) = x.dims3()?;
        if t > self.context {
            candle_core::bail!("m2: {t} tokens but the filters are generated for model.context = {}", self.context);
        }
        let (d, k) = (self.width, self.short.kernel);
        let zero_padding = |y: Tensor| -> Result<Tensor> {
            match mask {
                Some(m) => y.broadcast_mul(&m.to_dtype(y.dtype())?.unsqueeze(2)?),
                None => Ok(y),
            }
        };
        let padded = zero_padding(self.in_linear.forward(x)?)?.pad_with_zeros(1, k - 1, 0)?;
        let uc = self.short.forward(&padded)?;
        // the long convolution runs in the filters' (parameters') precision: f32 under bf16
        let h = self.filter.generate(t)?;
        let u = zero_padding((uc.narrow(2, 2 * d, d)? * uc.narrow(2, 0, d)?)?.to_dtype(h.dtype())?)?;
        let ut = u.transpose(1, 2)?.contiguous()?; // [B, d, T]
        let ht = h.t()?.contiguous()?; // [d, T]
        let conv = match self.filter.generate_rev(t)? {
            Some(h_rev) => self.long_conv.two_sided(&ut, &ht, &h_rev.t()?.contiguous()?)?,
            None => self.long_conv.causal(&ut, &ht)?,
        };
        let y = (conv.transpose(1, 2)? + u.broadcast_mul(&self.bias)?)?.to_dtype(x.dtype())?;
        let out = self.out_linear.forward(&(y * uc.narrow(2, d, d)?)?)?;
        let state = match keep {
            true => Some(MixerState {
                tensors: vec![self.reversed_filters()?, padded.narrow(1, t, k - 1)?.contiguous()?, u.contiguous()?],
                pos: t,
            }),
            false => None,
        };
        Ok((out, state))
    }

    fn reversed_filters(&self) -> Result<Tensor> {
        long_conv::reversed(&self.filter.generate(self.context)?)
    }

    fn refuse_recurrence(&self) -> Result<()> {
        if self.bidirectional {
            candle_core::bail!("m2: the bidirectional mixer (M2-BERT) sees later tokens; it has no recurrent form");
        }
        Ok(())
    }
}

impl SequenceMixer for M2 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, None, false)?.0)
    }

    fn forward_padded(&self, x: &Tensor, keep: &Tensor, _dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        if !self.bidirectional {
            candle_core::bail!("m2: the causal mixer (M2-GPT) takes no padding mask");
        }
        Ok(self.run(x, Some(keep), false)?.0)
    }

    /// State: `[filters reversed [L, d], short-conv tail [B, K-1, 3d], u history [B, t, d]]`.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        self.refuse_recurrence()?;
        let (y, state) = self.run(x, None, true)?;
        Ok((y, state.expect("kept")))
    }

    /// The next output by direct convolution over the cached `u`: O(d t).
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        self.refuse_recurrence()?;
        let (b, _, _) = x.dims3()?;
        let (d, k, p) = (self.width, self.short.kernel, state.pos);
        if p >= self.context {
            candle_core::bail!(
                "m2: position {p} is beyond the filters, generated for model.context = {}",
                self.context
            );
        }
        if state.tensors.is_empty() {
            let tail = Tensor::zeros((b, k - 1, 3 * d), x.dtype(), x.device())?;
            state.tensors = vec![self.reversed_filters()?, tail];
        }
        let padded = Tensor::cat(&[&state.tensors[1], &self.in_linear.forward(x)?], 1)?; // [B, K, 3d]
        let uc = self.short.forward(&padded)?;
        state.tensors[1] = padded.narrow(1, 1, k - 1)?.contiguous()?;
        let taps = long_conv::taps_at(&state.tensors[0], p)?;
        let u = (uc.narrow(2, 2 * d, d)? * uc.narrow(2, 0, d)?)?.to_dtype(taps.dtype())?;
        let (conv, history) = long_conv::direct_step(&taps, state.tensors.get(2), &u)?;
        state.tensors.truncate(2);
        state.tensors.push(history);
        state.pos += 1;
        let y = (conv + u.broadcast_mul(&self.bias)?)?.to_dtype(x.dtype())?;
        self.out_linear.forward(&(y * uc.narrow(2, d, d)?)?)
    }
}

/// The mixer of `m2` (M2-GPT, causal: it decodes); the bidirectional form is refused here.
pub fn build(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    let o: M2Options = cfg.options()?;
    if o.bidirectional {
        bail!(
            "model.options.bidirectional = true is M2-BERT's encoder mixer: train `m2-bert`; `m2` is the causal M2-GPT"
        );
    }
    Ok(Box::new(M2::new(cfg, pb)?))
}

/// The mixer of `m2-bert` (M2-BERT, bidirectional: an encoder); the causal form is refused.
pub fn build_bidirectional(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    let o: M2Options = cfg.options()?;
    if !o.bidirectional {
        bail!("model.options.bidirectional = false is M2-GPT's causal mixer: train `m2`; `m2-bert` is the bidirectional M2-BERT");
    }
    Ok(Box::new(M2::new(cfg, pb)?))
}

/// M2-GPT: no learned positions (the filters carry position), the Monarch MLP.
pub fn adjust_defaults(cfg: &mut ModelConfig) {
    cfg.position = Position::None;
    cfg.channel_mixer = "monarch".into();
}

/// M2-BERT: as M2-GPT's, with the two-sided long convolution.
pub fn adjust_bert_defaults(cfg: &mut ModelConfig) {
    adjust_defaults(cfg);
    cfg.options.insert("bidirectional".into(), serde_json::Value::Bool(true));
}

/// Costs at the default options (E = 5, F = 128, two inner layers, K = 3, Monarch long
/// convolution of length n = conv_len(T, T) >= 2T, m = sqrt(n)).
pub const COMPLEXITY: Complexity = Complexity {
    review: Review::NO_LINE,
    true_time: "O(d T^{3/2} + T d^2): the long convolution by Monarch DFTs of length n >= 2T (sqrt(n) blocks), projections; decode O(d T) per token (direct convolution over the cache)",
    true_space: "O(T d); decode state O(T d) (gated input history)",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let (e, f, inner, k) = (5.0, 128.0, 2.0, 3.0);
        let n = conv_len(s.seq, s.seq) as f64;
        let m = n.sqrt();
        // one block-diagonal stage is 2 n m FLOPs per real product; a forward transform of a
        // real row takes 2 + 4 products and its twiddles 6 n; the inverse (real output) 4 + 2
        let transform = 12.0 * n * m + 6.0 * n;
        let projections = 2.0 * t * d * 3.0 * d + 2.0 * t * d * d;
        let short = 2.0 * k * 3.0 * d * t;
        let filter_ffn = 2.0 * t * (e * f + inner * f * f + f * d);
        // per row: the input's transform, the spectral product (6 n), the inverse; the
        // filters' transforms once per call; gates and skip (4 per element)
        let long = b * d * (2.0 * transform + 6.0 * n) + d * transform + 4.0 * b * t * d;
        b * (projections + short) + filter_ffn + long
    },
    memory: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let n = conv_len(s.seq, s.seq) as f64;
        // projections and short conv (2 x 3 d per token), gates; per channel the padded input
        // and about four complex stages of length n
        b * (6.0 * t * d + 3.0 * t * d) + b * d * 9.0 * n + d * 9.0 * n + t * 2.0 * 3.0 * 128.0
    },
    state: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        b * 2.0 * 3.0 * d + b * t * d + d * t
    },
};

/// M2-BERT's: the causal form's costs (the two-sided kernel is one transform of length
/// >= 2T too, the reverse filter one more filter FFN), no decoding.
pub const BERT_COMPLEXITY: Complexity = Complexity {
    true_time: "O(d T^{3/2} + T d^2): the two-sided long convolution by Monarch DFTs of length n >= 2T (sqrt(n) blocks), projections; no decoding (an encoder)",
    true_space: "O(T d)",
    state: |_: &CostShape| 0.0,
    ..COMPLEXITY
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::ops::fftconv::{anti_causal_conv, causal_conv_direct};
    use crate::testing::*;
    use candle_core::{DType, Device};

    fn tiny(sets: &[&str]) -> AnyResult<ModelConfig> {
        // a small filter FFN keeps the f64 checks fast
        let mut all = vec!["model.options.filter_width=8"];
        all.extend_from_slice(sets);
        tiny_config("m2", &all)
    }

    fn mixer(sets: &[&str], seed: u64, dtype: DType) -> AnyResult<M2> {
        M2::new(&tiny(sets)?, &ParamBuilder::new(seed, &Device::Cpu, dtype))
    }

    /// The mixer by its equations, with the long convolution as a Toeplitz product: the
    /// reference the Monarch form is held to.
    fn reference(m: &M2, x: &Tensor) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let d = m.width;
        let padded = m.in_linear.forward(x)?.pad_with_zeros(1, m.short.kernel - 1, 0)?;
        let uc = m.short.forward(&padded)?;
        let u = (uc.narrow(2, 2 * d, d)? * uc.narrow(2, 0, d)?)?;
        let ut = u.transpose(1, 2)?.contiguous()?;
        let h = m.filter.generate(t)?.t()?.contiguous()?;
        let mut conv = causal_conv_direct(&ut, &h)?;
        if let Some(r) = m.filter.generate_rev(t)? {
            conv = (conv + anti_causal_conv(&ut, &r.t()?.contiguous()?, causal_conv_direct)?)?;
        }
        let y = (conv.transpose(1, 2)? + u.broadcast_mul(&m.bias)?)?;
        m.out_linear.forward(&(y * uc.narrow(2, d, d)?)?)
    }

    /// The Monarch (and FFT) forms equal the mixer with direct convolutions, causal and
    /// bidirectional, at lengths whose transform length is and is not a power of two.
    #[test]
    fn mixer_equals_direct_convolution() -> AnyResult<()> {
        for bidirectional in [false, true] {
            for long_conv in ["monarch", "fft"] {
                let sets = [
                    format!("model.options.bidirectional={bidirectional}"),
                    format!("model.options.long_conv={long_conv}"),
                ];
                let m = mixer(&sets.iter().map(String::as_str).collect::<Vec<_>>(), 3, DType::F64)?;
                for t in [1, 8, 19, 24] {
                    let x = randn(&[2, t, m.width], t as u64, DType::F64)?;
                    let err = rel_err(&m.forward(&x)?, &reference(&m, &x)?)?;
                    assert!(err < 1e-12, "bidirectional {bidirectional} {long_conv} T {t}: {err}");
                }
            }
        }
        // f32 too (the training precision)
        let m = mixer(&[], 4, DType::F32)?;
        let x = randn(&[2, 24, m.width], 5, DType::F32)?;
        assert!(rel_err(&m.forward(&x)?, &reference(&m, &x)?)? < 1e-5);
        Ok(())
    }

    /// Causal: the direct form bit for bit; the Monarch form as a function (f64: later
    /// inputs move earlier outputs by rounding only). The bidirectional mixer does see later
    /// inputs: the check must fail for it.
    #[test]
    fn causal_mixer_is_causal_and_bidirectional_is_not() -> AnyResult<()> {
        let direct = mixer(&["model.options.long_conv=direct"], 4, DType::F64)?;
        let x = randn(&[2, 20, direct.width], 8, DType::F64)?;
        assert_causal(&|x| Ok(direct.forward(x)?), &x)?;
        let monarch = mixer(&[], 4, DType::F64)?;
        assert_causal_within(&|x| Ok(monarch.forward(x)?), &x, 1e-12)?;
        let both = mixer(&["model.options.bidirectional=true"], 4, DType::F64)?;
        let err = assert_causal_within(&|x| Ok(both.forward(x)?), &x, 1e-6).unwrap_err().to_string();
        assert!(err.contains("moved"), "{err}");
        Ok(())
    }

    #[test]
    fn recurrent_form_equals_parallel_form() -> AnyResult<()> {
        for sets in [&[][..], &["model.options.short_kernel=4", "model.bias=true"]] {
            let cfg = tiny(sets)?;
            let m = M2::new(&cfg, &ParamBuilder::new(3, &Device::Cpu, DType::F32))?;
            let x = randn(&[2, 19, cfg.width], 5, DType::F32)?;
            assert_mixer_modes_agree(&m, &x, &[0, 1, 2, 8])?;
            let x = randn(&[1, cfg.context, cfg.width], 6, DType::F32)?;
            assert!(mixer_modes_err(&m, &x, 5)? < 1e-4);
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            perturb(&model, 0.05, 2)?;
            assert_modes_agree(&model, &random_tokens(2, 17, 256, 7)?, &[0, 1, 9])?;
        }
        let both = mixer(&["model.options.bidirectional=true"], 4, DType::F32)?;
        let x = randn(&[1, 4, both.width], 1, DType::F32)?;
        assert!(both.prefill(&x).is_err() && both.step(&x.narrow(1, 0, 1)?, &mut Default::default()).is_err());
        Ok(())
    }

    /// Finite differences on the whole causal model (M2 with the Monarch MLP), and on the
    /// bidirectional mixer alone (every parameter and the input).
    #[test]
    fn gradients_match_finite_differences() -> AnyResult<()> {
        for sets in [&[][..], &["model.bias=true", "model.options.long_conv=fft"]] {
            let err = model_gradient_err_with_step(&tiny(sets)?, 3, 1e-4)?;
            assert!(err < 1e-4, "{sets:?}: {err}");
        }
        let cfg = tiny(&["model.options.bidirectional=true"])?;
        let pb = ParamBuilder::new(5, &Device::Cpu, DType::F64);
        let m = M2::new(&cfg, &pb)?;
        let store = pb.into_store();
        assert!(store.params.keys().any(|n| n.starts_with("filter_fn.implicit_filter_rev.")));
        let (x, g) = (randn(&[2, 12, cfg.width], 6, DType::F64)?, randn(&[2, 12, cfg.width], 7, DType::F64)?);
        let err = params_gradient_err(&store, &|| Ok((m.forward(&x)? * &g)?.sum_all()?), 8, 1e-4)?;
        assert!(err < 1e-4, "bidirectional: {err}");
        Ok(())
    }

    #[test]
    fn options_and_registry_checks() -> AnyResult<()> {
        let o = M2Options::default();
        assert_eq!((o.filter_emb_dim, o.filter_width, o.filter_inner_layers, o.short_kernel), (5, 128, 2, 3));
        assert_eq!((o.filter_sine_freq, o.long_conv, o.bidirectional), (10.0, LongConv::Monarch, false));
        let cfg = tiny_config("m2", &[])?;
        assert_eq!((cfg.channel_mixer.as_str(), cfg.position), ("monarch", Position::None));
        let both = tiny(&["model.options.bidirectional=true"])?;
        let err = build(&both, 0, &ParamBuilder::new(1, &Device::Cpu, DType::F32)).err().expect("refused").to_string();
        assert!(err.contains("M2-BERT") && err.contains("m2-bert"), "{err}");
        // `m2-bert` is the bidirectional mixer by default and refuses the causal one
        let bert = tiny_config("m2-bert", &["model.options.filter_width=8"])?;
        assert_eq!((bert.options["bidirectional"].as_bool(), bert.channel_mixer.as_str()), (Some(true), "monarch"));
        let causal = tiny_config("m2-bert", &["model.options.bidirectional=false"])?;
        let pb = ParamBuilder::new(1, &Device::Cpu, DType::F32);
        let err = build_bidirectional(&causal, 0, &pb).err().expect("refused").to_string();
        assert!(err.contains("`m2`"), "{err}");
        assert!(tiny(&["model.options.filter_emb_dim=4"]).is_err());
        assert!(tiny(&["model.options.short_kernel=1"]).is_err());
        let m = mixer(&[], 1, DType::F32)?;
        assert!(m.forward(&randn(&[1, 25, m.width], 1, DType::F32)?).is_err(), "past the context");
        Ok(())
    }
}
