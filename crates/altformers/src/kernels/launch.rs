//! The storage and launch glue every custom op shares (those of `kernels/` and of each
//! mechanism under `ops/`): loading a kernel and sizing its shared memory, reaching a
//! tensor's device memory, allocating outputs, and the `cpu_fwd` of a CUDA-only op.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchArgs};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, SyncOnDrop};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, Layout, Result, Storage, StorageRef};
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

    /// Lets the kernel use `bytes` of dynamic shared memory (past the default 48 KB a
    /// launch must ask for).
    pub fn max_shared(&self, bytes: i32) -> Result<()> {
        self.func
            .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
            .w()?;
        Ok(())
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

/// The CUDA storage of a tensor an op holds (read in its `bwd` through
/// `storage_and_layout`), while `guard` lives; `op` and `what` name them in the error.
pub fn storage<'a>(guard: &'a StorageRef<'_>, op: &str, what: &str) -> Result<&'a CudaStorage> {
    match &**guard {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{op}: {what} is not on the CUDA device"),
    }
}

/// Runs `launch` with the device address of each contiguous tensor's first element (0 for
/// `None`: a kernel reads it as "absent"), every storage held until the launch is queued: for
/// kernels with more tensors than a custom op takes. Outputs are new tensors the kernel
/// writes through their address. f32, bf16 and u32 tensors.
pub fn with_addresses(
    dev: &CudaDevice,
    op: &str,
    tensors: &[Option<&candle_core::Tensor>],
    launch: impl FnOnce(&[u64]) -> Result<()>,
) -> Result<()> {
    with_addresses_on(&dev.cuda_stream(), op, tensors, launch)
}

/// [`with_addresses`] for work queued on `stream` rather than the device's own (its caller
/// orders the two streams).
pub fn with_addresses_on(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    op: &str,
    tensors: &[Option<&candle_core::Tensor>],
    launch: impl FnOnce(&[u64]) -> Result<()>,
) -> Result<()> {
    let guards: Vec<_> = tensors.iter().map(|t| t.map(|t| t.storage_and_layout())).collect();
    let mut addresses = Vec::with_capacity(guards.len());
    let mut syncs: Vec<SyncOnDrop<'_>> = Vec::new();
    for guard in &guards {
        let Some((storage, layout)) = guard else {
            addresses.push(0u64);
            continue;
        };
        let s: &CudaStorage = self::storage(storage, op, "a tensor")?;
        let Some((start, _)) = layout.contiguous_offsets() else {
            bail!("{op}: a tensor is not contiguous (layout {layout:?})")
        };
        let (ptr, sync) = match &s.slice {
            CudaStorageSlice::F32(x) => x.device_ptr(stream),
            CudaStorageSlice::BF16(x) => x.device_ptr(stream),
            CudaStorageSlice::F16(x) => x.device_ptr(stream),
            CudaStorageSlice::F64(x) => x.device_ptr(stream),
            CudaStorageSlice::U32(x) => x.device_ptr(stream),
            _ => bail!("{op}: {:?} tensors are not supported", s.dtype()),
        };
        addresses.push(ptr + (start * s.dtype().size_in_bytes()) as u64);
        syncs.push(sync);
    }
    launch(&addresses)
}

/// The `cpu_fwd` of a custom op that runs on CUDA only (its callers run a tensor expression
/// on the CPU instead): an error with `$msg`. Inside an `impl CustomOpN`, one `_` per input:
/// `cuda_only!("...", _, _)` for a `CustomOp2`.
macro_rules! cuda_only {
    ($msg:literal, $($input:pat),+) => {
        fn cpu_fwd(
            &self,
            $($input: &candle_core::CpuStorage, _: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!($msg)
        }
    };
}
pub(crate) use cuda_only;

/// `$body` on contiguous views of the storages' device memory, once for each dtype the fused
/// kernels are built for, f32 and bf16 (`$sfx` is the kernel-name suffix, `"f32"` or
/// `"bf16"`), when every storage has it; else an error with `$err`. Each `$view = ($storage,
/// $layout)` binds a view for the body, whose value is the result:
/// `f32_or_bf16!(sfx, [x = (xs, xl), g = (gs, gl)], run(sfx, &x, &g)?, "...")`.
macro_rules! f32_or_bf16 {
    ($sfx:ident, [$($view:ident = ($storage:expr, $layout:expr)),+], $body:expr, $($err:tt)+) => {
        match ($(&$storage.slice,)+) {
            ($(candle_core::cuda_backend::CudaStorageSlice::F32($view),)+) => {
                let $sfx = "f32";
                $(let $view = $crate::kernels::launch::slice($view, $layout)?;)+
                $body
            }
            ($(candle_core::cuda_backend::CudaStorageSlice::BF16($view),)+) => {
                let $sfx = "bf16";
                $(let $view = $crate::kernels::launch::slice($view, $layout)?;)+
                $body
            }
            _ => candle_core::bail!($($err)+),
        }
    };
}
pub(crate) use f32_or_bf16;

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

/// The grid of an elementwise kernel over `n` elements (`elementwise.cuh`'s maps): blocks of
/// 256 threads, each moving 16 bytes (8 bf16 or 4 f32) per step of its grid-stride loop.
pub fn elementwise_config(n: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(8 * THREADS as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

pub use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
pub use candle_core::cuda_backend::cudarc::driver::PushKernelArg;

/// `dst <- src` on `dev`'s stream (a copy node when the stream is capturing a CUDA graph):
/// `src` made contiguous, same shape and dtype as the contiguous `dst`, whose buffer a
/// captured graph keeps (`op` names the caller in errors).
pub fn copy_into(dev: &CudaDevice, op: &str, dst: &candle_core::Tensor, src: &candle_core::Tensor) -> Result<()> {
    if dst.dims() != src.dims() || dst.dtype() != src.dtype() {
        bail!("{op}: a buffer of {:?} {:?} given {:?} {:?}", dst.dims(), dst.dtype(), src.dims(), src.dtype());
    }
    let src = src.contiguous()?;
    let bytes = src.elem_count() * src.dtype().size_in_bytes();
    let stream = dev.cuda_stream();
    with_addresses(dev, op, &[Some(dst), Some(&src)], |a| {
        // SAFETY: both hold `bytes` bytes at these addresses (checked shapes and dtypes).
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(a[0], a[1], bytes, stream.cu_stream())
        }
        .w()?;
        Ok(())
    })
}
