//! `altformers compare`: every causal architecture in the registry trained on the same
//! bytes with the same optimizer, schedule, token budget and parameter count (each model's
//! width is solved for the Transformer's count), then the recall suite, ListOps (every model,
//! encoders included), the scaling and decoding benchmarks, and the report. A model added to
//! the registry appears here with no edits.

pub mod listops;
pub mod mqar;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::bench::{decode, scaling, Provenance};
use crate::config::{ModelConfig, Overrides, RunConfig};
use crate::data::{mqar::MqarConfig, Corpus, DataFormat};
use crate::model::Model;
use crate::registry::{self, Architecture};
use crate::results::{quality_table, read_lines, write_lines, MqarResult, MqarRun, QualityRow};
use crate::train::{train, TrainOptions};
use mqar::MqarSettings;

/// A preset: the shared model shape and budgets of every part of the comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub description: String,
    /// CPU threads for the whole comparison on the CPU unless `--threads` says otherwise
    /// (default: every core).
    #[serde(default)]
    pub cpu_threads: Option<usize>,
    pub lm: LmSettings,
    pub mqar: mqar::MqarSettings,
    /// ListOps for every model (absent: the part is not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listops: Option<listops::ListOpsPart>,
    pub scaling: ScalingSettings,
    pub decode: DecodeSettings,
    /// Performer's approximation error against its feature count (absent: not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performer_error: Option<crate::bench::performer_error::PerformerErrorOptions>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmSettings {
    /// Laid over every model's defaults as a configuration file's `[model]` table is.
    #[serde(default)]
    pub model: toml::Table,
    /// Likewise the `[train]` table.
    #[serde(default)]
    pub train: toml::Table,
    /// Every model's width is solved so its parameters match the Transformer's at this width.
    pub reference_width: usize,
    /// The reference Transformer is trained again at each of these seeds (`train.seed`, which
    /// also seeds its initialisation): the table's noise band, so a reader sees which
    /// differences between models exceed seed noise.
    #[serde(default)]
    pub reference_seeds: Vec<u64>,
}

/// A preset's `[scaling]` table: the scaling bench's own options.
pub type ScalingSettings = scaling::ScalingOptions;

/// A preset's `[decode]` table: the decoding bench's own options.
pub type DecodeSettings = decode::DecodeOptions;

/// A named preset (`quick`, `full`) or a TOML file of the same shape.
pub fn preset(name: &str) -> Result<Preset> {
    let text = match name {
        "quick" => include_str!("../../../../configs/compare-quick.toml").to_string(),
        "full" => include_str!("../../../../configs/compare-full.toml").to_string(),
        path if path.ends_with(".toml") => {
            std::fs::read_to_string(path).with_context(|| format!("reading preset file {path}"))?
        }
        other => bail!("unknown preset `{other}`: use quick, full or a .toml file"),
    };
    let p: Preset = toml::from_str(&text).with_context(|| format!("preset {name} is invalid"))?;
    p.validate().with_context(|| format!("preset {name} is invalid"))?;
    Ok(p)
}

impl Preset {
    /// Every part's settings, checked when the preset is read: a bad value in a later part
    /// is refused before the earlier ones train (a scaling length of 0 panicked after them).
    pub fn validate(&self) -> Result<()> {
        self.mqar.validate()?;
        self.scaling.validate()?;
        self.decode.validate()?;
        match &self.performer_error {
            Some(p) => p.validate(),
            None => Ok(()),
        }
    }
}

/// The parts of a comparison, run in this order.
pub const PARTS: [&str; 6] = ["lm", "mqar", "listops", "scaling", "decode", "performer-error"];

/// What to run: which parts and which models (default: all of both).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub parts: Vec<String>,
    pub models: Vec<String>,
    /// Runs trained at once in the language-model, MQAR and ListOps parts ([`run_queue`]);
    /// results do not depend on it. `None`: [`Selection::workers`]'s default.
    pub jobs: Option<usize>,
    /// GPUs the runs are spread over, worker i on GPU i mod `gpus` (`--device cuda`: every
    /// visible one); 1 keeps every run on the given device.
    pub gpus: usize,
    /// Workers each language-model run is spread over (data-parallel, one after another;
    /// `--data-parallel`: one per GPU in use) instead of one run per worker; 0 or 1: none.
    /// Recall and ListOps runs stay one per GPU.
    pub data_parallel: usize,
}

/// How a part's runs are shared out: `jobs` at once, over `gpus` GPUs (see [`run_queue`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Workers {
    pub jobs: usize,
    pub gpus: usize,
}

