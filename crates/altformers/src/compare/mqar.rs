//! Training and scoring models on multi-query associative recall.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, TrainConfig};
use crate::data::mqar::MqarConfig;
use crate::model::Model;
pub use crate::results::MqarOptimizer;
use crate::results::{MqarResult, CURVE_EXAMPLES};
use crate::rng::{stream, Rng};
use crate::train::step::Trainer;
use crate::train::task::accuracy;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MqarSettings {
    pub vocab: usize,
    /// (sequence length, key-value pairs) tasks.
    pub tasks: Vec<(usize, usize)>,
    pub widths: Vec<usize>,
    pub depth: usize,
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rates tried for every (model, task, width); as in Zoology, the report
    /// takes the best accuracy over them.
    pub lrs: Vec<f64>,
    pub eval_examples: usize,
    /// Every this many steps (0: never) the accuracy on [`CURVE_EXAMPLES`] held-out queries
    /// is logged and kept in the row's `curve`: how many steps a model needs to solve a task.
    #[serde(default)]
    pub curve_every: usize,
    /// The optimizer around each run's peak rate (Zoology's settings by default).
    #[serde(default)]
    pub optimizer: MqarOptimizer,
    /// Head width per model (`[mqar.head_width] retnet = 256`): its heads are then
    /// `max(1, width / head_width)`, so the paper's head width where the model width allows
    /// and one head of the whole width below it. Models not named take 4 heads from width 64,
    /// 2 below.
    #[serde(default)]
    pub head_width: std::collections::BTreeMap<String, usize>,
    /// A model's own `[model]` settings for the recall runs, laid over its defaults
    /// (`[mqar.per_model.transformer] position = "rope"`); the rows record them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub per_model: std::collections::BTreeMap<String, toml::Table>,
}

/// A smoke-sized grid (one task of 16 tokens and 2 pairs, width 16, one layer, 2 steps of
/// 4): what tests start from, changing the fields they are about.
impl Default for MqarSettings {
    fn default() -> Self {
        Self {
            vocab: 16,
            tasks: vec![(16, 2)],
            widths: vec![16],
            depth: 1,
            steps: 2,
            batch_size: 4,
            lrs: vec![1e-3],
            eval_examples: 8,
            curve_every: 0,
            optimizer: MqarOptimizer::default(),
            head_width: Default::default(),
            per_model: Default::default(),
        }
    }
}

impl MqarSettings {
    /// What the types cannot rule out, checked before the grid starts: an empty list would
    /// run nothing and report an empty table; no evaluation examples scored 0 / 0.
    pub fn validate(&self) -> Result<()> {
        for (key, empty) in [
            ("[mqar] tasks", self.tasks.is_empty()),
            ("[mqar] widths", self.widths.is_empty()),
            ("[mqar] lrs", self.lrs.is_empty()),
        ] {
            anyhow::ensure!(!empty, "{key} is empty: give at least one value");
        }
        crate::util::counts_at_least_one(&[("[mqar] widths", &self.widths)])?;
        crate::util::positive(&[("[mqar] eval_examples", self.eval_examples as f64)])?;
        for &lr in &self.lrs {
            self.train_config(lr, 0)?;
        }
        Ok(())
    }

    /// The training settings of one run at peak rate `lr`.
    pub fn train_config(&self, lr: f64, seed: u64) -> Result<TrainConfig> {
        let o = &self.optimizer;
        let train = TrainConfig {
            batch_size: self.batch_size,
            accumulate: 1,
            steps: self.steps,
            lr,
            min_lr: lr * o.min_lr_fraction,
            warmup_steps: (self.steps as f64 * o.warmup_fraction) as usize,
            decay_steps: self.steps,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            decay_embeddings: false,
            grad_clip: o.grad_clip,
            l2wrap: Default::default(),
            eval_every: self.steps,
            eval_batches: 1,
            seed,
        };
        train.validate().map_err(|e| {
            anyhow::anyhow!(
                "invalid [mqar] settings (steps {}, batch_size {}, lr {lr}, optimizer {o:?}): {e}",
                self.steps,
                self.batch_size
            )
        })?;
        Ok(train)
    }
}

