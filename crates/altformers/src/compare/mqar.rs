//! Training and scoring models on multi-query associative recall.

use anyhow::{Context, Result};
use candle_core::{DType, Device, D};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, RunConfig};
use crate::data::mqar::MqarConfig;
use crate::model::LanguageModel;
use crate::results::{MqarResult, CURVE_EXAMPLES};
use crate::rng::{stream, Rng};
use crate::train::optim::{learning_rate, AdamW};
use crate::train::Deferred;

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
    let started = std::time::Instant::now();
    let mut trained = None;
    let train_peak_bytes = crate::bench::alloc::peak_during(device, || {
        trained = Some(train_loop(mixer, task, width, s, lr, device, seed, &model, &mut opt));
        Ok(())
    })?;
    let (final_loss, curve) = trained.ok_or_else(|| anyhow::anyhow!("MQAR training of {mixer} did not run"))??;
    let train_s = started.elapsed().as_secs_f64();
    let mut rng = Rng::derive(seed, stream::EVAL_BATCH, 7);
    let accuracy = accuracy(&model, task, s.eval_examples, s.batch_size, &mut rng, device)?;
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
        curve,
        train_peak_bytes,
    })
}

/// The training loop of [`train_and_score`]: the last loss read, and the learning curve.
#[allow(clippy::too_many_arguments)]
fn train_loop(
    mixer: &str,
    task: &MqarConfig,
    width: usize,
    s: &MqarSettings,
    lr: f64,
    device: &Device,
    seed: u64,
    model: &LanguageModel,
    opt: &mut AdamW,
) -> Result<(f64, Vec<(usize, f64)>)> {
    let mut final_loss = f64::NAN;
    let mut curve = Vec::new();
    let started = std::time::Instant::now();
    let mut pending = Deferred::default();
    for step in 0..s.steps {
        let mut rng = Rng::derive(seed, stream::TRAIN_BATCH, step as u64);
        let (x, rows, y) = task.batch(s.batch_size, &mut rng, device)?;
        let loss = candle_nn::loss::cross_entropy(&model.forward_at(&x, &rows)?.to_dtype(DType::F32)?, &y)?;
        let norm = opt.step(&loss.backward()?, learning_rate(step, lr, lr * 0.1, s.steps / 10, s.steps), 1.0)?;
        pending.push(step + 1, &loss, norm);
        let log = (step + 1) % (s.steps / 10).max(1) == 0;
        if pending.due() || log || step + 1 == s.steps {
            pending.settle().with_context(|| format!("MQAR training of {mixer} diverged"))?;
            final_loss = pending.last_loss;
        }
        if log {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  mqar {mixer} T={} width={width} lr={lr} step {}/{}: loss {final_loss:.4} ({secs:.1} s)",
                task.seq_len,
                step + 1,
                s.steps
            );
        }
        if s.curve_every > 0 && (step + 1) % s.curve_every == 0 {
            // its own stream: scoring never touches the training batches or the model
            let mut rng = Rng::derive(seed, stream::EVAL_BATCH, 8);
            let acc = accuracy(model, task, CURVE_EXAMPLES, s.batch_size, &mut rng, device)?;
            eprintln!("  mqar {mixer} T={} width={width} lr={lr} step {}: accuracy {acc:.3}", task.seq_len, step + 1);
            curve.push((step + 1, acc));
        }
    }
    Ok((final_loss, curve))
}

/// The fraction of `examples` fresh queries (drawn from `rng`) whose arg-max prediction is
/// the value paired with their key.
fn accuracy(
    model: &LanguageModel,
    task: &MqarConfig,
    examples: usize,
    batch: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<f64> {
    let (mut correct, mut total) = (0.0, 0.0);
    let mut left = examples;
    while left > 0 {
        let b = left.min(batch.max(16));
        left -= b;
        let (x, rows, y) = task.batch(b, rng, device)?;
        let pred = model.forward_at(&x, &rows)?.argmax(D::Minus1)?;
        correct += pred.eq(&y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64;
        total += y.dim(0)? as f64;
    }
    Ok(correct / f64::max(total, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A learning curve has one point every `curve_every` steps, each an accuracy, and
    /// scoring it leaves training untouched: the same final loss and accuracy as without it.
    #[test]
    fn curve_points_leave_training_unchanged() -> Result<()> {
        let task = MqarConfig { vocab: 16, seq_len: 16, pairs: 2, alpha: 0.01 };
        let mut s = MqarSettings {
            vocab: 16,
            tasks: vec![(16, 2)],
            widths: vec![16],
            depth: 1,
            steps: 6,
            batch_size: 4,
            lrs: vec![3e-3],
            eval_examples: 32,
            curve_every: 0,
        };
        let plain = train_and_score("transformer", &task, 16, &s, 3e-3, &Device::Cpu, 5)?;
        s.curve_every = 3;
        let traced = train_and_score("transformer", &task, 16, &s, 3e-3, &Device::Cpu, 5)?;
        assert!(plain.curve.is_empty());
        assert_eq!(traced.curve.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 6]);
        assert!(traced.curve.iter().all(|p| (0.0..=1.0).contains(&p.1)));
        assert_eq!((traced.final_loss, traced.accuracy), (plain.final_loss, plain.accuracy));
        Ok(())
    }
}
