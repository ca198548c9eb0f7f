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

impl Batch {
    /// Worker `rank`'s slice of the rows, of `world` equal slices (data-parallel training:
    /// the mean of the slices' mean losses is the batch's mean loss). Only tasks scored at
    /// every position (the language model) shard.
    pub fn shard(&self, rank: usize, world: usize) -> Result<Batch> {
        self.cut(0, rank, world, ("data-parallel training", "train.batch_size must be a multiple of the workers"))
    }

    /// Micro-batch `index` of `count` of a worker's rows (gradient accumulation,
    /// `train.accumulate`): equal slices of the rows, as [`Batch::shard`].
    pub fn micro_batch(&self, index: usize, count: usize) -> Result<Batch> {
        self.cut(
            0,
            index,
            count,
            (
                "gradient accumulation (train.accumulate)",
                "train.batch_size must be a multiple of the workers times train.accumulate",
            ),
        )
    }

    /// Worker `rank`'s slice of every row's positions, of `world` equal slices (sequence
    /// parallelism: each worker's mean loss over its positions, averaged, is the batch's).
    pub fn positions(&self, rank: usize, world: usize) -> Result<Batch> {
        self.cut(1, rank, world, ("sequence-parallel training", "model.context must be a multiple of the workers"))
    }

    /// Slice `rank` of `world` equal slices along `dim` of the inputs and targets; `names`
    /// (what cuts, the setting that must divide) for the errors.
    fn cut(&self, dim: usize, rank: usize, world: usize, (cutter, rule): (&str, &str)) -> Result<Batch> {
        if self.rows.is_some() {
            anyhow::bail!("{cutter} splits the language-model task only");
        }
        let n = self.inputs.dim(dim)?;
        if world == 0 || !n.is_multiple_of(world) || rank >= world {
            let what = if dim == 0 { "a batch" } else { "sequences" };
            anyhow::bail!("{cutter}: {what} of {n} cannot be cut into {world} equal slices ({rule})");
        }
        let len = n / world;
        Ok(Batch {
            inputs: self.inputs.narrow(dim, rank * len, len)?,
            targets: self.targets.narrow(dim, rank * len, len)?,
            rows: None,
        })
    }

    /// Worker `rank`'s share of the batch, of `world`: its slice of the positions with
    /// `sequence_parallel`, of the rows otherwise; alone, the whole batch.
    pub fn share(self, (rank, world): (usize, usize), sequence_parallel: bool) -> Result<Batch> {
        match world {
            1 => Ok(self),
            _ if sequence_parallel => self.positions(rank, world),
            _ => self.shard(rank, world),
        }
    }
}

/// A batch's mean loss and the logits it came from (`[.., C]`: every scored position's
/// scores over its classes), for terms on the logits such as L2Wrap.
pub struct Scored {
    pub loss: Tensor,
    pub logits: Tensor,
}

/// `Sync`: a CPU step scores slices of its batch on several threads at once (`Trainer::slices`).
pub trait Task: Sync {
    /// `size` examples drawn from `rng`, on `device`.
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch>;

