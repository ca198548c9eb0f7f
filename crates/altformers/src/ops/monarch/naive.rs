//! The reference of [`super::multiply`]: the dense matrix `P L P^T R`, assembled entry by
//! entry on the host from its definition (no reshapes shared with the fast form).

use candle_core::{bail, DType, Result, Tensor};

/// The dense `[nb q, nb p]` matrix of blocks `w: [nb, q, p]` placed along the diagonal.
pub fn assemble_blockdiag(w: &Tensor) -> Result<Tensor> {
    let (nb, q, p) = w.dims3()?;
    let v: Vec<Vec<Vec<f64>>> = w.to_dtype(DType::F64)?.to_vec3()?;
    let (rows, cols) = (nb * q, nb * p);
    let mut d = vec![0f64; rows * cols];
    for (k, block) in v.iter().enumerate() {
        for (i, row) in block.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                d[(k * q + i) * cols + k * p + j] = x;
            }
        }
    }
    Tensor::from_vec(d, (rows, cols), w.device())?.to_dtype(w.dtype())
}

/// The dense `[m^2, m^2]` permutation `P`: `(P x)[s m + q] = x[q m + s]`.
pub fn permutation(m: usize, like: &Tensor) -> Result<Tensor> {
    let n = m * m;
    let mut d = vec![0f64; n * n];
    for q in 0..m {
        for s in 0..m {
            d[(s * m + q) * n + q * m + s] = 1.0;
        }
    }
    Tensor::from_vec(d, (n, n), like.device())?.to_dtype(like.dtype())
}

/// The dense Monarch matrix `P L P^T R` of blocks `l, r: [m, m, m]`.
pub fn assemble(l: &Tensor, r: &Tensor) -> Result<Tensor> {
    let m = l.dim(0)?;
    if l.dims() != [m, m, m] || r.dims() != [m, m, m] {
        bail!("monarch: assemble needs L and R of [m, m, m], got {:?} and {:?}", l.dims(), r.dims());
    }
    let p = permutation(m, l)?;
    p.matmul(&assemble_blockdiag(l)?)?.matmul(&p.t()?)?.matmul(&assemble_blockdiag(r)?)
}
