//! `altformers bench scaling`: one mixer layer and one full block per model, T doubling,
//! batch chosen so B * T is constant; median time, peak memory, analytic FLOPs.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{alloc, fit, time_it, Timing};
use crate::complexity::CostShape;
use crate::config::{ModelConfig, RunConfig};
use crate::model::Block;
use crate::params::ParamBuilder;
use crate::registry::{self, Architecture};
use crate::rng::{stream, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    Fwd,
    Fwdbwd,
}

#[derive(Clone, Debug)]
pub struct ScalingOptions {
    pub models: Vec<String>,
    /// `mixer` (one sequence-mixer layer) and/or `block` (the whole block).
    pub components: Vec<String>,
    pub mode: BenchMode,
    pub lengths: Vec<usize>,
    pub width: usize,
    pub heads: usize,
    /// B * T; the batch is `max(1, tokens_per_batch / T)`.
    pub tokens_per_batch: usize,
    pub warmup: usize,
    pub reps: usize,
    /// Lengths whose single run exceeds this are recorded as skipped, with all longer ones.
    pub time_cap_s: f64,
    /// Lengths whose analytic activation memory exceeds this are skipped unmeasured.
    pub memory_cap_bytes: f64,
    pub dtype: DType,
}

/// One measured (or skipped) point; one JSON line of the output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScalingPoint {
    pub model: String,
    /// `mixer` (one sequence-mixer layer) or `block` (norms, mixer, channel mixer).
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
}

/// Fitted exponents for one curve, appended after the points.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScalingFit {
    pub model: String,
    pub component: String,
    pub mode: BenchMode,
    pub time_slope: Option<f64>,
    pub memory_slope: Option<f64>,
    /// Lengths the upper-half fit used.
    pub fit_lengths: Vec<usize>,
}

/// A bench configuration of `arch` at width/heads/context (the paper's other defaults kept).
pub fn bench_config(arch: &Architecture, width: usize, heads: usize, context: usize) -> Result<ModelConfig> {
    let sets = vec![
        format!("model.width={width}"),
        format!("model.heads={heads}"),
        format!("model.context={context}"),
        "model.depth=1".to_string(),
    ];
    let mut cfg = RunConfig::build(arch.name, None, &sets)?.model;
    if cfg.position == crate::config::Position::Learned {
        // positions live in the embedding, outside the layer being measured
        cfg.position = crate::config::Position::None;
    }
    Ok(cfg)
}

fn block_flops(cfg: &ModelConfig, arch: &Architecture, shape: &CostShape) -> f64 {
    let hidden = cfg.ffn_mult * cfg.width as f64;
    (arch.complexity.flops)(shape) + 4.0 * (shape.batch * shape.seq) as f64 * cfg.width as f64 * hidden
}

/// Measures every (model, component, length); the callback sees each point as it lands.
pub fn run(
    opts: &ScalingOptions,
    device: &Device,
    mut on_point: impl FnMut(&ScalingPoint),
) -> Result<(Vec<ScalingPoint>, Vec<ScalingFit>)> {
    let mut points = Vec::new();
    let device_name = if device.is_cpu() { "cpu" } else { "cuda" }.to_string();
    for name in &opts.models {
        let arch = registry::find(name)?;
        for component in opts.components.iter().map(String::as_str) {
            let mut capped: Option<String> = None;
            for &t in &opts.lengths {
                let batch = (opts.tokens_per_batch / t).max(1);
                let shape = CostShape { batch, seq: t, width: opts.width, heads: opts.heads };
                let cfg = bench_config(arch, opts.width, opts.heads, t)?;
                let flops_fwd = if component == "mixer" {
                    (arch.complexity.flops)(&shape)
                } else {
                    block_flops(&cfg, arch, &shape)
                };
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
                };
                if let Some(reason) = &capped {
                    point.status = reason.clone();
                } else if mem_estimate > opts.memory_cap_bytes {
                    point.status = format!("skipped: estimated {:.1} GB exceeds the memory cap", mem_estimate / 1e9);
                } else {
                    match measure(arch, &cfg, component, &shape, opts, device) {
                        Ok((timing, peak)) => {
                            point.flops_per_s = Some(flops / timing.median_s);
                            point.timing = Some(timing);
                            point.peak_bytes = peak;
                            if timing.median_s > opts.time_cap_s {
                                capped = Some(format!("skipped: T = {t} already took {:.1} s", timing.median_s));
                            }
                        }
                        Err(e) => {
                            point.status = format!("failed: {e}");
                            capped = Some(format!("skipped after failure at T = {t}"));
                        }
                    }
                }
                on_point(&point);
                points.push(point);
            }
        }
    }
    let fits = fits(&points);
    Ok((points, fits))
}

