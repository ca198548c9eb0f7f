//! The dropout kernel (`kernels/dropout.cu`) against the CPU op: the same counter-based mask,
//! so outputs and input gradients agree elementwise (f32 and bf16), and the dropped
//! positions are exactly the CPU's. A size that is not a multiple of the block.

use altformers::nn::dropout;
use altformers::rng::Rng;
use altformers::testing::randn;
use anyhow::Result;
use candle_core::{DType, Device};

#[test]
fn dropout_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let n = 100_003;
    let x = randn(&[n], 1, DType::F32)?;
    let r = randn(&[n], 2, DType::F32)?;
    for p in [0.1, 0.5] {
        let f = move |x: &candle_core::Tensor| dropout(x, p, &mut Rng::new(9));
        crate::gpu_matches_cpu(&f, &x, &r, &gpu, &format!("dropout p {p}"))?;
        let dropped = |dev: &Device| -> Result<Vec<u8>> {
            Ok(f(&x.to_device(dev)?)?.eq(0f32)?.to_device(&Device::Cpu)?.to_vec1::<u8>()?)
        };
        anyhow::ensure!(dropped(&gpu)? == dropped(&Device::Cpu)?, "p {p}: the GPU dropped other positions");
    }
    Ok(())
}