/// The model configuration for one MQAR run of `architecture` at `width`: its defaults with
/// `s.per_model`'s table for it laid over them, `s.depth` layers, heads from `s.head_width`.
pub fn mqar_model(architecture: &str, task: &MqarConfig, width: usize, s: &MqarSettings) -> Result<ModelConfig> {
    let arch = crate::registry::find(architecture)?;
    let mut m = match s.per_model.get(architecture) {
        Some(own) => {
            let mut tables = toml::Table::new();
            tables.insert("model".into(), toml::Value::Table(own.clone()));
            let over = crate::config::Overrides { tables: vec![toml::Value::Table(tables)], sets: vec![] };
            arch.config(&over).with_context(|| format!("[mqar.per_model.{architecture}]"))?.model
        }
        None => arch.defaults().model,
    };
    let depth = s.depth;
    m.heads = match s.head_width.get(architecture).copied() {
        Some(0) => anyhow::bail!("[mqar.head_width] of {architecture} must be positive"),
        Some(hw) => (width / hw).max(1),
        None if width >= 64 => 4,
        None => 2,
    };
    (m.width, m.depth, m.context, m.vocab, m.dropout) = (width, depth, task.seq_len, task.vocab, 0.0);
    arch.check(&m)?;
    Ok(m)
}

/// `[mqar.per_model]`'s table of a model on one line, as the rows record it.
pub fn overrides_text(table: &toml::Table) -> String {
    table.to_string().trim().replace('\n', ", ")
}

/// Trains `mixer` at `width` on `task` (peak learning rate `lr`, the rest from `s`) and
/// scores it on fresh examples.
pub fn train_and_score(
    mixer: &str,
    task: &MqarConfig,
    width: usize,
    s: &MqarSettings,
    lr: f64,
    device: &Device,
    seed: u64,
) -> Result<MqarResult> {
    task.validate()?;
    let cfg = mqar_model(mixer, task, width, s)?;
    if device.is_cpu() {
        crate::model::size::check_training(&cfg, s.batch_size, DType::F32)?;
    }
    let model = Model::new(&cfg, seed, device, DType::F32)?;
    let mut trainer = Trainer::new(&model, &s.train_config(lr, seed)?)?;
    let started = std::time::Instant::now();
    let mut trained = None;
    let train_peak_bytes = crate::bench::alloc::peak_during(device, || {
        trained = Some(train_loop(mixer, task, width, s, &model, &mut trainer));
        Ok(())
    })?;
    let (final_loss, curve) = trained.ok_or_else(|| anyhow::anyhow!("MQAR training of {mixer} did not run"))??;
    let train_s = started.elapsed().as_secs_f64();
    let mut rng = Rng::derive(seed, stream::EVAL_BATCH, 7);
    let accuracy = accuracy(&model, task, s.eval_examples, s.batch_size, &mut rng)?;
    Ok(MqarResult {
        model: mixer.to_string(),
        seq_len: task.seq_len,
        pairs: task.pairs,
        width,
        params: model.num_params(),
        accuracy,
        final_loss,
        train_s,
        vocab: task.vocab,
        depth: s.depth,
        steps: s.steps,
        batch_size: s.batch_size,
        lr,
        optimizer: s.optimizer.clone(),
        curve,
        train_peak_bytes,
        head_dim: Some(cfg.width / cfg.heads.max(1)),
        overrides: s.per_model.get(mixer).map(overrides_text),
    })
}

