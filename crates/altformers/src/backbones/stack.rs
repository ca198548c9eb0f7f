//! The default backbone: embedding (+ learned positions), N blocks of
//! `x + mixer(norm(x))` then `x + channel_mixer(norm(x))`, final norm, head. A model that is
//! only a new sequence mixer is this stack around it. Its pieces ([`Embedding`], [`Layers`],
//! [`Head`]) are what the other backbones (MegaByte, Hourglass) are made of too. With
//! `model.shared_ffn` (One Wide FFN, arXiv 2309.01826) every block uses one channel mixer,
//! `shared_ffn.*`, `depth` times as wide.
//!
//! Parameter names follow the RWKV-4 checkpoints (`emb.weight`, `blocks.N.ln1.weight`,
//! `blocks.N.att.*`, `blocks.N.ln2.weight`, `blocks.N.ffn.*`, `ln_out.weight`, `head.weight`)
//! so that official weights load where the architecture matches.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result as AnyResult};
use candle_core::{DType, IndexOp, Result, Tensor};

use super::{again, Backbone, Ends, MixerFn, ModelState, Parts};
use crate::channel_mixers::{one_wide, Shared};
use crate::config::{ModelConfig, Position};
use crate::mixers::longnet::sequence_parallel::Split;
use crate::mixers::{MixerState, SequenceMixer};
use crate::nn::{dropout, residual, LayerNorm};
use crate::ops::segments;
use crate::params::ParamBuilder;
use crate::rng::Rng;

/// `x + att(ln1(x))`, then `x + ffn(ln2(x))`.
pub struct Block {
    pub ln1: LayerNorm,
    pub att: Box<dyn SequenceMixer>,
    pub ln2: LayerNorm,
    pub ffn: Box<dyn SequenceMixer>,
}

impl Block {
    /// Block `layer` of `config` from `mixer` and `channel_mixer`, parameters under `pb`
    /// (`blocks.N` in a model).
    pub fn new(
        config: &ModelConfig,
        layer: usize,
        pb: &ParamBuilder,
        mixer: MixerFn,
        channel_mixer: MixerFn,
    ) -> AnyResult<Self> {
        Self::with_ffn(config, layer, pb, mixer, || channel_mixer(config, layer, &pb.pp("ffn")))
    }

    /// Block `layer` whose channel mixer `ffn` makes, called after the sequence mixer is
    /// built: parameters are drawn in the same order whatever the channel mixer is.
    fn with_ffn(
        config: &ModelConfig,
        layer: usize,
        pb: &ParamBuilder,
        mixer: MixerFn,
        ffn: impl FnOnce() -> AnyResult<Box<dyn SequenceMixer>>,
    ) -> AnyResult<Self> {
        let d = config.width;
        Ok(Block {
            ln1: LayerNorm::new(pb, "ln1", d, config.bias)?,
            att: mixer(config, layer, &pb.pp("att"))?,
            ln2: LayerNorm::new(pb, "ln2", d, config.bias)?,
            ffn: ffn()?,
        })
    }

    /// `x: [B, T, D] -> [B, T, D]`, without dropout.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = residual(x, &self.att.forward(&self.ln1.forward(x)?)?)?;
        residual(&x, &self.ffn.forward(&self.ln2.forward(&x)?)?)
    }

    /// With GPT-2's dropout sites: each residual branch, and inside the mixer (attention
    /// probabilities), probability `p`.
    fn forward_train(&self, x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
        let x = residual(x, &dropout(&self.att.forward_train(&self.ln1.forward(x)?, p, rng)?, p, rng)?)?;
        residual(&x, &dropout(&self.ffn.forward(&self.ln2.forward(&x)?)?, p, rng)?)
    }

    /// The encoder form over padded sequences (`keep: [B, T]`, see
    /// [`SequenceMixer::forward_padded`]): the sequence mixer takes the mask; the channel
    /// mixer sees each position alone (RWKV's token shift sees the one before, never a pad
    /// for a real token when padding comes last). With `dropout`, GPT-2's sites.
    fn encode(&self, x: &Tensor, keep: &Tensor, mut dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let a = self.att.forward_padded(&self.ln1.forward(x)?, keep, again(&mut dropout))?;
        let x = (x + residual_dropout(a, &mut dropout)?)?;
        let f = self.ffn.forward(&self.ln2.forward(&x)?)?;
        &x + residual_dropout(f, &mut dropout)?
    }

    /// The parallel form and the state after it: `[mixer's, channel mixer's]`.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, [MixerState; 2])> {
        let (a, sa) = self.att.prefill(&self.ln1.forward(x)?)?;
        let x = (x + a)?;
        let (f, sf) = self.ffn.prefill(&self.ln2.forward(&x)?)?;
        Ok(((&x + f)?, [sa, sf]))
    }

    fn step(&self, x: &Tensor, state: &mut [MixerState]) -> Result<Tensor> {
        let [sa, sf] = state else { candle_core::bail!("a block's state holds two entries") };
        let x = (x + self.att.step(&self.ln1.forward(x)?, sa)?)?;
        &x + self.ffn.step(&self.ln2.forward(&x)?, sf)?
    }
}

