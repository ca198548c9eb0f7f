//! Causal decayed linear attention: the recurrence
//!
//! ```text
//!     S_t = decay (.) S_{t-1} + k_t^T v_t,        o_t = q_t S_t
//! ```
//!
//! shared by RetNet (retention), RWKV-4 (WKV) and AFT-simple, in the two regimes the maths
//! allows:
//!
//! 1. **Matrix state, one decay per head** (`linear_*`; RetNet). `q, k: [B, H, T, d_k]`,
//!    `v: [B, H, T, d_v]`, state `S: [B, H, d_k, d_v]`, decay `gamma_h = exp(log_decay[h])`.
//!    Keys have any sign and nothing is normalised here. A caller that needs the row sums of
//!    the decayed score matrix (RetNet's score normalisation, a linear-attention denominator)
//!    appends a column of ones to `v`: the last output column is then `sum_i D_ti q_t . k_i`
//!    and the last state column the decayed key sum `z_t`, in every form.
//! 2. **Diagonal state, one decay per channel, normalised, in log space** (`wkv_*`; RWKV-4's
//!    WKV, AFT-simple with no decay and no bonus). Every channel `c` is its own head with
//!    `d_k = d_v = 1`, query 1 and key `e^{k}`; the denominator is the same sum with `v = 1`:
//!
//!    ```text
//!    y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
//!        / (sum_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})          (with a bonus u)
//!    y_t =  sum_{i<=t} e^{-(t-i) w + k_i} v_i / sum_{i<=t} e^{-(t-i) w + k_i}   (without)
//!    ```
//!
//!    `k, v: [B, T, C]`, decay rate `w: [C]` (`w >= 0`, per-step factor `e^{-w}`), bonus
//!    `u: [C]`. Exponentials of keys overflow, so the state is kept as the official RWKV-4
//!    kernel keeps it: `(aa, bb, pp)`, each `[B, C]`, with numerator `aa e^{pp}` and
//!    denominator `bb e^{pp}`, `pp` a running maximum exponent.
//!
//! Each regime has the plain quadratic reference (`*_naive`, [`naive`]), the recurrent form
//! (`*_step`, `*_recurrent`, [`recurrent`]) and the chunkwise form (`*_chunked`, [`chunk`]:
//! parallel inside chunks of `C` tokens, a scan across chunks; any `T`, the last chunk may
//! be short). All are built from differentiable candle operations and work in f32 and f64.
//! Every maximum subtracted before an exponential is detached: the results are ratios in
//! which it cancels exactly, so detaching leaves both values and gradients unchanged. No
//! maximum ever looks at a later position, so causality is exact (bit for bit).
//!
//! [`linear_chunked`] and [`wkv_chunked`] are the entry points of the parallel forms: with
//! the `cuda` feature they run the fused scans of `cuda` (`decayed.cu`, `decayed_tc.cu`)
//! where those apply (CUDA tensors, no initial state, not switched off by
//! `ALTFORMERS_UNFUSED=retention`, `retention-tc` or `wkv`), the tensor code of [`chunk`]
//! otherwise.

pub mod chunk;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod naive;
pub mod recurrent;

use candle_core::{DType, Result, Tensor};

pub use chunk::wkv_chunked_parts;
pub use naive::{linear_naive, wkv_naive};
pub use recurrent::{linear_recurrent, wkv_fold, wkv_recurrent, wkv_step};

/// The dtype the recurrences run in for activations of dtype `dt`: f32 at least (bf16/f16
/// activations under mixed precision are promoted, as the official kernels do).
pub fn accumulation_dtype(dt: DType) -> DType {
    match dt {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// Log-scale of an empty normalised state: very negative but finite, so that differences of
/// log-scales stay finite (the official RWKV-4 kernel starts from the same value).
pub const EMPTY_LOG_SCALE: f64 = -1e38;

/// A host vector as a tensor on `like`'s device with `like`'s dtype.
fn host(values: Vec<f64>, dims: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, dims, like.device())?.to_dtype(like.dtype())
}

/// Batched matrix product over any number of leading dimensions (candle's CPU matmul takes at
/// most two): `a: [..., m, k]`, `b: [..., k, n]` (same leading dims) -> `[..., m, n]`.
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ad = a.dims();
    if ad.len() <= 4 {
        return a.matmul(b);
    }
    let r = ad.len();
    let (m, k, n) = (ad[r - 2], ad[r - 1], b.dim(r - 1)?);
    let lead: usize = ad[..r - 2].iter().product();
    let mut out_dims = ad[..r - 2].to_vec();
    out_dims.extend([m, n]);
    a.reshape((lead, m, k))?.matmul(&b.reshape((lead, k, n))?)?.reshape(out_dims)
}

