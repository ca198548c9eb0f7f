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
//! (`cuda`, the kernels in `fftconv.cu`): f32, bf16 and f16 inputs, transformed in f32, output and
//! gradients in the input dtype; `h`'s spectrum is computed once per call and shared by the
//! batch, and when a gradient is tracked the forward pass keeps the spectra of `x` and `h`
//! for the backward pass, which computes `dx` and `dh` from one transform of `dy` in a single
//! fused product kernel. f64 on CUDA, and other devices, fail with a message that says so.
//!
//! [`causal_conv_direct`] ([`naive`]) is the plain O(B C T^2) reference from differentiable
//! candle ops (a Toeplitz matrix per channel); the tests hold the FFT form and its gradients
//! to it. Files: this one holds the entry point and the custom op (its forward picks the
//! device), [`cpu`] the realfft products, `cuda` the cuFFT path.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod naive;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use cpu::{Backward, Product};
pub use naive::{anti_causal_conv, causal_conv_direct};

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
    saved: std::sync::Mutex<Option<cuda::Spectra>>,
}

impl CustomOp2 for CausalConv {
    fn name(&self) -> &'static str {
        "fftconv-causal-conv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Product::Conv.cpu(s1, l1, s2, l2, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, spectra) = cuda::conv(s1, l1, s2, l2, self.keep)?;
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
            let grads = cuda::ConvGrads { saved: self.saved.lock().unwrap().take() };
            let flat = dy.apply_op3_no_bwd(x, h, &grads)?;
            drop(grads);
            let dx = flat.narrow(0, 0, b * c * t)?.reshape((b, c, t))?;
            let dh = flat.narrow(0, b * c * t, c * l)?.reshape((c, l))?;
            return Ok((Some(dx), Some(dh)));
        }
        let dx = dy.apply_op2_no_bwd(h, &Backward(Product::CorrInput))?;
        let dh = dy.apply_op2_no_bwd(x, &Backward(Product::CorrFilter { l: h.dim(1)? }))?;
        Ok((Some(dx), Some(dh)))
    }
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
