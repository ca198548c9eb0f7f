//! Softmax attention (Vaswani et al. 2017, arXiv 1706.03762) with multi-query
//! (Shazeer 2019, arXiv 1911.02150) and grouped-query (Ainslie et al. 2023, arXiv 2305.13245)
//! key/value sharing, optional rotary positions (arXiv 2104.09864): causal with a KV cache for
//! decoding (the `transformer`), or bidirectional, `softmax(Q K^T / sqrt(d_h) + M) V` with
//! `M` the key-padding mask, for an encoder (`transformer-encoder`; no recurrent form; the
//! unfused path on every device, as the fused flash kernel is causal only).
//!
//! Shapes: `B` batch, `T` query length, `S` key length, `H` query heads, `G = H / KVH`
//! query heads per key/value head, `d_h` head width.

use anyhow::Result as AnyResult;
use candle_core::{Result, Tensor};

use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Position};
use crate::nn::Linear;
use crate::ops::attention::{
    bidirectional_attention, causal_attention, causal_attention_packed, causal_attention_with_dropout,
    key_padding_bias, runs_packed,
};
use crate::params::ParamBuilder;
use crate::primitives::rotary;
use crate::rng::Rng;

pub struct Attention {
    /// Fused projection `[D] -> [H d_h + 2 KVH d_h]` (queries, keys, values).
    qkv: Linear,
    out: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_base: Option<f64>,
    /// Causal (a decoder) or bidirectional (an encoder).
    causal: bool,
}

impl Attention {
    /// Causal attention, parameters `qkv.*` and `out.*` under `pb`, GPT-2 initialisation (the
    /// output projection scaled by 1/sqrt(2 depth)).
    pub fn new(cfg: &ModelConfig, pb: &ParamBuilder) -> AnyResult<Self> {
        Self::with_causality(cfg, pb, true)
    }

    /// [`Attention::new`], causal or bidirectional.
    pub fn with_causality(cfg: &ModelConfig, pb: &ParamBuilder, causal: bool) -> AnyResult<Self> {
        let (d, h, kvh, dh) = (cfg.width, cfg.heads, cfg.kv_heads(), cfg.head_dim());
        let qkv = Linear::new(pb, "qkv", d, (h + 2 * kvh) * dh, 0.02, cfg.bias)?;
        let out = Linear::new(pb, "out", h * dh, d, 0.02 / (2.0 * cfg.depth as f64).sqrt(), cfg.bias)?;
        let rope_base = (cfg.position == Position::Rope).then_some(cfg.rope_base);
        Ok(Self { qkv, out, heads: h, kv_heads: kvh, head_dim: dh, rope_base, causal })
    }

