//! A run folder: everything one training run writes, and the checks that let it resume.
//!
//! - `config.json`: the [`RunConfig`]
//! - `model.safetensors`: the latest weights (what `eval` and `generate` read)
//! - `metrics.jsonl`: one [`Metrics`] object per evaluation
//! - `checkpoint/`: `model.safetensors`, `optimizer.safetensors`, `state.json`, replaced as a
//!   whole (written beside it, then swapped by renames) so a crash never leaves half of one.
//! - `LOCK`: while a run writes the folder ([`RunLock`]): a second writer is refused.
//!
//! Temporary files carry the writer's pid and a counter ([`crate::util::tmp_path`]); those a
//! crash leaves are removed by the next writer, once it holds the lock.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::lock::RunLock;
use super::optim::AdamW;
use crate::config::RunConfig;
use crate::data::{Corpus, DataFormat};
use crate::model::Model;
use crate::util::{read_json, write_json_atomic};

/// One evaluation, one line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Metrics {
    pub step: usize,
    /// Mean loss (nats/byte; nats/token with a tokenizer) over fixed training batches,
    /// without dropout.
    pub train_loss: f64,
    /// Mean loss (nats/byte) over fixed validation batches.
    pub val_loss: f64,
    /// `val_loss / ln 2`: bits per byte.
    pub val_bpb: f64,
    /// With a tokenizer other than bytes: the validation split's tokens per byte, by which
    /// the losses (then nats per token) convert to `val_bpb`. Absent for bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_byte: Option<f64>,
    /// Training throughput since the previous evaluation (evaluation time excluded).
    pub tokens_per_s: f64,
    /// Wall time since the run began, across resumes.
    pub elapsed_s: f64,
    pub lr: f64,
    /// The most bytes rank 0's device held at once while training since the previous
    /// evaluation (evaluation and checkpoint excluded; weights, optimizer state, gradients and
    /// activations): PyTorch's `max_memory_allocated`. Absent where it cannot be measured (a
    /// library caller's CPU without the counting allocator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
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
    /// The corpus's size and hash ([`CorpusId`]): resume checks the bytes, not the path.
    /// Absent in checkpoints written before it was recorded (then the path is compared).
    #[serde(default)]
    pub data: Option<CorpusId>,
    pub elapsed_s: f64,
}

/// What identifies a corpus's bytes: its size and a 64-bit FNV-1a hash of its splits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusId {
    pub bytes: u64,
    pub fnv1a: String,
}

impl CorpusId {
    pub fn of(corpus: &Corpus) -> Self {
        let splits = [Some(&corpus.train), Some(&corpus.val), corpus.test.as_ref()];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut bytes = 0;
        for split in splits.into_iter().flatten() {
            bytes += split.len() as u64;
            for &b in split.iter() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        Self { bytes, fnv1a: format!("{h:016x}") }
    }
}

impl TrainState {
    /// Refuses to resume on other data than the run's: other bytes (a replaced file), or
    /// another format. The same bytes under another path are the same data.
    pub fn check_data(&self, corpus: &Corpus, format: DataFormat) -> Result<()> {
        let now = CorpusId::of(corpus);
        let same = match &self.data {
            Some(id) => *id == now,
            None => self.data_source == corpus.source,
        };
        if !same || self.data_format != format {
            let id =
                |d: Option<&CorpusId>| d.map_or(String::new(), |d| format!(", {} bytes, FNV-1a {}", d.bytes, d.fnv1a));
            bail!(
                "--resume: this run trained on `{}` ({:?}{}); `{}` ({format:?}{}) is other data",
                self.data_source,
                self.data_format,
                id(self.data.as_ref()),
                corpus.source,
                id(Some(&now))
            );
        }
        Ok(())
    }
}

pub struct RunFolder {
    pub dir: PathBuf,
    /// Held by a folder opened to write (a new or resumed run), for as long as it lives.
    _lock: Option<RunLock>,
}

impl RunFolder {
    /// `dir` locked for writing, with the temporary files of crashed writers removed.
    fn lock(dir: &Path) -> Result<Self> {
        let lock = RunLock::acquire(dir)?;
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().contains(crate::util::TMP_MARK)) {
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
        Ok(Self { dir: dir.to_path_buf(), _lock: Some(lock) })
    }

