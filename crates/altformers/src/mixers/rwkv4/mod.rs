//! RWKV-4 (Peng et al. 2023, arXiv 2305.13048), as the paper and the official RWKV-4 code
//! (BlinkDL/RWKV-LM, `RWKV-v4/src/model.py` and `cuda/wkv_cuda.cu`) define it.
//!
//! Token shift: `x'_t = mu (.) x_t + (1 - mu) (.) x_{t-1}` with separate `mu` for r, k, v.
//!
//! Time mixing (`att.*`): `r, k, v = W_r x'_r, W_k x'_k, W_v x'_v`,
//! `out = W_o (sigmoid(r) (.) wkv)` with, per channel,
//! `wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
//!        / (sum_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})`,
//! `w = exp(time_decay)` (the checkpoints store the raw `time_decay`; the per-step decay is
//! `exp(-exp(time_decay))`) and `u = time_first`. The WKV is
//! [`crate::ops::decayed`]'s normalised form with a decay and a bonus: chunkwise
//! (`O(T C d)`, C the chunk) for training, the official running-max recurrence
//! (`aa, bb, pp`) for decoding, and the quadratic reference for tests.
//!
//! Channel mixing (`ffn.*`): `r = W_r x'_r`, `k = W_k x'_k`,
//! `out = sigmoid(r) (.) (W_v relu(k)^2)`.
//!
//! Parameter names and shapes are those of the official checkpoints: `time_mix_*: [1, 1, D]`,
//! `time_decay, time_first: [D]`, linear weights `[out, in]` without biases.
//!
//! Recurrent state per layer: time mixing `[x_{t-1}, aa, bb, pp]` (each `[B, D]`), channel
//! mixing `[x_{t-1}]`: `O(d)`, independent of T.

use anyhow::{bail, Result as AnyResult};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Position};
use crate::nn::Linear;
use crate::ops::decayed::{self, Weighting, WkvState};
use crate::params::ParamBuilder;

#[cfg(feature = "cuda")]
mod decode;

/// `model.options` of `rwkv4`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rwkv4Options {
    /// A layer norm right after the embedding (`blocks.0.ln0`), as in RWKV-4.
    pub embed_norm: bool,
    /// Chunk length of the chunkwise WKV used by the parallel form.
    pub chunk: usize,
    /// `paper`: the official RWKV-4 initialisation (per-layer ramps for `time_*`, zero
    /// `att.key/receptance/output` and `ffn.receptance/value`, orthogonal `att.value` and
    /// `ffn.key`, the token table U(-1e-4, 1e-4) and the head orthogonal with gain
    /// `0.5 max(1, sqrt(V / d))`: [`crate::backbones::Ends::Rwkv4`]). `normal`: the same ramps,
    /// every matrix N(0, 1/fan_in), table and head GPT-2's N(0, 0.02) (cheaper to build for
    /// big models whose weights will be loaded anyway, and without zero-initialised paths).
    pub init: Init,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    Paper,
    Normal,
}

pub const DEFAULT_CHUNK: usize = 32;

impl Default for Rwkv4Options {
    fn default() -> Self {
        Self { embed_norm: true, chunk: DEFAULT_CHUNK, init: Init::Paper }
    }
}

impl crate::config::Options for Rwkv4Options {
    fn check(&self) -> AnyResult<()> {
        if self.chunk == 0 {
            bail!("model.options.chunk must be positive");
        }
        Ok(())
    }
}

/// RWKV-4's model: layer norms with biases, untied head, no positions, the RWKV channel mix
/// (and `ln0` after the embedding: [`Rwkv4Options::embed_norm`]).
pub fn adjust_defaults(cfg: &mut ModelConfig) {
    cfg.bias = true;
    cfg.tie_embeddings = false;
    cfg.position = Position::None;
    cfg.channel_mixer = "rwkv".into();
}

/// The token table and head: the official ones under [`Init::Paper`], GPT-2's under
/// [`Init::Normal`].
pub fn ends(cfg: &ModelConfig) -> AnyResult<crate::backbones::Ends> {
    Ok(match cfg.options::<Rwkv4Options>()?.init {
        Init::Paper => crate::backbones::Ends::Rwkv4,
        Init::Normal => crate::backbones::Ends::Gpt2,
    })
}

