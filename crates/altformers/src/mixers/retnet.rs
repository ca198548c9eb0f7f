//! Retentive Network: multi-scale retention (Sun et al. 2023, arXiv 2307.08621).
//!
//! Per head `h` (decay `gamma_h = 1 - 2^(-5-h)`), with the paper's normalisations:
//!
//! ```text
//! Q = rot(X W_Q), K = rot(X W_K) / sqrt(d_h), V = X W_V          (xPos-style rotation)
//! D~[n, m] = gamma^(n-m) / sqrt(sum_{i<=n} gamma^(n-i))           (m <= n; row-normalised D)
//! R = (Q K^T) (.) D~,   R~[n, m] = R[n, m] / max(|sum_i R[n, i]|, 1)
//! Retention(X) = R~ V
//! MSR(X) = (swish(X W_G) (.) GroupNorm_h(Retention(X))) W_O
//! ```
//!
//! All three forms compute exactly this function with the shared primitive
//! [`crate::ops::decayed`] (`linear_*`, per-head decay): the value gets an extra column
//! of ones, so the same pass also yields the row sum `sum_i gamma^(n-i) q_n . k_i` that the
//! score normalisation needs; the row normalisation of `D` is a known factor per (head,
//! position). Parallel: `O(T^2 d)`; chunkwise (the default once `T > chunk`):
//! `O(T d (C + d_h))`; recurrent: state `[B, H, d_h, d_v + 1]` per layer, independent of T.
//!
//! Sizes as the paper's parameter allocation: `W_Q, W_K: d x d`, `W_V, W_G: d x 2d`
//! (`model.options.value_factor`), `W_O: 2d x d`, FFN hidden width 2d. Projection names and
//! initialisation (Xavier-uniform, gain 2^-2.5 except `out_proj`) follow the official
//! torchscale implementation.

use anyhow::{bail, Result as AnyResult};
use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Position};
use crate::nn::Linear;
use crate::ops::decayed;
use crate::params::ParamBuilder;
use crate::primitives::rotary;

/// `model.options` of `retnet`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetNetOptions {
    /// Chunk length of the chunkwise form; `forward` uses it for sequences longer than this.
    pub chunk: usize,
    /// Value (and gate) width as a multiple of the model width (2 in the paper).
    pub value_factor: f64,
}

pub const DEFAULT_CHUNK: usize = 64;
const GROUP_NORM_EPS: f64 = 1e-5;

impl Default for RetNetOptions {
    fn default() -> Self {
        Self { chunk: DEFAULT_CHUNK, value_factor: 2.0 }
    }
}

impl crate::config::Options for RetNetOptions {
    fn check(&self) -> AnyResult<()> {
        if self.chunk == 0 {
            bail!("model.options.chunk must be positive");
        }
        if !(self.value_factor.is_finite() && self.value_factor > 0.0) {
            bail!("model.options.value_factor must be positive and finite, got {}", self.value_factor);
        }
        Ok(())
    }
}

/// The paper's block: pre-LayerNorm, retention, pre-LayerNorm, FFN (GELU) of width 2d; the
/// rotation inside retention is the only positional signal.
pub fn adjust_defaults(cfg: &mut ModelConfig) {
    cfg.position = Position::None;
    cfg.ffn_mult = 2.0;
}

/// `gamma_h = 1 - 2^(-5-h)` as `ln gamma_h`, `h = 0..heads`.
pub fn log_decays(heads: usize) -> Vec<f64> {
    (0..heads).map(|h| (1.0 - 2f64.powi(-5 - h as i32)).ln()).collect()
}

/// Xavier-uniform `[d_out, d_in]` weight times `gain`, no bias.
fn xavier(pb: &ParamBuilder, name: &str, d_in: usize, d_out: usize, gain: f64) -> AnyResult<Linear> {
    let a = gain * (6.0 / (d_in + d_out) as f64).sqrt();
    Ok(Linear { weight: pb.uniform(&format!("{name}.weight"), &[d_out, d_in], -a, a)?, bias: None })
}

pub struct Retention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    g_proj: Linear,
    out_proj: Linear,
    /// GroupNorm affine parameters `[d_v H]` (`group_norm.weight`, `group_norm.bias`).
    gn_weight: Tensor,
    gn_bias: Option<Tensor>,
    heads: usize,
    head_dim: usize,
    value_head_dim: usize,
    /// `ln gamma_h` on the host and as a `[H]` tensor.
    log_gamma: Vec<f64>,
    log_gamma_t: Tensor,
    /// `ln gamma_h` and `1 - gamma_h` as f64 `[H]`, and the rotation's frequencies: what a
    /// step computes its position's factors from on the device ([`Self::step`]).
    log_gamma_f64: Tensor,
    one_minus_gamma: Tensor,
    frequencies: Tensor,
    rope_base: f64,
    pub chunk: usize,
    /// [`Self::finish`]'s row normalisation from position 0, of the last length asked: every
    /// training step asks for the same one (a copy from the host per layer and step otherwise,
    /// which a captured CUDA graph could not replay).
    row_norm: std::sync::Mutex<Option<(usize, Tensor)>>,
}

