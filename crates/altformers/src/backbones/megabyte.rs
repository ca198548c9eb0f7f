//! MegaByte (Yu et al. 2023, "MEGABYTE: Predicting Million-byte Sequences with Multiscale
//! Transformers", arXiv 2305.07185, section 2). No official code exists; this follows the
//! paper's equations (lucidrains' re-implementation adds token shift, ALiBi and RMSNorm).
//!
//! Bytes are grouped into patches of P. A *global* Transformer of width `P d_G` runs over
//! the patches, each the concatenation of its P byte embeddings (`d_G` each, plus byte
//! positions); a small *local* Transformer of width `d_L` runs inside each patch on its own,
//! fed slice p of its patch's global output, projected, plus the embedding of the byte
//! before (section 2.2):
//!
//! ```text
//! h_embed_t        = E_global[x_t] + E_pos[t]                           [d_G]
//! h_global_in_k    = E_global_pad                       (k = 0)          [P d_G]
//!                  = h_embed[(k-1)P .. kP]  concatenated  (k > 0)
//! h_global_out     = transformer_global(h_global_in)                     [K, P d_G]
//! h_local_in_{k,p} = W_GL h_global_out_{k, p d_G .. (p+1) d_G} + E_local[x_{kP+p-1}]   [d_L]
//! logits_{k,p}     = head(transformer_local(h_local_in_{k, 0..P})_p)    predicts x_{kP+p}
//! ```
//!
//! The paper predicts byte `x_t` from `x_<t`; a backbone here predicts `u_{t+1}` from `u_<=t`
//! (output t is scored against the next byte). So the paper's `x_t` is our `u_{t+1}`, the
//! local model's "byte before" is the current input `u_t`, and the one-patch shift becomes a
//! shift by P - 1: global patch k holds `u_{kP-P+1} ..= u_{kP}` and serves outputs `kP ..
//! kP + P - 1`, none of which precedes `u_{kP}`. The first patch is the learned padding patch
//! whose last slot holds `u_0` (the byte the paper would call `x_{-1}`, its padding token).
//! T need not be a multiple of P: the local model's last patch is padded at its end, after
//! every real byte, so padding reaches nothing causal attention lets it reach.
//!
//! The global model's output goes to `W_GL` as it is (no final norm: the local blocks are
//! pre-norm and the model's final norm follows the local model), so that P = 1 with no local
//! layers, `W_GL = I` and a zero local embedding is the plain Transformer.
//!
//! Recurrent form: the global model takes one step per patch, when its first byte arrives
//! (its KV cache over patches); the local model one step per byte, its cache reset at every
//! patch. Besides the layers' states, the state holds the last P - 1 byte embeddings (the
//! next patch's input) and the current patch's projected global output.

use anyhow::{ensure, Result as AnyResult};
use candle_core::{DType, IndexOp, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::stack::{Embedding, Head, Layers};
use super::{again, Backbone, ModelState, Parts};
use crate::complexity::{Complexity, CostShape, Review};
use crate::config::{ModelConfig, Options, Position};
use crate::mixers::MixerState;
use crate::nn::{dropout, Linear};
use crate::params::ParamBuilder;
use crate::rng::Rng;

/// `model.width`, `model.depth` and `model.heads` are the global model's; the local model's
/// are these.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MegaByteOptions {
    /// Bytes per patch (P). `model.width` must be a multiple: each byte embedding has
    /// `width / P` channels.
    pub patch: usize,
    /// Local model width (d_L); 0: as wide as the global model (`model.width`). The paper's
    /// local models are narrower (and shallower) than its global ones at scale; at the small
    /// widths trained here a narrower one is what limits the model (a 16-wide model with an
    /// 8-wide local model memorises a batch at half the pace).
    pub local_width: usize,
    pub local_depth: usize,
    /// 0: as many as `model.heads`.
    pub local_heads: usize,
}