/// The official per-layer ramps: `(ratio_0_to_1, ratio_1_to_almost0)`.
fn ratios(layer: usize, depth: usize) -> (f64, f64) {
    let r01 = if depth > 1 { layer as f64 / (depth - 1) as f64 } else { 0.0 };
    (r01, 1.0 - layer as f64 / depth as f64)
}

/// `time_mix` ramp `(c / D)^power` as a `[1, 1, D]` parameter (not decayed), plus `add`.
fn time_mix(pb: &ParamBuilder, name: &str, d: usize, power: f64, add: f64) -> AnyResult<Tensor> {
    let v: Vec<f32> = (0..d).map(|c| ((c as f64 / d as f64).powf(power) + add) as f32).collect();
    pb.from_values(name, &[1, 1, d], v, false)
}

/// A bias-free linear layer: under `Init::Paper` zero or orthogonal times a gain (the official
/// `RWKV_Init`), under `Init::Normal` N(0, 1/fan_in).
enum Kind {
    Zero,
    Orthogonal(f64),
}

fn linear(pb: &ParamBuilder, name: &str, d_in: usize, d_out: usize, init: Init, kind: Kind) -> AnyResult<Linear> {
    let weight = match (init, kind) {
        (Init::Normal, _) => pb.normal(&format!("{name}.weight"), &[d_out, d_in], (d_in as f64).powf(-0.5))?,
        (Init::Paper, Kind::Zero) => {
            pb.from_values(&format!("{name}.weight"), &[d_out, d_in], vec![0.0; d_in * d_out], true)?
        }
        (Init::Paper, Kind::Orthogonal(gain)) => pb.orthogonal(&format!("{name}.weight"), d_out, d_in, gain, true)?,
    };
    Ok(Linear { weight, bias: None })
}

/// `mu (.) x + (1 - mu) (.) xx = xx + mu (.) (x - xx)`; `mu: [1, 1, D]`, computed in `x`'s
/// dtype.
fn mix(x: &Tensor, xx: &Tensor, mu: &Tensor) -> Result<Tensor> {
    xx + (x - xx)?.broadcast_mul(&mu.to_dtype(x.dtype())?)?
}

/// `x: [B, T, D]` -> the previous token's `x`: `[prev, x_0, ..., x_{T-2}]` (`prev: [B, D]`,
/// zeros at the start of a sequence).
fn token_shift(x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let first = match prev {
        Some(p) => p.reshape((b, 1, d))?,
        None => Tensor::zeros((b, 1, d), x.dtype(), x.device())?,
    };
    if t == 1 {
        return Ok(first);
    }
    Tensor::cat(&[first, x.narrow(1, 0, t - 1)?], 1)
}

/// The last token: `[B, T, D] -> [B, D]`.
fn last_token(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(1)?;
    x.narrow(1, t - 1, 1)?.squeeze(1)
}

/// Time mixing (`blocks.N.att.*`).
pub struct TimeMix {
    /// Raw decay parameter `[D]`: per-step decay `exp(-exp(time_decay))`.
    pub time_decay: Tensor,
    /// Bonus `u: [D]` for the current token.
    pub time_first: Tensor,
    pub time_mix_k: Tensor,
    pub time_mix_v: Tensor,
    pub time_mix_r: Tensor,
    pub key: Linear,
    pub value: Linear,
    pub receptance: Linear,
    pub output: Linear,
    pub chunk: usize,
}

