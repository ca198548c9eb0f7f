//! Channel mixers: per-position feed-forward networks that follow each sequence mixer. The
//! registry lists them (`model.channel_mixer`); RWKV's channel mix lives with RWKV-4. One
//! Wide FFN's sharing ([`Shared`], [`one_wide`]) applies to any of them.

use std::sync::Arc;

use anyhow::Result as AnyResult;
use candle_core::{Result, Tensor};

use crate::complexity::{Complexity, Review};
use crate::config::ModelConfig;
use crate::mixers::{MixerState, PositionWise, SequenceMixer};
use crate::nn::Linear;
use crate::params::ParamBuilder;

/// GPT-2's MLP: `proj(gelu(fc(x)))`, hidden width `ffn_mult * d`, the GELU exact (erf;
/// `mlp`) or its tanh approximation (`mlp-tanh`: what GPT-2's checkpoints were trained with,
/// `gelu_new` in `transformers`).
pub struct Mlp {
    fc: Linear,
    proj: Linear,
    gelu: Gelu,
}

/// Which GELU an [`Mlp`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `x Phi(x)`, through erf.
    Erf,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` (GPT-2's `gelu_new`).
    Tanh,
}

impl PositionWise for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward(x)?;
        let h = match self.gelu {
            Gelu::Erf => crate::nn::gelu_erf(&h)?,
            Gelu::Tanh => h.gelu()?,
        };
        self.proj.forward(&h)
    }
}

/// SwiGLU (Shazeer 2020, arXiv 2002.05202): `down(silu(gate(x)) * up(x))`, hidden width
/// `2/3 * ffn_mult * d` rounded to a multiple of 8, so its parameters match the MLP's.
pub struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl PositionWise for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&(crate::nn::silu(&self.gate.forward(x)?)? * self.up.forward(x)?)?)
    }
}

/// M2's Monarch MLP (Fu et al. 2023, arXiv 2310.12109; the official `BertGatedLinearUnitMLP`
/// with `BlockdiagLinear`): a GLU whose two layers are block-diagonal, `nb` = 4 blocks each,
///
/// ```text
/// [g | u] = W1 x          W1 block-diagonal: d -> 2h, no bias
/// y = W2 (gelu(g) (.) u)  W2 block-diagonal: h -> d, bias where model.bias
/// ```
///
/// hidden `h = ffn_mult d` (a multiple of `nb`). As released it is one block-diagonal factor
/// per layer, not a full Monarch product `P L P^T R`; the gate still mixes the blocks, since
/// `g`'s blocks come from the first half of `x`'s groups and `u`'s from the second. Each layer
/// has `1/nb` of a dense one's parameters: `3 h d / nb` in all, against the MLP's `2 h d`.
/// Weights are `[nb, out/nb, in/nb]` (the official `weight`) with its initialisation,
/// U(+-1/sqrt(in/nb)) (PyTorch's dense default scaled by sqrt(nb)); the bias U(+-1/sqrt(d)).
pub struct MonarchMlp {
    gated_layers: Tensor,
    wo: Tensor,
    wo_bias: Option<Tensor>,
    hidden: usize,
}

/// Blocks of each of the Monarch MLP's layers (the official `monarch_mlp_nblocks`).
pub const MONARCH_MLP_BLOCKS: usize = 4;

impl PositionWise for MonarchMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use crate::ops::monarch::blockdiag;
        let h = self.hidden;
        let gu = blockdiag(x, &self.gated_layers.to_dtype(x.dtype())?)?;
        let act = (crate::nn::gelu_erf(&gu.narrow(candle_core::D::Minus1, 0, h)?)?
            * gu.narrow(candle_core::D::Minus1, h, h)?)?;
        let y = blockdiag(&act, &self.wo.to_dtype(x.dtype())?)?;
        match &self.wo_bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?),
            None => Ok(y),
        }
    }
}

