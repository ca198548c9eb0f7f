//! What the fused CPU ops share: f32 and f64 as one numeric type, and the data of tensors
//! borrowed from candle's storage as contiguous slices.

use candle_core::{Result, Storage, Tensor};

/// f32 or f64 (converted through f64 by candle's `WithDType::{to_f64, from_f64}` where
/// the arithmetic needs the precision).
pub trait Real: candle_core::WithDType + Send + Sync + Default {}

impl Real for f32 {}
impl Real for f64 {}

/// Runs `f` on the data of `tensors` (on the CPU, of dtype `T`, contiguous), `names` naming
/// them in errors. The tensors stay locked for reading while `f` runs.
pub fn with_slices<T: Real, R>(tensors: &[&Tensor], names: &[&str], f: impl FnOnce(&[&[T]]) -> R) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut data = Vec::with_capacity(guards.len());
    for ((storage, layout), name) in guards.iter().zip(names) {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("{name} is not on the CPU") };
        let all = cpu.as_slice::<T>()?;
        match layout.contiguous_offsets() {
            Some((start, end)) => data.push(&all[start..end]),
            None => candle_core::bail!("{name} must be contiguous"),
        }
    }
    Ok(f(&data))
}
