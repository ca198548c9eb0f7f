//! The sequence-mixer contract and its implementations.
//!
//! A *sequence mixer* lets positions exchange information; a *channel mixer* transforms each
//! position alone (it implements the same trait, with an empty or token-shift state). Every
//! mixer offers the parallel form used for training, and the recurrent form (`prefill`, then
//! `step`) used for generation, with an explicit state whose size it reports. Mixers whose
//! paper defines a chunkwise form also offer `chunked`. Tests hold every form to the others.

pub mod aft;
pub mod attention;
pub mod hyena;
pub mod linformer;
pub mod long_conv;
pub mod longnet;
pub mod m2;
pub mod performer;
pub mod reformer;
pub mod retnet;
pub mod rwkv4;

use candle_core::{Result, Tensor};

use crate::rng::Rng;

/// The recurrent state of one mixer: a KV cache, a recurrent matrix, a convolution history.
/// Kept as plain tensors so any mixer can use it and its size is always known.
#[derive(Clone, Debug, Default)]
pub struct MixerState {
    pub tensors: Vec<Tensor>,
    /// Tokens consumed so far.
    pub pos: usize,
}

/// Positions kept on the device (RetNet's, learned position tables') are f32: exact to 2^24.
pub const MAX_DEVICE_POSITION: usize = 1 << 24;

/// The position a step reads on the device: the one its state holds (`held`, a one-element
/// f32 tensor that the step advances), or `pos` uploaded where the state has none yet (a
/// step from an empty state). Refused from [`MAX_DEVICE_POSITION`] on.
pub fn device_position(held: Option<&Tensor>, pos: usize, device: &candle_core::Device) -> Result<Tensor> {
    if pos >= MAX_DEVICE_POSITION {
        candle_core::bail!("position {pos} is beyond the {MAX_DEVICE_POSITION} a step's f32 position counts exactly");
    }
    match held {
        Some(p) => Ok(p.clone()),
        None => Tensor::new(&[pos as f32], device),
    }
}

impl MixerState {
    /// Bytes held by the state (what decoding keeps in memory per layer).
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }
}

pub trait SequenceMixer: Send + Sync {
    /// Parallel form. `x: [B, T, D] -> [B, T, D]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Parallel form that also returns the state after the last token.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)>;

    /// One token. `x: [B, 1, D] -> [B, 1, D]`, advancing `state`.
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor>;

    /// Whether `step` launches the same kernels on tensors of the same shapes at every
    /// position (it reads no position and its state never changes shape), so that one step
    /// captured as a CUDA graph can be replayed for every token ([`crate::decoder`]).
    fn static_step(&self) -> bool {
        false
    }

    /// Whether the dropout masks drawn inside the mixer are laid out example by example (the
    /// batch the outermost dimension of every tensor it drops from), so that a data-parallel
    /// worker's slice of the batch draws its part of the whole batch's masks
    /// ([`crate::rng::Rng::shard`]).
    fn per_example_dropout(&self) -> bool {
        true
    }

    /// Training form: `forward` with the dropout the paper puts inside the mixer (attention
    /// probabilities, for attention), drawn from `rng` with probability `p`. Mixers without
    /// internal dropout use `forward`.
    fn forward_train(&self, x: &Tensor, _p: f64, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }

    /// Chunkwise form (parallel inside chunks of `chunk` tokens, recurrent across), where the
    /// paper defines one.
    fn chunked(&self, _x: &Tensor, _chunk: usize) -> Option<Result<Tensor>> {
        None
    }

    /// Encoder form (mixers of a `causal: false` architecture): `forward` over sequences
    /// padded to one length, `keep: [B, T]` 1 at real tokens and 0 at padding, so that what
    /// the padded positions hold changes no real position's output; with `dropout`, the
    /// training form. An explicit mask rather than a pad byte: the byte vocabulary has no
    /// free id, and the task that pads (ListOps) is the one that knows where it did. Causal
    /// mixers need none (a task pads them on the left and reads the last position) and
    /// refuse it.
    fn forward_padded(&self, _x: &Tensor, _keep: &Tensor, _dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        refuse_padding()
    }

    /// From now on the parallel form computes one device's slice of the sequence (positions
    /// `split.rank() L ..` of `world L`), exchanging through `split` what it needs of the
    /// others' (sequence parallelism: LongNet's, paper 2307.02486 section 3.2). Mixers that
    /// read one position at a time need nothing; the others refuse.
    fn split_sequence(&self, _split: &longnet::sequence_parallel::Split) -> Result<()> {
        candle_core::bail!(
            "its sequence mixer cannot split a sequence across devices (sequence parallelism is LongNet's)"
        )
    }
}

/// What a causal mixer's [`SequenceMixer::forward_padded`] gives (the trait's default, and
/// the causal form of a mixer that has both).
pub(crate) fn refuse_padding() -> Result<Tensor> {
    candle_core::bail!("a causal mixer takes no padding mask: only an encoder's (bidirectional) mixers do")
}

/// A channel mixer holds no state: its recurrent form is its parallel form on one token.
pub trait PositionWise: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

impl<P: PositionWise> SequenceMixer for P {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        PositionWise::forward(self, x)
    }
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        Ok((PositionWise::forward(self, x)?, MixerState { tensors: vec![], pos: x.dim(1)? }))
    }
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        state.pos += 1;
        PositionWise::forward(self, x)
    }
    /// A position-wise layer reads no position and keeps no state.
    fn static_step(&self) -> bool {
        true
    }
    /// Each position alone: a slice of the sequence is computed as the whole's.
    fn split_sequence(&self, _split: &longnet::sequence_parallel::Split) -> Result<()> {
        Ok(())
    }
}
