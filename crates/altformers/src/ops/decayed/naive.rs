//! The quadratic references of [`super`]: every output from the whole `[T, T]` decayed score
//! (or log-weight) matrix at once, `O(T^2)`; what the recurrent and chunkwise forms are
//! tested against.

use candle_core::{Result, Tensor, D};

use super::{block_log_weights, channels_first, decay_matrix, Weighting};

/// Quadratic reference: `((q k^T) (.) D) v` with `D[t, i] = gamma^(t - i)` for `i <= t`.
/// `q, k: [B, H, T, d_k]`, `v: [B, H, T, d_v]`, `log_decay: [H]` -> `[B, H, T, d_v]`.
pub fn linear_naive(q: &Tensor, k: &Tensor, v: &Tensor, log_decay: &Tensor) -> Result<Tensor> {
    let t = q.dim(2)?;
    let d = decay_matrix(log_decay, t)?.unsqueeze(0)?;
    q.matmul(&k.t()?)?.broadcast_mul(&d)?.matmul(v)
}

/// Quadratic reference: the whole `[T, T]` weight matrix per channel, max-subtracted per row.
/// `k, v: [B, T, C]` -> `y: [B, T, C]`.
pub fn wkv_naive(k: &Tensor, v: &Tensor, wt: Weighting) -> Result<Tensor> {
    let t = k.dim(1)?;
    let (kt, vt) = (channels_first(k)?, channels_first(v)?);
    let e = kt.unsqueeze(2)?.broadcast_add(&block_log_weights(&wt, t, k)?.unsqueeze(0)?)?; // [B, C, T, T]
    let m = e.max_keepdim(D::Minus1)?.detach();
    let p = e.broadcast_sub(&m)?.exp()?;
    let num = p.matmul(&vt.unsqueeze(3)?)?.squeeze(3)?;
    let den = p.sum(D::Minus1)?;
    (num / den)?.transpose(1, 2)
}
