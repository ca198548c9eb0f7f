//! Causal softmax attention over a head layout: the choice between the fused flash kernel
//! (`cuda`, CUDA only) and the unfused tensor form ([`causal_attention_reference`]: scores,
//! [`causal_softmax`](causal_softmax::causal_softmax), the weighted sum).
//!
//! Shapes: `B` batch, `T` query length, `S` key length, `H` query heads, `KVH` key/value
//! heads (`G = H / KVH` query heads share one), `d_h` head width. The mixer
//! ([`crate::mixers::attention`]) owns the projections, the heads, rotary positions and
//! whether dropout applies; this module only computes `softmax(q k^T / sqrt(d_h)) v`.

pub mod causal_softmax;
#[cfg(feature = "cuda")]
pub mod cuda;

use candle_core::{Result, Tensor};

use causal_softmax::causal_softmax;

/// Softmax attention of queries at positions `offset..offset+T` over keys `0..S`, causal:
/// query t sees keys s <= offset + t. Grouped heads share K/V without copying them: the G
/// query heads of a group are stacked along the query axis.
///
/// `q: [B, H, T, d_h]`, `k, v: [B, KVH, S, d_h]` -> `[B, H, T, d_h]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
    causal_attention_with_dropout(q, k, v, offset, None)
}

/// [`causal_attention`] with dropout on the attention probabilities (training). Runs the
/// fused flash-attention kernel (`cuda`) for bf16 CUDA tensors of head width 64 or 128
/// without dropout (unless switched off: `ALTFORMERS_UNFUSED=attention`), and
/// [`causal_attention_reference`] otherwise.
pub fn causal_attention_with_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    dropout: Option<(f64, &mut crate::rng::Rng)>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if dropout.as_ref().is_none_or(|(p, _)| *p == 0.0) && cuda::supports(q, k, v) {
        return cuda::causal_attention(q, k, v, offset);
    }
    causal_attention_reference(q, k, v, offset, dropout)
}

/// The unfused form of [`causal_attention_with_dropout`] (scores, [`causal_softmax()`], the
/// weighted sum): the CPU path, the fallback of the flash kernel, and the reference it is
/// tested against. Shapes as [`causal_attention`].
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    dropout: Option<(f64, &mut crate::rng::Rng)>,
) -> Result<Tensor> {
    let (b, h, t, dh) = q.dims4()?;
    let kvh = k.dim(1)?;
    let g = h / kvh;
    let q = q.reshape((b, kvh, g * t, dh))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?;
    // rows of `scores` are the G query heads of a group stacked: row r is query r % T
    let probs = causal_softmax(&scores, t, offset)?;
    let probs = match dropout {
        Some((p, rng)) if p > 0.0 => crate::nn::dropout(&probs, p, rng)?,
        _ => probs,
    };
    probs.matmul(v)?.reshape((b, h, t, dh))
}