impl TimeMix {
    pub fn new(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Self> {
        let o: Rwkv4Options = cfg.options()?;
        let d = cfg.width;
        let (r01, r10) = ratios(layer, cfg.depth);
        let decay: Vec<f32> = (0..d)
            .map(|c| {
                let x = if d > 1 { c as f64 / (d - 1) as f64 } else { 0.0 };
                (-5.0 + 8.0 * x.powf(0.7 + 1.3 * r01)) as f32
            })
            .collect();
        let first: Vec<f32> = (0..d).map(|c| (0.3f64.ln() + ((c + 1) % 3) as f64 * 0.5 - 0.5) as f32).collect();
        Ok(Self {
            time_decay: pb.from_values("time_decay", &[d], decay, false)?,
            time_first: pb.from_values("time_first", &[d], first, false)?,
            time_mix_k: time_mix(pb, "time_mix_k", d, r10, 0.0)?,
            time_mix_v: time_mix(pb, "time_mix_v", d, r10, 0.3 * r01)?,
            time_mix_r: time_mix(pb, "time_mix_r", d, 0.5 * r10, 0.0)?,
            key: linear(pb, "key", d, d, o.init, Kind::Zero)?,
            value: linear(pb, "value", d, d, o.init, Kind::Orthogonal(1.0))?,
            receptance: linear(pb, "receptance", d, d, o.init, Kind::Zero)?,
            output: linear(pb, "output", d, d, o.init, Kind::Zero)?,
            chunk: o.chunk,
        })
    }

    /// `x: [B, T, D]`, previous token `prev: [B, D]` -> `(sigmoid(r), k, v, w, u)`: `r, k, v`
    /// `[B, T, D]`, decay rate `w = exp(time_decay)` and bonus `u`, `[D]`; `k, v, w, u` in the
    /// accumulation dtype (f32 under bf16 activations), `sigmoid(r)` in `x`'s.
    fn project(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
        let acc = decayed::accumulation_dtype(x.dtype());
        let xx = token_shift(x, prev)?;
        let k = self.key.forward(&mix(x, &xx, &self.time_mix_k)?)?.to_dtype(acc)?;
        let v = self.value.forward(&mix(x, &xx, &self.time_mix_v)?)?.to_dtype(acc)?;
        let r = self.receptance.forward(&mix(x, &xx, &self.time_mix_r)?)?;
        let w = self.time_decay.to_dtype(acc)?.exp()?;
        Ok((candle_nn::ops::sigmoid(&r)?, k, v, w, self.time_first.to_dtype(acc)?))
    }

    /// `W_o (sigmoid(r) (.) y)` in `sr`'s dtype.
    fn out(&self, sr: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.output.forward(&(sr * y.to_dtype(sr.dtype())?)?)
    }

    /// Runs `wkv(k, v)` and the output projection.
    fn run(
        &self,
        x: &Tensor,
        prev: Option<&Tensor>,
        wkv: impl Fn(&Tensor, &Tensor, Weighting) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sr, k, v, w, u) = self.project(x, prev)?;
        self.out(&sr, &wkv(&k, &v, Weighting { decay: Some(&w), bonus: Some(&u) })?)
    }

    /// [`SequenceMixer::step`] in four launches besides the projections (`decode`): the
    /// three mixes, then the WKV read, update and gate.
    #[cfg(feature = "cuda")]
    fn step_fused(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let x = x.reshape((b, d))?;
        let mixed =
            decode::shift_mix(&x, state.tensors.first(), &[&self.time_mix_k, &self.time_mix_v, &self.time_mix_r])?;
        let k = self.key.forward(&mixed.get(0)?)?;
        let v = self.value.forward(&mixed.get(1)?)?;
        let r = self.receptance.forward(&mixed.get(2)?)?;
        let s = match state.tensors.get(1..) {
            Some(rest) if !rest.is_empty() => Some(WkvState::from_slice(rest)?),
            _ => None,
        };
        let (y, s) = decode::wkv_step(&k, &v, &r, s.as_ref(), &self.time_decay, &self.time_first)?;
        let mut tensors = vec![x];
        tensors.extend(s.to_vec());
        *state = MixerState { tensors, pos: state.pos + 1 };
        self.output.forward(&y)?.reshape((b, 1, d))
    }

    /// The quadratic `O(T^2 d)` reference (tests only).
    pub fn forward_naive(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, decayed::wkv_naive)
    }
}

