//! Causal long convolution by FFT, with its gradients, and the direct convolution beside it.
//!
//! For `x: [B, C, T]` (batch, channel, time) and a per-channel filter `h: [C, L]`:
//!
//! ```text
//! y[b, c, t] = sum_{s = 0}^{min(t, L - 1)} h[c, s] * x[b, c, t - s]        y: [B, C, T]
//! ```
//!
//! [`causal_conv`] evaluates it in O(B C n log n) with real FFTs of length `n`, the smallest
//! 2^a 3^b 5^c 7^d at least `T + L` (so at least 2T for a filter as long as the input: the
//! zero padding makes the circular convolution linear, and only the first T outputs are
//! kept). It is a candle [`CustomOp2`] on `(x, h)` whose backward pass is two more FFT
//! products:
//!
//! ```text
//! dx[b, c, tau] = sum_t dy[b, c, t] h[c, t - tau]            (correlation of dy with h)
//! dh[c, s]      = sum_b sum_t dy[b, c, t] x[b, c, t - s]     (correlation of dy with x)
//! ```
//!
//! both again through zero-padded length-`n` FFTs (conjugated spectra), so training costs
//! O(B C n log n) too.
//!
//! Devices. On the CPU (f32 and f64; bf16 and f16 cast to f32 around the op) rows are spread
//! over threads with rayon. On CUDA (feature `cuda`) the same op runs cuFFT
//! ([`crate::kernels::fftconv`]): f32, bf16 and f16 inputs, transformed in f32, output and
//! gradients in the input dtype; `h`'s spectrum is computed once per call and shared by the
//! batch, and when a gradient is tracked the forward pass keeps the spectra of `x` and `h`
//! for the backward pass, which computes `dx` and `dh` from one transform of `dy` in a single
//! fused product kernel. f64 on CUDA, and other devices, fail with a message that says so.
//!
//! [`causal_conv_direct`] is the plain O(B C T^2) reference from differentiable candle ops
//! (a Toeplitz matrix per channel); the tests hold the FFT form and its gradients to it.

use std::sync::{Arc, LazyLock, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex;
use rustfft::num_traits::Zero;
use rustfft::FftNum;

/// Causal convolution of `x: [B, C, T]` with per-channel filters `h: [C, L]` -> `[B, C, T]`,
/// by FFT (see the module documentation). Differentiable in both arguments. f32 and f64 run
/// as they are; bf16 and f16 are transformed in f32 and the result cast back.
pub fn causal_conv(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let (_, c, _) = x.dims3()?;
    let (ch, l) = h.dims2()?;
    if ch != c || l == 0 {
        bail!("fftconv: filters {:?} do not fit input {:?} (need [C, L >= 1] for x [B, C, T])", h.dims(), x.dims());
    }
    if x.dtype() != h.dtype() {
        bail!("fftconv: x is {:?} but h is {:?}", x.dtype(), h.dtype());
    }
    if x.device().is_cuda() {
        // cuFFT path: half precision is cast to f32 inside the kernels, no casts here.
        if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            bail!("fftconv: on CUDA the FFT path supports f32, bf16 and f16, got {:?}", x.dtype());
        }
        // Keep the forward spectra for the backward pass only when one will follow.
        // (`..Default::default()` fills the CUDA build's saved spectra)
        #[allow(clippy::needless_update)]
        let op = CausalConv { keep: x.track_op() || h.track_op(), ..Default::default() };
        return x.contiguous()?.apply_op2(&h.contiguous()?, op);
    }
    if !x.device().is_cpu() {
        bail!(
            "fftconv: the FFT path runs on the CPU and on CUDA (feature `cuda`), got {:?}; causal_conv_direct runs on any device",
            x.device()
        );
    }
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        // Half precision is too coarse for long FFTs: transform in f32.
        return causal_conv(&x.to_dtype(DType::F32)?, &h.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    x.contiguous()?.apply_op2(&h.contiguous()?, CausalConv::default())
}

/// The direct reference: `y = Toeplitz(h) x` per channel, O(B C T^2), from differentiable
/// candle ops (any device, any float dtype). Same shapes and result as [`causal_conv`].
pub fn causal_conv_direct(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let (_, c, t) = x.dims3()?;
    let (_, l) = h.dims2()?;
    // Append one zero so every entry of the Toeplitz matrix is an index into `ext`.
    let ext = Tensor::cat(&[h, &Tensor::zeros((c, 1), h.dtype(), h.device())?], 1)?;
    let idx: Vec<u32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i && i - j < l { (i - j) as u32 } else { l as u32 })).collect();
    let idx = Tensor::from_vec(idx, t * t, h.device())?;
    let toeplitz = ext.index_select(&idx, 1)?.reshape((c, t, t))?; // [C, T_out, T_in]
    let xt = x.permute((1, 2, 0))?.contiguous()?; // [C, T, B]
    toeplitz.matmul(&xt)?.permute((2, 0, 1))?.contiguous() // [B, C, T]
}

