//! `altformers bench ...`: each benchmark's options into the library's runner, its JSON lines
//! printed and saved.

use anyhow::Result;

use crate::args::{BenchCommand, Sweep};
use crate::launch::{launch_workers, launches, this_process_device, workers_and_device};

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim().parse::<T>().map_err(|_| anyhow::anyhow!("{what}: `{x}` is not a valid value")))
        .collect()
}

fn model_list(s: &str) -> Result<Vec<String>> {
    if s == "all" {
        return Ok(altformers::registry::ARCHITECTURES
            .iter()
            .filter(|a| a.causal)
            .map(|a| a.name.to_string())
            .collect());
    }
    s.split(',').map(|m| Ok(altformers::registry::find(m.trim())?.name.to_string())).collect()
}

/// Prints each JSON line and, with `out`, writes them all to the file.
struct JsonLines {
    lines: Vec<String>,
}

impl JsonLines {
    fn push<T: serde::Serialize>(&mut self, v: &T) {
        let line = serde_json::to_string(v).expect("serializable");
        println!("{line}");
        self.lines.push(line);
    }
    fn save(&self, out: Option<&std::path::Path>) -> Result<()> {
        if let Some(path) = out {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            altformers::util::write_atomic(path, (self.lines.join("\n") + "\n").as_bytes())?;
        }
        Ok(())
    }
}

pub(crate) fn bench(cmd: BenchCommand) -> Result<()> {
    use altformers::bench::{decode, scaling};
    let mut lines = JsonLines { lines: vec![] };
    match cmd {
        BenchCommand::Scaling {
            models,
            components,
            device,
            mode,
            lengths,
            width,
            heads,
            tokens_per_batch,
            reps,
            warmup,
            time_cap,
            sets,
            processes,
            sweep: Sweep { memory_cap_gb, dtype, out },
        } => {
            let device = altformers::device::select(&device)?;
            let opts = scaling::ScalingOptions {
                models: model_list(&models)?,
                components: components.split(',').map(|c| c.trim().to_string()).collect(),
                mode: mode.into(),
                lengths: list(&lengths, "--lengths")?,
                width,
                heads,
                tokens_per_batch,
                warmup,
                reps,
                time_cap_s: time_cap,
                memory_cap_bytes: memory_cap_gb * 1e9,
                dtype: altformers::device::parse_dtype(&dtype)?,
                sets,
                processes,
            };
            // refused before the first line is printed (the sweep checks again: a preset's
            // tables reach it without this)
            opts.validate()?;
            lines.push(&altformers::bench::Provenance::capture(&device));
            let (_, fits) = scaling::run(&opts, &device, |p| lines.push(p))?;
            for f in &fits {
                lines.push(f);
            }
            lines.save(out.as_deref())
        }
        BenchCommand::Ops { ops, device, modes, lengths, reps, warmup, dtype, memory_cap_gb, out } => {
            let device = altformers::device::select(&device)?;
            let opts = altformers::bench::ops::OpsOptions {
                ops: ops.split(',').map(|s| s.trim().to_string()).collect(),
                modes: modes.into_iter().map(scaling::BenchMode::from).collect(),
                lengths: list(&lengths, "--lengths")?,
                warmup,
                reps,
                dtype: altformers::device::parse_dtype(&dtype)?,
                memory_cap_bytes: memory_cap_gb * 1e9,
            };
            opts.validate()?;
            lines.push(&altformers::bench::Provenance::capture(&device));
            let points = altformers::bench::ops::run(&opts, &device, |p| lines.push(p))?;
            for f in scaling::fits(&points) {
                lines.push(&f);
            }
            lines.save(out.as_deref())
        }
        BenchCommand::SequenceParallel { device, gpus, workers, lengths, width, heads, dtype, reps, sets, out } => {
            use altformers::bench::sequence_parallel as sp;
            let (workers, device) = workers_and_device(workers, gpus, device)?;
            let opts = sp::SplitOptions {
                lengths: list(&lengths, "--lengths")?,
                width,
                heads,
                dtype: altformers::device::parse_dtype(&dtype)?,
                reps,
                sets,
            };
            if let Some(t) = opts.lengths.iter().find(|t| *t % workers != 0) {
                anyhow::bail!("--lengths: {t} is not a multiple of the {workers} workers");
            }
            if launches(workers, gpus.is_some()) {
                return launch_workers(workers, 1, 0, None, gpus.is_some(), "the sequence-parallel benchmark", None);
            }
            let device = this_process_device(&device)?;
            let (group, split) = sp::worker(&device)?;
            if group.as_ref().is_none_or(|g| g.rank == 0) {
                lines.push(&altformers::bench::Provenance::capture(&device));
            }
            sp::run(&opts, &device, group.as_deref(), split, |p| lines.push(p))?;
            if group.as_ref().is_none_or(|g| g.rank == 0) {
                lines.save(out.as_deref())?;
            }
            Ok(())
        }
        BenchCommand::PerformerError { head_dim, heads, length, input_stds, features, draws, seed, out } => {
            let opts = altformers::bench::performer_error::PerformerErrorOptions {
                head_dim,
                heads,
                length,
                input_stds: list(&input_stds, "--input-stds")?,
                features: list(&features, "--features")?,
                draws,
                seed,
            };
            opts.validate()?;
            lines.push(&altformers::bench::Provenance::capture(&candle_core::Device::Cpu));
            altformers::bench::performer_error::run(&opts, |r| lines.push(r))?;
            lines.save(out.as_deref())
        }
        BenchCommand::Decode {
            models,
            device,
            contexts,
            batches,
            width,
            heads,
            depth,
            steps,
            time_cap,
            sweep: Sweep { memory_cap_gb, dtype, out },
        } => {
            let device = altformers::device::select(&device)?;
            let opts = decode::DecodeOptions {
                models: model_list(&models)?,
                contexts: list(&contexts, "--contexts")?,
                batches: list(&batches, "--batches")?,
                width,
                heads,
                depth,
                steps,
                memory_cap_bytes: memory_cap_gb * 1e9,
                time_cap_s: time_cap,
                dtype: altformers::device::parse_dtype(&dtype)?,
            };
            opts.validate()?;
            lines.push(&altformers::bench::Provenance::capture(&device));
            decode::run(&opts, &device, |p| lines.push(p))?;
            lines.save(out.as_deref())
        }
    }
}