impl Retention {
    pub fn new(cfg: &ModelConfig, pb: &ParamBuilder) -> AnyResult<Self> {
        let o: RetNetOptions = cfg.options()?;
        let (d, h) = (cfg.width, cfg.heads);
        let vd = (o.value_factor * d as f64).round() as usize;
        if vd == 0 || !vd.is_multiple_of(h) {
            bail!("model.options.value_factor * model.width ({vd}) must be a positive multiple of model.heads ({h})");
        }
        if !cfg.head_dim().is_multiple_of(2) {
            bail!(
                "retention rotates pairs of query/key channels: model.width / model.heads ({}) must be even",
                cfg.head_dim()
            );
        }
        let g = 2f64.powf(-2.5);
        let log_gamma = log_decays(h);
        Ok(Self {
            q_proj: xavier(pb, "q_proj", d, d, g)?,
            k_proj: xavier(pb, "k_proj", d, d, g)?,
            v_proj: xavier(pb, "v_proj", d, vd, g)?,
            g_proj: xavier(pb, "g_proj", d, vd, g)?,
            out_proj: xavier(pb, "out_proj", vd, d, 1.0)?,
            gn_weight: pb.ones("group_norm.weight", &[vd])?,
            gn_bias: if cfg.bias { Some(pb.zeros("group_norm.bias", &[vd])?) } else { None },
            heads: h,
            head_dim: d / h,
            value_head_dim: vd / h,
            log_gamma_t: Tensor::new(log_gamma.clone(), &pb.device)?.to_dtype(pb.dtype)?,
            log_gamma_f64: Tensor::new(log_gamma.clone(), &pb.device)?,
            one_minus_gamma: Tensor::new(log_gamma.iter().map(|l| 1.0 - l.exp()).collect::<Vec<_>>(), &pb.device)?,
            frequencies: rotary::frequency_tensor(d / h, cfg.rope_base, &pb.device)?,
            log_gamma,
            rope_base: cfg.rope_base,
            chunk: o.chunk,
            row_norm: std::sync::Mutex::new(None),
        })
    }

    /// `x: [B, T, D]` at positions `offset..` -> `q, k: [B, H, T, d_h]` (rotated; k scaled
    /// by 1/sqrt(d_h)), `v1: [B, H, T, d_v + 1]` (values and a column of ones), all three in
    /// the accumulation dtype (f32 under bf16 activations), and the gate input
    /// `g: [B, T, H d_v]` in `x`'s dtype.
    fn project(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let acc = decayed::accumulation_dtype(x.dtype());
        let t = x.dim(1)?;
        let zero = Tensor::zeros(1, acc, x.device())?;
        self.project_rotated(x, &rotary::cached_tables(offset, t, self.head_dim, self.rope_base, &zero)?)
    }