impl Default for MegaByteOptions {
    fn default() -> Self {
        Self { patch: 8, local_width: 0, local_depth: 2, local_heads: 0 }
    }
}

impl Options for MegaByteOptions {
    fn check(&self) -> AnyResult<()> {
        ensure!(self.patch > 0, "model.options.patch must be positive");
        Ok(())
    }
}

/// The local model's configuration: `config` at the local width, depth and heads, a context
/// of one patch.
fn local_config(config: &ModelConfig, o: &MegaByteOptions) -> ModelConfig {
    let width = if o.local_width == 0 { config.width } else { o.local_width };
    let heads = if o.local_heads == 0 { config.heads } else { o.local_heads };
    ModelConfig { width, heads, kv_heads: 0, depth: o.local_depth, context: o.patch, ..config.clone() }
}

pub struct MegaByte {
    patch: usize,
    context: usize,
    dropout: f64,
    /// Byte embeddings (`d_G` wide) with byte positions where `model.position` is learned.
    global_embedding: Embedding,
    /// `E_global_pad`, `[P d_G]`.
    pad: Tensor,
    global: Layers,
    /// `W_GL`, `[d_G] -> [d_L]`.
    to_local: Linear,
    local_embedding: Embedding,
    local: Layers,
    head: Head,
    compute_dtype: DType,
}

/// [`super::BackboneFn`] of `megabyte`: Transformer blocks in both models.
pub fn build(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts) -> AnyResult<Box<dyn Backbone>> {
    Ok(Box::new(MegaByte::new(config, pb, parts)?))
}

impl MegaByte {
    pub fn new(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts) -> AnyResult<Self> {
        let o: MegaByteOptions = config.options()?;
        anyhow::ensure!(
            !config.shared_ffn,
            "model.shared_ffn (One Wide FFN) is an option of the default stack; `{}` does not take it",
            config.architecture
        );
        let p = o.patch;
        ensure!(
            config.width.is_multiple_of(p),
            "model.width ({}) must be a multiple of model.options.patch ({p}): each byte gets width / patch channels",
            config.width
        );
        let local_cfg = local_config(config, &o);
        // (a local model of no layers is allowed: the P = 1 reduction to the Transformer)
        let checked = ModelConfig { depth: local_cfg.depth.max(1), ..local_cfg.clone() };
        checked.validate().map_err(|e| e.context("the local model (model.options.local_*)"))?;
        // its layers are built one by one: a local_depth of 10^12 would build until memory ran out
        crate::model::size::check_params(&local_cfg, pb.dtype)
            .map_err(|e| e.context("the local model (model.options.local_*)"))?;
        let d_g = config.width / p;
        let mixer = crate::mixers::attention::build;
        let gb = pb.pp("global");
        let positions = (config.position == Position::Learned).then_some(config.context);
        let global_embedding = Embedding::new(&gb, config.vocab, d_g, positions, None, parts.ends)?;
        let pad = gb.normal_no_decay("pad", &[p * d_g], 0.02)?;
        let global_cfg = ModelConfig { context: config.context.div_ceil(p), ..config.clone() };
        let global = Layers::new(&global_cfg, &gb, 0..config.depth, mixer, parts.channel_mixer)?;
        let lb = pb.pp("local");
        let to_local = Linear::new(&lb, "proj", d_g, local_cfg.width, 0.02, config.bias)?;
        let local_embedding = Embedding::new(&lb, config.vocab, local_cfg.width, None, None, parts.ends)?;
        let local = Layers::new(&local_cfg, &lb, 0..o.local_depth, mixer, parts.channel_mixer)?;
        let head = Head::new(pb, config.vocab, local_cfg.width, config.bias, config.tie_embeddings, parts.ends)?;
        Ok(Self {
            patch: p,
            context: config.context,
            dropout: config.dropout,
            global_embedding,
            pad,
            global,
            to_local,
            local_embedding,
            local,
            head,
            compute_dtype: pb.dtype,
        })
    }

