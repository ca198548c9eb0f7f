#![cfg(feature = "cuda")]
//! The fused CUDA kernels against their CPU references, one test binary (packed by
//! `scripts/gpu-package.sh`, run on the GPU machine by `.gpu/run-tests.sh`): one binary
//! instead of one per kernel keeps the package small enough to carry two builds at once.

mod activations;
mod adamw;
mod aft;
mod decayed;
mod fftconv;
mod flash_attention;
mod gather;
mod layernorm;
mod softmax;
