//! Training and scoring models on multi-query associative recall.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
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
    pub lr: f64,
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
}

/// Masked mean cross-entropy over the scored positions.
fn masked_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?;
    let mask = mask.to_dtype(picked.dtype())?;
    (picked * &mask)?.sum_all()?.neg()? / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64
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

/// Trains `cfg` on `task` and scores it on fresh examples.
pub fn train_and_score(mixer: &str, task: &MqarConfig, width: usize, s: &MqarSettings, device: &Device, seed: u64) -> Result<MqarResult> {
    task.validate()?;
    let cfg = mqar_model(mixer, task, width, s.depth)?;
    let model = LanguageModel::new(&cfg, seed, device, DType::F32)?;
    let mut opt = AdamW::new(&model.params, 0.9, 0.98, 1e-8, 0.1)?;
    let mut final_loss = f64::NAN;
    for step in 0..s.steps {
        let mut rng = Rng::derive(seed, stream::TRAIN_BATCH, step as u64);
        let (x, y, m) = task.batch(s.batch_size, &mut rng, device)?;
        let loss = masked_loss(&model.forward(&x, None)?, &y, &m)?;
        final_loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        anyhow::ensure!(final_loss.is_finite(), "MQAR training of {mixer} diverged at step {step}");
        let lr = learning_rate(step, s.lr, s.lr * 0.1, s.steps / 10, s.steps);
        opt.step(&loss.backward()?, lr, 1.0)?;
    }
    let (mut correct, mut total) = (0.0, 0.0);
    let mut rng = Rng::derive(seed, stream::EVAL_BATCH, 7);
    let mut left = s.eval_examples;
    while left > 0 {
        let b = left.min(s.batch_size.max(16));
        left -= b;
        let (x, y, m) = task.batch(b, &mut rng, device)?;
        let pred = model.forward(&x, None)?.argmax(D::Minus1)?;
        let hit = pred.eq(&y)?.to_dtype(DType::F32)?;
        correct += (hit * &m)?.sum_all()?.to_scalar::<f32>()? as f64;
        total += m.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(MqarResult {
        model: mixer.to_string(),
        seq_len: task.seq_len,
        pairs: task.pairs,
        width,
        params: model.num_params(),
        accuracy: correct / total.max(1.0),
        final_loss,
    })
}
