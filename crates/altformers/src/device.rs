//! Choosing where tensors live, with a clear error instead of a panic when CUDA is missing.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// `cpu` or `cuda` (`cuda:N` for another GPU).
pub fn select(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal: usize = n.strip_prefix("cuda:").map(|s| s.parse()).transpose()?.unwrap_or(0);
            cuda(ordinal)
        }
        other => bail!("unknown device `{other}`: use cpu or cuda"),
    }
}

/// How many CUDA GPUs this process sees (an error where this build has no CUDA or the driver
/// cannot be loaded).
#[cfg(feature = "cuda")]
pub fn cuda_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n as usize),
        Ok(Err(e)) => bail!("cannot count the CUDA GPUs: {e}"),
        Err(_) => bail!("cannot count the CUDA GPUs: the CUDA driver could not be loaded"),
    }
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_count() -> Result<usize> {
    bail!("this binary was built without CUDA support; rebuild with `--features cuda` (see README, GPU section)")
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    // With dynamically loaded CUDA libraries, candle panics when they are absent.
    let device = match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => bail!("cannot open CUDA device {ordinal}: {e}"),
        Err(_) => {
            bail!("cannot open CUDA device {ordinal}: the CUDA driver or libraries could not be loaded")
        }
    };
    keep_pool_memory(&device)?;
    // the backward's gradient sums through the fused sum. GRADIENT_SUM exists only in the
    // patched candle-core the CUDA build uses (scripts/cuda-env.sh prepares it, with
    // scripts/patch-candle-autograd.py): a CUDA build against crates.io's candle-core does not
    // compile. Set once per process.
    let _ = candle_core::backprop::GRADIENT_SUM.set(crate::kernels::activations::gradient_sum);
    Ok(device)
}

/// The device's memory pool, which every candle allocation on it goes through (cudarc
/// allocates with `cuMemAllocAsync` where the GPU has pools); `None` on the CPU or a GPU
/// without pools.
#[cfg(feature = "cuda")]
pub fn cuda_mem_pool(
    device: &Device,
) -> candle_core::Result<Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>> {
    let Device::Cuda(cuda) = device else {
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    if !stream.context().has_async_alloc() {
        return Ok(None);
    }
    let pool = unsafe {
        candle_core::cuda_backend::cudarc::driver::result::device::get_mem_pool(stream.context().cu_device())
    };
    pool.map(Some).map_err(candle_core::Error::wrap)
}

/// Sets the pool's release threshold to "never": by default a pool returns its free memory
/// to the driver at every synchronization, so the next step maps it again (a measurable
/// cost per step; PyTorch's caching allocator keeps it too). `ALTFORMERS_CUDA_POOL_RELEASE=1`
/// keeps the driver's default, for comparison.
#[cfg(feature = "cuda")]
fn keep_pool_memory(device: &Device) -> Result<()> {
    if std::env::var("ALTFORMERS_CUDA_POOL_RELEASE").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    if let Some(pool) = cuda_mem_pool(device)? {
        let mut threshold = u64::MAX;
        let attr =
            candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::mem_pool::set_attribute(
                pool,
                attr,
                &mut threshold as *mut u64 as *mut _,
            )
        }
        .map_err(|e| anyhow::anyhow!("setting the CUDA memory pool's release threshold: {e:?}"))?;
    }
    Ok(())
}

/// Hands the memory pool's free blocks back to the driver. The pool keeps them (above), so
/// after one large computation it holds most of the GPU, and whatever allocates outside it
/// (a CUDA graph's instantiation) fails for lack of memory that is free but cached. A no-op
/// on the CPU.
pub fn release_cached_memory(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = cuda_mem_pool(device)? {
        device.synchronize()?;
        unsafe { candle_core::cuda_backend::cudarc::driver::result::mem_pool::trim_to(pool, 0) }
            .map_err(candle_core::Error::wrap)?;
    }
    let _ = device;
    Ok(())
}

/// A device for a concurrent worker: on CUDA the same GPU through a stream of its own (one
/// context, so small kernels of several workers overlap instead of time-slicing as separate
/// processes would); the CPU as it is.
pub fn with_own_stream(device: &Device) -> Result<Device> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() else {
                bail!("a CUDA device without a GPU index")
            };
            let cuda = candle_core::CudaDevice::new_with_stream(gpu_id)?;
            // With a second stream cudarc records an event per buffer per launch (to order
            // uses of one buffer across streams): driver calls that serialized 14 workers to
            // 0.5 s per MQAR step on the H200. A worker's tensors never leave its stream.
            // SAFETY: no buffer made on this device is used on another stream (each worker
            // builds its own model and data); the memory pool orders reuse across streams.
            unsafe { cuda.cuda_stream().context().disable_event_tracking() };
            let stream = Device::Cuda(cuda);
            keep_pool_memory(&stream)?;
            Ok(stream)
        }
        other => bail!("no concurrent workers on {other:?}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    bail!("this binary was built without CUDA support; rebuild with `--features cuda` (see README, GPU section)")
}

/// Compute dtype for a device: f32 on the CPU; bf16 on the GPU is chosen explicitly.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f64" => DType::F64,
        other => bail!("unknown dtype `{other}`: use f32, bf16, f16 or f64"),
    })
}
