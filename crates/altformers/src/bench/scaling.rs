//! `altformers bench scaling`: one mixer layer, one full block, or the whole model (tokens to
//! logits, one layer deep) per architecture, T doubling, batch chosen so B * T is constant;
//! median time, peak memory, analytic FLOPs. An architecture whose shape is its backbone
//! (MegaByte, Hourglass: no per-layer mixer) is measured as a whole model wherever a mixer
//! or block is asked for.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{alloc, fit, Timing};
use crate::backbones::stack::Block;
use crate::complexity::CostShape;
use crate::config::ModelConfig;
use crate::params::ParamBuilder;
use crate::registry::{self, Architecture};
use crate::rng::{stream, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    Fwd,
    Fwdbwd,
}

impl BenchMode {
    /// In words, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            BenchMode::Fwd => "forward",
            BenchMode::Fwdbwd => "forward and backward",
        }
    }
}

/// The sweep. As a `compare` preset's `[scaling]` table it holds the keys below but `models`
/// (compare's selection), `mode` (forward), `warmup` (one run) and `dtype` (f32), with the
/// memory cap in gigabytes (`memory_cap_gb`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingOptions {
    #[serde(skip)]
    pub models: Vec<String>,
    /// `mixer` (one sequence-mixer layer), `block` (the whole block) and/or `model` (tokens
    /// to logits at depth 1; see [`curves`]).
    pub components: Vec<String>,
    #[serde(skip, default = "forward")]
    pub mode: BenchMode,
    pub lengths: Vec<usize>,
    pub width: usize,
    pub heads: usize,
    /// B * T; the batch is `max(1, tokens_per_batch / T)`.
    pub tokens_per_batch: usize,
    #[serde(skip, default = "one_warmup")]
    pub warmup: usize,
    pub reps: usize,
    /// Lengths whose single run exceeds this are recorded as skipped, with all longer ones.
    pub time_cap_s: f64,
    /// Lengths whose analytic activation memory exceeds this are skipped unmeasured.
    #[serde(rename = "memory_cap_gb", with = "super::gigabytes")]
    pub memory_cap_bytes: f64,
    #[serde(skip, default = "super::preset_dtype")]
    pub dtype: DType,
    /// Settings laid on every model's defaults, `key=value` as `--set` (e.g.
    /// `model.options.k=256`), or on one model's only, `MODEL:key=value` (another model's
    /// options would be unknown keys to it).
    #[serde(default)]
    pub sets: Vec<String>,
    /// Processes each model's sweep runs in (`--processes`; a preset's `processes`, default
    /// 1). With several, each is a fresh process of this program ([`set_child_program`]),
    /// their repetitions are pooled, and the exponent's interval is a t interval over the
    /// exponents of each process alone ([`slope_interval`]): it then includes what differs
    /// between processes (allocator and cache state, the machine's load at the time), which
    /// the repetitions of one process do not show
    /// (bench/results/2026-12-03-cpu-dedicated-exponents).
    #[serde(default = "one_process")]
    pub processes: usize,
}

fn one_process() -> usize {
    1
}

/// The program whose `bench scaling` runs the sweeps of [`ScalingOptions::processes`] > 1:
/// the command line sets itself; unset (a library caller), such a sweep is refused.
static CHILD_PROGRAM: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Names the program sweeps in several processes run (the `altformers` executable).
pub fn set_child_program(path: std::path::PathBuf) {
    let _ = CHILD_PROGRAM.set(path);
}

impl ScalingOptions {
    /// Checked at the start of every sweep, whether its settings came from the command line
    /// or a `compare` preset's `[scaling]` table (a length of 0 divided by zero in both).
    pub fn validate(&self) -> Result<()> {
        crate::util::counts_at_least_one(&[("--lengths (lengths)", &self.lengths)])?;
        crate::util::positive(&[
            ("--width (width)", self.width as f64),
            ("--heads (heads)", self.heads as f64),
            ("--tokens-per-batch (tokens_per_batch)", self.tokens_per_batch as f64),
            ("--reps (reps)", self.reps as f64),
            ("--time-cap (time_cap_s)", self.time_cap_s),
            ("--memory-cap-gb (memory_cap_gb)", self.memory_cap_bytes / 1e9),
            ("--processes (processes)", self.processes as f64),
        ])
    }
}

fn forward() -> BenchMode {
    BenchMode::Fwd
}

