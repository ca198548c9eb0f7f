//! Performer: FAVOR+ attention (Choromanski et al. 2021, arXiv 2009.14794).
//!
//! Softmax attention's kernel `SM(x, y) = exp(x^T y)` is estimated without bias by positive
//! random features (the paper's Lemma 1, eq. 7 with `h(x) = exp(-|x|^2 / 2)`):
//!
//! ```text
//! phi(x) = exp(-|x|^2 / 2) / sqrt(m) [exp(w_1^T x), ..., exp(w_m^T x)],   w_i ~ N(0, I_d)
//! E[phi(x)^T phi(y)] = exp(x^T y)
//! ```
//!
//! With queries and keys scaled by `d_h^(-1/4)`, `exp(q'^T k') = exp(q^T k / sqrt(d_h))`, and
//! attention becomes (section 2.2, eq. 4-5, `Q' = phi(Q d_h^-1/4)`, `K' = phi(K d_h^-1/4)`):
//!
//! ```text
//! bidirectional:  Att(Q, K, V) = D^-1 (Q' ((K')^T V)),     D = diag(Q' ((K')^T 1_T))
//! causal:         y_t = q'_t S_t / (q'_t z_t),  S_t = sum_{i<=t} k'_i^T v_i,  z_t = sum_{i<=t} k'_i^T
//! ```
//!
//! The causal form is prefix sums (section 2.6, eq. 11): the decayed-linear-attention
//! primitive [`crate::ops::decayed`] with decay 1 (`log_decay = 0`), its chunkwise form and
//! CUDA kernel; `[v, 1]` as the value gives the numerator and the normaliser `q'_t z_t` in one
//! pass. Decoding keeps `[S_t, z_t]`: `[B, H, m, d_h + 1]` per layer, independent of `T`.
//!
//! Features (section 2.4, "orthogonal random features"): the `m` rows `w_i` are drawn in
//! blocks of `d_h` mutually orthogonal rows (the Q factor of a Gaussian `d_h x d_h` matrix,
//! by Gram-Schmidt), each row rescaled to the norm of a fresh Gaussian vector (chi-distributed
//! with `d_h` degrees of freedom), so every row is marginally `N(0, I)` and the estimator stays
//! unbiased with lower variance; `model.options.orthogonal = false` draws them iid. `m`
//! defaults to `round(d_h ln d_h)` (Theorem 4: `m = Theta(d log d)`). One feature matrix per
//! layer, shared by the heads (as the official code), a function of `(feature_seed, layer,
//! epoch)` with `epoch = step / redraw_every` (the model's training step, from its
//! [`StepClock`]): redrawn every `redraw_every` training steps (0: never), fixed within a
//! step's forward and backward and for evaluation after it.
//!
//! Numerical stabilisers, both exact: a query's features are divided by their largest (a
//! per-row constant that cancels between numerator and normaliser), a key's by the
//! data-independent `exp(max_i |w_i|^2 / 2)` (since `w^T x - |x|^2 / 2 <= |w|^2 / 2`, every
//! key feature is then at most 1): no maximum is taken over positions, so causality is exact.
//! The official code's maximum over all keys would let future keys change past outputs. Keys
//! far from every feature can still underflow (f32: `|x - w_i|^2 / 2` past about 87 for all
//! i); a normaliser that underflows to 0 gives an output of 0, not NaN.
//!
//! Projections as the Transformer's ([`Attention`]'s `qkv` and `out`, GPT-2 initialisation);
//! only the attention kernel differs.

use std::sync::Mutex;

use anyhow::{bail, Result as AnyResult};
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::attention::Attention;
use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Review};
use crate::config::ModelConfig;
use crate::ops::decayed;
use crate::params::{ParamBuilder, StepClock};
use crate::rng::{stream, Rng};

/// `model.options` of `performer`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerformerOptions {
    /// Random features `m` per layer; 0: `round(d_h ln d_h)`.
    pub features: usize,
    /// Orthogonal blocks with chi-distributed norms (FAVOR+); false: iid Gaussian features.
    pub orthogonal: bool,
    /// Training steps between feature redraws; 0: never (the features of step 0 throughout).
    pub redraw_every: usize,
    /// The features are a function of this seed, the layer and the redraw epoch only (not of
    /// the weights' seed).
    pub feature_seed: u64,
    /// Chunk length of the chunkwise prefix sums.
    pub chunk: usize,
}

