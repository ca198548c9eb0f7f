//! Tasks: how a training or evaluation batch is drawn and how its loss is computed. The
//! training step ([`super::step::Trainer`]) is the same for every task.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::data::listops::{ListOpsConfig, Split};
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

    /// How many scored positions the arg-max prediction gets right, and how many were scored.
    fn hits(&self, model: &Model, batch: &Batch) -> Result<(f64, f64)> {
        let logits = match &batch.rows {
            Some(rows) => model.forward_at(&batch.inputs, rows)?,
            None => model.forward(&batch.inputs, None)?.flatten_to(1)?,
        };
        argmax_hits(&logits, &batch.targets)
    }
}

/// How many rows of `logits: [N, C]` have their arg-max at `targets` (`[N]` in any shape),
/// and N.
fn argmax_hits(logits: &Tensor, targets: &Tensor) -> Result<(f64, f64)> {
    let targets = targets.flatten_all()?;
    let right = logits.argmax(D::Minus1)?.eq(&targets)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok((right as f64, targets.dim(0)? as f64))
}

/// The fraction of scored positions predicted right over `examples` fresh examples drawn from
/// `rng`, in batches of at most `batch` (and at least 16).
pub fn accuracy(model: &Model, task: &dyn Task, examples: usize, batch: usize, rng: &mut Rng) -> Result<f64> {
    let (mut right, mut total) = (0.0, 0.0);
    let mut left = examples;
    while left > 0 {
        let b = left.min(batch.max(16));
        left -= b;
        let (r, n) = task.hits(model, &task.batch(b, rng, model.device())?)?;
        (right, total) = (right + r, total + n);
    }
    Ok(right / f64::max(total, 1.0))
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

/// ListOps as classification by a causal model (the issue's "causal, pooling the last
/// position"): the expression's bytes, left-padded with spaces to the batch's longest, and the
/// class read at the last position from the head's rows of the ten digit bytes: the model
/// predicts the byte after the expression, restricted to the answers. Examples come from the
/// first `examples` indices of `split` (a fixed training set, as LRA's 96K).
pub struct ListOps {
    pub config: ListOpsConfig,
    pub split: Split,
    pub examples: u64,
}

/// The byte left padding fills with (not a ListOps token).
const LISTOPS_PAD: u32 = b' ' as u32;

impl ListOps {
    /// Logits of the ten classes (digit bytes) at the scored rows: `[N, 10]`, f32.
    fn class_logits(model: &Model, batch: &Batch) -> Result<Tensor> {
        let rows = batch.rows.as_ref().context("a ListOps batch names its scored rows")?;
        let logits = model.forward_at(&batch.inputs, rows)?.to_dtype(DType::F32)?;
        Ok(logits.narrow(D::Minus1, b'0' as usize, 10)?)
    }
}

impl Task for ListOps {
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch> {
        anyhow::ensure!(self.examples > 0, "a ListOps task of no examples");
        let examples = (0..size)
            .map(|_| self.config.example(self.split, rng.below(self.examples as usize) as u64))
            .collect::<Result<Vec<_>>>()?;
        let t = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
        let mut inputs = Vec::with_capacity(size * t);
        for e in &examples {
            inputs.extend(std::iter::repeat_n(LISTOPS_PAD, t - e.tokens.len()));
            inputs.extend(e.tokens.iter().map(|&b| b as u32));
        }
        let rows: Vec<u32> = (0..size).map(|i| (i * t + t - 1) as u32).collect();
        let labels: Vec<u32> = examples.iter().map(|e| e.label as u32).collect();
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (size, t), device)?,
            targets: Tensor::from_vec(labels, size, device)?,
            rows: Some(Tensor::from_vec(rows, size, device)?),
        })
    }

    fn loss(&self, model: &Model, batch: &Batch, _dropout: Option<&mut Rng>) -> Result<Tensor> {
        Ok(candle_nn::loss::cross_entropy(&Self::class_logits(model, batch)?, &batch.targets)?)
    }

    fn hits(&self, model: &Model, batch: &Batch) -> Result<(f64, f64)> {
        argmax_hits(&Self::class_logits(model, batch)?, &batch.targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_config;

    /// `hits` scores every position of a language-model batch and only the query rows of an
    /// MQAR batch, counting the arg-max predictions equal to the targets.
    #[test]
    fn hits_count_the_scored_positions_predicted_right() -> Result<()> {
        let model = Model::new(&tiny_config("transformer", &["model.vocab=16"])?, 1, &Device::Cpu, DType::F32)?;
        let text: Vec<u8> = (0..200u32).map(|i| (i * 7 % 16) as u8).collect();
        let lm = ByteLm { split: &text, context: 8 };
        let batch = lm.batch(3, &mut Rng::new(1), &Device::Cpu)?;
        let (right, total) = lm.hits(&model, &batch)?;
        let pred: Vec<u32> = model.forward(&batch.inputs, None)?.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
        let want: Vec<u32> = batch.targets.flatten_all()?.to_vec1()?;
        assert_eq!(total, 24.0);
        assert_eq!(right, pred.iter().zip(&want).filter(|(p, w)| p == w).count() as f64);

        let task = MqarConfig { vocab: 16, seq_len: 16, pairs: 2, alpha: 0.01 };
        let batch = Task::batch(&task, 4, &mut Rng::new(2), &Device::Cpu)?;
        let (right, total) = task.hits(&model, &batch)?;
        assert_eq!(total, batch.rows.as_ref().unwrap().dim(0)? as f64);
        assert!((0.0..=total).contains(&right));
        Ok(())
    }

    /// A ListOps batch is left-padded, scored at each sequence's last position against its
    /// label, and a tiny causal model learns a few examples by heart through this loss.
    #[test]
    fn listops_is_classification_at_the_last_position() -> Result<()> {
        let config = ListOpsConfig { min_len: 5, max_len: 20, ..Default::default() };
        let task = ListOps { config, split: Split::Train, examples: 4 };
        let batch = task.batch(4, &mut Rng::new(3), &Device::Cpu)?;
        let (b, t) = batch.inputs.dims2()?;
        let inputs: Vec<Vec<u32>> = batch.inputs.to_vec2()?;
        let labels: Vec<u32> = batch.targets.to_vec1()?;
        assert_eq!(
            batch.rows.as_ref().unwrap().to_vec1::<u32>()?,
            (0..b as u32).map(|i| i * t as u32 + t as u32 - 1).collect::<Vec<_>>()
        );
        for (row, &label) in inputs.iter().zip(&labels) {
            let expr: Vec<u8> = row.iter().skip_while(|&&c| c == LISTOPS_PAD).map(|&c| c as u8).collect();
            assert_eq!(
                crate::data::listops::evaluate(&expr)? as u32,
                label,
                "the target is not the expression's value"
            );
        }
        let cfg = tiny_config("transformer", &["model.context=24"])?;
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let mut opt = crate::train::optim::AdamW::new(&model.params, 0.9, 0.99, 1e-8, 0.0)?;
        let first = task.loss(&model, &batch, None)?.to_scalar::<f32>()?;
        for _ in 0..60 {
            opt.step(&task.loss(&model, &batch, None)?.backward()?, 3e-3, 1.0)?;
        }
        let last = task.loss(&model, &batch, None)?.to_scalar::<f32>()?;
        assert!(last < 0.2 * first, "the ListOps loss went from {first} to {last} only");
        assert_eq!(task.hits(&model, &batch)?, (4.0, 4.0));
        Ok(())
    }
}