/// The Monarch MLP of hidden width `ffn_mult * d` (rounded to a multiple of 4), parameters
/// under `pb`; `d` must be a multiple of 4.
pub fn monarch_mlp(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    let (d, nb) = (cfg.width, MONARCH_MLP_BLOCKS);
    if !d.is_multiple_of(nb) {
        anyhow::bail!("the monarch channel mixer needs model.width a multiple of {nb} (its blocks), got {d}");
    }
    let hidden = ((cfg.ffn_mult * d as f64 / nb as f64).round() as usize).max(1) * nb;
    let block = |pb: &ParamBuilder, out: usize, inp: usize| {
        let bound = 1.0 / ((inp / nb) as f64).sqrt();
        pb.uniform("weight", &[nb, out / nb, inp / nb], -bound, bound)
    };
    let gated_layers = block(&pb.pp("gated_layers"), 2 * hidden, d)?;
    let wo = block(&pb.pp("wo"), d, hidden)?;
    let bound = 1.0 / (d as f64).sqrt();
    let wo_bias = if cfg.bias { Some(pb.pp("wo").uniform_no_decay("bias", &[d], -bound, bound)?) } else { None };
    Ok(Box::new(MonarchMlp { gated_layers, wo, wo_bias, hidden }))
}

/// Standard deviation of a block's output projections: GPT-2's 0.02 / sqrt(2 depth).
fn out_std(cfg: &ModelConfig) -> f64 {
    0.02 / (2.0 * cfg.depth as f64).sqrt()
}

/// The MLP of width `ffn_mult * d` with the exact GELU, parameters under `pb` (`ffn.*` in a
/// block).
pub fn mlp(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    mlp_with(cfg, pb, Gelu::Erf)
}

/// [`mlp`] with GELU's tanh approximation (`mlp-tanh`: GPT-2's checkpoints).
pub fn mlp_tanh(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    mlp_with(cfg, pb, Gelu::Tanh)
}

fn mlp_with(cfg: &ModelConfig, pb: &ParamBuilder, gelu: Gelu) -> AnyResult<Box<dyn SequenceMixer>> {
    let d = cfg.width;
    let hidden = (cfg.ffn_mult * d as f64).round() as usize;
    Ok(Box::new(Mlp {
        fc: Linear::new(pb, "fc", d, hidden, 0.02, cfg.bias)?,
        proj: Linear::new(pb, "proj", hidden, d, out_std(cfg), cfg.bias)?,
        gelu,
    }))
}

/// SwiGLU of hidden width `2/3 * ffn_mult * d` (a multiple of 8), parameters under `pb`.
pub fn swiglu(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    let d = cfg.width;
    let hidden = ((2.0 / 3.0 * cfg.ffn_mult * d as f64 / 8.0).round() as usize).max(1) * 8;
    Ok(Box::new(SwiGlu {
        gate: Linear::new(pb, "gate", d, hidden, 0.02, cfg.bias)?,
        up: Linear::new(pb, "up", d, hidden, 0.02, cfg.bias)?,
        down: Linear::new(pb, "down", hidden, d, out_std(cfg), cfg.bias)?,
    }))
}

/// The configuration of One Wide FFN's shared channel mixer (Pires et al. 2023, arXiv
/// 2309.01826): `ffn_mult` times `depth`, so that one mixer holds the parameters of the
/// `depth` it replaces (exactly for the MLP and the Monarch MLP, whose parameters are linear
/// in the hidden width; within the rounding of the hidden width for SwiGLU; RWKV's channel
/// mix keeps one `d x d` receptance, not `depth` of them).
pub fn one_wide(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig { ffn_mult: cfg.ffn_mult * cfg.depth as f64, ..cfg.clone() }
}

/// The `one-wide-ffn` architecture's change to the defaults: the Transformer with
/// `model.shared_ffn` on.
pub fn one_wide_defaults(cfg: &mut ModelConfig) {
    cfg.shared_ffn = true;
}

/// The `one-wide-ffn` architecture's costs: its sequence mixer is attention (whose counts
/// these are), and the review quotes nothing for it. Each block's channel mixer is `depth`
/// times as wide, so a block's FLOPs grow with the depth, as the true time says.
pub const ONE_WIDE_COMPLEXITY: Complexity = Complexity {
    review: Review::NO_LINE,
    true_time: "O(T^2 d + T d^2); the shared FFN costs 4 m L d^2 FLOPs per token in every block (L = depth): L times the Transformer's",
    ..crate::mixers::attention::COMPLEXITY
};

