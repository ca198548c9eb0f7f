//! The fused layer norm (`kernels/layernorm.cu`) against nn::LayerNorm's tensor expression on
//! the CPU: outputs and the gradients of x, weight and bias on fresh random inputs (random
//! weight and bias, not ones and zeros), f32 and bf16 activations, with and without a bias,
//! widths below, at and above a warp's multiple, and more rows than one launch's warps; the
//! register-resident kernels at one to four chunks of 8 columns a lane (widths 64, 384, 768,
//! 1024), the scalar ones where those do not apply (31, 129, and 1040: past 1024).

use altformers::nn::LayerNorm;
use altformers::testing::{device_rel_err, randn};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};

/// (y, dx, dw, db) of `sum(LN(x) * r)` on `dev`, weight and bias in f32.
fn run(x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: &Tensor, dev: &Device, dtype: DType) -> Result<Vec<Tensor>> {
    run_with(x, w, b, r, dev, dtype, DType::F32)
}

/// [`run`] with weight and bias in `param_dtype` (bf16: a bf16 model's).
fn run_with(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    r: &Tensor,
    dev: &Device,
    dtype: DType,
    param_dtype: DType,
) -> Result<Vec<Tensor>> {
    let xv = Var::from_tensor(&x.to_dtype(dtype)?.to_device(dev)?)?;
    let wv = Var::from_tensor(&w.to_dtype(param_dtype)?.to_device(dev)?)?;
    let bv = b.map(|b| Var::from_tensor(&b.to_dtype(param_dtype)?.to_device(dev)?)).transpose()?;
    let ln = LayerNorm { weight: wv.as_tensor().clone(), bias: bv.as_ref().map(|b| b.as_tensor().clone()), eps: 1e-5 };
    let y = ln.forward(xv.as_tensor())?;
    ensure!(y.dtype() == dtype, "output dtype {:?}, expected {dtype:?}", y.dtype());
    let grads = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
    let mut out = vec![y.to_dtype(DType::F32)?, grads.get(xv.as_tensor()).expect("dx").to_dtype(DType::F32)?];
    out.push(grads.get(wv.as_tensor()).expect("dw").to_dtype(DType::F32)?);
    if let Some(bv) = &bv {
        out.push(grads.get(bv.as_tensor()).expect("db").to_dtype(DType::F32)?);
    }
    Ok(out)
}

#[test]
fn layer_norm_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for (rows, d) in [(3usize, 31usize), (1000, 64), (37, 129), (300, 384), (9000, 768), (50, 1024), (20, 1040)] {
        for bias in [true, false] {
            for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
                let x = randn(&[rows, d], (rows * d) as u64, DType::F32)?.affine(3.0, 1.5)?;
                let w = randn(&[d], 7, DType::F32)?;
                let b = randn(&[d], 8, DType::F32)?;
                let r = randn(&[rows, d], 9, DType::F32)?;
                let b = bias.then_some(&b);
                // the CPU reference sees the same (rounded) activations
                let x = x.to_dtype(dtype)?.to_dtype(DType::F32)?;
                let cpu = run(&x, &w, b, &r, &Device::Cpu, DType::F32)?;
                let ours = run(&x, &w, b, &r, &gpu, dtype)?;
                ensure!(cpu.len() == ours.len(), "gradient count differs");
                for (name, (o, c)) in ["y", "dx", "dw", "db"].iter().zip(ours.iter().zip(cpu.iter())) {
                    let err = device_rel_err(o, c)?;
                    ensure!(err < tol, "({rows}, {d}) bias {bias} {dtype:?}: {name} rel err {err}");
                }
            }
        }
    }
    Ok(())
}

/// A bf16 model's norm (bf16 activations, weight and bias) runs fused too: against the CPU
/// in f32 on the same rounded numbers.
#[test]
fn bf16_parameters_match_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (rows, d) = (37, 768);
    let round = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let x = round(randn(&[rows, d], 1, DType::F32)?.affine(3.0, 1.5)?)?;
    let w = round(randn(&[d], 2, DType::F32)?)?;
    let b = round(randn(&[d], 3, DType::F32)?)?;
    let r = randn(&[rows, d], 4, DType::F32)?;
    let (w16, b16) = (w.to_dtype(DType::BF16)?.to_device(&gpu)?, b.to_dtype(DType::BF16)?.to_device(&gpu)?);
    ensure!(
        altformers::kernels::layernorm::supports(&x.to_dtype(DType::BF16)?.to_device(&gpu)?, &w16, Some(&b16)),
        "bf16 parameters under bf16 activations should run fused"
    );
    let cpu = run(&x, &w, Some(&b), &r, &Device::Cpu, DType::F32)?;
    let ours = run_with(&x, &w, Some(&b), &r, &gpu, DType::BF16, DType::BF16)?;
    for (name, (o, c)) in ["y", "dx", "dw", "db"].iter().zip(ours.iter().zip(cpu.iter())) {
        let err = device_rel_err(o, c)?;
        ensure!(err < 3e-2, "bf16 parameters: {name} rel err {err}");
    }
    Ok(())
}