    fn d_g(&self) -> usize {
        self.pad.dim(0).unwrap_or(0) / self.patch
    }

    /// The pad's first P - 1 slots, `[B, P - 1, d_G]` (before byte 0).
    fn pad_slots(&self, b: usize) -> Result<Tensor> {
        let (p, d) = (self.patch, self.d_g());
        self.pad
            .narrow(0, 0, (p - 1) * d)?
            .reshape((1, p - 1, d))?
            .broadcast_as((b, p - 1, d))?
            .to_dtype(self.compute_dtype)
    }

    /// Byte embeddings of `tokens: [B, T]` at positions `offset..`, `[B, T, d_G]`.
    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        self.global_embedding.forward_as(tokens, offset, self.compute_dtype)
    }

    /// The local model's byte embeddings of `tokens: [B, T]`, `[B, T, d_L]`.
    fn local_embed(&self, tokens: &Tensor) -> Result<Tensor> {
        self.local_embedding.forward_as(tokens, 0, self.compute_dtype)
    }

    /// Byte embeddings `e: [B, T, d_G]` after the P - 1 slots before them (`before`, or the
    /// padding patch's at the start): `[B, P - 1 + T, d_G]`, `e` itself when P = 1.
    fn shifted(&self, e: &Tensor, before: Option<Tensor>) -> Result<Tensor> {
        if self.patch == 1 {
            return Ok(e.clone());
        }
        let before = match before {
            Some(slots) => slots,
            None => self.pad_slots(e.dim(0)?)?,
        };
        Tensor::cat(&[&before, e], 1)
    }

    /// The [`MegaByte::shifted`] embeddings of T bytes -> the global model's input
    /// `[B, ceil(T/P), P d_G]`: patch k holds bytes `kP - P + 1 ..= kP`.
    fn patches(&self, shifted: &Tensor) -> Result<Tensor> {
        let (b, len, d) = shifted.dims3()?;
        let p = self.patch;
        let k = (len + 1 - p).div_ceil(p);
        shifted.narrow(1, 0, k * p)?.contiguous()?.reshape((b, k, p * d))
    }

    /// Global output `[B, K, P d_G]` -> the local model's share of it, `[B, K P, d_L]`.
    fn project(&self, g: &Tensor) -> Result<Tensor> {
        let (b, k, _) = g.dims3()?;
        self.to_local.forward(&g.reshape((b, k * self.patch, self.d_g()))?)
    }

    /// The local model over every patch at once: `x: [B, T, d_L]` -> `[B, T, d_L]`.
    fn local_patches(&self, x: &Tensor, dropout_p: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (p, k) = (self.patch, t.div_ceil(self.patch));
        let x = if k * p > t { x.pad_with_zeros(1, 0, k * p - t)? } else { x.clone() };
        let y = self.local.forward(&x.reshape((b * k, p, d))?, dropout_p)?;
        y.reshape((b, k * p, d))?.narrow(1, 0, t)
    }

    /// The hidden state before the head, `[B, T, d_L]`.
    fn hidden(&self, tokens: &Tensor, mut dropout_p: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let mut e = self.embed(tokens, 0)?;
        let mut local_e = self.local_embed(tokens)?;
        if let Some((p, rng)) = &mut dropout_p {
            e = dropout(&e, *p, rng)?;
            local_e = dropout(&local_e, *p, rng)?;
        }
        let g = self.global.forward(&self.patches(&self.shifted(&e, None)?)?, again(&mut dropout_p))?;
        let x = (self.project(&g)?.narrow(1, 0, t)? + local_e)?;
        self.local_patches(&x, dropout_p)
    }
}

