//! Elementwise activations with a fused backward: GELU (erf form) and SiLU.
//!
//! - `gelu(x) = x Phi(x)`, `gelu'(x) = Phi(x) + x phi(x)`, with `Phi(x) = (1 + erf(x / sqrt 2)) / 2`
//!   and `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`;
//! - `silu(x) = x s(x)`, `silu'(x) = s(x) (1 + x (1 - s(x)))`, with `s` the logistic sigmoid.
//!
//! The forward is candle's arithmetic (the same `erf`). candle's backward of GELU is a chain
//! of about a dozen elementwise ops over the tensor (square, negate, exp, erf, scalings,
//! sums), each a full pass into a new buffer: on the CPU that chain took about 15% of a
//! nanoGPT-sized training step. Here the backward is one pass computing `act'(x) g`: on the
//! CPU for f32 and f64 (rayon over blocks), on CUDA for f32 and bf16 (one launch of
//! [`crate::kernels::activations`]). Other dtypes use candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::contiguous;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Silu,
}

impl Activation {
    /// The kernels' name of the activation.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }

    #[inline(always)]
    fn value<T: Float>(self, x: T) -> T {
        match self {
            Activation::Gelu => x * T::phi_cdf(x),
            Activation::Silu => x * T::sigmoid(x),
        }
    }

    #[inline(always)]
    fn derivative<T: Float>(self, x: T) -> T {
        match self {
            Activation::Gelu => T::phi_cdf(x) + x * T::phi_pdf(x),
            Activation::Silu => {
                let s = T::sigmoid(x);
                s * (T::ONE + x * (T::ONE - s))
            }
        }
    }
}

/// `act(x)` elementwise, with the fused backward where it applies.
pub fn apply(x: &Tensor, act: Activation) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op1(Forward(act));
    }
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::Silu => x.silu(),
    }
}

/// Whether [`apply`] runs the fused op on `x`.
fn fused(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if crate::kernels::activations::supports(x) {
        return true;
    }
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The arithmetic the two activations need, for f32 and f64.
trait Float:
    Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
    const ONE: Self;
    /// `Phi(x)`, candle's form: `(erf(x / sqrt 2) + 1) / 2`.
    fn phi_cdf(x: Self) -> Self;
    /// `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`.
    fn phi_pdf(x: Self) -> Self;
    fn sigmoid(x: Self) -> Self;
}

macro_rules! float {
    ($t:ident, $erf:path, $exp:path) => {
        impl Float for $t {
            const ONE: Self = 1.0;
            #[inline(always)]
            fn phi_cdf(x: Self) -> Self {
                ($erf(x * std::$t::consts::FRAC_1_SQRT_2) + 1.0) * 0.5
            }
            #[inline(always)]
            fn phi_pdf(x: Self) -> Self {
                // 1 / sqrt(2 pi)
                $exp(-0.5 * x * x) * (std::$t::consts::FRAC_2_SQRT_PI * std::$t::consts::FRAC_1_SQRT_2 * 0.5)
            }
            #[inline(always)]
            fn sigmoid(x: Self) -> Self {
                1.0 / (1.0 + $exp(-x))
            }
        }
    };
}
// f32: exp and erf from arithmetic the compiler vectorises (libm's are a call per element)
float!(f32, erf_f32, crate::cpu::exp_f32);
float!(f64, candle_core::cpu::erf::erf_f64, f64::exp);

/// erf in f32 as `x P(x^2) / Q(x^2)` on `|x| <= 3.925` (erf rounds to +-1 beyond), a rational
/// fit of our own (`scripts/fit-erf.py`: relative error 2e-9 in exact arithmetic, at most 7
/// ulp and 1 on average in f32 over [-6, 6], against libm's 1). Branch-free arithmetic that the
/// compiler vectorises: libm's `erff`, one call per element, was 10% of a nanoGPT-CPU training
/// step (issue 29's profile). f64 keeps candle's erf (the gradient checks run in f64).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    const P: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        1.851_085_4e-1,
        5.428_567_4e-2,
        3.843_450_5e-3,
        3.787_153_8e-4,
        4.661_912e-6,
        -1.307_016_7e-8,
    ];
    const Q: [f32; 6] = [1.0, 4.973_816e-1, 1.139_027_6e-1, 1.544_646_8e-2, 1.305_145_2e-3, 6.289_908e-5];
    // (P[0], the slope at 0, is 2 / sqrt(pi) in f32, as fitted; the literals are the fit's f32 values)
    let x = x.clamp(-3.925, 3.925);
    let t = x * x;
    let p = P.iter().rev().fold(0.0f32, |acc, &c| acc * t + c);
    let q = Q.iter().rev().fold(0.0f32, |acc, &c| acc * t + c);
    // (the f32 evaluation reaches 1 + 1 ulp near the clamp)
    (x * p / q).clamp(-1.0, 1.0)
}

/// Elements per rayon task: large enough that a task's cost dwarfs its scheduling.
const BLOCK: usize = 1 << 14;

fn forward<T: Float>(x: &[T], act: Activation) -> Vec<T> {
    let mut y = x.to_vec();
    y.par_chunks_mut(BLOCK).for_each(|ys| values(ys, act));
    y
}

fn backward<T: Float>(x: &[T], g: &[T], act: Activation) -> Vec<T> {
    let mut dx = g.to_vec();
    dx.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK)).for_each(|(ds, xs)| derivatives(ds, xs, act));
    dx
}

