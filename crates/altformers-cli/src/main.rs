//! The `altformers` command: train, evaluate, generate, list and compare architectures.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use altformers::config::RunConfig;
use altformers::data::{Corpus, DataFormat};
use altformers::generate::{generate, Mode, SampleOptions};
use altformers::train::{self, nats_to_bits, TrainOptions};



#[derive(Parser)]
#[command(name = "altformers", version, about = "Train, run and compare the Transformer and its proposed replacements")]
struct Cli {
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Parallel,
    Recurrent,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a byte-level corpus.
    Train {
        /// Architecture name (see `altformers models`).
        #[arg(long)]
        model: String,
        /// `shakespeare` (bundled) or a path to any file.
        #[arg(long)]
        data: String,
        #[arg(long, value_enum, default_value = "text")]
        data_format: FormatArg,
        /// TOML file with [model] and [train] sections.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one setting, e.g. `--set train.lr=3e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run folder: config.json, model.safetensors, metrics.jsonl, checkpoint/.
        #[arg(long)]
        out: PathBuf,
        /// Continue the run in --out from its last checkpoint.
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Parameter/compute dtype (f32; bf16 on a GPU).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// No progress bar or per-evaluation lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Loss of a trained run on a corpus's validation split (every byte, consecutive windows).
    Eval {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data: String,
        #[arg(long, value_enum, default_value = "text")]
        data_format: FormatArg,
        /// Evaluate the test split instead (enwik8 only).
        #[arg(long)]
        test: bool,
        /// Only the first N bytes of the split.
        #[arg(long)]
        max_bytes: Option<usize>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Continue a prompt with a trained run.
    Generate {
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "\n")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// parallel: re-run the window for every byte; recurrent: prefill, then one step per byte.
        #[arg(long, value_enum, default_value = "recurrent")]
        mode: ModeArg,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Every registered architecture with its stated and true complexity.
    Models,
    /// Train every causal model at equal parameters and tokens and report the results.
    Compare {
        #[arg(long, default_value = "quick")]
        preset: String,
        #[arg(long, default_value = "shakespeare")]
        data: String,
        #[arg(long, value_enum, default_value = "text")]
        data_format: FormatArg,
        #[arg(long, default_value = "report")]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train { model, data, data_format, config, sets, out, resume, device, dtype, quiet } => {
            let device = altformers::device::select(&device)?;
            let dtype = altformers::device::parse_dtype(&dtype)?;
            let cfg = if resume {
                if config.is_some() || !sets.is_empty() {
                    anyhow::bail!("--resume continues the run with its saved config.json; drop --config and --set");
                }
                let saved: RunConfig = altformers::util::read_json(&out.join("config.json"))
                    .with_context(|| format!("cannot resume: {} holds no run", out.display()))?;
                if saved.model.mixer != model {
                    anyhow::bail!("--resume: the run in {} trains `{}`, not `{model}`", out.display(), saved.model.mixer);
                }
                saved
            } else {
                RunConfig::build(&model, config.as_deref(), &sets)?
            };
            let corpus = Corpus::load(&data, data_format.into())?;
            let opts = TrainOptions { out: out.clone(), resume, device, dtype, verbose: !quiet, stop_after: None };
            let summary = train::train(&cfg, &corpus, data_format.into(), &opts)?;
            println!("{}", serde_json::to_string(&summary.last)?);
            Ok(())
        }
        Command::Eval { run, data, data_format, test, max_bytes, batch_size, device } => {
            let device = altformers::device::select(&device)?;
            let model = train::load_run(&run, &device, candle_core::DType::F32)?;
            let corpus = Corpus::load(&data, data_format.into())?;
            let split = if test {
                corpus.test.as_deref().context("--test needs a corpus with a test split (--data-format enwik8)")?
            } else {
                &corpus.val
            };
            let loss = train::evaluate_split(&model, split, batch_size.max(1), max_bytes)?;
            let key = if test { "test" } else { "val" };
            println!(
                "{}",
                serde_json::json!({ format!("{key}_loss"): loss, format!("{key}_bpb"): nats_to_bits(loss), "bytes": split.len().min(max_bytes.unwrap_or(usize::MAX)) })
            );
            Ok(())
        }
        Command::Generate { run, prompt, tokens, temperature, top_k, seed, mode, device } => {
            let device = altformers::device::select(&device)?;
            let model = train::load_run(&run, &device, candle_core::DType::F32)?;
            let opts = SampleOptions { tokens, temperature, top_k, seed };
            let mode = match mode {
                ModeArg::Parallel => Mode::Parallel,
                ModeArg::Recurrent => Mode::Recurrent,
            };
            let out = generate(&model, prompt.as_bytes(), &opts, mode)?;
            println!("{prompt}{}", String::from_utf8_lossy(&out));
            Ok(())
        }
        Command::Models => {
            print!("{}", altformers::registry::table());
            Ok(())
        }
        Command::Compare { preset, data, data_format, out, device } => {
            let device = altformers::device::select(&device)?;
            altformers::compare::run(&preset, &data, data_format.into(), &out, &device).map(|_| ())
        }
    }
}
