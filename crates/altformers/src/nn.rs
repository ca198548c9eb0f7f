//! Building blocks with explicit shapes: linear layers, layer norm, softmax, dropout.
//! Written from candle's differentiable primitives so every one of them backpropagates, in
//! f32 for training and f64 for the finite-difference tests.

use candle_core::{DType, Result, Tensor, D};

use crate::params::ParamBuilder;

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
        rows_product(x, &self.weight, self.bias_in(x.dtype())?.as_ref())
    }

    /// `x W^T` without the bias, in `x`'s dtype, for a weight held elsewhere (a tied head's
    /// embedding table): the product `Linear::forward` runs.
    pub fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        rows_product(x, weight, None)
    }

    /// The bias in `dtype` (the activations'); the weight is cast by the product itself
    /// (`rows_product`: the mixed-precision op takes it in f32).
    fn bias_in(&self, dtype: DType) -> Result<Option<Tensor>> {
        self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()
    }

    /// The outputs in consecutive blocks of `sizes` features (a fused projection's parts,
    /// `[..., in] -> [..., sizes[i]]` each), each block its own product with its rows of the
    /// weight. Cutting one product's output instead would make the backward build every
    /// part's gradient at full width, zero-padded, and sum them: three full-width passes and
    /// their zeros for a query-key-value projection (on the H200 a baby GPT's step spent more
    /// in those copies and sums than in the products); the weight's rows are cut instead,
    /// whose gradients are small.
    pub fn forward_parts(&self, x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let bias = self.bias_in(x.dtype())?;
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            parts.push(rows_product(
                x,
                &self.weight.narrow(0, start, n)?,
                bias.as_ref().map(|b| b.narrow(0, start, n)).transpose()?.as_ref(),
            )?);
            start += n;
        }
        Ok(parts)
    }
}

/// `x W^T + b` for `x: [..., in]`, `W: [out, in]` (any float dtype: computed in `x`'s) and
/// `b: [out]` already in `x`'s dtype.
fn rows_product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if crate::ops::linear::supports(x, weight) {
        // the CPU's product as one graph node (its reshapes and transpose are not nodes)
        let y = crate::ops::linear::linear(x, weight)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let dims = x.dims().to_vec();
    let d_in = *dims.last().unwrap();
    let rows = x.elem_count() / d_in;
    let x = x.reshape((rows, d_in))?;
    #[cfg(feature = "cuda")]
    let y = if rows > crate::kernels::gemv::MAX_ROWS && crate::kernels::linear::applies(&x, weight) {
        // bf16 activations against the f32 master weight (training): its gradient made in its
        // own layout and dtype
        crate::kernels::linear::mixed_linear(&x, weight)?
    } else {
        let weight = weight.to_dtype(x.dtype())?;
        if crate::kernels::gemv::applies(&x, &weight) {
            crate::kernels::gemv::gemv(&x, &weight)?
        } else {
            x.matmul(&weight.t()?)?
        }
    };
    #[cfg(not(feature = "cuda"))]
    let y = x.matmul(&weight.to_dtype(x.dtype())?.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = weight.dim(0)?;
    y.reshape(out_dims)
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

/// Mean cross-entropy (nats) of `logits: [N, V]` (any float dtype) against `targets: [N]`
/// (u32), computed in f32: on CUDA the fused kernel (one launch each way), otherwise candle's
/// log-softmax and gather.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::cross_entropy::supports(logits, targets) {
        return crate::kernels::cross_entropy::row_losses(logits, targets)?.mean_all();
    }
    let logits = if logits.dtype() == DType::F64 { logits.clone() } else { logits.to_dtype(DType::F32)? };
    candle_nn::loss::cross_entropy(&logits, targets)
}

/// `x + y` of one shape: a residual connection. On CUDA the fused sum (16-byte accesses:
/// candle's bf16 add reaches about half the bandwidth), candle's add otherwise.
pub fn residual(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::activations::sum_applies(x, y) {
        return crate::kernels::activations::sum(x, y);
    }
    x + y
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

pub use crate::ops::dropout::dropout;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The parts of a fused projection (a product per block of weight rows on the CPU) are the
    /// cuts of the whole product, and their gradients those of the cuts (f64, with a bias).
    #[test]
    fn projection_parts_are_the_cuts_of_the_whole() -> Result<()> {
        let pb = ParamBuilder::new(3, &Device::Cpu, DType::F64);
        let lin = Linear::new(&pb, "qkv", 6, 10, 0.5, true).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let store = pb.into_store();
        let x = Tensor::randn(0f64, 1.0, (2, 3, 6), &Device::Cpu)?;
        let sizes = [4, 3, 3];
        let parts = lin.forward_parts(&x, &sizes)?;
        let whole = lin.forward(&x)?;
        let mut start = 0;
        let mut loss_parts = Tensor::zeros((), DType::F64, &Device::Cpu)?;
        let mut loss_cuts = loss_parts.clone();
        for (i, (part, &n)) in parts.iter().zip(&sizes).enumerate() {
            let cut = whole.narrow(D::Minus1, start, n)?;
            let err = crate::testing::max_abs_diff(part, &cut)?;
            assert!(err < 1e-14, "part {i}: {err}");
            // weight each part differently so every block's gradient is checked
            loss_parts = (loss_parts + (part.sqr()?.sum_all()? * (i + 1) as f64)?)?;
            loss_cuts = (loss_cuts + (cut.sqr()?.sum_all()? * (i + 1) as f64)?)?;
            start += n;
        }
        let (gp, gc) = (loss_parts.backward()?, loss_cuts.backward()?);
        for (name, p) in store.vars() {
            let t = p.var.as_tensor();
            let err = crate::testing::max_abs_diff(gp.get(t).unwrap(), gc.get(t).unwrap())?;
            assert!(err < 1e-12, "{name}: {err}");
        }
        Ok(())
    }
}
