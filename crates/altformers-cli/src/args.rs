//! The command line's grammar: every subcommand, its flags and their help (clap).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use altformers::data::DataFormat;

#[derive(Parser)]
#[command(name = "altformers", version, about = "Train, run and compare the Transformer and its proposed replacements")]
pub(crate) struct Cli {
    /// CPU threads for tensor operations (default: RAYON_NUM_THREADS or every core): the
    /// matrix products and the fused ops; candle's elementwise ops run on the calling thread
    /// unless CANDLE_NUM_THREADS says otherwise.
    #[arg(long, global = true)]
    pub(crate) threads: Option<usize>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum FormatArg {
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
pub(crate) enum TaskArg {
    Lm,
    Listops,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ModeArg {
    Parallel,
    Recurrent,
}

#[derive(Subcommand)]
pub(crate) enum TokenizerCommand {
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
pub(crate) enum ImportFormat {
    /// GPT2LMHeadModel (or a bare GPT2Model's names).
    HfGpt2,
    /// RwkvForCausalLM.
    HfRwkv4,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ExportFormat {
    Hf,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Dtype of the activations: f32, bf16 (mixed precision, on a GPU), f16 or f64; the
        /// parameters and optimizer state stay f32 (f64 with f64).
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
pub(crate) struct Sweep {
    /// GB of estimated activations beyond which a length is skipped.
    #[arg(long, default_value_t = 8.0)]
    pub(crate) memory_cap_gb: f64,
    #[arg(long, default_value = "f32")]
    pub(crate) dtype: String,
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
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
pub(crate) enum BenchModeArg {
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