/// Longest feature count accepted: `[B, H, T, m]` feature maps beyond it are a mistake.
pub const MAX_FEATURES: usize = 1 << 16;

impl Default for PerformerOptions {
    fn default() -> Self {
        Self { features: 0, orthogonal: true, redraw_every: 1000, feature_seed: 0, chunk: 64 }
    }
}

impl crate::config::Options for PerformerOptions {
    fn check(&self) -> AnyResult<()> {
        if self.chunk == 0 {
            bail!("model.options.chunk must be positive");
        }
        if self.features > MAX_FEATURES {
            bail!("model.options.features is {}, more than {MAX_FEATURES}", self.features);
        }
        Ok(())
    }
}

/// The paper's default feature count for head width `d_h`: `round(d_h ln d_h)`, at least 1.
pub fn default_features(head_dim: usize) -> usize {
    ((head_dim as f64) * (head_dim as f64).ln()).round().max(1.0) as usize
}

/// Draws `m` Gaussian feature rows of width `d`, row-major `[m, d]`: orthogonal blocks of `d`
/// rows (Gram-Schmidt on Gaussian rows, i.e. the Q factor of their QR decomposition, which is
/// Haar-distributed) each rescaled to the norm of a fresh Gaussian vector, or iid `N(0, 1)`.
pub fn draw_features(m: usize, d: usize, orthogonal: bool, rng: &mut Rng) -> Vec<f64> {
    let mut w: Vec<f64> = (0..m * d).map(|_| rng.normal()).collect();
    if !orthogonal {
        return w;
    }
    for block in w.chunks_mut(d * d) {
        orthonormalise_rows(block, d, rng);
    }
    for row in w.chunks_mut(d) {
        let chi = (0..d).map(|_| rng.normal().powi(2)).sum::<f64>().sqrt();
        row.iter_mut().for_each(|x| *x *= chi);
    }
    w
}

/// Modified Gram-Schmidt on the rows (each of width `d`) of `rows`: afterwards they are
/// orthonormal. A row that (with probability zero) falls into the span of the earlier ones is
/// redrawn.
fn orthonormalise_rows(rows: &mut [f64], d: usize, rng: &mut Rng) {
    let n = rows.len() / d;
    for i in 0..n {
        loop {
            let (done, rest) = rows.split_at_mut(i * d);
            let row = &mut rest[..d];
            for prev in done.chunks(d) {
                let dot: f64 = prev.iter().zip(row.iter()).map(|(a, b)| a * b).sum();
                row.iter_mut().zip(prev).for_each(|(r, p)| *r -= dot * p);
            }
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-8 {
                row.iter_mut().for_each(|x| *x /= norm);
                break;
            }
            row.iter_mut().for_each(|x| *x = rng.normal());
        }
    }
}

/// What is subtracted from the exponent of [`positive_features`] (exact after normalisation:
/// every choice is constant along the key positions a normaliser sums over).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stabiliser {
    /// Nothing: the paper's `phi` exactly (the unbiased estimator of `exp(x^T y)`).
    None,
    /// Each row's largest exponent, `|x|^2 / 2` included (queries): the largest feature is
    /// `1 / sqrt(m)` at any norm. (The official code subtracts the largest `w^T x` only, which
    /// leaves `exp(-|x|^2 / 2)` to underflow for large queries.)
    RowMax,
    /// `max_i |w_i|^2 / 2`, a bound of every exponent that depends on the features only (keys).
    FeatureBound,
}

/// `phi(x) = exp(w^T x - |x|^2 / 2 - c) / sqrt(m)` per row of `x`: `x: [..., d]` (already
/// scaled), `w: [m, d]` -> `[..., m]`, `c` as `stabiliser` says (detached; it only rescales).
pub fn positive_features(x: &Tensor, w: &Tensor, stabiliser: Stabiliser) -> Result<Tensor> {
    let (m, d) = w.dims2()?;
    let lead = x.dims()[..x.rank() - 1].to_vec();
    let rows: usize = lead.iter().product();
    let projected = x.reshape((rows, d))?.matmul(&w.t()?)?; // [rows, m]
    let half_norm = (x.reshape((rows, d))?.sqr()?.sum_keepdim(1)? * 0.5)?;
    let mut exponent = projected.broadcast_sub(&half_norm)?;
    match stabiliser {
        Stabiliser::None => {}
        Stabiliser::RowMax => exponent = exponent.broadcast_sub(&exponent.max_keepdim(1)?.detach())?,
        Stabiliser::FeatureBound => {
            let bound = (w.sqr()?.sum(1)?.max(0)?.detach() * 0.5)?;
            exponent = exponent.broadcast_sub(&bound)?;
        }
    }
    let mut dims = lead;
    dims.push(m);
    (exponent.exp()? * (1.0 / (m as f64).sqrt()))?.reshape(dims)
}

