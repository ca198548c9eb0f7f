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

/// The anti-causal convolution `y[b, c, t] = sum_j h[c, j] x[b, c, t + 1 + j]` (`h`'s first
/// tap weighs the next position) through a causal one, `conv` (this module's or the FFT's):
/// the causal convolution of the time-reversed input shifted by one, reversed back.
pub fn anti_causal_conv(x: &Tensor, h: &Tensor, conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let t = x.dim(2)?;
    let rev = Tensor::from_vec((0..t as u32).rev().collect::<Vec<_>>(), t, x.device())?;
    let flip = |a: &Tensor| a.index_select(&rev, 2);
    // x'[tau] = x[T - tau] (zero at tau = 0): reversed, one step later
    let shifted = flip(x)?.pad_with_zeros(2, 1, 0)?.narrow(2, 0, t)?.contiguous()?;
    flip(&conv(&shifted, h)?)
}
