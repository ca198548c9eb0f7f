//! The decoder language model every causal architecture plugs into:
//! embedding (+ learned positions), N blocks of `x + mixer(norm(x))` then
//! `x + channel_mixer(norm(x))`, final norm, head.
//!
//! Parameter names follow the RWKV-4 checkpoints (`emb.weight`, `blocks.N.ln1.weight`,
//! `blocks.N.att.*`, `blocks.N.ln2.weight`, `blocks.N.ffn.*`, `ln_out.weight`, `head.weight`)
//! so that official weights load where the architecture matches.

use anyhow::{bail, Result as AnyResult};
use candle_core::{DType, Device, IndexOp, Result, Tensor};

use crate::config::{ModelConfig, Position};
use crate::mixers::{MixerState, SequenceMixer};
use crate::nn::{dropout, LayerNorm};
use crate::params::{ParamBuilder, ParamStore};
use crate::rng::Rng;

pub struct Block {
    pub ln1: LayerNorm,
    pub att: Box<dyn SequenceMixer>,
    pub ln2: LayerNorm,
    pub ffn: Box<dyn SequenceMixer>,
}

impl Block {
    /// Block `layer` of `config`, parameters under `pb` (`blocks.N` in a model).
    pub fn new(config: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Self> {
        let arch = crate::registry::find(&config.mixer)?;
        let d = config.width;
        Ok(Block {
            ln1: LayerNorm::new(pb, "ln1", d, config.bias)?,
            att: (arch.build)(config, layer, &pb.pp("att"))?,
            ln2: LayerNorm::new(pb, "ln2", d, config.bias)?,
            ffn: crate::blocks::channel_mixer(config, layer, &pb.pp("ffn"))?,
        })
    }

    /// `x: [B, T, D] -> [B, T, D]`, without dropout.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.att.forward(&self.ln1.forward(x)?)?)?;
        &x + self.ffn.forward(&self.ln2.forward(&x)?)?
    }
}

pub struct LanguageModel {
    pub config: ModelConfig,
    emb: Tensor,
    pos_emb: Option<Tensor>,
    ln0: Option<LayerNorm>,
    blocks: Vec<Block>,
    ln_out: LayerNorm,
    /// `None` when tied to the embedding.
    head: Option<Tensor>,
    pub params: ParamStore,
    /// Dtype of the activations inside the blocks (bf16 for mixed precision on a GPU);
    /// parameters, norms, logits and the loss stay in the parameters' dtype.
    compute_dtype: DType,
}

/// Recurrent state of the whole model: one (mixer, channel mixer) pair per block.
#[derive(Clone, Debug, Default)]
pub struct ModelState {
    pub layers: Vec<(MixerState, MixerState)>,
    pub pos: usize,
}

impl ModelState {
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(a, f)| a.bytes() + f.bytes()).sum()
    }

    /// Cuts the state off the autograd graph. Decoding never differentiates through it, and
    /// a state that still records its history (every step's activations back to the
    /// weights) would keep all of them alive: memory growing with every token.
    pub fn detach(&mut self) {
        for (a, f) in self.layers.iter_mut() {
            for t in a.tensors.iter_mut().chain(f.tensors.iter_mut()) {
                *t = t.detach();
            }
        }
    }

    /// Whether any state tensor still records the operations that made it.
    pub fn tracks_graph(&self) -> bool {
        self.layers.iter().any(|(a, f)| a.tensors.iter().chain(&f.tensors).any(|t| t.track_op()))
    }
}

impl LanguageModel {
    /// Builds the model with freshly initialised weights (seeded).
    pub fn new(config: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> AnyResult<Self> {
        config.validate()?;
        crate::registry::find(&config.mixer)?;
        let pb = ParamBuilder::new(seed, device, dtype);
        let (v, d) = (config.vocab, config.width);
        let emb = pb.normal_no_decay("emb.weight", &[v, d], 0.02)?;
        let pos_emb = match config.position {
            Position::Learned => Some(pb.normal_no_decay("pos_emb.weight", &[config.context, d], 0.02)?),
            _ => None,
        };
        let ln0 =
            if config.embed_norm { Some(LayerNorm::new(&pb.pp("blocks.0"), "ln0", d, config.bias)?) } else { None };
        let mut blocks = Vec::with_capacity(config.depth);
        for i in 0..config.depth {
            blocks.push(Block::new(config, i, &pb.pp(format!("blocks.{i}")))?);
        }
        let ln_out = LayerNorm::new(&pb, "ln_out", d, config.bias)?;
        let head = if config.tie_embeddings { None } else { Some(pb.normal("head.weight", &[v, d], 0.02)?) };
        Ok(Self {
            config: config.clone(),
            emb,
            pos_emb,
            ln0,
            blocks,
            ln_out,
            head,
            params: pb.into_store(),
            compute_dtype: dtype,
        })
    }

    pub fn device(&self) -> &Device {
        self.emb.device()
    }

    pub fn dtype(&self) -> DType {
        self.emb.dtype()
    }

    /// Runs the blocks in `dtype` (e.g. bf16) while keeping the parameters in their own
    /// (f32 master weights): mixed precision.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    pub fn num_params(&self) -> usize {
        self.params.num_elements()
    }