/// How `t` tokens split into chunks of (at most) `chunk`: `(L, N, pad)` with chunk length
/// `L = min(chunk, t)`, `N` chunks and `pad = N L - t` padding tokens after the last one.
pub fn chunk_layout(t: usize, chunk: usize) -> (usize, usize, usize) {
    let l = chunk.clamp(1, t.max(1));
    let n = t.div_ceil(l);
    (l, n, n * l - t)
}

/// Causal distances inside a block of `len` tokens, row-major `[len, len]`: for visible
/// pairs (`i <= j`) `dist[j, i] = max(j - i - shift, 0)` and `visible = 1`; elsewhere 0.
/// `shift = 1` is RWKV's convention (the newest past token is 0 steps old, the current one
/// gets the bonus instead).
fn causal_distances(len: usize, shift: usize) -> (Vec<f64>, Vec<f64>) {
    let mut dist = vec![0.0; len * len];
    let mut visible = vec![0.0; len * len];
    for j in 0..len {
        for i in 0..=j {
            dist[j * len + i] = (j - i).saturating_sub(shift) as f64;
            visible[j * len + i] = 1.0;
        }
    }
    (dist, visible)
}

// ---------------------------------------------------------------------------------------
// 1. Matrix state, per-head decay (retention)
// ---------------------------------------------------------------------------------------

/// `gamma_h^(j - i)` for `i <= j`, 0 above the diagonal: `log_decay: [H]` -> `[H, len, len]`.
pub fn decay_matrix(log_decay: &Tensor, len: usize) -> Result<Tensor> {
    let h = log_decay.dim(0)?;
    let (dist, visible) = causal_distances(len, 0);
    let dist = host(dist, &[1, len, len], log_decay)?;
    let visible = host(visible, &[1, len, len], log_decay)?;
    log_decay.reshape((h, 1, 1))?.broadcast_mul(&dist)?.exp()?.broadcast_mul(&visible)
}

/// `gamma_h^p` for each power `p`: `log_decay: [H]` -> `[H, powers.len()]`.
pub fn decay_powers(log_decay: &Tensor, powers: &[f64]) -> Result<Tensor> {
    let h = log_decay.dim(0)?;
    let p = host(powers.to_vec(), &[1, powers.len()], log_decay)?;
    log_decay.reshape((h, 1))?.broadcast_mul(&p)?.exp()
}

/// One decoding token of retention: `S = gamma S + k^T v`, `o = q S` (shapes as
/// [`recurrent::linear_step`], the tensor form). The fused step (`cuda::linear_step`, one pass
/// over the state) where it applies: on CUDA, f32, nothing tracking a gradient.
pub fn linear_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(fused) = cuda::linear_step(q, k, v, log_decay, state)? {
        return Ok(fused);
    }
    recurrent::linear_step(q, k, v, log_decay, state)
}

/// Retention over a whole sequence: `q, k: [B, H, T, d_k]`, `v: [B, H, T, d_v]`,
/// `log_decay: [H]`, `state: [B, H, d_k, d_v]` before the first token (`None`: empty) ->
/// (`y: [B, H, T, d_v]`, the state after the last token). The fused scan
/// (`cuda::linear`, any chunk size) where it applies, else the chunkwise tensor form
/// ([`chunk::linear_chunked`], chunks of `chunk` tokens).
pub fn linear_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        if q.device().is_cuda() && q.dim(3)? > KEY_BLOCK {
            return linear_by_key_blocks(q, k, v, log_decay, chunk, state, KEY_BLOCK);
        }
        if let Some(fused) = cuda::linear(q, k, v, log_decay, state)? {
            return Ok(fused);
        }
    }
    chunk::linear_chunked(q, k, v, log_decay, chunk, state)
}