/// `x` after dropout, where there is any.
fn residual_dropout(x: Tensor, d: &mut Option<(f64, &mut Rng)>) -> Result<Tensor> {
    match d {
        Some((p, rng)) => dropout(&x, *p, rng),
        None => Ok(x),
    }
}

/// Blocks run one after the other, each at the same width. Their recurrent state is two
/// [`MixerState`]s per block (mixer, then channel mixer), [`Layers::state_len`] in all.
pub struct Layers {
    pub blocks: Vec<Block>,
}

impl Layers {
    /// Blocks `blocks.{i}` for every `i` in `layers` (their index in the whole model: the
    /// mixers' initialisation may depend on it), under `pb`.
    pub fn new(
        config: &ModelConfig,
        pb: &ParamBuilder,
        layers: Range<usize>,
        mixer: MixerFn,
        channel_mixer: MixerFn,
    ) -> AnyResult<Self> {
        let blocks = layers
            .map(|i| Block::new(config, i, &pb.pp(format!("blocks.{i}")), mixer, channel_mixer))
            .collect::<AnyResult<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// Like [`Layers::new`], every block using the one channel mixer `ffn` (One Wide FFN).
    pub fn sharing(
        config: &ModelConfig,
        pb: &ParamBuilder,
        layers: Range<usize>,
        mixer: MixerFn,
        ffn: &Arc<dyn SequenceMixer>,
    ) -> AnyResult<Self> {
        let blocks = layers
            .map(|i| {
                let shared = || Ok(Box::new(Shared(ffn.clone())) as Box<dyn SequenceMixer>);
                Block::with_ffn(config, i, &pb.pp(format!("blocks.{i}")), mixer, shared)
            })
            .collect::<AnyResult<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    pub fn state_len(&self) -> usize {
        2 * self.blocks.len()
    }

    /// `x: [B, T, D] -> [B, T, D]`; with `dropout = Some((p, rng))`, the training form. Each
    /// block's output is a place a backward in segments may cut ([`segments::boundary`]).
    pub fn forward(&self, x: &Tensor, mut dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let mut x = x.clone();
        let n = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            x = match &mut dropout {
                Some((p, rng)) => block.forward_train(&x, *p, rng)?,
                None => block.forward(&x)?,
            };
            x = segments::boundary(x, i, n)?;
        }
        Ok(x)
    }

    /// The encoder form over padded sequences ([`Block::encode`]).
    pub fn encode(&self, x: &Tensor, keep: &Tensor, mut dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.encode(&x, keep, again(&mut dropout))?;
        }
        Ok(x)
    }

    /// The parallel form, and the state after it ([`Layers::state_len`] entries).
    pub fn prefill(&self, x: &Tensor) -> Result<(Tensor, Vec<MixerState>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.state_len());
        for block in &self.blocks {
            let (y, s) = block.prefill(&x)?;
            x = y;
            states.extend(s);
        }
        Ok((x, states))
    }

    /// One position, `x: [B, 1, D]`; `state` holds [`Layers::state_len`] entries (default
    /// ones before the first step).
    pub fn step(&self, x: &Tensor, state: &mut [MixerState]) -> Result<Tensor> {
        if state.len() != self.state_len() {
            candle_core::bail!("a state of {} entries for {} blocks", state.len(), self.blocks.len());
        }
        let mut x = x.clone();
        for (block, pair) in self.blocks.iter().zip(state.chunks_mut(2)) {
            x = block.step(&x, pair)?;
        }
        Ok(x)
    }
}