impl Backbone for MegaByte {
    fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let p = self.dropout;
        let x = self.hidden(tokens, dropout_rng.filter(|_| p > 0.0).map(|rng| (p, rng)))?;
        self.head.forward(&x, &self.local_embedding.table)
    }

    fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        self.head.forward_at(&self.hidden(tokens, None)?, rows, &self.local_embedding.table)
    }

    /// State: the global layers', the patch state (`[last P - 1 byte embeddings, the current
    /// patch's projected global output]`), the local layers' over the current patch.
    fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        let t = tokens.dim(1)?;
        let p = self.patch;
        let shifted = self.shifted(&self.embed(tokens, 0)?, None)?;
        let (g, mut layers) = self.global.prefill(&self.patches(&shifted)?)?;
        let projected = self.project(&g)?;
        let x = (projected.narrow(1, 0, t)? + self.local_embed(tokens)?)?;
        let logits = self.head.forward(&self.local_patches(&x, None)?, &self.local_embedding.table)?;
        // the current (last) patch: its local states, from its bytes so far
        let start = (t - 1) / p * p;
        let (_, local) = self.local.prefill(&x.narrow(1, start, t - start)?)?;
        let mut recent = vec![];
        if p > 1 {
            recent.push(shifted.narrow(1, t, p - 1)?);
        }
        recent.push(projected.narrow(1, start, p)?);
        layers.push(MixerState { tensors: recent, pos: t });
        layers.extend(local);
        let mut state = ModelState { layers, pos: t, position: None };
        state.detach();
        Ok((logits, state))
    }

    fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        let b = token.dim(0)?;
        let p = self.patch;
        let (n_global, n_local) = (self.global.state_len(), self.local.state_len());
        if state.layers.is_empty() {
            state.layers = vec![Default::default(); n_global + 1 + n_local];
        }
        if state.layers.len() != n_global + 1 + n_local {
            candle_core::bail!(
                "a MegaByte state of {} entries, expected {}",
                state.layers.len(),
                n_global + 1 + n_local
            );
        }
        let token = token.reshape((b, 1))?;
        let e = self.embed(&token, state.pos)?;
        let (global, rest) = state.layers.split_at_mut(n_global);
        let (patch, local) = rest.split_first_mut().unwrap();
        // the last P - 1 byte embeddings (the padding slots before byte 0), then this byte's
        let recent = patch.tensors.first().filter(|_| p > 1 && patch.pos > 0).cloned();
        let window = self.shifted(&e, recent)?;
        let slot = state.pos % p;
        if slot == 0 {
            let g = self.global.step(&window.reshape((b, 1, p * self.d_g()))?, global)?;
            let projected = self.project(&g)?;
            patch.tensors = if p > 1 { vec![window.narrow(1, 1, p - 1)?, projected] } else { vec![projected] };
            local.fill(Default::default());
        } else if p > 1 {
            patch.tensors[0] = window.narrow(1, 1, p - 1)?;
        }
        patch.pos += 1;
        let projected = patch.tensors.last().unwrap().narrow(1, slot, 1)?;
        let x = self.local.step(&(projected + self.local_embed(&token)?)?, local)?;
        state.pos += 1;
        state.detach();
        self.head.forward(&x, &self.local_embedding.table)?.i((.., 0, ..))
    }

    fn window(&self) -> Option<usize> {
        Some(self.context)
    }

    fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }
}

