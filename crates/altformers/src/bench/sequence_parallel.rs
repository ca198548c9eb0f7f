//! LongNet's sequence parallelism measured (issue 23; paper 2307.02486, section 3.2 and its
//! Figure 5): one LongNet layer, forward and backward, on each worker's slice of a sequence of
//! T tokens (batch 1), T doubling; per worker, the median time and the peak device memory,
//! and the rows of K and V each worker sends per head (constant in T: the paper's point).
//! Without workers it is one device's LongNet over the whole sequence, the baseline.
//! `altformers bench sequence-parallel [--gpus N | --workers N]`.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::Overrides;
use crate::mixers::longnet::sequence_parallel::{sent_rows, Split};
use crate::mixers::longnet::LongNet;
use crate::mixers::SequenceMixer;
use crate::params::ParamBuilder;
use crate::rng::{stream, Rng};
use crate::train::distributed::Group;

pub struct SplitOptions {
    pub lengths: Vec<usize>,
    pub width: usize,
    pub heads: usize,
    pub dtype: DType,
    pub reps: usize,
    /// Settings laid on LongNet's defaults (`key=value`), e.g. its pairs.
    pub sets: Vec<String>,
}

/// One length: every worker's figures, the largest over the workers.
#[derive(Serialize, Debug)]
pub struct SplitPoint {
    pub model: &'static str,
    pub seq: usize,
    pub world: usize,
    /// Positions each worker holds, `seq / world`.
    pub slice: usize,
    pub width: usize,
    pub heads: usize,
    pub dtype: String,
    /// Median seconds of one forward and backward, the slowest worker's.
    pub median_s: f64,
    /// Peak device bytes during one forward and backward above what was held before, the
    /// largest over the workers (`None` where it cannot be measured).
    pub peak_bytes: Option<u64>,
    /// Rows of K (and as many of V) each worker sends per head and layer.
    pub sent_rows_per_head: usize,
}

/// Runs the sweep on this worker (`group` and `split` `None`: one device alone), calling `emit`
/// on rank 0 with each length's point. Every worker runs every length in step with the others.
pub fn run(
    opts: &SplitOptions,
    device: &Device,
    group: Option<&Group>,
    split: Option<Split>,
    mut emit: impl FnMut(&SplitPoint),
) -> Result<()> {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank, g.world));
    for &seq in &opts.lengths {
        anyhow::ensure!(seq.is_multiple_of(world), "--lengths: {seq} is not a multiple of the {world} workers");
        let mut sets = vec![
            format!("model.width={}", opts.width),
            format!("model.heads={}", opts.heads),
            format!("model.context={seq}"),
            "model.depth=1".to_string(),
        ];
        sets.extend(opts.sets.iter().cloned());
        let cfg = crate::registry::config("longnet", &Overrides::sets(&sets))?.model;
        let mixer = LongNet::new(&cfg, &ParamBuilder::new(0, device, opts.dtype).pp("att"))?;
        let slice = seq / world;
        if let Some(split) = &split {
            mixer.split_sequence(split)?;
        }
        let mut rng = Rng::derive(1, stream::TEST, (seq * world + rank) as u64);
        let x = Tensor::from_vec(rng.normal_vec(slice * opts.width, 1.0), (1, slice, opts.width), device)?
            .to_dtype(opts.dtype)?;
        let x = candle_core::Var::from_tensor(&x)?;
        let dy = Tensor::from_vec(rng.normal_vec(slice * opts.width, 1.0), (1, slice, opts.width), device)?
            .to_dtype(opts.dtype)?;
        let once = || -> candle_core::Result<()> {
            let y = mixer.forward(x.as_tensor())?;
            drop(super::backward_with(&y, &dy)?);
            Ok(())
        };
        let fail = |e: candle_core::Error| anyhow::anyhow!("T = {seq}, rank {rank} of {world}: {e}");
        once().map_err(fail)?;
        device.synchronize()?;
        let peak = super::alloc::peak_during(device, once).map_err(fail)?;
        let mut times = Vec::with_capacity(opts.reps);
        for _ in 0..opts.reps.max(1) {
            let t0 = std::time::Instant::now();
            once().map_err(fail)?;
            device.synchronize()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        let mine = [super::Timing::from_samples(times).median_s, peak.map_or(-1.0, |p| p as f64)];
        // the slowest worker's time and the largest peak
        let all = match group {
            Some(g) => g.all_gather(&mine)?,
            None => vec![mine.to_vec()],
        };
        let worst = |i: usize| all.iter().map(|v| v[i]).fold(f64::NEG_INFINITY, f64::max);
        if rank == 0 {
            emit(&SplitPoint {
                model: "longnet",
                seq,
                world,
                slice,
                width: opts.width,
                heads: opts.heads,
                dtype: format!("{:?}", opts.dtype).to_lowercase(),
                median_s: worst(0),
                peak_bytes: (worst(1) >= 0.0).then(|| worst(1) as u64),
                sent_rows_per_head: if world > 1 { sent_rows(mixer.pairs(), slice) } else { 0 },
            });
        }
    }
    Ok(())
}

/// The worker's group and collective where the launcher started it (`None` alone).
pub fn worker(device: &Device) -> Result<(Option<std::sync::Arc<Group>>, Option<Split>)> {
    let Some(group) = Group::from_env()?.map(std::sync::Arc::new) else { return Ok((None, None)) };
    let (_, split) = crate::train::exchange(group.clone(), device).context("joining the other workers")?;
    Ok((Some(group), Some(split)))
}