    /// Mean loss in nats (f32 or the parameters' dtype) and the logits it was computed from;
    /// with `dropout`, the model's training-time dropout draws from it.
    fn scored(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Scored>;

    /// The mean loss of [`Task::scored`].
    fn loss(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Tensor> {
        Ok(self.scored(model, batch, dropout)?.loss)
    }

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
pub struct ByteLm<'a, T = u8> {
    /// Bytes, or token ids.
    pub split: &'a [T],
    pub context: usize,
}

impl<T: Copy + Into<u32> + Sync> Task for ByteLm<'_, T> {
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch> {
        let (inputs, targets) = random_batch(self.split, size, self.context, rng, device)?;
        Ok(Batch { inputs, targets, rows: None })
    }

    fn scored(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Scored> {
        let logits = model.forward(&batch.inputs, dropout)?;
        Ok(Scored { loss: Model::loss(&logits, &batch.targets)?, logits })
    }
}

/// Multi-query associative recall: the loss is scored at the query positions only.
impl Task for MqarConfig {
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch> {
        let (inputs, rows, targets) = MqarConfig::batch(self, size, rng, device)?;
        Ok(Batch { inputs, targets, rows: Some(rows) })
    }

    fn scored(&self, model: &Model, batch: &Batch, _dropout: Option<&mut Rng>) -> Result<Scored> {
        let rows = batch.rows.as_ref().context("an MQAR batch names its scored rows")?;
        let logits = model.forward_at(&batch.inputs, rows)?.to_dtype(DType::F32)?;
        Ok(Scored { loss: crate::nn::cross_entropy(&logits, &batch.targets)?, logits })
    }
}

/// ListOps (LRA's, [`crate::data::listops`]) as sequence classification over 10 classes,
/// the class logits being the head's rows of the ten digit bytes `0`-`9` (read from the
/// per-byte head every model already has: a separate class head would leave the causal
/// models' reading, the byte after the expression, without its natural meaning). How a model
/// reads the class is its [`Readout`]. Examples come from the first `examples` indices of
/// `split` (a fixed training set, as LRA's 96K).
pub struct ListOps {
    pub config: ListOpsConfig,
    pub split: Split,
    pub examples: u64,
    pub readout: Readout,
}

/// How a model's class is read from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readout {
    /// A causal model (the "causal, pooling the last position"): the expression
    /// left-padded to the batch's longest, the class read at the last position: the model
    /// predicts the byte after the expression, restricted to the answers.
    LastPosition,
    /// An encoder: the expression right-padded (real tokens keep positions `0..n`), the mean
    /// over real positions ([`Model::pooled_logits`], the key-padding mask from the pad byte).
    MeanPool,
}

impl Readout {
    /// A causal model reads its last position; an encoder pools.
    pub fn of(model: &Model) -> Self {
        if model.causal() {
            Readout::LastPosition
        } else {
            Readout::MeanPool
        }
    }
}

/// The byte padding fills with (not a ListOps token, so the mask follows from the tokens).
const LISTOPS_PAD: u32 = b' ' as u32;

impl ListOps {
    /// Logits of the ten classes (digit bytes): `[B, 10]`, f32; with `dropout`, the training
    /// form (the last-position read has none: it scores rows without the dropout path).
    fn class_logits(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Tensor> {
        let logits = match self.readout {
            Readout::LastPosition => {
                let rows = batch.rows.as_ref().context("a last-position ListOps batch names its scored rows")?;
                model.forward_at(&batch.inputs, rows)?
            }
            Readout::MeanPool => {
                let keep = batch.inputs.ne(LISTOPS_PAD)?;
                model.pooled_logits(&batch.inputs, &keep, dropout)?
            }
        };
        Ok(logits.to_dtype(DType::F32)?.narrow(D::Minus1, b'0' as usize, 10)?)
    }

    /// The batch of examples `indices` of the split, padded as the readout needs.
    pub fn batch_of(&self, indices: &[u64], device: &Device) -> Result<Batch> {
        let size = indices.len();
        anyhow::ensure!(size > 0, "a ListOps batch of no examples");
        let examples = indices.iter().map(|&i| self.config.example(self.split, i)).collect::<Result<Vec<_>>>()?;
        let t = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
        let mut inputs = Vec::with_capacity(size * t);
        for e in &examples {
            let pad = std::iter::repeat_n(LISTOPS_PAD, t - e.tokens.len());
            let tokens = e.tokens.iter().map(|&b| b as u32);
            match self.readout {
                Readout::LastPosition => inputs.extend(pad.chain(tokens)),
                Readout::MeanPool => inputs.extend(tokens.chain(pad)),
            }
        }
        let labels: Vec<u32> = examples.iter().map(|e| e.label as u32).collect();
        let rows = match self.readout {
            Readout::LastPosition => {
                let rows: Vec<u32> = (0..size).map(|i| (i * t + t - 1) as u32).collect();
                Some(Tensor::from_vec(rows, size, device)?)
            }
            Readout::MeanPool => None,
        };
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (size, t), device)?,
            targets: Tensor::from_vec(labels, size, device)?,
            rows,
        })
    }

    /// Mean loss and accuracy over examples `0..n` of the split (every one once), in batches
    /// of at most `batch`.
    pub fn evaluate(&self, model: &Model, n: u64, batch: usize) -> Result<(f64, f64)> {
        anyhow::ensure!(n > 0 && batch > 0, "evaluating ListOps on no examples");
        let (mut loss, mut right) = (0.0, 0.0);
        // one batch of indices at a time: `n` may be larger than memory holds (it is only a
        // count of examples to generate)
        for first in (0..n).step_by(batch) {
            let chunk: Vec<u64> = (first..n.min(first.saturating_add(batch as u64))).collect();
            let b = self.batch_of(&chunk, model.device())?;
            let logits = self.class_logits(model, &b, None)?;
            let l = crate::nn::cross_entropy(&logits, &b.targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss += l * chunk.len() as f64;
            right += argmax_hits(&logits, &b.targets)?.0;
        }
        Ok((loss / n as f64, right / n as f64))
    }
}

