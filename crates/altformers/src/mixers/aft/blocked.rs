//! AFT-full's parallel form over key blocks, in `O(T C + block^2)` memory per batch row
//! (the paper's point: AFT needs no `T x T` attention matrix).
//!
//! For query block `i` the numerator and denominator
//!
//! ```text
//! num_t = sum_{t'<=t} exp(w_{t,t'} + K_t') V_t'      den_t = sum_{t'<=t} exp(w_{t,t'} + K_t')
//! ```
//!
//! accumulate over key blocks `j <= i` with a running maximum (log-sum-exp style): each
//! key position is stabilised by its largest channel `mk_t'` (as [`super::pairwise`]), each
//! block's weights `A = exp(w + mk - M)` by the row maximum `M` so far, and the sums already
//! made are rescaled by `exp(M_old - M_new)` when it grows. With the factorised `w = U V^T`
//! each block of `w` is `U_i V_j^T`, so nothing `T x T` exists at all.
//!
//! The forward runs off the autograd graph; a pass-through op carries the result and its
//! backward recomputes each block from what the forward kept (`y`, the scaled `den`, `M`,
//! `mk`: `O(T C)`). With `r = dy / den`, `s = r (.) y` (per channel) and `e = exp(K - mk)`:
//!
//! ```text
//! dV_t' = e_t' (.) sum_t A_{t,t'} r_t
//! dK_t' = e_t' (.) (V_t' (.) sum_t A_{t,t'} r_t - sum_t A_{t,t'} s_t)
//! dw_{t,t'} = A_{t,t'} sum_c e_{t',c} (V_{t',c} r_{t,c} - s_{t,c})      (summed over the batch)
//! ```
//!
//! and `dU_i += dw_{ij} V_j`, `dV_j += dw_{ij}^T U_i` for the factorised `w`. Where an f32
//! denominator falls below [`super::UNDERFLOW`] (keys far apart across channels), those
//! outputs come from the same computation in f64, and the backward runs in f64.

use candle_core::{DType, Result, Tensor, D};

use crate::ops::precomputed::{with_backward, Gradients};

/// `w` over positions `0..T` as the blocks read it: `[T, T]`, or `U, V: [T, d']`.
enum Bias {
    Matrix(Tensor),
    Factors(Tensor, Tensor),
}

impl Bias {
    /// `bias` is `[T, T]` or, `factored`, `[U; V]`: `[2T, d']`.
    fn new(bias: &Tensor, factored: bool, t: usize, dtype: DType) -> Result<Self> {
        let bias = bias.to_dtype(dtype)?;
        Ok(if factored { Bias::Factors(bias.narrow(0, 0, t)?, bias.narrow(0, t, t)?) } else { Bias::Matrix(bias) })
    }

    /// `w` for queries `qs..qs+ql` and keys `ks..ks+kl`: `[ql, kl]`.
    fn block(&self, (qs, ql): (usize, usize), (ks, kl): (usize, usize)) -> Result<Tensor> {
        match self {
            Bias::Matrix(w) => w.narrow(0, qs, ql)?.narrow(1, ks, kl),
            Bias::Factors(u, v) => u.narrow(0, qs, ql)?.matmul(&v.narrow(0, ks, kl)?.t()?),
        }
    }
}

/// `(start, length)` of each block of `block` positions in `0..t`.
fn spans(t: usize, block: usize) -> Vec<(usize, usize)> {
    (0..t).step_by(block).map(|s| (s, block.min(t - s))).collect()
}

/// What the forward keeps for the backward, all `O(T C)`, in the computation's dtype.
struct Saved {
    /// The output `[B, T, C]`.
    y: Tensor,
    /// The denominator, scaled by `exp(-M)`: `[B, T, C]`.
    den: Tensor,
    /// Each row's maximum `M`: `[B, T, 1]`.
    m: Tensor,
    /// Each key position's largest channel `mk`: `[B, T, 1]`.
    mk: Tensor,
}

/// The shared pieces of one call: stabilised keys and the per-block weights.
struct Blocks<'a> {
    bias: &'a Bias,
    /// `mk` as a row, `[B, 1, T]`.
    mk_row: Tensor,
    /// `exp(K - mk)`, `[B, T, C]`.
    e: Tensor,
    /// `0` on and below the diagonal, `-inf` above: `[block, block]`.
    mask: Tensor,
}

impl Blocks<'_> {
    /// The logits `w + mk` of queries `q` and keys `k` (masked on the diagonal): `[B, ql, kl]`.
    fn logits(&self, q: (usize, usize), k: (usize, usize)) -> Result<Tensor> {
        let logits = self.bias.block(q, k)?.unsqueeze(0)?.broadcast_add(&self.mk_row.narrow(2, k.0, k.1)?)?;
        if q.0 == k.0 {
            logits.broadcast_add(&self.mask.narrow(0, 0, q.1)?.narrow(1, 0, k.1)?)
        } else {
            Ok(logits)
        }
    }
}