fn measure(
    arch: &Architecture,
    cfg: &ModelConfig,
    component: &str,
    shape: &CostShape,
    opts: &ScalingOptions,
    device: &Device,
) -> Result<(Timing, Option<u64>)> {
    let pb = ParamBuilder::new(0, device, opts.dtype);
    let layer: Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>> = if component == "mixer" {
        let m = (arch.build)(cfg, 0, &pb.pp("att"))?;
        Box::new(move |x| m.forward(x))
    } else {
        let b = Block::new(cfg, 0, &pb)?;
        Box::new(move |x| b.forward(x))
    };
    let n = shape.batch * shape.seq * shape.width;
    let values = Rng::derive(1, stream::TEST, shape.seq as u64).normal_vec(n, 1.0);
    let x = Tensor::from_vec(values, (shape.batch, shape.seq, shape.width), device)?.to_dtype(opts.dtype)?;
    let x = candle_core::Var::from_tensor(&x)?;
    // candle runs eagerly: the forward is done when the device is synchronized. Mixers and
    // blocks map [B, T, D] to [B, T, D], so the output gradient has the input's shape.
    let out_grad = if opts.mode == BenchMode::Fwdbwd { Some(x.as_tensor().randn_like(0.0, 1.0)?) } else { None };
    let run_once = || -> candle_core::Result<()> {
        let y = layer(x.as_tensor())?;
        if let Some(dy) = &out_grad {
            drop(super::backward_with(&y, dy)?);
        }
        Ok(())
    };
    // one run first, timed alone: a length far over the cap is stopped after one try
    let t0 = std::time::Instant::now();
    run_once()?;
    device.synchronize()?;
    let single = t0.elapsed().as_secs_f64();
    // a second run measures peak memory (where it can be measured); it is warm
    let t1 = std::time::Instant::now();
    let peak = alloc::peak_during(device, run_once)?;
    let second = t1.elapsed().as_secs_f64();
    // Over the cap, a single sample: the warm second run where there was one (the cold first
    // run pays first-touch page faults), else the first run.
    let timing = if single <= opts.time_cap_s {
        time_it(device, opts.warmup.saturating_sub(1), opts.reps, run_once)?
    } else {
        Timing::from_samples(vec![if peak.is_some() { second } else { single }])
    };
    Ok((timing, peak))
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
            // (time / B) against T, the cost of one sequence of length T.
            let time: Vec<(f64, f64)> =
                curve.iter().map(|p| (p.seq as f64, p.timing.unwrap().median_s / p.batch as f64)).collect();
            let mem: Vec<(f64, f64)> =
                curve.iter().filter_map(|p| p.peak_bytes.map(|b| (p.seq as f64, b as f64 / p.batch as f64))).collect();
            let fit_lengths = curve.iter().skip(fit::upper_half_start(curve.len())).map(|p| p.seq).collect();
            ScalingFit {
                model,
                component,
                mode,
                time_slope: fit::upper_half_slope(&time),
                memory_slope: fit::upper_half_slope(&mem),
                fit_lengths,
            }
        })
        .collect()
}
