//! Fused CUDA kernels (sm_90) as candle custom ops, each beside the reference it replaces.
//!
//! Every `kernels/*.cu` is compiled to PTX by `build.rs` when the `cuda` feature is on and
//! loaded into candle's CUDA device on first use. Each public entry point here takes
//! tensors, runs the fused kernel when the tensors are on a CUDA device in a supported
//! dtype and shape, and otherwise runs the reference tensor expression (the CPU path), so a
//! mixer calls one function whatever the device. Gradients: the custom op's `bwd` launches
//! the kernel's backward. Tests against the CPU reference live in `tests/cuda/` and run
//! on the GPU machine (scripts/gpu-package.sh builds and packs them).

/// The fused kernels that can be switched off (the tensor path runs instead) by listing them
/// in `ALTFORMERS_UNFUSED` (comma-separated, or `all`): to measure a kernel against the
/// code it replaces in one run. The FFT convolution has no tensor path on CUDA.
/// `retention-tc` switches off only the tensor-core retention (bf16), leaving the CUDA-core
/// scan it replaced. `gather` is the row gather's parallel backward (token embeddings),
/// `layernorm` the fused layer norm, `activations` the fused GELU and SiLU, `softmax` the
/// fused softmax (the unfused attention path's probabilities).
pub const SWITCHABLE: [&str; 9] =
    ["attention", "retention", "retention-tc", "wkv", "adamw", "gather", "layernorm", "activations", "softmax"];

/// Whether the fused kernel `name` (one of [`SWITCHABLE`]) may run.
pub fn enabled(name: &str) -> bool {
    static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let off = OFF.get_or_init(|| parse_unfused(&std::env::var("ALTFORMERS_UNFUSED").unwrap_or_default()));
    !off.iter().any(|o| o == name || o == "all")
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
pub mod launch {
    //! Small helpers shared by the custom ops: loading a kernel, reaching a tensor's device
    //! memory, allocating outputs.
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchArgs};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{bail, Layout, Result};
    use std::sync::Arc;

    /// A loaded kernel and the device's stream (candle's own `CudaFunc` cannot be named
    /// outside candle). Derefs to the function, for its attributes.
    pub struct Kernel {
        func: CudaFunction,
        stream: Arc<CudaStream>,
    }

    impl Kernel {
        pub fn builder(&self) -> LaunchArgs<'_> {
            self.stream.launch_builder(&self.func)
        }
    }

    impl std::ops::Deref for Kernel {
        type Target = CudaFunction;
        fn deref(&self) -> &CudaFunction {
            &self.func
        }
    }

    /// Kernel `name` from the module built from `ptx` (loaded once per device).
    pub fn func(dev: &CudaDevice, module: &str, ptx: &str, name: &str) -> Result<Kernel> {
        let func = dev.get_or_load_custom_func(name, module, ptx)?.into_cuda_function();
        Ok(Kernel { func, stream: dev.cuda_stream() })
    }

    /// The device memory of a contiguous tensor, as a view starting at its offset.
    pub fn view<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<CudaView<'a, T>> {
        slice(s.as_cuda_slice::<T>()?, l)
    }

    /// The part of `s` a contiguous layout covers, as a view.
    pub fn slice<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("fused kernel: input is not contiguous (layout {l:?})")
        };
        Ok(s.slice(start..end))
    }

    /// A new zero-filled device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
        dev: &CudaDevice,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        dev.alloc_zeros::<T>(n)
    }

    /// A new uninitialised device buffer of `n` elements (every element must be written).
    pub fn uninit<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: callers launch a kernel that writes every element before any read.
        unsafe { dev.alloc::<T>(n) }
    }

    pub fn device(s: &CudaStorage) -> &CudaDevice {
        s.device()
    }

    /// A kernel's output buffer as a tensor outside the graph (the custom op, or its
    /// backward, is what tracks gradients).
    pub fn tensor<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        slice: CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<candle_core::Shape>,
    ) -> candle_core::Tensor {
        let storage = candle_core::Storage::Cuda(T::wrap_cuda_slice(slice, dev.clone()));
        candle_core::Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
    }

    pub use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    pub use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
}

#[cfg(feature = "cuda")]
pub mod adamw;

#[cfg(feature = "cuda")]
pub mod fftconv;

#[cfg(feature = "cuda")]
pub mod decayed;

#[cfg(feature = "cuda")]
pub mod flash_attention;

#[cfg(feature = "cuda")]
pub mod rows;

#[cfg(feature = "cuda")]
pub mod layernorm;

#[cfg(feature = "cuda")]
pub mod activations;

#[cfg(feature = "cuda")]
pub mod softmax;
