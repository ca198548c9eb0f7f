//! The DFT as a Monarch product, and M2's long convolutions evaluated with it.
//!
//! For `n = m^2`, index the input `j = j1 m + j2` and the output `k = k1 + m k2`
//! (`j1, j2, k1, k2 < m`). Since `w_n^{m^2} = 1` (`w_n = e^{-2 pi i / n}`),
//!
//! ```text
//! X[k1 + m k2] = sum_{j2} w_m^{k2 j2} w_n^{k1 j2} sum_{j1} w_m^{k1 j1} x[j1 m + j2]
//! ```
//!
//! which is `F_n = P L P^T R P` (the four-step FFT): `P` brings every stride-`m` group of `x`
//! together, `R = diag(F_m, ..., F_m)` transforms each (the inner sum), `P^T` regroups by
//! `k1`, and `L = diag(F_m D_0, ..., F_m D_{m-1})` applies the twiddles
//! `D_{k1} = diag(w_n^{k1 j2})` and the outer sum; the last `P` puts `k1 + m k2` in natural
//! order. So the DFT is the Monarch matrix `P L P^T R` applied to `P x`, and [`Dft::blocks`]
//! gives `L` and `R` as explicit blocks for [`multiply_complex`]. [`Dft::apply`] evaluates the
//! same product with `F_m` as one repeated block and the twiddles as a diagonal (`m^2 + n`
//! numbers instead of `2 m^3`). Complex numbers are (real, imaginary) pairs of tensors
//! ([`Complex`]).
//!
//! Convolution (M2's polynomial-evaluation view). The causal convolution of `x` (`T` inputs)
//! with `h` (`L <= T` taps used) is the product of the polynomials `x(z) = sum_t x_t z^t` and
//! `h(z)`, of degree under `T + L - 1`. Evaluating both at the `n`-th roots of unity (a DFT),
//! multiplying, and interpolating back (the inverse DFT) gives its coefficients exactly when
//! `n >= T + L`: no coefficient wraps around, so output `t` depends on inputs `<= t` only,
//! exactly as a function (its rounding depends on the whole transform, as any FFT's does).
//! [`causal_conv`] pads to the smallest square `n >= T + L` (`>= 2T` for a full-length filter).
//! [`two_sided_conv`] places a second, anti-causal filter at the end of the same length-`n`
//! kernel, as the official M2-BERT builds its bidirectional kernel (`pad(k_fwd, (0, L)) +
//! pad(k_rev.flip(-1), (L, 0))`).

use candle_core::{bail, DType, Device, Result, Tensor};

use super::{blockdiag, permute, side};

/// A complex tensor as its real and imaginary parts; `im: None` for a real one (products then
/// skip the zero half).
#[derive(Clone, Debug)]
pub struct Complex {
    pub re: Tensor,
    pub im: Option<Tensor>,
}

impl Complex {
    pub fn real(re: Tensor) -> Self {
        Self { re, im: None }
    }

    /// A real-linear map (reshape, permutation, narrowing) applied to both parts.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { re: f(&self.re)?, im: self.im.as_ref().map(f).transpose()? })
    }

    /// Elementwise product, broadcasting as candle's `broadcast_mul` does.
    pub fn mul(&self, o: &Complex) -> Result<Complex> {
        let (a, c) = (&self.re, &o.re);
        let re = a.broadcast_mul(c)?;
        Ok(match (&self.im, &o.im) {
            (None, None) => Complex::real(re),
            (Some(b), None) => Complex { re, im: Some(b.broadcast_mul(c)?) },
            (None, Some(d)) => Complex { re, im: Some(a.broadcast_mul(d)?) },
            (Some(b), Some(d)) => Complex {
                re: re.broadcast_sub(&b.broadcast_mul(d)?)?,
                im: Some(a.broadcast_mul(d)?.broadcast_add(&b.broadcast_mul(c)?)?),
            },
        })
    }
}

/// [`blockdiag`] with complex blocks; only the real part of the result with `re_only`.
fn blockdiag_complex(x: &Complex, w: &Complex, re_only: bool) -> Result<Complex> {
    let mut re = blockdiag(&x.re, &w.re)?;
    if let (Some(xi), Some(wi)) = (&x.im, &w.im) {
        re = (re - blockdiag(xi, wi)?)?;
    }
    let im = if re_only {
        None
    } else {
        match (&x.im, &w.im) {
            (None, None) => None,
            (Some(xi), None) => Some(blockdiag(xi, &w.re)?),
            (None, Some(wi)) => Some(blockdiag(&x.re, wi)?),
            (Some(xi), Some(wi)) => Some((blockdiag(&x.re, wi)? + blockdiag(xi, &w.re)?)?),
        }
    };
    Ok(Complex { re, im })
}

