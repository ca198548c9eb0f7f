//! The training loop: AdamW, warm-up + cosine schedule, clipping, dropout, periodic
//! evaluation, atomic checkpoints and exact resume.
//!
//! Every batch and dropout mask is a function of `(seed, step)`, so a resumed run sees the
//! same data and masks as an uninterrupted one and reaches the same loss.
//!
//! Run folder:
//! - `config.json`: the [`RunConfig`]
//! - `model.safetensors`: the latest weights (what `eval` and `generate` read)
//! - `metrics.jsonl`: one [`Metrics`] object per evaluation
//! - `checkpoint/`: `model.safetensors`, `optimizer.safetensors`, `state.json`, replaced as a
//!   whole (written beside it, then swapped by renames) so a crash never leaves half of one.

pub mod optim;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::RunConfig;
use crate::data::{random_batch, Corpus, DataFormat};
use crate::model::LanguageModel;
use crate::rng::{stream, Rng};
use crate::util::{read_json, write_json_atomic};
use optim::{learning_rate, AdamW, StepNorm};

/// Steps between reads of the training loss and gradient norm.
pub const SYNC_EVERY: usize = 10;

/// The losses and gradient norms of the last few steps, still where they were computed. A
/// value read on the host waits for the GPU to finish its step, and a read every step leaves
/// the GPU idle while the host prepares the next one; so a training loop reads them together
/// every [`SYNC_EVERY`] steps, and always before it evaluates or saves. A non-finite value is
/// found then, naming its step; the fused GPU step has changed no parameter on a non-finite
/// norm, and the CPU step fails at once.
#[derive(Default)]
pub struct Deferred {
    steps: Vec<usize>,
    losses: Vec<Tensor>,
    norms: Vec<Tensor>,
    /// The loss of the last step read.
    pub last_loss: f64,
}

impl Deferred {
    /// Holds `step`'s loss (a scalar) and gradient norm, detached: a tensor keeps the graph
    /// that computed it, so holding the loss itself would keep every activation of the step
    /// alive until the next read (ten steps' worth of GPU memory).
    pub fn push(&mut self, step: usize, loss: &Tensor, norm: StepNorm) {
        self.steps.push(step);
        self.losses.push(loss.detach());
        self.norms.push(norm.0.detach());
    }

    pub fn due(&self) -> bool {
        self.steps.len() >= SYNC_EVERY
    }

    /// Reads what is held (two reads); the first step with a non-finite loss or norm is an error.
    pub fn settle(&mut self) -> Result<()> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let read = |v: &[Tensor]| -> Result<Vec<f64>> { Ok(Tensor::stack(v, 0)?.to_dtype(DType::F64)?.to_vec1()?) };
        let (losses, norms) = (read(&self.losses)?, read(&self.norms)?);
        for ((step, loss), norm) in self.steps.iter().zip(&losses).zip(&norms) {
            if !loss.is_finite() {
                bail!("training loss is {loss} in step {step}");
            }
            if !norm.is_finite() {
                bail!("gradient norm is {norm} in step {step}");
            }
        }
        self.last_loss = *losses.last().expect("not empty");
        self.steps.clear();
        self.losses.clear();
        self.norms.clear();
        Ok(())
    }
}

/// One evaluation, one line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub step: usize,
    /// Mean loss (nats/byte) over fixed training batches, without dropout.
    pub train_loss: f64,
    /// Mean loss (nats/byte) over fixed validation batches.
    pub val_loss: f64,
    /// `val_loss / ln 2`: bits per byte.
    pub val_bpb: f64,
    /// Training throughput since the previous evaluation (evaluation time excluded).
    pub tokens_per_s: f64,
    /// Wall time since the run began, across resumes.
    pub elapsed_s: f64,
    pub lr: f64,
}

/// What `checkpoint/state.json` holds besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
    /// The run's seed: with `step`, it fixes every later batch and dropout mask.
    pub seed: u64,
    pub data_source: String,
    pub data_format: DataFormat,
    pub elapsed_s: f64,
}

pub struct TrainOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub device: Device,
    pub dtype: DType,
    /// Progress bar and per-evaluation lines on the terminal.
    pub verbose: bool,
    /// Stop (after checkpointing) once this many steps are done: tests use it to interrupt.
    pub stop_after: Option<usize>,
}

