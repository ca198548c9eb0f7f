//! The `altformers` command: train, evaluate, generate, list and compare architectures.

mod args;
mod bench;
mod launch;

use anyhow::{Context, Result};
use clap::Parser;

use args::{Cli, Command, ExportFormat, ImportFormat, ModeArg, TaskArg, TokenizerCommand};
use bench::bench;
use launch::{launch_workers, launches, this_process_device, workers_and_device};

use altformers::config::Overrides;
use altformers::data::tokenizer::Tokenizer;
use altformers::data::{Corpus, DataFormat};
use altformers::generate::{generate_batch_timed, Mode, SampleOptions};
use altformers::registry;
use altformers::train::{self, nats_to_bits, TrainOptions};

/// Counts heap bytes so `bench scaling` can report peak memory on the CPU.
#[global_allocator]
static ALLOC: altformers::bench::alloc::CountingAlloc = altformers::bench::alloc::CountingAlloc;

/// Each `(flag, path)` must be given, not empty (an empty --out would write into the working folder).
fn non_empty(paths: &[(&str, &std::path::Path)]) -> Result<()> {
    for (flag, p) in paths {
        anyhow::ensure!(!p.as_os_str().is_empty(), "{flag} is empty: give a path");
    }
    Ok(())
}

/// Every leaf of `value` as (dotted key, JSON type, value), tables descended.
fn flatten_keys(prefix: &str, value: &serde_json::Value, rows: &mut Vec<(String, &'static str, String)>) {
    use serde_json::Value;
    let kind = match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_keys(&key, v, rows);
            }
            return;
        }
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Null => "optional",
    };
    rows.push((prefix.to_string(), kind, value.to_string()));
}

