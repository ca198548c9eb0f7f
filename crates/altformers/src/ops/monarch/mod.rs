//! Monarch matrices (Dao et al. 2022; Fu et al. 2023, "Monarch Mixer", arXiv 2310.12109):
//! the structured matrices M2 mixes sequences and channels with.
//!
//! For `N = m^2` a Monarch matrix is
//!
//! ```text
//! M = P L P^T R                 L = diag(L_0, ..., L_{m-1}),  R = diag(R_0, ..., R_{m-1})
//! ```
//!
//! with `L` and `R` block-diagonal of `m = sqrt(N)` blocks of `m x m`, and `P` the
//! reshape-transpose permutation: `(P x)[s m + q] = x[q m + s]` (view `x` as an `m x m`
//! matrix row by row, transpose it, read it row by row again; `P = P^T = P^{-1}`). Blocks are
//! stored `[m, m, m]` as `(block, out, in)`, the official `blockdiag_butterfly_multiply`'s
//! `w1_bfly` (`R`) and `w2_bfly` (`L`) layout; a `[m, m]` tensor stands for one block
//! repeated `m` times (the DFT's factors). A product costs `2 m N = 2 N^{3/2}` multiply-adds
//! per row, as two batched `m x m` matrix products: the GEMM form that makes it fast on tensor
//! cores.
//!
//! - [`blockdiag`]: `y = diag(W_0, ...) x`, the block-diagonal product alone (the official
//!   `blockdiag_multiply`, also the Monarch MLP's layer, [`crate::channel_mixers`]);
//! - [`permute`]: the reshape-transpose `P`;
//! - [`multiply`]: `M x`, both factors in two batched matrix products;
//! - [`dft`]: the DFT as a Monarch product (`F_N = P L P^T R P`, the four-step FFT), complex
//!   numbers as (real, imaginary) pairs, and the long convolutions of M2 evaluated with it:
//!   causal by zero padding to `n >= 2T` (the polynomial-evaluation view), and two-sided;
//! - [`naive`]: the explicitly assembled dense `P L P^T R`, the reference.
//!
//! Everything is made of differentiable candle operations (matrix products, transposes), so
//! the backward pass is autograd's, on any device and dtype candle's matmul takes.

pub mod dft;
pub mod naive;

use candle_core::{bail, Result, Tensor};

/// `x: [..., nb p]` -> `[..., nb q]`, each `p`-sized group of `x` times its block of `w`:
/// `w: [nb, q, p]` (`nb` blocks, `(out, in)`), or `w: [q, p]`, one block for every group.
pub fn blockdiag(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some(&n) = dims.last() else { bail!("monarch: blockdiag needs x of rank >= 1, got a scalar") };
    let rows = x.elem_count() / n.max(1);
    let mut out = dims.clone();
    let y = match w.dims() {
        &[q, p] if p > 0 && n.is_multiple_of(p) => {
            let nb = n / p;
            *out.last_mut().unwrap() = nb * q;
            x.reshape((rows * nb, p))?.matmul(&w.t()?)?
        }
        &[nb, q, p] if nb * p == n => {
            *out.last_mut().unwrap() = nb * q;
            let xt = x.reshape((rows, nb, p))?.transpose(0, 1)?.contiguous()?; // [nb, rows, p]
            xt.matmul(&w.transpose(1, 2)?)?.transpose(0, 1)? // [rows, nb, q]
        }
        other => bail!("monarch: blocks {other:?} do not fit x {dims:?} (need [nb, q, p] with nb p = {n}, or [q, p] with p dividing {n})"),
    };
    y.reshape(out)
}

/// The reshape-transpose permutation of the last dimension, `a b` long: viewed `[a, b]`
/// row by row, transposed to `[b, a]`. For `a = b = m` this is `P` (its own inverse).
pub fn permute(x: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.last() != Some(&(a * b)) {
        bail!("monarch: cannot permute {dims:?} as [{a}, {b}]");
    }
    let rows = x.elem_count() / (a * b).max(1);
    x.reshape((rows, a, b))?.transpose(1, 2)?.reshape(dims)
}

/// `m` for a Monarch matrix of size `n`, or an error if `n` is not a square.
pub fn side(n: usize) -> Result<usize> {
    let m = (n as f64).sqrt().round() as usize;
    if m * m != n || n == 0 {
        bail!("monarch: size {n} is not a positive square m^2 (sqrt(N) blocks of sqrt(N) x sqrt(N))");
    }
    Ok(m)
}

/// `y = P L P^T R x` for every row of `x: [..., m^2]`, with `l, r: [m, m, m]` (or `[m, m]`,
/// one block repeated). Two batched matrix products and three transposes.
pub fn multiply(x: &Tensor, l: &Tensor, r: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let m = side(*dims.last().unwrap_or(&0))?;
    for (name, w) in [("L", l), ("R", r)] {
        if !matches!(w.dims(), [b, q, p] if *b == m && *q == m && *p == m) && w.dims() != [m, m] {
            bail!("monarch: {name} is {:?}; a product of size {} needs [{m}, {m}, {m}] or [{m}, {m}]", w.dims(), m * m);
        }
    }
    let rows = x.elem_count() / (m * m);
    // [j, rows, p]: group j of every row, ready for block R_j
    let xt = x.reshape((rows, m, m))?.transpose(0, 1)?.contiguous()?;
    let y = batched(&xt, r)?; // [j, rows, q] = (R x) at flat index j m + q
                              // P^T regroups by q: block L_q takes entries q of every group j
    let z = y.transpose(0, 2)?.contiguous()?; // [q, rows, j]
    let w = batched(&z, l)?; // [q, rows, s] = (L P^T R x) at flat index q m + s
                             // P: output index s m + q
    w.permute((1, 2, 0))?.reshape(dims)
}

