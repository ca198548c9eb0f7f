//! Reformer's reversible residual backbone (Kitaev et al. 2020, arXiv 2001.04451, section 3;
//! RevNets, Gomez et al. 2017; trax `trax/layers/reversible.py` and `ReformerLM`, whose
//! layout Hugging Face's `modeling_reformer.py` ports).
//!
//! The embedding `x` is duplicated into the pair `(X1, X2) = (x, x)`; each layer maps
//!
//! ```text
//! Y1 = X1 + F(X2)      F(x) = Attention(LayerNorm_1(x))
//! Y2 = X2 + G(Y1)      G(x) = FFN(LayerNorm_2(x)), applied to chunks of c_ffn positions
//! ```
//!
//! and the final pair is concatenated to `[Y1; Y2]` (width 2d), layer-normalised and
//! projected to the vocabulary (trax: `Concatenate, LayerNorm, Dense`; Hugging Face:
//! `LayerNorm(2 hidden)`, `Linear(2 hidden, vocab)`), so the head is 2d wide and not tied to
//! the embedding. Dropout sits where the default stack has it: the embedding, the attention
//! probabilities, and each branch's output.
//!
//! **Backward by recomputation.** Each layer is invertible:
//!
//! ```text
//! X2 = Y2 - G(Y1)      X1 = Y1 - F(X2)
//! ```
//!
//! so the forward pass keeps no layer's activations: it runs the layers off the autograd
//! graph, one after the other, and hands the final pair to one [`RecomputingBackward`] op whose
//! inputs are the embedding and a flat vector of every layer's parameters (a differentiable
//! concatenation of them). Its backward, given `dY1, dY2` at the top, walks the layers in
//! reverse: with `Y1` a leaf it evaluates `g = G(Y1)`, reconstructs `X2 = Y2 - g`, and
//! backpropagates `dY2` through `g` (`dY1 += G'(Y1)^T dY2`, G's parameter gradients); then
//! with `X2` a leaf, `f = F(X2)`, `X1 = Y1 - f`, and backpropagates the new `dY1` through `f`
//! (`dX2 = dY2 + F'(X2)^T dY1`, `dX1 = dY1`, F's parameter gradients). Only one layer's graph
//! exists at any time, so peak training memory does not grow with depth (measured:
//! `tests/reversible_memory.rs`). The op returns `dx = dX1 + dX2` for the embedding and the
//! flat parameter gradient, which candle's backward splits back onto each parameter: the
//! ordinary `loss.backward()` of the training step gets every gradient, no trainer change.
//!
//! Dropout in the recomputation replays the forward's masks: each layer's two branches draw
//! from streams derived from one seed the forward takes from the step's dropout stream (and
//! the layer and branch index), which the op keeps. The LSH rotations are constants of the
//! mixer, so the recomputed hashes are the forward's. Reconstruction is exact up to rounding
//! (`x + f - f`); tests hold the reversible gradients to ordinary backpropagation through the
//! same network (`model.options.reversible = false` keeps every activation instead).
//!
//! Decoding runs the same pairs one token at a time, each layer's attention and FFN with
//! their own recurrent state (two per layer, like the default stack).

use std::sync::Arc;

use anyhow::{bail, Result as AnyResult};
use candle_core::{DType, IndexOp, Result, Tensor, Var, D};

use super::stack::{embedding, Block, Embedding, Head};
use super::{Backbone, ModelState, Parts};
use crate::config::ModelConfig;
use crate::mixers::reformer::ReformerOptions;
use crate::mixers::MixerState;
use crate::nn::dropout;
use crate::ops::precomputed::{with_backward, Gradients};
use crate::params::ParamBuilder;
use crate::rng::{stream, Rng};

/// The dropout of one forward pass, replayable: probability and the seed every layer's masks
/// derive from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Replay {
    p: f64,
    seed: u64,
    /// The stream's slice of the batch ([`Rng::shard`]).
    shard: u64,
}

impl Replay {
    /// The stream of layer `layer`'s branch `branch` (0: F, 1: G).
    fn rng(&self, layer: usize, branch: u64) -> Rng {
        Rng::derive(self.seed, stream::DROPOUT, 2 * layer as u64 + branch).for_shard(self.shard)
    }
}

