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

/// A data-parallel worker's slice (`Rng::for_shard`): the kernel's mask over the second half
/// of a tensor, drawn as shard 1, is the CPU's mask of the whole tensor there.
#[test]
fn a_workers_slice_draws_its_part_of_the_whole_mask() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (rows, cols) = (6, 1001);
    let x = randn(&[rows, cols], 3, DType::F32)?;
    let whole = dropout(&x, 0.4, &mut Rng::new(11))?.narrow(0, 3, 3)?;
    let half = dropout(&x.narrow(0, 3, 3)?.to_device(&gpu)?, 0.4, &mut Rng::new(11).for_shard(1))?;
    let (w, h) =
        (whole.flatten_all()?.to_vec1::<f32>()?, half.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    anyhow::ensure!(w == h, "shard 1's mask differs from the whole mask's second half");
    Ok(())
}

/// A sequence-parallel worker's slice (`Rng::for_positions`): the kernel's mask over positions
/// 4..8 of every row of `[B, 8, D]`, drawn as rank 1 of 2, is the CPU's mask of the whole
/// tensor at those positions (f32 and bf16).
#[test]
fn a_workers_slice_of_every_sequence_draws_its_part_of_the_whole_mask() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let x = randn(&[3, 8, 257], 4, DType::F32)?;
    let whole = dropout(&x, 0.3, &mut Rng::new(12))?.narrow(1, 4, 4)?;
    for dtype in [DType::F32, DType::BF16] {
        let part = x.narrow(1, 4, 4)?.to_dtype(dtype)?.to_device(&gpu)?;
        let mine = dropout(&part, 0.3, &mut Rng::new(12).for_positions(1, 2))?;
        let kept = |t: &candle_core::Tensor| -> Result<Vec<u8>> {
            Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.ne(0f32)?.flatten_all()?.to_vec1::<u8>()?)
        };
        anyhow::ensure!(
            kept(&whole)? == kept(&mine)?,
            "{dtype:?}: rank 1's mask differs from the whole's positions 4..8"
        );
    }
    Ok(())
}