pub struct TrainSummary {
    pub last: Metrics,
    pub params: usize,
    pub history: Vec<Metrics>,
}

pub fn nats_to_bits(nats: f64) -> f64 {
    nats / std::f64::consts::LN_2
}

/// Mean loss over `n` fixed batches of `split` (the same batches at every call).
pub fn estimate_loss(
    model: &LanguageModel,
    split: &[u8],
    n: usize,
    batch: usize,
    seed: u64,
    which: u64,
) -> Result<f64> {
    let mut rng = Rng::derive(seed, stream::EVAL_BATCH, which);
    let mut total = 0.0;
    for _ in 0..n {
        let (x, y) = random_batch(split, batch, model.config.context, &mut rng, model.device())?;
        let logits = model.forward(&x, None)?;
        total += LanguageModel::loss(&logits, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total / n as f64)
}

/// Loss over a whole split: consecutive windows of `context` bytes, every byte after the
/// first predicted once. `max_bytes` caps the work for huge splits.
pub fn evaluate_split(model: &LanguageModel, split: &[u8], batch: usize, max_bytes: Option<usize>) -> Result<f64> {
    let t = model.config.context;
    let split = &split[..max_bytes.unwrap_or(usize::MAX).min(split.len())];
    if split.len() < 2 {
        bail!("the split has {} bytes: nothing to evaluate", split.len());
    }
    let starts: Vec<usize> = (0..split.len() - 1).step_by(t).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for group in starts.chunks(batch) {
        // Full windows batch together; the final short window runs alone.
        let (full, short): (Vec<usize>, Vec<usize>) = group.iter().partition(|&&s| s + t < split.len());
        for windows in [full, short] {
            if windows.is_empty() {
                continue;
            }
            let len = (split.len() - 1 - windows[0]).min(t);
            let xs: Vec<u32> = windows.iter().flat_map(|&s| split[s..s + len].iter().map(|&b| b as u32)).collect();
            let ys: Vec<u32> =
                windows.iter().flat_map(|&s| split[s + 1..s + 1 + len].iter().map(|&b| b as u32)).collect();
            let shape = (windows.len(), len);
            let x = candle_core::Tensor::from_vec(xs, shape, model.device())?;
            let y = candle_core::Tensor::from_vec(ys, shape, model.device())?;
            let loss = LanguageModel::loss(&model.forward(&x, None)?, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            total += loss * (windows.len() * len) as f64;
            count += windows.len() * len;
        }
    }
    Ok(total / count as f64)
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Writes a checkpoint beside the current one, then swaps them by renames.
fn save_checkpoint(out: &Path, model: &LanguageModel, opt: &AdamW, state: &TrainState) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let old = out.join("checkpoint.old");
    let cur = checkpoint_dir(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    model.params.save(&tmp.join("model.safetensors"))?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    write_json_atomic(&tmp.join("state.json"), state)?;
    if cur.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&cur, &old)?;
    }
    std::fs::rename(&tmp, &cur)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    model.params.save(&out.join("model.safetensors"))
}

/// The newest complete checkpoint (a crash between the two renames leaves it in `.old`).
fn find_checkpoint(out: &Path) -> Result<PathBuf> {
    for dir in [checkpoint_dir(out), out.join("checkpoint.old")] {
        if dir.join("state.json").exists() {
            return Ok(dir);
        }
    }
    bail!("{} holds no checkpoint to resume from", out.display())
}

/// Loads a finished or interrupted run's config and latest weights (for eval and generate).
pub fn load_run(dir: &Path, device: &Device, dtype: DType) -> Result<LanguageModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        bail!("{} is not a run folder: no config.json", dir.display());
    }
    let config: RunConfig = read_json(&cfg_path)?;
    config.validate()?;
    let model = LanguageModel::new(&config.model, config.train.seed, device, dtype)?;
    model.load_weights(&dir.join("model.safetensors"))?;
    Ok(model)
}