/// What [`ReversibleLayers::reverse`] gives for one layer.
pub(crate) struct Reversed {
    /// The layer's inputs `[X1, X2]`, reconstructed (detached).
    pub x: [Tensor; 2],
    /// Their gradients `[dX1, dX2]`.
    pub dx: [Tensor; 2],
    /// The gradient of each of the layer's parameters, flattened.
    pub params: Vec<Tensor>,
}

/// The reversible layers: blocks (`blocks.N.{ln1, att, ln2, ffn}`), each block's parameters
/// in a fixed order, and the FFN chunk.
pub struct ReversibleLayers {
    blocks: Vec<Block>,
    /// Each block's parameter tensors, in the order of the flat vector [`RecomputingBackward`]
    /// takes.
    params: Vec<Vec<Tensor>>,
    ffn_chunk: usize,
}

impl ReversibleLayers {
    /// `F(x2) = Attention(LN1(x2))` of layer `i` (with its dropout sites when training; an
    /// encoder's padded form where `keep` is given).
    fn attention_branch(&self, i: usize, x2: &Tensor, replay: Option<Replay>, keep: Option<&Tensor>) -> Result<Tensor> {
        let b = &self.blocks[i];
        let h = b.ln1.forward(x2)?;
        match (replay, keep) {
            (Some(r), keep) => {
                let mut rng = r.rng(i, 0);
                let a = match keep {
                    Some(keep) => b.att.forward_padded(&h, keep, Some((r.p, &mut rng)))?,
                    None => b.att.forward_train(&h, r.p, &mut rng)?,
                };
                dropout(&a, r.p, &mut rng)
            }
            (None, Some(keep)) => b.att.forward_padded(&h, keep, None),
            (None, None) => b.att.forward(&h),
        }
    }

    /// `G(y1) = FFN(LN2(y1))` of layer `i`, chunk by chunk of `ffn_chunk` positions (it is
    /// position-wise: the chunks only bound the hidden activation's size).
    fn ffn_branch(&self, i: usize, y1: &Tensor, replay: Option<Replay>) -> Result<Tensor> {
        let b = &self.blocks[i];
        let t = y1.dim(1)?;
        let mut rng = replay.map(|r| r.rng(i, 1));
        let mut outs = Vec::with_capacity(t.div_ceil(self.ffn_chunk));
        for start in (0..t).step_by(self.ffn_chunk) {
            let part = y1.narrow(1, start, self.ffn_chunk.min(t - start))?;
            let g = b.ffn.forward(&b.ln2.forward(&part)?)?;
            outs.push(match (&mut rng, replay) {
                (Some(rng), Some(r)) => dropout(&g, r.p, rng)?,
                _ => g,
            });
        }
        Tensor::cat(&outs, 1)
    }

    /// Layer `i`: `(X1, X2) -> (Y1, Y2) = (X1 + F(X2), X2 + G(Y1))`.
    pub(crate) fn layer(
        &self,
        i: usize,
        x1: &Tensor,
        x2: &Tensor,
        replay: Option<Replay>,
        keep: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let y1 = (x1 + self.attention_branch(i, x2, replay, keep)?)?;
        let y2 = (x2 + self.ffn_branch(i, &y1, replay)?)?;
        Ok((y1, y2))
    }