/// `o1 = [numerator, normaliser]` (last column) -> numerator / normaliser. The normaliser is a
/// sum of positive terms; a floor at the smallest normal f32 turns an underflow to 0 into an
/// output of 0 rather than NaN and leaves every representable value unchanged.
fn normalise(o1: &Tensor) -> Result<Tensor> {
    let dv = o1.dim(D::Minus1)? - 1;
    let den = o1.narrow(D::Minus1, dv, 1)?.maximum(f32::MIN_POSITIVE as f64)?;
    o1.narrow(D::Minus1, 0, dv)?.broadcast_div(&den)
}

/// `v: [B, H, T, d_v]` -> `[v, 1]: [B, H, T, d_v + 1]`.
fn with_ones(v: &Tensor) -> Result<Tensor> {
    let (b, h, t, _) = v.dims4()?;
    Tensor::cat(&[v, &Tensor::ones((b, h, t, 1), v.dtype(), v.device())?], 3)
}

/// `log_decay = 0` for `h` heads: the decayed primitive as plain prefix sums.
fn no_decay(h: usize, like: &Tensor) -> Result<Tensor> {
    Tensor::zeros(h, like.dtype(), like.device())
}

/// Causal FAVOR+ by prefix sums: `q_feat, k_feat: [B, H, T, m]`, `v: [B, H, T, d_v]`, `state`
/// `[B, H, m, d_v + 1]` before the first token (`None`: empty) -> (`y: [B, H, T, d_v]`, the
/// state after the last token). Chunkwise (chunks of `chunk`; the fused scan on CUDA).
pub fn causal_favor(
    q_feat: &Tensor,
    k_feat: &Tensor,
    v: &Tensor,
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let h = q_feat.dim(1)?;
    let (o1, s) = decayed::linear_chunked(q_feat, k_feat, &with_ones(v)?, &no_decay(h, q_feat)?, chunk, state)?;
    Ok((normalise(&o1)?, s))
}

/// One decoding step of [`causal_favor`] (`T = 1`), advancing `state` (`None`: empty).
pub fn causal_favor_step(
    q_feat: &Tensor,
    k_feat: &Tensor,
    v: &Tensor,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let h = q_feat.dim(1)?;
    let (o1, s) = decayed::linear_step(q_feat, k_feat, &with_ones(v)?, &no_decay(h, q_feat)?, state)?;
    Ok((normalise(&o1)?, s))
}

/// Bidirectional FAVOR+, `D^-1 Q' ((K')^T [V 1])`: `q_feat: [B, H, T, m]`, `k_feat: [B, H,
/// S, m]`, `v: [B, H, S, d_v]` -> `[B, H, T, d_v]`, in `O((T + S) m d_v)`. For encoders; the
/// registered `performer` is causal.
pub fn bidirectional_favor(q_feat: &Tensor, k_feat: &Tensor, v: &Tensor) -> Result<Tensor> {
    normalise(&q_feat.matmul(&k_feat.t()?.matmul(&with_ones(v)?)?)?)
}

/// The features of one (q, k) pair of heads: `q, k: [..., d_h]` (unscaled) -> `(Q', K')`.
pub fn query_key_features(q: &Tensor, k: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let scale = (w.dim(1)? as f64).powf(-0.25);
    Ok((
        positive_features(&(q * scale)?, w, Stabiliser::RowMax)?,
        positive_features(&(k * scale)?, w, Stabiliser::FeatureBound)?,
    ))
}

