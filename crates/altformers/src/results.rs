//! The JSON-lines rows that `compare` writes and `report` reads (language-modelling quality
//! and recall), and the reading and writing of JSON-lines files. The benchmark rows are
//! their benches' own ([`crate::bench::scaling::ScalingPoint`],
//! [`crate::bench::decode::DecodePoint`]), as is the training log ([`crate::train::Metrics`]).

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::data::mqar::MqarConfig;
use crate::registry::Architecture;

/// Reads a JSON-lines file; `None` when absent. Lines of other shapes are skipped (the
/// bench commands mix provenance and fit lines into one file); a line that is not JSON at
/// all (a corrupt or truncated file) is skipped with a warning naming the file and line.
pub fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Option<Vec<T>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Err(e) => eprintln!("warning: {} line {} is not JSON ({e}): skipped", path.display(), i + 1),
            Ok(v) => rows.extend(serde_json::from_value(v).ok()),
        }
    }
    Ok(Some(rows))
}

/// Writes `rows` to `path` after the lines already there whose `model` is not in `rerun`:
/// a comparison run in pieces (some models at a time) accumulates in one file.
pub fn write_lines<T: Serialize>(path: &Path, rerun: &[&Architecture], rows: &[T]) -> Result<()> {
    let mut text = String::new();
    if let Ok(old) = std::fs::read_to_string(path) {
        for line in old.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} holds a line that is not JSON", path.display()))?;
            if !rerun.iter().any(|a| v["model"] == a.name) {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::util::write_atomic(path, text.as_bytes())
}

/// One model trained on the language-modelling part of a comparison (`quality.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QualityRow {
    pub model: String,
    pub width: usize,
    pub params: usize,
    /// Parameters relative to the Transformer's (1.0 = equal).
    pub params_ratio: f64,
    pub steps: usize,
    pub tokens: usize,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// The run's seed (`train.seed`); a preset's `reference_seeds` add rows of the reference
    /// model at other seeds, the table's noise band.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Head width `width / heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
}

/// Models whose recurrent state is `heads x d_h x d_h`: their head width, not only their
/// model width, decides how much they can hold (RetNet's paper uses d_h = 256), so their
/// rows name it.
pub const HEAD_WIDTH_MATTERS: &[&str] = &["retnet"];

/// ` (d_h N)` (` (d_h N/M)` for several runs) after a model of [`HEAD_WIDTH_MATTERS`] whose
/// head widths are known; empty otherwise.
pub fn head_note(model: &str, head_dims: &[usize]) -> String {
    if head_dims.is_empty() || !HEAD_WIDTH_MATTERS.contains(&model) {
        return String::new();
    }
    let dims: Vec<String> = head_dims.iter().map(usize::to_string).collect();
    format!(" (d_h {})", dims.join("/"))
}

impl QualityRow {
    /// The model's name, its head width where it matters ([`head_note`]) and, where `rows`
    /// hold it at several seeds, this row's seed.
    pub fn label(&self, rows: &[QualityRow]) -> String {
        let mut label = format!("{}{}", self.model, head_note(&self.model, self.head_dim.as_slice()));
        if rows.iter().filter(|r| r.model == self.model).count() > 1 {
            if let Some(seed) = self.seed {
                label += &format!(" (seed {seed})");
            }
        }
        label
    }
}

/// The spread of the val loss of each model trained at several seeds: `(model, seeds,
/// lowest, highest)`.
pub fn seed_spreads(rows: &[QualityRow]) -> Vec<(String, Vec<u64>, f64, f64)> {
    let mut out: Vec<(String, Vec<u64>, f64, f64)> = Vec::new();
    for r in rows {
        if rows.iter().filter(|o| o.model == r.model).count() < 2 || out.iter().any(|o| o.0 == r.model) {
            continue;
        }
        let same: Vec<&QualityRow> = rows.iter().filter(|o| o.model == r.model).collect();
        let losses = same.iter().map(|o| o.val_loss);
        let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), l| (a.min(l), b.max(l)));
        out.push((r.model.clone(), same.iter().filter_map(|o| o.seed).collect(), lo, hi));
    }
    out
}

/// The Markdown table of `rows`.
pub fn quality_table(rows: &[QualityRow]) -> String {
    let mut s = String::from(
        "| model | width | params (vs Transformer) | tokens | val loss (nats/byte) | val bpb | train tokens/s | time (s) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} ({:+.1}%) | {} | {:.4} | {:.4} | {:.0} | {:.0} |\n",
            r.label(rows),
            r.width,
            crate::util::human(r.params as f64),
            (r.params_ratio - 1.0) * 100.0,
            crate::util::human(r.tokens as f64),
            r.val_loss,
            r.val_bpb,
            r.tokens_per_s,
            r.elapsed_s
        ));
    }
    s
}

