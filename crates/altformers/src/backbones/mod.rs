//! Backbones: what maps token ids to logits. A backbone owns its whole shape (embeddings,
//! stacks, patching, heads) and offers the parallel form for training and the recurrent form
//! (`prefill`, then `step`) for generation, with an explicit state whose size it reports.
//!
//! Most architectures are a new sequence mixer in the default [`stack::Stack`] (embedding,
//! N pre-norm blocks of sequence mixer + channel mixer, final norm, head); a model whose
//! outer shape differs (MegaByte's patches, Hourglass's shortening, Reformer's reversible
//! pairs) is a backbone of its own. Either way the registry builds it from a
//! [`crate::config::ModelConfig`] and the [`Parts`] it names.

pub mod hourglass;
pub mod megabyte;
pub mod reversible;
pub mod stack;

use anyhow::Result as AnyResult;
use candle_core::{DType, Result, Tensor};

use crate::config::ModelConfig;
use crate::mixers::{MixerState, SequenceMixer};
use crate::params::ParamBuilder;
use crate::rng::Rng;

/// Reborrows an optional dropout setting (probability, random stream) for one more use.
pub(crate) fn again<'a>(d: &'a mut Option<(f64, &mut Rng)>) -> Option<(f64, &'a mut Rng)> {
    d.as_mut().map(|(p, rng)| (*p, &mut **rng))
}

/// An encoder (`causal` false) has no recurrent form: the error `prefill` and `step` give.
pub(crate) fn refuse_recurrence(causal: bool, architecture: &str) -> Result<()> {
    if !causal {
        candle_core::bail!(
            "`{architecture}` is an encoder (bidirectional: every position sees the whole sequence), so it has no recurrent form to prefill or step, and generates nothing"
        );
    }
    Ok(())
}

/// What [`Backbone::pooled_logits`] needs before pooling: an encoder, and a keep mask of the
/// tokens' shape.
pub(crate) fn check_pooling(causal: bool, architecture: &str, tokens: &Tensor, keep: &Tensor) -> Result<()> {
    if causal {
        candle_core::bail!("`{architecture}` is causal, not an encoder: read its last position instead of pooling");
    }
    if keep.dims() != tokens.dims() {
        candle_core::bail!("a keep mask of shape {:?} for tokens of shape {:?}", keep.dims(), tokens.dims());
    }
    Ok(())
}

/// Builds the sequence (or channel) mixer of layer `layer`, parameters under the builder.
pub type MixerFn = fn(&ModelConfig, usize, &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>>;

/// Builds a backbone from its configuration and the parts the registry resolved for it.
pub type BackboneFn = fn(&ModelConfig, &ParamBuilder, &Parts) -> AnyResult<Box<dyn Backbone>>;

/// What the registry resolves for a backbone from names in its configuration.
#[derive(Clone, Copy)]
pub struct Parts {
    /// The architecture's sequence mixer, where it has one per layer.
    pub mixer: Option<MixerFn>,
    /// `model.channel_mixer`, from the channel-mixer registry.
    pub channel_mixer: MixerFn,
    /// The mixer's recurrent form needs no fixed window (constant state, no positions).
    pub unbounded_context: bool,
    /// The registry's `causal`: false for an encoder (bidirectional mixers, no recurrent
    /// form, classified through [`Backbone::pooled_logits`]).
    pub causal: bool,
    /// How the token table and the output head start (the registry's `ends`).
    pub ends: Ends,
}

/// How a model's two ends start: the token table (`emb.weight`) and the untied head
/// (`head.weight`). An architecture picks it in the registry ([`crate::registry::Architecture::ends`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// GPT-2's: both N(0, 0.02).
    Gpt2,
    /// The official RWKV-4 trainers' (`RWKV_Init` in BlinkDL/RWKV-LM `RWKV-v4/src/model.py`,
    /// `generate_init_weight` in `RWKV-v4neo`): the table U(-1e-4, 1e-4) (v4neo's; v4 draws
    /// it orthogonal with entries of the same 1e-4 scale), so `ln0` starts from almost nothing
    /// and the embedding grows from its gradient; the head orthogonal with gain
    /// `0.5 max(1, sqrt(V / d))` (`sqrt(rows / cols)` where rows exceed columns, times 0.5).
    Rwkv4,
}

/// Scale of [`Ends::Rwkv4`]'s token table: U(-EMB, EMB).
pub const RWKV4_EMB: f64 = 1e-4;

impl Ends {
    /// The token table `[vocab, width]`, not decayed.
    pub fn table(self, pb: &ParamBuilder, vocab: usize, width: usize) -> AnyResult<Tensor> {
        match self {
            Ends::Gpt2 => pb.normal_no_decay("emb.weight", &[vocab, width], 0.02),
            Ends::Rwkv4 => pb.uniform_no_decay("emb.weight", &[vocab, width], -RWKV4_EMB, RWKV4_EMB),
        }
    }

