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
//! Each regime has the plain quadratic reference (`*_naive`), the recurrent form (`*_step`,
//! `*_recurrent`) and the chunkwise form (`*_chunked`: parallel inside chunks of `C` tokens,
//! a scan across chunks; any `T`, the last chunk may be short). All are built from
//! differentiable candle operations and work in f32 and f64. Every maximum subtracted before an
//! exponential is detached: the results are ratios in which it cancels exactly, so detaching
//! leaves both values and gradients unchanged. No maximum ever looks at a later position, so
//! causality is exact (bit for bit).

use candle_core::{DType, IndexOp, Result, Tensor, D};

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

/// Quadratic reference: `((q k^T) (.) D) v` with `D[t, i] = gamma^(t - i)` for `i <= t`.
/// `q, k: [B, H, T, d_k]`, `v: [B, H, T, d_v]`, `log_decay: [H]` -> `[B, H, T, d_v]`.
pub fn linear_naive(q: &Tensor, k: &Tensor, v: &Tensor, log_decay: &Tensor) -> Result<Tensor> {
    let t = q.dim(2)?;
    let d = decay_matrix(log_decay, t)?.unsqueeze(0)?;
    q.matmul(&k.t()?)?.broadcast_mul(&d)?.matmul(v)
}

/// One token: `S = gamma S + k^T v`, `o = q S`. `q, k: [B, H, 1, d_k]`, `v: [B, H, 1, d_v]`,
/// `state: [B, H, d_k, d_v]` (`None`: empty) -> (`o: [B, H, 1, d_v]`, new state).
pub fn linear_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let h = log_decay.dim(0)?;
    let kv = k.t()?.matmul(v)?;
    let s = match state {
        Some(s) => (s.broadcast_mul(&log_decay.exp()?.reshape((1, h, 1, 1))?)? + kv)?,
        None => kv,
    };
    Ok((q.matmul(&s)?, s))
}

/// Recurrent form: [`linear_step`] over every token. Shapes as [`linear_naive`]; returns the
/// outputs and the state after the last token.
pub fn linear_recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let t = q.dim(2)?;
    let mut s = state.cloned();
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let (o, next) =
            linear_step(&q.narrow(2, i, 1)?, &k.narrow(2, i, 1)?, &v.narrow(2, i, 1)?, log_decay, s.as_ref())?;
        outs.push(o);
        s = Some(next);
    }
    let s = match s {
        Some(s) => s,
        None => Tensor::zeros((q.dim(0)?, q.dim(1)?, q.dim(3)?, v.dim(3)?), q.dtype(), q.device())?,
    };
    Ok((Tensor::cat(&outs, 2)?, s))
}

/// Chunkwise form (RetNet section 2.1): inside each chunk of `L` tokens the parallel form,
/// across chunks the state, `S_{n+1} = gamma^L S_n + (K (.) gamma^(L-1-i))^T V`, read by
/// `(Q (.) gamma^(j+1)) S_n`. Every factor is a non-negative power of gamma, so nothing grows.
/// The intra-chunk products of all chunks run as one batched matmul; only the `[B, H, d_k,
/// d_v]` state is scanned. Shapes as [`linear_naive`]; `state` is the state before the first
/// token (`None`: empty). Returns the outputs and the state after the last token.
pub fn linear_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(fused) = crate::kernels::decayed::linear(q, k, v, log_decay, state)? {
        return Ok(fused);
    }
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let (l, n, pad) = chunk_layout(t, chunk);
    let split = |x: &Tensor, d: usize| x.pad_with_zeros(2, 0, pad)?.reshape((b, h, n, l, d));
    let (qc, kc, vc) = (split(q, dk)?, split(k, dk)?, split(v, dv)?);
    // inside chunks: [B, H, N, L, d_v]
    let scores = bmm(&qc, &kc.t()?)?.broadcast_mul(&decay_matrix(log_decay, l)?.reshape((1, h, 1, l, l))?)?;
    let inner = bmm(&scores, &vc)?;
    // each chunk's own contribution to the state after it: [B, H, N, d_k, d_v]
    let key_decay = |len: usize| -> Result<Tensor> {
        let powers: Vec<f64> = (0..len).rev().map(|p| p as f64).collect();
        decay_powers(log_decay, &powers)
    };
    let summaries = bmm(&kc.broadcast_mul(&key_decay(l)?.reshape((1, h, 1, l, 1))?)?.t()?, &vc)?;
    let gamma_pow = |p: usize| -> Result<Tensor> { decay_powers(log_decay, &[p as f64])?.reshape((1, h, 1, 1)) };
    let gamma_l = gamma_pow(l)?;
    let mut s = match state {
        Some(s) => s.clone(),
        None => Tensor::zeros((b, h, dk, dv), q.dtype(), q.device())?,
    };
    let mut entering = Vec::with_capacity(n);
    for i in 0..n {
        entering.push(s.clone());
        if i + 1 < n {
            s = (s.broadcast_mul(&gamma_l)? + summaries.i((.., .., i))?)?;
        }
    }
    // the state after the last real token (the last chunk may be short)
    let last = l - pad;
    let final_state = if pad == 0 {
        (s.broadcast_mul(&gamma_l)? + summaries.i((.., .., n - 1))?)?
    } else {
        let kl = kc.i((.., .., n - 1))?.narrow(2, 0, last)?;
        let vl = vc.i((.., .., n - 1))?.narrow(2, 0, last)?;
        let own = kl.broadcast_mul(&key_decay(last)?.reshape((1, h, last, 1))?)?.t()?.matmul(&vl)?;
        (s.broadcast_mul(&gamma_pow(last)?)? + own)?
    };
    let s_in = Tensor::stack(&entering, 2)?;
    let powers: Vec<f64> = (1..=l).map(|p| p as f64).collect();
    let query_decay = decay_powers(log_decay, &powers)?.reshape((1, h, 1, l, 1))?;
    let cross = bmm(&qc.broadcast_mul(&query_decay)?, &s_in)?;
    let y = (inner + cross)?.reshape((b, h, n * l, dv))?.narrow(2, 0, t)?;
    Ok((y, final_state))
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

