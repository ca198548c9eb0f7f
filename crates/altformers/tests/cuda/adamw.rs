//! The fused AdamW step on the GPU against the tensor-expression step on the CPU: same
//! weights after several steps (with clipping active, decayed and undecayed tensors, a
//! tensor larger than one block and one smaller, learning-rate multiples other than 1 on
//! three of them), same gradient norms; a non-finite gradient is reported and leaves every
//! weight untouched.

use altformers::params::{ParamBuilder, ParamStore};
use altformers::testing::{device_rel_err, randn};
use altformers::train::optim::AdamW;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

const SHAPES: [(&str, &[usize]); 4] = [("emb.weight", &[37, 16]), ("w", &[3000]), ("b", &[5]), ("big", &[64, 97])];

/// Learning-rate multiples by tensor (decayed "w" and "big", undecayed "b").
const LR_SCALES: [(&str, f64); 3] = [("w", 3.0), ("b", 0.5), ("big", 0.25)];

fn store(dev: &Device) -> Result<ParamStore> {
    let pb = ParamBuilder::new(3, dev, DType::F32);
    for (name, dims) in SHAPES {
        let scale = LR_SCALES.iter().find(|(n, _)| *n == name).map_or(1.0, |(_, s)| *s);
        let pb = pb.with_lr_scale(scale)?;
        if name == "emb.weight" || name == "b" {
            pb.normal_no_decay(name, dims, 0.5)?;
        } else {
            pb.normal(name, dims, 0.5)?;
        }
    }
    Ok(pb.into_store())
}

/// Gradients of `sum(w * r)` for fixed random `r` per tensor and step: `dL/dw = r`.
fn grads(store: &ParamStore, step: u64, poison: bool) -> Result<candle_core::backprop::GradStore> {
    let mut loss: Option<Tensor> = None;
    for (i, (name, p)) in store.vars().into_iter().enumerate() {
        let dev = p.var.device().clone();
        let mut r = randn(p.var.dims(), 100 * step + i as u64, DType::F32)?.to_device(&dev)?;
        if poison && name == "w" {
            r = (r / 0.0)?; // inf and nan
        }
        let term = (p.var.as_tensor() * r)?.sum_all()?;
        loss = Some(match loss {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    Ok(loss.unwrap().backward()?)
}

#[test]
fn fused_step_matches_the_cpu_step() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (cpu_store, gpu_store) = (store(&Device::Cpu)?, store(&gpu)?);
    let mut cpu_opt = AdamW::new(&cpu_store, 0.9, 0.99, 1e-8, 0.1)?.decay_embeddings();
    let mut gpu_opt = AdamW::new(&gpu_store, 0.9, 0.99, 1e-8, 0.1)?.decay_embeddings();
    for step in 0..6 {
        // clip 20 is below the gradient norm (about 23), so the scaling is exercised
        let clip = if step % 2 == 0 { 20.0 } else { 0.0 };
        let n_cpu = cpu_opt.step(&grads(&cpu_store, step, false)?, 1e-2, clip)?.value()?;
        let n_gpu = gpu_opt.step(&grads(&gpu_store, step, false)?, 1e-2, clip)?.value()?;
        ensure!(n_cpu > 20.0, "the clip is not exercised (norm {n_cpu})");
        ensure!((n_cpu - n_gpu).abs() / n_cpu < 1e-5, "step {step}: norms {n_cpu} vs {n_gpu}");
    }
    for ((name, c), (_, g)) in cpu_store.tensors().iter().zip(gpu_store.tensors().iter()) {
        let err = device_rel_err(g, c)?;
        ensure!(err < 1e-4, "{name}: relative error {err}");
    }
    ensure!(cpu_opt.t == 6 && gpu_opt.t == 6);
    Ok(())
}

#[test]
fn non_finite_gradient_is_reported_and_changes_nothing() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let s = store(&gpu)?;
    let mut opt = AdamW::new(&s, 0.9, 0.99, 1e-8, 0.1)?;
    opt.step(&grads(&s, 0, false)?, 1e-2, 1.0)?;
    let before: Vec<Vec<f32>> =
        s.tensors().values().map(|t| t.flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?;
    // the fused step reports it where the norm is read
    let err = opt.step(&grads(&s, 1, true)?, 1e-2, 1.0)?.value().unwrap_err();
    ensure!(err.to_string().contains("gradient norm"), "unexpected error: {err}");
    let after: Vec<Vec<f32>> =
        s.tensors().values().map(|t| t.flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?;
    ensure!(before == after, "a weight changed on a non-finite gradient");
    // (the step count does advance: the host does not wait to learn the norm; a run stops
    // when it reads it)
    Ok(())
}
