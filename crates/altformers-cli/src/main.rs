//! The `altformers` command: train, evaluate, generate, list and compare architectures.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use altformers::config::Overrides;
use altformers::data::tokenizer::Tokenizer;
use altformers::data::{Corpus, DataFormat};
use altformers::generate::{generate_batch_timed, Mode, SampleOptions};
use altformers::registry;
use altformers::train::{self, nats_to_bits, TrainOptions};

/// Counts heap bytes so `bench scaling` can report peak memory on the CPU.
#[global_allocator]
static ALLOC: altformers::bench::alloc::CountingAlloc = altformers::bench::alloc::CountingAlloc;

#[derive(Parser)]
#[command(name = "altformers", version, about = "Train, run and compare the Transformer and its proposed replacements")]
struct Cli {
    /// CPU threads for tensor operations (default: RAYON_NUM_THREADS or every core): the
    /// matrix products and the fused ops; candle's elementwise ops run on the calling thread
    /// unless CANDLE_NUM_THREADS says otherwise.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Text,
    Enwik8,
}

impl From<FormatArg> for DataFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Text => DataFormat::Text,
            FormatArg::Enwik8 => DataFormat::Enwik8,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TaskArg {
    Lm,
    Listops,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Parallel,
    Recurrent,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE (GPT-2's scheme, no prefix space: decoding gives the text back
    /// exactly) on the training split of --data, and write it as a tokenizer.json.
    Train {
        /// `shakespeare` (bundled) or a path to a UTF-8 text file (its first 90%).
        #[arg(long)]
        data: String,
        /// Vocabulary size (at least 256: every byte).
        #[arg(long)]
        vocab: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImportFormat {
    /// GPT2LMHeadModel (or a bare GPT2Model's names).
    HfGpt2,
    /// RwkvForCausalLM.
    HfRwkv4,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Hf,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a byte-level corpus (`--task lm`) or on ListOps (`--task listops`).
    Train {
        /// Architecture name (see `altformers models`).
        #[arg(long)]
        model: String,
        /// lm: next-byte prediction on --data (causal models); listops: LRA's ListOps
        /// classification, settings in the config's [listops] table or `--set listops.KEY=V`
        /// (every model: an encoder pooled, a causal model read at its last position).
        #[arg(long, value_enum, default_value = "lm")]
        task: TaskArg,
        /// `shakespeare` (bundled) or a path to any file (--task lm).
        #[arg(long)]
        data: Option<String>,
        /// How --data splits: text (90% / 10%) or enwik8 (90M / 5M / 5M bytes).
        #[arg(long, value_enum, default_value = "text")]
        data_format: FormatArg,
        /// TOML file with [model] and [train] sections.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one setting, e.g. `--set train.lr=3e-4` (repeatable; every key:
        /// `altformers config --list`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run folder: config.json, model.safetensors, metrics.jsonl, checkpoint/.
        #[arg(long)]
        out: PathBuf,
        /// Continue the run in --out from its last checkpoint (with its saved config; only
        /// --set train.accumulate=K may change).
        #[arg(long)]
        resume: bool,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Parameter/compute dtype (f32; bf16 on a GPU).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// No progress bar or per-evaluation lines.
        #[arg(long)]
        quiet: bool,
        /// Stop after this many steps (checkpointed), to continue later with --resume.
        #[arg(long)]
        stop_after: Option<usize>,
        /// `bytes` (the default) or a tokenizer.json (sets model.vocab to its vocabulary; the
        /// run folder keeps a copy). With --resume or --init-from: that run's own, the default.
        #[arg(long)]
        tokenizer: Option<String>,
        /// Fine-tune: a new run (--out) starting from this run folder's latest weights (an
        /// imported checkpoint, say), its model configuration and tokenizer; --config and --set
        /// may change the training settings (and dropout).
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// Data-parallel training in N processes on this host (--task lm, the CPU): each takes
        /// train.batch_size / N rows of every batch and the gradients are averaged, so the run
        /// equals one process's; rank 0 writes the run folder. --resume may use another N.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Data-parallel training on N GPUs of this host, one worker each (GPU 0 to N - 1), the
        /// gradients averaged by NCCL all-reduce: as --workers, on CUDA (--device defaults to
        /// cuda).
        #[arg(long)]
        gpus: Option<usize>,
        /// With --workers or --gpus: split every sequence instead of the batch, each worker
        /// taking model.context / N positions of every row (LongNet's sequence parallelism,
        /// paper 2307.02486 section 3.2: segments within a slice stay local, longer ones
        /// gather the other workers' dilated keys and values). The run equals one process's.
        #[arg(long)]
        sequence_parallel: bool,
        /// Several hosts: how many (one launcher each, all with the same --workers), as
        /// torchrun's --nnodes.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This host's place among --nnodes, 0 to nnodes - 1 (torchrun's --node-rank).
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// host:port where the first worker of node 0 listens for all the others (torchrun's
        /// --rdzv-endpoint); required with --nnodes above 1, a free local port otherwise.
        #[arg(long)]
        rdzv_endpoint: Option<String>,
    },
    /// Loss of a trained run on a corpus's validation split (every byte, consecutive windows).
    Eval {
        /// The run folder (written by train or import-rwkv4).
        #[arg(long)]
        run: PathBuf,
        /// `shakespeare` (bundled) or a path: its validation split is evaluated.
        #[arg(long)]
        data: String,
        /// How --data splits: text (90% / 10%) or enwik8 (90M / 5M / 5M bytes).
        #[arg(long, value_enum, default_value = "text")]
        data_format: FormatArg,
        /// Evaluate the test split instead (enwik8 only).
        #[arg(long)]
        test: bool,
        /// Only the first N bytes of the split.
        #[arg(long)]
        max_bytes: Option<usize>,
        /// Windows evaluated at once.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The run's own tokenizer is used; naming another (`bytes` or a tokenizer.json) is refused.
        #[arg(long)]
        tokenizer: Option<String>,
    },
    /// Continue a prompt with a trained run.
    Generate {
        /// The run folder (written by train or import-rwkv4).
        #[arg(long)]
        run: PathBuf,
        /// The text to continue (printed first).
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// Bytes to generate.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Sampling temperature, >= 0 (0: always the likeliest byte).
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        temperature: f64,
        /// Sample among the K likeliest bytes only (K >= 1).
        #[arg(long)]
        top_k: Option<usize>,
        /// The sampling seed: the same seed gives the same text.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// parallel: re-run the window for every byte; recurrent: prefill, then one step per byte.
        #[arg(long, value_enum, default_value = "recurrent")]
        mode: ModeArg,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Samples of the prompt generated at once, as one batch (sample i draws from random
        /// stream i of --seed: sample 0 is the single sample's).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// The run's own tokenizer is used (--tokens then counts its tokens); naming another is refused.
        #[arg(long)]
        tokenizer: Option<String>,
    },
    /// Tokenizers: train a byte-level BPE on a corpus.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// The logits a run gives for token ids, written as a safetensors file (`logits`:
    /// `[1, T, V]`, f32): what an exported or imported model is compared by.
    Logits {
        /// The run folder.
        #[arg(long)]
        run: PathBuf,
        /// Token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// recurrent: prefill the first id, then one step per id (the decoding form).
        #[arg(long, value_enum, default_value = "parallel")]
        mode: ModeArg,
    },
    /// Every registered architecture with its stated and true complexity.
    Models,
    /// Every `--set` key (and config-file key) of a model: its type and default.
    Config {
        /// List the keys (the only action so far).
        #[arg(long)]
        list: bool,
        /// Architecture whose defaults and `model.options.*` keys are listed.
        #[arg(long, default_value = "transformer")]
        model: String,
    },
    /// Parameter count of a configuration, and the width that matches another model's count.
    Params {
        /// Architecture name (see `altformers models`).
        #[arg(long)]
        model: String,
        /// TOML file with [model] and [train] sections.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one setting, e.g. `--set model.width=256` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Also solve the width whose parameter count matches this model's (same config).
        #[arg(long)]
        matching: Option<String>,
    },
    /// Turn an official RWKV-4 checkpoint (converted to safetensors) into a run folder.
    ///
    /// Convert a `.pth` first with PyTorch: python3 -c "import torch,sys; from safetensors.torch
    /// import save_file; save_file({k: v.float().contiguous() for k, v in torch.load(sys.argv[1],
    /// map_location='cpu').items()}, sys.argv[2])" RWKV-4.pth rwkv4.safetensors
    #[command(name = "import-rwkv4")]
    ImportRwkv4 {
        /// The checkpoint, with official RWKV-4 tensor names.
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Turn a Hugging Face `transformers` checkpoint (the folder save_pretrained writes:
    /// config.json and model.safetensors) into a run folder: GPT2LMHeadModel as `transformer`,
    /// RwkvForCausalLM as `rwkv4`. Names, shapes, dtypes (f32, f16, bf16) and finiteness are
    /// checked before anything is written; pickles (.bin, .pth) are refused.
    Import {
        /// hf-gpt2 or hf-rwkv4.
        #[arg(long, value_enum)]
        format: ImportFormat,
        /// The save_pretrained folder, or its model.safetensors.
        path: PathBuf,
        /// The run folder to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a run folder's latest weights as a Hugging Face `transformers` folder
    /// (config.json, model.safetensors) that from_pretrained reads: `transformer` as
    /// GPT2LMHeadModel, `rwkv4` as RwkvForCausalLM. A setting the layout cannot express (RoPE,
    /// grouped K/V, ...) is refused by name.
    Export {
        /// The run folder.
        #[arg(long)]
        run: PathBuf,
        /// hf: the transformers layout of the run's architecture.
        #[arg(long, value_enum, default_value = "hf")]
        format: ExportFormat,
        /// The folder to write (created; must not hold a model yet).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure time and memory (scaling with T) or decoding cost (against context).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Render DIR/report.md and DIR/plots/*.svg from the results in DIR.
    Report {
        /// The folder `compare --out` wrote (its *.jsonl files).
        #[arg(long)]
        from: PathBuf,
    },
    /// Train every causal model at equal parameters and tokens and report the results.
    Compare {
        /// quick, full, or a TOML file of the same shape.
        #[arg(long, default_value = "quick")]
        preset: String,
        /// Comma-separated parts to run (lm, mqar, listops, scaling, decode, performer-error; default all). Results of
        /// parts and models not run are kept in DIR, so a comparison can be run in pieces.
        #[arg(long, value_delimiter = ',')]
        parts: Vec<String>,
        /// Comma-separated causal models (default: every causal model in the registry).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long, default_value = "shakespeare")]
        data: String,
        #[arg(long, value_enum, default_value = "text")]
        data_format: FormatArg,
        #[arg(long, default_value = "report")]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Language-model, MQAR and ListOps runs trained at once (results do not depend on it).
        /// On a GPU each worker has its own CUDA stream, so small models share the GPU instead
        /// of waiting on each other's launches (default 1); on the CPU each has its own threads
        /// (default: as many workers as the cores hold at the preset's threads each). The timed
        /// parts (scaling, decoding) always run alone.
        #[arg(long)]
        jobs: Option<usize>,
        /// With --device cuda: train each language-model run data-parallel over every GPU
        /// (NCCL; runs one after another) instead of one run per GPU. Recall and ListOps runs
        /// stay one per GPU.
        #[arg(long)]
        data_parallel: bool,
    },
}

/// What the scaling and decoding sweeps share: the memory cap, the dtype, the output file.
#[derive(clap::Args)]
struct Sweep {
    /// GB of estimated activations beyond which a length is skipped.
    #[arg(long, default_value_t = 8.0)]
    memory_cap_gb: f64,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One mixer layer, one block and/or the whole model per architecture, T doubling; JSON
    /// lines out.
    Scaling {
        /// Comma-separated names, or `all`.
        #[arg(long, default_value = "all")]
        models: String,
        /// Comma-separated: mixer (one sequence-mixer layer), block, model (tokens to logits,
        /// one layer per stage). An architecture without a per-layer mixer (megabyte,
        /// hourglass) is timed as a whole model for mixer and block.
        #[arg(long, default_value = "mixer,block")]
        components: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_enum, default_value = "fwd")]
        mode: BenchModeArg,
        /// Comma-separated lengths (default: 256 doubling to 16384).
        #[arg(long, default_value = "256,512,1024,2048,4096,8192,16384")]
        lengths: String,
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 8)]
        heads: usize,
        #[arg(long, default_value_t = 16384)]
        tokens_per_batch: usize,
        #[arg(long, default_value_t = 10)]
        reps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Seconds one run may take before longer lengths are skipped.
        #[arg(long, default_value_t = 20.0)]
        time_cap: f64,
        /// A setting laid on every model's defaults (`key=value`, as train's `--set`), or on
        /// one model's only (`MODEL:key=value`); repeatable.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Fresh processes each model's sweep runs in, one after another: their repetitions
        /// pooled, the exponent's interval bootstrapped over the processes too.
        #[arg(long, default_value_t = 1)]
        processes: usize,
        #[command(flatten)]
        sweep: Sweep,
    },
    /// The bare operations the peers in bench/peers/ time (attention, retention, longconv),
    /// at the peers' shapes, with the same JSON lines; and M2's (monarch, dense,
    /// longconv-monarch, longconv-fft), then every curve's fitted exponents.
    Ops {
        /// Comma-separated: attention, retention, longconv, monarch, dense, longconv-monarch,
        /// longconv-fft.
        #[arg(long, default_value = "attention,retention,longconv")]
        ops: String,
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Comma-separated: fwd, fwdbwd.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "fwd,fwdbwd")]
        modes: Vec<BenchModeArg>,
        #[arg(long, default_value = "1024,2048,4096,8192,16384")]
        lengths: String,
        #[arg(long, default_value_t = 10)]
        reps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// GB that one length's tensors (inputs, output, their gradients) may take; longer
        /// lengths are recorded as skipped, not allocated.
        #[arg(long, default_value_t = 100.0)]
        memory_cap_gb: f64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// LongNet's sequence parallelism: one layer's forward and backward on each worker's
    /// slice of a sequence of T tokens, T as given; per length the slowest worker's median
    /// time, the largest peak device memory and the K/V rows each worker sends per head (JSON
    /// lines). Alone: one device's LongNet over the whole sequence.
    SequenceParallel {
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Split each sequence across N GPUs of this host (one worker each, NCCL).
        #[arg(long)]
        gpus: Option<usize>,
        /// Split each sequence across N CPU workers.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value = "65536,131072,262144,524288,1048576")]
        lengths: String,
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 8)]
        heads: usize,
        #[arg(long, default_value = "bf16")]
        dtype: String,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// A setting laid on LongNet's defaults (`key=value`, e.g. its pairs); repeatable.
        #[arg(long = "set")]
        sets: Vec<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Performer's (FAVOR+) relative error against exact causal softmax attention for each
    /// number of random features, orthogonal and iid, mean and sd over draws; JSON lines out.
    PerformerError {
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 256)]
        length: usize,
        /// Comma-separated standard deviations of the query and key entries.
        #[arg(long, default_value = "0.25,0.5,0.75,1")]
        input_stds: String,
        #[arg(long, default_value = "16,32,64,128,256,512,1024,2048,4096")]
        features: String,
        #[arg(long, default_value_t = 16)]
        draws: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Per-token decoding latency, throughput and state bytes against context length.
    Decode {
        #[arg(long, default_value = "all")]
        models: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "1024,2048,4096,8192,16384,32768,65536")]
        contexts: String,
        #[arg(long, default_value = "1,16")]
        batches: String,
        #[arg(long, default_value_t = 256)]
        width: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        depth: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Seconds one prefill may take before longer contexts are skipped.
        #[arg(long, default_value_t = 30.0)]
        time_cap: f64,
        #[command(flatten)]
        sweep: Sweep,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchModeArg {
    Fwd,
    Fwdbwd,
}

impl From<BenchModeArg> for altformers::bench::scaling::BenchMode {
    fn from(mode: BenchModeArg) -> Self {
        match mode {
            BenchModeArg::Fwd => Self::Fwd,
            BenchModeArg::Fwdbwd => Self::Fwdbwd,
        }
    }
}

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim().parse::<T>().map_err(|_| anyhow::anyhow!("{what}: `{x}` is not a valid value")))
        .collect()
}

