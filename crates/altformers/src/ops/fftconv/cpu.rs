//! The CPU path of [`super::causal_conv`]: real FFTs (realfft, one cached planner per float
//! type) over rows spread across threads with rayon, f32 and f64. The three products (the
//! convolution and the two correlations of its backward pass) share the transforms.

use std::sync::{Arc, LazyLock, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex;
use rustfft::num_traits::Zero;
use rustfft::FftNum;

use super::fft_len;

/// One FFT product of two signals, as a CPU op (a `CustomOp2` on the two signals).
#[derive(Clone, Copy)]
pub(super) enum Product {
    /// `y = conv(x, h)`: `x: [B, C, T]`, `h: [C, L]` -> `[B, C, T]` (the forward).
    Conv,
    /// `dx = corr(dy, h)`: `dy: [B, C, T]`, `h: [C, L]` -> `[B, C, T]`.
    CorrInput,
    /// `dh = sum_b corr(dy, x)`: `dy: [B, C, T]`, `x: [B, C, T]` -> `[C, L]`.
    CorrFilter { l: usize },
}

impl Product {
    fn apply<F: Float>(self, a: &[F], b: &[F], (bs, c, t, l): (usize, usize, usize, usize)) -> Vec<F> {
        match self {
            Product::Conv => filter_product::<F, false>(a, b, c, t, l),
            Product::CorrInput => filter_product::<F, true>(a, b, c, t, l),
            Product::CorrFilter { .. } => corr_filter(a, b, bs, c, t, l),
        }
    }

    /// The product of two contiguous f32 or f64 storages, and its shape (`name`, the op's,
    /// in errors).
    pub(super) fn cpu(
        self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        name: &str,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, t) = l1.shape().dims3()?;
        let (l, shape) = match self {
            Product::CorrFilter { l } => {
                if l2.shape().dims() != [b, c, t] {
                    bail!("{name}: dy {:?} and x {:?} differ", l1.shape(), l2.shape());
                }
                (l, Shape::from((c, l)))
            }
            Product::Conv | Product::CorrInput => (l2.shape().dims2()?.1, Shape::from((b, c, t))),
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            bail!("{name}: inputs must be contiguous");
        };
        let dims = (b, c, t, l);
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(y)) => CpuStorage::F32(self.apply(&x[a0..a1], &y[b0..b1], dims)),
            (CpuStorage::F64(x), CpuStorage::F64(y)) => CpuStorage::F64(self.apply(&x[a0..a1], &y[b0..b1], dims)),
            _ => bail!("{name}: supports f32 and f64 on the CPU, got {:?} and {:?}", s1.dtype(), s2.dtype()),
        };
        Ok((out, shape))
    }
}

/// The gradients' products on the CPU ([`Product::CorrInput`], [`Product::CorrFilter`]), as
/// ops of their own (no gradient: the convolution's backward applies them).
pub(super) struct Backward(pub(super) Product);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self.0 {
            Product::Conv => "fftconv-causal-conv",
            Product::CorrInput => "fftconv-corr-input",
            Product::CorrFilter { .. } => "fftconv-corr-filter",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu(s1, l1, s2, l2, self.name())
    }
}

/// The float types the FFT path runs in, each with one shared (cached) planner.
trait Float: FftNum {
    fn plans(n: usize) -> (Arc<dyn RealToComplex<Self>>, Arc<dyn ComplexToReal<Self>>);
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            fn plans(n: usize) -> (Arc<dyn RealToComplex<$t>>, Arc<dyn ComplexToReal<$t>>) {
                static PLANNER: LazyLock<Mutex<RealFftPlanner<$t>>> =
                    LazyLock::new(|| Mutex::new(RealFftPlanner::new()));
                let mut p = PLANNER.lock().unwrap();
                (p.plan_fft_forward(n), p.plan_fft_inverse(n))
            }
        }
    };
}
float!(f32);
float!(f64);

/// Rows of FFT length `n` per parallel task: about 2^16 samples, so short sequences run in
/// one task instead of paying for thread hand-offs.
fn min_rows(n: usize) -> usize {
    (65536 / n.max(1)).max(1)
}