    /// Layer `i` backwards: from its outputs `(Y1, Y2)` and their gradients `(dY1, dY2)`, its
    /// inputs reconstructed by the inverse `X2 = Y2 - G(Y1)`, `X1 = Y1 - F(X2)` and their
    /// gradients, and the gradient of each of the layer's parameters (in `params[i]`'s order,
    /// flattened, in `dtype`). One branch's graph exists at a time.
    pub(crate) fn reverse(
        &self,
        i: usize,
        y: [&Tensor; 2],
        dy: [&Tensor; 2],
        replay: Option<Replay>,
        keep: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Reversed> {
        let ([y1, y2], [dy1, dy2]) = (y, dy);
        let grad_of = |store: &candle_core::backprop::GradStore, t: &Tensor| -> Result<Tensor> {
            match store.get(t) {
                Some(g) => Ok(g.clone()),
                None => t.zeros_like(),
            }
        };
        // G: X2 = Y2 - G(Y1); dY1 += G'(Y1)^T dY2, and G's parameter gradients
        let y1_leaf = Var::from_tensor(y1)?;
        let g = self.ffn_branch(i, y1_leaf.as_tensor(), replay)?;
        let x2 = (y2 - g.detach())?;
        let g_grads = (g * dy2)?.sum_all()?.backward()?;
        let dx1 = (dy1 + grad_of(&g_grads, y1_leaf.as_tensor())?)?;
        // F: X1 = Y1 - F(X2); dX2 = dY2 + F'(X2)^T dX1, and F's parameter gradients
        let x2_leaf = Var::from_tensor(&x2)?;
        let f = self.attention_branch(i, x2_leaf.as_tensor(), replay, keep)?;
        let x1 = (y1 - f.detach())?;
        let f_grads = (f * &dx1)?.sum_all()?.backward()?;
        let dx2 = (dy2 + grad_of(&f_grads, x2_leaf.as_tensor())?)?;
        let params = self.params[i]
            .iter()
            .map(|p| (grad_of(&g_grads, p)? + grad_of(&f_grads, p)?)?.to_dtype(dtype)?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Ok(Reversed { x: [x1, x2], dx: [dx1, dx2], params })
    }

    /// Every layer on `(x, x)`, keeping the graph (ordinary backpropagation) or not.
    fn run(
        &self,
        x: &Tensor,
        replay: Option<Replay>,
        keep: Option<&Tensor>,
        keep_graph: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (mut x1, mut x2) = (x.clone(), x.clone());
        for i in 0..self.blocks.len() {
            let (y1, y2) = self.layer(i, &x1, &x2, replay, keep)?;
            (x1, x2) = if keep_graph { (y1, y2) } else { (y1.detach(), y2.detach()) };
        }
        Ok((x1, x2))
    }

    /// Every layer's parameters flattened into one vector (differentiable).
    fn flat_params(&self) -> Result<Tensor> {
        let flat: Vec<Tensor> = self.params.iter().flatten().map(|p| p.flatten_all()).collect::<Result<_>>()?;
        Tensor::cat(&flat, 0)
    }
}

/// The reversible stack as one autograd op: its value is the final pair `[Y1; Y2]` computed
/// off the graph (passed in as the first argument and returned as it is); its backward
/// recomputes the layers in reverse (see the module doc). Arguments: the pair's values `[B,
/// T, 2D]`, the embedding `x: [B, T, D]`, the flat parameters `[P]`.
struct RecomputingBackward {
    layers: Arc<ReversibleLayers>,
    replay: Option<Replay>,
    /// An encoder's key-padding mask `[B, T]`, where the forward had one.
    keep: Option<Tensor>,
}

impl Gradients for RecomputingBackward {
    fn name(&self) -> &'static str {
        "reversible-recomputing-backward"
    }

    fn of(&self, pair: &Tensor, x: &Tensor, flat: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let half = |t: &Tensor, k: usize| -> Result<Tensor> { t.narrow(D::Minus1, k * d, d)?.contiguous() };
        let (mut y1, mut y2) = (half(pair, 0)?, half(pair, 1)?);
        let (mut dy1, mut dy2) = (half(grad, 0)?, half(grad, 1)?);
        let layers = &self.layers;
        let mut param_grads: Vec<Vec<Tensor>> = Vec::with_capacity(layers.blocks.len());
        for i in (0..layers.blocks.len()).rev() {
            let r = layers.reverse(i, [&y1, &y2], [&dy1, &dy2], self.replay, self.keep.as_ref(), flat.dtype())?;
            param_grads.push(r.params);
            let ([x1, x2], [dx1, dx2]) = (r.x, r.dx);
            (y1, y2, dy1, dy2) = (x1, x2, dx1, dx2);
        }
        param_grads.reverse();
        let dflat = Tensor::cat(&param_grads.into_iter().flatten().collect::<Vec<_>>(), 0)?;
        // the input was duplicated: its gradient is the sum of both halves'
        let dx = (dy1 + dy2)?.to_dtype(x.dtype())?;
        Ok((Some(dx), Some(dflat)))
    }
}

pub struct Reversible {
    /// The registry entry (error messages name it).
    architecture: String,
    /// False for an encoder (bidirectional attention, a pooled form, no recurrent form).
    causal: bool,
    context: usize,
    dropout: f64,
    embedding: Embedding,
    layers: Arc<ReversibleLayers>,
    /// Backward by recomputation (else ordinary backpropagation, every activation kept).
    recompute: bool,
    /// The final norm (2d wide) and the head from the concatenated pair.
    head: Head,
    compute_dtype: DType,
}

/// Reformer: the reversible stack around `parts.mixer`, with `model.options` of
/// [`ReformerOptions`] (`ffn_chunk`, `reversible`).
pub fn build_reformer(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts) -> AnyResult<Box<dyn Backbone>> {
    let o: ReformerOptions = config.options()?;
    Ok(Box::new(Reversible::new(config, pb, parts, o.ffn_chunk, o.reversible)?))
}

impl Reversible {
    /// `ffn_chunk` positions per FFN chunk; `recompute`: the memory-saving backward.
    pub fn new(
        config: &ModelConfig,
        pb: &ParamBuilder,
        parts: &Parts,
        ffn_chunk: usize,
        recompute: bool,
    ) -> AnyResult<Self> {
        let Some(mixer) = parts.mixer else {
            bail!("`{}` has no sequence mixer for its reversible layers", config.architecture)
        };
        if config.tie_embeddings {
            bail!("the reversible stack's head reads the concatenated pair [Y1; Y2] (2 x model.width, as trax and Hugging Face): it cannot be tied to the embedding; set model.tie_embeddings=false");
        }
        if config.channel_mixer == "rwkv" {
            bail!("the reversible stack applies the FFN in chunks of positions, so its channel mixer must be position-wise: model.channel_mixer `rwkv` mixes neighbouring tokens (token shift)");
        }
        if ffn_chunk == 0 {
            bail!("the FFN chunk must be at least 1 position");
        }
        let embedding = embedding(config, pb, false, parts.ends)?;
        let store = pb.store();
        let names =
            || store.lock().expect("parameter store").params.keys().cloned().collect::<std::collections::BTreeSet<_>>();
        let (mut blocks, mut params) = (Vec::new(), Vec::new());
        for i in 0..config.depth {
            let before = names();
            blocks.push(Block::new(config, i, &pb.pp(format!("blocks.{i}")), mixer, parts.channel_mixer)?);
            let guard = store.lock().expect("parameter store");
            params.push(
                guard.params.iter().filter(|(n, _)| !before.contains(*n)).map(|(_, p)| pb.handed_out(&p.var)).collect(),
            );
        }
        Ok(Self {
            architecture: config.architecture.clone(),
            causal: parts.causal,
            context: config.context,
            dropout: config.dropout,
            embedding,
            layers: Arc::new(ReversibleLayers { blocks, params, ffn_chunk }),
            recompute,
            head: Head::new(pb, config.vocab, 2 * config.width, config.bias, false, parts.ends)?,
            compute_dtype: pb.dtype,
        })
    }