/// The FFT length used for inputs of length `t` and filters of length `l`: the smallest
/// 7-smooth number (2^a 3^b 5^c 7^d) that is at least `t + l`.
pub fn fft_len(t: usize, l: usize) -> usize {
    let min = (t + l).max(2);
    let mut n = min;
    loop {
        let mut m = n;
        for p in [2, 3, 5, 7] {
            while m.is_multiple_of(p) {
                m /= p;
            }
        }
        if m == 1 {
            return n;
        }
        n += 1;
    }
}

/// `y = h * x` (causal convolution). Inputs `x: [B, C, T]`, `h: [C, L]`, both contiguous.
/// On CUDA, with `keep`, the forward pass leaves the spectra of `x` and `h` in `saved` for
/// the backward pass (which takes them, freeing them as soon as it is done).
#[derive(Default)]
struct CausalConv {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    keep: bool,
    #[cfg(feature = "cuda")]
    saved: std::sync::Mutex<Option<crate::kernels::fftconv::Spectra>>,
}

/// `dx = corr(dy, h)`: inputs `dy: [B, C, T]`, `h: [C, L]` -> `[B, C, T]`.
struct CorrInput;

/// `dh = sum_b corr(dy, x)`: inputs `dy: [B, C, T]`, `x: [B, C, T]` -> `[C, L]`.
struct CorrFilter {
    l: usize,
}

impl CustomOp2 for CausalConv {
    fn name(&self) -> &'static str {
        "fftconv-causal-conv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, t) = l1.shape().dims3()?;
        let (_, l) = l2.shape().dims2()?;
        let out = dispatch(s1, l1, s2, l2, self.name(), |x, h| Kernel::conv(x, h, b, c, t, l))?;
        Ok((out, Shape::from((b, c, t))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, spectra) = crate::kernels::fftconv::conv(s1, l1, s2, l2, self.keep)?;
        if spectra.is_some() {
            *self.saved.lock().unwrap() = spectra;
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, h: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            // Both gradients from one op (one flat buffer, split by views).
            let (b, c, t) = x.dims3()?;
            let l = h.dim(1)?;
            let grads = ConvGrads { saved: self.saved.lock().unwrap().take() };
            let flat = dy.apply_op3_no_bwd(x, h, &grads)?;
            drop(grads);
            let dx = flat.narrow(0, 0, b * c * t)?.reshape((b, c, t))?;
            let dh = flat.narrow(0, b * c * t, c * l)?.reshape((c, l))?;
            return Ok((Some(dx), Some(dh)));
        }
        let dx = dy.apply_op2_no_bwd(h, &CorrInput)?;
        let dh = dy.apply_op2_no_bwd(x, &CorrFilter { l: h.dim(1)? })?;
        Ok((Some(dx), Some(dh)))
    }
}

impl CustomOp2 for CorrInput {
    fn name(&self) -> &'static str {
        "fftconv-corr-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, t) = l1.shape().dims3()?;
        let (_, l) = l2.shape().dims2()?;
        let out = dispatch(s1, l1, s2, l2, self.name(), |dy, h| Kernel::corr_input(dy, h, b, c, t, l))?;
        Ok((out, Shape::from((b, c, t))))
    }
}