/// The token table (`emb.weight`, `[V, D]`), learned positions (`pos_emb.weight`) where the
/// configuration asks for them, and an optional norm right after (RWKV's `ln0`).
pub struct Embedding {
    pub table: Tensor,
    positions: Option<Tensor>,
    norm: Option<LayerNorm>,
}

impl Embedding {
    /// `positions`: the length of a learned position table, or `None` for none; `ends`: how
    /// the table starts.
    pub fn new(
        pb: &ParamBuilder,
        vocab: usize,
        width: usize,
        positions: Option<usize>,
        norm: Option<LayerNorm>,
        ends: Ends,
    ) -> AnyResult<Self> {
        let table = ends.table(pb, vocab, width)?;
        let positions = positions.map(|n| pb.normal_no_decay("pos_emb.weight", &[n, width], 0.02)).transpose()?;
        Ok(Self { table, positions, norm })
    }

    pub fn has_positions(&self) -> bool {
        self.positions.is_some()
    }

    /// `tokens: [B, T]` at positions `offset..` -> `[B, T, D]` in the parameters' dtype.
    pub fn forward(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        let x = self.tokens(tokens)?;
        match &self.positions {
            Some(p) => {
                self.check_position(offset + tokens.dim(1)?)?;
                x.broadcast_add(&p.narrow(0, offset, tokens.dim(1)?)?)
            }
            None => Ok(x),
        }
    }

    /// [`Embedding::forward`] in `dtype` (the blocks' activations): on CUDA, for an f32 table
    /// without a norm, one fused pass each way (`kernels::gather::embed`: the gather, the
    /// position add and the cast).
    pub fn forward_as(&self, tokens: &Tensor, offset: usize, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.norm.is_none() && crate::kernels::gather::supports_embed(&self.table, tokens, dtype) {
            let (b, t) = tokens.dims2()?;
            let positions = match &self.positions {
                Some(p) => {
                    self.check_position(offset + t)?;
                    Some(p.narrow(0, offset, t)?)
                }
                None => None,
            };
            let x = crate::kernels::gather::embed(&self.table, positions.as_ref(), tokens, dtype)?;
            return x.reshape((b, t, self.table.dim(1)?));
        }
        self.forward(tokens, offset)?.to_dtype(dtype)
    }

    /// One token per sequence, `tokens: [B, 1]`, at the position `position` holds (a
    /// one-element f32 tensor on the device, `host` the same number on the host, checked
    /// against the table) -> `[B, 1, D]`: the row is gathered on the device.
    pub fn forward_at(&self, tokens: &Tensor, position: &Tensor, host: usize) -> Result<Tensor> {
        let x = self.tokens(tokens)?;
        match &self.positions {
            Some(p) => {
                self.check_position(host + 1)?;
                x.broadcast_add(&p.index_select(&position.to_dtype(DType::U32)?.reshape(1)?, 0)?)
            }
            None => Ok(x),
        }
    }

    /// The token rows (normalised where the embedding has a norm), `[B, T, D]`.
    fn tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let width = self.table.dim(1)?;
        let x = crate::nn::gather_rows(&self.table, tokens)?.reshape((b, t, width))?;
        match &self.norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    /// Refuses positions up to `end` (exclusive) beyond the learned table.
    fn check_position(&self, end: usize) -> Result<()> {
        let n = self.positions.as_ref().map_or(Ok(usize::MAX), |p| p.dim(0))?;
        if end > n {
            candle_core::bail!("position {} is beyond the learned position table ({n} positions)", end - 1);
        }
        Ok(())
    }
}

/// The final norm (`ln_out`) and the output projection (`head.weight`, or the embedding
/// table when tied).
pub struct Head {
    norm: LayerNorm,
    weight: Option<Tensor>,
}

impl Head {
    /// `tied`: use the embedding table passed to [`Head::forward`] instead of a weight;
    /// `ends`: how an untied weight starts.
    pub fn new(pb: &ParamBuilder, vocab: usize, width: usize, bias: bool, tied: bool, ends: Ends) -> AnyResult<Self> {
        let norm = LayerNorm::new(pb, "ln_out", width, bias)?;
        let weight = if tied { None } else { Some(ends.head(pb, vocab, width)?) };
        Ok(Self { norm, weight })
    }

