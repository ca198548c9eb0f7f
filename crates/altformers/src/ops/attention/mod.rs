//! Softmax attention over a head layout. Causal: the choice between the fused flash kernel
//! (`cuda`, CUDA only), the fused CPU op (`cpu`, f32 and f64 without dropout) and the unfused
//! tensor form ([`causal_attention_reference`]: scores,
//! [`causal_softmax`](causal_softmax::causal_softmax), the weighted sum). Bidirectional
//! (encoders, [`bidirectional_attention`]): the unfused form on every device (the flash
//! kernel is causal only), with an optional key-padding mask.
//!
//! Shapes: `B` batch, `T` query length, `S` key length, `H` query heads, `KVH` key/value
//! heads (`G = H / KVH` query heads share one), `d_h` head width. The mixer
//! ([`crate::mixers::attention`]) owns the projections, the heads, rotary positions and
//! whether dropout applies; this module only computes `softmax(q k^T / sqrt(d_h)) v`.

pub mod causal_softmax;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use candle_core::{Result, Shape, Tensor};

use causal_softmax::causal_softmax;

/// The sizes of a causal attention call: `b` sequences, `h` query heads in `kvh` groups, `t`
/// queries, `s` keys, head width `dh`. The fused ops (`cpu`, `cuda`) check their inputs here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub t: usize,
    pub s: usize,
    pub dh: usize,
}

impl Dims {
    /// From head-major `q: [B, H, T, d_h]` and `k, v: [B, KVH, S, d_h]`, checked: the shapes
    /// agree and the key/value heads divide the query heads. `op` names the caller in errors.
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor, op: &str) -> Result<Self> {
        let (b, h, t, dh) = q.dims4()?;
        let (kb, kvh, s, kdh) = k.dims4()?;
        if v.dims4()? != (kb, kvh, s, kdh) || kb != b || kdh != dh {
            candle_core::bail!("{op}: shapes q {:?}, k {:?}, v {:?} do not match", q.shape(), k.shape(), v.shape())
        }
        if kvh == 0 || h % kvh != 0 {
            candle_core::bail!("{op}: {h} query heads are not a multiple of {kvh} key/value heads")
        }
        Ok(Self { b, h, kvh, t, s, dh })
    }

    /// From token-major `q: [B, T, H, d_h]` and `k: [B, S, KVH, d_h]` shapes (the CUDA op's
    /// operands, checked by [`Dims::of`] before they were laid out so).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn token_major(q: &Shape, k: &Shape) -> Result<Self> {
        let (b, t, h, dh) = q.dims4()?;
        let (_, s, kvh, _) = k.dims4()?;
        Ok(Self { b, h, kvh, t, s, dh })
    }

    /// From a fused projection's output `qkv: [B, T, (H + 2 KVH) d_h]` (queries, keys, values
    /// in consecutive blocks of features; `S = T`), checked: the width holds the heads, the
    /// key/value heads divide the query heads. `op` names the caller in errors.
    pub fn packed(qkv: &Shape, h: usize, kvh: usize, op: &str) -> Result<Self> {
        let (b, t, width) = qkv.dims3()?;
        let dh = width / (h + 2 * kvh).max(1);
        if kvh == 0 || !h.is_multiple_of(kvh) || dh == 0 || dh * (h + 2 * kvh) != width {
            candle_core::bail!("{op}: qkv of width {width} does not hold {h} query and 2 x {kvh} key/value heads")
        }
        Ok(Self { b, h, kvh, t, s: t, dh })
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.h / self.kvh
    }
}

/// Softmax attention of queries at positions `offset..offset+T` over keys `0..S`, causal:
/// query t sees keys s <= offset + t. Grouped heads share K/V without copying them: the G
/// query heads of a group are stacked along the query axis.
///
/// `q: [B, H, T, d_h]`, `k, v: [B, KVH, S, d_h]` -> `[B, H, T, d_h]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
    causal_attention_with_dropout(q, k, v, offset, None)
}

/// [`causal_attention`] with dropout on the attention probabilities (training). Runs the
/// fused flash-attention kernel (`cuda`) for bf16 CUDA tensors of head width 64 or 128, the
/// fused CPU op (`cpu`) for f32 and f64 CPU tensors without dropout (both unless switched
/// off: `ALTFORMERS_UNFUSED=attention`), and [`causal_attention_reference`] otherwise; the
/// flash kernel and the reference draw the same dropout mask from `rng`.
pub fn causal_attention_with_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    dropout: Option<(f64, &mut crate::rng::Rng)>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::supports(q, k, v) {
        let (dropout, first) = kernel_dropout(dropout, q.dim(0)?)?;
        return cuda::causal_attention(q, k, v, offset, dropout, first);
    }
    let dropped = matches!(dropout, Some((p, _)) if p > 0.0);
    if !dropped && cpu::supports(q, k, v) {
        return cpu::causal_attention(q, k, v, offset);
    }
    causal_attention_reference(q, k, v, offset, dropout)
}

