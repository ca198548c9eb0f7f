//! The chunkwise forms of [`super`] as tensor code (any device, f32 and f64): parallel
//! inside chunks, a scan over the chunks' states. [`super::linear_chunked`] and
//! [`super::wkv_chunked`] run these unless a fused CUDA kernel applies.

use candle_core::{IndexOp, Result, Tensor, D};

use super::{
    block_log_weights, bmm, channels_first, chunk_layout, decay_matrix, decay_powers, host, Weighting, WkvParts,
    WkvState,
};

/// Chunkwise form (RetNet section 2.1): inside each chunk of `L` tokens the parallel form,
/// across chunks the state, `S_{n+1} = gamma^L S_n + (K (.) gamma^(L-1-i))^T V`, read by
/// `(Q (.) gamma^(j+1)) S_n`. Every factor is a non-negative power of gamma, so nothing grows.
/// The intra-chunk products of all chunks run as one batched matmul; only the `[B, H, d_k,
/// d_v]` state is scanned. Shapes as [`super::linear_naive`]; `state` is the state before the first
/// token (`None`: empty). Returns the outputs and the state after the last token.
pub fn linear_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_decay: &Tensor,
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
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
    let (parts, s) = wkv_chunked_parts(k, v, wt, chunk, state)?;
    Ok((parts.ratio()?, s))
}