impl SequenceMixer for TimeMix {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, |k, v, wt| Ok(decayed::wkv_chunked(k, v, wt, self.chunk, None)?.0))
    }

    /// State `[x_{T-1}, aa, bb, pp]`, each `[B, D]`.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        let (sr, k, v, w, u) = self.project(x, None)?;
        let (y, s) = decayed::wkv_chunked(&k, &v, Weighting { decay: Some(&w), bonus: Some(&u) }, self.chunk, None)?;
        let mut tensors = vec![last_token(x)?];
        tensors.extend(s.to_vec());
        Ok((self.out(&sr, &y)?, MixerState { tensors, pos: x.dim(1)? }))
    }

    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if decode::applies(x, &self.time_mix_k) {
            return self.step_fused(x, state);
        }
        let prev = state.tensors.first().cloned();
        let (sr, k, v, w, u) = self.project(x, prev.as_ref())?;
        let (k, v) = (k.squeeze(1)?, v.squeeze(1)?);
        let mut s = match state.tensors.get(1..) {
            Some(rest) if !rest.is_empty() => WkvState::from_slice(rest)?,
            _ => WkvState::empty(k.dim(0)?, k.dim(1)?, &k)?,
        };
        let y = decayed::wkv_step(&mut s, &k, &v, Weighting { decay: Some(&w), bonus: Some(&u) })?;
        let mut tensors = vec![x.squeeze(1)?];
        tensors.extend(s.to_vec());
        *state = MixerState { tensors, pos: state.pos + 1 };
        self.out(&sr, &y.unsqueeze(1)?)
    }

    fn chunked(&self, x: &Tensor, chunk: usize) -> Option<Result<Tensor>> {
        Some(self.run(x, None, |k, v, wt| Ok(decayed::wkv_chunked(k, v, wt, chunk, None)?.0)))
    }

    /// No position read; a state of `[B, D]` tensors.
    fn static_step(&self) -> bool {
        true
    }
}

/// Channel mixing (`blocks.N.ffn.*`).
pub struct ChannelMix {
    pub time_mix_k: Tensor,
    pub time_mix_r: Tensor,
    pub key: Linear,
    pub receptance: Linear,
    pub value: Linear,
}

impl ChannelMix {
    /// Hidden width `ffn_mult * d` (4 d in RWKV-4).
    pub fn new(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Self> {
        let init = if cfg.architecture == "rwkv4" { cfg.options::<Rwkv4Options>()?.init } else { Init::Paper };
        let d = cfg.width;
        let hidden = ((cfg.ffn_mult * d as f64).round() as usize).max(1);
        let (_, r10) = ratios(layer, cfg.depth);
        let gain = if hidden > d { (hidden as f64 / d as f64).sqrt() } else { 1.0 };
        Ok(Self {
            time_mix_k: time_mix(pb, "time_mix_k", d, r10, 0.0)?,
            time_mix_r: time_mix(pb, "time_mix_r", d, r10, 0.0)?,
            key: linear(pb, "key", d, hidden, init, Kind::Orthogonal(gain))?,
            receptance: linear(pb, "receptance", d, d, init, Kind::Zero)?,
            value: linear(pb, "value", hidden, d, init, Kind::Zero)?,
        })
    }

    fn run(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
        let xx = token_shift(x, prev)?;
        let k = self.key.forward(&mix(x, &xx, &self.time_mix_k)?)?.relu()?.sqr()?;
        let r = self.receptance.forward(&mix(x, &xx, &self.time_mix_r)?)?;
        candle_nn::ops::sigmoid(&r)? * self.value.forward(&k)?
    }
}

impl SequenceMixer for ChannelMix {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }

