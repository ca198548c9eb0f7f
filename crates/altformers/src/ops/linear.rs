//! `x W^T` on the CPU as one node of the autograd graph (f32 and f64).
//!
//! Composed from candle's ops, a linear layer is four nodes: `x` reshaped to rows, `W^T` (a
//! transposed view), the product, the result reshaped back; and candle's backward adds every
//! node's first gradient to a fresh tensor of zeros, so each of them costs a zero fill and an
//! add pass the size of its output (for `W^T`, a strided add). On the CPU, at nanoGPT's CPU
//! shape, that accumulation was about a seventh of a training step
//! (`bench/results/2026-12-03-cpu-train-speed/`). Here the product is one node: the forward
//! is one `gemm` call reading `x` as rows and `W` transposed in place, and the backward makes
//! `dx = dy W` and `dW = dy^T x` directly in their own layouts, with the threads candle's
//! products use.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu::{product, Mat, Real};

/// Whether [`linear`] takes `x: [..., in]` and `weight: [out, in]`: CPU tensors of one dtype,
/// f32 or f64, non-empty, unless switched off (`ALTFORMERS_UNFUSED=linear`).
pub fn supports(x: &Tensor, weight: &Tensor) -> bool {
    let dtype_ok = matches!(x.dtype(), DType::F32 | DType::F64) && weight.dtype() == x.dtype();
    let shape_ok = weight.rank() == 2 && x.rank() >= 1 && x.dims().last() == weight.dims().get(1);
    x.device().is_cpu()
        && dtype_ok
        && shape_ok
        && x.elem_count() > 0
        && weight.elem_count() > 0
        && crate::kernels::enabled("linear")
}

/// `x W^T`: `x: [..., in]`, `weight: [out, in]` (any strides) -> `[..., out]`, contiguous.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // the rows of x at one stride (a copy only where x is not contiguous)
    x.contiguous()?.apply_op2(weight, CpuLinear)
}

struct CpuLinear;

/// `[rows, cols]` of a contiguous tensor whose last dimension is `cols`.
fn rows_of(layout: &Layout) -> (usize, usize) {
    let cols = *layout.dims().last().unwrap_or(&1);
    (layout.shape().elem_count() / cols.max(1), cols)
}

/// A 2-D layout as a matrix over `data`, after checking that it stays inside it (the
/// products read through raw pointers).
fn matrix<T>(data: &[T], layout: &Layout, what: &str) -> Result<Mat<T>> {
    let (dims, stride) = (layout.dims(), layout.stride());
    if dims.len() != 2 {
        candle_core::bail!("CPU linear: {what} must be a matrix, not {dims:?}")
    }
    let last = layout.start_offset() + (dims[0] - 1) * stride[0] + (dims[1] - 1) * stride[1];
    if last >= data.len() {
        candle_core::bail!("CPU linear: {what} reaches element {last} of a storage of {}", data.len())
    }
    Ok(Mat { ptr: data[layout.start_offset()..].as_ptr(), rs: stride[0] as isize, cs: stride[1] as isize })
}

/// `x` as contiguous rows `[m, in]` over its data.
fn rows<T>(data: &[T], layout: &Layout, what: &str) -> Result<(Mat<T>, usize, usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("CPU linear: {what} must be contiguous")
    };
    let (m, k) = rows_of(layout);
    Ok((Mat::dense(&data[start..end], k), m, k))
}

