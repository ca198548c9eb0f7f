//! Softmax over the causally visible keys, the probabilities of causal attention.
//!
//! `scores: [..., R, S]` where row `r` belongs to query position `r % queries` (several heads
//! may be stacked along the rows) and query `t` sees keys `s <= offset + t`. The result has
//! the scores' shape, zeros at the keys a query cannot see.
//!
//! The plain form adds a `[T, S]` mask of 0 / -inf and takes the softmax
//! ([`causal_softmax_reference`]): the CUDA path (the fused softmax kernel) and the
//! reference the fused CPU op is tested against. On the CPU that form builds the mask on the
//! host at every call (`T S` elements whatever the batch: at T = 8192 the mask is as large as
//! one sequence's scores, so at a fixed number of tokens per batch its share grows with T)
//! and walks the scores six times forward (add, max, subtract, exp, sum, divide) and more
//! backward. The fused op reads each row once, skips the invisible keys, and its backward is
//! one pass over `(p, dp)`: `ds = p (dp - sum(p dp))`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::contiguous;

/// Causal softmax of `scores` (see the module doc): fused on the CPU for f32 and f64 (bf16
/// and f16 are promoted to f32, the result cast back), the reference expression elsewhere.
pub fn causal_softmax(scores: &Tensor, queries: usize, offset: usize) -> Result<Tensor> {
    let rows = check(scores, queries)?;
    if !scores.device().is_cpu() || rows == 0 {
        return causal_softmax_reference(scores, queries, offset);
    }
    let op = CausalSoftmax { queries, offset };
    match scores.dtype() {
        DType::F32 | DType::F64 => scores.contiguous()?.apply_op1(op),
        dtype => scores.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)?.to_dtype(dtype),
    }
}

/// The tensor expression: a 0 / -inf mask added to the scores, then [`crate::nn::softmax`].
pub fn causal_softmax_reference(scores: &Tensor, queries: usize, offset: usize) -> Result<Tensor> {
    check(scores, queries)?;
    let dims = scores.dims().to_vec();
    let (r, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    // Query 0 sees keys 0..=offset: without keys beyond the last query's, nothing is masked.
    if s <= offset + 1 {
        return crate::nn::softmax(scores);
    }
    let mask = causal_mask(queries, s, offset, scores.dtype(), scores.device())?;
    let lead: usize = dims[..dims.len() - 2].iter().product::<usize>() * (r / queries);
    let masked = scores.reshape((lead, queries, s))?.broadcast_add(&mask)?.reshape(dims)?;
    crate::nn::softmax(&masked)
}

/// The number of rows, after checking the shape (`[..., R, S]`, `R` a multiple of `queries`).
fn check(scores: &Tensor, queries: usize) -> Result<usize> {
    let dims = scores.dims();
    if dims.len() < 2 || queries == 0 || !dims[dims.len() - 2].is_multiple_of(queries) {
        candle_core::bail!("causal softmax: scores {:?} need [..., R, S] with R a multiple of {queries} queries", dims);
    }
    Ok(scores.elem_count() / dims[dims.len() - 1].max(1))
}

/// `[T, S]`: 0 where key s is visible to query t (s <= offset + t), -inf elsewhere. The
/// last mask is kept per thread: training asks for the same one in every layer and step,
/// and on a GPU each fresh one is a synchronous upload.
pub fn causal_mask(t: usize, s: usize, offset: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    type Key = (usize, usize, usize, DType, candle_core::DeviceLocation);
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Key, Tensor)>> = const { std::cell::RefCell::new(None) };
    }
    let key: Key = (t, s, offset, dtype, dev.location());
    if let Some(m) = LAST.with(|c| c.borrow().as_ref().filter(|(k, _)| *k == key).map(|(_, m)| m.clone())) {
        return Ok(m);
    }
    let mut mask = vec![f32::NEG_INFINITY; t * s];
    for (i, row) in mask.chunks_mut(s).enumerate() {
        row[..visible(i, s, offset)].fill(0.0);
    }
    let m = Tensor::from_vec(mask, (t, s), dev)?.to_dtype(dtype)?;
    LAST.with(|c| *c.borrow_mut() = Some((key, m.clone())));
    Ok(m)
}

/// Keys query `q` sees out of `s`.
fn visible(q: usize, s: usize, offset: usize) -> usize {
    (offset + q + 1).min(s)
}

struct CausalSoftmax {
    queries: usize,
    offset: usize,
}

/// `(p, dp) -> p (dp - sum(p dp))` row by row, over the visible keys.
struct CausalSoftmaxGrad {
    queries: usize,
    offset: usize,
}