/// Each `(flag, path)` must be given, not empty (an empty --out would write into the working folder).
fn non_empty(paths: &[(&str, &std::path::Path)]) -> Result<()> {
    for (flag, p) in paths {
        anyhow::ensure!(!p.as_os_str().is_empty(), "{flag} is empty: give a path");
    }
    Ok(())
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

/// The device `name` for this process: a data-parallel worker's (the launcher set
/// `ALTFORMERS_RANK`) with a CUDA stream of its own, since NCCL launches a non-blocking
/// communicator's collectives from a thread of its own, where the per-thread default stream
/// of candle's devices would be another stream (NVIDIA/nccl#1976).
fn this_process_device(name: &str) -> Result<candle_core::Device> {
    let device = altformers::device::select(name)?;
    match std::env::var(altformers::train::distributed::RANK) {
        Ok(_) => altformers::device::with_own_stream(&device),
        Err(_) => Ok(device),
    }
}

fn bench(cmd: BenchCommand) -> Result<()> {
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
            anyhow::ensure!(
                workers == 1 || device == "cpu",
                "--workers runs CPU workers; on GPUs use --gpus N (one worker per GPU, NCCL)"
            );
            let (workers, device) = workers_and_device(workers, gpus, device)?;
            anyhow::ensure!(workers >= 1, "--workers must be at least 1");
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
            if (workers > 1 || gpus.is_some()) && std::env::var(altformers::train::distributed::RANK).is_err() {
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

/// `train --workers N [--nnodes M --node-rank K --rdzv-endpoint host:port]` (data- or
/// sequence-parallel training) and `bench sequence-parallel`: runs this same command N times
/// on this host as ranks K N to K N + N - 1 of one job (`job` names it) of M N
/// workers (`altformers::train::distributed`), rank 0 listening at the endpoint (a free local
/// port on one host), and waits. A worker that fails stops this host's others (those of other
/// hosts stop when they lose it); the error names the cause among the ranks that failed.
fn launch_workers(
    n: usize,
    nnodes: usize,
    node_rank: usize,
    endpoint: Option<String>,
    gpus: bool,
    job: &str,
    run_folder: Option<&std::path::Path>,
) -> Result<()> {
    use altformers::train::distributed::{LOCAL_RANK, RANK, RENDEZVOUS, WORLD_SIZE};
    if gpus {
        let visible = altformers::device::cuda_count()?;
        anyhow::ensure!(n <= visible, "--gpus {n}: this host has {visible} CUDA GPU(s) visible");
    }
    let endpoint = match endpoint {
        Some(e) => e,
        None => format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()),
    };
    let world = n * nnodes;
    let exe = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // (rank, process) of each worker still running
    let mut children: Vec<Option<(usize, std::process::Child)>> = Vec::with_capacity(n);
    for rank in node_rank * n..(node_rank + 1) * n {
        let mut command = std::process::Command::new(&exe);
        if gpus {
            // NVLink multicast stays off in every worker (it can put the host's GPUs out of
            // service on the machines this project runs on)
            #[cfg(feature = "cuda")]
            command.envs(altformers::train::nccl::NVLS_OFF);
        }
        let child = command
            .args(&args)
            .env(RANK, rank.to_string())
            .env(LOCAL_RANK, (rank - node_rank * n).to_string())
            .env(WORLD_SIZE, world.to_string())
            .env(RENDEZVOUS, &endpoint)
            // rank 0 prints the run's summary; the others' output would repeat it
            .stdout(if rank == 0 { std::process::Stdio::inherit() } else { std::process::Stdio::null() })
            .spawn()
            .with_context(|| format!("starting worker rank {rank}"))?;
        children.push(Some((rank, child)));
    }
    // (rank, status) of each worker that failed, in the order seen
    let mut failed: Vec<(usize, std::process::ExitStatus)> = Vec::new();
    // workers still running when another failed, stopped by this launcher
    let mut killed: Vec<usize> = Vec::new();
    loop {
        for slot in children.iter_mut() {
            if let Some((rank, child)) = slot {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        failed.push((*rank, status));
                    }
                    *slot = None;
                }
            }
        }
        if !failed.is_empty() {
            // the others would only wait for the failed one until their timeout
            std::thread::sleep(std::time::Duration::from_millis(300));
            for (rank, mut child) in children.iter_mut().filter_map(Option::take) {
                match child.try_wait()? {
                    Some(status) if !status.success() => failed.push((rank, status)),
                    Some(_) => {}
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        killed.push(rank);
                    }
                }
            }
            let checkpoint = match run_folder {
                None => "",
                Some(out) if out.join("checkpoint").join("state.json").exists() => {
                    "; the run folder keeps its last checkpoint (--resume continues, on any number of workers or GPUs)"
                }
                Some(_) => "; no checkpoint was written",
            };
            anyhow::bail!(
                "{job} in {world} worker{} failed: {}; every worker was stopped{checkpoint}",
                if world == 1 { "" } else { "s" },
                which_failed(&failed, &killed)
            );
        }
        if children.iter().all(Option::is_none) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `(workers, device)` of `train`: `--gpus N` is N workers on CUDA, one GPU each (the worker
/// of local rank r on GPU r).
fn workers_and_device(workers: usize, gpus: Option<usize>, device: String) -> Result<(usize, String)> {
    let Some(n) = gpus else { return Ok((workers, device)) };
    anyhow::ensure!(workers == 1, "--gpus N starts N workers, one per GPU: drop --workers");
    anyhow::ensure!(n >= 1, "--gpus must be at least 1");
    anyhow::ensure!(
        device == "cpu" || device == "cuda",
        "--gpus uses GPUs 0 to N - 1 of this host: drop --device {device}"
    );
    let device = match std::env::var(altformers::train::distributed::LOCAL_RANK) {
        Ok(local) => format!("cuda:{}", local.trim()),
        Err(_) => "cuda".to_string(),
    };
    Ok((n, device))
}

/// Which workers failed, the cause first: a worker that stopped because a peer went away
/// (exit `PEER_LOST_EXIT`) is not the cause; where every failure is such, the cause is the
/// workers that were `killed` still running (they hung).
fn which_failed(failed: &[(usize, std::process::ExitStatus)], killed: &[usize]) -> String {
    let stopped_by_peer =
        |s: &std::process::ExitStatus| s.code() == Some(altformers::train::distributed::PEER_LOST_EXIT);
    let (causes, followers): (Vec<_>, Vec<_>) = failed.iter().partition(|(_, s)| !stopped_by_peer(s));
    let list = |v: &[&(usize, std::process::ExitStatus)]| {
        v.iter().map(|(r, s)| format!("rank {r} ({s})")).collect::<Vec<_>>().join(", ")
    };
    if !causes.is_empty() {
        let after =
            if followers.is_empty() { String::new() } else { format!("; {} stopped because it did", list(&followers)) };
        format!("worker {} failed{after}", list(&causes))
    } else if !killed.is_empty() {
        let ranks = killed.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        format!("worker {ranks} stopped answering and was killed; {} gave up waiting", list(&followers))
    } else {
        format!("worker {} failed", list(&followers))
    }
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
            ..
        } => {
            anyhow::ensure!(
                workers == 1 && gpus.is_none() && nnodes == 1 && !sequence_parallel,
                "--workers, --gpus, --sequence-parallel and --nnodes train the language model (--task lm) only"
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
            anyhow::ensure!(
                workers == 1 || device == "cpu",
                "--workers runs CPU workers; on GPUs use --gpus N (one worker per GPU, gradients through NCCL)"
            );
            let (workers, device) = workers_and_device(workers, gpus, device)?;
            anyhow::ensure!(workers >= 1 && nnodes >= 1, "--workers and --nnodes must be at least 1");
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
            let cfg = if resume {
                // what may change on resume: how the batch is scored, not the run
                let resumable = |set: &String| set.starts_with("train.accumulate=");
                if config.is_some() || !sets.iter().all(resumable) {
                    anyhow::bail!(
                        "--resume continues the run with its saved config.json; drop --config and --set (only --set train.accumulate=K may change)"
                    );
                }
                let saved = altformers::train::RunFolder::open(&out)
                    .and_then(|f| f.config())
                    .with_context(|| format!("cannot resume: {} holds no run", out.display()))?;
                if saved.model.architecture != model {
                    anyhow::bail!(
                        "--resume: the run in {} trains `{}`, not `{model}`",
                        out.display(),
                        saved.model.architecture
                    );
                }
                altformers::config::RunConfig::layered(&saved, &Overrides::sets(&sets))?
            } else if let Some(from) = &init_from {
                let base = altformers::train::RunFolder::open(from)?.config()?;
                if base.model.architecture != model {
                    anyhow::bail!("--init-from: {} holds `{}`, not `{model}`", from.display(), base.model.architecture);
                }
                let cfg =
                    altformers::config::RunConfig::layered(&base, &Overrides::from_cli(config.as_deref(), &sets)?)?;
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
                registry::config(&model, &Overrides::from_cli(config.as_deref(), &sets)?)?
            };
            let (tokenizer, cfg) = if resume {
                (Tokenizer::for_run(&out, tokenizer.as_deref())?, cfg)
            } else if let Some(from) = &init_from {
                (Tokenizer::for_run(from, tokenizer.as_deref())?, cfg)
            } else {
                let tokenizer = Tokenizer::from_arg(tokenizer.as_deref().unwrap_or("bytes"))?;
                let mut cfg = cfg;
                if !tokenizer.is_bytes() {
                    cfg.model.vocab = tokenizer.vocab();
                }
                (tokenizer, cfg)
            };
            let world = workers * nnodes;
            // --gpus 1 too: one worker whose gradients go through NCCL, as torchrun's one process
            if (world > 1 || gpus.is_some()) && std::env::var(train::distributed::RANK).is_err() {
                // the settings every worker would refuse, refused once here
                let (batch, context) = (cfg.train.batch_size, cfg.model.context);
                anyhow::ensure!(
                    sequence_parallel || batch % world == 0,
                    "train.batch_size {batch} is not a multiple of the {world} workers"
                );
                anyhow::ensure!(
                    !sequence_parallel || context % world == 0,
                    "model.context {context} is not a multiple of the {world} workers (each takes an equal slice of every sequence)"
                );
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
            if data_parallel {
                // NVLink multicast stays off in every NCCL worker (set before any starts)
                #[cfg(feature = "cuda")]
                for (name, value) in altformers::train::nccl::NVLS_OFF {
                    std::env::set_var(name, value);
                }
            }
            let device = altformers::device::select(&device)?;
            let data_parallel = if data_parallel { gpus } else { 0 };
            let select = altformers::compare::Selection { parts, models, jobs, gpus, data_parallel };
            altformers::compare::run(&preset, &data, data_format.into(), &out, &device, &select)
        }
    }
}
