//! The fused softmax (`kernels/softmax.cu`) against the tensor expression on the CPU: outputs
//! and input gradients on fresh random inputs with a large spread (the max subtraction
//! matters) and masked (-inf) entries, f32 and bf16, rows narrower and wider than a warp.

use altformers::nn::softmax;
use altformers::testing::randn;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

#[test]
fn softmax_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for (rows, d) in [(5usize, 7usize), (3000, 64), (40, 1000)] {
        // causal-style mask: entry (i, j) is -inf where j > i % d
        let mask: Vec<f32> = (0..rows * d).map(|p| if p % d > (p / d) % d { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (rows, d), &Device::Cpu)?;
        let x = (randn(&[rows, d], (rows + d) as u64, DType::F32)?.affine(8.0, 0.0)? + mask)?;
        let r = randn(&[rows, d], 3, DType::F32)?;
        crate::gpu_matches_cpu(&softmax, &x, &r, &gpu, &format!("({rows}, {d})"))?;
    }
    Ok(())
}