    /// `x: [B, T, D]` (any dtype) -> logits `[B, T, V]` in `table`'s dtype. The norm and the
    /// product run in `x`'s dtype, as every block's do (bf16 activations against the f32
    /// weight under mixed precision, as autocast runs a head; in f32 the head's product and
    /// the casts around it took about 0.7 ms of a GPT-2-small step on the H200); the logits
    /// are then cast for the loss.
    pub fn forward(&self, x: &Tensor, table: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        let head = self.weight.as_ref().unwrap_or(table);
        crate::nn::Linear::project(&x, head)?.to_dtype(table.dtype())
    }

    /// Mean pooling: the head applied to the mean of the normed `x: [B, T, D]` over the
    /// positions where `keep: [B, T]` is 1 -> `[B, V]` in `table`'s dtype. Every sequence
    /// must keep at least one position.
    pub fn pooled(&self, x: &Tensor, keep: &Tensor, table: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(&x.to_dtype(table.dtype())?)?;
        let keep = keep.to_dtype(table.dtype())?;
        let counts = keep.sum_keepdim(1)?; // [B, 1]
        let least = counts.min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if least < 1.0 {
            candle_core::bail!("mean pooling over a sequence with no real position (a keep mask row of zeros)");
        }
        let weights = keep.broadcast_div(&counts)?.unsqueeze(2)?; // [B, T, 1]
        let pooled = x.broadcast_mul(&weights)?.sum(1)?; // [B, D]
        let head = self.weight.as_ref().unwrap_or(table);
        pooled.matmul(&head.t()?)
    }

    /// Logits at rows `rows` (u32) of the flattened `[B T]` positions of `x: [B, T, D]`: `[N, V]`.
    pub fn forward_at(&self, x: &Tensor, rows: &Tensor, table: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        self.forward(&crate::nn::gather_rows(&x.reshape((b * t, d))?, rows)?.unsqueeze(0)?, table)?.squeeze(0)
    }
}

pub struct Stack {
    /// The registry entry (error messages name it).
    architecture: String,
    /// False for an encoder: bidirectional mixers, no recurrent form, a pooled form.
    causal: bool,
    context: usize,
    dropout: f64,
    embedding: Embedding,
    layers: Layers,
    head: Head,
    unbounded_context: bool,
    /// Dtype of the activations inside the blocks (bf16 for mixed precision on a GPU);
    /// parameters, norms, logits and the loss stay in the parameters' dtype.
    compute_dtype: DType,
    /// Set when the sequence is split across devices ([`Backbone::split_sequence`]).
    split: Option<Split>,
}

/// The stack around `parts.mixer` ([`super::BackboneFn`]).
pub fn build(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts) -> AnyResult<Box<dyn Backbone>> {
    Ok(Box::new(Stack::new(config, pb, parts, false)?))
}

/// RWKV-4's stack: `ln0` after the embedding where its options ask for it.
pub fn build_rwkv4(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts) -> AnyResult<Box<dyn Backbone>> {
    let o: crate::mixers::rwkv4::Rwkv4Options = config.options()?;
    Ok(Box::new(Stack::new(config, pb, parts, o.embed_norm)?))
}

/// `config`'s token embedding: learned positions where `model.position` asks for them, and
/// with `norm`, a layer norm after it (stored as `blocks.0.ln0`, RWKV-4's name); the table
/// started as `ends` says.
pub fn embedding(config: &ModelConfig, pb: &ParamBuilder, norm: bool, ends: Ends) -> AnyResult<Embedding> {
    let (v, d) = (config.vocab, config.width);
    let positions = (config.position == Position::Learned).then_some(config.context);
    let norm = if norm { Some(LayerNorm::new(&pb.pp("blocks.0"), "ln0", d, config.bias)?) } else { None };
    Embedding::new(pb, v, d, positions, norm, ends)
}

impl Stack {
    /// With `embed_norm`, a layer norm follows the embedding (RWKV-4).
    pub fn new(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts, embed_norm: bool) -> AnyResult<Self> {
        let mixer = parts.mixer.with_context(|| format!("`{}` has no sequence mixer to stack", config.architecture))?;
        let embedding = embedding(config, pb, embed_norm, parts.ends)?;
        let layers = if config.shared_ffn {
            // One Wide FFN: one channel mixer (`shared_ffn.*`) for every block.
            let ffn: Arc<dyn SequenceMixer> = (parts.channel_mixer)(&one_wide(config), 0, &pb.pp("shared_ffn"))?.into();
            Layers::sharing(config, pb, 0..config.depth, mixer, &ffn)?
        } else {
            Layers::new(config, pb, 0..config.depth, mixer, parts.channel_mixer)?
        };
        Ok(Self {
            architecture: config.architecture.clone(),
            causal: parts.causal,
            context: config.context,
            dropout: config.dropout,
            embedding,
            layers,
            head: Head::new(pb, config.vocab, config.width, config.bias, config.tie_embeddings, parts.ends)?,
            unbounded_context: parts.unbounded_context,
            compute_dtype: pb.dtype,
            split: None,
        })
    }

    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        self.embedding.forward_as(tokens, offset, self.compute_dtype)
    }

    /// The parallel form's first position: 0, or where this device's slice starts when the
    /// sequence is split (every device holds as many positions).
    fn first_position(&self, tokens: &Tensor) -> Result<usize> {
        self.split.as_ref().map_or(Ok(0), |s| tokens.dim(1).map(|t| s.rank() * t))
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.head.forward(x, &self.embedding.table)
    }
}