fn main() {
    altformers::bench::alloc::fix_allocator();
    // sweeps in several processes (bench scaling --processes, a preset's [scaling] processes)
    // run this program
    if let Ok(program) = std::env::current_exe() {
        altformers::bench::scaling::set_child_program(program);
    }
    let cli = Cli::parse();
    // candle (and rayon, when its pool starts) read this variable when they split work
    // across threads; a comparison preset may choose its own count on the CPU
    let preset_threads = match &cli.command {
        Command::Compare { preset, device, .. } if device == "cpu" => {
            altformers::compare::preset(preset).ok().and_then(|p| p.cpu_threads)
        }
        _ => None,
    };
    if let Some(n) = cli.threads.or(preset_threads) {
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    // candle splits its elementwise ops over a pool of its own, whose threads spin for up to
    // 25,000 iterations after each op; beside rayon's threads (the matrix products and our
    // fused ops) that makes more busy threads than cores, and they take turns. With that pool
    // off (its ops then run on the calling thread) a two-thread CPU training step on this
    // project's 2-core VM is about 1.3x faster (bench/results/2026-12-03-cpu-train-speed/).
    // CANDLE_NUM_THREADS set by the user still decides.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // NVLink multicast stays off in every NCCL worker of `compare --data-parallel` (threads of
    // this process: set before any thread starts)
    #[cfg(feature = "cuda")]
    if matches!(cli.command, Command::Compare { data_parallel: true, .. }) {
        for (name, value) in altformers::train::nccl::NVLS_OFF {
            std::env::set_var(name, value);
        }
    }
    // The main thread is thread 0 of a rayon pool of that size, so a fused op's parallel loop
    // starts on the thread that calls it: with one thread it runs inline, with more the caller
    // works beside the others. Called from outside any pool, every loop was handed to a pool
    // thread and waited for (two futex wake-ups per op: on this project's 2-core VM, 13% of a
    // one-thread CPU training step went to the kernel's wake-ups). The main thread itself, not
    // a pool thread running the program: glibc gives other threads arenas of their own, which
    // the allocator settings above do not hold in place (run on a pool thread, a one-thread
    // scaling sweep of AFT-simple spent as long in the kernel as in user space and took 2x).
    // Threads the program starts itself use rayon's global pool as before.
    let pool = rayon::ThreadPoolBuilder::new().use_current_thread().stack_size(8 << 20).build();
    let result = match pool {
        Ok(pool) => pool.install(|| run(cli.command)),
        Err(e) => Err(anyhow::anyhow!("cannot start the thread pool: {e}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        // a data-parallel worker stopped by another's failure says so to the launcher
        let peer_lost = e.downcast_ref::<altformers::train::distributed::PeerLost>().is_some()
            || altformers::train::distributed::peer_lost_in_an_op();
        std::process::exit(if peer_lost { altformers::train::distributed::PEER_LOST_EXIT } else { 1 });
    }
}

fn run(command: Command) -> Result<()> {
    launch::refuse_torchrun_workers()?;
    match command {
        Command::Train {
            model,
            task: TaskArg::Listops,
            data,
            tokenizer,
            config,
            sets,
            out,
            resume,
            device,
            dtype,
            quiet,
            stop_after,
            workers,
            gpus,
            sequence_parallel,
            nnodes,
            node_rank,
            rdzv_endpoint,
            init_from,
            data_format,
        } => {
            anyhow::ensure!(
                workers == 1
                    && gpus.is_none()
                    && nnodes == 1
                    && node_rank == 0
                    && rdzv_endpoint.is_none()
                    && !sequence_parallel,
                "--workers, --gpus, --sequence-parallel, --nnodes, --node-rank and --rdzv-endpoint train the language model (--task lm) only"
            );
            anyhow::ensure!(
                init_from.is_none() && matches!(data_format, args::FormatArg::Text),
                "--task listops starts from fresh weights on its generated data: drop --init-from and --data-format"
            );
            anyhow::ensure!(data.is_none(), "--task listops generates its data: drop --data");
            anyhow::ensure!(tokenizer.is_none(), "--task listops reads bytes: drop --tokenizer");
            non_empty(&[("--out", &out)])?;
            anyhow::ensure!(
                stop_after.is_none() && !resume,
                "--task listops keeps no checkpoint: no --stop-after or --resume"
            );
            let mut over = Overrides::from_cli(config.as_deref(), &sets)?;
            let settings = altformers::train::listops::ListOpsSettings::take_from(&mut over)?;
            let cfg = registry::config(&model, &over)?;
            let device = altformers::device::select(&device)?;
            let dtype = altformers::device::parse_dtype(&dtype)?;
            let opts = TrainOptions {
                out,
                resume,
                device,
                dtype,
                verbose: !quiet,
                stop_after,
                init_from: None,
                sequence_parallel: false,
                group: None,
                peak_memory: false,
            };
            let summary = altformers::train::listops::train_listops(&cfg, &settings, &opts)?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Train {
            model,
            task: TaskArg::Lm,
            data,
            data_format,
            config,
            sets,
            out,
            resume,
            device,
            dtype,
            quiet,
            stop_after,
            tokenizer,
            init_from,
            workers,
            gpus,
            sequence_parallel,
            nnodes,
            node_rank,
            rdzv_endpoint,
        } => {
            let (workers, device) = workers_and_device(workers, gpus, device)?;
            anyhow::ensure!(nnodes >= 1, "--nnodes must be at least 1");
            anyhow::ensure!(
                node_rank < nnodes,
                "--node-rank {node_rank} of --nnodes {nnodes}: it must be below --nnodes"
            );
            anyhow::ensure!(
                nnodes == 1 || rdzv_endpoint.is_some(),
                "--nnodes {nnodes}: give --rdzv-endpoint host:port (where node 0 listens)"
            );
            let data = data.context("--task lm trains on --data (shakespeare or a path)")?;
            non_empty(&[("--out", &out), ("--data", std::path::Path::new(&data))])?;
            anyhow::ensure!(stop_after != Some(0), "--stop-after must be at least 1");
            let dtype = altformers::device::parse_dtype(&dtype)?;
            let (tokenizer, cfg) = lm_run_config(
                &model,
                config.as_deref(),
                &sets,
                resume,
                init_from.as_deref(),
                &out,
                tokenizer.as_deref(),
            )?;
            let world = workers * nnodes;
            if launches(world, gpus.is_some()) {
                // what every worker would refuse, refused once here
                train::check_split(&cfg, world, sequence_parallel)?;
                let job = if sequence_parallel { "sequence-parallel training" } else { "data-parallel training" };
                return launch_workers(workers, nnodes, node_rank, rdzv_endpoint, gpus.is_some(), job, Some(&out));
            }
            // opened here, not before: a launcher (above) leaves the GPUs to its workers
            let device = this_process_device(&device)?;
            let corpus = Corpus::load(&data, data_format.into())?;
            let opts = TrainOptions {
                out: out.clone(),
                resume,
                device,
                dtype,
                verbose: !quiet,
                stop_after,
                init_from,
                sequence_parallel,
                group: None,
                // this process's device is this run's alone
                peak_memory: true,
            };
            let summary = train::train_tokenized(&cfg, &corpus, data_format.into(), &opts, &tokenizer)?;
            println!("{}", serde_json::to_string(&summary.last)?);
            Ok(())
        }
        Command::Eval { run, data, data_format, test, max_bytes, batch_size, device, tokenizer } => {
            non_empty(&[("--run", &run), ("--data", std::path::Path::new(&data))])?;
            altformers::util::positive(&[
                ("--batch-size", batch_size as f64),
                ("--max-bytes", max_bytes.unwrap_or(1) as f64),
            ])?;
            let device = altformers::device::select(&device)?;
            let model = train::load_run(&run, &device, candle_core::DType::F32)?;
            let corpus = Corpus::load(&data, data_format.into())?;
            let split = if test {
                corpus.test.as_deref().context("--test needs a corpus with a test split (--data-format enwik8)")?
            } else {
                &corpus.val
            };
            let key = if test { "test" } else { "val" };
            let tokenizer = Tokenizer::for_model(&run, tokenizer.as_deref(), model.config.vocab)?;
            if !tokenizer.is_bytes() {
                // loss per token; bits per byte over the bytes the predicted tokens cover
                let text = &split[..split.len().min(max_bytes.unwrap_or(usize::MAX))];
                let encoded = tokenizer.encode(text)?;
                let loss = train::evaluate_split(&model, &encoded.ids, batch_size, None)?;
                let bytes = encoded.predicted_bytes();
                let bpb = nats_to_bits(loss * (encoded.ids.len() - 1) as f64 / bytes.max(1) as f64);
                println!(
                    "{}",
                    serde_json::json!({ format!("{key}_loss_per_token"): loss, format!("{key}_bpb"): bpb, "bytes": text.len(), "tokens": encoded.ids.len() })
                );
                return Ok(());
            }
            let loss = train::evaluate_split(&model, split, batch_size, max_bytes)?;
            println!(
                "{}",
                serde_json::json!({ format!("{key}_loss"): loss, format!("{key}_bpb"): nats_to_bits(loss), "bytes": split.len().min(max_bytes.unwrap_or(usize::MAX)) })
            );
            Ok(())
        }
        Command::Generate { run, prompt, tokens, temperature, top_k, seed, mode, device, batch, tokenizer } => {
            non_empty(&[("--run", &run)])?;
            anyhow::ensure!(
                temperature.is_finite() && temperature >= 0.0,
                "--temperature must be a finite number >= 0 (0: always the likeliest byte), got {temperature}"
            );
            anyhow::ensure!(top_k != Some(0), "--top-k must be at least 1");
            anyhow::ensure!(batch >= 1, "--batch must be at least 1");
            let device = altformers::device::select(&device)?;
            let model = train::load_run(&run, &device, candle_core::DType::F32)?;
            let opts = SampleOptions { tokens, temperature, top_k, seed };
            let mode = match mode {
                ModeArg::Parallel => Mode::Parallel,
                ModeArg::Recurrent => Mode::Recurrent,
            };
            let tokenizer = Tokenizer::for_model(&run, tokenizer.as_deref(), model.config.vocab)?;
            if tokenizer.is_bytes() && model.config.vocab > altformers::data::VOCAB {
                anyhow::bail!(
                    "{} holds a model of {} tokens and records no tokenizer: its ids are not bytes; give its tokenizer.json with --tokenizer",
                    run.display(),
                    model.config.vocab
                );
            }
            let unit = if tokenizer.is_bytes() { "byte" } else { "token" };
            let (samples, time) = if tokenizer.is_bytes() {
                generate_batch_timed(&model, prompt.as_bytes(), &opts, mode, batch)?
            } else {
                let ids = tokenizer.encode(prompt.as_bytes())?.ids;
                let (rows, time) = altformers::generate::generate_ids_timed(&model, &ids, &opts, mode, batch)?;
                (rows.iter().map(|row| tokenizer.decode(row)).collect::<Result<Vec<_>>>()?, time)
            };
            // the bytes as generated: a model can emit invalid UTF-8, and a lossy print would
            // change it
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            for (i, out) in samples.iter().enumerate() {
                if batch > 1 {
                    writeln!(stdout, "=== sample {i}")?;
                }
                stdout.write_all(prompt.as_bytes())?;
                stdout.write_all(out)?;
                stdout.write_all(b"\n")?;
            }
            // the rate of the generation itself (model load excluded): the prompt, then the steps
            let seconds = time.prompt_s + time.steps_s;
            eprintln!(
                "generated {batch} x {tokens} {unit}s in {seconds:.3} s ({:.3} s of prompt and set-up, {:.3} s of steps{}): \
                 {:.1} {unit}s/s, {:.3} ms per step",
                time.prompt_s,
                time.steps_s,
                if time.replayed { ", each replayed from a CUDA graph" } else { "" },
                (batch * time.steps) as f64 / time.steps_s,
                time.steps_s * 1e3 / time.steps.max(1) as f64
            );
            Ok(())
        }
        Command::Bench(cmd) => bench(cmd),
        Command::Report { from } => {
            non_empty(&[("--from", &from)])?;
            altformers::report::render(&from)?;
            println!("{}", from.join("report.md").display());
            Ok(())
        }
        Command::Params { model, config, sets, matching } => {
            let over = Overrides::from_cli(config.as_deref(), &sets)?;
            let arch = registry::find(&model)?;
            let cfg = arch.config(&over)?;
            altformers::model::size::check_params(&cfg.model, candle_core::DType::F32)?;
            let params = altformers::compare::param_count(arch, &cfg.model, cfg.model.width)
                .context("this configuration does not build")?;
            let mut out = serde_json::json!({ "model": model, "width": cfg.model.width, "params": params });
            if let Some(other) = matching {
                let other_arch = registry::find(&other)?;
                // the shared settings, not `model`'s own options
                let other_cfg = other_arch.config(&over.without_model_options())?;
                let target = altformers::compare::param_count(other_arch, &other_cfg.model, other_cfg.model.width)
                    .context("the reference configuration does not build")?;
                let (matched, p) =
                    altformers::compare::match_params(arch, &cfg.model, target, altformers::compare::Counted::All)?;
                let sets = [format!("model.width={}", matched.width), format!("model.ffn_mult={}", matched.ffn_mult)];
                out["matching"] = serde_json::json!({ "model": other, "params": target, "sets": sets, "params_matched": p,
                    "ratio": p as f64 / target as f64 });
            }
            println!("{out}");
            Ok(())
        }
        Command::ImportRwkv4 { file, out } => {
            non_empty(&[("FILE", &file), ("--out", &out)])?;
            let cfg = altformers::import::rwkv4(&file, &out)?;
            println!(
                "imported RWKV-4 (width {}, {} layers, vocab {}) into {}",
                cfg.model.width,
                cfg.model.depth,
                cfg.model.vocab,
                out.display()
            );
            Ok(())
        }
        Command::Tokenizer(TokenizerCommand::Train { data, vocab, out }) => {
            non_empty(&[("--out", &out), ("--data", std::path::Path::new(&data))])?;
            let corpus = Corpus::load(&data, DataFormat::Text)?;
            let n = altformers::data::tokenizer::train_bpe_file(&corpus.train, vocab, &out)?;
            println!(
                "trained a byte-level BPE of {n} tokens on {} ({} bytes) into {}",
                data,
                corpus.train.len(),
                out.display()
            );
            Ok(())
        }
        Command::Logits { run, ids, out, mode } => {
            non_empty(&[("--run", &run), ("--out", &out)])?;
            let model = train::load_run(&run, &candle_core::Device::Cpu, candle_core::DType::F32)?;
            let vocab = model.config.vocab;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                anyhow::bail!("--ids: token {bad} is outside the model's vocabulary of {vocab}");
            }
            let tokens = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
            let logits = match mode {
                ModeArg::Parallel => model.forward(&tokens, None)?,
                ModeArg::Recurrent => {
                    let (first, mut state) = model.prefill(&tokens.narrow(1, 0, 1)?)?;
                    let mut rows = vec![first.squeeze(0)?];
                    for &id in &ids[1..] {
                        rows.push(
                            model.step(&candle_core::Tensor::new(&[id], &candle_core::Device::Cpu)?, &mut state)?,
                        );
                    }
                    candle_core::Tensor::cat(&rows, 0)?.unsqueeze(0)?
                }
            };
            let logits: std::collections::BTreeMap<String, candle_core::Tensor> =
                [("logits".to_string(), logits)].into();
            altformers::params::save_tensors(&logits, &out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Import { format, path, out } => {
            non_empty(&[("PATH", &path), ("--out", &out)])?;
            let format = match format {
                ImportFormat::HfGpt2 => altformers::interop::HfFormat::Gpt2,
                ImportFormat::HfRwkv4 => altformers::interop::HfFormat::Rwkv4,
            };
            let cfg = altformers::interop::import(format, &path, &out)?;
            let m = &cfg.model;
            println!(
                "imported {} as `{}` (width {}, {} layers, vocab {}, context {}) into {}",
                format.class(),
                m.architecture,
                m.width,
                m.depth,
                m.vocab,
                m.context,
                out.display()
            );
            Ok(())
        }
        Command::Export { run, format: ExportFormat::Hf, out } => {
            non_empty(&[("--run", &run), ("--out", &out)])?;
            let format = altformers::interop::export(&run, &out)?;
            println!("exported {} as {} into {}", run.display(), format.class(), out.display());
            Ok(())
        }
        Command::Config { list, model } => {
            anyhow::ensure!(list, "config: pass --list to list every key with its type and default");
            let arch = registry::find(&model)?;
            let mut rows = Vec::new();
            flatten_keys("", &serde_json::to_value(arch.defaults())?, &mut rows);
            let listops = serde_json::to_value(altformers::train::listops::ListOpsSettings::default())?;
            flatten_keys("listops", &listops, &mut rows);
            println!("| key | type | default (`{model}`) |\n|---|---|---|");
            for (key, kind, value) in rows.iter().filter(|(k, ..)| k != "model.architecture") {
                println!("| {key} | {kind} | {value} |");
            }
            Ok(())
        }
        Command::Models => {
            print!("{}", altformers::registry::table());
            Ok(())
        }
        Command::Compare { preset, parts, models, data, data_format, out, device, jobs, data_parallel } => {
            // `--device cuda` spreads the runs over every visible GPU (`cuda:K` keeps them on K)
            let gpus = if device == "cuda" { altformers::device::cuda_count()? } else { 1 };
            anyhow::ensure!(
                !data_parallel || device == "cuda",
                "--data-parallel spreads each language-model run over every GPU: give --device cuda (not {device})"
            );
            let device = altformers::device::select(&device)?;
            let data_parallel = if data_parallel { gpus } else { 0 };
            let select = altformers::compare::Selection { parts, models, jobs, gpus, data_parallel };
            altformers::compare::run(&preset, &data, data_format.into(), &out, &device, &select)
        }
    }
}

/// The configuration and tokenizer of `train --task lm`: a resumed run's own (only
/// `train.accumulate` may be set again), a new run's on `--init-from`'s weights (only `train.*`
/// and dropout may change), or the registry's defaults under `--config` and `--set`.
fn lm_run_config(
    model: &str,
    config: Option<&std::path::Path>,
    sets: &[String],
    resume: bool,
    init_from: Option<&std::path::Path>,
    out: &std::path::Path,
    tokenizer: Option<&str>,
) -> Result<(Tokenizer, altformers::config::RunConfig)> {
    let cfg = if resume {
        // what may change on resume: how the batch is scored, not the run
        let resumable = |set: &String| set.starts_with("train.accumulate=");
        if config.is_some() || !sets.iter().all(resumable) {
            anyhow::bail!(
                "--resume continues the run with its saved config.json; drop --config and --set (only --set train.accumulate=K may change)"
            );
        }
        let saved = altformers::train::RunFolder::open(out)
            .and_then(|f| f.config())
            .with_context(|| format!("cannot resume: {} holds no run", out.display()))?;
        if saved.model.architecture != model {
            anyhow::bail!(
                "--resume: the run in {} trains `{}`, not `{model}`",
                out.display(),
                saved.model.architecture
            );
        }
        altformers::config::RunConfig::layered(&saved, &Overrides::sets(sets))?
    } else if let Some(from) = init_from {
        let base = altformers::train::RunFolder::open(from)?.config()?;
        if base.model.architecture != model {
            anyhow::bail!("--init-from: {} holds `{}`, not `{model}`", from.display(), base.model.architecture);
        }
        let cfg = altformers::config::RunConfig::layered(&base, &Overrides::from_cli(config, sets)?)?;
        // the weights fix the model's shape: everything but dropout stays
        let shape = |m: &altformers::config::ModelConfig| {
            serde_json::to_value(altformers::config::ModelConfig { dropout: 0.0, ..m.clone() }).ok()
        };
        if shape(&cfg.model) != shape(&base.model) {
            anyhow::bail!(
                "--init-from keeps the model of {}: only train.* and model.dropout may change",
                from.display()
            );
        }
        cfg
    } else {
        registry::config(model, &Overrides::from_cli(config, sets)?)?
    };
    if resume {
        Ok((Tokenizer::for_run(out, tokenizer)?, cfg))
    } else if let Some(from) = init_from {
        Ok((Tokenizer::for_run(from, tokenizer)?, cfg))
    } else {
        let tokenizer = Tokenizer::from_arg(tokenizer.unwrap_or("bytes"))?;
        let mut cfg = cfg;
        if !tokenizer.is_bytes() {
            cfg.model.vocab = tokenizer.vocab();
        }
        Ok((tokenizer, cfg))
    }
}
