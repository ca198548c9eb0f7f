//! The recurrent forms of [`super`]: one token at a time on the state (decoding), and the
//! same over a whole sequence.

use candle_core::{IndexOp, Result, Tensor};

use super::{Weighting, WkvState};

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

/// Recurrent form: [`linear_step`] over every token. Shapes as [`super::linear_naive`]; returns the
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
