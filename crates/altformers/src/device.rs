//! Choosing where tensors live, with a clear error instead of a panic when CUDA is missing.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// `cpu` or `cuda` (`cuda:N` for another GPU).
pub fn select(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal: usize = n.strip_prefix("cuda:").map(|s| s.parse()).transpose()?.unwrap_or(0);
            cuda(ordinal)
        }
        other => bail!("unknown device `{other}`: use cpu or cuda"),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    // With dynamically loaded CUDA libraries, candle panics when they are absent.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => bail!("cannot open CUDA device {ordinal}: {e}"),
        Err(_) => bail!("cannot open CUDA device {ordinal}: the CUDA driver or libraries could not be loaded"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    bail!("this binary was built without CUDA support; rebuild with `--features cuda` (see README, GPU section)")
}

/// Compute dtype for a device: f32 on the CPU; bf16 on the GPU is chosen explicitly.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f64" => DType::F64,
        other => bail!("unknown dtype `{other}`: use f32, bf16, f16 or f64"),
    })
}