    pub fn layers(&self) -> &ReversibleLayers {
        &self.layers
    }

    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        self.embedding.forward_as(tokens, offset, self.compute_dtype)
    }

    /// `tokens: [B, T]` -> the concatenated final pair `[B, T, 2D]`; an encoder's padded form
    /// where `keep: [B, T]` is given.
    fn hidden(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>, keep: Option<&Tensor>) -> Result<Tensor> {
        let x = self.embed(tokens, 0)?;
        let (x, replay) = match dropout_rng.filter(|_| self.dropout > 0.0) {
            Some(rng) => (
                dropout(&x, self.dropout, rng)?,
                Some(Replay { p: self.dropout, seed: rng.next_u64(), shard: rng.shard() }),
            ),
            None => (x, None),
        };
        if !self.recompute {
            let (y1, y2) = self.layers.run(&x, replay, keep, true)?;
            return Tensor::cat(&[y1, y2], 2);
        }
        let (y1, y2) = self.layers.run(&x.detach(), replay, keep, false)?;
        let values = Tensor::cat(&[y1, y2], 2)?.contiguous()?;
        let op = RecomputingBackward { layers: self.layers.clone(), replay, keep: keep.cloned() };
        with_backward(&values, &x, &self.layers.flat_params()?, op)
    }
}

