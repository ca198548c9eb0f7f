//! A model: a configuration, the backbone the registry builds from it, and its parameters.
//! Everything that trains, evaluates, generates or benchmarks holds one of these.

use anyhow::{bail, Result as AnyResult};
use candle_core::{DType, Device, Result, Tensor};

use crate::backbones::Backbone;
pub use crate::backbones::ModelState;
use crate::config::ModelConfig;
use crate::params::{ParamBuilder, ParamStore, StepClock};
use crate::rng::Rng;

pub struct Model {
    pub config: ModelConfig,
    backbone: Box<dyn Backbone>,
    pub params: ParamStore,
    device: Device,
    dtype: DType,
    /// The training step, shared with every part built for this model.
    clock: StepClock,
    /// The registry's `causal`: false for an encoder.
    causal: bool,
}

impl Model {
    /// Builds `config`'s architecture with freshly initialised weights (seeded), parameters
    /// in `dtype`.
    pub fn new(config: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> AnyResult<Self> {
        Self::build(config, ParamBuilder::new(seed, device, dtype))
    }

    /// [`Model::new`] for a model that never trains (generation, evaluation): its parameters
    /// are seen as plain tensors ([`ParamBuilder::frozen`]), so nothing records a gradient
    /// graph and a long prefill holds one layer's intermediates at a time. Weights load into
    /// it as into any model ([`Model::load_weights`]).
    pub fn for_inference(config: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> AnyResult<Self> {
        Self::build(config, ParamBuilder::new(seed, device, dtype).frozen())
    }

    /// A model that is only timed (`bench decode`): its random weights drawn on the device
    /// ([`ParamBuilder::for_timing`]), fast at billions of parameters, not reproducible.
    pub fn for_timing(config: &ModelConfig, device: &Device, dtype: DType) -> AnyResult<Self> {
        Self::build(config, ParamBuilder::for_timing(device, dtype))
    }

    fn build(config: &ModelConfig, pb: ParamBuilder) -> AnyResult<Self> {
        let (device, dtype) = (pb.device.clone(), pb.dtype);
        if device.is_cpu() {
            size::check_params(config, dtype)?;
        }
        let backbone = crate::registry::build(config, &pb)?;
        let clock = pb.clock.clone();
        let causal = crate::registry::find(&config.architecture)?.causal;
        Ok(Self {
            config: config.clone(),
            backbone,
            params: pb.into_store(),
            device: device.clone(),
            dtype,
            clock,
            causal,
        })
    }

    /// Tells the model which training step (counted from 0) runs next; evaluation after it
    /// sees the same step. Parts that follow a schedule read it (Performer redraws its random
    /// features every `model.options.redraw_every` steps); the rest ignore it.
    pub fn set_training_step(&self, step: usize) {
        self.clock.set(step);
    }

    /// The step last set by [`Model::set_training_step`] (0 for a fresh model).
    pub fn training_step(&self) -> usize {
        self.clock.peek()
    }

    /// Whether a part of the model has read the training step in a forward pass so far (its
    /// computation follows a schedule: Performer's redraws): a captured training step could
    /// not replay it.
    pub fn follows_training_step(&self) -> bool {
        self.clock.followed()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the layers in `dtype` (e.g. bf16) while keeping the parameters in their own
    /// (f32 master weights): mixed precision.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.backbone.set_compute_dtype(dtype);
        self
    }

    /// Sequence parallelism: from now on [`Model::forward`] takes this device's slice of the
    /// positions (`split.rank() T ..`) and the mixers exchange through `split` what they need
    /// of the others' ([`crate::backbones::Backbone::split_sequence`]; LongNet's).
    pub fn split_sequence(&mut self, split: crate::mixers::longnet::sequence_parallel::Split) -> Result<()> {
        self.backbone.split_sequence(split).map_err(|e| {
            candle_core::Error::Msg(format!("`{}` cannot be trained sequence-parallel: {e}", self.config.architecture))
        })
    }

    /// A causal model (a decoder); false for an encoder, which sees the whole sequence, has
    /// no recurrent form and classifies through [`Model::pooled_logits`].
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// An encoder's logits of the mean over the real positions: `tokens: [B, T]`, `keep:
    /// [B, T]` (1 real, 0 padding) -> `[B, V]` ([`Backbone::pooled_logits`]).
    pub fn pooled_logits(&self, tokens: &Tensor, keep: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        self.backbone.pooled_logits(tokens, keep, dropout_rng)
    }

    pub fn num_params(&self) -> usize {
        self.params.num_elements()
    }

    /// The longest window the model can attend over when generating, or `None` where the
    /// recurrence is unbounded.
    pub fn window(&self) -> Option<usize> {
        self.backbone.window()
    }

    /// Parallel form. `tokens: [B, T]` (u32) -> logits `[B, T, V]`. With `dropout_rng`,
    /// dropout is applied (training); without, the model is deterministic (evaluation).
    pub fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        self.backbone.forward(tokens, dropout_rng)
    }

    /// Logits at chosen positions: `rows` (u32, `[N]`) index the flattened `[B T]` positions
    /// of `tokens: [B, T]` -> `[N, V]` (no dropout).
    pub fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        self.backbone.forward_at(tokens, rows)
    }