/// The arithmetic the two ops need, for f32 and f64.
trait Float:
    Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn recip(self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn recip(self) -> Self {
                <$t>::recip(self)
            }
        }
    };
}
float!(f32);
float!(f64);

impl CausalSoftmax {
    fn rows<T: Float>(&self, x: &[T], s: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; x.len()];
        out.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().for_each(|(r, (out, x))| {
            let n = visible(r % self.queries, s, self.offset);
            let max = x[..n].iter().fold(T::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = T::ZERO;
            for (o, &v) in out[..n].iter_mut().zip(&x[..n]) {
                *o = (v - max).exp();
                sum = sum + *o;
            }
            let inv = sum.recip();
            out[..n].iter_mut().for_each(|o| *o = *o * inv);
        });
        out
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = *layout.shape().dims().last().unwrap_or(&1);
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.rows(contiguous(x, layout, "causal softmax: scores")?, s)),
            CpuStorage::F64(x) => CpuStorage::F64(self.rows(contiguous(x, layout, "causal softmax: scores")?, s)),
            _ => candle_core::bail!("causal softmax: f32 or f64 only on the CPU"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(probs.dtype())?.contiguous()?;
        let op = CausalSoftmaxGrad { queries: self.queries, offset: self.offset };
        Ok(Some(probs.contiguous()?.apply_op2_no_bwd(&grad, &op)?))
    }
}

impl CausalSoftmaxGrad {
    fn rows<T: Float>(&self, p: &[T], dp: &[T], s: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; p.len()];
        out.par_chunks_mut(s).zip(p.par_chunks(s).zip(dp.par_chunks(s))).enumerate().for_each(|(r, (out, (p, dp)))| {
            let n = visible(r % self.queries, s, self.offset);
            let dot = p[..n].iter().zip(&dp[..n]).fold(T::ZERO, |acc, (&a, &b)| acc + a * b);
            for ((o, &a), &b) in out[..n].iter_mut().zip(&p[..n]).zip(&dp[..n]) {
                *o = a * (b - dot);
            }
        });
        out
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = *pl.shape().dims().last().unwrap_or(&1);
        let out = match (ps, gs) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => CpuStorage::F32(self.rows(
                contiguous(p, pl, "causal softmax: probabilities")?,
                contiguous(g, gl, "causal softmax: gradient")?,
                s,
            )),
            (CpuStorage::F64(p), CpuStorage::F64(g)) => CpuStorage::F64(self.rows(
                contiguous(p, pl, "causal softmax: probabilities")?,
                contiguous(g, gl, "causal softmax: gradient")?,
                s,
            )),
            _ => candle_core::bail!("causal softmax backward: probabilities and gradient must share f32 or f64"),
        };
        Ok((out, pl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, rel_err};
    use candle_core::{Device, Var};

    /// Fused and reference forms agree in value and gradient, for stacked heads (R = 3 T),
    /// with and without an offset (queries after a cached prefix: S = T + offset), in f32
    /// and f64; the invisible keys get exactly zero probability and every row sums to 1.
    #[test]
    fn fused_equals_reference_values_and_gradients() -> anyhow::Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (t, offset) in [(1, 0), (5, 0), (7, 3), (16, 0)] {
                let s = t + offset;
                let x = Var::from_tensor(&(randn(&[2, 3 * t, s], 11 + t as u64, dtype)? * 3.0)?)?;
                let w = randn(&[2, 3 * t, s], 99, dtype)?;
                let fused = causal_softmax(x.as_tensor(), t, offset)?;
                let reference = causal_softmax_reference(x.as_tensor(), t, offset)?;
                assert!(rel_err(&fused, &reference)? < tol, "values, t {t} offset {offset} {dtype:?}");
                let p: Vec<Vec<Vec<f64>>> = fused.to_dtype(DType::F64)?.to_vec3()?;
                for (r, row) in p[1].iter().enumerate() {
                    let n = visible(r % t, s, offset);
                    assert!(row[n..].iter().all(|&v| v == 0.0), "row {r} sees beyond key {n}");
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < tol, "row {r} sums to 1");
                }
                let g_fused = (fused * &w)?.sum_all()?.backward()?.get(&x).unwrap().clone();
                let g_ref = (reference * &w)?.sum_all()?.backward()?.get(&x).unwrap().clone();
                assert!(rel_err(&g_fused, &g_ref)? < tol, "gradients, t {t} offset {offset} {dtype:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn rows_not_a_multiple_of_the_queries_are_an_error() {
        let x = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        let err = causal_softmax(&x, 2, 0).unwrap_err().to_string();
        assert!(err.contains("multiple of 2 queries"), "{err}");
    }
}
