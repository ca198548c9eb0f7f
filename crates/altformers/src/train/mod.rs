//! Training: one step for every task ([`step::Trainer`]: AdamW, warm-up + cosine schedule,
//! clipping, the gradient all-reduce hook), the byte-level language-model loop around it
//! (dropout, periodic evaluation, atomic checkpoints and exact resume), and the run folder
//! it writes ([`run_folder::RunFolder`]).
//!
//! Every batch and dropout mask is a function of `(seed, step)`, so a resumed run sees the
//! same data and masks as an uninterrupted one and reaches the same loss.

pub mod distributed;
#[cfg(feature = "cuda")]
mod graph;
pub mod listops;
pub mod lock;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod run_folder;
pub mod step;
pub mod task;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::RunConfig;
use crate::data::tokenizer::Tokenizer;
use crate::data::{Corpus, DataFormat};
use crate::model::Model;
use crate::rng::{stream, Rng};
pub use run_folder::{Metrics, RunFolder, TrainState};
use step::Trainer;
use task::{Batch, ByteLm, Task};

pub struct TrainOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub device: Device,
    pub dtype: DType,
    /// Progress bar and per-evaluation lines on the terminal.
    pub verbose: bool,
    /// Stop (after checkpointing) once this many steps are done: tests use it to interrupt.
    pub stop_after: Option<usize>,
    /// Start from the latest weights of this run folder (an imported checkpoint, say) instead
    /// of fresh ones: fine-tuning. Its configuration must be the run's model.
    pub init_from: Option<PathBuf>,
    /// Workers split every sequence instead of the batch (LongNet's sequence parallelism).
    pub sequence_parallel: bool,
    /// This run's place in a data-parallel job whose workers are threads of this process
    /// (`compare --data-parallel`); `None`: the job the launcher started this process in, if
    /// any ([`distributed::Group::from_env`]).
    pub group: Option<std::sync::Arc<distributed::Group>>,
    /// Record the device's peak memory in each evaluation's metrics: only where this run has
    /// its device (its process's counting allocator, its GPU's pool) to itself, not beside
    /// concurrent runs (`compare`'s jobs).
    pub peak_memory: bool,
}

impl TrainOptions {
    /// A fresh run into `out` on `device` in f32, without interruption.
    pub fn fresh(out: PathBuf, device: &Device, verbose: bool) -> Self {
        Self {
            out,
            resume: false,
            device: device.clone(),
            dtype: DType::F32,
            verbose,
            stop_after: None,
            init_from: None,
            sequence_parallel: false,
            group: None,
            peak_memory: false,
        }
    }
}

/// `config`'s model with fresh weights for a run of `opts`: parameters and optimizer state stay
/// f32 (master weights; f64 when the run is f64), `opts.dtype` is the dtype of the activations
/// (bf16 for mixed precision). Refused first where its training would not fit in host memory
/// (every task's loop comes here: a batch of 10^12 aborted ListOps' in the allocator).
pub(crate) fn fresh_model(config: &RunConfig, opts: &TrainOptions) -> Result<Model> {
    if opts.device.is_cpu() {
        // one micro-batch's activations are held at a time
        let t = &config.train;
        crate::model::size::check_training(&config.model, t.batch_size / t.accumulate.max(1), opts.dtype)?;
    }
    let param_dtype = if opts.dtype == DType::F64 { DType::F64 } else { DType::F32 };
    Ok(Model::new(&config.model, config.train.seed, &opts.device, param_dtype)?.with_compute_dtype(opts.dtype))
}

pub struct TrainSummary {
    pub last: Metrics,
    pub params: usize,
    pub history: Vec<Metrics>,
}

pub fn nats_to_bits(nats: f64) -> f64 {
    nats / std::f64::consts::LN_2
}

/// Mean loss of `task` over `n` fixed batches (the same batches at every call).
pub fn estimate_loss(model: &Model, task: &dyn Task, n: usize, batch: usize, seed: u64, which: u64) -> Result<f64> {
    mean_loss_of_pieces(model, task, n, batch, seed, which, |b| Ok(vec![b]), &|| {})
}