/// The widest query/key the fused scans take in one call on the GPU (the tensor-core
/// kernels are compiled for widths up to 256); [`linear_chunked`] cuts wider ones (Performer's
/// default `m = d_h ln d_h = 266` at `d_h = 64`) into blocks of this many columns.
pub const KEY_BLOCK: usize = 256;

/// [`linear_chunked`] with the query/key columns cut into blocks of `block`, each block run
/// alone and the outputs added: `q_t . k_i` is the sum of the blocks' dot products and the
/// decay is per head, not per column, so `o_t = sum_blocks sum_{i<=t} gamma^(t-i) (q_t^b .
/// k_i^b) v_i` exactly, and the state's rows are the blocks' states stacked.
pub fn linear_by_key_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    chunk: usize,
    state: Option<&Tensor>,
    block: usize,
) -> Result<(Tensor, Tensor)> {
    let dk = q.dim(3)?;
    let mut out: Option<Tensor> = None;
    let mut states = Vec::new();
    for start in (0..dk).step_by(block.max(1)) {
        let len = block.min(dk - start);
        let s = state.map(|s| s.narrow(2, start, len)).transpose()?;
        let (y, s) =
            linear_chunked(&q.narrow(3, start, len)?, &k.narrow(3, start, len)?, v, log_decay, chunk, s.as_ref())?;
        out = Some(match out {
            None => y,
            Some(acc) => (acc + y)?,
        });
        states.push(s);
    }
    let Some(out) = out else { candle_core::bail!("decayed linear attention: no query/key columns") };
    Ok((out, Tensor::cat(&states, 2)?))
}

// ---------------------------------------------------------------------------------------
// 2. Diagonal state, per-channel decay, normalised, log space (WKV)
// ---------------------------------------------------------------------------------------

/// The weighting of a normalised decayed sum: decay rate `w: [C]` (`None`: no decay) and the
/// current token's bonus `u: [C]` (`None`: the current token is weighted like a past one,
/// `e^{k_t}`, and the state read after it is updated).
#[derive(Clone, Copy, Default)]
pub struct Weighting<'a> {
    pub decay: Option<&'a Tensor>,
    pub bonus: Option<&'a Tensor>,
}

/// The normalised state: numerator `aa e^{pp}`, denominator `bb e^{pp}`; each `[B, C]`.
#[derive(Clone, Debug)]
pub struct WkvState {
    pub aa: Tensor,
    pub bb: Tensor,
    pub pp: Tensor,
}

impl WkvState {
    /// The state before any token, for `b` sequences of `c` channels, dtype/device of `like`.
    pub fn empty(b: usize, c: usize, like: &Tensor) -> Result<Self> {
        let zeros = Tensor::zeros((b, c), like.dtype(), like.device())?;
        let pp = (zeros.ones_like()? * EMPTY_LOG_SCALE)?;
        Ok(Self { aa: zeros.clone(), bb: zeros, pp })
    }

    pub fn to_vec(&self) -> Vec<Tensor> {
        vec![self.aa.clone(), self.bb.clone(), self.pp.clone()]
    }

    /// From `[aa, bb, pp]` as written by [`WkvState::to_vec`].
    pub fn from_slice(t: &[Tensor]) -> Result<Self> {
        match t {
            [aa, bb, pp] => Ok(Self { aa: aa.clone(), bb: bb.clone(), pp: pp.clone() }),
            _ => candle_core::bail!("a WKV state is three tensors (aa, bb, pp), got {}", t.len()),
        }
    }
}

/// Un-normalised sums per position with their log-scale, each `[B, T, C]`: the true
/// numerator is `num e^{log_scale}`, the true denominator `den e^{log_scale}`.
pub struct WkvParts {
    pub num: Tensor,
    pub den: Tensor,
    pub log_scale: Tensor,
}

impl WkvParts {
    pub fn ratio(&self) -> Result<Tensor> {
        &self.num / &self.den
    }
}

