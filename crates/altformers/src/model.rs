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
        let pb = ParamBuilder::new(seed, device, dtype);
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
        self.clock.get()
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

    /// Mean next-token cross-entropy (nats) of `logits: [B, T, V]` against `targets: [B, T]`.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
    }

    /// Loads weights written by [`ParamStore::save`], checking every name and shape.
    pub fn load_weights(&self, path: &std::path::Path) -> AnyResult<()> {
        if !path.exists() {
            bail!("no weights at {}", path.display());
        }
        self.params.load(path)
    }
}
