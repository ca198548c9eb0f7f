//! Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", arXiv
//! 2006.04768): softmax attention over keys and values projected along the sequence to a
//! fixed length k.
//!
//! For `x: [B, T, D]`, each head `i` (eq. 7):
//!
//! ```text
//! head_i = softmax( Q W_i^Q (E_i K W_i^K)^T / sqrt(d_k) ) F_i V W_i^V
//! ```
//!
//! with learned `E_i, F_i: [k, n]`, `n` the maximum length (`model.context`, fixed: the
//! projections are trained for it; a sequence of `T < n` tokens uses their first `T` columns,
//! as the reference fairseq code slices them) and `k` the projected length
//! (`model.options.k`, 0 for `n / 4`, fairseq's default compression). Sharing
//! (`model.options.sharing`, section 4 of the paper): `none` (each head its own `E_i`, `F_i`:
//! eq. 7), `headwise` (`E_i = E`, `F_i = F` for every head of a layer; the default, as in
//! fairseq's and LRA's implementations: per-head projections cost `2 h k n` parameters a
//! layer, more than the rest of a small model at LRA's n = 2000), `key-value` (headwise, and
//! `E = F`), `layerwise` (one `E` for every layer, head, keys and values). Heads that
//! share a key/value head (`model.kv_heads`) share its projections. Initialisation: Xavier
//! uniform with gain `1/sqrt(2)`, as fairseq's; the Q, K, V and output projections are the
//! Transformer's ([`super::attention::Attention`]).
//!
//! Padding (`forward_padded`, `keep: [B, T]`): the rows of `K W^K` and `V W^V` at padded
//! positions are zeroed *before* the projection, so `E K` and `F V` carry nothing from them
//! (fairseq does not mask there, and its padding leaks into `E K`); with padding at the end a
//! sequence's outputs equal the unpadded sequence's (whose `E` is sliced to its length). The
//! k projected keys all take softmax weight whatever the length: unlike exact attention's,
//! Linformer's output at `T < n` is not attention over the `T` tokens alone.
//!
//! Encoder only: every row of `E K` mixes every position, later ones included, so no causal
//! form exists (the paper defines none, and the report's language-model table has no
//! Linformer row for that reason); no recurrent form. Time `O(T k d + T d^2)`, memory
//! `O(T k h + T d)`: linear in `T` at fixed `k`. Rotary positions are refused (they would be
//! mixed away by the projection); learned positions, as the paper's RoBERTa setting, are the
//! default.

use anyhow::{bail, Result as AnyResult};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::attention::Attention;
use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Position};
use crate::ops::attention::bidirectional_attention;
use crate::params::ParamBuilder;
use crate::rng::Rng;

/// Which projections are shared (the paper's section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sharing {
    /// Each (key/value) head its own `E_i` and `F_i`: eq. 7.
    None,
    /// One `E` and one `F` per layer, for every head.
    Headwise,
    /// One `E = F` per layer, for every head, keys and values.
    KeyValue,
    /// One `E` for the whole model: every layer, head, keys and values.
    Layerwise,
}

/// `model.options` of `linformer`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinformerOptions {
    /// k, the projected length; 0 for `n / 4` (fairseq's default compression of 4).
    pub k: usize,
    /// Which projections are shared (headwise by default, as fairseq and LRA).
    pub sharing: Sharing,
}

impl Default for LinformerOptions {
    fn default() -> Self {
        Self { k: 0, sharing: Sharing::Headwise }
    }
}

impl crate::config::Options for LinformerOptions {}

impl LinformerOptions {
    /// The projected length for a maximum length `n`, checked against it.
    pub fn projected_len(&self, n: usize) -> AnyResult<usize> {
        let k = if self.k == 0 { (n / 4).max(1) } else { self.k };
        if k > n {
            bail!("model.options.k ({k}) exceeds the maximum length n = model.context ({n}): E and F are k x n");
        }
        Ok(k)
    }
}

pub struct Linformer {
    /// The Transformer's Q, K, V and output projections and heads.
    attention: Attention,
    /// `E: [G, k, n]`, `G` = key/value heads (sharing `none`) or 1.
    e: Tensor,
    /// `F`, the same shape; the same tensor as `E` under key-value or layerwise sharing.
    f: Tensor,
    n: usize,
}

