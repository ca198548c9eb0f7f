//! The fused AdamW step (`adamw.cu`): the gradient norm and the update of every parameter in
//! two launches, for [`crate::train::optim::AdamW::step`] when every tensor is f32 and on
//! one CUDA device. Moments and weights are updated in place: the optimizer owns the
//! moments, and the weights are its parameters' variables, which `Var::set` would overwrite
//! in place anyway.
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Result, Storage, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_adamw";
/// As `adamw.cu`: columns of the tensor table, threads per block, elements per block.
const TABLE_COLS: usize = 8;
const BLOCK: u32 = 256;
const PER_BLOCK: usize = 256 * 8;

/// One parameter's tensors for the step.
pub struct Slot<'a> {
    pub weight: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub grad: &'a Tensor,
    pub decay: bool,
    /// The parameter's learning-rate multiple ([`crate::params::Param::lr_scale`]).
    pub lr_scale: f32,
}

/// AdamW's hyper-parameters for one step (bias corrections already computed).
pub struct Hyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub clip: f32,
}

/// Whether the fused step applies: every tensor f32, contiguous, on the same CUDA device.
pub fn applies(slots: &[Slot]) -> bool {
    let Some(first) = slots.first() else {
        return false;
    };
    let device = first.weight.device();
    device.is_cuda()
        && slots.iter().all(|s| {
            [s.weight, s.m, s.v, s.grad]
                .iter()
                .all(|t| t.dtype() == candle_core::DType::F32 && t.is_contiguous() && t.device().same_device(device))
        })
}

/// The kernels' table kept in one device buffer across steps, for a training step captured as
/// a CUDA graph: the capture leaves the table it built in `host` (a copy cannot be captured:
/// its contents would be the capture's), and before each replay [`KeptTable::upload`] writes
/// it with that step's learning rate and bias corrections. The addresses in it stay valid:
/// a graph's allocations have the same addresses at every replay.
pub struct KeptTable {
    buffer: CudaSlice<u64>,
    host: Vec<u64>,
}

impl KeptTable {
    /// Room for the table of `params` tensors.
    pub fn new(dev: &CudaDevice, params: usize) -> Result<Self> {
        Ok(Self { buffer: dev.cuda_stream().alloc_zeros::<u64>((params + 1) * TABLE_COLS).w()?, host: Vec::new() })
    }

    /// Writes the table with step values `lr`, `bc1`, `bc2` (ordered on the device's stream).
    pub fn upload(&mut self, dev: &CudaDevice, lr: f32, bc1: f32, bc2: f32) -> Result<()> {
        let Some(at) = self.host.len().checked_sub(TABLE_COLS) else {
            candle_core::bail!("fused AdamW: the kept table was never filled by a step")
        };
        self.host[at..].copy_from_slice(&per_step_row(lr, bc1, bc2));
        dev.cuda_stream().memcpy_htod(&self.host, &mut self.buffer).w()
    }
}

/// The table's last row: what changes from step to step.
fn per_step_row(lr: f32, bc1: f32, bc2: f32) -> [u64; TABLE_COLS] {
    let mut row = [0u64; TABLE_COLS];
    row[..3].copy_from_slice(&[lr, bc1, bc2].map(|x| x.to_bits() as u64));
    row
}

/// Runs the step; returns the gradient norm before clipping, an f64 scalar on the device. A
/// non-finite norm leaves every tensor as it was (the caller reports it when it reads it).
/// With `kept`, the kernels read their table from it (see [`KeptTable`]); without, it is
/// uploaded for this step.
pub fn step(slots: &[Slot], h: &Hyper, kept: Option<&mut KeptTable>) -> Result<Tensor> {
    let Some(first) = slots.first() else {
        return Tensor::new(0f64, &candle_core::Device::Cpu);
    };
    let candle_core::Device::Cuda(dev) = first.weight.device() else { candle_core::bail!("fused AdamW: not on CUDA") };
    let stream = dev.cuda_stream();
    // Every tensor's storage stays read-locked and its device pointer alive until both
    // kernels are queued; the kernels write through the pointers of weights and moments.
    let tensors: Vec<&Tensor> = slots.iter().flat_map(|s| [s.weight, s.m, s.v, s.grad]).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut table: Vec<u64> = Vec::with_capacity(slots.len() * TABLE_COLS);
    let mut ptr_guards = Vec::new();
    let mut blocks = 0u64;
    for (i, slot) in slots.iter().enumerate() {
        for j in 0..4 {
            let (storage, layout) = &guards[4 * i + j];
            let Storage::Cuda(CudaStorage { slice: CudaStorageSlice::F32(s), .. }) = &**storage else {
                candle_core::bail!("fused AdamW: expected f32 tensors on CUDA")
            };
            let (ptr, g) = s.device_ptr(&stream);
            ptr_guards.push(g);
            table.push(ptr + 4 * layout.start_offset() as u64);
        }
        let n = slot.weight.elem_count();
        if [slot.m, slot.v, slot.grad].iter().any(|t| t.elem_count() != n) {
            candle_core::bail!("fused AdamW: a moment or gradient differs in size from its weight ({n})");
        }
        table.extend([n as u64, slot.decay as u64, blocks, slot.lr_scale.to_bits() as u64]);
        blocks += n.div_ceil(PER_BLOCK) as u64;
    }
    if blocks == 0 {
        return Tensor::new(0f64, first.weight.device());
    }
    let count = slots.len() as i32;
    table.extend(per_step_row(h.lr, h.bc1, h.bc2));
    let fresh;
    let table = match kept {
        Some(kept) => {
            if kept.buffer.len() < table.len() {
                candle_core::bail!(
                    "fused AdamW: the kept table holds {} values, the step needs {}",
                    kept.buffer.len(),
                    table.len()
                );
            }
            kept.host = table;
            &kept.buffer
        }
        None => {
            fresh = stream.clone_htod(&table).w()?;
            &fresh
        }
    };
    let mut sumsq = stream.alloc_zeros::<f64>(1).w()?;
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let sum = launch::func(dev, MODULE, ptx::ADAMW, "adamw_sumsq")?;
    let mut b = sum.builder();
    b.arg(table).arg(&count).arg(&mut sumsq);
    unsafe { b.launch(cfg) }.w()?;
    let update = launch::func(dev, MODULE, ptx::ADAMW, "adamw_update")?;
    let mut b = update.builder();
    b.arg(table).arg(&count).arg(&sumsq).arg(&h.beta1).arg(&h.beta2);
    b.arg(&h.eps).arg(&h.weight_decay).arg(&h.clip);
    unsafe { b.launch(cfg) }.w()?;
    drop(ptr_guards);
    drop(guards);
    // left on the device: reading it here would make the host wait for the GPU every step
    launch::tensor(sumsq, dev, ()).sqrt()
}