impl Task for ListOps {
    fn batch(&self, size: usize, rng: &mut Rng, device: &Device) -> Result<Batch> {
        anyhow::ensure!(self.examples > 0, "a ListOps task of no examples");
        let indices: Vec<u64> = (0..size).map(|_| rng.below(self.examples as usize) as u64).collect();
        self.batch_of(&indices, device)
    }

    fn scored(&self, model: &Model, batch: &Batch, dropout: Option<&mut Rng>) -> Result<Scored> {
        let logits = self.class_logits(model, batch, dropout)?;
        Ok(Scored { loss: crate::nn::cross_entropy(&logits, &batch.targets)?, logits })
    }

    fn hits(&self, model: &Model, batch: &Batch) -> Result<(f64, f64)> {
        argmax_hits(&self.class_logits(model, batch, None)?, &batch.targets)
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

    /// A ListOps batch for a causal model is left-padded, scored at each sequence's last
    /// position against its label, and a tiny causal model learns a few examples by heart
    /// through this loss; for an encoder it is right-padded, pooled over the real positions,
    /// and a tiny encoder learns them too.
    #[test]
    fn listops_is_classification_at_the_last_position_or_pooled() -> Result<()> {
        let config = ListOpsConfig { min_len: 5, max_len: 20, ..Default::default() };
        let task = ListOps { config, split: Split::Train, examples: 4, readout: Readout::LastPosition };
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
        let pooled = ListOps { readout: Readout::MeanPool, ..task };
        let right = pooled.batch(4, &mut Rng::new(3), &Device::Cpu)?;
        assert!(right.rows.is_none());
        for (l, r) in inputs.iter().zip(right.inputs.to_vec2::<u32>()?) {
            let strip = |v: &[u32]| v.iter().copied().filter(|&c| c != LISTOPS_PAD).collect::<Vec<_>>();
            assert_eq!(strip(l), strip(&r), "the same examples, padded on the other side");
            assert!(r[0] != LISTOPS_PAD, "an encoder's batch is padded at the end");
        }
        for (name, task, batch) in [("transformer", &task, &batch), ("transformer-encoder", &pooled, &right)] {
            let cfg = tiny_config(name, &["model.context=24"])?;
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            assert_eq!(Readout::of(&model), task.readout);
            let mut opt = crate::train::optim::AdamW::new(&model.params, 0.9, 0.99, 1e-8, 0.0)?;
            let first = task.loss(&model, batch, None)?.to_scalar::<f32>()?;
            for _ in 0..60 {
                opt.step(&task.loss(&model, batch, None)?.backward()?, 3e-3, 1.0)?;
            }
            let last = task.loss(&model, batch, None)?.to_scalar::<f32>()?;
            assert!(last < 0.2 * first, "{name}: the ListOps loss went from {first} to {last} only");
            assert_eq!(task.hits(&model, batch)?, (4.0, 4.0), "{name}");
        }
        Ok(())
    }

    /// Evaluation scores examples 0..n once each: its accuracy is the hits of one batch of them.
    #[test]
    fn listops_evaluation_scores_every_example_once() -> Result<()> {
        let config = ListOpsConfig { min_len: 5, max_len: 20, ..Default::default() };
        let task = ListOps { config, split: Split::Validation, examples: 1, readout: Readout::MeanPool };
        let model = Model::new(&tiny_config("transformer-encoder", &[])?, 1, &Device::Cpu, DType::F32)?;
        let (loss, accuracy) = task.evaluate(&model, 7, 3)?;
        let all = task.batch_of(&(0..7).collect::<Vec<_>>(), &Device::Cpu)?;
        let (right, n) = task.hits(&model, &all)?;
        assert_eq!((accuracy, n), (right / 7.0, 7.0));
        let want = task.loss(&model, &all, None)?.to_scalar::<f32>()? as f64;
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        Ok(())
    }
}
