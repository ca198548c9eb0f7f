//! Training and scoring models on multi-query associative recall.

use anyhow::Result;
use candle_core::{DType, Device, D};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, RunConfig};
use crate::data::mqar::MqarConfig;
use crate::model::LanguageModel;
use crate::rng::{stream, Rng};
use crate::train::optim::{learning_rate, AdamW};

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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MqarResult {
    pub model: String,
    pub seq_len: usize,
    pub pairs: usize,
    pub width: usize,
    pub params: usize,
    /// Fraction of queries whose value is the arg-max prediction.
    pub accuracy: f64,
    pub final_loss: f64,
    /// Training wall time (seconds).
    #[serde(default)]
    pub train_s: f64,
    /// The training budget the row was produced with (a rerun reuses rows whose budget matches).
    #[serde(default)]
    pub vocab: usize,
    #[serde(default)]
    pub depth: usize,
    #[serde(default)]
    pub steps: usize,
    #[serde(default)]
    pub batch_size: usize,
    #[serde(default)]
    pub lr: f64,
}

impl MqarResult {
    /// Whether this row is the result of training `model` on `task` at `width` with `s` and
    /// peak learning rate `lr`.
    pub fn answers(&self, model: &str, task: &MqarConfig, width: usize, s: &MqarSettings, lr: f64) -> bool {
        (self.model.as_str(), self.seq_len, self.pairs, self.width) == (model, task.seq_len, task.pairs, width)
            && (self.vocab, self.depth, self.steps, self.batch_size) == (task.vocab, s.depth, s.steps, s.batch_size)
            && self.lr == lr
    }
}

/// The model configuration for one MQAR run of `mixer`.
pub fn mqar_model(mixer: &str, task: &MqarConfig, width: usize, depth: usize) -> Result<ModelConfig> {
    let heads = if width >= 64 { 4 } else { 2 };
    let sets = vec![
        format!("model.width={width}"),
        format!("model.heads={heads}"),
        format!("model.depth={depth}"),
        format!("model.context={}", task.seq_len),
        format!("model.vocab={}", task.vocab),
        "model.dropout=0.0".into(),
    ];
    Ok(RunConfig::build(mixer, None, &sets)?.model)
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
    let cfg = mqar_model(mixer, task, width, s.depth)?;
    let model = LanguageModel::new(&cfg, seed, device, DType::F32)?;
    let mut opt = AdamW::new(&model.params, 0.9, 0.98, 1e-8, 0.1)?;
    let mut final_loss = f64::NAN;
    let started = std::time::Instant::now();
    for step in 0..s.steps {
        let mut rng = Rng::derive(seed, stream::TRAIN_BATCH, step as u64);
        let (x, rows, y) = task.batch(s.batch_size, &mut rng, device)?;
        let loss = candle_nn::loss::cross_entropy(&model.forward_at(&x, &rows)?.to_dtype(DType::F32)?, &y)?;
        final_loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        anyhow::ensure!(final_loss.is_finite(), "MQAR training of {mixer} diverged at step {step}");
        if (step + 1) % (s.steps / 10).max(1) == 0 {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  mqar {mixer} T={} width={width} lr={lr} step {}/{}: loss {final_loss:.4} ({secs:.1} s)",
                task.seq_len,
                step + 1,
                s.steps
            );
        }
        opt.step(&loss.backward()?, learning_rate(step, lr, lr * 0.1, s.steps / 10, s.steps), 1.0)?;
    }
    let train_s = started.elapsed().as_secs_f64();
    let (mut correct, mut total) = (0.0, 0.0);
    let mut rng = Rng::derive(seed, stream::EVAL_BATCH, 7);
    let mut left = s.eval_examples;
    while left > 0 {
        let b = left.min(s.batch_size.max(16));
        left -= b;
        let (x, rows, y) = task.batch(b, &mut rng, device)?;
        let pred = model.forward_at(&x, &rows)?.argmax(D::Minus1)?;
        correct += pred.eq(&y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64;
        total += y.dim(0)? as f64;
    }
    Ok(MqarResult {
        model: mixer.to_string(),
        seq_len: task.seq_len,
        pairs: task.pairs,
        width,
        params: model.num_params(),
        accuracy: correct / total.max(1.0),
        final_loss,
        train_s,
        vocab: task.vocab,
        depth: s.depth,
        steps: s.steps,
        batch_size: s.batch_size,
        lr,
    })
}