fn setup<'a>(k: &Tensor, bias: &'a Bias, mk: &Tensor, block: usize) -> Result<Blocks<'a>> {
    let n = block.min(k.dim(1)?);
    let mask: Vec<f64> = (0..n * n).map(|p| if p % n <= p / n { 0.0 } else { f64::NEG_INFINITY }).collect();
    Ok(Blocks {
        bias,
        mk_row: mk.transpose(1, 2)?.contiguous()?,
        e: k.broadcast_sub(mk)?.exp()?,
        mask: Tensor::from_vec(mask, (n, n), k.device())?.to_dtype(k.dtype())?,
    })
}

fn forward(k: &Tensor, v: &Tensor, bias: &Bias, block: usize) -> Result<Saved> {
    let t = k.dim(1)?;
    let mk = k.max_keepdim(D::Minus1)?;
    let b = setup(k, bias, &mk, block)?;
    let ev = (&b.e * v)?;
    let (mut nums, mut dens, mut ms) = (vec![], vec![], vec![]);
    for q in spans(t, block) {
        let mut acc: Option<(Tensor, Tensor, Tensor)> = None;
        for kb in spans(q.0 + q.1, block) {
            let logits = b.logits(q, kb)?;
            let mb = logits.max_keepdim(D::Minus1)?; // [B, ql, 1]
            let m = match &acc {
                Some((_, _, m)) => m.maximum(&mb)?,
                None => mb,
            };
            let a = logits.broadcast_sub(&m)?.exp()?;
            let num = a.matmul(&ev.narrow(1, kb.0, kb.1)?.contiguous()?)?;
            let den = a.matmul(&b.e.narrow(1, kb.0, kb.1)?.contiguous()?)?;
            acc = Some(match acc {
                None => (num, den, m),
                Some((n0, d0, m0)) => {
                    let f = (m0 - &m)?.exp()?;
                    ((n0.broadcast_mul(&f)? + num)?, (d0.broadcast_mul(&f)? + den)?, m)
                }
            });
        }
        let (num, den, m) = acc.expect("every query block sees its own keys");
        nums.push(num);
        dens.push(den);
        ms.push(m);
    }
    let (num, den) = (Tensor::cat(&nums, 1)?, Tensor::cat(&dens, 1)?);
    Ok(Saved { y: (num / &den)?, den, m: Tensor::cat(&ms, 1)?, mk })
}

/// Gradients of `sum(dy (.) y)`: `dK, dV: [B, T, C]` and that of the bias argument.
fn backward(k: &Tensor, v: &Tensor, bias: &Bias, block: usize, s: &Saved, dy: &Tensor) -> Result<[Tensor; 3]> {
    let t = k.dim(1)?;
    let b = setup(k, bias, &s.mk, block)?;
    let ev = (&b.e * v)?;
    let r = (dy / &s.den)?;
    let rs = (&r * &s.y)?;
    let keys = spans(t, block);
    // per key block: sum_t A r_t and sum_t A s_t, [B, kl, C]
    let mut ar: Vec<Option<Tensor>> = vec![None; keys.len()];
    let mut as_: Vec<Option<Tensor>> = vec![None; keys.len()];
    let add = |slot: &mut Option<Tensor>, x: Tensor| -> Result<()> {
        *slot = Some(match slot.take() {
            Some(y) => (y + x)?,
            None => x,
        });
        Ok(())
    };
    let mut dw_rows = Vec::new(); // Matrix: [ql, T] per query block
    let (mut du, mut dv_f): (Vec<Tensor>, Vec<Option<Tensor>>) = (vec![], vec![None; keys.len()]);
    for q in spans(t, block) {
        let (ri, si) = (r.narrow(1, q.0, q.1)?, rs.narrow(1, q.0, q.1)?);
        let m = s.m.narrow(1, q.0, q.1)?;
        let mut dw_row = Vec::new();
        let mut du_i: Option<Tensor> = None;
        for (j, kb) in spans(q.0 + q.1, block).into_iter().enumerate() {
            let a = b.logits(q, kb)?.broadcast_sub(&m)?.exp()?; // [B, ql, kl]
            let at = a.transpose(1, 2)?;
            add(&mut ar[j], at.matmul(&ri)?)?;
            add(&mut as_[j], at.matmul(&si)?)?;
            let (evj, ej) = (ev.narrow(1, kb.0, kb.1)?, b.e.narrow(1, kb.0, kb.1)?);
            let inner = (ri.matmul(&evj.t()?)? - si.matmul(&ej.t()?)?)?;
            let dw = (a * inner)?.sum(0)?; // [ql, kl]
            match bias {
                Bias::Matrix(_) => dw_row.push(dw),
                Bias::Factors(u, vf) => {
                    add(&mut du_i, dw.matmul(&vf.narrow(0, kb.0, kb.1)?)?)?;
                    add(&mut dv_f[j], dw.t()?.matmul(&u.narrow(0, q.0, q.1)?)?)?;
                }
            }
        }
        match bias {
            Bias::Matrix(w) => {
                let seen = q.0 + q.1;
                if seen < t {
                    dw_row.push(Tensor::zeros((q.1, t - seen), w.dtype(), w.device())?);
                }
                dw_rows.push(Tensor::cat(&dw_row, 1)?);
            }
            Bias::Factors(..) => du.push(du_i.expect("every query block sees its own keys")),
        }
    }
    let gather = |parts: Vec<Option<Tensor>>| -> Result<Tensor> {
        Tensor::cat(&parts.into_iter().map(|p| p.expect("every key block is seen")).collect::<Vec<_>>(), 1)
    };
    let (ar, as_) = (gather(ar)?, gather(as_)?);
    let dv = (&b.e * &ar)?;
    let dk = (&b.e * ((v * &ar)? - as_)?)?;
    let dbias = match bias {
        Bias::Matrix(_) => Tensor::cat(&dw_rows, 0)?,
        Bias::Factors(..) => {
            let dv_f: Vec<Tensor> = dv_f.into_iter().map(|p| p.expect("every key block is seen")).collect();
            Tensor::cat(&[Tensor::cat(&du, 0)?, Tensor::cat(&dv_f, 0)?], 0)?
        }
    };
    Ok([dk, dv, dbias])
}

