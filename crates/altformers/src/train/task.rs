//! Tasks: how a training or evaluation batch is drawn and how its loss is computed. The
//! training step ([`super::step::Trainer`]) is the same for every task.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::{mqar::MqarConfig, random_batch};
use crate::model::Model;
use crate::rng::Rng;

/// One batch: token ids `[B, T]`, targets, and for a task scored at a few positions only,
/// which of the flattened `[B T]` positions (`rows: [N]`, targets `[N]`).
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub rows: Option<Tensor>,
}

pub trait Task {
    /// `size` examples drawn from `rng`, on `device`.
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch>;

    /// Mean loss in nats (f32 or the parameters' dtype); with `dropout`, the model's
    /// training-time dropout draws from it.
    fn loss(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Tensor>;
}

/// Next-byte prediction on random windows of `context` bytes of a split.
pub struct ByteLm<'a> {
    pub split: &'a [u8],
    pub context: usize,
}

impl Task for ByteLm<'_> {
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch> {
        let (inputs, targets) = random_batch(self.split, size, self.context, rng, device)?;
        Ok(Batch { inputs, targets, rows: None })
    }

    fn loss(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Tensor> {
        Ok(Model::loss(&model.forward(&batch.inputs, dropout)?, &batch.targets)?)
    }
}

/// Multi-query associative recall: the loss is scored at the query positions only.
impl Task for MqarConfig {
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch> {
        let (inputs, rows, targets) = MqarConfig::batch(self, size, rng, device)?;
        Ok(Batch { inputs, targets, rows: Some(rows) })
    }

    fn loss(&self, model: &Model, batch: &Batch, _dropout: Option<&mut Rng>) -> Result<Tensor> {
        let rows = batch.rows.as_ref().context("an MQAR batch names its scored rows")?;
        let logits = model.forward_at(&batch.inputs, rows)?.to_dtype(DType::F32)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &batch.targets)?)
    }
}