impl CustomOp2 for CorrFilter {
    fn name(&self) -> &'static str {
        "fftconv-corr-filter"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, t) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, c, t] {
            bail!("fftconv-corr-filter: dy {:?} and x {:?} differ", l1.shape(), l2.shape());
        }
        let l = self.l;
        let out = dispatch(s1, l1, s2, l2, self.name(), |dy, x| Kernel::corr_filter(dy, x, b, c, t, l))?;
        Ok((out, Shape::from((c, l))))
    }
}

/// Both gradients on CUDA: inputs `dy: [B, C, T]`, `x: [B, C, T]`, `h: [C, L]` ->
/// `[B C T + C L]`, `dx` then `dh` (see [`crate::kernels::fftconv::grads`]).
#[cfg(feature = "cuda")]
struct ConvGrads {
    saved: Option<crate::kernels::fftconv::Spectra>,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp3 for ConvGrads {
    fn name(&self) -> &'static str {
        "fftconv-conv-grads"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("fftconv-conv-grads runs on CUDA only (the CPU backward uses CorrInput and CorrFilter)")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::kernels::fftconv::grads(s1, l1, s2, l2, s3, l3, self.saved.as_ref())?;
        Ok((out, Shape::from(l1.shape().elem_count() + l3.shape().elem_count())))
    }
}

/// Takes the two contiguous f32 or f64 slices out of candle's storage and runs `f` on them.
fn dispatch(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    name: &str,
    f: impl Fn(Slices<'_>, Slices<'_>) -> Output,
) -> Result<CpuStorage> {
    let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        bail!("{name}: inputs must be contiguous");
    };
    match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => match f(Slices::F32(&a[a0..a1]), Slices::F32(&b[b0..b1])) {
            Output::F32(v) => Ok(CpuStorage::F32(v)),
            Output::F64(_) => unreachable!(),
        },
        (CpuStorage::F64(a), CpuStorage::F64(b)) => match f(Slices::F64(&a[a0..a1]), Slices::F64(&b[b0..b1])) {
            Output::F64(v) => Ok(CpuStorage::F64(v)),
            Output::F32(_) => unreachable!(),
        },
        _ => bail!("{name}: supports f32 and f64 on the CPU, got {:?} and {:?}", s1.dtype(), s2.dtype()),
    }
}

enum Slices<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

enum Output {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

struct Kernel;

impl Kernel {
    fn conv(x: Slices, h: Slices, b: usize, c: usize, t: usize, l: usize) -> Output {
        match (x, h) {
            (Slices::F32(x), Slices::F32(h)) => Output::F32(conv(x, h, b, c, t, l)),
            (Slices::F64(x), Slices::F64(h)) => Output::F64(conv(x, h, b, c, t, l)),
            _ => unreachable!("dtypes checked by dispatch"),
        }
    }

    fn corr_input(dy: Slices, h: Slices, b: usize, c: usize, t: usize, l: usize) -> Output {
        match (dy, h) {
            (Slices::F32(dy), Slices::F32(h)) => Output::F32(corr_input(dy, h, b, c, t, l)),
            (Slices::F64(dy), Slices::F64(h)) => Output::F64(corr_input(dy, h, b, c, t, l)),
            _ => unreachable!("dtypes checked by dispatch"),
        }
    }