    /// A folder for a new run of `config`: refused if it already holds one. A run that ended
    /// before its first checkpoint (killed, or diverged) left nothing to keep or resume: it is
    /// started over, with a note.
    pub fn create(dir: &Path, config: &RunConfig) -> Result<Self> {
        // the check comes after the lock: two runs started together cannot both pass it
        let folder = Self::lock(dir)?;
        if folder.never_checkpointed() {
            eprintln!("note: {} holds a run that stopped before its first checkpoint; starting it over", dir.display());
        } else if folder.config_path().exists() || folder.checkpoint_dir().exists() {
            bail!("{} already holds a run; pass --resume to continue it, or choose another --out", dir.display());
        }
        write_json_atomic(&folder.config_path(), config)?;
        folder.rewrite_metrics(&[])?;
        Ok(folder)
    }

    /// An existing run of `config` (the saved configuration must be the same, but for
    /// `train.accumulate`, which changes how a batch is scored, not the step), the state of
    /// its newest checkpoint, and the metrics logged up to it (lines logged after it, by a
    /// crash in between, are left out).
    pub fn resume(dir: &Path, config: &RunConfig) -> Result<(Self, TrainState, Vec<Metrics>)> {
        if !dir.join("config.json").exists() {
            bail!("cannot resume: {} holds no run (no config.json)", dir.display());
        }
        let folder = Self::lock(dir)?;
        let saved = folder.config()?;
        let run = |c: &RunConfig| {
            let mut c = c.clone();
            c.train.accumulate = 1;
            serde_json::to_value(c)
        };
        if run(&saved)? != run(config)? {
            bail!("--resume: the configuration differs from the one saved in {}/config.json", dir.display());
        }
        if saved.train.accumulate != config.train.accumulate {
            // the steps from here on are taken so, and a later resume goes on so
            write_json_atomic(&folder.config_path(), config)?;
        }
        if folder.never_checkpointed() {
            bail!(
                "{} holds no checkpoint to resume from: the run stopped before its first one; train without --resume to start it over",
                dir.display()
            );
        }
        let state: TrainState = read_json(&folder.latest_checkpoint()?.join("state.json"))?;
        let history: Vec<Metrics> = folder.metrics()?.into_iter().filter(|m| m.step <= state.step).collect();
        Ok((folder, state, history))
    }