/// `L diag(d) P^T R x` with complex factors (`d` optional: a diagonal folded into `L`): the
/// Monarch product but its last permutation.
fn product(x: &Complex, l: &Complex, d: Option<&Complex>, r: &Complex, re_only: bool) -> Result<Complex> {
    let m = side(x.re.dims().last().copied().unwrap_or(0))?;
    let z = blockdiag_complex(x, r, false)?.map(|t| permute(t, m, m))?;
    let z = match d {
        Some(d) => z.mul(d)?,
        None => z,
    };
    blockdiag_complex(&z, l, re_only)
}

/// The Monarch product `P L P^T R x` ([`super::multiply`]) with complex `x: [..., m^2]` and
/// complex blocks `l, r: [m, m, m]` (or `[m, m]`).
pub fn multiply_complex(x: &Complex, l: &Complex, r: &Complex) -> Result<Complex> {
    let m = side(x.re.dims().last().copied().unwrap_or(0))?;
    product(x, l, None, r, false)?.map(|t| permute(t, m, m))
}

/// The factors of the length-`n` DFT (`n = m^2`): `F_m` and the twiddles.
pub struct Dft {
    m: usize,
    /// `F_m[k, j] = w^{kj}`, `[m, m]`.
    f: Complex,
    /// `w_n^{k1 j2}` at index `k1 m + j2`, `[n]`.
    twiddle: Complex,
}

impl Dft {
    /// The forward transform of length `n` (`w = e^{-2 pi i / n}`), or with `inverse` the
    /// unnormalised inverse (`w = e^{+2 pi i / n}`: `n x = inverse(forward(x))`), in `dtype`
    /// on `device`.
    pub fn new(n: usize, inverse: bool, dtype: DType, device: &Device) -> Result<Self> {
        let m = side(n)?;
        let sign = if inverse { 1.0 } else { -1.0 };
        // angles from exact integer residues: accurate for any n
        let root = |k: usize, j: usize, len: usize| {
            let a = sign * 2.0 * std::f64::consts::PI * ((k * j) % len) as f64 / len as f64;
            (a.cos(), a.sin())
        };
        let table = |len: usize, pairs: Vec<(usize, usize)>, dims: &[usize]| -> Result<Complex> {
            let (re, im): (Vec<f64>, Vec<f64>) = pairs.into_iter().map(|(k, j)| root(k, j, len)).unzip();
            let t = |v: Vec<f64>| Tensor::from_vec(v, dims, device)?.to_dtype(dtype);
            Ok(Complex { re: t(re)?, im: Some(t(im)?) })
        };
        let grid: Vec<(usize, usize)> = (0..m).flat_map(|k| (0..m).map(move |j| (k, j))).collect();
        Ok(Self { m, f: table(m, grid.clone(), &[m, m])?, twiddle: table(n, grid, &[n])? })
    }

    /// `L` and `R` as explicit blocks `[m, m, m]`: `L_k = F_m D_k`, `R_j = F_m`, so that the
    /// transform of `x` is `multiply_complex(P x, L, R)`.
    pub fn blocks(&self) -> Result<(Complex, Complex)> {
        let m = self.m;
        let l = self.f.map(|t| t.unsqueeze(0)?.broadcast_as((m, m, m))?.contiguous())?;
        let l = l.mul(&self.twiddle.map(|t| t.reshape((m, 1, m)))?)?;
        let r = self.f.map(|t| t.unsqueeze(0)?.repeat((m, 1, 1)))?;
        Ok((l, r))
    }

    /// The transform of every row of `x: [..., n]`, through `P`, then the Monarch product
    /// (`F_m` repeated, the twiddles as a diagonal); only the real part with `re_only`.
    pub fn apply(&self, x: &Complex, re_only: bool) -> Result<Complex> {
        let m = self.m;
        self.from_spectrum(&x.map(|t| permute(t, m, m))?, re_only)
    }