impl Selection {
    fn check(&self) -> Result<()> {
        if self.jobs == Some(0) {
            bail!("--jobs must be at least 1 (got 0)");
        }
        if let Some(p) = self.parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
            bail!("unknown part `{p}`: choose from {}", PARTS.join(", "));
        }
        for m in &self.models {
            registry::find(m)?;
        }
        Ok(())
    }

    /// The models selected (all of them where none is named), in registry order; encoders
    /// only with `encoders` (they take part in ListOps only: no language model, recall,
    /// decoding).
    fn architectures(&self, encoders: bool) -> Vec<&'static Architecture> {
        registry::ARCHITECTURES
            .iter()
            .filter(|a| (a.causal || encoders) && (self.models.is_empty() || self.models.iter().any(|m| m == a.name)))
            .collect()
    }

    /// The training parts' workers: `jobs`, or by default one per GPU in use (more only where
    /// asked: they share its streams) and on the CPU as many as the cores hold at the pool's
    /// threads each (the quick preset's one thread: a worker per core, where one run at a
    /// time left the other core idle).
    fn workers(&self, device: &Device) -> Workers {
        let gpus = if device.is_cuda() { self.gpus.max(1) } else { 1 };
        let jobs = self.jobs.unwrap_or_else(|| match device {
            Device::Cpu => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores / rayon::current_num_threads()).max(1)
            }
            _ => gpus,
        });
        Workers { jobs, gpus }
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.is_empty() || self.parts.iter().any(|p| p == part)
    }
}

impl LmSettings {
    /// `arch`'s defaults with this section's tables laid over them.
    pub fn config(&self, arch: &Architecture) -> Result<RunConfig> {
        layered_config(arch, &self.model, &self.train)
    }
}

/// `arch`'s defaults with a part's `model` and `train` tables laid over them.
fn layered_config(arch: &Architecture, model: &toml::Table, train: &toml::Table) -> Result<RunConfig> {
    let mut tables = toml::Table::new();
    tables.insert("model".into(), toml::Value::Table(model.clone()));
    tables.insert("train".into(), toml::Value::Table(train.clone()));
    arch.config(&Overrides { tables: vec![toml::Value::Table(tables)], sets: vec![] })
}

/// Parameters of `arch` built as `model` but at `width`, or `None` if that width is invalid
/// for it.
pub fn param_count(arch: &Architecture, model: &ModelConfig, width: usize) -> Option<usize> {
    let mut m = model.clone();
    m.width = width;
    arch.check(&m).ok()?;
    Model::new(&m, 0, &Device::Cpu, DType::F32).ok().map(|m| m.num_params())
}

/// Which of a model's parameters a match counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// Every parameter (the language-model comparison: short contexts, where nothing
    /// length-bound weighs much).
    All,
    /// All but the length-bound ones ([`length_bound_params`]): LRA holds the architecture's
    /// width and depth equal and lets a Linformer's `E, F` (k x n) come on top, and at n = 2000
    /// they would otherwise eat the width (a matcher counting them gave Linformer width 4).
    WidthBound,
}

/// The parameters of `model` whose shapes follow `model.context` (learned positions,
/// Linformer's `E` and `F`): the model is built at `context` and at `context + 1` and the
/// tensors whose shapes differ are counted (at `context`). 0 if the longer one is invalid.
pub fn length_bound_params(arch: &Architecture, model: &ModelConfig) -> Result<usize> {
    let build = |m: &ModelConfig| Model::new(m, 0, &Device::Cpu, DType::F32);
    let at = build(model)?;
    let longer = ModelConfig { context: model.context + 1, ..model.clone() };
    if arch.check(&longer).is_err() {
        return Ok(0);
    }
    let Ok(longer) = build(&longer) else { return Ok(0) };
    let other: std::collections::BTreeMap<String, Vec<usize>> =
        longer.params.vars().into_iter().map(|(name, p)| (name, p.var.dims().to_vec())).collect();
    Ok(at
        .params
        .vars()
        .into_iter()
        .filter(|(name, p)| other.get(name).is_none_or(|d| d.as_slice() != p.var.dims()))
        .map(|(_, p)| p.var.elem_count())
        .sum())
}

/// [`param_count`] counting what `counted` says.
pub fn counted_params(arch: &Architecture, model: &ModelConfig, width: usize, counted: Counted) -> Option<usize> {
    let total = param_count(arch, model, width)?;
    match counted {
        Counted::All => Some(total),
        Counted::WidthBound => {
            let bound = length_bound_params(arch, &ModelConfig { width, ..model.clone() }).ok()?;
            Some(total - bound)
        }
    }
}

/// The width (a multiple of the head count; widths a model rejects are skipped) whose
/// parameter count (as `counted` says) is closest to `target`.
pub fn solve_width(
    arch: &Architecture,
    model: &ModelConfig,
    target: usize,
    counted: Counted,
) -> Result<(usize, usize)> {
    let step = model.heads;
    let mut best: Option<(usize, usize)> = None;
    let mut width = step;
    while width <= 64 * step.max(16) {
        if let Some(p) = counted_params(arch, model, width, counted) {
            let better = best.is_none_or(|(_, bp)| p.abs_diff(target) < bp.abs_diff(target));
            if better {
                best = Some((width, p));
            }
            if p > target * 2 {
                break;
            }
        }
        width += step;
    }
    best.with_context(|| format!("no valid width found for {}", arch.name))
}