    fn corr_filter(dy: Slices, x: Slices, b: usize, c: usize, t: usize, l: usize) -> Output {
        match (dy, x) {
            (Slices::F32(dy), Slices::F32(x)) => Output::F32(corr_filter(dy, x, b, c, t, l)),
            (Slices::F64(dy), Slices::F64(x)) => Output::F64(corr_filter(dy, x, b, c, t, l)),
            _ => unreachable!("dtypes checked by dispatch"),
        }
    }
}

/// The float types the FFT path runs in, each with one shared (cached) planner.
trait Float: FftNum {
    fn plans(n: usize) -> (Arc<dyn RealToComplex<Self>>, Arc<dyn ComplexToReal<Self>>);
}

static PLANNER_F32: LazyLock<Mutex<RealFftPlanner<f32>>> = LazyLock::new(|| Mutex::new(RealFftPlanner::new()));
static PLANNER_F64: LazyLock<Mutex<RealFftPlanner<f64>>> = LazyLock::new(|| Mutex::new(RealFftPlanner::new()));

impl Float for f32 {
    fn plans(n: usize) -> (Arc<dyn RealToComplex<f32>>, Arc<dyn ComplexToReal<f32>>) {
        let mut p = PLANNER_F32.lock().unwrap();
        (p.plan_fft_forward(n), p.plan_fft_inverse(n))
    }
}

impl Float for f64 {
    fn plans(n: usize) -> (Arc<dyn RealToComplex<f64>>, Arc<dyn ComplexToReal<f64>>) {
        let mut p = PLANNER_F64.lock().unwrap();
        (p.plan_fft_forward(n), p.plan_fft_inverse(n))
    }
}

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

/// `y[b, c] = irfft(rfft(x[b, c]) rfft(h[c]))[..T]`.
fn conv<F: Float>(x: &[F], h: &[F], _b: usize, c: usize, t: usize, l: usize) -> Vec<F> {
    let n = fft_len(t, l);
    let (fwd, inv) = F::plans(n);
    let bins = n / 2 + 1;
    let hs = spectra(h, l, n, &fwd);
    let mut xs = spectra(x, t, n, &fwd);
    xs.par_chunks_mut(bins).enumerate().with_min_len(min_rows(n)).for_each(|(row, s)| {
        let hc = &hs[(row % c) * bins..(row % c + 1) * bins];
        s.iter_mut().zip(hc).for_each(|(a, b)| *a = *a * *b);
    });
    signals(&mut xs, n, t, &inv)
}

/// `dx[b, c] = irfft(rfft(dy[b, c]) conj(rfft(h[c])))[..T]`.
fn corr_input<F: Float>(dy: &[F], h: &[F], _b: usize, c: usize, t: usize, l: usize) -> Vec<F> {
    let n = fft_len(t, l);
    let (fwd, inv) = F::plans(n);
    let bins = n / 2 + 1;
    let hs = spectra(h, l, n, &fwd);
    let mut ds = spectra(dy, t, n, &fwd);
    ds.par_chunks_mut(bins).enumerate().with_min_len(min_rows(n)).for_each(|(row, s)| {
        let hc = &hs[(row % c) * bins..(row % c + 1) * bins];
        s.iter_mut().zip(hc).for_each(|(a, b)| *a = *a * b.conj());
    });
    signals(&mut ds, n, t, &inv)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, rel_err};
    use candle_core::Var;

    #[test]
    fn fft_lengths_are_smooth_and_long_enough() {
        assert_eq!(fft_len(1, 1), 2);
        assert_eq!(fft_len(7, 7), 14);
        assert_eq!(fft_len(64, 64), 128);
        assert_eq!(fft_len(1000, 1000), 2000);
        assert_eq!(fft_len(1000, 3), 1008);
        assert_eq!(fft_len(8192, 8192), 16384);
        assert_eq!(fft_len(11, 11), 24);
    }

    #[test]
    fn fft_convolution_equals_direct_convolution() -> anyhow::Result<()> {
        for (t, l) in [(1, 1), (7, 7), (64, 64), (1000, 1000), (64, 5), (13, 40)] {
            for dtype in [DType::F32, DType::F64] {
                let x = randn(&[2, 3, t], t as u64, dtype)?;
                let h = randn(&[3, l], 100 + l as u64, dtype)?;
                let fast = causal_conv(&x, &h)?;
                let direct = causal_conv_direct(&x, &h)?;
                assert_eq!(fast.dims(), &[2, 3, t]);
                let err = rel_err(&fast, &direct)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(err < tol, "T {t} L {l} {dtype:?}: rel err {err}");
            }
        }
        // and against a plain loop, to pin the definition itself
        let (x, h) = (randn(&[1, 2, 9], 1, DType::F64)?, randn(&[2, 9], 2, DType::F64)?);
        let y: Vec<f64> = causal_conv(&x, &h)?.flatten_all()?.to_vec1()?;
        let (xv, hv): (Vec<f64>, Vec<f64>) = (x.flatten_all()?.to_vec1()?, h.flatten_all()?.to_vec1()?);
        for c in 0..2 {
            for t in 0..9 {
                let want: f64 = (0..=t).map(|s| hv[c * 9 + s] * xv[c * 9 + t - s]).sum();
                assert!((y[c * 9 + t] - want).abs() < 1e-12);
            }
        }
        Ok(())
    }