crate::cpu::vectorised! {
    /// `act` of every element of `ys`, in place (a block of [`forward`]).
    fn values<T: Float>(ys: &mut [T], act: Activation) -> () {
        // one loop per activation, so that each is a straight vector loop
        match act {
            Activation::Gelu => {
                for v in ys.iter_mut() {
                    *v = Activation::Gelu.value(*v);
                }
            }
            Activation::Silu => {
                for v in ys.iter_mut() {
                    *v = Activation::Silu.value(*v);
                }
            }
        }
    }
}

crate::cpu::vectorised! {
    /// `ds *= act'(xs)` elementwise (a block of [`backward`]).
    fn derivatives<T: Float>(ds: &mut [T], xs: &[T], act: Activation) -> () {
        // index loops (an iterator adaptor left out of line would be compiled for the baseline)
        let xs = &xs[..ds.len()];
        match act {
            Activation::Gelu => {
                for i in 0..ds.len() {
                    ds[i] = ds[i] * Activation::Gelu.derivative(xs[i]);
                }
            }
            Activation::Silu => {
                for i in 0..ds.len() {
                    ds[i] = ds[i] * Activation::Silu.derivative(xs[i]);
                }
            }
        }
    }
}

struct Forward(Activation);
/// `(x, g) -> g act'(x)`.
struct Backward(Activation);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "fused-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(forward(contiguous(x, l, "fused activation: input")?, self.0)),
            CpuStorage::F64(x) => CpuStorage::F64(forward(contiguous(x, l, "fused activation: input")?, self.0)),
            _ => candle_core::bail!("fused activation: f32 or f64 on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        Ok((crate::kernels::activations::forward(s, l, self.0.name())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &Backward(self.0))?))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "fused-activation-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (xs, gs) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(backward(
                contiguous(x, xl, "fused activation: input")?,
                contiguous(g, gl, "fused activation: gradient")?,
                self.0,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(backward(
                contiguous(x, xl, "fused activation: input")?,
                contiguous(g, gl, "fused activation: gradient")?,
                self.0,
            )),
            _ => candle_core::bail!("fused activation backward: input and gradient must share f32 or f64"),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::cuda_backend::CudaStorage,
        xl: &Layout,
        gs: &candle_core::cuda_backend::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        Ok((crate::kernels::activations::backward(xs, xl, gs, gl, self.0.name())?, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The f32 erf against f64's over [-6, 6] (every 1e-4): within 4.5e-7 everywhere (7 ulp of
    /// values near 1) and 1e-6 relative where |erf| > 1e-3; odd; +-1 beyond the fit's range;
    /// NaN stays NaN (a diverged loss is still caught).
    #[test]
    fn f32_erf_is_within_a_few_ulp_of_f64() {
        let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
        for i in -60_000..=60_000 {
            let x = i as f64 * 1e-4;
            let (got, exact) = (erf_f32(x as f32) as f64, candle_core::cpu::erf::erf_f64((x as f32) as f64));
            worst_abs = worst_abs.max((got - exact).abs());
            if exact.abs() > 1e-3 {
                worst_rel = worst_rel.max(((got - exact) / exact).abs());
            }
            assert_eq!(erf_f32(-(x as f32)), -erf_f32(x as f32), "not odd at {x}");
        }
        assert!(worst_abs < 4.5e-7 && worst_rel < 1e-6, "abs {worst_abs}, rel {worst_rel}");
        assert_eq!((erf_f32(10.0), erf_f32(-1e30)), (1.0, -1.0));
        assert!(erf_f32(f32::NAN).is_nan());
    }

    /// The fused op against candle's: the same values, and gradients equal to candle's
    /// backward (f64, to rounding) and to central finite differences.
    #[test]
    fn fused_forward_and_backward_match_candle_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f64, 2.0, (3, 7, 33), &dev)?))?;
        let g = Tensor::randn(0f64, 1.0, (3, 7, 33), &dev)?;
        for act in [Activation::Gelu, Activation::Silu] {
            let theirs = match act {
                Activation::Gelu => x.gelu_erf()?,
                Activation::Silu => x.silu()?,
            };
            let ours = apply(&x, act)?;
            assert!(max_abs_diff(&ours, &theirs)? < 1e-14, "{act:?} forward");
            let d_ours = (&ours * &g)?.sum_all()?.backward()?.get(&x).cloned().unwrap();
            let d_theirs = (&theirs * &g)?.sum_all()?.backward()?.get(&x).cloned().unwrap();
            // candle's GELU backward rounds 1 / sqrt(2 pi) to 0.398942
            assert!(max_abs_diff(&d_ours, &d_theirs)? < 1e-5, "{act:?} backward against candle's");
            let h = 1e-6;
            let fd = ((apply(&(x.as_tensor() + h)?, act)? - apply(&(x.as_tensor() - h)?, act)?)? / (2.0 * h))?;
            assert!(max_abs_diff(&d_ours, &(fd * &g)?)? < 1e-8, "{act:?} backward against finite differences");
        }
        Ok(())
    }

    /// f32 takes the fused path too, agreeing with candle's to f32 rounding; a strided input is
    /// made contiguous first.
    #[test]
    fn f32_and_strided_inputs() -> Result<()> {
        let x = Tensor::randn(0f32, 2.0, (40, 50), &Device::Cpu)?.t()?;
        for act in [Activation::Gelu, Activation::Silu] {
            let theirs = match act {
                Activation::Gelu => x.gelu_erf()?,
                Activation::Silu => x.silu()?,
            };
            assert!(max_abs_diff(&apply(&x, act)?, &theirs)? < 1e-6, "{act:?}");
        }
        Ok(())
    }
}