impl Linformer {
    /// Parameters under `pb` (`qkv.*`, `out.*`, `proj_e`, `proj_f`); under layerwise sharing
    /// one `linformer.proj_e` at the root of the model, made by the first layer built.
    pub fn new(cfg: &ModelConfig, pb: &ParamBuilder) -> AnyResult<Self> {
        let o: LinformerOptions = cfg.options()?;
        if cfg.position == Position::Rope {
            bail!("model.position = rope: Linformer projects keys along the sequence, which mixes rotary positions away; use learned (the default) or none");
        }
        let n = cfg.context;
        let k = o.projected_len(n)?;
        let attention = Attention::with_causality(cfg, pb, false)?;
        // Xavier uniform, gain 1/sqrt(2) (fan in n, fan out k), as fairseq
        let bound = (6.0 / (n + k) as f64).sqrt() / 2f64.sqrt();
        let make = |pb: &ParamBuilder, name: &str, groups: usize| -> AnyResult<Tensor> {
            match pb.existing(name) {
                Some(t) => Ok(t),
                None => pb.uniform(name, &[groups, k, n], -bound, bound),
            }
        };
        let (e, f) = match o.sharing {
            Sharing::None => (make(pb, "proj_e", cfg.kv_heads())?, make(pb, "proj_f", cfg.kv_heads())?),
            Sharing::Headwise => (make(pb, "proj_e", 1)?, make(pb, "proj_f", 1)?),
            Sharing::KeyValue => {
                let e = make(pb, "proj_e", 1)?;
                (e.clone(), e)
            }
            Sharing::Layerwise => {
                let e = make(&pb.root().pp("linformer"), "proj_e", 1)?;
                (e.clone(), e)
            }
        };
        Ok(Self { attention, e, f, n })
    }

    /// `[B, T, D] -> [B, T, D]`; rows of K and V zeroed where `keep: [B, T]` is 0.
    fn run(&self, x: &Tensor, keep: Option<&Tensor>, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if t > self.n {
            candle_core::bail!("linformer: {t} tokens but E and F project n = model.context = {} positions", self.n);
        }
        let (q, k, v) = self.attention.project(x, 0)?; // k, v: [B, KVH, T, d_h]
        let (k, v) = match keep {
            Some(keep) => {
                let m = keep.to_dtype(k.dtype())?.reshape((b, 1, t, 1))?;
                (k.broadcast_mul(&m)?, v.broadcast_mul(&m)?)
            }
            None => (k, v),
        };
        // [G, k, n] -> [1, G, k, T], then E K: [B, KVH, k, d_h]
        let slice = |p: &Tensor| -> Result<Tensor> { p.narrow(2, 0, t)?.unsqueeze(0)?.to_dtype(k.dtype()) };
        let k = slice(&self.e)?.broadcast_matmul(&k.contiguous()?)?;
        let v = slice(&self.f)?.broadcast_matmul(&v.contiguous()?)?;
        self.attention.merge(&bidirectional_attention(&q, &k, &v, None, dropout)?)
    }
}

impl SequenceMixer for Linformer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, None)
    }

    fn forward_train(&self, x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
        self.run(x, None, Some((p, rng)))
    }

    fn forward_padded(&self, x: &Tensor, keep: &Tensor, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        self.run(x, Some(keep), dropout)
    }

    fn prefill(&self, _x: &Tensor) -> Result<(Tensor, MixerState)> {
        candle_core::bail!("linformer: E K mixes every position, later ones included: there is no recurrent form")
    }

    fn step(&self, _x: &Tensor, _state: &mut MixerState) -> Result<Tensor> {
        candle_core::bail!("linformer: E K mixes every position, later ones included: there is no recurrent form")
    }
}

pub fn build(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Linformer::new(cfg, pb)?))
}

