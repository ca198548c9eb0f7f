//! Fused CUDA kernels (sm_90) as candle custom ops: the shared glue, and the generic
//! elementwise and row kernels.
//!
//! Every `.cu` file under `src/` is compiled to PTX by `build.rs` when the `cuda` feature is
//! on (`ptx`, one constant per file) and loaded into candle's CUDA device on first use
//! (`launch`: loading a kernel, reaching a tensor's device memory, allocating outputs).
//! The kernels of one mechanism live with it in `crate::ops::<mechanism>/` (attention's
//! flash kernels, the decayed scans, the FFT convolution), beside its reference forms; here
//! are the ones any model uses: layer norm, GELU and SiLU, the last-dimension softmax, the
//! embedding row gather, dropout and the AdamW step. Each public entry point takes tensors and runs
//! the fused kernel when they are on a CUDA device in a supported dtype and shape; its
//! caller runs the reference tensor expression (the CPU path) otherwise, so a model calls
//! one function whatever the device. Gradients: the custom op's `bwd` launches the kernel's
//! backward. Tests against the CPU reference live in `tests/cuda/` and run on the GPU
//! machine (scripts/gpu-package.sh builds and packs them).

/// The fused kernels that can be switched off (the tensor path runs instead) by listing them
/// in `ALTFORMERS_UNFUSED` (comma-separated, or `all`): to measure a kernel against the
/// code it replaces in one run. The FFT convolution has no tensor path on CUDA. `attention`
/// switches off the flash kernels and the fused CPU attention (`ops::attention::cpu`).
/// `retention-tc` switches off only the tensor-core retention (bf16), leaving the CUDA-core
/// scan it replaced. `gather` is the row gather's parallel backward (token embeddings),
/// `layernorm` the fused layer norm, `activations` the fused GELU and SiLU, `softmax` the
/// fused softmax (the unfused attention path's probabilities), `dropout` the counter-based
/// dropout kernel (the host-built mask of the same hash instead), `rwkv4-step` RWKV-4's fused
/// decode step (`mixers/rwkv4/decode.rs`), `decode-graph` the CUDA-graph replay of a static
/// decoding step (`crate::decoder`; each step then launched op by op), `gemv` the products of
/// at most 8 rows (cuBLAS's GEMM instead), `linear` the mixed-precision product's own backward
/// (`linear`: candle's cast and product instead; on the CPU, `ops::linear`'s one-node product), `sum` the fused sum of residual adds and
/// gradient sums (candle's add), `retention-step` the fused one-token retention
/// (`ops::decayed::linear_step`: the tensor form's outer product, decay and product instead),
/// `rotary` the one-pass rotary embedding (`primitives::rotary::apply_tables`), `retnet-norm`
/// RetNet's fused output normalisations and group norm (`mixers::retnet::normalise_outputs`),
/// `attention-packed` the flash kernels over the fused query/key/value projection as one operand
/// (`ops::attention::causal_attention_packed`: three products each way instead),
/// `layernorm-vector` the layer norm's register-resident kernels (its scalar ones instead),
/// `cross-entropy` the fused cross-entropy (`nn::cross_entropy`: candle's log-softmax instead),
/// `embedding` the one-pass token embedding (`gather::embed`: the gather, position add and cast),
/// `train-graph` the training step replayed from a CUDA graph (`train/graph.rs`: each step's
/// kernels launched one by one instead), `overlap` the gradients' NCCL exchange overlapped
/// with the backward in segments (`train/nccl.rs`: reduced after the whole backward instead).
pub const SWITCHABLE: [&str; 24] = [
    "attention",
    "retention",
    "retention-tc",
    "wkv",
    "adamw",
    "gather",
    "layernorm",
    "activations",
    "softmax",
    "dropout",
    "rwkv4-step",
    "decode-graph",
    "gemv",
    "linear",
    "sum",
    "retention-step",
    "rotary",
    "retnet-norm",
    "attention-packed",
    "layernorm-vector",
    "cross-entropy",
    "embedding",
    "train-graph",
    "overlap",
];

/// Whether the fused kernel `name` (one of [`SWITCHABLE`]) may run.
pub fn enabled(name: &str) -> bool {
    !switched_off().iter().any(|o| o == name || o == "all")
}

/// The kernels `ALTFORMERS_UNFUSED` switches off, as this process read it.
pub fn switched_off() -> &'static [String] {
    static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    OFF.get_or_init(|| parse_unfused(&std::env::var("ALTFORMERS_UNFUSED").unwrap_or_default()))
}

fn parse_unfused(list: &str) -> Vec<String> {
    list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unfused_list_parses() {
        assert_eq!(super::parse_unfused(" attention, wkv ,"), vec!["attention", "wkv"]);
        assert!(super::parse_unfused("").is_empty());
    }
}

#[cfg(feature = "cuda")]
pub mod ptx {
    //! The compiled PTX of every kernel file, one constant per file (upper-case stem).
    include!(concat!(env!("OUT_DIR"), "/kernels_ptx.rs"));
}

#[cfg(feature = "cuda")]
pub mod launch;

#[cfg(feature = "cuda")]
pub mod adamw;

#[cfg(feature = "cuda")]
pub mod gather;

#[cfg(feature = "cuda")]
pub mod layernorm;

#[cfg(feature = "cuda")]
pub mod activations;

#[cfg(feature = "cuda")]
pub mod softmax;

#[cfg(feature = "cuda")]
pub mod cross_entropy;

#[cfg(feature = "cuda")]
pub mod dropout;

#[cfg(feature = "cuda")]
pub mod gemv;

#[cfg(feature = "cuda")]
pub mod linear;

#[cfg(feature = "cuda")]
pub mod rotary;

#[cfg(feature = "cuda")]
pub mod retnet_norm;