/// Trains `config` on `corpus`, writing the run folder `opts.out`.
pub fn train(
    config: &RunConfig,
    corpus: &Corpus,
    data_format: DataFormat,
    opts: &TrainOptions,
) -> Result<TrainSummary> {
    config.validate()?;
    corpus.check_context(config.model.context)?;
    let out = &opts.out;
    let (m, t) = (&config.model, &config.train);
    // Parameters and optimizer state stay f32 (master weights); `opts.dtype` is the
    // dtype of the activations (bf16 for mixed precision).
    let param_dtype = if opts.dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let model = LanguageModel::new(m, t.seed, &opts.device, param_dtype)?.with_compute_dtype(opts.dtype);
    let mut opt = AdamW::new(&model.params, t.beta1, t.beta2, t.eps, t.weight_decay)?;
    if t.decay_embeddings {
        opt = opt.decay_embeddings();
    }
    let metrics_path = out.join("metrics.jsonl");
    let mut history: Vec<Metrics> = Vec::new();
    let mut state =
        TrainState { step: 0, seed: t.seed, data_source: corpus.source.clone(), data_format, elapsed_s: 0.0 };
    if opts.resume {
        let saved: RunConfig = read_json(&out.join("config.json"))?;
        if serde_json::to_value(&saved)? != serde_json::to_value(config)? {
            bail!("--resume: the configuration differs from the one saved in {}/config.json", out.display());
        }
        let dir = find_checkpoint(out)?;
        state = read_json(&dir.join("state.json"))?;
        if state.data_source != corpus.source || state.data_format != data_format {
            bail!(
                "--resume: this run trained on `{}` ({:?}); got `{}` ({:?})",
                state.data_source,
                state.data_format,
                corpus.source,
                data_format
            );
        }
        model.params.load(&dir.join("model.safetensors"))?;
        opt.load(&dir.join("optimizer.safetensors"), state.step)?;
        // Evaluations logged after the checkpoint (a crash in between) are dropped.
        if metrics_path.exists() {
            let text = std::fs::read_to_string(&metrics_path)?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let m: Metrics = serde_json::from_str(line)
                    .with_context(|| format!("corrupt line in {}", metrics_path.display()))?;
                if m.step <= state.step {
                    history.push(m);
                }
            }
        }
    } else {
        if out.join("config.json").exists() || checkpoint_dir(out).exists() {
            bail!("{} already holds a run; pass --resume to continue it, or choose another --out", out.display());
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        write_json_atomic(&out.join("config.json"), config)?;
    }
    rewrite_metrics(&metrics_path, &history)?;

    let tokens_per_step = (t.batch_size * m.context) as f64;
    let bar = progress_bar(opts.verbose, t.steps as u64, state.step as u64);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut window_start = Instant::now();
    let mut window_steps = 0usize;
    if opts.verbose {
        eprintln!(
            "training {} ({} parameters) on {} for {} steps, batch {} x {} bytes",
            m.mixer,
            crate::util::human(model.num_params() as f64),
            corpus.source,
            t.steps,
            t.batch_size,
            m.context
        );
    }
    let mut checkpointed = if opts.resume { state.step } else { 0 };
    let last_good = |step: usize| {
        if step == 0 {
            "no checkpoint was written yet".to_string()
        } else {
            format!("the last good checkpoint (step {step}) in {} is intact", out.display())
        }
    };
    let mut pending = Deferred::default();
    while state.step < t.steps {
        let step = state.step;
        let lr = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.decay_steps);
        let mut batch_rng = Rng::derive(t.seed, stream::TRAIN_BATCH, step as u64);
        let mut drop_rng = Rng::derive(t.seed, stream::DROPOUT, step as u64);
        let (x, y) = random_batch(&corpus.train, t.batch_size, m.context, &mut batch_rng, &opts.device)?;
        let loss = LanguageModel::loss(&model.forward(&x, Some(&mut drop_rng))?, &y)?;
        let norm =
            opt.step(&loss.backward()?, lr, t.grad_clip).map_err(|e| anyhow::anyhow!("{e} in step {}", step + 1));
        state.step += 1;
        window_steps += 1;
        let stop_here = opts.stop_after == Some(state.step);
        let evaluate = state.step.is_multiple_of(t.eval_every) || state.step == t.steps || stop_here;
        let settled = norm.and_then(|norm| {
            pending.push(state.step, &loss, norm);
            if pending.due() || evaluate {
                pending.settle()?;
            }
            Ok(())
        });
        if let Err(e) = settled {
            bar.abandon();
            bail!("{e}: the run diverged; {}. Lower train.lr or raise train.warmup_steps.", last_good(checkpointed));
        }
        bar.set_position(state.step as u64);
        let rate = window_steps as f64 * tokens_per_step / window_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {:.4}  {rate:.0} tok/s", pending.last_loss));

        if evaluate {
            let tokens_per_s = window_steps as f64 * tokens_per_step / window_start.elapsed().as_secs_f64().max(1e-9);
            let train_loss = estimate_loss(&model, &corpus.train, t.eval_batches, t.batch_size, t.seed, 1)?;
            let val_loss = estimate_loss(&model, &corpus.val, t.eval_batches, t.batch_size, t.seed, 0)?;
            if !(train_loss.is_finite() && val_loss.is_finite()) {
                bar.abandon();
                bail!(
                    "evaluation loss is not finite after step {}: the run diverged; {}",
                    state.step,
                    last_good(checkpointed)
                );
            }
            state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            let metrics = Metrics {
                step: state.step,
                train_loss,
                val_loss,
                val_bpb: nats_to_bits(val_loss),
                tokens_per_s,
                elapsed_s: state.elapsed_s,
                lr,
            };
            save_checkpoint(out, &model, &opt, &state)?;
            checkpointed = state.step;
            append_metrics(&metrics_path, &metrics)?;
            if opts.verbose {
                // suspend() also prints when the bar is hidden (stderr not a terminal).
                bar.suspend(|| {
                    eprintln!(
                        "step {:>6}  train {:.4}  val {:.4} nats/byte ({:.4} bpb)  {:.0} tok/s  {:.1}s",
                        metrics.step, train_loss, val_loss, metrics.val_bpb, tokens_per_s, metrics.elapsed_s
                    )
                });
            }
            history.push(metrics);
            window_start = Instant::now();
            window_steps = 0;
            if stop_here {
                break;
            }
        }
    }
    bar.finish_and_clear();
    let last = history.last().cloned().context("no evaluation was run")?;
    Ok(TrainSummary { last, params: model.num_params(), history })
}