    /// [`Self::project`] with the rotation's tables `[T, d_h/2]` given.
    fn project_rotated(&self, x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, dh, dv) = (self.heads, self.head_dim, self.value_head_dim);
        let acc = decayed::accumulation_dtype(x.dtype());
        let heads = |y: Tensor, w: usize| -> Result<Tensor> {
            y.to_dtype(acc)?.reshape((b, t, h, w))?.transpose(1, 2)?.contiguous()
        };
        let q = rotary::apply_tables(&heads(self.q_proj.forward(x)?, dh)?, cos, sin)?;
        let k = (rotary::apply_tables(&heads(self.k_proj.forward(x)?, dh)?, cos, sin)? * (dh as f64).powf(-0.5))?;
        let v = heads(self.v_proj.forward(x)?, dv)?;
        let v1 = Tensor::cat(&[&v, &Tensor::ones((b, h, t, 1), v.dtype(), v.device())?], 3)?;
        Ok((q, k, v1, self.g_proj.forward(x)?))
    }

    /// Applies the normalisations to the primitive's output and finishes the layer.
    /// `o1: [B, H, T, d_v + 1]` (`sum_m gamma^(n-m) (q_n . k_m) [v_m, 1]` at positions
    /// `offset..`), `g: [B, T, H d_v]` -> `[B, T, D]` in `g`'s dtype.
    fn finish(&self, o1: &Tensor, g: &Tensor, offset: usize) -> Result<Tensor> {
        let t = o1.dim(2)?;
        let c = if offset == 0 {
            let mut kept = self.row_norm.lock().map_err(|_| candle_core::Error::Msg("retnet: lock poisoned".into()))?;
            match kept.as_ref() {
                Some((len, c)) if *len == t && c.device().same_device(o1.device()) => c.clone(),
                _ => {
                    let c = self.row_normaliser(offset, t, o1.device())?;
                    *kept = Some((t, c.clone()));
                    c
                }
            }
        } else {
            self.row_normaliser(offset, t, o1.device())?
        };
        self.finish_normalised(o1, g, &c)
    }

    /// `c[h, n] = 1 / sqrt(sum_{i<=n} gamma_h^i)` at positions `offset..offset + t`, the row
    /// normalisation of D: `[1, H, t, 1]` f64.
    fn row_normaliser(&self, offset: usize, t: usize, device: &candle_core::Device) -> Result<Tensor> {
        let c: Vec<f64> = self
            .log_gamma
            .iter()
            .flat_map(|&lg| {
                let gamma = lg.exp();
                (offset..offset + t).map(move |n| ((1.0 - gamma.powi(n as i32 + 1)) / (1.0 - gamma)).powf(-0.5))
            })
            .collect();
        Tensor::from_vec(c, (1, self.heads, t, 1), device)
    }

    /// [`Self::finish`] with the row normalisation `c: [1, H, T, 1]` (f64) given.
    fn finish_normalised(&self, o1: &Tensor, g: &Tensor, c: &Tensor) -> Result<Tensor> {
        let y = normalise_outputs(o1, &c.to_dtype(o1.dtype())?)?;
        let y = y.broadcast_mul(&self.gn_weight.to_dtype(y.dtype())?)?;
        let y = match &self.gn_bias {
            Some(bias) => y.broadcast_add(&bias.to_dtype(y.dtype())?)?,
            None => y,
        };
        self.out_proj.forward(&(crate::nn::silu(g)? * y.to_dtype(g.dtype())?)?)
    }

    /// Parallel form, `O(T^2)`: `x: [B, T, D] -> [B, T, D]`.
    pub fn parallel(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v1, g) = self.project(x, 0)?;
        self.finish(&decayed::linear_naive(&q, &k, &v1, &self.log_gamma_t.to_dtype(q.dtype())?)?, &g, 0)
    }

    fn chunkwise(&self, x: &Tensor, chunk: usize) -> Result<(Tensor, Tensor)> {
        let (q, k, v1, g) = self.project(x, 0)?;
        let (o1, s) = decayed::linear_chunked(&q, &k, &v1, &self.log_gamma_t.to_dtype(q.dtype())?, chunk, None)?;
        Ok((self.finish(&o1, &g, 0)?, s))
    }
}

/// The paper's normalisations of the retention's output and the group norm (one group per
/// head, before its affine): `o1: [B, H, T, d_v + 1]` (the values' sums and the ones column's),
/// `c: [1, H, T, 1]` (the row normalisation, in `o1`'s dtype) -> `[B, T, H d_v]`. One fused
/// pass each way on CUDA (`kernels/retnet_norm.cu`) where it applies, else
/// [`normalise_outputs_tensor`].
pub fn normalise_outputs(o1: &Tensor, c: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::retnet_norm::applies(o1, c) {
        return crate::kernels::retnet_norm::normalise(o1, c, GROUP_NORM_EPS);
    }
    normalise_outputs_tensor(o1, c)
}

/// [`normalise_outputs`] as tensor operations (the CPU's path and the fused kernel's reference).
pub fn normalise_outputs_tensor(o1: &Tensor, c: &Tensor) -> Result<Tensor> {
    let (b, h, t, dv1) = o1.dims4()?;
    let dv = dv1 - 1;
    let num = o1.narrow(3, 0, dv)?.broadcast_mul(c)?;
    let row_sum = o1.narrow(3, dv, 1)?.broadcast_mul(c)?;
    // The score normaliser is differentiated here; torchscale detaches it. Both compute the
    // same forward function (the paper's R~), so the forms and decoding are unaffected; only
    // the gradient differs, and this one is the exact gradient of the function the paper
    // writes (the finite-difference tests hold it to that).
    let y = num.broadcast_div(&row_sum.abs()?.maximum(1.0)?)?;
    // GroupNorm: one group per head, over its d_v channels
    let centered = y.broadcast_sub(&y.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + GROUP_NORM_EPS)?.sqrt()?)?;
    y.transpose(1, 2)?.reshape((b, t, h * dv))
}