fn one_warmup() -> usize {
    1
}

/// One measured (or skipped) point; one JSON line of the output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScalingPoint {
    pub model: String,
    /// `mixer` (one sequence-mixer layer), `block` (norms, mixer, channel mixer) or `model`
    /// (embedding, one layer of each stage, head).
    pub component: String,
    pub mode: BenchMode,
    pub device: String,
    pub seq: usize,
    pub batch: usize,
    pub width: usize,
    pub heads: usize,
    /// `ok`, or why the point was not measured.
    pub status: String,
    pub timing: Option<Timing>,
    /// Peak memory of one run above the level before it: the heap's high-water mark on the
    /// CPU, the device memory pool's on CUDA (`bench::alloc::peak_during`).
    pub peak_bytes: Option<u64>,
    pub flops: f64,
    pub flops_per_s: Option<f64>,
    /// Every timed repetition (seconds), for the exponent's interval; absent in
    /// files written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples_s: Vec<f64>,
    /// The same repetitions by process, where the sweep ran in several
    /// ([`ScalingOptions::processes`]); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub process_samples_s: Vec<Vec<f64>>,
}

/// Fitted exponents for one curve, appended after the points.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScalingFit {
    pub model: String,
    pub component: String,
    pub mode: BenchMode,
    pub time_slope: Option<f64>,
    /// 95% interval of `time_slope`, over the processes or the repetitions ([`slope_interval`]);
    /// `None` where the points hold no samples (files written before) or too few.
    #[serde(default)]
    pub time_slope_interval: Option<(f64, f64)>,
    pub memory_slope: Option<f64>,
    /// The slope of the cost model's FLOPs per sequence (the architecture's analytic
    /// `complexity.flops`) over the same lengths: the exponent the true complexity predicts
    /// there. Below the asymptotic one, the leading term (e.g. T^2 d attention) does not yet
    /// dominate the others (T d^2 projections) at these lengths. `None` in files written before.
    #[serde(default)]
    pub cost_slope: Option<f64>,
    /// Lengths the upper-half fit used.
    pub fit_lengths: Vec<usize>,
}

/// The `sets` (see [`ScalingOptions::sets`]) that apply to `model`, without their prefix.
pub fn sets_for<'a>(sets: &'a [String], model: &str) -> Vec<&'a str> {
    sets.iter()
        .filter_map(|s| match s.split_once(':') {
            Some((m, rest)) if !m.contains('=') => (m == model).then_some(rest),
            _ => Some(s.as_str()),
        })
        .collect()
}

/// A bench configuration of `arch` at width/heads/context (the paper's other defaults kept,
/// `sets` laid on them).
pub fn bench_config(
    arch: &Architecture,
    width: usize,
    heads: usize,
    context: usize,
    sets: &[String],
) -> Result<ModelConfig> {
    let over = crate::config::Overrides::sets(&sets_for(sets, arch.name));
    let mut cfg = arch.config(&over).with_context(|| format!("the bench's settings for `{}`", arch.name))?.model;
    (cfg.width, cfg.heads, cfg.context, cfg.depth) = (width, heads, context, 1);
    if cfg.position == crate::config::Position::Learned {
        // positions live in the embedding, outside the layer being measured
        cfg.position = crate::config::Position::None;
    }
    arch.check(&cfg)?;
    Ok(cfg)
}

/// The curves measured for `arch` when `components` are asked for: those named, except that
/// an architecture without a per-layer mixer has only the whole model (`model`) to time.
pub fn curves(arch: &Architecture, components: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for c in components {
        let c = match c.as_str() {
            "mixer" | "block" if arch.mixer.is_none() => "model",
            "mixer" | "block" | "model" => c.as_str(),
            other => anyhow::bail!("unknown scaling component `{other}`; known: mixer, block, model"),
        };
        if !out.iter().any(|o| o == c) {
            out.push(c.to_string());
        }
    }
    Ok(out)
}

/// The curve that stands for `arch` in the report's chart and complexity table: its mixer
/// layer, or its whole model where it has no per-layer mixer.
pub fn headline_component(arch: &Architecture) -> &'static str {
    if arch.mixer.is_some() {
        "mixer"
    } else {
        "model"
    }
}