/// [`estimate_loss`] as a worker of `trainer` takes it: over its share of each batch
/// ([`Batch::share`]: data- or sequence-parallel evaluation; the mean over the workers is the
/// whole batches' loss), in the step's micro-batches (`train.accumulate`: no more activations
/// held than in a step); `progress` after each batch.
fn estimate_worker_loss(
    model: &Model,
    task: &dyn Task,
    trainer: &Trainer,
    which: u64,
    progress: &dyn Fn(),
) -> Result<f64> {
    let t = &trainer.train;
    let micro = t.accumulate;
    let pieces = |b: Batch| {
        let share = b.share(trainer.shard, trainer.sequence_parallel)?;
        match micro {
            1 => Ok(vec![share]),
            _ => (0..micro).map(|j| share.micro_batch(j, micro)).collect(),
        }
    };
    mean_loss_of_pieces(model, task, t.eval_batches, t.batch_size, t.seed, which, pieces, progress)
}

/// The mean loss over `n` fixed batches of `batch` rows, each scored in the equal pieces
/// `pieces` cuts it into (the mean of equal pieces' mean losses is the batch's); `progress`
/// after each batch.
#[allow(clippy::too_many_arguments)]
fn mean_loss_of_pieces(
    model: &Model,
    task: &dyn Task,
    n: usize,
    batch: usize,
    seed: u64,
    which: u64,
    pieces: impl Fn(Batch) -> Result<Vec<Batch>>,
    progress: &dyn Fn(),
) -> Result<f64> {
    let mut rng = Rng::derive(seed, stream::EVAL_BATCH, which);
    let (mut total, mut count) = (0.0, 0usize);
    for _ in 0..n {
        for piece in pieces(task.batch(batch, &mut rng, model.device())?)? {
            total += task.loss(model, &piece, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            count += 1;
        }
        progress();
    }
    Ok(total / count as f64)
}

/// Loss over a whole split (bytes, or token ids): consecutive windows of `context` tokens,
/// every token after the first predicted once. `max_bytes` caps the work for huge splits
/// (tokens, for token ids).
pub fn evaluate_split<T: Copy + Into<u32> + Sync>(
    model: &Model,
    split: &[T],
    batch: usize,
    max_bytes: Option<usize>,
) -> Result<f64> {
    let t = model.config.context;
    let split = &split[..max_bytes.unwrap_or(usize::MAX).min(split.len())];
    if split.len() < 2 {
        bail!("the split has {} bytes: nothing to evaluate", split.len());
    }
    let starts: Vec<usize> = (0..split.len() - 1).step_by(t).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for group in starts.chunks(batch) {
        // Full windows batch together; the final short window runs alone.
        let (full, short): (Vec<usize>, Vec<usize>) = group.iter().partition(|&&s| s + t < split.len());
        for windows in [full, short] {
            if windows.is_empty() {
                continue;
            }
            let len = (split.len() - 1 - windows[0]).min(t);
            let xs: Vec<u32> = windows.iter().flat_map(|&s| split[s..s + len].iter().map(|&b| b.into())).collect();
            let ys: Vec<u32> =
                windows.iter().flat_map(|&s| split[s + 1..s + 1 + len].iter().map(|&b| b.into())).collect();
            let shape = (windows.len(), len);
            let x = candle_core::Tensor::from_vec(xs, shape, model.device())?;
            let y = candle_core::Tensor::from_vec(ys, shape, model.device())?;
            let loss = Model::loss(&model.forward(&x, None)?, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            total += loss * (windows.len() * len) as f64;
            count += windows.len() * len;
        }
    }
    Ok(total / count as f64)
}

/// Loads a finished or interrupted run's config and latest weights (for eval and generate).
pub fn load_run(dir: &Path, device: &Device, dtype: DType) -> Result<Model> {
    RunFolder::open(dir)?.load_model(device, dtype)
}

/// Trains `config` on `corpus` (bytes), writing the run folder `opts.out`.
pub fn train(
    config: &RunConfig,
    corpus: &Corpus,
    data_format: DataFormat,
    opts: &TrainOptions,
) -> Result<TrainSummary> {
    train_tokenized(config, corpus, data_format, opts, &Tokenizer::Bytes)
}

/// [`train`] on `corpus` as `tokenizer`'s tokens: the run folder records the tokenizer (a
/// resumed run must give the same one), losses are per token and `val_bpb` per byte.
pub fn train_tokenized(
    config: &RunConfig,
    corpus: &Corpus,
    data_format: DataFormat,
    opts: &TrainOptions,
    tokenizer: &Tokenizer,
) -> Result<TrainSummary> {
    config.validate()?;
    if !crate::registry::find(&config.model.architecture)?.causal {
        bail!(
            "`{}` is an encoder (bidirectional: it sees the byte it would predict), not a language model; train it on a classification task (--task listops)",
            config.model.architecture
        );
    }
    if tokenizer.is_bytes() {
        corpus.check_context(config.model.context)?;
        if config.model.vocab < 256 {
            bail!("model.vocab is {}: a byte-level language model needs 256 (every byte value)", config.model.vocab);
        }
        let splits = Splits { train: &corpus.train, val: &corpus.val, tokens_per_byte: None };
        return train_on(config, corpus, data_format, opts, tokenizer, splits);
    }
    if config.model.vocab < tokenizer.vocab() {
        bail!(
            "model.vocab is {}: the tokenizer {} needs {}",
            config.model.vocab,
            tokenizer.describe(),
            tokenizer.vocab()
        );
    }
    let (train, val) = (tokenizer.encode(&corpus.train)?.ids, tokenizer.encode(&corpus.val)?.ids);
    for (name, split) in [("training", &train), ("validation", &val)] {
        if split.len() < config.model.context + 1 {
            bail!(
                "the {name} split of {} has {} tokens, fewer than model.context + 1 = {}",
                corpus.source,
                split.len(),
                config.model.context + 1
            );
        }
    }
    let tokens_per_byte = Some(val.len() as f64 / corpus.val.len() as f64);
    train_on(config, corpus, data_format, opts, tokenizer, Splits { train: &train, val: &val, tokens_per_byte })
}

/// What the training loop reads: the splits as bytes, or as a tokenizer's ids with the
/// validation split's tokens per byte (which converts its loss to bits per byte).
struct Splits<'a, T> {
    train: &'a [T],
    val: &'a [T],
    tokens_per_byte: Option<f64>,
}

/// Refuses a job of `world` workers that cannot split `config`'s batches evenly: each worker
/// takes an equal slice of every sequence (`sequence_parallel`) or an equal share of the rows,
/// in `train.accumulate` equal micro-batches. Every worker checks; a launcher checks first.
pub fn check_split(config: &RunConfig, world: usize, sequence_parallel: bool) -> Result<()> {
    let (m, t) = (&config.model, &config.train);
    if sequence_parallel {
        if !m.context.is_multiple_of(world) {
            bail!(
                "model.context {} is not a multiple of the {world} workers (each takes an equal slice of every sequence)",
                m.context
            );
        }
    } else if !t.batch_size.is_multiple_of(world * t.accumulate) {
        bail!(
            "train.batch_size {} is not a multiple of the {world} workers times train.accumulate = {} (each worker's rows in equal micro-batches)",
            t.batch_size,
            t.accumulate
        );
    }
    Ok(())
}

/// The trainer of `model` as this process trains it: alone, or as a worker of `group`'s job
/// (its share of every batch, the exchange with the others, the model split with the sequence
/// under sequence parallelism), with the CPU's threads taking slices of each micro-batch where
/// they can. Settings the job cannot split are refused by name.
fn trainer_for(
    config: &RunConfig,
    opts: &TrainOptions,
    model: &mut Model,
    group: Option<&std::sync::Arc<distributed::Group>>,
) -> Result<Trainer> {
    let (m, t) = (&config.model, &config.train);
    let mut trainer = Trainer::new(model, t)?;
    if opts.sequence_parallel && group.is_none() {
        bail!("--sequence-parallel splits each sequence across workers: give --workers N or --gpus N");
    }
    // each worker, micro-batch and thread draws its part of the whole batch's masks
    let splits_masks = m.dropout == 0.0 || model.per_example_dropout();
    if let Some(g) = group {
        check_split(config, g.world, opts.sequence_parallel)?;
        if !splits_masks {
            bail!(
                "`{}` draws dropout masks that cannot be split across workers (model.dropout is {}): set model.dropout=0 or train in one process",
                m.architecture,
                m.dropout
            );
        }
        let (sync, split) = exchange(g.clone(), &opts.device)?;
        trainer.sync = sync;
        trainer.shard = (g.rank, g.world);
        if opts.sequence_parallel {
            model.split_sequence(split)?;
            trainer.sequence_parallel = true;
        }
    }
    if t.accumulate > 1 && !splits_masks {
        bail!(
            "`{}` draws dropout masks that cannot be split into micro-batches (model.dropout is {}): set model.dropout=0 or train.accumulate=1",
            m.architecture,
            m.dropout
        );
    }
    // CPU training on several threads: slices of each micro-batch side by side, one per thread
    // (`Trainer::slices`), where it divides
    let threads = rayon::current_num_threads();
    let micro_batch = t.batch_size / t.accumulate;
    if group.is_none() && model.device().is_cpu() && threads > 1 && micro_batch.is_multiple_of(threads) && splits_masks
    {
        trainer.slices = threads;
    }
    Ok(trainer)
}

/// The run folder of `opts.out` as rank `rank` has it, the training state it starts from and
/// the metrics logged so far: resumed (the model and optimizer restored from the last
/// checkpoint; rank 0 checks the data and tokenizer are the run's), or new (rank 0 creates
/// it; the other ranks write nothing).
#[allow(clippy::too_many_arguments)]
fn open_run_folder(
    config: &RunConfig,
    corpus: &Corpus,
    data_format: DataFormat,
    opts: &TrainOptions,
    tokenizer: &Tokenizer,
    model: &Model,
    trainer: &mut Trainer,
    rank: usize,
) -> Result<(RunFolder, TrainState, Vec<Metrics>)> {
    let out = &opts.out;
    Ok(if opts.resume && rank > 0 {
        // the other ranks read the checkpoint rank 0 resumes from
        let folder = RunFolder::open(out)?;
        let state: TrainState = crate::util::read_json(&folder.latest_checkpoint()?.join("state.json"))?;
        folder.restore(model, &mut trainer.opt, &state)?;
        (folder, state, Vec::new())
    } else if opts.resume {
        let (folder, state, history) = RunFolder::resume(out, config)?;
        state.check_data(corpus, data_format)?;
        Tokenizer::of_run(out)?.check_same(tokenizer, out)?;
        folder.restore(model, &mut trainer.opt, &state)?;
        folder.keep_metrics_up_to(state.step)?;
        (folder, state, history)
    } else {
        let data = Some(run_folder::CorpusId::of(corpus));
        let t = &config.train;
        let state =
            TrainState { step: 0, seed: t.seed, data_source: corpus.source.clone(), data_format, data, elapsed_s: 0.0 };
        let folder = if rank > 0 {
            RunFolder::unwritten(out)
        } else {
            let folder = RunFolder::create(out, config)?;
            tokenizer.record(&folder.dir)?;
            folder
        };
        (folder, state, Vec::new())
    })
}

/// The training loop over `splits`, writing the run folder `opts.out`.
fn train_on<T: Copy + Into<u32> + Sync>(
    config: &RunConfig,
    corpus: &Corpus,
    data_format: DataFormat,
    opts: &TrainOptions,
    tokenizer: &Tokenizer,
    splits: Splits<T>,
) -> Result<TrainSummary> {
    let Splits { train, val, tokens_per_byte } = splits;
    let out = &opts.out;
    let (m, t) = (&config.model, &config.train);
    // a worker of a data-parallel job (`--workers`): its slice of each batch, the gradients
    // averaged with the others'; only rank 0 writes the run folder and prints
    let group = match &opts.group {
        Some(g) => Some(g.clone()),
        None => distributed::Group::from_env()?.map(std::sync::Arc::new),
    };
    let rank = group.as_ref().map_or(0, |g| g.rank);
    // a worker process: stopped if a step, an evaluation batch or a checkpoint's wait makes
    // no progress well past every deadline (the longest, the wait for rank 0's checkpoint);
    // made before the model, so it watches the model's drop too (its NCCL abort, where the
    // model holds the communicator last: sequence parallelism)
    let timeout = distributed::timeout()?;
    let checkpoint_patience = 10 * timeout;
    let watchdog = match (&opts.group, &group) {
        (None, Some(g)) => {
            let limit = checkpoint_patience + 2 * timeout;
            Some(distributed::Watchdog::start(limit, distributed::stop_stuck_worker(g.rank, limit)))
        }
        _ => None,
    };
    let kick = || {
        if let Some(w) = &watchdog {
            w.kick()
        }
    };
    let mut model = fresh_model(config, opts)?;
    if let Some(from) = &opts.init_from {
        if opts.resume {
            bail!("--init-from starts a new run; --resume continues one: not both");
        }
        model
            .params
            .load(&from.join("model.safetensors"))
            .with_context(|| format!("--init-from {}", from.display()))?;
    }
    let mut trainer = trainer_for(config, opts, &mut model, group.as_ref())?;
    let verbose = opts.verbose && rank == 0;
    let (folder, mut state, mut history) =
        open_run_folder(config, corpus, data_format, opts, tokenizer, &model, &mut trainer, rank)?;
    let train_task = ByteLm { split: train, context: m.context };
    let val_task = ByteLm { split: val, context: m.context };

    let tokens_per_step = (t.batch_size * m.context) as f64;
    let bar = progress_bar(verbose, t.steps as u64, state.step as u64);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut window_start = Instant::now();
    let mut window_steps = 0usize;
    if verbose {
        eprintln!(
            "training {} ({} parameters) on {} for {} steps, batch {} x {} bytes{}",
            m.architecture,
            crate::util::human(model.num_params() as f64),
            corpus.source,
            t.steps,
            t.batch_size,
            m.context,
            match t.accumulate {
                1 => String::new(),
                k => format!(" in {k} micro-batches per worker"),
            }
        );
    }
    // the most bytes held since the last call (set-up excluded from the first window); a
    // device that cannot say leaves the figure out, once said, and trains on
    let unmeasured = std::cell::Cell::new(!opts.peak_memory);
    let peak_memory = || -> Result<Option<u64>> {
        if unmeasured.get() {
            return Ok(None);
        }
        crate::bench::alloc::take_peak(model.device()).or_else(|e| {
            unmeasured.set(true);
            eprintln!("warning: the device's peak memory cannot be read ({e}); metrics leave it out");
            Ok(None)
        })
    };
    peak_memory()?;
    let mut checkpointed = if opts.resume { state.step } else { 0 };
    let last_good = |step: usize| {
        if step == 0 {
            "no checkpoint was written yet".to_string()
        } else {
            format!("the last good checkpoint (step {step}) in {} is intact", out.display())
        }
    };
    while state.step < t.steps {
        kick();
        let lr = trainer.learning_rate(state.step);
        let stepped = trainer.step(&model, &train_task, state.step);
        state.step += 1;
        window_steps += 1;
        let stop_here = opts.stop_after == Some(state.step);
        let evaluate = state.step.is_multiple_of(t.eval_every) || state.step == t.steps || stop_here;
        if let Err(e) = stepped.and_then(|_| trainer.settle_if_due(evaluate)) {
            bar.abandon();
            if e.is::<step::Diverged>() {
                bail!(
                    "{e}: the run diverged; {}. Lower train.lr or raise train.warmup_steps.",
                    last_good(checkpointed)
                );
            }
            return Err(e.context(format!("step {}; {}", state.step, last_good(checkpointed))));
        }
        bar.set_position(state.step as u64);
        let rate = window_steps as f64 * tokens_per_step / window_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {:.4}  {rate:.0} tok/s", trainer.last_loss()));

        if evaluate {
            let tokens_per_s = window_steps as f64 * tokens_per_step / window_start.elapsed().as_secs_f64().max(1e-9);
            let peak_memory_bytes = peak_memory()?;
            // every worker evaluates its slice of the batches; the mean is the whole's
            let mut losses = [
                estimate_worker_loss(&model, &train_task, &trainer, 1, &kick)?,
                estimate_worker_loss(&model, &val_task, &trainer, 0, &kick)?,
            ];
            if let Some(g) = &group {
                g.all_reduce_mean(&mut losses)?;
            }
            kick();
            let [train_loss, val_loss] = losses;
            if rank > 0 {
                // rank 0 writes this step's checkpoint; the others wait for it, then go on
                if let Some(g) = &group {
                    g.checkpoint_written(checkpoint_patience)?;
                }
                checkpointed = state.step;
                peak_memory()?;
                window_start = Instant::now();
                window_steps = 0;
                if stop_here {
                    break;
                }
                continue;
            }
            if !(train_loss.is_finite() && val_loss.is_finite()) {
                bar.abandon();
                bail!(
                    "evaluation loss is not finite after step {}: the run diverged; {}",
                    state.step,
                    last_good(checkpointed)
                );
            }
            state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            let metrics = Metrics {
                step: state.step,
                train_loss,
                val_loss,
                val_bpb: nats_to_bits(tokens_per_byte.map_or(val_loss, |r| val_loss * r)),
                tokens_per_byte,
                tokens_per_s,
                elapsed_s: state.elapsed_s,
                lr,
                peak_memory_bytes,
            };
            // the line first: a crash between the two leaves a line past the checkpoint, which
            // resume drops and the resumed run writes again; the other order lost the line
            folder.append_metrics(&metrics)?;
            folder.save_checkpoint(&model, &trainer.opt, &state)?;
            if let Some(g) = &group {
                g.checkpoint_written(checkpoint_patience)?;
            }
            checkpointed = state.step;
            if verbose {
                // suspend() also prints when the bar is hidden (stderr not a terminal).
                bar.suspend(|| {
                    eprintln!(
                        "step {:>6}  train {:.4}  val {:.4} nats/{} ({:.4} bpb)  {:.0} tok/s{}  {:.1}s",
                        metrics.step,
                        train_loss,
                        val_loss,
                        if tokens_per_byte.is_some() { "token" } else { "byte" },
                        metrics.val_bpb,
                        tokens_per_s,
                        peak_memory_bytes
                            .map_or(String::new(), |b| format!("  peak {}B", crate::util::human(b as f64))),
                        metrics.elapsed_s
                    )
                });
            }
            history.push(metrics);
            // the next window's peak: training alone (not this evaluation nor the checkpoint)
            peak_memory()?;
            window_start = Instant::now();
            window_steps = 0;
            if stop_here {
                break;
            }
        }
    }
    bar.finish_and_clear();
    if rank > 0 {
        return Ok(TrainSummary { last: Metrics::default(), params: model.num_params(), history });
    }
    let last = history.last().cloned().context("no evaluation was run")?;
    Ok(TrainSummary { last, params: model.num_params(), history })
}

fn progress_bar(verbose: bool, len: u64, pos: u64) -> indicatif::ProgressBar {
    if !verbose {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}

/// How a worker's gradients meet the others', and the collective a split sequence's
/// layers exchange through: through rank 0 over TCP on the CPU ([`distributed::Group`]), by
/// NCCL between GPUs ([`nccl::NcclGroup`]).
pub fn exchange(
    group: std::sync::Arc<distributed::Group>,
    device: &Device,
) -> Result<(Box<dyn step::GradientSync>, crate::mixers::longnet::sequence_parallel::Split)> {
    match device {
        Device::Cpu => Ok((Box::new(group.clone()), std::sync::Arc::new(group))),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let nccl = std::sync::Arc::new(nccl::NcclGroup::connect(group, device, distributed::timeout()?)?);
            Ok((Box::new(nccl.clone()), std::sync::Arc::new(nccl)))
        }
        #[allow(unreachable_patterns)]
        _ => bail!("workers on {device:?}: this build exchanges between CPU workers or, with CUDA, through NCCL"),
    }
}