    /// State `[x_{T-1}]` (`[B, D]`).
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        Ok((self.run(x, None)?, MixerState { tensors: vec![last_token(x)?], pos: x.dim(1)? }))
    }

    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if decode::applies(x, &self.time_mix_k) {
            // the mixes in one launch, the squared ReLU and the gate in one each (`decode`)
            let (b, _, d) = x.dims3()?;
            let x = x.reshape((b, d))?;
            let mixed = decode::shift_mix(&x, state.tensors.first(), &[&self.time_mix_k, &self.time_mix_r])?;
            let k = decode::relu_square(&self.key.forward(&mixed.get(0)?)?)?;
            let y = decode::sigmoid_gate(&self.receptance.forward(&mixed.get(1)?)?, &self.value.forward(&k)?)?;
            *state = MixerState { tensors: vec![x], pos: state.pos + 1 };
            return y.reshape((b, 1, d));
        }
        let y = self.run(x, state.tensors.first())?;
        *state = MixerState { tensors: vec![x.squeeze(1)?], pos: state.pos + 1 };
        Ok(y)
    }

    /// No position read; a state of `[B, D]` tensors.
    fn static_step(&self) -> bool {
        true
    }
}

pub fn build(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(TimeMix::new(cfg, layer, pb)?))
}

/// The RWKV channel mix as the block's channel mixer (`model.channel_mixer = "rwkv"`).
pub fn channel_mix(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(ChannelMix::new(cfg, layer, pb)?))
}

