//! Building blocks with explicit shapes: linear layers, layer norm, softmax, dropout.
//! Written from candle's differentiable primitives so every one of them backpropagates, in
//! f32 for training and f64 for the finite-difference tests.

use candle_core::{DType, Result, Tensor, D};

use crate::params::ParamBuilder;
use crate::rng::Rng;

/// `y = x W^T + b`, `W: [out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Weight `N(0, std^2)` named `<name>.weight`, optional zero bias `<name>.bias`.
    pub fn new(pb: &ParamBuilder, name: &str, d_in: usize, d_out: usize, std: f64, bias: bool) -> anyhow::Result<Self> {
        if d_in == 0 || d_out == 0 {
            // a setting rounded a width to zero (model.ffn_mult 0.001, say): say so here, where
            // the name is known, not as a division by zero in the first forward pass
            anyhow::bail!(
                "the linear layer `{name}` would be {d_in} -> {d_out} wide: a setting (model.width, model.ffn_mult, ...) is too small"
            );
        }
        let pb = pb.pp(name);
        let weight = pb.normal("weight", &[d_out, d_in], std)?;
        let bias = if bias { Some(pb.zeros("bias", &[d_out])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// `x: [..., in] -> [..., out]`, computed in `x`'s dtype (f32 master weights are cast
    /// to bf16 when the activations are bf16: mixed precision).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().unwrap();
        let rows = x.elem_count() / d_in;
        let y = x.reshape((rows, d_in))?.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// Layer normalization over the last dimension (Ba et al. 2016), bias optional.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    /// Parameters `<name>.weight` (ones) and, if `bias`, `<name>.bias` (zeros).
    pub fn new(pb: &ParamBuilder, name: &str, width: usize, bias: bool) -> anyhow::Result<Self> {
        let pb = pb.pp(name);
        let weight = pb.ones("weight", &[width])?;
        let bias = if bias { Some(pb.zeros("bias", &[width])?) } else { None };
        Ok(Self { weight, bias, eps: 1e-5 })
    }

    /// Statistics in the weights' precision (f32 under bf16 activations), output in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::kernels::layernorm::supports(x, &self.weight, self.bias.as_ref()) {
            return crate::kernels::layernorm::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps);
        }
        if crate::ops::layer_norm::supports(x, &self.weight, self.bias.as_ref()) {
            return crate::ops::layer_norm::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(self.weight.dtype())?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.to_dtype(dtype)
    }
}

/// Softmax over the last dimension, max-subtracted, differentiable; computed in f32 at
/// least (bf16 inputs are promoted, the result cast back).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::softmax::supports(x) {
        // f32 arithmetic inside, bf16 in and out: the promotion below is not needed
        return crate::kernels::softmax::softmax_last_dim(x);
    }
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        return candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(x.dtype());
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// GELU, erf form (GPT-2's MLP), with a backward of one pass ([`crate::ops::activation`]).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    crate::ops::activation::apply(x, crate::ops::activation::Activation::Gelu)
}

/// SiLU, `x sigmoid(x)`, with a backward of one pass ([`crate::ops::activation`]).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    crate::ops::activation::apply(x, crate::ops::activation::Activation::Silu)
}

/// Rows `ids` (u32, any shape, flattened) of a `[R, d]` table: `[N, d]`. The same as
/// `table.index_select(ids, 0)`, except that on CUDA (f32 or bf16 tables) the backward
/// scatters in parallel ([`crate::kernels::gather`]) instead of candle's walk over the ids with
/// one thread per column.
pub fn gather_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::gather::supports(table, ids) {
        return crate::kernels::gather::gather_rows(table, ids);
    }
    table.index_select(&ids.flatten_all()?, 0)
}

/// Inverted dropout with probability `p`, the mask drawn from `rng` (so a run's masks are
/// reproducible and resume exactly).
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask = if x.device().is_cpu() {
        let keep: Vec<f32> = (0..x.elem_count()).map(|_| if rng.uniform() >= p { scale as f32 } else { 0.0 }).collect();
        Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?
    } else {
        // On an accelerator, draw on the device from a seed taken from our stream.
        x.device().set_seed(rng.next_u64())?;
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        (u.ge(p)?.to_dtype(DType::F32)? * scale)?.to_dtype(x.dtype())?
    };
    x * mask
}
