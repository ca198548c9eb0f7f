//! The direct causal convolution, the reference of [`super::causal_conv`].

use candle_core::{Result, Tensor};

/// The direct reference: `y = Toeplitz(h) x` per channel, O(B C T^2), from differentiable
/// candle ops (any device, any float dtype). Same shapes and result as [`super::causal_conv`].
pub fn causal_conv_direct(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let (_, c, t) = x.dims3()?;
    let (_, l) = h.dims2()?;
    // Append one zero so every entry of the Toeplitz matrix is an index into `ext`.
    let ext = Tensor::cat(&[h, &Tensor::zeros((c, 1), h.dtype(), h.device())?], 1)?;
    let idx: Vec<u32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i && i - j < l { (i - j) as u32 } else { l as u32 })).collect();
    let idx = Tensor::from_vec(idx, t * t, h.device())?;
    let toeplitz = ext.index_select(&idx, 1)?.reshape((c, t, t))?; // [C, T_out, T_in]
    let xt = x.permute((1, 2, 0))?.contiguous()?; // [C, T, B]
    toeplitz.matmul(&xt)?.permute((2, 0, 1))?.contiguous() // [B, C, T]
}