/// Log-weight added to `k_i` for output row `j` inside a block of `len` tokens:
/// `-(dist) w + [i == j] u` where visible, `-inf` above the diagonal.
/// Returns `[C, len, len]` (or `[1, len, len]` with neither decay nor bonus).
fn block_log_weights(wt: &Weighting, len: usize, like: &Tensor) -> Result<Tensor> {
    let shift = wt.bonus.is_some() as usize;
    let (dist, visible) = causal_distances(len, shift);
    let mask: Vec<f64> = visible.iter().map(|&m| if m > 0.0 { 0.0 } else { f64::NEG_INFINITY }).collect();
    let mut out = host(mask, &[1, len, len], like)?;
    if let Some(w) = wt.decay {
        let c = w.dim(0)?;
        let dist = host(dist, &[1, len, len], like)?;
        out = out.broadcast_sub(&w.reshape((c, 1, 1))?.broadcast_mul(&dist)?)?;
    }
    if let Some(u) = wt.bonus {
        let c = u.dim(0)?;
        let eye: Vec<f64> = (0..len * len).map(|p| if p / len == p % len { 1.0 } else { 0.0 }).collect();
        out = out.broadcast_add(&u.reshape((c, 1, 1))?.broadcast_mul(&host(eye, &[1, len, len], like)?)?)?;
    }
    Ok(out)
}

/// `[B, T, C] -> [B, C, T]`, contiguous.
fn channels_first(x: &Tensor) -> Result<Tensor> {
    x.transpose(1, 2)?.contiguous()
}