/// Adds one token to the state (the official kernel's update): `S = e^{-w} S + e^{k} v`.
/// `k, v: [B, C]`, `decay: [C]`.
pub fn wkv_fold(state: &WkvState, k: &Tensor, v: &Tensor, decay: Option<&Tensor>) -> Result<WkvState> {
    let ww = match decay {
        Some(w) => state.pp.broadcast_sub(w)?,
        None => state.pp.clone(),
    };
    let p = ww.maximum(k)?.detach();
    let e1 = (ww - &p)?.exp()?;
    let e2 = (k - &p)?.exp()?;
    Ok(WkvState { aa: ((&e1 * &state.aa)? + (&e2 * v)?)?, bb: ((e1 * &state.bb)? + e2)?, pp: p })
}

/// One token of the recurrent form, exactly as the official RWKV-4 kernel: read the output
/// (with the bonus, before the update), then update. `k, v: [B, C]` -> `y: [B, C]`.
pub fn wkv_step(state: &mut WkvState, k: &Tensor, v: &Tensor, wt: Weighting) -> Result<Tensor> {
    match wt.bonus {
        Some(u) => {
            let ww = k.broadcast_add(u)?;
            let p = state.pp.maximum(&ww)?.detach();
            let e1 = (&state.pp - &p)?.exp()?;
            let e2 = (ww - &p)?.exp()?;
            let y = (((&e1 * &state.aa)? + (&e2 * v)?)? / ((e1 * &state.bb)? + e2)?)?;
            *state = wkv_fold(state, k, v, wt.decay)?;
            Ok(y)
        }
        None => {
            *state = wkv_fold(state, k, v, wt.decay)?;
            &state.aa / &state.bb
        }
    }
}

/// Recurrent form: [`wkv_step`] over every token. `k, v: [B, T, C]` -> (`y: [B, T, C]`, the
/// state after the last token). `state: None` starts empty.
pub fn wkv_recurrent(k: &Tensor, v: &Tensor, wt: Weighting, state: Option<WkvState>) -> Result<(Tensor, WkvState)> {
    let (b, t, c) = k.dims3()?;
    let mut s = match state {
        Some(s) => s,
        None => WkvState::empty(b, c, k)?,
    };
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        outs.push(wkv_step(&mut s, &k.i((.., i))?, &v.i((.., i))?, wt)?);
    }
    Ok((Tensor::stack(&outs, 1)?, s))
}