/// The relative error `|Y~ - Y|_F / |Y|_F` of causal FAVOR+ with `m` features (drawn from
/// `rng`) against exact causal softmax attention `Y`: `q, k, v: [B, H, T, d_h]`, f64 on the CPU
/// advised. What `altformers bench performer-error` prints and the tests hold to the paper.
pub fn approximation_error(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    m: usize,
    orthogonal: bool,
    rng: &mut Rng,
) -> Result<f64> {
    let d = q.dim(3)?;
    let w = Tensor::from_vec(draw_features(m, d, orthogonal, rng), (m, d), q.device())?.to_dtype(q.dtype())?;
    let (qf, kf) = query_key_features(q, k, &w)?;
    let (approx, _) = causal_favor(&qf, &kf, v, 64, None)?;
    let exact = crate::ops::attention::causal_attention(q, k, v, 0)?;
    let norm = |x: &Tensor| -> Result<f64> { x.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>() };
    Ok(norm(&(approx - &exact)?)? / norm(&exact)?)
}

/// The feature matrix in use and the redraw epoch it belongs to.
struct Drawn {
    epoch: usize,
    /// `[m, d_h]`, f64, on the parameters' device.
    w: Tensor,
}

pub struct Performer {
    /// The `qkv` and `out` projections (and rotary positions, if configured).
    projections: Attention,
    features: usize,
    orthogonal: bool,
    redraw_every: usize,
    feature_seed: u64,
    layer: usize,
    chunk: usize,
    clock: StepClock,
    device: Device,
    drawn: Mutex<Option<Drawn>>,
}

impl Performer {
    pub fn new(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Self> {
        let o: PerformerOptions = cfg.options()?;
        if cfg.kv_heads() != cfg.heads {
            bail!(
                "performer: model.kv_heads ({}) must equal model.heads ({}): grouped keys and values are not implemented",
                cfg.kv_heads(),
                cfg.heads
            );
        }
        let features = if o.features == 0 { default_features(cfg.head_dim()) } else { o.features };
        Ok(Self {
            projections: Attention::new(cfg, pb)?,
            features,
            orthogonal: o.orthogonal,
            redraw_every: o.redraw_every,
            feature_seed: o.feature_seed,
            layer,
            chunk: o.chunk,
            clock: pb.clock.clone(),
            device: pb.device.clone(),
            drawn: Mutex::new(None),
        })
    }

    /// The redraw epoch of the model's current training step.
    pub fn epoch(&self) -> usize {
        self.clock.get().checked_div(self.redraw_every).unwrap_or(0)
    }

    /// The feature matrix of redraw epoch `epoch`: `[m, d_h]` in f64.
    pub fn features_of_epoch(&self, epoch: usize, head_dim: usize) -> Result<Tensor> {
        let mut rng = Rng::derive(self.feature_seed, stream::FEATURES, ((self.layer as u64) << 32) ^ epoch as u64);
        let w = draw_features(self.features, head_dim, self.orthogonal, &mut rng);
        Tensor::from_vec(w, (self.features, head_dim), &self.device)
    }

    /// The features of the current epoch in `dtype`, drawn once per epoch.
    fn current_features(&self, head_dim: usize, dtype: DType) -> Result<Tensor> {
        let epoch = self.epoch();
        let mut drawn =
            self.drawn.lock().map_err(|_| candle_core::Error::Msg("performer: features lock poisoned".into()))?;
        let w = match drawn.as_ref() {
            Some(d) if d.epoch == epoch => d.w.clone(),
            _ => {
                let w = self.features_of_epoch(epoch, head_dim)?;
                *drawn = Some(Drawn { epoch, w: w.clone() });
                w
            }
        };
        w.to_dtype(dtype)
    }

    /// `x: [B, T, D]` at positions `offset..` -> `(Q', K', V)`: features `[B, H, T, m]` and
    /// values `[B, H, T, d_h]`, in the accumulation dtype (f32 under bf16 activations).
    fn featurise(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.projections.project(x, offset)?;
        let acc = decayed::accumulation_dtype(x.dtype());
        let w = self.current_features(q.dim(3)?, acc)?;
        let (qf, kf) = query_key_features(&q.to_dtype(acc)?, &k.to_dtype(acc)?, &w)?;
        Ok((qf, kf, v.to_dtype(acc)?))
    }

    fn chunkwise(&self, x: &Tensor, chunk: usize) -> Result<(Tensor, Tensor)> {
        let (qf, kf, v) = self.featurise(x, 0)?;
        let (y, s) = causal_favor(&qf, &kf, &v, chunk, None)?;
        Ok((self.projections.merge(&y.to_dtype(x.dtype())?)?, s))
    }
}

impl SequenceMixer for Performer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.chunkwise(x, self.chunk)?.0)
    }

    /// State `[S]`, `S: [B, H, m, d_h + 1]`: `sum_i k'_i^T [v_i, 1]`.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        let (y, s) = self.chunkwise(x, self.chunk)?;
        Ok((y, MixerState { tensors: vec![s.detach()], pos: x.dim(1)? }))
    }

    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        let (qf, kf, v) = self.featurise(x, state.pos)?;
        let (y, s) = causal_favor_step(&qf, &kf, &v, state.tensors.first())?;
        *state = MixerState { tensors: vec![s.detach()], pos: state.pos + 1 };
        self.projections.merge(&y.to_dtype(x.dtype())?)
    }

    fn chunked(&self, x: &Tensor, chunk: usize) -> Option<Result<Tensor>> {
        Some(self.chunkwise(x, chunk).map(|(y, _)| y))
    }
}

