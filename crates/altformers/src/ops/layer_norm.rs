//! Layer normalization over the last dimension on the CPU, one pass over each row forward
//! and one backward (the GPU's is [`crate::kernels::layernorm`]; [`crate::nn::LayerNorm`]
//! picks).
//!
//! `y = (x - mean) r w + b` with `r = 1 / sqrt(var + eps)` per row of width `d`. With
//! `xhat = (x - mean) r` and `h = g w` (`g` the output gradient):
//! `dx = r (h - mean(h) - xhat mean(h xhat))`, `dw = sum_rows g xhat`, `db = sum_rows g`.
//!
//! candle's expression of it (mean, subtract, square, mean, add, sqrt, divide, multiply,
//! add) walks the activations about nine times forward and twice that backward, each pass
//! into a new buffer; this op keeps each row's mean and `r` from the forward for the backward.
//! Statistics in f64; f32 or f64 tensors, the weight and bias of the activations' dtype.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use crate::cpu::{contiguous, lane_sum, lane_sum3, Real};
use rayon::prelude::*;

/// Whether [`layer_norm`] takes these inputs: f32 or f64 on the CPU, the weight (and bias)
/// of `x`'s dtype and its last dimension's width.
pub fn supports(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    let d = x.dims().last().copied().unwrap_or(0);
    let param = |t: &Tensor| t.dtype() == x.dtype() && t.dims() == [d] && t.device().is_cpu();
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && d > 0
        && param(weight)
        && bias.is_none_or(param)
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension; requires
/// [`supports`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if !supports(x, weight, bias) {
        candle_core::bail!(
            "CPU layer norm: unsupported inputs (x {:?} {:?} on {:?}, weight {:?} {:?})",
            x.dtype(),
            x.shape(),
            x.device().location(),
            weight.dtype(),
            weight.shape()
        )
    }
    let op = LayerNormOp { eps, has_bias: bias.is_some(), stats: Mutex::new(None) };
    // without a bias the weight stands in as the third argument (ignored, no gradient)
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.unwrap_or(weight).contiguous()?, op)
}

struct LayerNormOp {
    eps: f64,
    has_bias: bool,
    /// `(mean, r)` per row, from the forward.
    stats: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

/// Rows per rayon task.
const ROWS: usize = 64;

/// `y`, and each row's mean and `r`.
fn forward<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, d: usize, eps: f64) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / d;
    let mut y = vec![T::default(); x.len()];
    let (mut mean, mut r) = (vec![0.0; rows], vec![0.0; rows]);
    y.par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(mean.par_chunks_mut(ROWS).zip(r.par_chunks_mut(ROWS)))
        .for_each(|((ys, xs), (ms, rs))| forward_rows(ys, xs, ms, rs, w, b, eps));
    (y, mean, r)
}

crate::cpu::vectorised! {
    /// [`forward`] on a block of rows (`ms` and `rs` one per row).
    fn forward_rows<T: Real>(ys: &mut [T], xs: &[T], ms: &mut [f64], rs: &mut [f64], w: &[T], b: Option<&[T]>, eps: f64) -> () {
        let d = w.len();
        for (((y, x), m), r) in ys.chunks_mut(d).zip(xs.chunks(d)).zip(ms).zip(rs) {
            let mean = lane_sum(x, |v| v.wide()) / d as f64;
            let var = lane_sum(x, |v| (v.wide() - mean) * (v.wide() - mean)) / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            (*m, *r) = (mean, rstd);
            // one straight loop each way (a bias test inside would keep it scalar)
            match b {
                Some(b) => {
                    for (((o, &v), &wj), &bj) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *o = T::narrow((v.wide() - mean) * rstd * wj.wide() + bj.wide());
                    }
                }
                None => {
                    for ((o, &v), &wj) in y.iter_mut().zip(x).zip(w) {
                        *o = T::narrow((v.wide() - mean) * rstd * wj.wide());
                    }
                }
            }
        }
    }
}

/// `dx`, `dw` and `db` (see the module doc).
fn backward<T: Real>(
    x: &[T],
    g: &[T],
    w: &[T],
    (mean, r): &(Vec<f64>, Vec<f64>),
    d: usize,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![T::default(); x.len()];
    let (dw, db) = dx
        .par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d).zip(g.par_chunks(ROWS * d)))
        .zip(mean.par_chunks(ROWS).zip(r.par_chunks(ROWS)))
        .map(|((dxs, (xs, gs)), (ms, rs))| {
            let (mut dw, mut db) = (vec![0.0; d], vec![0.0; d]);
            backward_rows(dxs, xs, gs, ms, rs, w, &mut dw, &mut db);
            (dw, db)
        })
        .reduce(
            || (vec![0.0; d], vec![0.0; d]),
            |(mut aw, mut ab), (bw, bb)| {
                aw.iter_mut().zip(&bw).for_each(|(a, b)| *a += b);
                ab.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                (aw, ab)
            },
        );
    (dx, dw, db)
}

