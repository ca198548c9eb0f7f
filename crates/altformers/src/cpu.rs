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
}

impl Real for f32 {}
impl Real for f64 {}

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
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // gemm's convention: dst = alpha dst + beta a b (alpha read only with read_dst)
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
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