    /// The longest window the model can attend over when generating, or `None` where the
    /// recurrence is unbounded (no learned positions, every mixer recurrent).
    pub fn window(&self) -> Option<usize> {
        let arch = crate::registry::find(&self.config.mixer).ok()?;
        if arch.unbounded_context && self.pos_emb.is_none() {
            None
        } else {
            Some(self.config.context)
        }
    }

    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let x = crate::nn::gather_rows(&self.emb, tokens)?.reshape((b, t, self.config.width))?;
        let x = match &self.ln0 {
            Some(ln0) => ln0.forward(&x)?,
            None => x,
        };
        let x = match &self.pos_emb {
            Some(p) => {
                if offset + t > self.config.context {
                    candle_core::bail!(
                        "position {} is beyond the learned position table ({} positions)",
                        offset + t - 1,
                        self.config.context
                    );
                }
                x.broadcast_add(&p.narrow(0, offset, t)?)?
            }
            None => x,
        };
        x.to_dtype(self.compute_dtype)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_out.forward(&x.to_dtype(self.dtype())?)?;
        let head = self.head.as_ref().unwrap_or(&self.emb);
        let (b, t, d) = x.dims3()?;
        x.reshape((b * t, d))?.matmul(&head.t()?)?.reshape((b, t, head.dim(0)?))
    }

    /// Parallel form. `tokens: [B, T]` (u32) -> logits `[B, T, V]`. With `dropout_rng`,
    /// dropout is applied (training); without, the model is deterministic (evaluation).
    pub fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let p = self.config.dropout;
        let Some(rng) = dropout_rng.filter(|_| p > 0.0) else {
            let mut x = self.embed(tokens, 0)?;
            for block in &self.blocks {
                x = block.forward(&x)?;
            }
            return self.logits(&x);
        };
        // GPT-2's dropout sites: the embedding, each residual branch, and inside the mixer
        // (attention probabilities).
        let mut x = dropout(&self.embed(tokens, 0)?, p, rng)?;
        for block in &self.blocks {
            x = (&x + dropout(&block.att.forward_train(&block.ln1.forward(&x)?, p, rng)?, p, rng)?)?;
            x = (&x + dropout(&block.ffn.forward(&block.ln2.forward(&x)?)?, p, rng)?)?;
        }
        self.logits(&x)
    }

    /// Logits at chosen positions only: `rows` (u32, `[N]`) index the flattened `[B T]`
    /// positions of `tokens: [B, T]` -> `[N, V]` (no dropout). A loss scored at a few
    /// positions (the recall suite) then pays the head and the softmax for N rows, not B T.
    pub fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(tokens, 0)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let (b, t, d) = x.dims3()?;
        self.logits(&crate::nn::gather_rows(&x.reshape((b * t, d))?, rows)?.unsqueeze(0)?)?.squeeze(0)
    }

    /// Runs the prompt in parallel and returns its logits `[B, T, V]` and the state after it.
    pub fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        let mut x = self.embed(tokens, 0)?;
        let mut layers = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (a, sa) = block.att.prefill(&block.ln1.forward(&x)?)?;
            x = (&x + a)?;
            let (f, sf) = block.ffn.prefill(&block.ln2.forward(&x)?)?;
            x = (&x + f)?;
            layers.push((sa, sf));
        }
        let mut state = ModelState { layers, pos: tokens.dim(1)? };
        state.detach();
        Ok((self.logits(&x)?, state))
    }

    /// One token per sequence. `token: [B]` (u32) -> logits `[B, V]`.
    pub fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        let b = token.dim(0)?;
        let mut x = self.embed(&token.reshape((b, 1))?, state.pos)?;
        if state.layers.is_empty() {
            state.layers = vec![Default::default(); self.blocks.len()];
        }
        for (block, (sa, sf)) in self.blocks.iter().zip(state.layers.iter_mut()) {
            x = (&x + block.att.step(&block.ln1.forward(&x)?, sa)?)?;
            x = (&x + block.ffn.step(&block.ln2.forward(&x)?, sf)?)?;
        }
        state.pos += 1;
        state.detach();
        self.logits(&x)?.i((.., 0, ..))
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