    /// Runs the prompt in parallel and returns its logits `[B, T, V]` and the state after it.
    pub fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        self.backbone.prefill(tokens)
    }

    /// One token per sequence. `token: [B]` (u32) -> logits `[B, V]`.
    pub fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        self.backbone.step(token, state)
    }

    /// Whether every dropout mask is laid out example by example, so that data-parallel
    /// workers each draw their part of the whole batch's.
    pub fn per_example_dropout(&self) -> bool {
        self.backbone.per_example_dropout()
    }

    /// Whether [`Model::step`] can be captured once as a CUDA graph and replayed for every
    /// token ([`crate::decoder`]).
    pub fn static_step(&self) -> bool {
        self.backbone.static_step()
    }

    /// Mean next-token cross-entropy (nats) of `logits: [B, T, V]` against `targets: [B, T]`.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        crate::nn::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
    }

    /// Loads weights written by [`ParamStore::save`], checking every name and shape.
    pub fn load_weights(&self, path: &std::path::Path) -> AnyResult<()> {
        if !path.exists() {
            bail!("no weights at {}", path.display());
        }
        self.params.load(path)
    }
}

/// What a configuration needs, estimated before anything is allocated: a setting too large
/// (`model.width=100000`: 120 GB in one matrix; `model.depth=100000000`) is refused with the
/// figure, where the allocator would abort the process without a word. Host memory only: a
/// GPU allocation that fails is an error candle returns, not an abort.
pub mod size {
    use anyhow::{bail, Result};
    use candle_core::DType;

    use crate::config::ModelConfig;
    use crate::util::human;

    /// Bytes each layer costs besides its values: its tensors' headers, names and storage.
    const PER_LAYER_OVERHEAD: f64 = 16e3;

    /// The parameter count of a Transformer of `config`'s shape: `(4 + 2 ffn_mult) d^2` per
    /// layer (attention's four projections, the MLP) and `2 V d` (embedding, head). Every
    /// architecture here is within a small factor of it at one width.
    pub fn estimated_params(config: &ModelConfig) -> f64 {
        let (d, depth) = (config.width as f64, config.depth as f64);
        depth * (4.0 + 2.0 * config.ffn_mult) * d * d + 2.0 * config.vocab as f64 * d
    }

    /// Host memory the system can still give (Linux's MemAvailable), or `None` where unknown.
    pub fn available_ram() -> Option<f64> {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
    }

    /// Refuses `needed` bytes (for `what`) beyond the host's available memory.
    pub fn check(needed: f64, what: impl FnOnce() -> String) -> Result<()> {
        check_or_lower(needed, what, "model.width, model.depth or the batch")
    }

    /// [`check`], its message naming what to `lower`.
    pub fn check_or_lower(needed: f64, what: impl FnOnce() -> String, lower: &str) -> Result<()> {
        match available_ram() {
            Some(free) if needed > free => bail!(
                "{} needs about {}B of memory; {}B are available: lower {lower}",
                what(),
                human(needed),
                human(free)
            ),
            _ => Ok(()),
        }
    }

    /// Tensors smaller than this are not checked one by one: none of them alone can exhaust
    /// a machine (and reading the free memory for each would slow every model's construction).
    const TENSOR_CHECKED_FROM: f64 = 256.0 * 1024.0 * 1024.0;