/// One model trained and scored on ListOps (`listops.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListOpsRow {
    pub model: String,
    /// `last-position` (a causal model) or `mean-pool` (an encoder).
    pub readout: String,
    pub width: usize,
    /// Every parameter, the length-bound ones included.
    pub params: usize,
    /// Parameters whose shapes follow the maximum length (learned positions, Linformer's
    /// `E, F`): left out of the match, as LRA matches widths (0 in rows from before they were).
    #[serde(default)]
    pub length_bound_params: usize,
    /// Parameters other than the length-bound ones relative to the Transformer's (1.0 =
    /// equal).
    pub params_ratio: f64,
    pub steps: usize,
    pub train_examples: u64,
    /// Examples are shorter than this (the generator's `max_len`).
    pub max_len: usize,
    pub train_loss: f64,
    pub val_accuracy: f64,
    pub test_accuracy: f64,
    pub elapsed_s: f64,
}

/// ListOps test accuracy (%) the Long Range Arena reports (Tay et al. 2020, arXiv 2011.04006,
/// Table 1), by our registry name. LRA's Transformer is an encoder: its figure sits beside
/// `transformer-encoder`.
pub const LRA_LISTOPS: &[(&str, f64)] =
    &[("transformer-encoder", 36.4), ("linformer", 35.7), ("performer-encoder", 18.0), ("reformer-encoder", 37.3)];

/// The Markdown table of `rows`, LRA's published figure beside each model it reports.
pub fn listops_table(rows: &[ListOpsRow]) -> String {
    let mut s = String::from(
        "| model | readout | width | params (vs Transformer; length-bound apart) | steps | train loss | val accuracy | test accuracy | LRA (2011.04006) | time (s) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let lra =
            LRA_LISTOPS.iter().find(|(m, _)| *m == r.model).map(|(_, a)| format!("{a:.1}%")).unwrap_or("-".into());
        s.push_str(&format!(
            "| {} | {} | {} | {}{} ({:+.1}%) | {} | {:.4} | {:.1}% | {:.1}% | {lra} | {:.0} |\n",
            r.model,
            r.readout,
            r.width,
            crate::util::human(r.params as f64),
            match r.length_bound_params {
                0 => String::new(),
                n => format!(", {} length-bound", crate::util::human(n as f64)),
            },
            (r.params_ratio - 1.0) * 100.0,
            r.steps,
            r.train_loss,
            r.val_accuracy * 100.0,
            r.test_accuracy * 100.0,
            r.elapsed_s
        ));
    }
    s
}

/// Examples scored for each point of an MQAR learning curve ([`MqarResult::curve`]),
/// separate from the final evaluation's.
pub const CURVE_EXAMPLES: usize = 512;

/// One model trained and scored on one multi-query associative recall task (`mqar.jsonl`).
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
    /// Rows written before the optimizer was a setting were trained with its defaults.
    #[serde(default)]
    pub optimizer: MqarOptimizer,
    /// `(step, accuracy)` during training, when the settings ask for it (`curve_every`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<(usize, f64)>,
    /// Peak memory of the training loop above the level before it (bytes; the CUDA pool's
    /// high-water mark, or the CPU heap's where the counting allocator is installed): what
    /// decides how many runs share one GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_peak_bytes: Option<u64>,
    /// Head width `width / heads` of the run (`[mqar.head_width]` sets it per model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The model settings `[mqar.per_model]` laid over the model's defaults, as TOML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<String>,
}

/// AdamW and schedule settings of the recall runs; the peak rate comes from
/// [`MqarSettings::lrs`], the steps and batch from the settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqarOptimizer {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Linear warm-up over this fraction of the steps.
    pub warmup_fraction: f64,
    /// Cosine decay to this fraction of the peak rate at the last step.
    pub min_lr_fraction: f64,
}

impl Default for MqarOptimizer {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            warmup_fraction: 0.1,
            min_lr_fraction: 0.1,
        }
    }
}

/// One MQAR training run: the model, task and width, and the budget it is trained with.
#[derive(Clone, Debug)]
pub struct MqarRun<'a> {
    pub model: &'a str,
    pub task: &'a MqarConfig,
    pub width: usize,
    pub depth: usize,
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub optimizer: &'a MqarOptimizer,
    /// Head width of the run's model.
    pub head_dim: usize,
    /// [`MqarResult::overrides`] of the run.
    pub overrides: Option<String>,
}

impl MqarResult {
    /// Whether this row is the result of `run`.
    pub fn answers(&self, run: &MqarRun) -> bool {
        let task = run.task;
        (self.model.as_str(), self.seq_len, self.pairs, self.width) == (run.model, task.seq_len, task.pairs, run.width)
            && (self.vocab, self.depth, self.steps, self.batch_size)
                == (task.vocab, run.depth, run.steps, run.batch_size)
            && self.lr == run.lr
            && self.optimizer == *run.optimizer
            // rows from before head widths were recorded had 4 heads from width 64, 2 below
            && self.head_dim.unwrap_or(self.width / if self.width >= 64 { 4 } else { 2 }) == run.head_dim
            && self.overrides == run.overrides
    }
}
