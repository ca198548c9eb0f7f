//! Peak memory. On the CPU: a counting wrapper around the system allocator (the binary
//! installs it as `#[global_allocator]`; without it the counters stay at zero). On CUDA:
//! the high-water mark of the device's stream-ordered memory pool, which every candle
//! allocation goes through (cudarc uses `cuMemAllocAsync` where the device has pools).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

pub struct CountingAlloc;

/// Counts `size` more bytes in use if the allocation `p` succeeded.
fn counted(p: *mut u8, size: usize) -> *mut u8 {
    if !p.is_null() {
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
    p
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(System.alloc(layout), layout.size())
    }

    /// Forwarded rather than left to the default (`alloc` then writing every byte): calloc
    /// serves a large block with fresh pages that are already zero, so the default would add
    /// a full write pass to every zeroed tensor and time the bench's allocator, not the model.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(System.alloc_zeroed(layout), layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Puts glibc's allocator in one fixed state for the life of the process: every block comes
/// from the heap, and freed memory stays there for the next block (the process keeps its peak).
/// By default glibc serves a block above a threshold (128 KiB at first, adapted as the process
/// runs) with fresh pages from `mmap` and unmaps it on free, so every training step of a small
/// model re-faults its tensors' pages: 100 steps of nanoGPT's CPU run spent 2.6 s of 12.4 s in
/// the kernel, 0.06 s of 9.7 s with the heap. A threshold alone (at most 32 MiB) still did that
/// for larger blocks: one attention layer at T = 8K (its 256 MB scores) spent half its time in
/// the kernel re-faulting them, 1.8x slower than from the heap, with the fault cost of this
/// virtual machine in every exponent. Elsewhere a no-op.
pub fn fix_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // glibc's malloc.h
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_MMAP_MAX, 0);
            // -1: glibc takes the threshold as a size_t, so never (i32::MAX, 2 GiB, was reached)
            mallopt(M_TRIM_THRESHOLD, -1);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}

/// Bytes allocated now.
pub fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the current level.
pub fn reset_peak() {
    PEAK.store(current(), Ordering::Relaxed);
}

/// Highest level since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Whether the counting allocator is installed (it has seen allocations).
pub fn installed() -> bool {
    PEAK.load(Ordering::Relaxed) > 0 || CURRENT.load(Ordering::Relaxed) > 0
}

/// Runs `f` and returns the bytes allocated on `device` at its peak, above the level before
/// it; `None` where that cannot be measured (CPU without the counting allocator, a GPU
/// without memory pools), `f` having run all the same.
/// Memory a library allocates behind candle's back is not counted (cuFFT's work area is
/// ours, so it is).
pub fn peak_during(
    device: &candle_core::Device,
    f: impl FnOnce() -> candle_core::Result<()>,
) -> candle_core::Result<Option<u64>> {
    match device {
        candle_core::Device::Cpu if installed() => {
            reset_peak();
            let before = current();
            f()?;
            Ok(Some((peak() - before) as u64))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda_pool::peak_during(device, f),
        _ => f().map(|()| None),
    }
}

/// The most bytes allocated on `device` at once since the previous call (the first: since
/// the mark began), weights and optimizer state included (PyTorch's
/// `max_memory_allocated`), the mark then reset to the current level; `None` where it cannot
/// be measured (CPU without the counting allocator, a GPU without memory pools). On a GPU the
/// device should be idle (what is queued is not counted yet).
pub fn take_peak(device: &candle_core::Device) -> candle_core::Result<Option<u64>> {
    match device {
        candle_core::Device::Cpu if installed() => {
            let high = peak() as u64;
            reset_peak();
            Ok(Some(high))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda_pool::take_peak(device),
        _ => Ok(None),
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> candle_core::Result<u64> {
        let mut value: u64 = 0;
        unsafe { result::mem_pool::get_attribute(pool, attr, &mut value as *mut u64 as *mut _) }
            .map_err(candle_core::Error::wrap)?;
        Ok(value)
    }

    /// Writing zero resets the pool's high-water mark to the current level.
    fn reset_high(pool: sys::CUmemoryPool) -> candle_core::Result<()> {
        let mut zero: u64 = 0;
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        }
        .map_err(candle_core::Error::wrap)
    }

    pub fn peak_during(
        device: &candle_core::Device,
        f: impl FnOnce() -> candle_core::Result<()>,
    ) -> candle_core::Result<Option<u64>> {
        let Some(pool) = crate::device::cuda_mem_pool(device)? else {
            return f().map(|()| None);
        };
        device.synchronize()?;
        let before = attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        reset_high(pool)?;
        f()?;
        device.synchronize()?;
        let high = attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        Ok(Some(high.saturating_sub(before)))
    }

    /// The pool's high-water mark plus the CUDA graphs' (a captured step's allocations live
    /// in the graphs' memory, not the pool's), both reset.
    pub fn take_peak(device: &candle_core::Device) -> candle_core::Result<Option<u64>> {
        let (Some(pool), candle_core::Device::Cuda(cuda)) = (crate::device::cuda_mem_pool(device)?, device) else {
            return Ok(None);
        };
        let high = attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        reset_high(pool)?;
        let gpu = cuda.cuda_stream().context().cu_device();
        let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        let (mut graphs, mut zero) = (0u64, 0u64);
        unsafe { sys::cuDeviceGetGraphMemAttribute(gpu, attr, &mut graphs as *mut u64 as *mut _) }
            .result()
            .map_err(candle_core::Error::wrap)?;
        unsafe { sys::cuDeviceSetGraphMemAttribute(gpu, attr, &mut zero as *mut u64 as *mut _) }
            .result()
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(high + graphs))
    }
}