/// Chunkwise form, un-normalised: for every position the numerator and denominator of the
/// output with a common log-scale (see [`WkvParts`]), and the state after the last token.
///
/// Inside each chunk of `L` tokens, the `[L, L]` log-weight matrix per channel (row maxima
/// subtracted); each chunk's own contribution to the state after it (max-subtracted); a scan
/// over the `N` chunks of the `[B, C]` state `(aa, bb, pp)`; then each position combines its
/// chunk-internal sums with the entering state under a common maximum. Time `O(T L C)`,
/// memory `O(T L C)`; with `L` fixed, linear in `T`.
///
/// `k, v: [B, T, C]`; `state`: the state before the first token (`None`: empty).
pub fn wkv_chunked_parts(
    k: &Tensor,
    v: &Tensor,
    wt: Weighting,
    chunk: usize,
    state: Option<WkvState>,
) -> Result<(WkvParts, WkvState)> {
    let (b, t, c) = k.dims3()?;
    let (l, n, pad) = chunk_layout(t, chunk);
    let shift = wt.bonus.is_some() as usize;
    // [B, C, N, L]; padding keys are -inf (weight 0), padding values 0
    let kc = if pad > 0 {
        let fill = (Tensor::zeros((b, c, pad), k.dtype(), k.device())? + f64::NEG_INFINITY)?;
        Tensor::cat(&[channels_first(k)?, fill], 2)?
    } else {
        channels_first(k)?
    }
    .reshape((b, c, n, l))?;
    let vc = channels_first(v)?.pad_with_zeros(2, 0, pad)?.reshape((b, c, n, l))?;

    // inside chunks: [B, C, N, L(j), L(i)]
    let w_block = block_log_weights(&wt, l, k)?;
    let e = kc.unsqueeze(3)?.broadcast_add(&w_block.reshape((1, w_block.dim(0)?, 1, l, l))?)?;
    let m_in = e.max_keepdim(D::Minus1)?.detach();
    let p = e.broadcast_sub(&m_in)?.exp()?;
    let num_in = bmm(&p, &vc.unsqueeze(4)?)?.squeeze(4)?; // [B, C, N, L]
    let den_in = p.sum(D::Minus1)?;
    let m_in = m_in.squeeze(4)?;

    // each chunk's contribution to the state after it: exponents k_i - (L-1-i) w
    let age = |len: usize| -> Vec<f64> { (0..len).rev().map(|a| a as f64).collect() };
    let decayed = |x: &Tensor, ages: Vec<f64>, dim_len: usize| -> Result<Tensor> {
        match wt.decay {
            Some(w) => x.broadcast_sub(
                &w.reshape((c, 1))?.broadcast_mul(&host(ages, &[1, dim_len], x)?)?.reshape((1, c, 1, dim_len))?,
            ),
            None => Ok(x.clone()),
        }
    };
    let es = decayed(&kc, age(l), l)?; // [B, C, N, L]
    let ms = es.max_keepdim(D::Minus1)?.detach(); // [B, C, N, 1]
    let ps = es.broadcast_sub(&ms)?.exp()?;
    let sa = (&ps * &vc)?.sum(D::Minus1)?; // [B, C, N]
    let sb = ps.sum(D::Minus1)?;
    let ms = ms.squeeze(3)?;

    // scan over chunks
    let mut s = match state {
        Some(s) => s,
        None => WkvState::empty(b, c, k)?,
    };
    let chunk_decay = match wt.decay {
        Some(w) => Some((w * l as f64)?),
        None => None,
    };
    let mut entering = Vec::with_capacity(n);
    for i in 0..n {
        entering.push(s.clone());
        let ww = match &chunk_decay {
            Some(d) => s.pp.broadcast_sub(d)?,
            None => s.pp.clone(),
        };
        let msi = ms.i((.., .., i))?;
        let pnew = ww.maximum(&msi)?.detach();
        let e1 = (ww - &pnew)?.exp()?;
        let e2 = (msi - &pnew)?.exp()?;
        s = WkvState {
            aa: ((&e1 * &s.aa)? + (&e2 * sa.i((.., .., i))?)?)?,
            bb: ((e1 * &s.bb)? + (e2 * sb.i((.., .., i))?)?)?,
            pp: pnew,
        };
    }
    // the scan ran to the padded end; padding only decayed the state: undo it on the scale
    if let (Some(w), true) = (wt.decay, pad > 0) {
        s.pp = (&s.pp + (w * pad as f64)?.unsqueeze(0)?.broadcast_as(s.pp.shape())?)?;
    }
    let stack = |f: &dyn Fn(&WkvState) -> Tensor| -> Result<Tensor> {
        Tensor::stack(&entering.iter().map(f).collect::<Vec<_>>(), 2)?.unsqueeze(3)
        // [B, C, N, 1]
    };
    let (aa_in, bb_in, pp_in) = (stack(&|s| s.aa.clone())?, stack(&|s| s.bb.clone())?, stack(&|s| s.pp.clone())?);

    // combine: the entering state is (j + 1 - shift) steps old at row j
    let state_ages: Vec<f64> = (0..l).map(|j| (j + 1 - shift) as f64).collect();
    let s_exp = decayed(&pp_in.broadcast_as((b, c, n, l))?.contiguous()?, state_ages, l)?;
    let m = m_in.maximum(&s_exp)?.detach();
    let f_in = (m_in - &m)?.exp()?;
    let f_state = (s_exp - &m)?.exp()?;
    let num = ((&f_in * num_in)? + f_state.broadcast_mul(&aa_in)?)?;
    let den = ((f_in * den_in)? + f_state.broadcast_mul(&bb_in)?)?;
    let back = |x: Tensor| -> Result<Tensor> { x.reshape((b, c, n * l))?.narrow(2, 0, t)?.transpose(1, 2) };
    Ok((WkvParts { num: back(num)?, den: back(den)?, log_scale: back(m)? }, s))
}

/// Chunkwise form: `y = num / den` of [`wkv_chunked_parts`]. `k, v: [B, T, C]` ->
/// (`y: [B, T, C]`, the state after the last token).
pub fn wkv_chunked(
    k: &Tensor,
    v: &Tensor,
    wt: Weighting,
    chunk: usize,
    state: Option<WkvState>,
) -> Result<(Tensor, WkvState)> {
    #[cfg(feature = "cuda")]
    if let Some(fused) = crate::kernels::decayed::wkv(k, v, wt, state.as_ref())? {
        return Ok(fused);
    }
    let (parts, s) = wkv_chunked_parts(k, v, wt, chunk, state)?;
    Ok((parts.ratio()?, s))
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