/// Spectra of `rows` signals of length `len` (`data: [rows, len]`), each zero-padded to `n`:
/// `[rows, n/2 + 1]`.
fn spectra<F: Float>(data: &[F], len: usize, n: usize, fwd: &Arc<dyn RealToComplex<F>>) -> Vec<Complex<F>> {
    let bins = n / 2 + 1;
    let rows = data.len() / len;
    let mut out = vec![Complex::zero(); rows * bins];
    out.par_chunks_mut(bins).zip(data.par_chunks(len)).with_min_len(min_rows(n)).for_each_init(
        || (vec![F::zero(); n], fwd.make_scratch_vec()),
        |(buf, scratch), (spec, row)| {
            buf[..len].copy_from_slice(row);
            buf[len..].iter_mut().for_each(|v| *v = F::zero());
            fwd.process_with_scratch(buf, spec, scratch).expect("realfft forward: buffer sizes");
        },
    );
    out
}

/// Inverse of [`spectra`] on `spec: [rows, n/2 + 1]`, scaled by 1/n, keeping the first
/// `keep` samples of each row: `[rows, keep]`.
fn signals<F: Float>(spec: &mut [Complex<F>], n: usize, keep: usize, inv: &Arc<dyn ComplexToReal<F>>) -> Vec<F> {
    let bins = n / 2 + 1;
    let rows = spec.len() / bins;
    let scale = F::one() / F::from_usize(n).unwrap();
    let mut out = vec![F::zero(); rows * keep];
    out.par_chunks_mut(keep).zip(spec.par_chunks_mut(bins)).with_min_len(min_rows(n)).for_each_init(
        || (vec![F::zero(); n], inv.make_scratch_vec()),
        |(buf, scratch), (row, s)| {
            // Spectra of real signals: the DC (and, for even n, Nyquist) bins are real; clear
            // the rounding left in their imaginary parts, which realfft rejects.
            s[0].im = F::zero();
            if n.is_multiple_of(2) {
                s[bins - 1].im = F::zero();
            }
            inv.process_with_scratch(s, buf, scratch).expect("realfft inverse: buffer sizes");
            for (o, v) in row.iter_mut().zip(buf.iter()) {
                *o = *v * scale;
            }
        },
    );
    out
}

/// `y[b, c] = irfft(rfft(x[b, c]) rfft(h[c]))[..T]` (the convolution), or with `CONJ`
/// `dx[b, c] = irfft(rfft(dy[b, c]) conj(rfft(h[c])))[..T]` (the correlation with `h`).
fn filter_product<F: Float, const CONJ: bool>(x: &[F], h: &[F], c: usize, t: usize, l: usize) -> Vec<F> {
    let n = fft_len(t, l);
    let (fwd, inv) = F::plans(n);
    let bins = n / 2 + 1;
    let hs = spectra(h, l, n, &fwd);
    let mut xs = spectra(x, t, n, &fwd);
    xs.par_chunks_mut(bins).enumerate().with_min_len(min_rows(n)).for_each(|(row, s)| {
        let hc = &hs[(row % c) * bins..(row % c + 1) * bins];
        s.iter_mut().zip(hc).for_each(|(a, b)| *a = *a * if CONJ { b.conj() } else { *b });
    });
    signals(&mut xs, n, t, &inv)
}

/// `dh[c] = irfft(sum_b rfft(dy[b, c]) conj(rfft(x[b, c])))[..L]`.
fn corr_filter<F: Float>(dy: &[F], x: &[F], b: usize, c: usize, t: usize, l: usize) -> Vec<F> {
    let n = fft_len(t, l);
    let (fwd, inv) = F::plans(n);
    let bins = n / 2 + 1;
    let ds = spectra(dy, t, n, &fwd);
    let xs = spectra(x, t, n, &fwd);
    let mut acc = vec![Complex::<F>::zero(); c * bins];
    acc.par_chunks_mut(bins).enumerate().with_min_len(min_rows(n / b.max(1))).for_each(|(ch, a)| {
        for bi in 0..b {
            let row = (bi * c + ch) * bins;
            let (d, xr) = (&ds[row..row + bins], &xs[row..row + bins]);
            for ((a, d), xv) in a.iter_mut().zip(d).zip(xr) {
                *a = *a + *d * xv.conj();
            }
        }
    });
    signals(&mut acc, n, l, &inv)
}