impl Backbone for Stack {
    fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let p = self.dropout;
        let x = self.embed(tokens, self.first_position(tokens)?)?;
        let x = match dropout_rng.filter(|_| p > 0.0) {
            // GPT-2's dropout sites: the embedding, and each block's (see Block::forward_train).
            Some(rng) => {
                let x = dropout(&x, p, rng)?;
                self.layers.forward(&x, Some((p, rng)))?
            }
            None => self.layers.forward(&x, None)?,
        };
        self.logits(&x)
    }

    fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let x = self.layers.forward(&self.embed(tokens, self.first_position(tokens)?)?, None)?;
        self.head.forward_at(&x, rows, &self.embedding.table)
    }

    fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        super::refuse_recurrence(self.causal, &self.architecture)?;
        let (x, layers) = self.layers.prefill(&self.embed(tokens, 0)?)?;
        let t = tokens.dim(1)?;
        let position = self.embedding.has_positions().then(|| Tensor::new(&[t as f32], tokens.device())).transpose()?;
        let mut state = ModelState { layers, pos: t, position };
        state.detach();
        Ok((self.logits(&x)?, state))
    }

    fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        super::refuse_recurrence(self.causal, &self.architecture)?;
        let b = token.dim(0)?;
        let token = token.reshape((b, 1))?;
        let x = if self.embedding.has_positions() {
            // the position's row read at a device position, so the step is replayable
            let position = crate::mixers::device_position(state.position.as_ref(), state.pos, token.device())?;
            let x = self.embedding.forward_at(&token, &position, state.pos)?.to_dtype(self.compute_dtype)?;
            state.position = Some((position + 1.0)?);
            x
        } else {
            self.embed(&token, state.pos)?
        };
        if state.layers.is_empty() {
            state.layers = vec![Default::default(); self.layers.state_len()];
        }
        let x = self.layers.step(&x, &mut state.layers)?;
        state.pos += 1;
        state.detach();
        self.logits(&x)?.i((.., 0, ..))
    }

    fn per_example_dropout(&self) -> bool {
        self.layers.blocks.iter().all(|b| b.att.per_example_dropout() && b.ffn.per_example_dropout())
    }

    /// Every mixer's step static (RoPE and the like read the position in their mixers, which
    /// then say no); learned positions are read at the state's device position.
    fn static_step(&self) -> bool {
        self.causal && self.layers.blocks.iter().all(|b| b.att.static_step() && b.ffn.static_step())
    }

    fn window(&self) -> Option<usize> {
        if self.unbounded_context && !self.embedding.has_positions() {
            None
        } else {
            Some(self.context)
        }
    }

    fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    fn split_sequence(&mut self, split: Split) -> Result<()> {
        if !self.causal {
            candle_core::bail!("it is an encoder: sequence parallelism splits causal models");
        }
        for block in &self.layers.blocks {
            block.att.split_sequence(&split)?;
            block.ffn.split_sequence(&split)?;
        }
        self.split = Some(split);
        Ok(())
    }

    fn pooled_logits(&self, tokens: &Tensor, keep: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        super::check_pooling(self.causal, &self.architecture, tokens, keep)?;
        let p = self.dropout;
        let x = self.embed(tokens, 0)?;
        let x = match dropout_rng.filter(|_| p > 0.0) {
            Some(rng) => {
                let x = dropout(&x, p, rng)?;
                self.layers.encode(&x, keep, Some((p, rng)))?
            }
            None => self.layers.encode(&x, keep, None)?,
        };
        self.head.pooled(&x, keep, &self.embedding.table)
    }
}