    /// The transform of `x` in transposed order (`X[k1 + m k2]` at index `k1 m + k2`): all of
    /// [`Dft::apply`] but the last `P`, which a spectral product does not need, and which
    /// [`Dft::from_spectrum`] of the inverse absorbs (its first `P` would undo it).
    pub fn spectrum(&self, x: &Complex) -> Result<Complex> {
        let m = self.m;
        product(&x.map(|t| permute(t, m, m))?, &self.f, Some(&self.twiddle), &self.f, false)
    }

    /// The transform of the signal `P w`, in natural order (so `w` may be a
    /// [`Dft::spectrum`], the transposed order); only the real part with `re_only`.
    pub fn from_spectrum(&self, w: &Complex, re_only: bool) -> Result<Complex> {
        let m = self.m;
        product(w, &self.f, Some(&self.twiddle), &self.f, re_only)?.map(|t| permute(t, m, m))
    }
}

/// The transform length for `t` inputs and `l` taps: the smallest square `m^2 >= t + l`.
pub fn conv_len(t: usize, l: usize) -> usize {
    let need = (t + l).max(1);
    let mut m = (need as f64).sqrt().floor() as usize;
    while m * m < need {
        m += 1;
    }
    m * m
}

/// Causal convolution by Monarch DFTs: `x: [B, C, T]`, per-channel filters `h: [C, L]` ->
/// `y[b, c, t] = sum_{s <= min(t, L-1)} h[c, s] x[b, c, t - s]`, `[B, C, T]` (the contract of
/// [`crate::ops::fftconv::causal_conv`]). f32 and f64; bf16 and f16 are transformed in f32.
pub fn causal_conv(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    long_conv(x, h, None)
}

/// Causal plus anti-causal convolution: `y[t] = sum_s h[s] x[t - s] + sum_j h_rev[j] x[t + 1 + j]`
/// (`h_rev`'s first tap weighs the next position; the present is `h`'s alone), `x: [B, C, T]`,
/// `h, h_rev: [C, L]` -> `[B, C, T]`.
pub fn two_sided_conv(x: &Tensor, h: &Tensor, h_rev: &Tensor) -> Result<Tensor> {
    long_conv(x, h, Some(h_rev))
}