    /// The folder as a data-parallel worker other than rank 0 sees it: never written, nor
    /// locked, by this process.
    pub fn unwritten(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), _lock: None }
    }

    /// A folder written earlier, for reading (eval, generate).
    pub fn open(dir: &Path) -> Result<Self> {
        let folder = Self { dir: dir.to_path_buf(), _lock: None };
        if !folder.config_path().exists() {
            bail!("{} is not a run folder: no config.json", dir.display());
        }
        Ok(folder)
    }

    /// A training run's config with no checkpoint nor weights (an imported run has weights).
    fn never_checkpointed(&self) -> bool {
        self.config_path().exists() && self.latest_checkpoint().is_err() && !self.dir.join("model.safetensors").exists()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    pub fn config(&self) -> Result<RunConfig> {
        let path = self.config_path();
        RunConfig::from_saved(read_json(&path)?).with_context(|| format!("{}", path.display()))
    }

    /// The run's model with its latest weights (parameters in `dtype`), for inference
    /// ([`Model::for_inference`]: it records no gradient graph).
    pub fn load_model(&self, device: &Device, dtype: DType) -> Result<Model> {
        let config = self.config()?;
        let model = Model::for_inference(&config.model, config.train.seed, device, dtype)?;
        model.load_weights(&self.dir.join("model.safetensors"))?;
        // the weights are those after the last completed step: parts that follow a schedule
        // (Performer's features) take that step's state
        if let Ok(dir) = self.latest_checkpoint() {
            let state: TrainState = read_json(&dir.join("state.json"))?;
            model.set_training_step(state.step.saturating_sub(1));
        }
        Ok(model)
    }

    /// The newest complete checkpoint (a crash between the two renames leaves it in `.old`).
    pub fn latest_checkpoint(&self) -> Result<PathBuf> {
        for dir in [self.checkpoint_dir(), self.dir.join("checkpoint.old")] {
            if dir.join("state.json").exists() {
                return Ok(dir);
            }
        }
        bail!("{} holds no checkpoint to resume from", self.dir.display())
    }

    /// Loads the newest checkpoint's weights and optimizer state into `model` and `opt`.
    pub fn restore(&self, model: &Model, opt: &mut AdamW, state: &TrainState) -> Result<()> {
        let dir = self.latest_checkpoint()?;
        model.params.load(&dir.join("model.safetensors"))?;
        opt.load(&dir.join("optimizer.safetensors"), state.step)
    }

    /// Writes a checkpoint beside the current one, swaps them by renames, then the latest
    /// weights.
    pub fn save_checkpoint(&self, model: &Model, opt: &AdamW, state: &TrainState) -> Result<()> {
        let cur = self.checkpoint_dir();
        let tmp = crate::util::tmp_path(&cur);
        let old = self.dir.join("checkpoint.old");
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
        model.params.save(&self.dir.join("model.safetensors"))
    }

    /// Every evaluation logged so far.
    pub fn metrics(&self) -> Result<Vec<Metrics>> {
        Ok(self.metric_lines(true)?.into_iter().map(|(_, m)| m).collect())
    }

    /// The lines of `metrics.jsonl` as written, each with its evaluation. A last line cut
    /// short (no newline, not JSON: a crash or a full disk in the middle of its write, so
    /// past the last checkpoint, which follows the line) is left out, with a note if `note`;
    /// a damaged line elsewhere is an error naming it.
    fn metric_lines(&self, note: bool) -> Result<Vec<(String, Metrics)>> {
        let path = self.metrics_path();
        let text = if path.exists() { std::fs::read_to_string(&path)? } else { String::new() };
        let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
        let mut parsed = Vec::with_capacity(lines.len());
        for (k, &(i, line)) in lines.iter().enumerate() {
            match serde_json::from_str(line) {
                Ok(m) => parsed.push((line.to_string(), m)),
                Err(e) if k + 1 == lines.len() && !text.ends_with('\n') => {
                    if note {
                        eprintln!("note: {} line {} was cut short ({e}): dropped", path.display(), i + 1);
                    }
                }
                Err(e) => bail!("{} line {} is not a metrics line (corrupt?): {e}", path.display(), i + 1),
            }
        }
        Ok(parsed)
    }

    /// Appends one evaluation's line in a single write (a crash leaves it whole or cut short,
    /// never its newline alone missing).
    pub fn append_metrics(&self, m: &Metrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.metrics_path())?;
        f.write_all(format!("{}\n", serde_json::to_string(m)?).as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    /// Replaces `metrics.jsonl` with `history` (a new run: none).
    pub fn rewrite_metrics(&self, history: &[Metrics]) -> Result<()> {
        let mut text = String::new();
        for m in history {
            text.push_str(&serde_json::to_string(m)?);
            text.push('\n');
        }
        crate::util::write_atomic(&self.metrics_path(), text.as_bytes())
    }

    /// Keeps the lines of `metrics.jsonl` up to `step` (on resume: the checkpoint's) as they
    /// were written, byte for byte: a float parsed and printed again may move by one ULP.
    pub fn keep_metrics_up_to(&self, step: usize) -> Result<()> {
        let mut kept = String::new();
        // (resume, which comes first, has noted a line cut short)
        for (line, m) in self.metric_lines(false)? {
            if m.step <= step {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
        crate::util::write_atomic(&self.metrics_path(), kept.as_bytes())
    }
}
