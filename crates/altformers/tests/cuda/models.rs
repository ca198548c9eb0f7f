//! Every architecture of the registry on the GPU against the CPU: logits and the gradient of
//! the loss for every parameter, f32 activations (1e-4) and bf16 activations over f32 weights
//! (the mixed precision training uses; 5e-2), in the parallel form, and decoding (prefill,
//! then steps) equal to the GPU's own parallel form.

use altformers::model::Model;
use altformers::registry::ARCHITECTURES;
use altformers::testing::{self, device_rel_err, random_tokens, tiny_config};
use candle_core::{DType, Device, Tensor, D};

/// Reformer routes every token by an argmax over its hash projections, a discrete decision
/// that bf16 rounding flips near a tie; the token then attends to other keys, a legitimate
/// difference rather than an error. Its bf16 run is held to agreement at most positions
/// (f32 is held to the tolerance everywhere, gradients and decoding included), and the
/// attention kernel itself in bf16 to the tolerance on one fixed plan (`reformer.rs`).
fn hashes_tokens(name: &str) -> bool {
    name.starts_with("reformer")
}

/// At least 3/4 of the positions' logits within `tol` (relative, per position) of the
/// reference's.
fn most_positions_agree(name: &str, logits: &Tensor, reference: &Tensor, tol: f64) -> anyhow::Result<()> {
    let a = logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_to(1)?;
    let b = reference.to_dtype(DType::F32)?.flatten_to(1)?;
    let err = ((&a - &b)?.sqr()?.sum(D::Minus1)?.sqrt()? / b.sqr()?.sum(D::Minus1)?.sqrt()?)?.to_vec1::<f32>()?;
    let agree = err.iter().filter(|e| (**e as f64) < tol).count();
    anyhow::ensure!(agree * 4 >= err.len() * 3, "{name} bf16: logits agree at {agree} of {} positions", err.len());
    Ok(())
}

#[test]
fn every_model_on_the_gpu_matches_the_cpu() -> anyhow::Result<()> {
    let gpu = Device::new_cuda(0)?;
    for arch in ARCHITECTURES.iter().filter(|a| a.causal) {
        let name = arch.name;
        // wider than the CPU contract's tiny shape, so the fused kernels' tiled paths run
        let cfg = tiny_config(name, &["model.width=64", "model.heads=4", "model.context=48"])?;
        let tokens = random_tokens(2, 40, cfg.vocab, 3)?;
        let targets = random_tokens(2, 40, cfg.vocab, 4)?;
        let cpu = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        testing::perturb(&cpu, 0.05, 2)?;
        let reference_logits = cpu.forward(&tokens, None)?;
        let reference_grads = Model::loss(&reference_logits, &targets)?.backward()?;
        for (compute, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
            let model = Model::new(&cfg, 7, &gpu, DType::F32)?.with_compute_dtype(compute);
            model.params.assign(cpu.params.tensors(), "the CPU model")?;
            let (t, y) = (tokens.to_device(&gpu)?, targets.to_device(&gpu)?);
            let logits = model.forward(&t, None)?;
            if hashes_tokens(name) && compute == DType::BF16 {
                most_positions_agree(name, &logits, &reference_logits, tol)?;
                continue;
            }
            let err = device_rel_err(&logits, &reference_logits)?;
            anyhow::ensure!(err < tol, "{name} {compute:?}: logits rel err {err}");
            let grads = Model::loss(&logits, &y)?.backward()?;
            for ((pname, p), (_, q)) in model.params.vars().iter().zip(cpu.params.vars().iter()) {
                let (Some(g), Some(r)) = (grads.get(p.var.as_tensor()), reference_grads.get(q.var.as_tensor())) else {
                    anyhow::bail!("{name}: no gradient for {pname}");
                };
                let err = device_rel_err(g, r)?;
                anyhow::ensure!(err < 2.0 * tol, "{name} {compute:?}: gradient of {pname} rel err {err}");
            }
            let modes = testing::model_modes_err(&model, &t, 17)?;
            anyhow::ensure!(modes < tol, "{name} {compute:?}: decoding vs parallel on the GPU rel err {modes}");
        }
    }
    Ok(())
}

/// Every encoder of the registry on the GPU against the CPU: the pooled logits over padded
/// sequences (the classification form ListOps trains) and the gradient of a cross-entropy on
/// them for every parameter, f32 (1e-4) and bf16 activations (5e-2).
#[test]
fn every_encoder_on_the_gpu_matches_the_cpu() -> anyhow::Result<()> {
    let gpu = Device::new_cuda(0)?;
    for arch in ARCHITECTURES.iter().filter(|a| !a.causal) {
        let name = arch.name;
        let cfg = tiny_config(name, &["model.width=64", "model.heads=4", "model.context=48"])?;
        let tokens = random_tokens(3, 40, cfg.vocab, 3)?;
        let keep = testing::keep_first(&[40, 27, 9], 40)?;
        let classes = candle_core::Tensor::new(&[1u32, 4, 7], &Device::Cpu)?;
        let cpu = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        testing::perturb(&cpu, 0.05, 2)?;
        let reference = cpu.pooled_logits(&tokens, &keep, None)?;
        let reference_grads = candle_nn::loss::cross_entropy(&reference, &classes)?.backward()?;
        for (compute, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
            let model = Model::new(&cfg, 7, &gpu, DType::F32)?.with_compute_dtype(compute);
            model.params.assign(cpu.params.tensors(), "the CPU model")?;
            let (t, k, c) = (tokens.to_device(&gpu)?, keep.to_device(&gpu)?, classes.to_device(&gpu)?);
            let logits = model.pooled_logits(&t, &k, None)?;
            if hashes_tokens(name) && compute == DType::BF16 {
                // a mean over every position: a flipped bucket moves it a little
                anyhow::ensure!(device_rel_err(&logits, &reference)? < 0.2, "{name} bf16: pooled logits far off");
                continue;
            }
            let err = device_rel_err(&logits, &reference)?;
            anyhow::ensure!(err < tol, "{name} {compute:?}: pooled logits rel err {err}");
            let grads = candle_nn::loss::cross_entropy(&logits, &c)?.backward()?;
            for ((pname, p), (_, q)) in model.params.vars().iter().zip(cpu.params.vars().iter()) {
                let (Some(g), Some(r)) = (grads.get(p.var.as_tensor()), reference_grads.get(q.var.as_tensor())) else {
                    anyhow::bail!("{name}: no gradient for {pname}");
                };
                let err = device_rel_err(g, r)?;
                anyhow::ensure!(err < 2.0 * tol, "{name} {compute:?}: gradient of {pname} rel err {err}");
            }
        }
    }
    Ok(())
}