    /// The element count of a tensor `what` of shape `dims` whose values take
    /// `bytes_per_element` bytes while it is built, refused before anything is allocated where
    /// the count overflows or the bytes exceed the available memory. An option that sizes one
    /// tensor (`model.options.filter_width=10^12`) is beyond [`check_params`]' estimate, and
    /// the allocator would abort the process without a word.
    pub fn check_tensor(what: impl Fn() -> String, dims: &[usize], bytes_per_element: usize) -> Result<usize> {
        let Some(n) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
            bail!("{} of shape {dims:?} has more elements than this machine can address", what());
        };
        let bytes = dims.iter().map(|&d| d as f64).product::<f64>() * bytes_per_element as f64;
        if bytes >= TENSOR_CHECKED_FROM {
            check_or_lower(
                bytes,
                || format!("{} of shape {dims:?}", what()),
                "the setting that sizes it (model.options.*, model.width, model.context, ...)",
            )?;
        }
        Ok(n)
    }

    /// The parameters of `config` in `dtype`.
    pub fn check_params(config: &ModelConfig, dtype: DType) -> Result<()> {
        let n = estimated_params(config);
        let bytes = n * dtype.size_in_bytes() as f64 + config.depth as f64 * PER_LAYER_OVERHEAD;
        check(bytes, || {
            format!(
                "model.width {} and model.depth {}: about {} parameters, which",
                config.width,
                config.depth,
                human(n)
            )
        })
    }

    /// Training `config` with batches of `batch`: the parameters, their gradients and AdamW's
    /// two moments (f32), and each layer's activations kept for the backward pass (one mixer
    /// layer's forward peak, [`crate::complexity::Complexity::memory`], per layer).
    pub fn check_training(config: &ModelConfig, batch: usize, activation_dtype: DType) -> Result<()> {
        let arch = crate::registry::find(&config.architecture)?;
        let shape =
            crate::complexity::CostShape { batch, seq: config.context, width: config.width, heads: config.heads };
        let activations =
            config.depth as f64 * (arch.complexity.memory)(&shape) * activation_dtype.size_in_bytes() as f64;
        let params = 4.0 * 4.0 * estimated_params(config);
        check(params + activations, || {
            format!(
                "training (parameters, gradients and AdamW state {}B; activations of a batch of {batch} x {} bytes {}B)",
                human(params),
                config.context,
                human(activations)
            )
        })
    }

    /// Generating `samples` sequences of `len` tokens (prompt included): their ids (host
    /// memory always) and, where the model runs on the CPU, one layer's forward peak over the
    /// batch at the model's context (inference keeps no layer's activations). A `--batch` of
    /// 10^11 aborted in the allocator.
    pub fn check_generation(config: &ModelConfig, samples: usize, len: usize, dtype: DType, cpu: bool) -> Result<()> {
        let arch = crate::registry::find(&config.architecture)?;
        let shape = crate::complexity::CostShape {
            batch: samples,
            seq: len.min(config.context),
            width: config.width,
            heads: config.heads,
        };
        let activations = if cpu { (arch.complexity.memory)(&shape) * dtype.size_in_bytes() as f64 } else { 0.0 };
        let ids = samples as f64 * len as f64 * 4.0;
        check_or_lower(
            activations + ids,
            || {
                format!(
                    "generating {samples} x {len} tokens (ids {}B, activations {}B)",
                    human(ids),
                    human(activations)
                )
            },
            "--batch or --tokens",
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_model_or_a_run_too_large_for_memory_is_refused_with_its_size() -> Result<()> {
            let Some(free) = available_ram() else { return Ok(()) };
            let huge = |sets: &[&str]| crate::testing::tiny_config("transformer", sets);
            for sets in [&["model.width=100000", "model.heads=2"][..], &["model.depth=100000000"]] {
                let cfg = huge(sets)?;
                let err = crate::model::Model::new(&cfg, 0, &candle_core::Device::Cpu, DType::F32)
                    .err()
                    .expect("refused")
                    .to_string();
                assert!(err.contains("needs about") && err.contains("are available"), "{err}");
            }
            // a batch whose activations cannot fit, on a model that does
            let cfg = huge(&["model.context=4096"])?;
            let batch = (free / (4096.0 * 4096.0)) as usize + 1;
            let err = check_training(&cfg, batch, DType::F32).unwrap_err().to_string();
            assert!(err.contains("activations of a batch"), "{err}");
            check_training(&cfg, 1, DType::F32)?;
            Ok(())
        }
    }
}