    /// The head `[vocab, width]`, decayed as every matrix.
    pub fn head(self, pb: &ParamBuilder, vocab: usize, width: usize) -> AnyResult<Tensor> {
        match self {
            Ends::Gpt2 => pb.normal("head.weight", &[vocab, width], 0.02),
            Ends::Rwkv4 => {
                let gain = 0.5 * (vocab as f64 / width as f64).sqrt().max(1.0);
                pb.orthogonal("head.weight", vocab, width, gain, true)
            }
        }
    }
}

/// [`Ends::Gpt2`] whatever the configuration: the registry's `ends` of most architectures.
pub fn gpt2_ends(_: &ModelConfig) -> AnyResult<Ends> {
    Ok(Ends::Gpt2)
}

/// The recurrent state of a whole backbone: one [`MixerState`] per stateful part, in an
/// order the backbone chooses (the stack: mixer then channel mixer of each block).
#[derive(Clone, Debug, Default)]
pub struct ModelState {
    pub layers: Vec<MixerState>,
    /// Tokens consumed so far.
    pub pos: usize,
    /// `pos` as a one-element f32 tensor on the model's device, where the backbone's step
    /// reads a learned position table: it then reads its row there, not at a host offset, so
    /// the step stays replayable as a CUDA graph ([`crate::decoder`]).
    pub position: Option<Tensor>,
}

impl ModelState {
    /// Bytes the layers' states hold (what decoding keeps in memory per sequence batch).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(MixerState::bytes).sum()
    }

    /// Every tensor of the state: the layers' in order, then the position.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.layers.iter().flat_map(|l| &l.tensors).chain(&self.position)
    }

    /// [`Self::tensors`], mutable.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.layers.iter_mut().flat_map(|l| l.tensors.iter_mut()).chain(self.position.iter_mut())
    }

    /// Cuts the state off the autograd graph. Decoding never differentiates through it, and
    /// a state that still records its history (every step's activations back to the
    /// weights) would keep all of them alive: memory growing with every token.
    pub fn detach(&mut self) {
        for t in self.tensors_mut() {
            *t = t.detach();
        }
    }

    /// Whether any state tensor still records the operations that made it.
    pub fn tracks_graph(&self) -> bool {
        self.tensors().any(|t| t.track_op())
    }
}

pub trait Backbone: Send + Sync {
    /// Parallel form. `tokens: [B, T]` (u32) -> logits `[B, T, V]`. With `dropout`, the
    /// dropout the configuration asks for is applied (training); without, the backbone is
    /// deterministic (evaluation).
    fn forward(&self, tokens: &Tensor, dropout: Option<&mut Rng>) -> Result<Tensor>;

    /// Logits at chosen positions only: `rows` (u32, `[N]`) index the flattened `[B T]`
    /// positions of `tokens: [B, T]` -> `[N, V]` (no dropout). A loss scored at a few
    /// positions (the recall suite) then pays the head and the softmax for N rows, not B T.
    fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor>;

    /// Runs the prompt in parallel: its logits `[B, T, V]` and the state after it.
    fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)>;

    /// One token per sequence. `token: [B]` (u32) -> logits `[B, V]`, advancing `state`.
    fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor>;

    /// Whether [`Backbone::step`] is the same kernels on the same shapes at every position
    /// (see [`crate::mixers::SequenceMixer::static_step`]): replayable as a CUDA graph.
    fn static_step(&self) -> bool {
        false
    }

    /// Whether every dropout mask of the training form is laid out example by example (see
    /// [`crate::mixers::SequenceMixer::per_example_dropout`]).
    fn per_example_dropout(&self) -> bool {
        true
    }

    /// The longest window the backbone can attend over when generating, or `None` where its
    /// recurrence is unbounded.
    fn window(&self) -> Option<usize>;

    /// Runs the layers in `dtype` (bf16 for mixed precision) while parameters, norms,
    /// logits and the loss stay in the parameters' dtype.
    fn set_compute_dtype(&mut self, dtype: DType);

    /// An encoder's sequence classification (mean pooling): `tokens: [B, T]` padded to one
    /// length, `keep: [B, T]` 1 at real tokens and 0 at padding -> the head applied to the
    /// mean over real positions of the final-normed hidden states, `[B, V]`. The head being
    /// linear, that is the mean of the per-position logits: a task reads its classes from
    /// rows of it. With `dropout`, the training form. Only encoders have it.
    fn pooled_logits(&self, _tokens: &Tensor, _keep: &Tensor, _dropout: Option<&mut Rng>) -> Result<Tensor> {
        candle_core::bail!("this backbone is causal, not an encoder: it has no pooled form (read its last position)")
    }

    /// From now on [`Backbone::forward`] takes this device's slice of every sequence
    /// (positions `split.rank() T ..` of `world T`) and its mixers exchange what they need of
    /// the other slices through `split`: sequence parallelism (LongNet's). The stack of mixers
    /// that can ([`crate::mixers::SequenceMixer::split_sequence`]) does; the rest refuse.
    fn split_sequence(&mut self, _split: crate::mixers::longnet::sequence_parallel::Split) -> Result<()> {
        candle_core::bail!("this backbone cannot split a sequence across devices")
    }
}
