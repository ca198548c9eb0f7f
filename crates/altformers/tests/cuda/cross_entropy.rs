//! The fused cross-entropy (`kernels/cross_entropy.cu`) against candle's log-softmax and
//! gather on the CPU in f32: the mean loss and the logits' gradient, f32 and bf16 logits, a
//! vocabulary below a warp (a ListOps head's 10 classes), characters' 65 and GPT-2's 50257,
//! logits large enough that an unshifted exp would overflow; a target out of range gives NaN.
use altformers::testing::{device_rel_err, randn};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};

/// (mean loss, d logits) of `nn::cross_entropy(logits, targets)` with `logits` in `dtype` on
/// `dev`, both in f32.
fn run(logits: &Tensor, targets: &Tensor, dev: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let x = Var::from_tensor(&logits.to_dtype(dtype)?.to_device(dev)?)?;
    let loss = altformers::nn::cross_entropy(x.as_tensor(), &targets.to_device(dev)?)?;
    ensure!(loss.dtype() == DType::F32, "loss dtype {:?}", loss.dtype());
    let grad = loss.backward()?.get(x.as_tensor()).expect("d logits").to_dtype(DType::F32)?;
    Ok((loss, grad))
}

#[test]
fn cross_entropy_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for (rows, v) in [(37usize, 10usize), (5000, 65), (64, 50257)] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let logits = randn(&[rows, v], (rows + v) as u64, DType::F32)?.affine(30.0, 50.0)?;
            let logits = logits.to_dtype(dtype)?.to_dtype(DType::F32)?;
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919) % v) as u32).collect();
            let targets = Tensor::new(targets, &Device::Cpu)?;
            ensure!(
                altformers::kernels::cross_entropy::supports(
                    &logits.to_dtype(dtype)?.to_device(&gpu)?,
                    &targets.to_device(&gpu)?
                ),
                "({rows}, {v}) {dtype:?}: the fused kernel should apply"
            );
            let (loss_cpu, grad_cpu) = run(&logits, &targets, &Device::Cpu, DType::F32)?;
            let (loss, grad) = run(&logits, &targets, &gpu, dtype)?;
            let err = device_rel_err(&loss, &loss_cpu)?;
            ensure!(err < 1e-5, "({rows}, {v}) {dtype:?}: loss rel err {err}");
            let err = device_rel_err(&grad, &grad_cpu)?;
            ensure!(err < tol, "({rows}, {v}) {dtype:?}: gradient rel err {err}");
        }
    }
    Ok(())
}

#[test]
fn a_target_out_of_range_gives_nan() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let logits = randn(&[3, 65], 1, DType::F32)?.to_device(&gpu)?;
    let targets = Tensor::new(&[1u32, 65, 2], &gpu)?;
    let rows = altformers::kernels::cross_entropy::row_losses(&logits, &targets)?.to_vec1::<f32>()?;
    ensure!(rows[0].is_finite() && rows[1].is_nan() && rows[2].is_finite(), "row losses {rows:?}");
    Ok(())
}