pub const COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("RWKV"),
        judgement: Judgement::Imprecise(
            "O(Td) omits the O(T d^2) projections, and decoding keeps only O(d) state per layer; the channel mix is not max pooling but sigma(r) * W_v max(k, 0)^2 (squared ReLU)",
        ),
    },
    true_time: "O(T d^2) projections + O(T d) WKV (chunkwise here: O(T C d), C = chunk); decode O(d^2) per token",
    true_space: "O(T C d) training (chunkwise WKV); O(d) state per layer decoding",
    flops: |s: &CostShape| {
        let (b, t, d, c) = (s.batch as f64, s.seq as f64, s.width as f64, DEFAULT_CHUNK as f64);
        // r, k, v, output projections (4 d^2 MACs per token) + chunkwise WKV (about 4 C d for
        // the in-chunk weights and sums) + gates and mixes
        b * (8.0 * t * d * d + 4.0 * t * c * d + 12.0 * t * d)
    },
    memory: |s: &CostShape| {
        let (b, t, d, c) = (s.batch as f64, s.seq as f64, s.width as f64, DEFAULT_CHUNK as f64);
        b * (2.0 * t * c * d + 8.0 * t * d)
    },
    state: |s: &CostShape| 4.0 * (s.batch * s.width) as f64,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{self, randn, random_tokens, rel_err, tiny_config};
    use candle_core::{DType, Device};
    use std::collections::BTreeMap;

    /// Chunks of 5 over the tests' 10-13 positions cross chunk boundaries.
    fn tiny(sets: &[&str]) -> ModelConfig {
        tiny_config("rwkv4", &[&["model.options.chunk=5"], sets].concat()).unwrap()
    }

    /// Random (not zero) weights everywhere, so every path carries signal.
    fn random_mixer(cfg: &ModelConfig, dtype: DType) -> TimeMix {
        let mut cfg = cfg.clone();
        cfg.options.insert("init".into(), "normal".into());
        let pb = ParamBuilder::new(3, &Device::Cpu, dtype);
        let mut m = TimeMix::new(&cfg, 0, &pb).unwrap();
        let d = cfg.width;
        let scale = |x: Linear| Linear { weight: (x.weight * 2.0).unwrap(), bias: None };
        m.key = scale(m.key);
        m.value = scale(m.value);
        m.receptance = scale(m.receptance);
        m.time_first = randn(&[d], 4, dtype).unwrap();
        m
    }

    #[test]
    fn rwkv4_modes_agree() -> AnyResult<()> {
        let cfg = tiny(&[]);
        let m = random_mixer(&cfg, DType::F32);
        for t in [10, 13] {
            let x = randn(&[2, t, cfg.width], 1, DType::F32)?;
            let naive = m.forward_naive(&x)?;
            assert!(rel_err(&m.forward(&x)?, &naive)? < 1e-4);
            assert!(rel_err(&m.chunked(&x, 4).unwrap()?, &naive)? < 1e-4);
            testing::assert_mixer_modes_agree(&m, &x, &[0, 1, 7])?;
        }
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        for t in [10, 13] {
            let tokens = random_tokens(2, t, cfg.vocab, 5)?;
            testing::assert_modes_agree(&model, &tokens, &[0, 4])?;
        }
        Ok(())
    }

    #[test]
    fn rwkv4_is_causal() -> AnyResult<()> {
        let cfg = tiny(&[]);
        let m = random_mixer(&cfg, DType::F32);
        let x = randn(&[2, 13, cfg.width], 2, DType::F32)?;
        testing::assert_causal(&|x| Ok(m.forward(x)?), &x)?;
        let model = Model::new(&tiny(&["model.options.init=normal"]), 1, &Device::Cpu, DType::F32)?;
        let tokens = random_tokens(2, 13, cfg.vocab, 3)?;
        // model-level: perturbing later tokens leaves earlier logits unchanged
        let y = model.forward(&tokens, None)?;
        let other = random_tokens(2, 13, cfg.vocab, 4)?;
        let mixed = Tensor::cat(&[tokens.narrow(1, 0, 6)?, other.narrow(1, 6, 7)?], 1)?;
        let y2 = model.forward(&mixed, None)?;
        let a: Vec<f32> = y.narrow(1, 0, 6)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = y2.narrow(1, 0, 6)?.flatten_all()?.to_vec1()?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn rwkv4_gradients_match_finite_differences() -> AnyResult<()> {
        // random init so that no path is zero; chunk 5 over 12 tokens crosses chunks
        let cfg = tiny(&["model.options.init=normal"]);
        let e = testing::model_gradient_err(&cfg, 7)?;
        assert!(e < 1e-4, "{e}");
        Ok(())
    }

    #[test]
    fn rwkv4_state_is_constant_in_t() -> AnyResult<()> {
        let cfg = tiny(&[]);
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let bytes =
            |t: usize| -> AnyResult<usize> { Ok(model.prefill(&random_tokens(1, t, cfg.vocab, 1)?)?.1.bytes()) };
        let (a, b) = (bytes(3)?, bytes(20)?);
        assert_eq!(a, b);
        // x_prev, aa, bb, pp for time mixing and x_prev for channel mixing, per layer
        assert_eq!(a, cfg.depth * 5 * cfg.width * 4);
        Ok(())
    }

    #[test]
    fn rwkv4_large_keys_stay_finite() -> AnyResult<()> {
        let cfg = tiny(&[]);
        let mut m = random_mixer(&cfg, DType::F32);
        // keys around +-30 and a fast decay on some channels
        let d = cfg.width;
        m.key = Linear { weight: (Tensor::eye(d, DType::F32, &Device::Cpu)? * 30.0)?, bias: None };
        let x = randn(&[2, 24, d], 9, DType::F32)?.sign()?;
        let k = m.key.forward(&x)?;
        assert!(k.abs()?.max_all()?.to_scalar::<f32>()? > 20.0);
        for y in [m.forward(&x)?, m.forward_naive(&x)?, testing::mixer_recurrent(&m, &x, 5)?] {
            assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
        }
        assert!(testing::mixer_modes_err(&m, &x, 5)? < 1e-4);
        Ok(())
    }

    #[test]
    fn rwkv4_parameter_names_and_shapes_follow_the_checkpoints() -> AnyResult<()> {
        let cfg = tiny(&[]);
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let d = cfg.width;
        let shapes: BTreeMap<String, Vec<usize>> =
            model.params.tensors().into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect();
        let expect = [
            ("emb.weight", vec![cfg.vocab, d]),
            ("blocks.0.ln0.weight", vec![d]),
            ("blocks.0.ln0.bias", vec![d]),
            ("blocks.1.ln1.bias", vec![d]),
            ("blocks.1.att.time_decay", vec![d]),
            ("blocks.1.att.time_first", vec![d]),
            ("blocks.1.att.time_mix_k", vec![1, 1, d]),
            ("blocks.1.att.time_mix_v", vec![1, 1, d]),
            ("blocks.1.att.time_mix_r", vec![1, 1, d]),
            ("blocks.1.att.key.weight", vec![d, d]),
            ("blocks.1.att.value.weight", vec![d, d]),
            ("blocks.1.att.receptance.weight", vec![d, d]),
            ("blocks.1.att.output.weight", vec![d, d]),
            ("blocks.1.ffn.time_mix_k", vec![1, 1, d]),
            ("blocks.1.ffn.time_mix_r", vec![1, 1, d]),
            ("blocks.1.ffn.key.weight", vec![4 * d, d]),
            ("blocks.1.ffn.receptance.weight", vec![d, d]),
            ("blocks.1.ffn.value.weight", vec![d, 4 * d]),
            ("ln_out.weight", vec![d]),
            ("ln_out.bias", vec![d]),
            ("head.weight", vec![cfg.vocab, d]),
        ];
        for (name, dims) in expect {
            assert_eq!(shapes.get(name), Some(&dims), "{name}");
        }
        // emb, head, ln0, ln_out; per block: ln1, ln2 (weight, bias), 5 time + 4 att matrices,
        // 2 time + 3 ffn matrices
        assert_eq!(shapes.len(), 2 + 2 + 2 + cfg.depth * (4 + 9 + 5));
        // the official ramps: layer 0 time_mix_k = (c/D)^1, decays from -5 to 3
        let tm: Vec<f32> = model.params.tensors()["blocks.0.att.time_mix_k"].flatten_all()?.to_vec1()?;
        assert!((tm[d / 2] - 0.5).abs() < 1e-6);
        let td: Vec<f32> = model.params.tensors()["blocks.0.att.time_decay"].to_vec1()?;
        assert!((td[0] + 5.0).abs() < 1e-6 && (td[d - 1] - 3.0).abs() < 1e-5);
        // orthogonal att.value: W W^T = I
        let w = &model.params.tensors()["blocks.0.att.value.weight"];
        let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
        assert!(rel_err(&w.matmul(&w.t()?)?, &eye)? < 1e-5);
        Ok(())
    }

    /// The official trainers' ends (issue 19): the token table U(-1e-4, 1e-4), the untied
    /// head orthogonal with gain 0.5 max(1, sqrt(V / d)); `init = normal` keeps GPT-2's
    /// N(0, 0.02), as every other architecture has.
    #[test]
    fn rwkv4_ends_start_as_in_the_official_trainer() -> AnyResult<()> {
        let std = |t: &Tensor| -> AnyResult<f32> { Ok(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?) };
        let cfg = tiny(&[]);
        let (v, d) = (cfg.vocab, cfg.width);
        assert!(v > d, "the head's gain is 0.5 sqrt(V / d) only where V > d");
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let p = model.params.tensors();
        let emb = &p["emb.weight"];
        assert!(emb.abs()?.max_all()?.to_scalar::<f32>()? <= 1e-4);
        let uniform_std = 1e-4 / 3f32.sqrt();
        assert!((std(emb)? / uniform_std - 1.0).abs() < 0.05, "{}", std(emb)?);
        // columns orthonormal times the gain: W^T W = gain^2 I
        let head = &p["head.weight"];
        let gain = 0.5 * (v as f64 / d as f64).sqrt();
        let eye = (Tensor::eye(d, DType::F32, &Device::Cpu)? * (gain * gain))?;
        assert!(rel_err(&head.t()?.matmul(head)?, &eye)? < 1e-5);
        for name in ["rwkv4", "transformer"] {
            let sets: &[&str] = if name == "rwkv4" { &["model.options.init=normal"] } else { &[] };
            let model = Model::new(&tiny_config(name, sets)?, 1, &Device::Cpu, DType::F32)?;
            for w in ["emb.weight", "head.weight"].iter().filter_map(|n| model.params.tensors().get(*n).cloned()) {
                assert!((std(&w)? / 0.02 - 1.0).abs() < 0.05, "{name}: {}", std(&w)?);
            }
        }
        Ok(())
    }

    #[test]
    fn rwkv4_runs_under_mixed_precision() -> AnyResult<()> {
        let cfg = tiny(&["model.options.init=normal"]);
        let (e, modes) = crate::testing::mixed_precision_errs(&cfg)?;
        assert!(e < 0.05, "{e}");
        assert!(modes < 0.05, "{modes}");
        Ok(())
    }
}