impl SequenceMixer for Retention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(1)? > self.chunk {
            Ok(self.chunkwise(x, self.chunk)?.0)
        } else {
            self.parallel(x)
        }
    }

    /// State `[S, n]`, `S: [B, H, d_h, d_v + 1]` (the retention state and the decayed key
    /// sum), `n` the position as a one-element f32 tensor (exact to 2^24 tokens).
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        let (y, s) = self.chunkwise(x, self.chunk)?;
        let t = x.dim(1)?;
        Ok((y, MixerState { tensors: vec![s, Tensor::new(&[t as f32], x.device())?], pos: t }))
    }

    /// One token. Its position's rotation and row normalisation are computed on the device
    /// from the state's position tensor (f64, as the host computes them for the other
    /// forms): the step reads nothing from the host, so it is replayed from a CUDA graph.
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        let n = super::device_position(state.tensors.get(1), state.pos, x.device())?;
        let acc = decayed::accumulation_dtype(x.dtype());
        let (q, k, v1, g) = self.project_rotated(x, &rotary::tables_at(&n, &self.frequencies, acc)?)?;
        let (o1, s) = decayed::linear_step(&q, &k, &v1, &self.log_gamma_t.to_dtype(q.dtype())?, state.tensors.first())?;
        // c[h] = ((1 - gamma_h^(n+1)) / (1 - gamma_h))^(-1/2)
        let powers = self.log_gamma_f64.broadcast_mul(&(n.to_dtype(candle_core::DType::F64)? + 1.0)?)?.exp()?;
        let c = powers.affine(-1.0, 1.0)?.div(&self.one_minus_gamma)?.powf(-0.5)?.reshape((1, self.heads, 1, 1))?;
        let y = self.finish_normalised(&o1, &g, &c)?;
        *state = MixerState { tensors: vec![s, (n + 1.0)?], pos: state.pos + 1 };
        Ok(y)
    }

    fn static_step(&self) -> bool {
        true
    }

    fn chunked(&self, x: &Tensor, chunk: usize) -> Option<Result<Tensor>> {
        Some(self.chunkwise(x, chunk).map(|(y, _)| y))
    }
}

pub fn build(cfg: &ModelConfig, _layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(Retention::new(cfg, pb)?))
}