/// The normalised decayed sum over a whole sequence: `k, v: [B, T, C]`, the weighting `wt`
/// (decay and bonus `[C]`), `state` before the first token (`None`: empty) -> (`y: [B, T,
/// C]`, the state after the last token). The fused kernel (`cuda::wkv`) where it applies,
/// else the chunkwise tensor form ([`chunk::wkv_chunked`], chunks of `chunk` tokens).
pub fn wkv_chunked(
    k: &Tensor,
    v: &Tensor,
    wt: Weighting,
    chunk: usize,
    state: Option<WkvState>,
) -> Result<(Tensor, WkvState)> {
    #[cfg(feature = "cuda")]
    if let Some(fused) = cuda::wkv(k, v, wt, state.as_ref())? {
        return Ok(fused);
    }
    chunk::wkv_chunked(k, v, wt, chunk, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, rel_err};
    use candle_core::DType;

    fn log_decay(h: usize, dtype: DType) -> Result<Tensor> {
        let v: Vec<f64> = (0..h).map(|i| (1.0 - 2f64.powi(-1 - i as i32)).ln()).collect();
        Tensor::new(v, &candle_core::Device::Cpu)?.to_dtype(dtype)
    }

    /// Cutting the key columns into blocks (how the GPU runs keys wider than its kernels)
    /// changes nothing: outputs, states and gradients, with and without an entering state.
    #[test]
    fn key_blocks_add_up_to_the_whole() -> anyhow::Result<()> {
        let ld = log_decay(3, DType::F64)?;
        let (q, k) = (randn(&[2, 3, 11, 7], 1, DType::F64)?, randn(&[2, 3, 11, 7], 2, DType::F64)?);
        let v = randn(&[2, 3, 11, 5], 3, DType::F64)?;
        let s0 = randn(&[2, 3, 7, 5], 4, DType::F64)?;
        for state in [None, Some(&s0)] {
            let (y, s) = linear_chunked(&q, &k, &v, &ld, 4, state)?;
            for block in [1, 3, 7, 9] {
                let (yb, sb) = linear_by_key_blocks(&q, &k, &v, &ld, 4, state, block)?;
                assert!(rel_err(&yb, &y)? < 1e-12 && rel_err(&sb, &s)? < 1e-12, "block {block}");
            }
        }
        let qv = candle_core::Var::from_tensor(&q)?;
        let grad = |block: Option<usize>| -> anyhow::Result<Tensor> {
            let y = match block {
                Some(b) => linear_by_key_blocks(qv.as_tensor(), &k, &v, &ld, 4, None, b)?.0,
                None => linear_chunked(qv.as_tensor(), &k, &v, &ld, 4, None)?.0,
            };
            Ok(y.sqr()?.sum_all()?.backward()?.get(qv.as_tensor()).expect("dq").clone())
        };
        assert!(rel_err(&grad(Some(3))?, &grad(None)?)? < 1e-12);
        Ok(())
    }

    #[test]
    fn linear_forms_agree() -> anyhow::Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let ld = log_decay(3, dtype)?;
            for t in [8, 13] {
                let q = randn(&[2, 3, t, 4], 1, dtype)?;
                let k = randn(&[2, 3, t, 4], 2, dtype)?;
                let v = randn(&[2, 3, t, 5], 3, dtype)?;
                let s0 = randn(&[2, 3, 4, 5], 4, dtype)?;
                let naive = linear_naive(&q, &k, &v, &ld)?;
                let (rec, s_rec) = linear_recurrent(&q, &k, &v, &ld, None)?;
                assert!(rel_err(&rec, &naive)? < 1e-5);
                for chunk in [1, 4, 5, 64] {
                    let (ch, s_ch) = linear_chunked(&q, &k, &v, &ld, chunk, None)?;
                    assert!(rel_err(&ch, &naive)? < 1e-5, "chunk {chunk}, T {t}");
                    assert!(rel_err(&s_ch, &s_rec)? < 1e-5, "state, chunk {chunk}, T {t}");
                    // with an initial state
                    let (a, sa) = linear_chunked(&q, &k, &v, &ld, chunk, Some(&s0))?;
                    let (b, sb) = linear_recurrent(&q, &k, &v, &ld, Some(&s0))?;
                    assert!(rel_err(&a, &b)? < 1e-5 && rel_err(&sa, &sb)? < 1e-5);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn wkv_forms_agree_with_and_without_bonus() -> anyhow::Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let (b, c) = (2, 6);
            let w = randn(&[c], 5, dtype)?.exp()?;
            let u = randn(&[c], 6, dtype)?;
            for wt in [
                Weighting { decay: Some(&w), bonus: Some(&u) },
                Weighting { decay: Some(&w), bonus: None },
                Weighting { decay: None, bonus: None },
            ] {
                for t in [7, 12] {
                    let k = (randn(&[b, t, c], 7, dtype)? * 3.0)?;
                    let v = randn(&[b, t, c], 8, dtype)?;
                    let naive = wkv_naive(&k, &v, wt)?;
                    let (rec, s_rec) = wkv_recurrent(&k, &v, wt, None)?;
                    assert!(rel_err(&rec, &naive)? < 1e-5);
                    for chunk in [1, 3, 4, 100] {
                        let (ch, s_ch) = wkv_chunked(&k, &v, wt, chunk, None)?;
                        assert!(rel_err(&ch, &naive)? < 1e-5, "chunk {chunk}, T {t}");
                        // states agree as the sums they stand for
                        let num = |s: &WkvState| -> Result<Tensor> { &s.aa * s.pp.exp()? };
                        assert!(rel_err(&num(&s_ch)?, &num(&s_rec)?)? < 1e-5, "state, chunk {chunk}");
                        // continuing from a state: the second half after the first
                        let half = t / 2;
                        let (_, s1) = wkv_chunked(&k.narrow(1, 0, half)?, &v.narrow(1, 0, half)?, wt, chunk, None)?;
                        let (y2, _) = wkv_chunked(
                            &k.narrow(1, half, t - half)?,
                            &v.narrow(1, half, t - half)?,
                            wt,
                            chunk,
                            Some(s1),
                        )?;
                        assert!(rel_err(&y2, &naive.narrow(1, half, t - half)?)? < 1e-5);
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn wkv_survives_large_keys() -> anyhow::Result<()> {
        let (b, t, c) = (1, 40, 4);
        let w = Tensor::new(&[0.01f32, 0.5, 3.0, 20.0], &candle_core::Device::Cpu)?;
        let u = Tensor::new(&[30f32, -30.0, 0.0, 5.0], &candle_core::Device::Cpu)?;
        let k =
            (randn(&[b, t, c], 9, DType::F32)?.sign()? * 30.0)?.broadcast_add(&randn(&[b, t, c], 10, DType::F32)?)?;
        let v = randn(&[b, t, c], 11, DType::F32)?;
        let wt = Weighting { decay: Some(&w), bonus: Some(&u) };
        let (ch, _) = wkv_chunked(&k, &v, wt, 8, None)?;
        let (rec, _) = wkv_recurrent(&k, &v, wt, None)?;
        let naive = wkv_naive(&k, &v, wt)?;
        for y in [&ch, &rec, &naive] {
            assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()));
        }
        assert!(rel_err(&ch, &naive)? < 1e-4 && rel_err(&rec, &naive)? < 1e-4);
        Ok(())
    }
}