/// `model` brought within 5% of `target` parameters: the closest width, and where the width's
/// granularity is too coarse (small models), the channel mixer's `ffn_mult` adjusted in steps
/// of 1/16 around that width. Returns the configuration and its count (as `counted` says).
pub fn match_params(
    arch: &Architecture,
    model: &ModelConfig,
    target: usize,
    counted: Counted,
) -> Result<(ModelConfig, usize)> {
    let (width, params) = solve_width(arch, model, target, counted)?;
    let mut best = (ModelConfig { width, ..model.clone() }, params);
    let off = |p: usize| (p as f64 / target as f64 - 1.0).abs();
    if off(params) <= 0.05 {
        return Ok(best);
    }
    let step = model.heads;
    for w in [width.saturating_sub(step), width, width + step].into_iter().filter(|&w| w > 0) {
        for k in -8i32..=8 {
            let trial = ModelConfig { ffn_mult: model.ffn_mult * (1.0 + k as f64 / 16.0), ..model.clone() };
            if let Some(p) = counted_params(arch, &trial, w, counted) {
                if off(p) < off(best.1) {
                    best = (ModelConfig { width: w, ..trial }, p);
                }
            }
        }
    }
    Ok(best)
}

/// Runs everything the preset asks for into `out`, then renders `out/report.md`.
/// Parts already in `out` that `select` leaves out are kept, so a comparison can be run in
/// pieces (one part or a few models per process) into one directory.
pub fn run(
    preset_name: &str,
    data: &str,
    format: DataFormat,
    out: &Path,
    device: &Device,
    select: &Selection,
) -> Result<()> {
    select.check()?;
    let preset = preset(preset_name)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_meta(out, preset_name, &preset, data, select, device)?;
    eprintln!("compare --preset {preset_name}: {}", preset.description);
    let causal = select.architectures(false);
    let encoders: Vec<&str> = select.architectures(true).iter().filter(|a| !a.causal).map(|a| a.name).collect();
    if !encoders.is_empty()
        && !select.models.is_empty()
        && select.parts.iter().any(|p| p != "listops" && p != "scaling")
    {
        eprintln!("note: encoders ({}) take part in ListOps and scaling only", encoders.join(", "));
    }
    let jobs = select.workers(device);
    let mut quality = Vec::new();
    if select.runs("lm") {
        quality = run_lm(&preset.lm, &causal, data, format, out, device, jobs, select.data_parallel)?;
    }
    if select.runs("mqar") {
        run_mqar(&preset.mqar, &causal, out, device, jobs)?;
    }
    match &preset.listops {
        Some(part) if select.runs("listops") => listops::run(part, &select.architectures(true), out, device, jobs)?,
        None if select.parts.iter().any(|p| p == "listops") => {
            bail!("preset {preset_name} has no [listops] section: nothing to run for --parts listops")
        }
        _ => {}
    }
    if select.runs("scaling") {
        // encoders too: one layer's cost against T needs no causal form
        run_scaling(&preset.scaling, &select.architectures(true), out, device)?;
    }
    if select.runs("decode") {
        run_decode(&preset.decode, &causal, out, device)?;
    }
    match &preset.performer_error {
        Some(opts) if select.runs("performer-error") && causal.iter().any(|a| a.name == "performer") => {
            run_performer_error(opts, out)?
        }
        None if select.parts.iter().any(|p| p == "performer-error") => {
            bail!("preset {preset_name} has no [performer_error] section: nothing to run for --parts performer-error")
        }
        _ => {}
    }
    crate::report::render(out)?;
    if !quality.is_empty() {
        println!("{}", quality_table(&quality));
    }
    eprintln!("report written to {}", out.join("report.md").display());
    Ok(())
}

/// Performer's approximation error against exact attention per feature count, into
/// `out/performer-error.jsonl` (computed in f64 on the CPU whatever the device).
fn run_performer_error(opts: &crate::bench::performer_error::PerformerErrorOptions, out: &Path) -> Result<()> {
    eprintln!("performer-error: m = {:?}, input std {:?}, {} draws", opts.features, opts.input_stds, opts.draws);
    let rows = crate::bench::performer_error::run(opts, |r| {
        eprintln!("  std {} m {}: orthogonal {:.4}, iid {:.4}", r.input_std, r.features, r.orthogonal_mean, r.iid_mean)
    })?;
    let text: String =
        rows.iter().map(|r| serde_json::to_string(r).map(|l| l + "\n")).collect::<serde_json::Result<_>>()?;
    crate::util::write_atomic(&out.join("performer-error.jsonl"), text.as_bytes())
}

/// `out/meta.json`: the provenance of the run (with the command that started it) and the
/// preset.
fn write_meta(
    out: &Path,
    preset_name: &str,
    preset: &Preset,
    data: &str,
    select: &Selection,
    device: &Device,
) -> Result<()> {
    let mut meta = Provenance::capture(device);
    meta.command = format!("altformers compare --preset {preset_name} --data {data}");
    if !select.parts.is_empty() {
        meta.command += &format!(" --parts {}", select.parts.join(","));
    }
    if !select.models.is_empty() {
        meta.command += &format!(" --models {}", select.models.join(","));
    }
    // the training parts' workers (the tokens/s column is measured beside the others)
    meta.command += &format!(" --jobs {}", select.workers(device).jobs);
    if select.data_parallel > 1 {
        meta.command += " --data-parallel";
    }
    crate::util::write_json_atomic(
        &out.join("meta.json"),
        &serde_json::json!({ "provenance": meta, "preset": preset_name, "description": preset.description }),
    )
}