pub const COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("RetNet"),
        judgement: Judgement::Imprecise(
            "space O(T) omits d; the chunkwise form computes the same function as the parallel and recurrent forms (it is not there to alleviate a representational bottleneck)",
        ),
    },
    true_time:
        "O(T d (C + d_h) + T d^2) chunkwise (C = chunk; parallel O(T^2 d) for T <= C); decode O(d d_h + d^2) per token",
    true_space: "O(T C h + T d) chunkwise; O(h d_h^2) = O(d d_h) state per layer decoding, independent of T",
    flops: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        let c = (DEFAULT_CHUNK as f64).min(t);
        let vd = 2.0 * d;
        // projections q, k (d x d), v, g (d x 2d), out (2d x d): 8 d^2 MACs per token;
        // in-chunk scores and weighted sums: C (d + vd) MACs; state read, write: 2 d vd / h
        b * (2.0 * 8.0 * t * d * d + 2.0 * t * c * (d + vd) + 4.0 * t * d * vd / h)
    },
    memory: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        let c = (DEFAULT_CHUNK as f64).min(t);
        b * (h * t * c + 8.0 * t * d)
    },
    state: |s: &CostShape| {
        let (b, d, h) = (s.batch as f64, s.width as f64, s.heads as f64);
        b * d * (2.0 * d / h + 1.0)
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{self, randn, random_tokens, rel_err, tiny_config};
    use candle_core::{DType, Device};

    /// Chunks of 5 over the tests' 10-13 positions cross chunk boundaries.
    fn tiny(sets: &[&str]) -> ModelConfig {
        tiny_config("retnet", &[&["model.options.chunk=5"], sets].concat()).unwrap()
    }

    fn mixer(cfg: &ModelConfig, dtype: DType) -> Retention {
        Retention::new(cfg, &ParamBuilder::new(3, &Device::Cpu, dtype)).unwrap()
    }

    /// The paper's parallel formula written out: `D~` and `R~` as explicit matrices. Returns
    /// the layer output and `|sum_i R[n, i]|` per (batch, head, row).
    fn paper_retention(m: &Retention, x: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        let (q, k, v1, g) = m.project(x, 0)?;
        let (b, h, t, _) = q.dims4()?;
        let v = v1.narrow(3, 0, m.value_head_dim)?;
        let mut dt = vec![0f64; h * t * t];
        for (hh, lg) in m.log_gamma.iter().enumerate() {
            for n in 0..t {
                let row: f64 = (0..=n).map(|i| (lg * (n - i) as f64).exp()).sum();
                for mm in 0..=n {
                    dt[(hh * t + n) * t + mm] = (lg * (n - mm) as f64).exp() / row.sqrt();
                }
            }
        }
        let dt = Tensor::from_vec(dt, (1, h, t, t), &Device::Cpu)?.to_dtype(x.dtype())?;
        let r = q.matmul(&k.t()?)?.broadcast_mul(&dt)?;
        let row_sums = r.sum_keepdim(3)?.abs()?;
        let y = r.broadcast_div(&row_sums.maximum(1.0)?)?.matmul(&v)?;
        // GroupNorm, gate, output
        let centered = y.broadcast_sub(&y.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centered.broadcast_div(&(var + GROUP_NORM_EPS)?.sqrt()?)?;
        let y = y.transpose(1, 2)?.reshape((b, t, h * m.value_head_dim))?.broadcast_mul(&m.gn_weight)?;
        Ok((m.out_proj.forward(&(crate::nn::silu(&g)? * y)?)?, row_sums))
    }

    #[test]
    fn retnet_forms_agree_with_the_paper_formula() -> anyhow::Result<()> {
        let cfg = tiny(&[]);
        let m = mixer(&cfg, DType::F32);
        for t in [10, 13] {
            // scaled inputs so that some rows have |row sum| > 1 and others < 1
            let x = (randn(&[2, t, cfg.width], 1, DType::F32)? * 8.0)?;
            let (reference, row_sums) = paper_retention(&m, &x)?;
            // the score normalisation is active on some rows and not on others
            let sums: Vec<f32> = row_sums.flatten_all()?.to_vec1()?;
            assert!(sums.iter().any(|&s| s > 1.5) && sums.iter().any(|&s| s < 0.5));
            let parallel = m.parallel(&x)?;
            assert!(rel_err(&parallel, &reference)? < 1e-4, "parallel vs paper");
            for chunk in [1, 4, 5, 64] {
                assert!(rel_err(&m.chunked(&x, chunk).unwrap()?, &reference)? < 1e-4, "chunk {chunk}");
            }
            assert!(rel_err(&m.forward(&x)?, &reference)? < 1e-4); // T > chunk: chunkwise
            testing::assert_mixer_modes_agree(&m, &x, &[0, 1, 7])?;
        }

        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        for t in [10, 13] {
            let tokens = random_tokens(2, t, cfg.vocab, 5)?;
            testing::assert_modes_agree(&model, &tokens, &[0, 4, 6])?;
        }
        Ok(())
    }

    #[test]
    fn retnet_is_causal() -> anyhow::Result<()> {
        let cfg = tiny(&[]);
        let m = mixer(&cfg, DType::F32);
        let x = randn(&[2, 13, cfg.width], 2, DType::F32)?;
        testing::assert_causal(&|x| Ok(m.forward(x)?), &x)?;
        testing::assert_causal(&|x| Ok(m.parallel(x)?), &x)?;
        Ok(())
    }

    #[test]
    fn retnet_gradients_match_finite_differences() -> anyhow::Result<()> {
        // 12 tokens, chunk 5: the chunkwise path with a short last chunk
        let e = testing::model_gradient_err(&tiny(&["model.bias=true"]), 7)?;
        assert!(e < 1e-4, "{e}");
        Ok(())
    }

    #[test]
    fn retnet_state_is_constant_in_t() -> anyhow::Result<()> {
        let cfg = tiny(&[]);
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let bytes =
            |t: usize| -> anyhow::Result<usize> { Ok(model.prefill(&random_tokens(1, t, cfg.vocab, 1)?)?.1.bytes()) };
        let (a, b) = (bytes(3)?, bytes(20)?);
        assert_eq!(a, b);
        // per layer: [B, H, d_h, d_v + 1] with d_v = 2 d / H, and the position (one f32)
        let (d, h) = (cfg.width, cfg.heads);
        assert_eq!(a, cfg.depth * (h * (d / h) * (2 * d / h + 1) + 1) * 4);
        Ok(())
    }

    #[test]
    fn retnet_decays_follow_the_paper() {
        let g: Vec<f64> = log_decays(4).iter().map(|l| l.exp()).collect();
        assert_eq!(g, vec![1.0 - 1.0 / 32.0, 1.0 - 1.0 / 64.0, 1.0 - 1.0 / 128.0, 1.0 - 1.0 / 256.0]);
    }
}