/// At the bench shape and the default options (P = 8, d_L = d, two local layers, one
/// global layer): the global layer on T/P patches of width d, the local layers on T bytes in
/// windows of P, the projection between them.
pub const COMPLEXITY: Complexity = Complexity {
    review: Review::NO_LINE,
    true_time: "O((T/P)^2 d_G' + (T/P) d_G'^2) per global layer (d_G' = P d_G its width) + O(T P d_L + T d_L^2) per local layer",
    true_space: "O((T/P) d_G' + T d_L) with fused attention (h (T/P)^2 + T P h naive); decode: the global KV cache O((T/P) d_G') per layer, the local one O(P d_L)",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let (p, dl) = (8.0, d);
        let k = t / p;
        let global = 24.0 * k * d * d + 4.0 * k * k * d;
        let local = 2.0 * (24.0 * t * dl * dl + 4.0 * t * p * dl);
        b * (global + local + 2.0 * t * (d / p) * dl)
    },
    memory: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        let k = t / 8.0;
        b * (h * k * k + h * t * 8.0 + 10.0 * t * d)
    },
    state: |s: &CostShape| 2.0 * (s.batch * s.seq * s.width) as f64 / 8.0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{self, random_tokens, tiny_config};
    use candle_core::Device;
    use std::collections::BTreeMap;

    /// P = 1, no local layers, W_GL = I and a zero local embedding: the Transformer's logits
    /// from the Transformer's weights.
    #[test]
    fn one_byte_patches_without_a_local_model_are_the_transformer() -> AnyResult<()> {
        let sets = ["model.tie_embeddings=false"];
        let transformer = Model::new(&tiny_config("transformer", &sets)?, 5, &Device::Cpu, DType::F32)?;
        testing::perturb(&transformer, 0.05, 1)?;
        let cfg = tiny_config(
            "megabyte",
            &[sets[0], "model.options.patch=1", "model.options.local_depth=0", "model.options.local_width=16"],
        )?;
        let megabyte = Model::new(&cfg, 6, &Device::Cpu, DType::F32)?;
        let mut tensors = BTreeMap::new();
        for (name, t) in transformer.params.tensors() {
            let name = match name.as_str() {
                "ln_out.weight" | "head.weight" => name,
                _ => format!("global.{name}"),
            };
            tensors.insert(name, t);
        }
        tensors.insert("global.pad".into(), Tensor::zeros(16, DType::F32, &Device::Cpu)?);
        tensors.insert("local.proj.weight".into(), Tensor::eye(16, DType::F32, &Device::Cpu)?);
        tensors.insert("local.emb.weight".into(), Tensor::zeros((256, 16), DType::F32, &Device::Cpu)?);
        megabyte.params.assign(tensors, "the Transformer's weights")?;
        let tokens = random_tokens(2, 13, 256, 2)?;
        let (a, b) = (megabyte.forward(&tokens, None)?, transformer.forward(&tokens, None)?);
        assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    /// Exact causality (bit for bit) and recurrent = parallel, across patch boundaries, for
    /// lengths that are and are not multiples of P, prompts ending mid-patch and on a
    /// boundary.
    #[test]
    fn patches_are_causal_and_decoding_equals_the_parallel_form() -> AnyResult<()> {
        for patch in [1, 2, 3, 4] {
            let cfg = tiny_config(
                "megabyte",
                &[&format!("model.options.patch={patch}"), "model.width=24", "model.options.local_width=8"],
            )?;
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            testing::perturb(&model, 0.05, 3)?;
            for len in [12, 13] {
                let tokens = random_tokens(2, len, cfg.vocab, len as u64)?;
                let what = format!("patch {patch}, T {len}");
                testing::assert_causal_tokens(&model, &tokens, 0.0).map_err(|e| e.context(what.clone()))?;
                testing::assert_modes_agree(&model, &tokens, &[0, 1, 4, 6, 7]).map_err(|e| e.context(what))?;
            }
        }
        Ok(())
    }

    #[test]
    fn inconsistent_shapes_are_refused_by_name() -> AnyResult<()> {
        let err = |sets: &[&str]| -> String {
            match tiny_config("megabyte", sets).and_then(|c| Model::new(&c, 0, &Device::Cpu, DType::F32)) {
                Ok(_) => "accepted".into(),
                Err(e) => format!("{e:#}"),
            }
        };
        assert!(err(&["model.options.patch=3"]).contains("multiple of model.options.patch"));
        assert!(err(&["model.options.local_width=9"]).contains("local model"));
        assert!(err(&["model.options.patch=0"]).contains("patch must be positive"));
        assert!(err(&["model.shared_ffn=true"]).contains("does not take it"));
        Ok(())
    }
}