/// The pass-through op: its value is the forward's output, its backward [`backward`].
struct BlockedGrad {
    factored: bool,
    block: usize,
    /// The dtype the forward ran in (the keys', or f64 after an underflow).
    dtype: DType,
    saved: Saved,
}

impl Gradients for BlockedGrad {
    fn name(&self) -> &'static str {
        "aft-full-blocked"
    }

    fn of(&self, _y: &Tensor, kv: &Tensor, bias: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (kv, dt) = (kv.detach(), self.dtype);
        let c = kv.dim(2)? / 2;
        let (k, v) = (kv.narrow(2, 0, c)?.to_dtype(dt)?, kv.narrow(2, c, c)?.to_dtype(dt)?);
        let w = Bias::new(&bias.detach(), self.factored, k.dim(1)?, dt)?;
        let [dk, dv, dw] = backward(&k, &v, &w, self.block, &self.saved, &dy.to_dtype(dt)?)?;
        let dkv = Tensor::cat(&[dk, dv], 2)?.to_dtype(kv.dtype())?;
        Ok((Some(dkv), Some(dw.to_dtype(bias.dtype())?)))
    }
}

/// AFT-full's `num / den` (`[B, T, C]`) for `k, v: [B, T, C]` and `bias`: `w` over positions
/// `0..T` as `[T, T]`, or with `factored` as `[U; V]` (`[2T, d']`), in `k`'s dtype; keys in
/// blocks of `block` positions. Differentiable in `k`, `v` and `bias`.
pub fn blocked(k: &Tensor, v: &Tensor, bias: &Tensor, factored: bool, block: usize) -> Result<Tensor> {
    let t = k.dim(1)?;
    let run = |dtype: DType| -> Result<Saved> {
        let (k, v) = (k.detach().to_dtype(dtype)?, v.detach().to_dtype(dtype)?);
        forward(&k, &v, &Bias::new(&bias.detach(), factored, t, dtype)?, block)
    };
    let mut dtype = k.dtype();
    let mut saved = run(dtype)?;
    let mut values = saved.y.clone();
    if dtype != DType::F64 {
        let low = saved.den.lt(super::UNDERFLOW)?;
        if low.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? > 0.0 {
            // only the low elements take the f64 values, so that a later position's
            // underflow leaves the earlier outputs' bits alone (exact causality)
            let exact = run(DType::F64)?;
            values = low.where_cond(&exact.y.to_dtype(dtype)?, &saved.y)?;
            (dtype, saved) = (DType::F64, exact);
        }
    }
    let values = values.to_dtype(k.dtype())?.contiguous()?;
    let kv = Tensor::cat(&[k, v], 2)?;
    with_backward(&values, &kv, bias, BlockedGrad { factored, block, dtype, saved })
}