pub fn build(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Performer::new(cfg, layer, pb)?))
}

/// `m` for the cost model: the default `d_h ln d_h`.
fn cost_features(s: &CostShape) -> f64 {
    default_features(s.width / s.heads.max(1)) as f64
}

pub const COMPLEXITY: Complexity = Complexity {
    review: Review { stated_time: "O(Td^2 log d)", stated_space: "O(Td log d + d^2 lod d)", error: "" },
    true_time: "O(T m d + T d^2), m = d_h ln d_h features (O(T d d_h log d_h)); decode O(m d + d^2) per token",
    true_space: "O(T m h + T d) (feature maps); O(h m d_h) = O(m d) state per layer decoding, independent of T",
    flops: |s: &CostShape| {
        let (b, t, d, m) = (s.batch as f64, s.seq as f64, s.width as f64, cost_features(s));
        let (h, c) = (s.heads as f64, 64f64.min(t));
        // projections (4 d^2 MACs per token); features of q and k (2 h m d_h = 2 m d); in-chunk
        // scores and sums (C h (m + d_h)); state read and write (2 h m (d_h + 1))
        b * t * 2.0 * (4.0 * d * d + 2.0 * m * d + c * h * m + c * d + 2.0 * m * (d + h))
    },
    memory: |s: &CostShape| {
        let (b, t, d, m, h) = (s.batch as f64, s.seq as f64, s.width as f64, cost_features(s), s.heads as f64);
        b * (2.0 * t * m * h + h * t * 64f64.min(t) + 5.0 * t * d)
    },
    state: |s: &CostShape| {
        let (b, d, m, h) = (s.batch as f64, s.width as f64, cost_features(s), s.heads as f64);
        b * m * (d + h)
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{self, randn, random_tokens, rel_err, tiny_config};

    /// Chunks of 5 over the tests' 10-13 positions cross chunk boundaries.
    fn tiny(sets: &[&str]) -> ModelConfig {
        tiny_config("performer", &[&["model.options.chunk=5"], sets].concat()).unwrap()
    }

    fn mixer(cfg: &ModelConfig, dtype: DType) -> Performer {
        Performer::new(cfg, 0, &ParamBuilder::new(3, &Device::Cpu, dtype)).unwrap()
    }

    fn features(m: usize, d: usize, orthogonal: bool, seed: u64) -> Tensor {
        let w = draw_features(m, d, orthogonal, &mut Rng::new(seed));
        Tensor::from_vec(w, (m, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn performer_features_are_unbiased_for_the_softmax_kernel() -> anyhow::Result<()> {
        // E[phi(x) . phi(y)] = exp(x . y), x = q d^-1/4, y = k d^-1/4: exp(q . k / sqrt(d)).
        // Mean over 4000 independent draws of m = 8 features, against its standard error.
        // (The estimator's variance grows as exp(|x + y|^2): inputs of moderate norm keep the
        // standard error small enough for the test to tell a biased estimator.)
        let (d, m, draws) = (8, 8, 20000);
        let q = (randn(&[3, d], 1, DType::F64)? * 0.5)?;
        let k = (randn(&[3, d], 2, DType::F64)? * 0.5)?;
        let scale = (d as f64).powf(-0.25);
        let exact: Vec<f64> = ((&q * &k)?.sum(1)? / (d as f64).sqrt())?.exp()?.to_vec1()?;
        for orthogonal in [true, false] {
            let mut samples = vec![Vec::new(); 3];
            for draw in 0..draws {
                let w = features(m, d, orthogonal, 1000 + draw as u64);
                let qf = positive_features(&(&q * scale)?, &w, Stabiliser::None)?;
                let kf = positive_features(&(&k * scale)?, &w, Stabiliser::None)?;
                let dots: Vec<f64> = (qf * kf)?.sum(1)?.to_vec1()?;
                for (s, v) in samples.iter_mut().zip(dots) {
                    s.push(v);
                }
            }
            for (s, &e) in samples.iter().zip(&exact) {
                let n = s.len() as f64;
                let mean = s.iter().sum::<f64>() / n;
                let sd = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
                let se = sd / n.sqrt();
                // the Monte-Carlo error is small (the test can tell) and the mean lies within it
                assert!(se < 0.01 * e, "orthogonal {orthogonal}: standard error {se} vs {e}");
                assert!(
                    (mean - e).abs() < 4.0 * se,
                    "orthogonal {orthogonal}: mean {mean} vs exp(q.k/sqrt d) {e} (se {se})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn performer_feature_blocks_are_orthogonal_with_chi_norms() -> anyhow::Result<()> {
        let (d, m) = (6, 15); // two full blocks and a partial one
        let w = draw_features(m, d, true, &mut Rng::new(4));
        let row = |i: usize| &w[i * d..(i + 1) * d];
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        for i in 0..m {
            for j in 0..i {
                let cos = dot(row(i), row(j)) / (dot(row(i), row(i)) * dot(row(j), row(j))).sqrt();
                if i / d == j / d {
                    assert!(cos.abs() < 1e-12, "rows {i}, {j} of one block: cosine {cos}");
                }
            }
        }
        // norms are not all one value (each is a fresh chi variable) and average to d in square
        let big = draw_features(6000, d, true, &mut Rng::new(5));
        let sq: Vec<f64> = big.chunks(d).map(|r| dot(r, r)).collect();
        let mean = sq.iter().sum::<f64>() / sq.len() as f64;
        assert!((mean - d as f64).abs() < 0.25, "mean squared norm {mean} vs {d}");
        assert!(sq.iter().any(|&s| s < 0.5 * d as f64) && sq.iter().any(|&s| s > 1.5 * d as f64));
        Ok(())
    }

    /// Mean relative error against exact causal attention over `draws` feature draws.
    fn mean_error(q: &Tensor, k: &Tensor, v: &Tensor, m: usize, orthogonal: bool, draws: u64) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for draw in 0..draws {
            total += approximation_error(q, k, v, m, orthogonal, &mut Rng::new(draw * 7919 + m as u64))?;
        }
        Ok(total / draws as f64)
    }

    #[test]
    fn performer_error_falls_with_m_and_orthogonal_beats_iid() -> anyhow::Result<()> {
        // logits q.k / sqrt(d) of standard deviation 0.36; at larger norms the estimator's
        // variance (exp(|x + y|^2)) needs far more features (`bench performer-error` maps it)
        let (d, t) = (16, 48);
        let q = (randn(&[1, 2, t, d], 11, DType::F64)? * 0.6)?;
        let k = (randn(&[1, 2, t, d], 12, DType::F64)? * 0.6)?;
        let v = randn(&[1, 2, t, d], 13, DType::F64)?;
        let (mut orth, mut iid) = (vec![], vec![]);
        for m in [16, 64, 256, 1024, 4096] {
            orth.push(mean_error(&q, &k, &v, m, true, 8)?);
            iid.push(mean_error(&q, &k, &v, m, false, 8)?);
        }
        for errs in [&orth, &iid] {
            // each fourfold m lowers the error; 256x more features: well over 4x smaller
            assert!(errs.windows(2).all(|w| w[1] < w[0]), "{errs:?}");
            assert!(errs[4] < errs[0] / 4.0, "{errs:?}");
        }
        let (o, i) = (orth.iter().sum::<f64>(), iid.iter().sum::<f64>());
        assert!(o < i, "orthogonal {orth:?} vs iid {iid:?}");
        Ok(())
    }

    #[test]
    fn performer_prefix_sums_equal_the_masked_quadratic_form() -> anyhow::Result<()> {
        let (b, h, m, dv) = (2, 3, 7, 4);
        for t in [10, 13] {
            let qf = randn(&[b, h, t, m], 1, DType::F64)?.exp()?;
            let kf = randn(&[b, h, t, m], 2, DType::F64)?.exp()?;
            let v = randn(&[b, h, t, dv], 3, DType::F64)?;
            // the paper's causal form written out: A = Q' K'^T masked to i <= t, row-normalised
            let mask: Vec<f64> = (0..t * t).map(|p| if p % t <= p / t { 1.0 } else { 0.0 }).collect();
            let mask = Tensor::from_vec(mask, (1, 1, t, t), &Device::Cpu)?;
            let a = qf.matmul(&kf.t()?)?.broadcast_mul(&mask)?;
            let reference = a.broadcast_div(&a.sum_keepdim(3)?)?.matmul(&v)?;
            for chunk in [1, 4, 5, 64] {
                let (y, _) = causal_favor(&qf, &kf, &v, chunk, None)?;
                assert!(rel_err(&y, &reference)? < 1e-10, "chunk {chunk}, T {t}");
            }
            // bidirectional: the same without the mask
            let full = qf.matmul(&kf.t()?)?;
            let reference = full.broadcast_div(&full.sum_keepdim(3)?)?.matmul(&v)?;
            assert!(rel_err(&bidirectional_favor(&qf, &kf, &v)?, &reference)? < 1e-10);
            // and its last row is the causal form's last row
            let (y, _) = causal_favor(&qf, &kf, &v, 4, None)?;
            assert!(rel_err(&y.narrow(2, t - 1, 1)?, &reference.narrow(2, t - 1, 1)?)? < 1e-10);
        }
        Ok(())
    }

    #[test]
    fn performer_stabilisers_are_exact_and_bounded() -> anyhow::Result<()> {
        // the stabilised features give the same attention as the paper's phi
        let (d, m, t) = (8, 20, 9);
        let w = features(m, d, true, 6);
        let q = randn(&[1, 1, t, d], 7, DType::F64)?;
        let k = randn(&[1, 1, t, d], 8, DType::F64)?;
        let v = randn(&[1, 1, t, d], 9, DType::F64)?;
        let (qs, ks) = query_key_features(&q, &k, &w)?;
        let scale = (d as f64).powf(-0.25);
        let plain = |x: &Tensor| positive_features(&(x * scale).unwrap(), &w, Stabiliser::None);
        let (a, _) = causal_favor(&qs, &ks, &v, 4, None)?;
        let (b, _) = causal_favor(&plain(&q)?, &plain(&k)?, &v, 4, None)?;
        assert!(rel_err(&a, &b)? < 1e-12);
        // at d_h = 256 a feature's |w|^2 / 2 exceeds f32's exponent range (88.7): an input on
        // a feature row overflows the paper's phi, and both stabilised forms stay in (0, 1/sqrt m]
        let (d, m) = (256, 4);
        let w = features(m, d, true, 7).to_dtype(DType::F32)?;
        let x = w.narrow(0, 0, 1)?;
        assert!(positive_features(&x, &w, Stabiliser::None)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .any(|f| !f.is_finite()));
        for stabiliser in [Stabiliser::RowMax, Stabiliser::FeatureBound] {
            let f: Vec<f32> = positive_features(&x, &w, stabiliser)?.flatten_all()?.to_vec1()?;
            assert!(f.iter().all(|&f| f.is_finite() && f <= 0.5001) && f[0] > 0.0, "{stabiliser:?}: {f:?}");
        }
        // a query of large norm: the row maximum keeps its largest feature at 1/sqrt(m)
        let big = (randn(&[3, d], 10, DType::F32)? * 50.0)?;
        let f: Vec<f32> = positive_features(&big, &w, Stabiliser::RowMax)?.max(1)?.to_vec1()?;
        assert!(f.iter().all(|&f| (f - 0.5).abs() < 1e-6), "{f:?}");
        Ok(())
    }

    #[test]
    fn performer_forms_agree_and_are_causal() -> anyhow::Result<()> {
        let cfg = tiny(&[]);
        let m = mixer(&cfg, DType::F32);
        for t in [10, 13] {
            let x = randn(&[2, t, cfg.width], 1, DType::F32)?;
            let parallel = m.forward(&x)?;
            for chunk in [1, 4, 64] {
                assert!(rel_err(&m.chunked(&x, chunk).unwrap()?, &parallel)? < 1e-5, "chunk {chunk}");
            }
            testing::assert_mixer_modes_agree(&m, &x, &[0, 1, 7])?;
            testing::assert_causal(&|x| Ok(m.forward(x)?), &x)?;
            testing::assert_causal(&|x| Ok(m.chunked(x, 1).unwrap()?), &x)?;
        }
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        testing::assert_modes_agree(&model, &random_tokens(2, 13, cfg.vocab, 5)?, &[0, 4, 6])?;
        Ok(())
    }

    #[test]
    fn performer_gradients_match_finite_differences() -> anyhow::Result<()> {
        let e = testing::model_gradient_err(&tiny(&["model.bias=true"]), 7)?;
        assert!(e < 1e-4, "{e}");
        Ok(())
    }

    #[test]
    fn performer_state_is_constant_in_t() -> anyhow::Result<()> {
        let cfg = tiny(&["model.options.features=11"]);
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let bytes =
            |t: usize| -> anyhow::Result<usize> { Ok(model.prefill(&random_tokens(1, t, cfg.vocab, 1)?)?.1.bytes()) };
        let (a, b) = (bytes(3)?, bytes(20)?);
        assert_eq!(a, b);
        // per layer [B, H, m, d_h + 1], f32
        let (d, h) = (cfg.width, cfg.heads);
        assert_eq!(a, cfg.depth * h * 11 * (d / h + 1) * 4);
        // the default m is d_h ln d_h
        assert_eq!(default_features(64), 266);
        assert_eq!(mixer(&tiny(&[]), DType::F32).features, default_features(cfg.head_dim()));
        Ok(())
    }

    #[test]
    fn performer_redraws_features_on_the_schedule_only() -> anyhow::Result<()> {
        let cfg = tiny(&["model.options.redraw_every=3"]);
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let tokens = random_tokens(2, 10, cfg.vocab, 5)?;
        let logits = |step: usize| -> anyhow::Result<Tensor> {
            model.set_training_step(step);
            Ok(model.forward(&tokens, None)?)
        };
        let same = |a: &Tensor, b: &Tensor| -> anyhow::Result<bool> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
        };
        let (s0, s2, s3, s5, s6) = (logits(0)?, logits(2)?, logits(3)?, logits(5)?, logits(6)?);
        assert!(same(&s0, &s2)? && same(&s3, &s5)?, "features changed inside an epoch");
        assert!(!same(&s2, &s3)? && !same(&s5, &s6)?, "features not redrawn at the epoch boundary");
        // back to an earlier epoch: its features again (a function of seed, layer, epoch)
        assert!(same(&logits(1)?, &s0)?);
        // never redrawn with redraw_every = 0; another feature seed gives other features
        let fixed = Model::new(&tiny(&["model.options.redraw_every=0"]), 1, &Device::Cpu, DType::F32)?;
        fixed.set_training_step(0);
        let a = fixed.forward(&tokens, None)?;
        fixed.set_training_step(100_000);
        assert!(same(&a, &fixed.forward(&tokens, None)?)?);
        let reseeded = Model::new(&tiny(&["model.options.feature_seed=1"]), 1, &Device::Cpu, DType::F32)?;
        assert!(!same(&s0, &reseeded.forward(&tokens, None)?)?);
        // the layers draw different features
        let m = mixer(&cfg, DType::F64);
        let other = Performer::new(&cfg, 1, &ParamBuilder::new(3, &Device::Cpu, DType::F64))?;
        let diff = (m.features_of_epoch(0, 8)? - other.features_of_epoch(0, 8)?)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f64>()? > 0.0);
        Ok(())
    }

    #[test]
    fn performer_refuses_bad_settings_by_name() {
        for (sets, expected) in [
            (&["model.options.chunk=0"][..], "model.options.chunk"),
            (&["model.options.features=1000000"][..], "model.options.features"),
            (&["model.options.spread=2"][..], "spread"),
        ] {
            let err = format!("{:#}", tiny_config("performer", sets).unwrap_err());
            assert!(err.contains(expected), "{sets:?}: {err}");
        }
        let cfg = tiny(&["model.kv_heads=1"]);
        let err = format!("{:#}", Model::new(&cfg, 1, &Device::Cpu, DType::F32).err().unwrap());
        assert!(err.contains("model.kv_heads"), "{err}");
    }
}