/// Costs at k = T / 4 (the default; the benchmarks set n = T).
pub const COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("Linformer"),
        judgement: Judgement::Imprecise(
            "O(n) hides the projected length k and the width: the projections cost O(n d^2) and the projected scores O(n k d); the model is encoder-only",
        ),
    },
    true_time: "O(T k d + T d^2) (k the projected length); encoder only, no decoding",
    true_space: "O(T k h + T d)",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let k = (t / 4.0).max(1.0);
        // projections (qkv + out: 4 d^2 per token), E K and F V (2 k T d each), scores and
        // weighted sum (2 T k d each)
        b * (8.0 * t * d * d + 8.0 * t * k * d)
    },
    memory: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        let k = (t / 4.0).max(1.0);
        b * (h * t * k + 5.0 * t * d + 2.0 * k * d)
    },
    state: |_: &CostShape| 0.0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::*;
    use candle_core::{DType, Device};

    fn tiny(sets: &[&str]) -> AnyResult<ModelConfig> {
        tiny_config("linformer", sets)
    }

    /// `[G, n, n]` identities.
    fn identity(groups: usize, n: usize, dtype: DType) -> Result<Tensor> {
        Tensor::eye(n, dtype, &Device::Cpu)?.unsqueeze(0)?.repeat((groups, 1, 1))
    }

    /// With k = n and E = F = I, Linformer is bidirectional attention exactly (the same Q, K,
    /// V and output weights), grouped key/value heads too. (At T = n only: for T < n the
    /// sliced identity leaves k - T projected keys at zero, which still take softmax weight,
    /// as any Linformer's k projected keys all do.)
    #[test]
    fn identity_projections_give_bidirectional_attention() -> AnyResult<()> {
        for sets in [&["model.options.k=24"][..], &["model.options.k=24", "model.kv_heads=1", "model.heads=4"]] {
            let cfg = tiny(sets)?;
            let mut lin = Linformer::new(&cfg, &ParamBuilder::new(3, &Device::Cpu, DType::F64))?;
            let groups = lin.e.dim(0)?;
            (lin.e, lin.f) = (identity(groups, 24, DType::F64)?, identity(groups, 24, DType::F64)?);
            let att = Attention::with_causality(&cfg, &ParamBuilder::new(3, &Device::Cpu, DType::F64), false)?;
            let x = randn(&[2, 24, cfg.width], 24, DType::F64)?;
            let err = rel_err(&lin.forward(&x)?, &att.forward(&x)?)?;
            assert!(err < 1e-12, "{sets:?}: {err}");
        }
        Ok(())
    }

    /// E and F parameters: 2 h k n per layer (none), 2 k n (headwise), k n (key-value) per
    /// layer, k n in all (layerwise), on top of the Transformer encoder's; and the layerwise
    /// projection is one tensor whose gradient sums over the layers.
    #[test]
    fn parameter_counts_follow_the_sharing_mode() -> AnyResult<()> {
        let (h, k, n, depth) = (2, 6, 24, 2);
        let base = Model::new(&tiny_config("transformer-encoder", &[])?, 1, &Device::Cpu, DType::F32)?.num_params();
        for (sharing, extra) in [
            ("none", depth * 2 * h * k * n),
            ("headwise", depth * 2 * k * n),
            ("key-value", depth * k * n),
            ("layerwise", k * n),
        ] {
            let cfg = tiny(&[&format!("model.options.sharing={sharing}"), "model.options.k=6"])?;
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            assert_eq!(model.num_params() - base, extra, "{sharing}");
        }
        let cfg = tiny(&["model.options.sharing=layerwise", "model.options.k=6"])?;
        let names: Vec<String> =
            Model::new(&cfg, 1, &Device::Cpu, DType::F32)?.params.vars().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"linformer.proj_e".to_string()) && !names.iter().any(|n| n.contains("blocks.1.att.proj"))
        );
        // the shared tensor's gradient against finite differences: both layers' uses summed
        let err = model_gradient_err_with_step(&cfg, 4, 1e-4)?;
        assert!(err < 1e-4, "{err}");
        Ok(())
    }

    /// A padded position changes nothing: other values there leave every real output
    /// unchanged (masked before the projection), and the padded sequence's outputs equal the
    /// unpadded one's; without the mask they would move.
    #[test]
    fn a_padded_position_changes_nothing() -> AnyResult<()> {
        let cfg = tiny(&["model.options.k=8"])?;
        let lin = Linformer::new(&cfg, &ParamBuilder::new(5, &Device::Cpu, DType::F64))?;
        let x = randn(&[1, 20, cfg.width], 1, DType::F64)?;
        let keep = keep_first(&[14], 20)?;
        let noise = (randn(&[1, 6, cfg.width], 2, DType::F64)? * 5.0)?;
        let other = Tensor::cat(&[x.narrow(1, 0, 14)?, noise], 1)?;
        let real = |y: Tensor| y.narrow(1, 0, 14);
        let a = real(lin.forward_padded(&x, &keep, None)?)?;
        assert_eq!(rel_err(&real(lin.forward_padded(&other, &keep, None)?)?, &a)?, 0.0);
        assert!(rel_err(&lin.forward(&x.narrow(1, 0, 14)?)?, &a)? < 1e-12);
        assert!(
            rel_err(&real(lin.forward(&other)?)?, &real(lin.forward(&x)?)?)? > 1e-3,
            "the check would prove nothing"
        );
        Ok(())
    }

    #[test]
    fn options_are_checked_and_recurrence_refused() -> AnyResult<()> {
        assert_eq!(LinformerOptions::default().projected_len(512)?, 128);
        let pb = ParamBuilder::new(1, &Device::Cpu, DType::F32);
        let err = Linformer::new(&tiny(&["model.options.k=25"])?, &pb).err().expect("k > n").to_string();
        assert!(err.contains("model.options.k (25)") && err.contains("24"), "{err}");
        let err = Linformer::new(&tiny(&["model.position=rope"])?, &pb).err().expect("rope").to_string();
        assert!(err.contains("rope"), "{err}");
        assert!(tiny(&["model.options.sharing=rows"]).is_err());
        let lin = Linformer::new(&tiny(&[])?, &pb)?;
        let x = randn(&[1, 25, 16], 1, DType::F32)?;
        assert!(lin.forward(&x).unwrap_err().to_string().contains("n = model.context = 24"));
        assert!(lin.prefill(&x.narrow(1, 0, 3)?).is_err());
        Ok(())
    }
}
