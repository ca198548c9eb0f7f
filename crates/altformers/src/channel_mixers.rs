//! Channel mixers: per-position feed-forward networks that follow each sequence mixer. The
//! registry lists them (`model.channel_mixer`); RWKV's channel mix lives with RWKV-4.

use anyhow::Result as AnyResult;
use candle_core::{Result, Tensor};

use crate::config::ModelConfig;
use crate::mixers::{PositionWise, SequenceMixer};
use crate::nn::Linear;
use crate::params::ParamBuilder;

/// GPT-2's MLP: `proj(gelu(fc(x)))`, hidden width `ffn_mult * d`, exact (erf) GELU.
pub struct Mlp {
    fc: Linear,
    proj: Linear,
}

impl PositionWise for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&crate::nn::gelu_erf(&self.fc.forward(x)?)?)
    }
}

/// SwiGLU (Shazeer 2020, arXiv 2002.05202): `down(silu(gate(x)) * up(x))`, hidden width
/// `2/3 * ffn_mult * d` rounded to a multiple of 8, so its parameters match the MLP's.
pub struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl PositionWise for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&(crate::nn::silu(&self.gate.forward(x)?)? * self.up.forward(x)?)?)
    }
}

/// Standard deviation of a block's output projections: GPT-2's 0.02 / sqrt(2 depth).
fn out_std(cfg: &ModelConfig) -> f64 {
    0.02 / (2.0 * cfg.depth as f64).sqrt()
}

/// The MLP of width `ffn_mult * d`, parameters under `pb` (`ffn.*` in a block).
pub fn mlp(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    let d = cfg.width;
    let hidden = (cfg.ffn_mult * d as f64).round() as usize;
    Ok(Box::new(Mlp {
        fc: Linear::new(pb, "fc", d, hidden, 0.02, cfg.bias)?,
        proj: Linear::new(pb, "proj", hidden, d, out_std(cfg), cfg.bias)?,
    }))
}

/// SwiGLU of hidden width `2/3 * ffn_mult * d` (a multiple of 8), parameters under `pb`.
pub fn swiglu(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    let d = cfg.width;
    let hidden = ((2.0 / 3.0 * cfg.ffn_mult * d as f64 / 8.0).round() as usize).max(1) * 8;
    Ok(Box::new(SwiGlu {
        gate: Linear::new(pb, "gate", d, hidden, 0.02, cfg.bias)?,
        up: Linear::new(pb, "up", d, hidden, 0.02, cfg.bias)?,
        down: Linear::new(pb, "down", hidden, d, out_std(cfg), cfg.bias)?,
    }))
}
