//! The fused GELU and SiLU (`kernels/activations.cu`) against candle's on the CPU: outputs
//! and input gradients on fresh random inputs spread over [-9, 9] (both tails), f32 and bf16,
//! a size that is not a multiple of the block.

use altformers::nn::{gelu_erf, silu};
use altformers::testing::randn;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

type Act = fn(&Tensor) -> candle_core::Result<Tensor>;

#[test]
fn activations_match_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let n = 100_003;
    let x = randn(&[n], 1, DType::F32)?.affine(3.0, 0.0)?.clamp(-9f32, 9f32)?;
    let r = randn(&[n], 2, DType::F32)?;
    for (name, act) in [("gelu", gelu_erf as Act), ("silu", silu as Act)] {
        crate::gpu_matches_cpu(&act, &x, &r, &gpu, name)?;
    }
    Ok(())
}