    /// Gradients of `sum(w * conv(x, h))` for both arguments: the FFT op's backward against
    /// the direct reference's autograd (whole tensors) and against central finite
    /// differences (a few coordinates), in f64.
    #[test]
    fn fft_convolution_gradients_match_reference_and_finite_differences() -> anyhow::Result<()> {
        for (t, l) in [(1, 1), (7, 7), (64, 64), (30, 11)] {
            let x = Var::from_tensor(&randn(&[2, 3, t], 5 + t as u64, DType::F64)?)?;
            let h = Var::from_tensor(&randn(&[3, l], 6 + l as u64, DType::F64)?)?;
            let w = randn(&[2, 3, t], 7, DType::F64)?;
            let loss_fast = (causal_conv(&x, &h)? * &w)?.sum_all()?;
            let loss_direct = (causal_conv_direct(&x, &h)? * &w)?.sum_all()?;
            let (gf, gd) = (loss_fast.backward()?, loss_direct.backward()?);
            let (dx, dh) = (gf.get(&x).unwrap(), gf.get(&h).unwrap());
            assert!(rel_err(dx, gd.get(&x).unwrap())? < 1e-12, "T {t}: dx");
            assert!(rel_err(dh, gd.get(&h).unwrap())? < 1e-12, "T {t}: dh");
            let (dxv, dhv): (Vec<f64>, Vec<f64>) = (dx.flatten_all()?.to_vec1()?, dh.flatten_all()?.to_vec1()?);
            let loss_at = |xv: &Tensor, hv: &Tensor| -> anyhow::Result<f64> {
                Ok((causal_conv(xv, hv)? * &w)?.sum_all()?.to_scalar::<f64>()?)
            };
            let eps = 1e-6;
            for (var, grad) in [(&x, &dxv), (&h, &dhv)] {
                let base: Vec<f64> = var.flatten_all()?.to_vec1()?;
                for i in [0, base.len() / 2, base.len() - 1] {
                    let probe = |d: f64| -> anyhow::Result<f64> {
                        let mut v = base.clone();
                        v[i] += d;
                        let moved = Tensor::from_vec(v, var.shape(), var.device())?;
                        if std::ptr::eq(var, &x) {
                            loss_at(&moved, &h)
                        } else {
                            loss_at(&x, &moved)
                        }
                    };
                    let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps);
                    let err = (numeric - grad[i]).abs() / (numeric.abs() + grad[i].abs()).max(1e-6);
                    assert!(err < 1e-6, "T {t} coordinate {i}: backward {} vs finite difference {numeric}", grad[i]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes_and_dtypes() -> anyhow::Result<()> {
        let x = randn(&[1, 3, 8], 1, DType::F32)?;
        assert!(causal_conv(&x, &randn(&[2, 8], 2, DType::F32)?).is_err());
        assert!(causal_conv(&x, &randn(&[3, 8], 2, DType::F64)?).is_err());
        let h = randn(&[3, 8], 2, DType::F32)?;
        let half = causal_conv(&x.to_dtype(DType::BF16)?, &h.to_dtype(DType::BF16)?)?;
        assert_eq!(half.dtype(), DType::BF16);
        assert!(rel_err(&half, &causal_conv(&x, &h)?)? < 2e-2);
        let err = x.to_dtype(DType::U32)?.apply_op2(&h.to_dtype(DType::U32)?, CausalConv::default()).unwrap_err();
        assert!(err.to_string().contains("f32 and f64"), "{err}");
        Ok(())
    }
}