/// The flash kernels' dropout for a batch of `b` sequences: the mask drawn from `rng`, and the
/// batch's first sequence in it (a data-parallel worker's slice: its sequences' part).
#[cfg(feature = "cuda")]
fn kernel_dropout(
    dropout: Option<(f64, &mut crate::rng::Rng)>,
    b: usize,
) -> Result<(Option<crate::ops::dropout::Dropout>, usize)> {
    Ok(match dropout {
        Some((p, rng)) => (crate::ops::dropout::draw(p, rng)?, rng.shard() as usize * b),
        None => (None, 0),
    })
}

/// Whether [`causal_attention_packed`] runs fused (q, k and v read in place, their gradient
/// written as one tensor) for a projection output with the device, dtype and batch of `x`,
/// head width `dh` and dropout `p` on the probabilities: then a mixer makes q, k and v with
/// one product. The flash kernels on CUDA; the fused CPU op without dropout.
pub fn runs_packed(x: &Tensor, dh: usize, p: f64) -> bool {
    #[cfg(feature = "cuda")]
    if cuda::supports_packed(x, dh) {
        return true;
    }
    let _ = dh;
    p == 0.0 && cpu::supports_packed(x)
}

/// [`causal_attention_with_dropout`] over one fused projection's output `qkv: [B, T, (H + 2
/// KVH) d_h]` (queries, keys and values in consecutive blocks of features, positions from 0)
/// -> `[B, T, H d_h]`. Fused where [`runs_packed`] (its gradient one tensor); otherwise on the
/// three blocks as views.
pub fn causal_attention_packed(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    dropout: Option<(f64, &mut crate::rng::Rng)>,
) -> Result<Tensor> {
    let Dims { b, t, dh, .. } = Dims::packed(qkv.shape(), heads, kv_heads, "attention")?;
    #[cfg(feature = "cuda")]
    if cuda::supports_packed(qkv, dh) {
        let (dropout, first) = kernel_dropout(dropout, b)?;
        return cuda::causal_attention_packed(qkv, heads, kv_heads, cuda::Kernels::from_env()?, dropout, first);
    }
    let dropped = matches!(dropout, Some((p, _)) if p > 0.0);
    if !dropped && cpu::supports_packed(qkv) {
        return cpu::causal_attention_packed(&qkv.contiguous()?, heads, kv_heads);
    }
    let block = |start: usize, n: usize| qkv.narrow(2, start * dh, n * dh)?.reshape((b, t, n, dh))?.transpose(1, 2);
    let (q, k, v) = (block(0, heads)?, block(heads, kv_heads)?, block(heads + kv_heads, kv_heads)?);
    causal_attention_with_dropout(&q, &k, &v, 0, dropout)?.transpose(1, 2)?.reshape((b, t, heads * dh))
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
    let t = q.dim(2)?;
    // rows of the scores are the G query heads of a group stacked: row r is query r % T
    let scores = grouped_scores(q, k)?;
    weighted_sum(causal_softmax(&scores, t, offset)?, v, q.dims(), dropout)
}

/// `q k^T / sqrt(d_h)` with the G query heads of each K/V head stacked as rows:
/// `q: [B, H, T, d_h]`, `k: [B, KVH, S, d_h]` -> `[B, KVH, G T, S]`.
fn grouped_scores(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    // (the mixer's heads are views of its projections: the products need them contiguous)
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    let (b, h, t, dh) = q.dims4()?;
    let kvh = k.dim(1)?;
    // the scale on q: d_h / S times the elements of scaling the scores
    let q = (q.reshape((b, kvh, (h / kvh) * t, dh))? * (1.0 / (dh as f64).sqrt()))?;
    q.matmul(&k.t()?)
}

/// The attention weights `probs: [B, KVH, G T, S]` (dropped out if asked) times `v`, back to
/// the queries' shape `q_dims = [B, H, T, d_h]`.
fn weighted_sum(
    probs: Tensor,
    v: &Tensor,
    q_dims: &[usize],
    dropout: Option<(f64, &mut crate::rng::Rng)>,
) -> Result<Tensor> {
    let probs = match dropout {
        Some((p, rng)) if p > 0.0 => crate::nn::dropout(&probs, p, rng)?,
        _ => probs,
    };
    probs.matmul(&v.contiguous()?)?.reshape(q_dims)
}

