//! The default backbone: embedding (+ learned positions), N blocks of
//! `x + mixer(norm(x))` then `x + channel_mixer(norm(x))`, final norm, head. A model that is
//! only a new sequence mixer is this stack around it. With `model.shared_ffn` (One Wide FFN,
//! arXiv 2309.01826) every block uses one channel mixer, `shared_ffn.*`, `depth` times as wide.
//!
//! Parameter names follow the RWKV-4 checkpoints (`emb.weight`, `blocks.N.ln1.weight`,
//! `blocks.N.att.*`, `blocks.N.ln2.weight`, `blocks.N.ffn.*`, `ln_out.weight`, `head.weight`)
//! so that official weights load where the architecture matches.

use std::sync::Arc;

use anyhow::{Context, Result as AnyResult};
use candle_core::{DType, IndexOp, Result, Tensor};

use super::{Backbone, MixerFn, ModelState, Parts};
use crate::channel_mixers::{one_wide, Shared};
use crate::config::{ModelConfig, Position};
use crate::mixers::SequenceMixer;
use crate::nn::{dropout, LayerNorm};
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
        let x = (x + self.att.forward(&self.ln1.forward(x)?)?)?;
        &x + self.ffn.forward(&self.ln2.forward(&x)?)?
    }

    /// With GPT-2's dropout sites: each residual branch, and inside the mixer (attention
    /// probabilities), probability `p`.
    fn forward_train(&self, x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
        let x = (x + dropout(&self.att.forward_train(&self.ln1.forward(x)?, p, rng)?, p, rng)?)?;
        &x + dropout(&self.ffn.forward(&self.ln2.forward(&x)?)?, p, rng)?
    }
}

pub struct Stack {
    width: usize,
    context: usize,
    dropout: f64,
    emb: Tensor,
    pos_emb: Option<Tensor>,
    /// A layer norm right after the embedding (RWKV's `ln0`, stored as `blocks.0.ln0`).
    ln0: Option<LayerNorm>,
    blocks: Vec<Block>,
    ln_out: LayerNorm,
    /// `None` when tied to the embedding.
    head: Option<Tensor>,
    unbounded_context: bool,
    /// Dtype of the activations inside the blocks (bf16 for mixed precision on a GPU);
    /// parameters, norms, logits and the loss stay in the parameters' dtype.
    compute_dtype: DType,
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

impl Stack {
    /// With `embed_norm`, a layer norm follows the embedding (RWKV-4).
    pub fn new(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts, embed_norm: bool) -> AnyResult<Self> {
        let mixer = parts.mixer.with_context(|| format!("`{}` has no sequence mixer to stack", config.architecture))?;
        let (v, d) = (config.vocab, config.width);
        let emb = pb.normal_no_decay("emb.weight", &[v, d], 0.02)?;
        let pos_emb = match config.position {
            Position::Learned => Some(pb.normal_no_decay("pos_emb.weight", &[config.context, d], 0.02)?),
            _ => None,
        };
        let ln0 = if embed_norm { Some(LayerNorm::new(&pb.pp("blocks.0"), "ln0", d, config.bias)?) } else { None };
        // One Wide FFN: one channel mixer (`shared_ffn.*`) for every block.
        let shared: Option<Arc<dyn SequenceMixer>> = match config.shared_ffn {
            true => Some((parts.channel_mixer)(&one_wide(config), 0, &pb.pp("shared_ffn"))?.into()),
            false => None,
        };
        let blocks = (0..config.depth)
            .map(|i| {
                let bp = pb.pp(format!("blocks.{i}"));
                match &shared {
                    Some(ffn) => Block::with_ffn(config, i, &bp, mixer, || Ok(Box::new(Shared(ffn.clone())) as Box<_>)),
                    None => Block::new(config, i, &bp, mixer, parts.channel_mixer),
                }
            })
            .collect::<AnyResult<Vec<_>>>()?;
        let ln_out = LayerNorm::new(pb, "ln_out", d, config.bias)?;
        let head = if config.tie_embeddings { None } else { Some(pb.normal("head.weight", &[v, d], 0.02)?) };
        Ok(Self {
            width: d,
            context: config.context,
            dropout: config.dropout,
            emb,
            pos_emb,
            ln0,
            blocks,
            ln_out,
            head,
            unbounded_context: parts.unbounded_context,
            compute_dtype: pb.dtype,
        })
    }

    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let x = crate::nn::gather_rows(&self.emb, tokens)?.reshape((b, t, self.width))?;
        let x = match &self.ln0 {
            Some(ln0) => ln0.forward(&x)?,
            None => x,
        };
        let x = match &self.pos_emb {
            Some(p) => {
                if offset + t > self.context {
                    candle_core::bail!(
                        "position {} is beyond the learned position table ({} positions)",
                        offset + t - 1,
                        self.context
                    );
                }
                x.broadcast_add(&p.narrow(0, offset, t)?)?
            }
            None => x,
        };
        x.to_dtype(self.compute_dtype)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_out.forward(&x.to_dtype(self.emb.dtype())?)?;
        let head = self.head.as_ref().unwrap_or(&self.emb);
        let (b, t, d) = x.dims3()?;
        x.reshape((b * t, d))?.matmul(&head.t()?)?.reshape((b, t, head.dim(0)?))
    }

    fn hidden(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(tokens, 0)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(x)
    }
}

impl Backbone for Stack {
    fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let p = self.dropout;
        let Some(rng) = dropout_rng.filter(|_| p > 0.0) else {
            return self.logits(&self.hidden(tokens)?);
        };
        // GPT-2's dropout sites: the embedding, and each block's (see Block::forward_train).
        let mut x = dropout(&self.embed(tokens, 0)?, p, rng)?;
        for block in &self.blocks {
            x = block.forward_train(&x, p, rng)?;
        }
        self.logits(&x)
    }

    fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let x = self.hidden(tokens)?;
        let (b, t, d) = x.dims3()?;
        self.logits(&crate::nn::gather_rows(&x.reshape((b * t, d))?, rows)?.unsqueeze(0)?)?.squeeze(0)
    }

    fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        let mut x = self.embed(tokens, 0)?;
        let mut layers = Vec::with_capacity(2 * self.blocks.len());
        for block in &self.blocks {
            let (a, sa) = block.att.prefill(&block.ln1.forward(&x)?)?;
            x = (&x + a)?;
            let (f, sf) = block.ffn.prefill(&block.ln2.forward(&x)?)?;
            x = (&x + f)?;
            layers.extend([sa, sf]);
        }
        let mut state = ModelState { layers, pos: tokens.dim(1)? };
        state.detach();
        Ok((self.logits(&x)?, state))
    }

    fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        let b = token.dim(0)?;
        let mut x = self.embed(&token.reshape((b, 1))?, state.pos)?;
        if state.layers.is_empty() {
            state.layers = vec![Default::default(); 2 * self.blocks.len()];
        }
        for (block, pair) in self.blocks.iter().zip(state.layers.chunks_mut(2)) {
            let [sa, sf] = pair else { candle_core::bail!("a stack's state holds two entries per block") };
            x = (&x + block.att.step(&block.ln1.forward(&x)?, sa)?)?;
            x = (&x + block.ffn.step(&block.ln2.forward(&x)?, sf)?)?;
        }
        state.pos += 1;
        state.detach();
        self.logits(&x)?.i((.., 0, ..))
    }

    fn window(&self) -> Option<usize> {
        if self.unbounded_context && self.pos_emb.is_none() {
            None
        } else {
            Some(self.context)
        }
    }

    fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }
}
