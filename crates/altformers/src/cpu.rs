//! What the fused CPU ops share: f32 and f64 as one numeric type, and the data of tensors
//! borrowed from candle's storage as contiguous slices.

use candle_core::{Layout, Result, Storage, Tensor};

/// f32 or f64: the float arithmetic, and conversions through f64 where it needs the precision.
pub trait Real: candle_core::WithDType + num_traits::Float + Send + Sync + Default {
    fn wide(self) -> f64 {
        candle_core::WithDType::to_f64(self)
    }
    fn narrow(v: f64) -> Self {
        <Self as candle_core::WithDType>::from_f64(v)
    }
    /// `e^x` in arithmetic a loop vectorises: [`exp_f32`] for f32, libm's for f64 (the
    /// gradient checks run in f64).
    fn exp_vec(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp_vec(self) -> Self {
        exp_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn exp_vec(self) -> Self {
        self.exp()
    }
}

/// `e^x` in f32 from branch-free arithmetic that the compiler vectorises (libm's `expf` is one
/// call per element, which keeps a whole loop scalar: 3.5% of a nanoGPT-CPU training step
/// went to it): `2^n e^r` with `n = round(x log2 e)`, `r = x - n ln 2` (ln 2 in two parts,
/// Cody and Waite), `e^r` by its Taylor polynomial to degree 7 on `|r| <= ln(2) / 2`
/// (truncation 5e-9 relative), `2^n` written into the exponent bits. Within 2 ulp of the
/// true value over the normal range (test below); 0 below -87.3 (where `e^x` leaves the
/// normal floats), and `e^88` above 88 (no overflow).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // rounding to the nearest integer by the float adder (1.5 * 2^23): vectorises where
    // `round` is a library call on baseline x86-64
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_54, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + SHIFTER) - SHIFTER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.336_54 {
        0.0
    } else {
        p * scale
    }
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 with FMA and
/// for the baseline, the widest the CPU has chosen at run time: the build targets x86-64's
/// baseline (SSE2, four f32 lanes) so that one binary runs anywhere, and an elementwise loop
/// in the body then runs 16 or 8 lanes wide where the CPU allows (as the `gemm` crate's
/// kernels do). Results are the same bits on every path (no operation is fused or reordered:
/// Rust never contracts `a * b + c` into an FMA on its own). Generic over one float type `T`
/// with one trait bound; no lifetimes in the arguments.
macro_rules! vectorised {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        $vis fn $name<$t: $bound>($($arg: $ty),*) -> $ret {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$t: $bound>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$t: $bound>($($arg: $ty),*) -> $ret {
                    body::<$t>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) -> $ret {
                    body::<$t>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the instructions the function was compiled for.
                    return unsafe { avx512::<$t>($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            body::<$t>($($arg),*)
        }
    };
}
pub(crate) use vectorised;

/// `sum_j f(a[j], b[j], c[j])` over the common length, in sixteen running sums (a vector of
/// them in the bodies of [`vectorised`] functions): one running sum is a chain of dependent
/// additions that the compiler may not reorder, so it stays scalar. (The order of the
/// additions differs from a plain loop's: the last bits of the sum may too.)
#[inline(always)]
pub fn lane_sum3<T: Copy, S: num_traits::Float>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> S) -> S {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut lanes = [S::zero(); 16];
    let whole = n - n % 16;
    for j0 in (0..whole).step_by(16) {
        // fixed-length pieces: no bounds checks in the loop below, which then vectorises
        let (a, b, c) = (&a[j0..j0 + 16], &b[j0..j0 + 16], &c[j0..j0 + 16]);
        for k in 0..16 {
            lanes[k] = lanes[k] + f(a[k], b[k], c[k]);
        }
    }
    let mut total = (whole..n).fold(S::zero(), |acc, j| acc + f(a[j], b[j], c[j]));
    for lane in lanes {
        total = total + lane;
    }
    total
}

/// [`lane_sum3`] of one slice: `sum_j f(xs[j])`.
#[inline(always)]
pub fn lane_sum<T: Copy, S: num_traits::Float>(xs: &[T], f: impl Fn(T) -> S) -> S {
    lane_sum3(xs, xs, xs, |x, _, _| f(x))
}

/// The largest of `xs` (`-inf` for none), in sixteen running maxima as [`lane_sum`]; NaN
/// entries are ignored (as `f32::max` does).
#[inline(always)]
pub fn lane_max<T: num_traits::Float>(xs: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(T::neg_infinity(), |m, &x| m.max(x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// The elements of `data` that `layout` covers, which must be contiguous (`what` names the
/// tensor in the error).
pub fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Runs `f` on the data of `tensors` (on the CPU, of dtype `T`, contiguous), `names` naming
/// them in errors. The tensors stay locked for reading while `f` runs.
pub fn with_slices<T: Real, R>(tensors: &[&Tensor], names: &[&str], f: impl FnOnce(&[&[T]]) -> R) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut data = Vec::with_capacity(guards.len());
    for ((storage, layout), name) in guards.iter().zip(names) {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("{name} is not on the CPU") };
        data.push(contiguous(cpu.as_slice::<T>()?, layout, name)?);
    }
    Ok(f(&data))
}

/// A strided matrix operand of [`product`]: element `(i, j)` at `ptr + i rs + j cs`.
#[derive(Clone, Copy)]
pub struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    /// A row-major `[rows, cols]` buffer.
    pub fn dense(data: &[T], cols: usize) -> Self {
        Self { ptr: data.as_ptr(), rs: cols as isize, cs: 1 }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Self { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// `dst = scale a b`, or `dst += scale a b` when `accumulate`: `a` is `m x k`, `b` is `k x n`,
/// `dst` row-major `m x n` with rows `dst_rs` apart, through the `gemm` crate (candle's CPU
/// products) on `threads` threads of the pool (1: the calling thread alone).
///
/// # Safety
/// `a` and `b` must address `m x k` and `k x n` elements inside the memory they were made
/// from, and `dst` must hold `(m - 1) dst_rs + n` elements.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    (m, n, k): (usize, usize, usize),
    scale: T,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "product: destination too small");
    product_into(dst.as_mut_ptr(), dst_rs, accumulate, a, b, (m, n, k), scale, threads)
}

/// [`product`] into memory addressed by a pointer: for tasks that write disjoint, interleaved
/// parts of one buffer (the rows of one head in a token-major layout) from several threads.
///
/// # Safety
/// As [`product`], and `dst` must address `(m - 1) dst_rs + n` elements no other thread
/// touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product_into<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    (m, n, k): (usize, usize, usize),
    scale: T,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // gemm's convention: dst = alpha dst + beta a b (alpha read only with read_dst)
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        T::one(),
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_f32` within 2 ulp of the f64 exponential over the normal range (a dense sweep),
    /// exactly 0 below it, finite at the top, and differing from libm somewhere (so the test
    /// checks the function, not a call through to `expf`).
    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut differs = 0;
        let mut x = -87.3f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x), (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, true {want}: {ulp} ulp");
            differs += (got != x.exp()) as usize;
            x += 0.0137;
        }
        assert!(differs > 0, "identical to libm everywhere: not the function under test?");
        assert_eq!(exp_f32(-87.4), 0.0);
        assert_eq!(exp_f32(-1e30), 0.0);
        assert!(exp_f32(1e30).is_finite() && exp_f32(0.0) == 1.0);
    }

    /// The lane sums and maxima equal the plain ones (exactly, on integers) at lengths around
    /// the 16 lanes, and the maximum skips NaN.
    #[test]
    fn lane_reductions_match_plain_ones() {
        for n in [0usize, 1, 15, 16, 17, 40, 64] {
            let xs: Vec<f64> = (0..n).map(|i| ((i * 37) % 23) as f64 - 11.0).collect();
            assert_eq!(lane_sum(&xs, |x| x), xs.iter().sum::<f64>());
            assert_eq!(lane_sum3(&xs, &xs, &xs, |a, b, c| a * b - c), xs.iter().map(|x| x * x - x).sum::<f64>());
            assert_eq!(lane_max(&xs), xs.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x)));
        }
        assert_eq!(lane_max(&[1.0, f32::NAN, 3.0]), 3.0);
    }
}