impl CpuLinear {
    fn forward<T: Real>(xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<Vec<T>> {
        let (x, m, k) = rows(xs.as_slice::<T>()?, xl, "x")?;
        let w = matrix(ws.as_slice::<T>()?, wl, "the weight")?;
        let n = wl.dims()[0];
        let mut y = vec![T::zero(); m * n];
        // SAFETY: x is m x k and w n x k, both checked; y holds m x n.
        unsafe { product(&mut y, n, false, x, w.t(), (m, n, k), T::one(), candle_core::utils::get_num_threads()) };
        Ok(y)
    }

    /// `(dx, dW)` from `x`, the weight and the output gradient `dy` (contiguous).
    fn backward<T: Real>(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let threads = candle_core::utils::get_num_threads();
        let (dx, dw) = {
            let guards = [x, w, dy].map(|t| t.storage_and_layout());
            let data = |i: usize| -> Result<&[T]> {
                match &*guards[i].0 {
                    candle_core::Storage::Cpu(cpu) => cpu.as_slice::<T>(),
                    _ => candle_core::bail!("CPU linear backward: an operand is not on the CPU"),
                }
            };
            let (xm, m, k) = rows(data(0)?, guards[0].1, "x")?;
            let wm = matrix(data(1)?, guards[1].1, "the weight")?;
            let (dym, _, n) = rows(data(2)?, guards[2].1, "the output gradient")?;
            let (mut dx, mut dw) = (vec![T::zero(); m * k], vec![T::zero(); n * k]);
            // SAFETY: every operand checked above; dx holds m x k and dW n x k.
            unsafe {
                product(&mut dx, k, false, dym, wm, (m, k, n), T::one(), threads);
                product(&mut dw, k, false, dym.t(), xm, (n, k, m), T::one(), threads);
            }
            (dx, dw)
        };
        Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dw, w.dims(), w.device())?))
    }
}

impl CustomOp2 for CpuLinear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = match xs.dtype() {
            DType::F32 => CpuStorage::F32(Self::forward::<f32>(xs, xl, ws, wl)?),
            DType::F64 => CpuStorage::F64(Self::forward::<f64>(xs, xl, ws, wl)?),
            dtype => candle_core::bail!("CPU linear: {dtype:?} unsupported (f32 or f64)"),
        };
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = wl.dims()[0];
        Ok((y, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let (dx, dw) = match x.dtype() {
            DType::F32 => Self::backward::<f32>(x, w, &dy)?,
            DType::F64 => Self::backward::<f64>(x, w, &dy)?,
            dtype => candle_core::bail!("CPU linear backward: {dtype:?} unsupported"),
        };
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, rel_err};
    use candle_core::Var;

    /// The fused product against candle's composed one: values and both gradients, for a
    /// batch of sequences and for a weight that is a row slice of a larger one (a fused
    /// projection's part, as `Linear::forward_parts` cuts it).
    #[test]
    fn matches_the_composed_product_and_its_gradients() -> anyhow::Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(&randn(&[3, 5, 7], 1, dtype)?)?;
            let full = Var::from_tensor(&randn(&[11, 7], 2, dtype)?)?;
            let w = full.as_tensor().narrow(0, 2, 6)?;
            let g = randn(&[3, 5, 6], 3, dtype)?;
            let fused = linear(x.as_tensor(), &w)?;
            let composed = x.as_tensor().broadcast_matmul(&w.t()?)?;
            assert!(rel_err(&fused, &composed)? < tol, "{dtype:?}");
            let gf = (fused * &g)?.sum_all()?.backward()?;
            let gc = (composed * &g)?.sum_all()?.backward()?;
            for (v, name) in [(&x, "x"), (&full, "the weight")] {
                let (a, b) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
                assert!(rel_err(a, b)? < tol, "{dtype:?} d{name}");
            }
            // the rows of the full weight outside the slice get no gradient
            let dfull = gf.get(full.as_tensor()).unwrap();
            assert_eq!(dfull.narrow(0, 0, 2)?.abs()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?, 0.0);
        }
        Ok(())
    }

    /// A non-contiguous input (a transposed view) is read as its values, not its storage order.
    #[test]
    fn reads_a_strided_input_by_value() -> anyhow::Result<()> {
        let x = randn(&[7, 4], 4, DType::F64)?.t()?;
        let w = randn(&[3, 7], 5, DType::F64)?;
        assert!(rel_err(&linear(&x, &w)?, &x.matmul(&w.t()?)?)? < 1e-13);
        Ok(())
    }
}
