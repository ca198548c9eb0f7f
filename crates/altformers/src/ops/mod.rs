//! The mechanisms the layers are built from, one folder (or file) each (as
//! flash-linear-attention keeps `fla/ops/<mechanism>/`): the public API and the choice of
//! form in the folder's `mod.rs` (shapes in its doc comments), the plain reference forms
//! beside the fast CPU ones, and, with the `cuda` feature, the custom-op glue (`cuda.rs`)
//! beside the `.cu` kernels it launches. A caller names the mechanism once and gets the
//! fused kernel where it applies, the tensor code otherwise; the switches of
//! [`crate::kernels::SWITCHABLE`] turn the kernels off.
//!
//! - [`activation`]: GELU and SiLU with a backward of one pass (CPU and CUDA);
//! - [`attention`]: causal softmax attention (flash kernels on CUDA; the unfused scores,
//!   causal softmax and weighted sum elsewhere);
//! - [`decayed`]: causal decayed linear attention (RetNet's retention, RWKV-4's WKV,
//!   AFT-simple): quadratic, recurrent and chunkwise forms, fused scans on CUDA;
//! - [`dropout`]: inverted dropout with a counter-based mask (one pass, recomputed in the
//!   backward; the same mask on the CPU and on CUDA);
//! - [`fftconv`]: causal long convolution by FFT (Hyena): realfft on the CPU, cuFFT on CUDA,
//!   and the direct convolution it is tested against;
//! - [`layer_norm`]: layer normalization in one pass each way on the CPU (the GPU's is
//!   [`crate::kernels::layernorm`]);
//! - [`monarch`]: Monarch matrices `P L P^T R` (M2): the block-diagonal and Monarch
//!   products, the DFT as a Monarch product and the long convolutions evaluated with it;
//! - [`precomputed`]: values computed outside autograd given a hand-written backward
//!   (reversible layers, AFT-full's blocked form);
//! - [`segments`]: the backward in segments of blocks, for the gradient exchange to overlap.

pub mod activation;
pub mod attention;
pub mod decayed;
pub mod dropout;
pub mod fftconv;
pub mod layer_norm;
pub mod linear;
pub mod monarch;
pub mod precomputed;
pub mod segments;
