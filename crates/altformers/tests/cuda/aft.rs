//! AFT's pairwise form on the GPU with a channel whose keys sit far below the others': the
//! elements whose f32 denominators underflow are recomputed in f64 (`mixers::aft`), on the
//! device; outputs and gradients must equal the CPU's f64 computation.

use altformers::mixers::aft;
use altformers::testing::{device_rel_err, randn};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

#[test]
fn pairwise_with_a_dominated_channel_matches_f64() -> Result<()> {
    let levels: Vec<f64> = (0..16).map(|c| if c == 0 { -100.0 } else { 50.0 }).collect();
    let k = randn(&[2, 24, 16], 1, DType::F64)?.broadcast_add(&Tensor::from_vec(levels, 16, &Device::Cpu)?)?;
    let v = randn(&[2, 24, 16], 2, DType::F64)?;
    let bias = randn(&[1, 24, 24], 3, DType::F64)?;
    let weights = randn(&[2, 24, 16], 4, DType::F64)?;
    // output, dk, dv of sum(pairwise(k, v, bias) * weights)
    let run = |dev: &Device, dtype: DType| -> Result<Vec<Tensor>> {
        let on = |x: &Tensor| x.to_device(dev)?.to_dtype(dtype);
        let (kv, vv) = (Var::from_tensor(&on(&k)?)?, Var::from_tensor(&on(&v)?)?);
        let y = aft::pairwise(kv.as_tensor(), vv.as_tensor(), &on(&bias)?, 0)?;
        let grads = (&y * on(&weights)?)?.sum_all()?.backward()?;
        let grad = |x: &Var| grads.get(x).cloned().context("no gradient");
        Ok(vec![y, grad(&kv)?, grad(&vv)?])
    };
    let want = run(&Device::Cpu, DType::F64)?;
    let got = run(&Device::new_cuda(0)?, DType::F32)?;
    for ((what, g), w) in ["output", "dk", "dv"].iter().zip(&got).zip(&want) {
        let err = device_rel_err(g, w).with_context(|| what.to_string())?;
        ensure!(err < 1e-4, "{what}: relative error {err:.3e}");
    }
    Ok(())
}