fn append_metrics(path: &Path, m: &Metrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{}", serde_json::to_string(m)?)?;
    f.sync_all()?;
    Ok(())
}

fn rewrite_metrics(path: &Path, history: &[Metrics]) -> Result<()> {
    let mut text = String::new();
    for m in history {
        text.push_str(&serde_json::to_string(m)?);
        text.push('\n');
    }
    crate::util::write_atomic(path, text.as_bytes())
}

fn progress_bar(verbose: bool, len: u64, pos: u64) -> indicatif::ProgressBar {
    if !verbose {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_reads_report_the_first_bad_step_and_keep_the_last_loss() -> Result<()> {
        let dev = Device::Cpu;
        let norm = |v: f64| -> Result<StepNorm> { Ok(StepNorm(Tensor::new(v, &dev)?)) };
        let mut d = Deferred::default();
        for (step, loss) in [(1, 2.0f32), (2, 1.5)] {
            d.push(step, &Tensor::new(loss, &dev)?, norm(1.0)?);
        }
        assert!(!d.due());
        d.settle()?;
        assert_eq!(d.last_loss, 1.5);
        for (step, loss) in [(3, 1.0f32), (4, f32::NAN), (5, f32::NAN)] {
            d.push(step, &Tensor::new(loss, &dev)?, norm(1.0)?);
        }
        let err = d.settle().unwrap_err().to_string();
        assert!(err.contains("training loss is NaN in step 4"), "{err}");
        let mut d = Deferred::default();
        d.push(7, &Tensor::new(0.5f32, &dev)?, norm(f64::INFINITY)?);
        let err = d.settle().unwrap_err().to_string();
        assert!(err.contains("gradient norm is inf in step 7"), "{err}");
        for step in 0..SYNC_EVERY {
            d.push(step, &Tensor::new(0.5f32, &dev)?, norm(1.0)?);
        }
        assert!(d.due());
        Ok(())
    }

    #[test]
    fn deferred_holds_values_not_the_graph_that_computed_them() -> Result<()> {
        let dev = Device::Cpu;
        let w = candle_core::Var::new(&[1.0f32, 2.0], &dev)?;
        let loss = w.as_tensor().sqr()?.sum_all()?;
        let norm = loss.sqrt()?;
        assert!(loss.track_op() && norm.track_op());
        let mut d = Deferred::default();
        d.push(1, &loss, StepNorm(norm));
        assert!(!d.losses[0].track_op() && !d.norms[0].track_op());
        d.settle()?;
        assert_eq!(d.last_loss, 5.0);
        Ok(())
    }
}