fn long_conv(x: &Tensor, h: &Tensor, h_rev: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, t) = x.dims3()?;
    for f in std::iter::once(h).chain(h_rev) {
        let (fc, fl) = f.dims2()?;
        if fc != c || fl == 0 || t == 0 {
            bail!(
                "monarch conv: filters {:?} do not fit input {:?} (need [C, L >= 1] for x [B, C, T >= 1])",
                f.dims(),
                x.dims()
            );
        }
        if f.dtype() != x.dtype() {
            bail!("monarch conv: x is {:?} but a filter is {:?}", x.dtype(), f.dtype());
        }
    }
    let dtype = x.dtype();
    if matches!(dtype, DType::BF16 | DType::F16) {
        // half precision is too coarse for long transforms
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let rev = h_rev.map(f32).transpose()?;
        return long_conv(&f32(x)?, &f32(h)?, rev.as_ref())?.to_dtype(dtype);
    }
    // taps at or past T reach no output
    let h = h.narrow(1, 0, h.dim(1)?.min(t))?;
    let h_rev = h_rev.map(|r| r.narrow(1, 0, r.dim(1)?.min(t))).transpose()?;
    let l = h.dim(1)?.max(h_rev.as_ref().map_or(0, |r| r.dim(1).unwrap_or(0)));
    let n = conv_len(t, l);
    // the kernel: causal taps from the start, anti-causal ones reversed at the end (tap j at
    // n - 1 - j, i.e. offset -(j + 1) around the circle)
    let mut parts = vec![h.clone()];
    let used = h.dim(1)? + h_rev.as_ref().map_or(0, |r| r.dim(1).unwrap_or(0));
    parts.push(Tensor::zeros((c, n - used), dtype, x.device())?);
    if let Some(r) = &h_rev {
        let len = r.dim(1)?;
        let rev = Tensor::from_vec((0..len as u32).rev().collect::<Vec<_>>(), len, x.device())?;
        parts.push(r.index_select(&rev, 1)?);
    }
    let kernel = Tensor::cat(&parts, 1)?; // [C, n]
    let forward = Dft::new(n, false, dtype, x.device())?;
    // spectra in transposed order: the product is elementwise, and the inverse takes it so
    let xs = forward.spectrum(&Complex::real(x.pad_with_zeros(2, 0, n - t)?))?; // [B, C, n]
    let ks = forward.spectrum(&Complex::real(kernel))?; // [C, n]
    let inverse = Dft::new(n, true, dtype, x.device())?;
    let y = inverse.from_spectrum(&xs.mul(&ks)?, true)?.re; // n y, [B, C, n]
    debug_assert_eq!(y.dims(), &[b, c, n]);
    y.narrow(2, 0, t)? * (1.0 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fftconv::{anti_causal_conv, causal_conv_direct};
    use crate::testing::{assert_gradients, randn, rel_err};

    /// The DFT by its definition, on the host in f64: `[rows, n]` re and im.
    fn naive_dft(re: &[f64], im: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut or, mut oi) = (vec![0.0; re.len()], vec![0.0; re.len()]);
        for row in 0..re.len() / n {
            for k in 0..n {
                for j in 0..n {
                    let a = -2.0 * std::f64::consts::PI * ((k * j) % n) as f64 / n as f64;
                    let (xr, xi) = (re[row * n + j], im[row * n + j]);
                    or[row * n + k] += xr * a.cos() - xi * a.sin();
                    oi[row * n + k] += xr * a.sin() + xi * a.cos();
                }
            }
        }
        (or, oi)
    }

    fn values(t: &Tensor) -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
    }

    /// With the DFT's factors as its blocks, the Monarch product of `P x` is the DFT of `x`
    /// (explicit blocks through `multiply_complex`, and the repeated-block form through
    /// `Dft::apply`), against the definition; the inverse undoes it.
    #[test]
    fn dft_factors_as_blocks_give_the_dft() -> anyhow::Result<()> {
        for m in [1, 2, 3, 4, 5, 8] {
            let n = m * m;
            for dtype in [DType::F32, DType::F64] {
                let x = Complex { re: randn(&[3, n], 1, dtype)?, im: Some(randn(&[3, n], 2, dtype)?) };
                let (want_re, want_im) = naive_dft(&values(&x.re)?, &values(x.im.as_ref().unwrap())?, n);
                let want = (Tensor::new(want_re, &Device::Cpu)?, Tensor::new(want_im, &Device::Cpu)?);
                let dft = Dft::new(n, false, dtype, &Device::Cpu)?;
                let (l, r) = dft.blocks()?;
                let explicit = multiply_complex(&x.map(|t| permute(t, m, m))?, &l, &r)?;
                let fast = dft.apply(&x, false)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                for got in [&explicit, &fast] {
                    assert!(rel_err(&got.re.flatten_all()?, &want.0)? < tol, "m {m} {dtype:?} re");
                    assert!(rel_err(&got.im.as_ref().unwrap().flatten_all()?, &want.1)? < tol, "m {m} {dtype:?} im");
                }
                let back = Dft::new(n, true, dtype, &Device::Cpu)?.apply(&fast, false)?;
                assert!(rel_err(&(back.re / n as f64)?, &x.re)? < tol, "m {m}: inverse");
            }
        }
        Ok(())
    }

    /// The complex product with real parts only is the real product (held to the dense matrix
    /// in `super::tests`).
    #[test]
    fn complex_product_of_real_factors_is_the_real_product() -> anyhow::Result<()> {
        let (l, r, x) =
            (randn(&[3, 3, 3], 1, DType::F64)?, randn(&[3, 3, 3], 2, DType::F64)?, randn(&[4, 9], 3, DType::F64)?);
        let c = multiply_complex(&Complex::real(x.clone()), &Complex::real(l.clone()), &Complex::real(r.clone()))?;
        assert!(c.im.is_none());
        assert!(rel_err(&c.re, &super::super::multiply(&x, &l, &r)?)? < 1e-14);
        Ok(())
    }

    #[test]
    fn conv_lengths_are_squares_long_enough() {
        assert_eq!(conv_len(1, 1), 4);
        assert_eq!(conv_len(8, 8), 16);
        assert_eq!(conv_len(1024, 1024), 2116);
        assert_eq!(conv_len(8192, 8192), 16384);
        assert_eq!(conv_len(24, 24), 49);
    }

    /// The causal Monarch convolution equals the direct convolution for filters shorter,
    /// as long as and longer than the input.
    #[test]
    fn causal_conv_equals_direct_convolution() -> anyhow::Result<()> {
        for (t, l) in [(1, 1), (7, 7), (64, 64), (300, 300), (64, 5), (13, 40)] {
            for dtype in [DType::F32, DType::F64] {
                let x = randn(&[2, 3, t], t as u64, dtype)?;
                let h = randn(&[3, l], 100 + l as u64, dtype)?;
                let err = rel_err(&causal_conv(&x, &h)?, &causal_conv_direct(&x, &h)?)?;
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
                assert!(err < tol, "T {t} L {l} {dtype:?}: {err}");
            }
        }
        let (x, h) = (randn(&[1, 2, 9], 1, DType::F32)?, randn(&[2, 9], 2, DType::F32)?);
        let half = causal_conv(&x.to_dtype(DType::BF16)?, &h.to_dtype(DType::BF16)?)?;
        assert_eq!(half.dtype(), DType::BF16);
        assert!(rel_err(&half, &causal_conv_direct(&x, &h)?)? < 3e-2);
        Ok(())
    }

    /// Causal as a function: in f64 later inputs move earlier outputs by rounding only
    /// (1e-12 of the output's scale, where a leaked tap would move them by O(1)), and do move
    /// later ones.
    #[test]
    fn causal_conv_is_causal() -> anyhow::Result<()> {
        let h = randn(&[3, 40], 5, DType::F64)?;
        let x = randn(&[2, 40, 3], 6, DType::F64)?; // [B, T, C] for the shared check
        let f = |x: &Tensor| -> anyhow::Result<Tensor> {
            Ok(causal_conv(&x.transpose(1, 2)?.contiguous()?, &h)?.transpose(1, 2)?)
        };
        crate::testing::assert_causal_within(&f, &x, 1e-12)
    }

    /// The two-sided convolution against its direct form (the causal part plus the reversed
    /// causal convolution of the input shifted by one), and by its definition at one point.
    #[test]
    fn two_sided_conv_equals_direct_convolution() -> anyhow::Result<()> {
        for (t, l) in [(1, 1), (9, 9), (50, 50), (30, 7)] {
            let x = randn(&[2, 3, t], 7, DType::F64)?;
            let (h, hr) = (randn(&[3, l], 8, DType::F64)?, randn(&[3, l], 9, DType::F64)?);
            let want = (causal_conv_direct(&x, &h)? + anti_causal_conv(&x, &hr, causal_conv_direct)?)?;
            let got = two_sided_conv(&x, &h, &hr)?;
            assert!(rel_err(&got, &want)? < 1e-12, "T {t} L {l}");
            // and by its definition at one point
            let (xv, hv, rv) = (values(&x)?, values(&h)?, values(&hr)?);
            let (c, tt) = (1, t / 2);
            let mut y = 0.0;
            for s in 0..l.min(tt + 1) {
                y += hv[c * l + s] * xv[c * t + tt - s];
            }
            for j in 0..l {
                if tt + 1 + j < t {
                    y += rv[c * l + j] * xv[c * t + tt + 1 + j];
                }
            }
            assert!((values(&got)?[c * t + tt] - y).abs() < 1e-10);
        }
        Ok(())
    }

    /// Central differences with a large step, exact for a function linear in each
    /// coordinate, so the check measures the gradient, not the rounding of the transforms.
    #[test]
    fn conv_gradients_match_finite_differences() -> anyhow::Result<()> {
        for (t, l) in [(1, 1), (6, 6), (11, 4)] {
            let inputs =
                [randn(&[2, 2, t], 1, DType::F64)?, randn(&[2, l], 2, DType::F64)?, randn(&[2, l], 3, DType::F64)?];
            let g = randn(&[2, 2, t], 4, DType::F64)?;
            assert_gradients(&|v: &[Tensor]| (causal_conv(&v[0], &v[1])? * &g)?.sum_all(), &inputs[..2], 1e-3, 1e-5)?;
            assert_gradients(
                &|v: &[Tensor]| (two_sided_conv(&v[0], &v[1], &v[2])? * &g)?.sum_all(),
                &inputs,
                1e-3,
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> anyhow::Result<()> {
        let x = randn(&[1, 3, 8], 1, DType::F32)?;
        assert!(causal_conv(&x, &randn(&[2, 8], 2, DType::F32)?).is_err());
        assert!(causal_conv(&x, &randn(&[3, 8], 2, DType::F64)?).is_err());
        assert!(two_sided_conv(&x, &randn(&[3, 8], 2, DType::F32)?, &randn(&[3, 0], 2, DType::F32)?).is_err());
        assert!(Dft::new(8, false, DType::F32, &Device::Cpu).is_err());
        Ok(())
    }
}