/// Bidirectional softmax attention, `softmax(q k^T / sqrt(d_h) + bias) v`: every query sees
/// every key, except keys that `key_bias` ([`key_padding_bias`]) excludes. Grouped heads as in
/// [`causal_attention`]. Unfused on every device (the fused flash kernel is causal only).
///
/// `q: [B, H, T, d_h]`, `k, v: [B, KVH, S, d_h]`, `key_bias: [B, 1, 1, S]` -> `[B, H, T, d_h]`.
pub fn bidirectional_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    dropout: Option<(f64, &mut crate::rng::Rng)>,
) -> Result<Tensor> {
    let scores = grouped_scores(q, k)?;
    let scores = match key_bias {
        Some(bias) => scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    weighted_sum(crate::nn::softmax(&scores)?, v, q.dims(), dropout)
}

/// Score added to a padded key: its weight `exp(-1e30 - max)` is exactly zero, and unlike
/// `-inf` a row of padding only would not turn into NaN.
pub const PADDED_KEY: f64 = -1e30;

/// The additive key-padding mask of `keep: [B, S]` (1 for a real token, 0 for padding, any
/// dtype): `[B, 1, 1, S]`, 0 at real keys and [`PADDED_KEY`] at padded ones, in `dtype`.
pub fn key_padding_bias(keep: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, s) = keep.dims2()?;
    // (1 - keep) P = keep (-P) + P, exact for keep in {0, 1}
    let bias = keep.to_dtype(candle_core::DType::F32)?.affine(-PADDED_KEY, PADDED_KEY)?;
    bias.reshape((b, 1, 1, s))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{keep_first, randn, rel_err};
    use candle_core::{DType, IndexOp};

    /// A fused projection's output as one operand (the fused CPU op reading the blocks in place,
    /// writing one gradient): the same values and gradient as `causal_attention` on copies of
    /// the blocks (grouped heads, more than one block of queries).
    #[test]
    fn a_packed_projection_is_attention_over_its_blocks() -> anyhow::Result<()> {
        let (b, t, h, kvh, dh) = (2, 70, 4, 2, 3);
        let qkv = candle_core::Var::from_tensor(&randn(&[b, t, (h + 2 * kvh) * dh], 4, DType::F64)?)?;
        let packed = causal_attention_packed(&qkv, h, kvh, None)?;
        let block = |start: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(2, start * dh, n * dh)?.reshape((b, t, n, dh))?.transpose(1, 2)?.contiguous()
        };
        let heads = causal_attention(&block(0, h)?, &block(h, kvh)?, &block(h + kvh, kvh)?, 0)?;
        let heads = heads.transpose(1, 2)?.reshape((b, t, h * dh))?;
        assert!(rel_err(&packed, &heads)? < 1e-12);
        let weights = randn(&[b, t, h * dh], 5, DType::F64)?;
        let grad =
            |y: &Tensor| -> Result<Tensor> { Ok((y * &weights)?.sum_all()?.backward()?.get(&qkv).unwrap().clone()) };
        assert!(rel_err(&grad(&packed)?, &grad(&heads)?)? < 1e-12);
        Ok(())
    }

    /// Bidirectional attention is causal attention with every key visible: the last query
    /// (which sees every key either way) agrees, an earlier one does not; a padded key gets
    /// weight zero: the result equals attention over the real keys only (grouped heads too).
    #[test]
    fn bidirectional_attention_sees_every_key_but_padded_ones() -> anyhow::Result<()> {
        let (b, h, kvh, t, dh) = (2, 4, 2, 7, 8);
        let q = randn(&[b, h, t, dh], 1, DType::F64)?;
        let k = randn(&[b, kvh, t, dh], 2, DType::F64)?;
        let v = randn(&[b, kvh, t, dh], 3, DType::F64)?;
        let both = bidirectional_attention(&q, &k, &v, None, None)?;
        let causal = causal_attention(&q, &k, &v, 0)?;
        assert!(rel_err(&both.i((.., .., t - 1))?, &causal.i((.., .., t - 1))?)? < 1e-12);
        assert!(rel_err(&both.i((.., .., 0))?, &causal.i((.., .., 0))?)? > 1e-3);
        let bias = key_padding_bias(&keep_first(&[t, 4], t)?, DType::F64)?;
        let padded = bidirectional_attention(&q, &k, &v, Some(&bias), None)?;
        let real = bidirectional_attention(&q.i(1..2)?, &k.i((1..2, .., ..4))?, &v.i((1..2, .., ..4))?, None, None)?;
        assert!(rel_err(&padded.i(1..2)?, &real)? < 1e-12);
        assert!(rel_err(&padded.i(0..1)?, &both.i(0..1)?)? < 1e-12);
        Ok(())
    }
}