impl Backbone for Reversible {
    fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        self.head.forward(&self.hidden(tokens, dropout_rng, None)?, &self.embedding.table)
    }

    fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        self.head.forward_at(&self.hidden(tokens, None, None)?, rows, &self.embedding.table)
    }

    fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        super::refuse_recurrence(self.causal, &self.architecture)?;
        let x = self.embed(tokens, 0)?;
        let (mut x1, mut x2) = (x.clone(), x);
        let mut layers = Vec::with_capacity(2 * self.layers.blocks.len());
        for b in &self.layers.blocks {
            let (f, sf) = b.att.prefill(&b.ln1.forward(&x2)?)?;
            let y1 = (&x1 + f)?;
            let (g, sg) = b.ffn.prefill(&b.ln2.forward(&y1)?)?;
            (x1, x2) = (y1.clone(), (&x2 + g)?);
            layers.extend([sf, sg]);
        }
        let mut state = ModelState { layers, pos: tokens.dim(1)?, position: None };
        state.detach();
        Ok((self.head.forward(&Tensor::cat(&[x1, x2], 2)?, &self.embedding.table)?, state))
    }

    fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        super::refuse_recurrence(self.causal, &self.architecture)?;
        let b = token.dim(0)?;
        let x = self.embed(&token.reshape((b, 1))?, state.pos)?;
        let n = self.layers.blocks.len();
        if state.layers.is_empty() {
            state.layers = vec![MixerState::default(); 2 * n];
        }
        if state.layers.len() != 2 * n {
            candle_core::bail!("a state of {} entries for {n} reversible layers", state.layers.len());
        }
        let (mut x1, mut x2) = (x.clone(), x);
        for (block, pair) in self.layers.blocks.iter().zip(state.layers.chunks_mut(2)) {
            let y1 = (&x1 + block.att.step(&block.ln1.forward(&x2)?, &mut pair[0])?)?;
            let y2 = (&x2 + block.ffn.step(&block.ln2.forward(&y1)?, &mut pair[1])?)?;
            (x1, x2) = (y1, y2);
        }
        state.pos += 1;
        state.detach();
        self.head.forward(&Tensor::cat(&[x1, x2], 2)?, &self.embedding.table)?.i((.., 0, ..))
    }

    fn per_example_dropout(&self) -> bool {
        self.layers.blocks.iter().all(|b| b.att.per_example_dropout() && b.ffn.per_example_dropout())
    }

    fn window(&self) -> Option<usize> {
        Some(self.context)
    }

    fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// The encoder's pooled form: the padded pair `[Y1; Y2]`, mean-pooled through the head.
    fn pooled_logits(&self, tokens: &Tensor, keep: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        super::check_pooling(self.causal, &self.architecture, tokens, keep)?;
        self.head.pooled(&self.hidden(tokens, dropout_rng, Some(keep))?, keep, &self.embedding.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{randn, random_tokens, rel_err, tiny_config};
    use candle_core::Device;

    fn reformer(sets: &[&str], seed: u64) -> AnyResult<(ModelConfig, Reversible, ParamBuilder)> {
        let mut all = vec!["model.options.chunk=4", "model.options.n_buckets=4", "model.options.ffn_chunk=5"];
        all.extend_from_slice(sets);
        let cfg = tiny_config("reformer", &all)?;
        let pb = ParamBuilder::new(seed, &Device::Cpu, DType::F64);
        let parts = Parts {
            mixer: Some(crate::mixers::reformer::build),
            channel_mixer: crate::channel_mixers::mlp,
            unbounded_context: false,
            causal: true,
            ends: crate::backbones::Ends::Gpt2,
        };
        let o: ReformerOptions = cfg.options()?;
        let model = Reversible::new(&cfg, &pb, &parts, o.ffn_chunk, o.reversible)?;
        Ok((cfg, model, pb))
    }

    /// The backward's inverse recovers each layer's inputs from its outputs, with and without
    /// dropout (replayed masks), in f64 to rounding; its input gradients are ordinary
    /// backpropagation's through the layer.
    #[test]
    fn the_inverse_recovers_the_inputs() -> AnyResult<()> {
        let (_, model, _) = reformer(&[], 1)?;
        let layers = model.layers();
        let (x1, x2) = (randn(&[2, 21, 16], 1, DType::F64)?, randn(&[2, 21, 16], 2, DType::F64)?);
        let (dy1, dy2) = (randn(&[2, 21, 16], 3, DType::F64)?, randn(&[2, 21, 16], 4, DType::F64)?);
        for replay in [None, Some(Replay { p: 0.2, seed: 5, shard: 0 })] {
            for i in 0..2 {
                let (v1, v2) = (Var::from_tensor(&x1)?, Var::from_tensor(&x2)?);
                let (y1, y2) = layers.layer(i, v1.as_tensor(), v2.as_tensor(), replay, None)?;
                assert!(rel_err(&y1, &x1)? > 1e-3, "the layer changed its input");
                let r = layers.reverse(i, [&y1.detach(), &y2.detach()], [&dy1, &dy2], replay, None, DType::F64)?;
                let (e1, e2) = (rel_err(&r.x[0], &x1)?, rel_err(&r.x[1], &x2)?);
                assert!(e1 < 1e-12 && e2 < 1e-12, "layer {i}, {replay:?}: inverse errors {e1}, {e2}");
                let grads = ((y1 * &dy1)?.sum_all()? + (y2 * &dy2)?.sum_all()?)?.backward()?;
                for (k, v) in [v1, v2].iter().enumerate() {
                    let e = rel_err(&r.dx[k], grads.get(v.as_tensor()).expect("a gradient"))?;
                    assert!(e < 1e-10, "layer {i}, {replay:?}: dX{} {e}", k + 1);
                }
            }
        }
        Ok(())
    }

    /// The recomputing backward gives every parameter the gradient ordinary backpropagation
    /// through the same network gives it, with dropout (same masks) and without.
    #[test]
    fn reversible_gradients_equal_ordinary_backpropagation() -> AnyResult<()> {
        let tokens = random_tokens(2, 19, 256, 3)?;
        let targets = random_tokens(2, 19, 256, 4)?;
        for dropout in ["0.0", "0.1"] {
            let p = format!("model.dropout={dropout}");
            let grads = |reversible: bool| -> AnyResult<(Vec<(String, Tensor)>, f64)> {
                let flag = format!("model.options.reversible={reversible}");
                let (_, model, pb) = reformer(&[&p, &flag], 7)?;
                let mut rng = Rng::new(11);
                let logits = model.forward(&tokens, Some(&mut rng))?;
                let loss = Model::loss(&logits, &targets)?;
                let store = loss.backward()?;
                let params = pb.store().lock().unwrap().vars();
                let grads = params
                    .into_iter()
                    .map(|(n, p)| (n, store.get(p.var.as_tensor()).expect("every parameter has a gradient").clone()))
                    .collect();
                Ok((grads, loss.to_scalar::<f64>()?))
            };
            let ((recomputed, l1), (ordinary, l2)) = (grads(true)?, grads(false)?);
            assert_eq!(l1, l2, "the two forms' losses differ");
            assert_eq!(recomputed.len(), ordinary.len());
            assert!(recomputed.len() >= 15, "only {} parameters", recomputed.len());
            for ((name, a), (_, b)) in recomputed.iter().zip(&ordinary) {
                let e = rel_err(a, b)?;
                assert!(e < 1e-9, "dropout {dropout}: gradient of {name}: recomputed vs ordinary {e}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_tied_head_or_a_token_mixing_ffn_is_a_clear_error() {
        let err = tiny_config("reformer", &["model.tie_embeddings=true"])
            .and_then(|c| Model::new(&c, 1, &Device::Cpu, DType::F32))
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{err:#}").contains("cannot be tied"), "{err:#}");
        let err = tiny_config("reformer", &["model.channel_mixer=rwkv"])
            .and_then(|c| Model::new(&c, 1, &Device::Cpu, DType::F32))
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{err:#}").contains("position-wise"), "{err:#}");
    }
}