/// The training loop of [`train_and_score`]: the last loss read, and the learning curve.
fn train_loop(
    mixer: &str,
    task: &MqarConfig,
    width: usize,
    s: &MqarSettings,
    model: &Model,
    trainer: &mut Trainer,
) -> Result<(f64, Vec<(usize, f64)>)> {
    let (lr, seed) = (trainer.train.lr, trainer.train.seed);
    let mut curve = Vec::new();
    let started = std::time::Instant::now();
    for step in 0..s.steps {
        trainer.step(model, task, step)?;
        let log = (step + 1) % (s.steps / 10).max(1) == 0;
        // read at every log line and after the last step (the last loss read is the final one)
        trainer
            .settle_if_due(log || step + 1 == s.steps)
            .with_context(|| format!("MQAR training of {mixer} diverged"))?;
        if log {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  mqar {mixer} T={} width={width} lr={lr} step {}/{}: loss {:.4} ({secs:.1} s)",
                task.seq_len,
                step + 1,
                s.steps,
                trainer.last_loss()
            );
        }
        if s.curve_every > 0 && (step + 1) % s.curve_every == 0 {
            // its own stream: scoring never touches the training batches or the model
            let mut rng = Rng::derive(seed, stream::EVAL_BATCH, 8);
            let acc = accuracy(model, task, CURVE_EXAMPLES, s.batch_size, &mut rng)?;
            eprintln!("  mqar {mixer} T={} width={width} lr={lr} step {}: accuracy {acc:.3}", task.seq_len, step + 1);
            curve.push((step + 1, acc));
        }
    }
    Ok((trainer.last_loss(), curve))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A learning curve has one point every `curve_every` steps, each an accuracy, and
    /// scoring it leaves training untouched: the same final loss and accuracy as without it.
    #[test]
    fn curve_points_leave_training_unchanged() -> Result<()> {
        let task = MqarConfig { vocab: 16, seq_len: 16, pairs: 2, alpha: 0.01 };
        let mut s = MqarSettings { steps: 6, lrs: vec![3e-3], eval_examples: 32, ..Default::default() };
        let plain = train_and_score("transformer", &task, 16, &s, 3e-3, &Device::Cpu, 5)?;
        s.curve_every = 3;
        let traced = train_and_score("transformer", &task, 16, &s, 3e-3, &Device::Cpu, 5)?;
        assert!(plain.curve.is_empty());
        assert_eq!(traced.curve.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 6]);
        assert!(traced.curve.iter().all(|p| (0.0..=1.0).contains(&p.1)));
        assert_eq!((traced.final_loss, traced.accuracy), (plain.final_loss, plain.accuracy));
        Ok(())
    }

    /// `[mqar.head_width]` gives a model `max(1, width / head_width)` heads, and the row
    /// records the head width (issue 19: RetNet at the paper's d_h = 256 where width allows).
    #[test]
    fn head_width_sets_the_heads_and_the_row_records_it() -> Result<()> {
        let task = MqarConfig { vocab: 16, seq_len: 16, pairs: 2, alpha: 0.01 };
        let mut s = MqarSettings::default();
        assert_eq!(mqar_model("retnet", &task, 64, &s)?.heads, 4);
        for (width, hw, heads) in [(512, 256, 2), (256, 256, 1), (64, 256, 1), (64, 16, 4)] {
            s.head_width.insert("retnet".into(), hw);
            assert_eq!(mqar_model("retnet", &task, width, &s)?.heads, heads);
        }
        s.head_width.insert("retnet".into(), 0);
        assert!(mqar_model("retnet", &task, 64, &s).is_err());
        let mut s = MqarSettings { widths: vec![32], ..Default::default() };
        s.head_width.insert("retnet".into(), 256);
        assert_eq!(train_and_score("retnet", &task, 32, &s, 1e-3, &Device::Cpu, 5)?.head_dim, Some(32));
        s.head_width.clear();
        assert_eq!(train_and_score("retnet", &task, 32, &s, 1e-3, &Device::Cpu, 5)?.head_dim, Some(16));
        Ok(())
    }

    /// `[mqar.per_model.NAME]` is laid over that model's defaults alone, and its rows say so.
    #[test]
    fn per_model_settings_reach_the_model_and_the_row() -> Result<()> {
        let task = MqarConfig { vocab: 16, seq_len: 16, pairs: 2, alpha: 0.01 };
        let mut s = MqarSettings::default();
        s.per_model.insert("transformer".into(), toml::from_str("position = \"rope\"")?);
        assert_eq!(mqar_model("transformer", &task, 16, &s)?.position, crate::config::Position::Rope);
        assert_eq!(
            mqar_model("longnet", &task, 16, &s)?.position,
            crate::registry::find("longnet")?.defaults().model.position
        );
        let row = train_and_score("transformer", &task, 16, &s, 1e-3, &Device::Cpu, 5)?;
        assert_eq!(row.overrides.as_deref(), Some("position = \"rope\""));
        s.per_model.insert("transformer".into(), toml::from_str("no_such_key = 1")?);
        assert!(mqar_model("transformer", &task, 16, &s).is_err());
        Ok(())
    }
}