/// Language modelling at equal parameters and tokens: every model of `models` trained on
/// `data` at the parameter count of the Transformer at `lm.reference_width`. Each row is
/// written to `out/quality.jsonl` as it is trained; returns them all. With `spread` above 1
/// the runs go one after another, each data-parallel over `spread` workers.
#[allow(clippy::too_many_arguments)]
fn run_lm(
    lm: &LmSettings,
    models: &[&Architecture],
    data: &str,
    format: DataFormat,
    out: &Path,
    device: &Device,
    workers: Workers,
    spread: usize,
) -> Result<Vec<QualityRow>> {
    let corpus = Corpus::load(data, format)?;
    let reference = registry::find("transformer")?;
    let target = param_count(reference, &lm.config(reference)?.model, lm.reference_width)
        .context("the reference Transformer does not build")?;
    // every model at the preset's seed, the reference again at each of its extra seeds
    let runs: Vec<(&Architecture, Option<u64>)> = models
        .iter()
        .flat_map(|&arch| {
            let extra = if arch.name == reference.name { lm.reference_seeds.as_slice() } else { &[] };
            std::iter::once((arch, None)).chain(extra.iter().map(move |&s| (arch, Some(s))))
        })
        .collect();
    if spread > 1 {
        // refused before any run, not at the first that cannot be split
        for (arch, _) in &runs {
            let cfg = lm.config(arch)?;
            if !cfg.train.batch_size.is_multiple_of(spread) {
                bail!(
                    "--data-parallel: [lm] train.batch_size {} is not a multiple of the {spread} GPUs",
                    cfg.train.batch_size
                );
            }
        }
    }
    let todo: Vec<usize> = (0..runs.len()).collect();
    let (workers, spread) = if spread > 1 { (Workers { jobs: 1, gpus: 1 }, spread) } else { (workers, 1) };
    let rows = run_queue(
        &todo,
        vec![None; runs.len()],
        workers,
        device,
        |i, dev| {
            let verbose = workers.jobs == 1;
            train_lm(runs[i].0, lm, target, &corpus, format, out, dev, runs[i].1, verbose, spread)
        },
        |finished| write_lines(&out.join("quality.jsonl"), models, finished),
    )?;
    Ok(rows.into_iter().flatten().collect())
}

/// Trains `arch` with `lm`'s settings, sized to `target` parameters ([`match_params`]), into
/// `out/runs/NAME` (emptied first); with `seed`, at that `train.seed`, into
/// `out/runs/NAME-seedS`; with `spread` above 1, data-parallel over that many workers
/// ([`crate::train::distributed::in_threads`]).
#[allow(clippy::too_many_arguments)]
fn train_lm(
    arch: &Architecture,
    lm: &LmSettings,
    target: usize,
    corpus: &Corpus,
    format: DataFormat,
    out: &Path,
    device: &Device,
    seed: Option<u64>,
    verbose: bool,
    spread: usize,
) -> Result<QualityRow> {
    let mut cfg = lm.config(arch)?;
    let params;
    (cfg.model, params) = match_params(arch, &cfg.model, target, Counted::All)?;
    let width = cfg.model.width;
    let run_dir = match seed {
        Some(s) => {
            cfg.train.seed = s;
            out.join("runs").join(format!("{}-seed{s}", arch.name))
        }
        None => out.join("runs").join(arch.name),
    };
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let summary = if spread > 1 {
        crate::train::distributed::in_threads(spread, device, |dev, group| {
            let opts = TrainOptions { group: Some(group), ..TrainOptions::fresh(run_dir.clone(), dev, verbose) };
            train(&cfg, corpus, format, &opts)
        })
    } else {
        train(&cfg, corpus, format, &TrainOptions::fresh(run_dir, device, verbose))
    }
    .with_context(|| format!("training {}", arch.name))?;
    Ok(QualityRow {
        model: arch.name.to_string(),
        width,
        params,
        params_ratio: params as f64 / target as f64,
        steps: cfg.train.steps,
        tokens: cfg.train.steps * cfg.train.batch_size * cfg.model.context,
        val_loss: summary.last.val_loss,
        val_bpb: summary.last.val_bpb,
        tokens_per_s: summary.history.iter().map(|m| m.tokens_per_s).sum::<f64>() / summary.history.len() as f64,
        elapsed_s: summary.last.elapsed_s,
        seed: Some(cfg.train.seed),
        head_dim: Some(width / cfg.model.heads.max(1)),
    })
}

