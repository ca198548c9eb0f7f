//! Test helper: can a tiny model of a mixer memorise one batch? (A broken gradient path or a
//! dead initialisation shows up as a loss that barely moves.)

use anyhow::Result;
use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::model::Model;
use crate::testing::random_tokens;
use crate::train::optim::AdamW;

/// Trains `cfg` (f32) for `steps` AdamW steps at learning rate `lr` on one fixed batch of
/// 2 x 16 random tokens; returns the loss before the first step and after the last.
pub fn overfit(cfg: &ModelConfig, steps: usize, lr: f64) -> Result<(f64, f64)> {
    let model = Model::new(cfg, 5, &Device::Cpu, DType::F32)?;
    let t = cfg.context.min(16);
    let x = random_tokens(2, t, cfg.vocab, 21)?;
    let y = random_tokens(2, t, cfg.vocab, 22)?;
    let mut opt = AdamW::new(&model.params, 0.9, 0.99, 1e-8, 0.0)?;
    let loss_now = || -> Result<f64> { Ok(Model::loss(&model.forward(&x, None)?, &y)?.to_scalar::<f32>()? as f64) };
    let first = loss_now()?;
    for _ in 0..steps {
        let loss = Model::loss(&model.forward(&x, None)?, &y)?;
        opt.step(&loss.backward()?, lr, 1.0)?;
    }
    Ok((first, loss_now()?))
}