/// One channel mixer used by several blocks (One Wide FFN): its parameters exist once, so the
/// optimizer counts and decays them once and autograd sums the gradients of every use. Each
/// block still keeps its own state (RWKV's token shift).
pub struct Shared(pub Arc<dyn SequenceMixer>);

impl SequenceMixer for Shared {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        self.0.prefill(x)
    }
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        self.0.step(x, state)
    }
    fn forward_train(&self, x: &Tensor, p: f64, rng: &mut crate::rng::Rng) -> Result<Tensor> {
        self.0.forward_train(x, p, rng)
    }
    fn chunked(&self, x: &Tensor, chunk: usize) -> Option<Result<Tensor>> {
        self.0.chunked(x, chunk)
    }
    fn split_sequence(&self, split: &crate::mixers::longnet::sequence_parallel::Split) -> Result<()> {
        self.0.split_sequence(split)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::params::ParamBuilder;
    use crate::testing::{random_tokens, rel_err, tiny_config};
    use candle_core::{DType, Device};

    /// FNV-1a over every parameter's name and f32 bits: the weights a seed gives.
    fn fingerprint(m: &Model) -> AnyResult<u64> {
        let mut h: u64 = 0xcbf29ce484222325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
            }
        };
        for (name, p) in m.params.vars() {
            eat(name.as_bytes());
            for v in p.var.as_tensor().flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                eat(&v.to_bits().to_le_bytes());
            }
        }
        Ok(h)
    }

    /// Sharing off is the baseline, bit for bit: a configuration saved before `shared_ffn`
    /// existed loads, and it and `shared_ffn = false` build the weights the code before One
    /// Wide FFN built (the fingerprint was recorded with that code) and the same logits.
    #[test]
    fn sharing_off_is_the_baseline_bit_for_bit() -> AnyResult<()> {
        let cfg = tiny_config("transformer", &["model.shared_ffn=false"])?;
        let mut saved = serde_json::to_value(crate::config::RunConfig { model: cfg.clone(), ..Default::default() })?;
        saved["model"].as_object_mut().unwrap().remove("shared_ffn").expect("the key is written");
        let old = crate::config::RunConfig::from_saved(saved)?.model;
        assert!(!old.shared_ffn);
        let (a, b) = (Model::new(&cfg, 1, &Device::Cpu, DType::F32)?, Model::new(&old, 1, &Device::Cpu, DType::F32)?);
        assert_eq!(fingerprint(&a)?, BASELINE_FINGERPRINT, "the baseline Transformer's initial weights changed");
        assert_eq!(fingerprint(&b)?, BASELINE_FINGERPRINT);
        let tokens = random_tokens(2, 11, 256, 3)?;
        let (ya, yb) = (a.forward(&tokens, None)?, b.forward(&tokens, None)?);
        assert_eq!((ya - yb)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // and sharing on is a different model
        let shared = Model::new(&tiny_config("transformer", &["model.shared_ffn=true"])?, 1, &Device::Cpu, DType::F32)?;
        assert_ne!(fingerprint(&shared)?, BASELINE_FINGERPRINT);
        Ok(())
    }

    /// The shared mixer's gradient is the sum of its uses' gradients: against the same model
    /// with untied copies (one per block, each as wide as the shared one, every copy set to the
    /// shared weights), in f64, for each channel mixer. The losses agree too.
    #[test]
    fn shared_gradient_is_the_sum_of_untied_copies() -> AnyResult<()> {
        for mixer in ["mlp", "swiglu", "rwkv", "monarch"] {
            let sets = |shared: bool, mult: f64| {
                vec![
                    format!("model.channel_mixer={mixer}"),
                    format!("model.shared_ffn={shared}"),
                    format!("model.ffn_mult={mult}"),
                    "model.depth=3".into(),
                    "model.bias=true".into(),
                ]
            };
            let cfg = |s: Vec<String>| tiny_config("transformer", &s.iter().map(String::as_str).collect::<Vec<_>>());
            let shared = Model::new(&cfg(sets(true, 2.0))?, 4, &Device::Cpu, DType::F64)?;
            let untied = Model::new(&cfg(sets(false, 6.0))?, 5, &Device::Cpu, DType::F64)?;
            crate::testing::perturb(&shared, 0.05, 2)?;
            let weights = shared.params.tensors();
            for (name, p) in untied.params.vars() {
                let source = match name.split_once(".ffn.") {
                    Some((_, rest)) => format!("shared_ffn.{rest}"),
                    None => name.clone(),
                };
                p.var.set(&weights[&source])?;
            }
            let (tokens, targets) = (random_tokens(2, 12, 256, 6)?, random_tokens(2, 12, 256, 7)?);
            let loss = |m: &Model| Model::loss(&m.forward(&tokens, None)?, &targets);
            let (ls, lu) = (loss(&shared)?, loss(&untied)?);
            assert!((ls.to_scalar::<f64>()? - lu.to_scalar::<f64>()?).abs() < 1e-12, "{mixer}: losses differ");
            let (gs, gu) = (ls.backward()?, lu.backward()?);
            let grad = |m: &Model, g: &candle_core::backprop::GradStore, name: &str| {
                g.get(m.params.params[name].var.as_tensor()).cloned().expect("a gradient")
            };
            let mut checked = 0;
            for (name, _) in shared.params.vars() {
                let Some(rest) = name.strip_prefix("shared_ffn.") else { continue };
                let sum = (0..3)
                    .map(|i| grad(&untied, &gu, &format!("blocks.{i}.ffn.{rest}")))
                    .reduce(|a, b| (a + b).unwrap())
                    .unwrap();
                let err = rel_err(&grad(&shared, &gs, &name), &sum)?;
                assert!(err < 1e-10, "{mixer} {name}: shared gradient vs sum of the copies' {err}");
                checked += 1;
            }
            assert!(checked >= 2, "{mixer}: no shared parameters found");
        }
        Ok(())
    }

    /// The shared mixer matches the baseline's parameter count within 1% (the MLP, SwiGLU and
    /// the Monarch MLP, with and without biases, at several depths and widths), and its parameters exist once
    /// (`shared_ffn.*`, decayed as the baseline's `ffn.*` are; no block holds one of its own).
    #[test]
    fn one_wide_ffn_matches_the_baseline_parameters() -> AnyResult<()> {
        for (mixer, bias, depth, width) in [
            ("mlp", false, 2, 16),
            ("mlp", true, 4, 64),
            ("swiglu", false, 6, 128),
            ("swiglu", true, 3, 48),
            ("monarch", true, 4, 64),
        ] {
            let sets = |shared: bool| {
                [
                    format!("model.channel_mixer={mixer}"),
                    format!("model.bias={bias}"),
                    format!("model.depth={depth}"),
                    format!("model.width={width}"),
                    format!("model.shared_ffn={shared}"),
                ]
            };
            let build = |shared: bool| -> AnyResult<Model> {
                let s = sets(shared);
                let cfg = tiny_config("transformer", &s.iter().map(String::as_str).collect::<Vec<_>>())?;
                Model::new(&cfg, 1, &Device::Cpu, DType::F32)
            };
            let (base, wide) = (build(false)?, build(true)?);
            let off = wide.num_params() as f64 / base.num_params() as f64 - 1.0;
            assert!(
                off.abs() < 0.01,
                "{mixer} bias {bias} depth {depth}: {} vs {} parameters",
                wide.num_params(),
                base.num_params()
            );
            let names = |m: &Model, prefix: &str| -> Vec<(String, bool)> {
                m.params
                    .params
                    .iter()
                    .filter_map(|(n, p)| n.strip_prefix(prefix).map(|r| (r.to_string(), p.decay)))
                    .collect()
            };
            assert!(wide.params.params.keys().all(|n| !n.contains(".ffn.")), "a block holds its own channel mixer");
            assert_eq!(names(&wide, "shared_ffn."), names(&base, "blocks.0.ffn."), "{mixer}: names or decay differ");
        }
        Ok(())
    }

    /// The shared mixer keeps one state per block: RWKV's channel mix (token shift) shared by
    /// every block decodes as it trains.
    #[test]
    fn shared_mixer_with_state_decodes_as_it_trains() -> AnyResult<()> {
        let cfg = tiny_config("transformer", &["model.shared_ffn=true", "model.channel_mixer=rwkv", "model.depth=3"])?;
        let m = Model::new(&cfg, 2, &Device::Cpu, DType::F32)?;
        crate::testing::perturb(&m, 0.05, 3)?;
        crate::testing::assert_modes_agree(&m, &random_tokens(2, 13, 256, 4)?, &[0, 5])
    }

    /// The Monarch MLP is the dense GLU whose matrices are its blocks placed on the diagonal
    /// (assembled by the Monarch reference), with `3 h d / 4` weights.
    #[test]
    fn monarch_mlp_is_the_glu_of_its_block_diagonal_matrices() -> AnyResult<()> {
        for (width, mult, bias) in [(16, 4.0, false), (24, 2.0, true)] {
            let cfg = tiny_config(
                "transformer",
                &[
                    &format!("model.width={width}"),
                    &format!("model.ffn_mult={mult}"),
                    &format!("model.bias={bias}"),
                    "model.channel_mixer=monarch",
                ],
            )?;
            let pb = ParamBuilder::new(3, &Device::Cpu, DType::F64);
            let mlp = monarch_mlp(&cfg, 0, &pb)?;
            let store = pb.into_store().tensors();
            let h = (mult * width as f64) as usize;
            let w1 = crate::ops::monarch::naive::assemble_blockdiag(&store["gated_layers.weight"])?; // [2h, d]
            let w2 = crate::ops::monarch::naive::assemble_blockdiag(&store["wo.weight"])?; // [d, h]
            assert_eq!((w1.dims(), w2.dims()), (&[2 * h, width][..], &[width, h][..]));
            assert_eq!(store["gated_layers.weight"].elem_count() + store["wo.weight"].elem_count(), 3 * h * width / 4);
            let x = crate::testing::randn(&[2, 5, width], 4, DType::F64)?;
            let gu = x.reshape((10, width))?.matmul(&w1.t()?)?;
            let act = (gu.narrow(1, 0, h)?.gelu_erf()? * gu.narrow(1, h, h)?)?;
            let mut want = act.matmul(&w2.t()?)?;
            if bias {
                want = want.broadcast_add(&store["wo.bias"])?;
            }
            assert!(rel_err(&mlp.forward(&x)?, &want.reshape((2, 5, width))?)? < 1e-12);
        }
        let odd = tiny_config("transformer", &["model.width=18", "model.heads=2", "model.channel_mixer=monarch"])?;
        let err =
            monarch_mlp(&odd, 0, &ParamBuilder::new(1, &Device::Cpu, DType::F32)).err().expect("width 18").to_string();
        assert!(err.contains("multiple of 4"), "{err}");
        Ok(())
    }

    /// The Monarch MLP under other sequence mixers: gradients of a Transformer with it against
    /// finite differences, and RWKV-4 and RetNet with it decoding as they train.
    #[test]
    fn monarch_mlp_works_under_any_sequence_mixer() -> AnyResult<()> {
        let err =
            crate::testing::model_gradient_err(&tiny_config("transformer", &["model.channel_mixer=monarch"])?, 2)?;
        assert!(err < 1e-4, "{err}");
        for arch in ["rwkv4", "retnet", "hyena"] {
            let m = Model::new(&tiny_config(arch, &["model.channel_mixer=monarch"])?, 1, &Device::Cpu, DType::F32)?;
            crate::testing::perturb(&m, 0.05, 1)?;
            crate::testing::assert_modes_agree(&m, &random_tokens(2, 11, 256, 2)?, &[0, 4])?;
            assert!(m.params.params.contains_key("blocks.1.ffn.gated_layers.weight"), "{arch}");
        }
        Ok(())
    }

    /// `fingerprint` of `tiny_config("transformer")` at seed 1, recorded with the code before
    /// `model.shared_ffn` existed (commit 26a80de). A deliberate change to the Transformer's
    /// initialisation changes it; anything else that does is a bug.
    const BASELINE_FINGERPRINT: u64 = 0xdf070e6b145fedee;
}
