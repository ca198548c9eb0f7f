//! `altformers bench decode`: per-token latency and throughput at batch 1 and at a large
//! batch, and the bytes the state holds, against the context already consumed.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{time_it, Timing};
use crate::config::Position;
use crate::decoder::Decoder;
use crate::model::Model;
use crate::registry;
use crate::rng::{stream, Rng};

/// The sweep. As a `compare` preset's `[decode]` table it holds the keys below but `models`
/// (compare's selection) and `dtype` (f32), with the memory cap in gigabytes
/// (`memory_cap_gb`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeOptions {
    #[serde(skip)]
    pub models: Vec<String>,
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    pub width: usize,
    pub heads: usize,
    pub depth: usize,
    /// Timed samples per point (median reported), each [`WINDOW`] steps.
    pub steps: usize,
    /// Contexts whose prefill is estimated above this many bytes are skipped.
    #[serde(rename = "memory_cap_gb", with = "super::gigabytes")]
    pub memory_cap_bytes: f64,
    /// A context whose prefill took longer than this ends the model's sweep.
    pub time_cap_s: f64,
    #[serde(skip, default = "super::preset_dtype")]
    pub dtype: DType,
}

impl DecodeOptions {
    /// Checked at the start of every sweep, whether its settings came from the command line
    /// or a `compare` preset's `[decode]` table.
    pub fn validate(&self) -> Result<()> {
        crate::util::counts_at_least_one(&[
            ("--contexts (contexts)", &self.contexts),
            ("--batches (batches)", &self.batches),
        ])?;
        crate::util::positive(&[
            ("--width (width)", self.width as f64),
            ("--heads (heads)", self.heads as f64),
            ("--depth (depth)", self.depth as f64),
            ("--steps (steps)", self.steps as f64),
            ("--time-cap (time_cap_s)", self.time_cap_s),
            ("--memory-cap-gb (memory_cap_gb)", self.memory_cap_bytes / 1e9),
        ])
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecodePoint {
    pub model: String,
    pub device: String,
    pub context: usize,
    pub batch: usize,
    pub status: String,
    pub timing: Option<Timing>,
    /// Median seconds per decoding step (one token for every sequence in the batch), each
    /// sample the mean over [`WINDOW`] consecutive steps.
    pub latency_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Bytes held by the whole model's decoding state after the context.
    pub state_bytes: Option<u64>,
    pub params: usize,
    /// Whether each step was one CUDA-graph launch ([`crate::decoder`]) rather than its
    /// operations launched one by one.
    #[serde(default)]
    pub graph: bool,
}

pub fn run(opts: &DecodeOptions, device: &Device, mut on_point: impl FnMut(&DecodePoint)) -> Result<Vec<DecodePoint>> {
    opts.validate()?;
    let mut out = Vec::new();
    let device_name = if device.is_cpu() { "cpu" } else { "cuda" }.to_string();
    for name in &opts.models {
        let arch = registry::find(name)?;
        let mut stop: Option<String> = None;
        for &context in &opts.contexts {
            let mut cfg = arch.defaults().model;
            (cfg.width, cfg.heads, cfg.depth) = (opts.width, opts.heads, opts.depth);
            // room for every timed step; a replayed step goes on from where the last sample
            // ended (one warm-up and `steps` samples), so a learned position table must hold
            // every position it reaches (other models keep the context they are measured at:
            // some size their parts by it)
            cfg.context = context + WINDOW + 1;
            if cfg.position == Position::Learned {
                cfg.context = context + (opts.steps + 2) * WINDOW + 1;
            }
            // random weights drawn on the device: a step's cost does not depend on them, and
            // a model of billions of parameters is then made in seconds
            let model = Model::for_timing(&cfg, device, opts.dtype)?;
            for &batch in &opts.batches {
                let shape = crate::complexity::CostShape { batch, seq: context, width: opts.width, heads: opts.heads };
                let estimate = (arch.complexity.memory)(&shape) * opts.dtype.size_in_bytes() as f64;
                let mut point = DecodePoint {
                    model: name.clone(),
                    device: device_name.clone(),
                    context,
                    batch,
                    status: "ok".into(),
                    timing: None,
                    latency_s: None,
                    tokens_per_s: None,
                    state_bytes: None,
                    params: model.num_params(),
                    graph: false,
                };
                if let Some(reason) = &stop {
                    point.status = reason.clone();
                } else if estimate > opts.memory_cap_bytes {
                    point.status = format!("skipped: prefill estimated at {:.1} GB", estimate / 1e9);
                } else {
                    let t0 = std::time::Instant::now();
                    match measure(&model, context, batch, opts.steps, device) {
                        Ok((timing, bytes, graph)) => {
                            point.graph = graph;
                            point.latency_s = Some(timing.median_s);
                            point.tokens_per_s = Some(batch as f64 / timing.median_s);
                            point.timing = Some(timing);
                            point.state_bytes = Some(bytes as u64);
                        }
                        Err(e) => point.status = super::failure(&e),
                    }
                    if t0.elapsed().as_secs_f64() > opts.time_cap_s {
                        stop = Some(format!("skipped: context {context} took {:.0} s", t0.elapsed().as_secs_f64()));
                    }
                }
                on_point(&point);
                out.push(point);
            }
            // the next point's capture must not find the pool holding this one's prefill; a
            // failed trim costs at most a capture (the decoder retries it), so it stops nothing
            drop(model);
            if let Err(e) = crate::device::release_cached_memory(device) {
                eprintln!("warning: could not hand the memory pool's cached blocks back: {e}");
            }
        }
    }
    Ok(out)
}

/// Consecutive steps one sample averages over: a multiple of every period a backbone's step
/// cost has (MegaByte's global model steps once per patch of 8, Hourglass's short layers once
/// every 2, 3, 4 or 6 positions), so every sample pays each kind of step in proportion. A
/// single step from a fixed context would time the cheap steps only, or the dear ones only.
pub const WINDOW: usize = 24;

/// Prefills `context` random tokens, then times runs of [`WINDOW`] steps from that state;
/// returns the timing, the state's bytes and whether the steps were replayed from a graph.
fn measure(
    model: &Model,
    context: usize,
    batch: usize,
    steps: usize,
    device: &Device,
) -> Result<(Timing, usize, bool)> {
    let mut rng = Rng::derive(2, stream::TEST, context as u64);
    let toks: Vec<u32> = (0..batch * context).map(|_| rng.below(256) as u32).collect();
    let prompt = Tensor::from_vec(toks, (batch, context), device)?;
    let (_, state) = model.prefill(&prompt)?;
    let bytes = state.bytes();
    let tokens = vec![7u32; batch];
    let mut decoder = Decoder::new(model, state.clone(), batch)?;
    let graph = decoder.replays();
    let window = time_it(device, 1, steps, || {
        // every sample starts from the same context length; a replayed step is static (the
        // same kernels on the same shapes at every position), so there each sample goes on
        // from where the last one ended rather than capturing the step again
        if !graph {
            decoder = Decoder::new(model, state.clone(), batch)?;
        }
        for _ in 0..WINDOW {
            decoder.step(&tokens)?;
        }
        Ok(())
    })?;
    let per_step = |seconds: f64| seconds / WINDOW as f64;
    let timing = Timing {
        median_s: per_step(window.median_s),
        min_s: per_step(window.min_s),
        max_s: per_step(window.max_s),
        reps: window.reps,
    };
    Ok((timing, bytes, graph))
}
