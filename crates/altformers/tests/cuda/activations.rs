//! The fused GELU and SiLU (`kernels/activations.cu`) against candle's on the CPU: outputs
//! and input gradients on fresh random inputs spread over [-9, 9] (both tails), f32 and bf16,
//! a size that is not a multiple of the block.

use altformers::nn::{gelu_erf, silu};
use altformers::testing::randn;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

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

/// The fused sum against candle's add: the value, the gradient it hands to both inputs, and
/// as the backward's gradient sum (`GRADIENT_SUM`, set as `crate::device` sets it), where a
/// tensor used three times gets the same gradient as with candle's add; odd lengths take the
/// scalar tail.
#[test]
fn fused_sum_matches_candles_add_also_as_the_gradient_sum() -> anyhow::Result<()> {
    use altformers::kernels::activations::{gradient_sum, sum, sum_applies};
    let gpu = Device::new_cuda(0)?;
    let _ = candle_core::backprop::GRADIENT_SUM.set(gradient_sum);
    for n in [4096usize, 1000, 7] {
        for (dtype, tol) in [(DType::F32, 1e-7), (DType::BF16, 1e-2)] {
            let a = altformers::testing::randn(&[2, n], 1, DType::F32)?.to_dtype(dtype)?.to_device(&gpu)?;
            let b = altformers::testing::randn(&[2, n], 2, DType::F32)?.to_dtype(dtype)?.to_device(&gpu)?;
            anyhow::ensure!(sum_applies(&a, &b), "{n} {dtype:?}: should apply");
            let err = altformers::testing::device_rel_err(
                &sum(&a, &b)?.to_dtype(DType::F32)?,
                &(&a + &b)?.to_dtype(DType::F32)?,
            )?;
            anyhow::ensure!(err <= tol, "{n} {dtype:?}: sum rel err {err}");
            // x used three times: its gradient is a sum of three, through the hook
            let x = Var::from_tensor(&a)?;
            let r = altformers::testing::randn(&[2, n], 3, DType::F32)?.to_device(&gpu)?;
            let y = sum(&(x.as_tensor() * 2.0)?, &(x.as_tensor() * 3.0)?)?;
            let y = sum(&y, &x.as_tensor().sqr()?)?;
            let g = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
            let got = g.get(x.as_tensor()).expect("dx").to_dtype(DType::F32)?;
            let expected = (((a.to_dtype(DType::F32)? * 2.0)? + 5.0)? * &r)?;
            let err = altformers::testing::device_rel_err(&got, &expected)?;
            anyhow::ensure!(err <= 4.0 * tol.max(1e-6), "{n} {dtype:?}: gradient rel err {err}");
        }
    }
    // a strided operand is left to candle's add
    let a = altformers::testing::randn(&[8, 8], 1, DType::F32)?.to_device(&gpu)?;
    anyhow::ensure!(!sum_applies(&a.t()?, &a), "a transposed view should not apply");
    anyhow::ensure!(gradient_sum(&a.t()?, &a)?.is_none(), "gradient_sum should decline a view");
    Ok(())
}