crate::cpu::vectorised! {
    /// [`backward`] on a block of rows, adding the block's `dw` and `db` into those given.
    #[allow(clippy::too_many_arguments)]
    fn backward_rows<T: Real>(dxs: &mut [T], xs: &[T], gs: &[T], ms: &[f64], rs: &[f64], w: &[T], dw: &mut [f64], db: &mut [f64]) -> () {
        let d = w.len();
        let (dw, db) = (&mut dw[..d], &mut db[..d]);
        for ((((dx, x), g), &m), &r) in dxs.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)).zip(ms).zip(rs) {
            let mean_h = lane_sum3(g, w, x, |gj, wj, _| gj.wide() * wj.wide()) / d as f64;
            let mean_hx = lane_sum3(g, w, x, |gj, wj, xj| gj.wide() * wj.wide() * ((xj.wide() - m) * r)) / d as f64;
            let (x, g, dx) = (&x[..d], &g[..d], &mut dx[..d]);
            for j in 0..d {
                let (gj, xhat) = (g[j].wide(), (x[j].wide() - m) * r);
                dw[j] += gj * xhat;
                db[j] += gj;
                dx[j] = T::narrow(r * (gj * w[j].wide() - mean_h - xhat * mean_hx));
            }
        }
    }
}

/// The backward's `dx` (shaped as `x`), `dw` and `db` from the tensors' CPU data.
fn gradients<T: Real>(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    stats: &(Vec<f64>, Vec<f64>),
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let names = [
        "CPU layer norm backward: x",
        "CPU layer norm backward: the output gradient",
        "CPU layer norm backward: weight",
    ];
    let (dx, dw, db) =
        crate::cpu::with_slices::<T, _>(&[x, g, w], &names, |d| backward(d[0], d[1], d[2], stats, w.elem_count()))?;
    Ok((Tensor::from_vec(dx, x.shape(), &Device::Cpu)?, dw, db))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "cpu-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = xl.shape().dims().last().copied().unwrap_or(1);
        let (y, stats) = match (xs, ws, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let b = self.has_bias.then(|| contiguous(b, bl, "CPU layer norm: bias")).transpose()?;
                let (y, m, r) = forward(
                    contiguous(x, xl, "CPU layer norm: x")?,
                    contiguous(w, wl, "CPU layer norm: weight")?,
                    b,
                    d,
                    self.eps,
                );
                (CpuStorage::F32(y), (m, r))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let b = self.has_bias.then(|| contiguous(b, bl, "CPU layer norm: bias")).transpose()?;
                let (y, m, r) = forward(
                    contiguous(x, xl, "CPU layer norm: x")?,
                    contiguous(w, wl, "CPU layer norm: weight")?,
                    b,
                    d,
                    self.eps,
                );
                (CpuStorage::F64(y), (m, r))
            }
            _ => candle_core::bail!("CPU layer norm: x, weight and bias must share f32 or f64"),
        };
        *self.stats.lock().expect("layer norm: stats lock poisoned") = Some(stats);
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("layer norm: stats lock poisoned");
        let Some(stats) = stats.as_ref() else {
            candle_core::bail!("CPU layer norm backward: no forward statistics held")
        };
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let param = |v: Vec<f64>| Tensor::from_vec(v, weight.elem_count(), &Device::Cpu)?.to_dtype(x.dtype());
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => gradients::<f32>(x, &grad, weight, stats)?,
            DType::F64 => gradients::<f64>(x, &grad, weight, stats)?,
            dtype => candle_core::bail!("CPU layer norm backward: {dtype:?} is not f32 or f64"),
        };
        let db = if self.has_bias { Some(param(db)?) } else { None };
        Ok((Some(dx), Some(param(dw)?), db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Var, D};

    /// The tensor expression the op replaces.
    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Forward and every gradient equal the tensor expression's (f64, with and without a
    /// bias, rows not a multiple of a task's).
    #[test]
    fn matches_the_tensor_expression_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0.5f64, 2.0, (3, 70, 24), &dev)?))?;
        let w = Var::from_tensor(&Tensor::randn(1f64, 0.3, 24, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.3, 24, &dev)?)?;
        let g = Tensor::randn(0f64, 1.0, (3, 70, 24), &dev)?;
        for bias in [Some(b.as_tensor()), None] {
            let ours = layer_norm(&x, &w, bias, 1e-5)?;
            let theirs = reference(&x, &w, bias, 1e-5)?;
            assert!(max_abs_diff(&ours, &theirs)? < 1e-12, "forward");
            let go = (&ours * &g)?.sum_all()?.backward()?;
            let gt = (&theirs * &g)?.sum_all()?.backward()?;
            for (name, v) in [("x", x.as_tensor()), ("weight", w.as_tensor())] {
                let err = max_abs_diff(go.get(v).unwrap(), gt.get(v).unwrap())?;
                assert!(err < 1e-11, "d{name}: {err}");
            }
            match bias {
                Some(bt) => assert!(max_abs_diff(go.get(bt).unwrap(), gt.get(bt).unwrap())? < 1e-11, "dbias"),
                None => assert!(go.get(b.as_tensor()).is_none(), "no bias, no gradient for it"),
            }
        }
        Ok(())
    }

    /// f32 agrees to f32 rounding; inputs it cannot take are refused by [`supports`].
    #[test]
    fn f32_and_what_it_refuses() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 16), &dev)?;
        let w = Tensor::ones(16, DType::F32, &dev)?;
        let ours = layer_norm(&x, &w, None, 1e-5)?;
        assert!(max_abs_diff(&ours, &reference(&x, &w, None, 1e-5)?)? < 1e-5);
        assert!(!supports(&x.to_dtype(DType::BF16)?, &w, None), "bf16");
        assert!(!supports(&x, &w.to_dtype(DType::F64)?, None), "weight of another dtype");
        assert!(!supports(&x, &Tensor::ones(8, DType::F32, &dev)?, None), "weight of another width");
        assert!(layer_norm(&x.to_dtype(DType::BF16)?, &w, None, 1e-5).is_err());
        Ok(())
    }
}