/// `x: [nb, rows, p]` times block `k` of `w` (`[nb, q, p]`, or `[q, p]` for all) -> `[nb, rows, q]`.
fn batched(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.rank() == 2 {
        let (nb, rows, p) = x.dims3()?;
        x.reshape((nb * rows, p))?.matmul(&w.t()?)?.reshape((nb, rows, w.dim(0)?))
    } else {
        x.matmul(&w.transpose(1, 2)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_gradients, randn, rel_err};
    use candle_core::{DType, Device};

    /// `P` is the reshape-transpose, pinned on a plain example.
    #[test]
    fn permutation_is_the_reshape_transpose() -> anyhow::Result<()> {
        let x = Tensor::arange(0f32, 9., &Device::Cpu)?;
        assert_eq!(permute(&x, 3, 3)?.to_vec1::<f32>()?, [0., 3., 6., 1., 4., 7., 2., 5., 8.]);
        assert_eq!(permute(&permute(&x, 3, 3)?, 3, 3)?.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
        let y = Tensor::arange(0f32, 6., &Device::Cpu)?;
        assert_eq!(permute(&y, 2, 3)?.to_vec1::<f32>()?, [0., 3., 1., 4., 2., 5.]);
        Ok(())
    }

    /// The product equals a dense matmul by the explicitly assembled `P L P^T R`, for several
    /// sizes and leading shapes, with distinct blocks and with one repeated block.
    #[test]
    fn product_equals_the_assembled_matrix() -> anyhow::Result<()> {
        for m in [1, 2, 3, 5, 8] {
            let n = m * m;
            for dtype in [DType::F32, DType::F64] {
                let (l, r) = (randn(&[m, m, m], 1 + m as u64, dtype)?, randn(&[m, m, m], 2 + m as u64, dtype)?);
                let x = randn(&[2, 3, n], 3, dtype)?;
                let dense = naive::assemble(&l, &r)?; // [n, n]
                let want = x.reshape((6, n))?.matmul(&dense.t()?)?.reshape((2, 3, n))?;
                let got = multiply(&x, &l, &r)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(rel_err(&got, &want)? < tol, "m {m} {dtype:?}");
                // one block repeated = that block in every position
                let (l0, r0) = (l.get(0)?, r.get(m - 1)?);
                let (lr, rr) = (l0.unsqueeze(0)?.repeat((m, 1, 1))?, r0.unsqueeze(0)?.repeat((m, 1, 1))?);
                assert!(rel_err(&multiply(&x, &l0, &r0)?, &multiply(&x, &lr, &rr)?)? < tol);
                // and the two halves: blockdiag alone is R, permute is P
                let bd = blockdiag(&x, &r)?;
                let dense_r = naive::assemble_blockdiag(&r)?;
                assert!(rel_err(&bd, &x.reshape((6, n))?.matmul(&dense_r.t()?)?.reshape((2, 3, n))?)? < tol);
            }
        }
        Ok(())
    }

    /// Rectangular blocks in `blockdiag` (the Monarch MLP's): `[nb, q, p]` maps `nb p` to `nb q`.
    #[test]
    fn blockdiag_with_rectangular_blocks() -> anyhow::Result<()> {
        let w = randn(&[4, 6, 2], 4, DType::F64)?;
        let x = randn(&[5, 8], 5, DType::F64)?;
        let want = x.matmul(&naive::assemble_blockdiag(&w)?.t()?)?;
        assert_eq!(want.dims(), &[5, 24]);
        assert!(rel_err(&blockdiag(&x, &w)?, &want)? < 1e-12);
        Ok(())
    }

    /// Gradients of `sum(g * M x)` in `x`, `L` and `R` against central finite differences
    /// (a large step is exact here: the product is linear in each coordinate).
    #[test]
    fn gradients_match_finite_differences() -> anyhow::Result<()> {
        for (m, shared) in [(2, false), (3, false), (4, true)] {
            let n = m * m;
            let w = if shared { vec![m, m] } else { vec![m, m, m] };
            let inputs = [randn(&[3, n], 6, DType::F64)?, randn(&w, 7, DType::F64)?, randn(&w, 8, DType::F64)?];
            let g = randn(&[3, n], 9, DType::F64)?;
            assert_gradients(&|t: &[Tensor]| (multiply(&t[0], &t[1], &t[2])? * &g)?.sum_all(), &inputs, 1e-3, 1e-5)?;
            let wb = randn(&[m, 2, m], 10, DType::F64)?;
            let gb = randn(&[3, 2 * m], 11, DType::F64)?;
            assert_gradients(
                &|t: &[Tensor]| (blockdiag(&t[0], &t[1])? * &gb)?.sum_all(),
                &[inputs[0].clone(), wb],
                1e-3,
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> anyhow::Result<()> {
        let x = randn(&[2, 8], 1, DType::F32)?;
        let b = randn(&[3, 3, 3], 2, DType::F32)?;
        let err = multiply(&x, &b, &b).unwrap_err().to_string();
        assert!(err.contains("not a positive square"), "{err}");
        let x = randn(&[2, 9], 1, DType::F32)?;
        assert!(multiply(&x, &randn(&[2, 3, 3], 3, DType::F32)?, &b)
            .unwrap_err()
            .to_string()
            .contains("L is [2, 3, 3]"));
        assert!(blockdiag(&x, &randn(&[2, 3, 4], 3, DType::F32)?).is_err());
        assert!(blockdiag(&x, &randn(&[3, 2], 3, DType::F32)?).is_err());
        assert!(permute(&x, 2, 4).is_err());
        Ok(())
    }
}