/// One MQAR run of the grid: model, task, width and peak learning rate.
type GridPoint = (&'static str, MqarConfig, usize, f64);

/// Multi-query associative recall: every model of `models` on every task, width and learning
/// rate of `s`, trained by `jobs` workers. Rows already in `out/mqar.jsonl` with the same
/// budget are kept, not retrained: a grid too large for one sitting is finished by running
/// the same command again.
fn run_mqar(s: &MqarSettings, models: &[&Architecture], out: &Path, device: &Device, workers: Workers) -> Result<()> {
    s.validate()?;
    let path = out.join("mqar.jsonl");
    let grid = mqar_grid(s, models);
    let recall = kept_rows(&grid, s, out)?;
    // Narrow models and short tasks first: a grid cut short still covers every model.
    let mut todo: Vec<usize> = (0..grid.len()).filter(|&i| recall[i].is_none()).collect();
    todo.sort_by_key(|&i| (grid[i].2, grid[i].1.seq_len, i % s.lrs.len().max(1), i));
    // every finished run is written at once, so an interrupted grid resumes where it stopped
    let rows = run_queue(
        &todo,
        recall,
        workers,
        device,
        |i, dev| {
            let (name, task, width, lr) = &grid[i];
            let r = mqar::train_and_score(name, task, *width, s, *lr, dev, 17)
                .with_context(|| format!("MQAR for {name}"))?;
            eprintln!(
                "mqar {name} T={} pairs={} width={width} lr={lr}: accuracy {:.3}",
                task.seq_len, task.pairs, r.accuracy
            );
            Ok(r)
        },
        |finished| write_lines(&path, models, finished),
    )?;
    let finished: Vec<&MqarResult> = rows.iter().flatten().collect();
    write_lines(&path, models, &finished)
}

/// Every (model, task, width, learning rate) of `s` for `models`, in that nesting.
fn mqar_grid(s: &MqarSettings, models: &[&Architecture]) -> Vec<GridPoint> {
    let mut grid = Vec::new();
    for arch in models {
        for &(seq_len, pairs) in &s.tasks {
            let task = MqarConfig { vocab: s.vocab, seq_len, pairs, alpha: 0.01 };
            for &width in &s.widths {
                for &lr in &s.lrs {
                    grid.push((arch.name, task, width, lr));
                }
            }
        }
    }
    grid
}

/// For each run of `grid`, the row of `out/mqar.jsonl` that answers it (same budget), if any.
fn kept_rows(grid: &[GridPoint], s: &MqarSettings, out: &Path) -> Result<Vec<Option<MqarResult>>> {
    let done: Vec<MqarResult> = read_lines(&out.join("mqar.jsonl"))?.unwrap_or_default();
    let mut recall = Vec::with_capacity(grid.len());
    for (name, task, width, lr) in grid {
        let run = MqarRun {
            model: name,
            task,
            width: *width,
            depth: s.depth,
            steps: s.steps,
            batch_size: s.batch_size,
            lr: *lr,
            optimizer: &s.optimizer,
            head_dim: *width / mqar::mqar_model(name, task, *width, s)?.heads.max(1),
            overrides: s.per_model.get(*name).map(mqar::overrides_text),
        };
        let kept = done.iter().find(|r| r.answers(&run)).cloned();
        if kept.is_some() {
            eprintln!(
                "mqar {name} T={} pairs={} width={width} lr={lr}: kept from {}",
                task.seq_len,
                task.pairs,
                out.display()
            );
        }
        recall.push(kept);
    }
    Ok(recall)
}

/// Fills `slots[i]` with `run(i, device)` for every `i` of `todo`, `workers.jobs` runs at once
/// (workers take the next of `todo` as they finish), and after each run hands `written` the
/// filled slots in slot order (so a part cut short keeps what finished). Each worker has a
/// device of its own CUDA stream on a GPU ([`crate::device::with_own_stream`]), worker w on GPU
/// w mod `workers.gpus` where those are more than one (one run per GPU: the preset's models are
/// small, and independent runs need no exchange), and a thread pool of its own, of the
/// caller's size: on the CPU its ops' parallel loops then run on its threads, not queued
/// behind the other workers' on a shared pool. One job on one GPU runs on this thread, on
/// `device`.
pub(crate) fn run_queue<R: Send>(
    todo: &[usize],
    slots: Vec<Option<R>>,
    workers: Workers,
    device: &Device,
    run: impl Fn(usize, &Device) -> Result<R> + Sync,
    written: impl Fn(&[&R]) -> Result<()> + Sync,
) -> Result<Vec<Option<R>>> {
    let slots = std::sync::Mutex::new(slots);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = |dev: Device| -> Result<()> {
        while let Some(&i) = todo.get(next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) {
            let r = run(i, &dev)?;
            let mut rows = slots.lock().map_err(|_| anyhow::anyhow!("a comparison worker panicked"))?;
            rows[i] = Some(r);
            written(&rows.iter().flatten().collect::<Vec<_>>())?;
        }
        Ok(())
    };
    let jobs = workers.jobs.min(todo.len()).max(1);
    if jobs == 1 && workers.gpus <= 1 {
        worker(device.clone())?;
    } else {
        let devices = (0..jobs)
            .map(|w| match workers.gpus {
                0 | 1 => crate::device::with_own_stream(device),
                n => crate::device::with_own_stream(&crate::device::select(&format!("cuda:{}", w % n))?),
            })
            .collect::<Result<Vec<_>>>()?;
        let threads = rayon::current_num_threads();
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = devices
                .into_iter()
                .map(|d| {
                    let worker = &worker;
                    s.spawn(move || -> Result<()> {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).stack_size(8 << 20).build()?;
                        pool.install(|| worker(d))
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a comparison worker panicked"))??;
            }
            Ok(())
        })?;
    }
    slots.into_inner().map_err(|_| anyhow::anyhow!("a comparison worker panicked"))
}

/// Time and memory of one layer of every model of `models` against sequence length, forward
/// in f32: `out/scaling.jsonl` and the fitted exponents, `out/scaling-fits.jsonl`.
fn run_scaling(s: &ScalingSettings, models: &[&Architecture], out: &Path, device: &Device) -> Result<()> {
    let sopts = ScalingSettings { models: models.iter().map(|a| a.name.to_string()).collect(), ..s.clone() };
    let (points, fits) = scaling::run(&sopts, device, |p| {
        if let Some(t) = p.timing {
            eprintln!("scaling {} {} T={}: {:.4} s", p.model, p.component, p.seq, t.median_s)
        }
    })?;
    write_lines(&out.join("scaling.jsonl"), models, &points)?;
    write_lines(&out.join("scaling-fits.jsonl"), models, &fits)
}

/// Per-token decoding latency and state of every model of `models` against context, in f32:
/// `out/decode.jsonl`.
fn run_decode(d: &DecodeSettings, models: &[&Architecture], out: &Path, device: &Device) -> Result<()> {
    let dopts = DecodeSettings { models: models.iter().map(|a| a.name.to_string()).collect(), ..d.clone() };
    let decoded = decode::run(&dopts, device, |p| {
        if let Some(l) = p.latency_s {
            eprintln!("decode {} context={} batch={}: {:.2} ms/token", p.model, p.context, p.batch, l * 1e3)
        }
    })?;
    write_lines(&out.join("decode.jsonl"), models, &decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh temporary directory (named after `tag`) holding `tiny.toml`: the quick preset
    /// with `mqar` as its recall settings. Returns the directory, the preset and the file.
    fn tiny_preset(tag: &str, mqar: mqar::MqarSettings) -> Result<(std::path::PathBuf, Preset, std::path::PathBuf)> {
        let dir = crate::testing::fresh_dir(tag)?;
        let mut p = preset("quick")?;
        p.mqar = mqar;
        let file = dir.join("tiny.toml");
        std::fs::write(&file, toml::to_string(&p)?)?;
        Ok((dir, p, file))
    }

    fn mqar_rows(dir: &Path) -> Result<Vec<MqarResult>> {
        Ok(read_lines(&dir.join("mqar.jsonl"))?.unwrap())
    }

    /// Every preset in configs/ reads; a preset's bench tables are the benches' options, with
    /// the memory caps in bytes and compare's mode, warm-up and dtype, and survive a round trip.
    #[test]
    fn presets_read_as_bench_options() -> Result<()> {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut read = 0;
        for entry in std::fs::read_dir(configs)? {
            let path = entry?.path();
            if std::fs::read_to_string(&path)?.contains("[scaling]") {
                let p = preset(path.to_str().unwrap())?;
                let again: Preset = toml::from_str(&toml::to_string(&p)?)?;
                assert_eq!(format!("{p:?}"), format!("{again:?}"), "{}", path.display());
                read += 1;
            }
        }
        assert!(read >= 4, "{read} presets");
        let q = preset("quick")?;
        assert_eq!((q.scaling.memory_cap_bytes, q.decode.memory_cap_bytes), (4e9, 2e9));
        assert_eq!(
            (q.scaling.mode, q.scaling.warmup, q.scaling.dtype, q.decode.dtype),
            (scaling::BenchMode::Fwd, 1, DType::F32, DType::F32)
        );
        assert!(q.scaling.models.is_empty() && q.decode.models.is_empty());
        Ok(())
    }

    /// A bad value in any part's table is refused when the preset is read, naming it, before
    /// any part trains (a scaling length of 0 panicked, dividing by zero, after the LM, MQAR
    /// and ListOps parts had run; MQAR's eval_examples = 0 scored 0 / 0).
    #[test]
    fn a_bad_value_in_any_part_is_refused_when_the_preset_is_read() -> Result<()> {
        let dir = crate::testing::fresh_dir("bad-preset")?;
        let quick = include_str!("../../../../configs/compare-quick.toml");
        for (from, to, needle) in [
            (
                "lengths = [1024, 2048, 4096, 8192]",
                "lengths = [0]",
                "--lengths (lengths): every value must be at least 1",
            ),
            ("tokens_per_batch = 8192", "tokens_per_batch = 0", "--tokens-per-batch (tokens_per_batch) must be"),
            ("contexts = [1024, 2048]", "contexts = []", "--contexts (contexts) is empty"),
            ("eval_examples = 256", "eval_examples = 0", "[mqar] eval_examples must be a positive number, got 0"),
            ("draws = 4", "draws = 0", "--draws must be"),
        ] {
            assert!(quick.contains(from), "{from}");
            let file = dir.join("bad.toml");
            std::fs::write(&file, quick.replace(from, to))?;
            let err = format!("{:#}", preset(file.to_str().unwrap()).unwrap_err());
            assert!(err.contains(needle), "{to}: expected `{needle}` in: {err}");
        }
        Ok(())
    }

    /// The recall part run again into the same directory keeps the rows it already has
    /// (same budget) and retrains those whose budget changed.
    #[test]
    fn mqar_rerun_keeps_finished_rows() -> Result<()> {
        let settings = mqar::MqarSettings::default();
        let (dir, mut p, file) = tiny_preset("mqar-rerun", settings)?;
        let select = Selection {
            parts: vec!["mqar".into()],
            models: vec!["transformer".into()],
            jobs: Some(1),
            gpus: 1,
            data_parallel: 0,
        };
        let preset_arg = file.to_str().unwrap();
        run(preset_arg, "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let first = mqar_rows(&dir)?;
        assert_eq!(first.len(), 1);
        run(preset_arg, "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let again = mqar_rows(&dir)?;
        assert_eq!((again.len(), again[0].train_s), (1, first[0].train_s), "the finished row was retrained");
        p.mqar.steps = 3;
        std::fs::write(&file, toml::to_string(&p)?)?;
        run(preset_arg, "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let changed = mqar_rows(&dir)?;
        assert_eq!((changed.len(), changed[0].steps), (1, 3), "a row with another budget was kept");
        p.mqar.optimizer.beta2 = 0.99;
        std::fs::write(&file, toml::to_string(&p)?)?;
        run(preset_arg, "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let reoptimized = mqar_rows(&dir)?;
        assert_eq!(reoptimized.len(), 1);
        assert_eq!(reoptimized[0].optimizer.beta2, 0.99, "a row trained with another optimizer was kept");
        p.mqar.per_model.insert("transformer".into(), toml::from_str("position = \"rope\"")?);
        std::fs::write(&file, toml::to_string(&p)?)?;
        run(preset_arg, "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let roped = mqar_rows(&dir)?;
        assert_eq!(roped.len(), 1);
        assert_eq!(
            roped[0].overrides.as_deref(),
            Some("position = \"rope\""),
            "a row of other model settings was kept"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// The Performer-error part writes one row per (input std, m) into the folder and the
    /// report plots them; it needs the preset's section and Performer among the models.
    #[test]
    fn performer_error_part_writes_rows_and_the_report_plots_them() -> Result<()> {
        let (dir, mut p, file) = tiny_preset("performer-error-part", mqar::MqarSettings::default())?;
        let opts = p.performer_error.as_mut().expect("the quick preset has [performer_error]");
        (opts.head_dim, opts.heads, opts.length, opts.draws) = (8, 1, 12, 2);
        (opts.input_stds, opts.features) = (vec![0.5], vec![8, 64]);
        std::fs::write(&file, toml::to_string(&p)?)?;
        let select = Selection {
            parts: vec!["performer-error".into()],
            models: vec!["performer".into()],
            jobs: Some(1),
            gpus: 1,
            data_parallel: 0,
        };
        run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let rows: Vec<crate::bench::performer_error::PerformerErrorRow> =
            read_lines(&dir.join("performer-error.jsonl"))?.unwrap();
        assert_eq!(rows.iter().map(|r| r.features).collect::<Vec<_>>(), [8, 64]);
        assert!(rows[1].orthogonal_mean < rows[0].orthogonal_mean, "{rows:?}");
        let md = std::fs::read_to_string(dir.join("report.md"))?;
        assert!(md.contains("## Performer: approximation error") && dir.join("plots/performer-error.svg").exists());
        p.performer_error = None;
        std::fs::write(&file, toml::to_string(&p)?)?;
        let err =
            run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select).unwrap_err();
        assert!(err.to_string().contains("no [performer_error] section"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// The ListOps part trains the causal and the encoder models named (read at the last
    /// position and pooled), writes their rows and the report's table with LRA's figures;
    /// a preset without `[listops]` refuses `--parts listops`.
    #[test]
    fn listops_part_trains_causal_models_and_encoders() -> Result<()> {
        let (dir, mut p, file) = tiny_preset("listops-part", mqar::MqarSettings::default())?;
        let part = p.listops.as_mut().expect("the quick preset has [listops]");
        part.reference_width = 16;
        part.model.insert("depth".into(), 1.into());
        part.model.insert("context".into(), 24.into());
        part.model.insert("heads".into(), 2.into());
        for (k, v) in [("steps", 2), ("decay_steps", 2), ("warmup_steps", 1), ("eval_every", 2), ("batch_size", 4)] {
            part.train.insert(k.into(), v.into());
        }
        part.task.generator.max_len = 20;
        part.task.generator.min_len = 4;
        (part.task.train_examples, part.task.eval_examples) = (8, 4);
        std::fs::write(&file, toml::to_string(&p)?)?;
        let models = vec!["transformer".to_string(), "transformer-encoder".to_string()];
        let select = Selection { parts: vec!["listops".into()], models, jobs: Some(1), gpus: 1, data_parallel: 0 };
        run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
        let rows: Vec<crate::results::ListOpsRow> = read_lines(&dir.join("listops.jsonl"))?.unwrap();
        let read: Vec<(&str, &str)> = rows.iter().map(|r| (r.model.as_str(), r.readout.as_str())).collect();
        assert_eq!(read, [("transformer", "last-position"), ("transformer-encoder", "mean-pool")]);
        assert!((rows[1].params_ratio - 1.0).abs() < 0.05, "{}", rows[1].params_ratio);
        let md = std::fs::read_to_string(dir.join("report.md"))?;
        assert!(
            md.contains("## ListOps") && md.contains("| transformer-encoder | mean-pool |") && md.contains("36.4%"),
            "{md}"
        );
        p.listops = None;
        std::fs::write(&file, toml::to_string(&p)?)?;
        let err =
            run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select).unwrap_err();
        assert!(err.to_string().contains("no [listops] section"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Several workers train the same runs to the same rows, written in the parts' order:
    /// language models (the reference at its extra seeds too), the recall grid and ListOps.
    #[test]
    fn workers_train_what_one_trains() -> Result<()> {
        let settings =
            mqar::MqarSettings { widths: vec![8, 16], steps: 3, lrs: vec![1e-3, 3e-3], ..Default::default() };
        let (base, mut p, file) = tiny_preset("compare-jobs", settings)?;
        let short = |t: &mut toml::Table| {
            for (key, value) in [("steps", 4), ("decay_steps", 4), ("warmup_steps", 1), ("eval_every", 2)] {
                t.insert(key.into(), toml::Value::Integer(value));
            }
        };
        short(&mut p.lm.train);
        p.lm.train.insert("eval_batches".into(), toml::Value::Integer(1));
        let listops = p.listops.as_mut().expect("the quick preset has [listops]");
        short(&mut listops.train);
        (listops.task.train_examples, listops.task.eval_examples) = (64, 16);
        std::fs::write(&file, toml::to_string(&p)?)?;
        let mut results = Vec::new();
        for jobs in [1, 3] {
            let dir = base.join(format!("jobs-{jobs}"));
            let parts = ["lm", "mqar", "listops"].map(String::from).to_vec();
            let models = ["transformer", "aft-simple"].map(String::from).to_vec();
            let select = Selection { parts, models, jobs: Some(jobs), gpus: 1, data_parallel: 0 };
            run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
            let lm: Vec<QualityRow> = read_lines(&dir.join("quality.jsonl"))?.unwrap();
            let listops: Vec<crate::results::ListOpsRow> = read_lines(&dir.join("listops.jsonl"))?.unwrap();
            results.push((
                lm.iter().map(|r| (r.model.clone(), r.seed, r.val_loss)).collect::<Vec<_>>(),
                mqar_rows(&dir)?
                    .iter()
                    .map(|r| (r.model.clone(), r.width, r.lr, r.final_loss, r.accuracy))
                    .collect::<Vec<_>>(),
                listops.iter().map(|r| (r.model.clone(), r.train_loss, r.test_accuracy)).collect::<Vec<_>>(),
            ));
        }
        let (lm, recall, listops) = &results[0];
        assert_eq!((lm.len(), recall.len(), listops.len()), (4, 8, 2), "rows: {:?}", results[0]);
        assert_eq!(lm[1].1, Some(2), "the reference's extra seeds follow it: {lm:?}");
        assert_eq!(results[0], results[1], "three workers trained other models than one");
        std::fs::remove_dir_all(&base)?;
        Ok(())
    }

    /// `--data-parallel`: each language-model run spread over two workers (threads of this
    /// process, the CPU exchange; on GPUs the same path goes through NCCL) trains what one
    /// worker does, to float rounding, and the report's command says how it was run.
    #[test]
    fn data_parallel_runs_train_what_one_trains() -> Result<()> {
        let (base, mut p, file) = tiny_preset("compare-data-parallel", mqar::MqarSettings::default())?;
        for (key, value) in
            [("steps", 6), ("decay_steps", 6), ("warmup_steps", 1), ("eval_every", 3), ("batch_size", 4)]
        {
            p.lm.train.insert(key.into(), toml::Value::Integer(value));
        }
        p.lm.reference_seeds.clear();
        std::fs::write(&file, toml::to_string(&p)?)?;
        let mut losses = Vec::new();
        for spread in [0, 2] {
            let dir = base.join(format!("spread-{spread}"));
            let models = ["transformer", "aft-simple"].map(String::from).to_vec();
            let select = Selection { parts: vec!["lm".into()], models, jobs: Some(1), gpus: 1, data_parallel: spread };
            run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select)?;
            let rows: Vec<QualityRow> = read_lines(&dir.join("quality.jsonl"))?.unwrap();
            losses.push(rows.iter().map(|r| (r.model.clone(), r.val_loss)).collect::<Vec<_>>());
            let meta = std::fs::read_to_string(dir.join("meta.json"))?;
            assert_eq!(meta.contains("--data-parallel"), spread > 1, "{meta}");
        }
        assert_eq!(losses[0].len(), 2, "{losses:?}");
        for ((model, one), (_, two)) in losses[0].iter().zip(&losses[1]) {
            assert!((one - two).abs() <= 1e-5 * one.abs(), "{model}: one worker {one}, two {two}");
        }
        // a batch the workers cannot share is refused before anything trains
        p.lm.train.insert("batch_size".into(), toml::Value::Integer(3));
        std::fs::write(&file, toml::to_string(&p)?)?;
        let dir = base.join("odd");
        let select = Selection { parts: vec!["lm".into()], models: vec![], jobs: Some(1), gpus: 1, data_parallel: 2 };
        let err =
            run(file.to_str().unwrap(), "shakespeare", DataFormat::Text, &dir, &Device::Cpu, &select).unwrap_err();
        assert!(format!("{err:#}").contains("train.batch_size 3 is not a multiple of the 2 GPUs"), "{err:#}");
        assert!(!dir.join("runs").exists(), "a run started before the refusal");
        std::fs::remove_dir_all(&base)?;
        Ok(())
    }
}