/// Forward FLOPs of `component`. An architecture without a per-layer mixer states its whole
/// model's in its complexity; the others add the channel mixer (a block) and the head (a model).
fn forward_flops(cfg: &ModelConfig, arch: &Architecture, component: &str, shape: &CostShape) -> f64 {
    let tokens = (shape.batch * shape.seq) as f64;
    let head = 2.0 * tokens * cfg.width as f64 * cfg.vocab as f64;
    let channel_mixer = 4.0 * tokens * cfg.width as f64 * cfg.ffn_mult * cfg.width as f64;
    let mixer = (arch.complexity.flops)(shape);
    match component {
        "mixer" => mixer,
        _ if arch.mixer.is_none() => mixer + head,
        "block" => mixer + channel_mixer,
        _ => mixer + channel_mixer + head,
    }
}

/// Measures every (model, component, length); the callback sees each curve's points as they
/// land. The repetitions of one curve are interleaved across its lengths (one run of each
/// length in turn), so a slow spell of a shared machine slows every length alike instead of
/// bending the fitted exponent: timed one length after another, five repetitions on 2 CPU
/// cores gave RWKV-4 slopes from 0.88 to 1.32 in three runs of the same bench.
pub fn run(
    opts: &ScalingOptions,
    device: &Device,
    mut on_point: impl FnMut(&ScalingPoint),
) -> Result<(Vec<ScalingPoint>, Vec<ScalingFit>)> {
    opts.validate()?;
    if opts.processes > 1 {
        return run_in_processes(opts, device, on_point);
    }
    let mut points = Vec::new();
    let device_name = if device.is_cpu() { "cpu" } else { "cuda" }.to_string();
    for name in &opts.models {
        let arch = registry::find(name)?;
        for component in curves(arch, &opts.components)?.iter().map(String::as_str) {
            let mut capped: Option<String> = None;
            let mut curve: Vec<ScalingPoint> = Vec::new();
            // (index in `curve`, the prepared length, its samples)
            let mut timed: Vec<(usize, Prepared, Vec<f64>)> = Vec::new();
            for &t in &opts.lengths {
                let batch = (opts.tokens_per_batch / t).max(1);
                let shape = CostShape { batch, seq: t, width: opts.width, heads: opts.heads };
                let cfg = bench_config(arch, opts.width, opts.heads, t, &opts.sets)?;
                let flops_fwd = forward_flops(&cfg, arch, component, &shape);
                let flops = match opts.mode {
                    BenchMode::Fwd => flops_fwd,
                    BenchMode::Fwdbwd => 3.0 * flops_fwd,
                };
                let mem_estimate = (arch.complexity.memory)(&shape) * opts.dtype.size_in_bytes() as f64;
                let mut point = ScalingPoint {
                    model: name.clone(),
                    component: component.into(),
                    mode: opts.mode,
                    device: device_name.clone(),
                    seq: t,
                    batch,
                    width: opts.width,
                    heads: opts.heads,
                    status: "ok".into(),
                    timing: None,
                    peak_bytes: None,
                    flops,
                    flops_per_s: None,
                    samples_s: vec![],
                    process_samples_s: vec![],
                };
                if let Some(reason) = &capped {
                    point.status = reason.clone();
                } else if mem_estimate > opts.memory_cap_bytes {
                    point.status = format!("skipped: estimated {:.1} GB exceeds the memory cap", mem_estimate / 1e9);
                } else {
                    match Prepared::new(arch, &cfg, component, &shape, opts, device).and_then(|p| p.probe(opts, device))
                    {
                        Ok((prepared, probe)) => {
                            point.peak_bytes = probe.peak;
                            // judged by the faster of the two runs: the first of a process pays
                            // for loading CUDA kernels and first-touch pages, which would cap
                            // a curve after its first length (the H200 fwd sweep did)
                            if probe.first_s.min(probe.second_s) <= opts.time_cap_s {
                                timed.push((curve.len(), prepared, Vec::new()));
                            } else {
                                // Over the cap, a single sample: the warm second run where there
                                // was one (the cold first run pays first-touch page faults).
                                let sample = if probe.peak.is_some() { probe.second_s } else { probe.first_s };
                                point.timing = Some(Timing::from_samples(vec![sample]));
                                point.flops_per_s = Some(flops / sample);
                                capped = Some(format!("skipped: T = {t} already took {sample:.1} s"));
                            }
                        }
                        Err(e) => {
                            point.status = super::failure(&e);
                            capped = Some(format!("skipped after failure at T = {t}"));
                        }
                    }
                }
                curve.push(point);
            }
            for _ in 0..opts.reps.max(1) {
                for (_, prepared, samples) in &mut timed {
                    // an untimed run first: the timed one then finds this length's memory as a
                    // training loop repeating one shape does (allocator pages, caches)
                    prepared.run_once()?;
                    device.synchronize()?;
                    let t0 = std::time::Instant::now();
                    prepared.run_once()?;
                    device.synchronize()?;
                    samples.push(t0.elapsed().as_secs_f64());
                }
            }
            for (i, _, samples) in timed {
                curve[i].samples_s = samples.clone();
                let timing = Timing::from_samples(samples);
                curve[i].flops_per_s = Some(curve[i].flops / timing.median_s);
                curve[i].timing = Some(timing);
            }
            for point in curve {
                on_point(&point);
                points.push(point);
            }
        }
    }
    let fits = fits(&points);
    Ok((points, fits))
}