    /// `x: [B, T, D]` at positions `offset..` -> `q: [B, H, T, d_h]`, `k, v: [B, KVH, T, d_h]`:
    /// views of the projections' token-major outputs (the flash kernels read them in place;
    /// what needs them contiguous copies them).
    pub(crate) fn project(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, dh) = (self.heads, self.kv_heads, self.head_dim);
        let parts = self.qkv.forward_parts(x, &[h * dh, kvh * dh, kvh * dh])?;
        let heads = |p: &Tensor, n: usize| -> Result<Tensor> { p.reshape((b, t, n, dh))?.transpose(1, 2) };
        let (mut q, mut k, v) = (heads(&parts[0], h)?, heads(&parts[1], kvh)?, heads(&parts[2], kvh)?);
        if let Some(base) = self.rope_base {
            let (cos, sin) = rotary::cached_tables(offset, t, dh, base, &q)?;
            q = rotary::apply_tables(&q, &cos, &sin)?;
            k = rotary::apply_tables(&k, &cos, &sin)?;
        }
        Ok((q, k, v))
    }

    /// Whether the projections rotate by position (RoPE): a step then reads its host position.
    pub(crate) fn rotates(&self) -> bool {
        self.rope_base.is_some()
    }

    /// `[B, H, T, d_h] -> [B, T, D]` through the output projection.
    pub(crate) fn merge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, h, t, dh) = y.dims4()?;
        self.out.forward(&y.transpose(1, 2)?.reshape((b, t, h * dh))?)
    }

    /// The parallel form, keys padded where `keep: [B, T]` is 0 (bidirectional only), with
    /// dropout on the probabilities where given.
    fn parallel(&self, x: &Tensor, keep: Option<&Tensor>, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let p = dropout.as_ref().map_or(0.0, |(p, _)| *p);
        if self.causal && keep.is_none() && self.rope_base.is_none() && runs_packed(x, self.head_dim, p) {
            // one product each way for q, k and v: the kernels read their blocks in place
            // and write their gradient as one tensor
            let y = causal_attention_packed(&self.qkv.forward(x)?, self.heads, self.kv_heads, dropout)?;
            return self.out.forward(&y);
        }
        let (q, k, v) = self.project(x, 0)?;
        let y = match (self.causal, keep) {
            (true, None) => causal_attention_with_dropout(&q, &k, &v, 0, dropout)?,
            (true, Some(_)) => candle_core::bail!("causal attention takes no padding mask"),
            (false, keep) => {
                let bias = keep.map(|keep| key_padding_bias(keep, q.dtype())).transpose()?;
                bidirectional_attention(&q, &k, &v, bias.as_ref(), dropout)?
            }
        };
        self.merge(&y)
    }

    fn refuse_recurrence(&self) -> Result<()> {
        if !self.causal {
            candle_core::bail!("bidirectional attention (an encoder's) sees later tokens: it has no recurrent form");
        }
        Ok(())
    }
}

impl SequenceMixer for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.parallel(x, None, None)
    }

    fn forward_train(&self, x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
        self.parallel(x, None, Some((p, rng)))
    }

    fn forward_padded(&self, x: &Tensor, keep: &Tensor, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        self.parallel(x, Some(keep), dropout)
    }

    /// The state is the KV cache `[k, v]`, each `[B, KVH, T, d_h]` (keys already rotated).
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        self.refuse_recurrence()?;
        let (q, k, v) = self.project(x, 0)?;
        let y = self.merge(&causal_attention(&q, &k, &v, 0)?)?;
        Ok((y, MixerState { tensors: vec![k, v], pos: x.dim(1)? }))
    }

    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        self.refuse_recurrence()?;
        let (q, k, v) = self.project(x, state.pos)?;
        let (k, v) = match state.tensors.as_slice() {
            [kc, vc] => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
            _ => (k, v),
        };
        let y = causal_attention(&q, &k, &v, state.pos)?;
        state.tensors = vec![k, v];
        state.pos += 1;
        self.merge(&y)
    }
}

pub fn build(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Attention::new(cfg, pb)?))
}

/// The encoder's mixer (`transformer-encoder`): bidirectional attention.
pub fn build_bidirectional(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Attention::with_causality(cfg, pb, false)?))
}

pub const COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("Transformer"),
        judgement: Judgement::Wrong(
            "time is quadratic in T (every query scores every earlier key: O(T^2 d + T d^2)); O(T log Td) is Reformer's line (AFT paper, Table 1). Space O(T^2) holds only for naive attention: fused attention and the KV cache are O(T d)",
        ),
    },
    true_time: "O(T^2 d + T d^2)",
    true_space: "O(T^2 h + T d) naive; O(T d) tiled (flash)",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        // projections (qkv + out: 4 d^2 per token, 2 FLOPs each) + scores and weighted sum
        // (2 T^2 d each, halved by causality is not exploited by the dense kernel)
        b * (8.0 * t * d * d + 4.0 * t * t * d)
    },
    memory: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        b * (h * t * t + 5.0 * t * d)
    },
    state: |s: &CostShape| 2.0 * (s.batch * s.seq * s.width) as f64,
};

/// The encoder's (`transformer-encoder`): the same review line (it quotes "the Transformer"),
/// the unfused memory on every device, no decoding state.
pub const ENCODER_COMPLEXITY: Complexity = Complexity {
    true_space: "O(T^2 h + T d) (unfused: the flash kernel is causal only); no decoding",
    state: |_: &CostShape| 0.0,
    ..COMPLEXITY
};
