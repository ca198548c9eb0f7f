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