/// [`run`] with each model's sweep in `opts.processes` fresh processes of the program named
/// by [`set_child_program`], one after another; their points merged ([`merge_processes`]).
fn run_in_processes(
    opts: &ScalingOptions,
    device: &Device,
    mut on_point: impl FnMut(&ScalingPoint),
) -> Result<(Vec<ScalingPoint>, Vec<ScalingFit>)> {
    let program = CHILD_PROGRAM.get().context(
        "a sweep in several processes runs the altformers program itself: it is for the command line (--processes)",
    )?;
    let dir = std::env::temp_dir().join(format!("altformers-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let device_arg = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".to_string(),
    };
    let mut points = Vec::new();
    for name in &opts.models {
        let mut runs = Vec::with_capacity(opts.processes);
        for i in 0..opts.processes {
            let out = dir.join(format!("{name}-{i}.jsonl"));
            let mut cmd = std::process::Command::new(program);
            cmd.args(["bench", "scaling", "--models", name, "--components", &opts.components.join(",")])
                .args(["--device", &device_arg, "--mode", if opts.mode == BenchMode::Fwd { "fwd" } else { "fwdbwd" }])
                .args(["--lengths", &opts.lengths.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")])
                .args(["--width", &opts.width.to_string(), "--heads", &opts.heads.to_string()])
                .args(["--tokens-per-batch", &opts.tokens_per_batch.to_string(), "--reps", &opts.reps.to_string()])
                .args(["--warmup", &opts.warmup.to_string(), "--time-cap", &opts.time_cap_s.to_string()])
                .args(["--memory-cap-gb", &(opts.memory_cap_bytes / 1e9).to_string(), "--dtype", opts.dtype.as_str()])
                .arg("--out")
                .arg(&out)
                .stdout(std::process::Stdio::null());
            for set in &opts.sets {
                cmd.args(["--set", set]);
            }
            let status = cmd.status().with_context(|| format!("starting {}", program.display()))?;
            if !status.success() {
                anyhow::bail!("the sweep of {name} in process {} of {} failed ({status})", i + 1, opts.processes);
            }
            runs.push(crate::results::read_lines::<ScalingPoint>(&out)?.unwrap_or_default());
        }
        for point in merge_processes(runs) {
            on_point(&point);
            points.push(point);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let fits = fits(&points);
    Ok((points, fits))
}

/// The points of several processes' sweeps of one model as one curve per component: each
/// (component, mode, length) pools every process's repetitions (its timing is theirs), keeps
/// them by process for the interval, the largest peak memory, and the first status that is not
/// `ok` (a length one process skipped is marked so).
pub fn merge_processes(runs: Vec<Vec<ScalingPoint>>) -> Vec<ScalingPoint> {
    let mut merged: Vec<ScalingPoint> = Vec::new();
    for run in runs {
        for p in run {
            let at = merged.iter().position(|m| m.component == p.component && m.mode == p.mode && m.seq == p.seq);
            let m = match at {
                Some(i) => &mut merged[i],
                None => {
                    merged.push(ScalingPoint { samples_s: vec![], process_samples_s: vec![], ..p.clone() });
                    merged.last_mut().expect("just pushed")
                }
            };
            if !p.samples_s.is_empty() {
                m.samples_s.extend(&p.samples_s);
                m.process_samples_s.push(p.samples_s.clone());
            }
            m.peak_bytes = m.peak_bytes.max(p.peak_bytes);
            if m.status == "ok" && p.status != "ok" {
                m.status = p.status.clone();
            }
        }
    }
    for m in &mut merged {
        if !m.samples_s.is_empty() {
            let timing = Timing::from_samples(m.samples_s.clone());
            m.flops_per_s = Some(m.flops / timing.median_s);
            m.timing = Some(timing);
        }
    }
    merged
}

/// What is measured, run on its input (held inside).
type Run = Box<dyn Fn() -> candle_core::Result<Tensor>>;

/// A layer as a function of its input.
type Layer = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

/// One length of one curve, ready to run: the forward on its input, and (fwd+bwd) an output
/// gradient.
struct Prepared {
    forward: Run,
    out_grad: Option<Tensor>,
}

/// The first runs of a prepared length: the cold first run's time, the second's (which
/// measures peak memory where it can be measured).
struct Probe {
    first_s: f64,
    second_s: f64,
    peak: Option<u64>,
}

impl Prepared {
    fn new(
        arch: &Architecture,
        cfg: &ModelConfig,
        component: &str,
        shape: &CostShape,
        opts: &ScalingOptions,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = Rng::derive(1, stream::TEST, shape.seq as u64);
        let forward: Run = if component == "model" {
            let ids: Vec<u32> = (0..shape.batch * shape.seq).map(|_| rng.below(cfg.vocab) as u32).collect();
            let tokens = Tensor::from_vec(ids, (shape.batch, shape.seq), device)?;
            let model = crate::model::Model::new(cfg, 0, device, opts.dtype)?;
            Box::new(move || model.forward(&tokens, None))
        } else {
            let pb = ParamBuilder::new(0, device, opts.dtype);
            let mixer = arch.mixer.with_context(|| format!("`{}` has no sequence mixer to time alone", arch.name))?;
            let layer: Layer = if component == "mixer" {
                let m = mixer(cfg, 0, &pb.pp("att"))?;
                Box::new(move |x| m.forward(x))
            } else {
                let channel_mixer = crate::registry::channel_mixer(&cfg.channel_mixer)?.build;
                let b = Block::new(cfg, 0, &pb, mixer, channel_mixer)?;
                Box::new(move |x| b.forward(x))
            };
            let n = shape.batch * shape.seq * shape.width;
            let values = rng.normal_vec(n, 1.0);
            let x = Tensor::from_vec(values, (shape.batch, shape.seq, shape.width), device)?.to_dtype(opts.dtype)?;
            let x = candle_core::Var::from_tensor(&x)?;
            Box::new(move || layer(x.as_tensor()))
        };
        // candle runs eagerly: the forward is done when the device is synchronized. The output
        // gradient has the output's shape ([B, T, D] for layers, [B, T, V] logits for a model).
        let out_grad = match opts.mode {
            BenchMode::Fwdbwd => Some(forward()?.randn_like(0.0, 1.0)?),
            BenchMode::Fwd => None,
        };
        Ok(Self { forward, out_grad })
    }

    fn run_once(&self) -> candle_core::Result<()> {
        let y = (self.forward)()?;
        if let Some(dy) = &self.out_grad {
            drop(super::backward_with(&y, dy)?);
        }
        Ok(())
    }

    /// One run timed alone (a length far over the cap is stopped after one try), a second
    /// for peak memory, then the rest of the warm-up when under the cap.
    fn probe(self, opts: &ScalingOptions, device: &Device) -> Result<(Self, Probe)> {
        let t0 = std::time::Instant::now();
        self.run_once()?;
        device.synchronize()?;
        let first_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let peak = alloc::peak_during(device, || self.run_once())?;
        let second_s = t1.elapsed().as_secs_f64();
        if first_s.min(second_s) <= opts.time_cap_s {
            for _ in 2..opts.warmup {
                self.run_once()?;
            }
            device.synchronize()?;
        }
        Ok((self, Probe { first_s, second_s, peak }))
    }
}

/// Upper-half slopes of time and memory for every curve.
pub fn fits(points: &[ScalingPoint]) -> Vec<ScalingFit> {
    let mut keys: Vec<(String, String, BenchMode)> = Vec::new();
    for p in points {
        let k = (p.model.clone(), p.component.clone(), p.mode);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(model, component, mode)| {
            let curve: Vec<&ScalingPoint> = points
                .iter()
                .filter(|p| p.model == model && p.component == component && p.mode == mode && p.timing.is_some())
                .collect();
            // B * T is constant, so time per token is what grows; fit time per sequence
            // (time / B) against T, the cost of one sequence of length T. The fastest
            // repetition, not the median: a shared machine only ever adds time, and on 2 CPU
            // cores the medians of 5 moved RWKV-4's slope between 0.87 and 1.25 in three
            // runs where the minima gave 1.05-1.08.
            let time: Vec<(f64, f64)> =
                curve.iter().map(|p| (p.seq as f64, p.timing.unwrap().min_s / p.batch as f64)).collect();
            let mem: Vec<(f64, f64)> =
                curve.iter().filter_map(|p| p.peak_bytes.map(|b| (p.seq as f64, b as f64 / p.batch as f64))).collect();
            let cost: Vec<(f64, f64)> = curve.iter().map(|p| (p.seq as f64, p.flops / p.batch as f64)).collect();
            let fit_lengths = curve.iter().skip(fit::upper_half_start(curve.len())).map(|p| p.seq).collect();
            ScalingFit {
                model,
                component,
                mode,
                time_slope: fit::upper_half_slope(&time),
                time_slope_interval: slope_interval(&curve),
                memory_slope: fit::upper_half_slope(&mem),
                cost_slope: fit::upper_half_slope(&cost),
                fit_lengths,
            }
        })
        .collect()
}

/// Replicates of the bootstrap behind [`slope_interval`].
const BOOTSTRAP: usize = 400;

/// A 95% interval for the fitted time exponent of `curve`.
///
/// Measured in several processes (every point holding the same number of them, `n`): the
/// exponent is fitted to each process's fastest repetitions alone, and the interval is the
/// pooled fit +- t(0.975, n - 1) s / sqrt(n), with `s` the spread of the per-process exponents
/// (the textbook interval for a few independent units). A process is the unit because what
/// moves an exponent between runs (allocator and cache state, the machine's other load) is
/// shared by the repetitions of one process: a bootstrap over three processes has ten distinct
/// resamples and gave intervals that 19 of 60 repeat runs fell outside
/// (bench/results/2026-12-03-cpu-dedicated-exponents, "What-if").
///
/// From one process: each bootstrap replicate resamples every length's repetitions with
/// replacement, keeps the fastest as the fit does, and refits; the interval spans the 2.5th to
/// 97.5th percentile. It measures only how much that run's repetitions disagree, not what a
/// different process would do.
pub fn slope_interval(curve: &[&ScalingPoint]) -> Option<(f64, f64)> {
    if curve.len() < 2 || curve.iter().any(|p| p.samples_s.len() < 2 || p.batch == 0) {
        return None;
    }
    let groups = curve[0].process_samples_s.len();
    let by_process = groups >= 2
        && curve
            .iter()
            .all(|p| p.process_samples_s.len() == groups && p.process_samples_s.iter().all(|s| !s.is_empty()));
    let fastest = |samples: &[f64]| samples.iter().copied().fold(f64::INFINITY, f64::min);
    if by_process {
        let slope_of = |samples: &dyn Fn(&ScalingPoint) -> &[f64]| {
            let time: Vec<(f64, f64)> =
                curve.iter().map(|p| (p.seq as f64, fastest(samples(p)) / p.batch as f64)).collect();
            fit::upper_half_slope(&time)
        };
        let pooled = slope_of(&|p| p.samples_s.as_slice())?;
        let per_process: Vec<f64> =
            (0..groups).map(|g| slope_of(&|p| p.process_samples_s[g].as_slice())).collect::<Option<_>>()?;
        let half = student_t_975(groups - 1) * std_dev(&per_process) / (groups as f64).sqrt();
        return Some((pooled - half, pooled + half));
    }
    let mut rng = Rng::derive(0, stream::TEST, curve.len() as u64);
    let mut slopes: Vec<f64> = (0..BOOTSTRAP)
        .filter_map(|_| {
            let time: Vec<(f64, f64)> = curve
                .iter()
                .map(|p| {
                    let n = p.samples_s.len();
                    let resampled: Vec<f64> = (0..n).map(|_| p.samples_s[rng.below(n)]).collect();
                    (p.seq as f64, fastest(&resampled) / p.batch as f64)
                })
                .collect();
            fit::upper_half_slope(&time)
        })
        .collect();
    if slopes.len() < BOOTSTRAP / 2 {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let at = |q: f64| slopes[((slopes.len() - 1) as f64 * q).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// The 97.5th percentile of Student's t with `df` degrees of freedom (df >= 1).
fn student_t_975(df: usize) -> f64 {
    const TABLE: [f64; 10] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228];
    match df {
        0 => f64::INFINITY,
        1..=10 => TABLE[df - 1],
        11..=20 => 2.086 + (2.228 - 2.086) * (20 - df) as f64 / 10.0,
        21..=30 => 2.042 + (2.086 - 2.042) * (30 - df) as f64 / 10.0,
        _ => 1.96,
    }
}

/// The sample standard deviation (n - 1 in the denominator).
fn std_dev(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(slope: f64, spread: f64) -> Vec<ScalingPoint> {
        let mut rng = Rng::new(9);
        [1024usize, 2048, 4096, 8192]
            .iter()
            .map(|&t| {
                let base = (t as f64).powf(slope) * 1e-9;
                let samples_s: Vec<f64> = (0..5).map(|_| base * (1.0 + spread * rng.uniform())).collect();
                ScalingPoint {
                    model: "m".into(),
                    component: "mixer".into(),
                    mode: BenchMode::Fwd,
                    device: "cpu".into(),
                    seq: t,
                    batch: 1,
                    width: 8,
                    heads: 1,
                    status: "ok".into(),
                    timing: Some(Timing::from_samples(samples_s.clone())),
                    peak_bytes: None,
                    flops: 1.0,
                    flops_per_s: None,
                    samples_s,
                    process_samples_s: vec![],
                }
            })
            .collect()
    }

    /// The cost model's exponent says where the leading term dominates: attention's FLOPs per
    /// sequence, 8 T d^2 + 4 T^2 d, grow with a slope near 1.5 at T = 1K-2K for d = 512 (the
    /// projections still weigh as much as the scores) and near 2 at 32K-64K.
    #[test]
    fn the_cost_slope_shows_where_the_leading_term_dominates() {
        let attention = registry::find("transformer").unwrap();
        let curve = |lengths: &[usize]| -> Vec<ScalingPoint> {
            lengths
                .iter()
                .map(|&t| {
                    let shape = CostShape { batch: 1, seq: t, width: 512, heads: 8 };
                    let mut p = curve(1.0, 0.0)[0].clone();
                    (p.seq, p.batch, p.flops) = (t, 1, (attention.complexity.flops)(&shape));
                    p
                })
                .collect()
        };
        let short = fits(&curve(&[256, 512, 1024, 2048]))[0].cost_slope.unwrap();
        let long = fits(&curve(&[8192, 16384, 32768, 65536]))[0].cost_slope.unwrap();
        assert!((1.3..1.8).contains(&short), "{short}");
        assert!(long > 1.9 && long < 2.0, "{long}");
    }

    #[test]
    fn settings_apply_to_every_model_or_the_one_they_name() -> Result<()> {
        let sets = vec!["model.bias=false".to_string(), "linformer:model.options.k=7".to_string()];
        assert_eq!(sets_for(&sets, "linformer"), vec!["model.bias=false", "model.options.k=7"]);
        assert_eq!(sets_for(&sets, "transformer"), vec!["model.bias=false"]);
        let lin = bench_config(registry::find("linformer")?, 32, 4, 64, &sets)?;
        assert_eq!(lin.options["k"], 7);
        assert!(!lin.bias);
        assert!(bench_config(registry::find("transformer")?, 32, 4, 64, &sets).is_ok());
        // an option the model does not have is refused by name
        let err = bench_config(registry::find("transformer")?, 32, 4, 64, &["model.options.k=7".into()]);
        assert!(format!("{:#}", err.unwrap_err()).contains("transformer"));
        Ok(())
    }

    /// Steady repetitions give a narrow interval around the true exponent; repetitions that
    /// disagree by up to 3x give an interval wider than the report's 0.2, and a curve without
    /// samples (an older file) none at all.
    #[test]
    fn the_interval_follows_how_much_the_repetitions_agree() {
        let steady = curve(2.0, 0.01);
        let f = &fits(&steady)[0];
        let (lo, hi) = f.time_slope_interval.expect("an interval");
        assert!(lo <= f.time_slope.unwrap() && f.time_slope.unwrap() <= hi);
        assert!(lo > 1.97 && hi < 2.03, "steady: ({lo}, {hi})");
        let noisy = curve(1.0, 2.0);
        let (lo, hi) = fits(&noisy)[0].time_slope_interval.expect("an interval");
        assert!(hi - lo > 0.2, "noisy: ({lo}, {hi})");
        let old: Vec<ScalingPoint> = steady.into_iter().map(|p| ScalingPoint { samples_s: vec![], ..p }).collect();
        assert_eq!(fits(&old)[0].time_slope_interval, None);
    }

    /// Three processes, each a steady curve slowed at the longest length by 1, 1.1 and 1.21:
    /// fitted over T = 2K-8K, their exponents are 2 + log2(f) / 2. The interval is the pooled
    /// fit (the fastest of all: 2) +- t(0.975, 2) s / sqrt(3), s the per-process exponents'
    /// spread.
    #[test]
    fn by_process_the_interval_is_a_t_interval_over_the_processes() {
        let steady = curve(2.0, 0.0);
        let runs: Vec<Vec<ScalingPoint>> = [1.0, 1.1, 1.21]
            .iter()
            .map(|&f| {
                steady
                    .iter()
                    .map(|p| {
                        let samples_s: Vec<f64> =
                            p.samples_s.iter().map(|s| if p.seq == 8192 { s * f } else { *s }).collect();
                        ScalingPoint { timing: Some(Timing::from_samples(samples_s.clone())), samples_s, ..p.clone() }
                    })
                    .collect()
            })
            .collect();
        let fit = &fits(&merge_processes(runs))[0];
        let (lo, hi) = fit.time_slope_interval.expect("an interval");
        let per: Vec<f64> = [1.0f64, 1.1, 1.21].iter().map(|f| 2.0 + f.log2() / 2.0).collect();
        let half = 4.303 * std_dev(&per) / 3f64.sqrt();
        assert!((fit.time_slope.unwrap() - 2.0).abs() < 1e-9);
        assert!(
            (lo - (2.0 - half)).abs() < 1e-9 && (hi - (2.0 + half)).abs() < 1e-9,
            "({lo}, {hi}) against 2 +- {half}"
        );
    }

    /// Two processes whose repetitions each agree closely but which disagree with each other
    /// at the longest length (one ran 50% slower there): pooled as one process the interval is
    /// narrow; by process it covers the disagreement, and a process-level slowdown that is the
    /// same at every length leaves it narrow.
    #[test]
    fn processes_that_disagree_widen_the_interval() {
        let steady = curve(2.0, 0.01);
        let by_process = |slow_longest: f64, slow_all: f64| -> Vec<ScalingPoint> {
            let runs: Vec<Vec<ScalingPoint>> = (0..2)
                .map(|g| {
                    steady
                        .iter()
                        .map(|p| {
                            let mut f = if g == 1 { slow_all } else { 1.0 };
                            if g == 1 && p.seq == 8192 {
                                f *= slow_longest;
                            }
                            let samples_s: Vec<f64> = p.samples_s.iter().map(|s| s * f).collect();
                            ScalingPoint {
                                timing: Some(Timing::from_samples(samples_s.clone())),
                                samples_s,
                                ..p.clone()
                            }
                        })
                        .collect()
                })
                .collect();
            merge_processes(runs)
        };
        let merged = by_process(1.5, 1.0);
        assert_eq!(merged.len(), 4);
        assert!(merged.iter().all(|p| p.process_samples_s.len() == 2 && p.samples_s.len() == 10));
        let width = |points: &[ScalingPoint]| {
            let (lo, hi) = fits(points)[0].time_slope_interval.expect("an interval");
            hi - lo
        };
        let pooled: Vec<ScalingPoint> =
            merged.iter().map(|p| ScalingPoint { process_samples_s: vec![], ..p.clone() }).collect();
        assert!(width(&pooled) < 0.03, "pooled: {}", width(&pooled));
        // process 1's 50% at T = 8192 alone is 0.58 on the slope between 4096 and 8192
        assert!(width(&merged) > 0.1, "by process: {}", width(&merged));
        assert!(width(&by_process(1.0, 1.2)) < 0.05, "a uniform slowdown: {}", width(&by_process(1.0, 1.2)));
    }
}
