//! A row gather `table[ids]` (`[R, d]`, `[N]` u32 -> `[N, d]`) whose backward scatters on
//! the GPU in parallel (`gather.cu`). The forward is candle's own `index_select`; only the
//! gradient differs from `Tensor::index_select`, whose `index_add` walks the ids in order
//! (see the kernel for why that dominated the step of a small model).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, LaunchConfig, PushKernelArg};
use super::ptx;

const MODULE: &str = "altformers_gather";

/// Whether [`gather_rows`] runs with the parallel backward: an f32 or bf16 table on a CUDA
/// device and u32 ids.
pub fn supports(table: &Tensor, ids: &Tensor) -> bool {
    table.device().is_cuda()
        && matches!(table.dtype(), DType::F32 | DType::BF16)
        && ids.dtype() == DType::U32
        && table.rank() == 2
        && super::enabled("gather")
}

/// `table[ids]`; requires [`supports`].
pub fn gather_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if !supports(table, ids) {
        bail!(
            "gather rows: needs an f32 or bf16 [R, d] table on CUDA and u32 ids (got {:?} {:?}, ids {:?})",
            table.dtype(),
            table.shape(),
            ids.dtype()
        )
    }
    table.apply_op2(&ids.flatten_all()?.contiguous()?, GatherRows)
}

struct GatherRows;

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    launch::cuda_only!("gather rows: the fused op runs on CUDA only (the CPU uses index_select)", _, _);

    fn cuda_fwd(
        &self,
        table: &CudaStorage,
        tl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, d) = tl.shape().dims2()?;
        let out = table.index_select(ids, tl, il, 0)?;
        Ok((out, Shape::from((il.shape().elem_count(), d))))
    }

    fn bwd(&self, table: &Tensor, ids: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // summed in f32 whatever the table's dtype
        let rows = table.dim(0)?;
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let sum = grad.apply_op2_no_bwd(ids, &ScatterAddRows { rows })?;
        Ok((Some(sum.to_dtype(table.dtype())?), None))
    }
}

/// `out[ids[j]] += grad[j]` into a zeroed `[rows, d]` f32 buffer.
struct ScatterAddRows {
    rows: usize,
}

impl CustomOp2 for ScatterAddRows {
    fn name(&self) -> &'static str {
        "scatter-add-rows"
    }

    launch::cuda_only!("scatter-add rows: CUDA only", _, _);

    fn cuda_fwd(
        &self,
        grad: &CudaStorage,
        gl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, d) = gl.shape().dims2()?;
        if il.shape().elem_count() != n {
            bail!("scatter-add rows: {n} gradient rows for {} ids", il.shape().elem_count())
        }
        let (g, i) = (launch::view::<f32>(grad, gl)?, launch::view::<u32>(ids, il)?);
        let dev = launch::device(grad);
        let mut out = launch::zeros::<f32>(dev, self.rows * d)?;
        let total = n * d;
        if total > 0 {
            let (n64, d32, rows32) = (
                n as i64,
                d as i32,
                u32::try_from(self.rows)
                    .map_err(|_| candle_core::Error::Msg("scatter-add rows: table too tall".into()))?,
            );
            let blocks = total.div_ceil(256).min(65535 * 8) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let f = launch::func(dev, MODULE, ptx::GATHER, "scatter_add_rows_f32")?;
            let mut b = f.builder();
            b.arg(&i).arg(&g).arg(&mut out).arg(&n64).arg(&d32).arg(&rows32);
            // SAFETY: ids hold n entries, the gradient n x d, the output rows x d; the kernel
            // skips ids at or past `rows`.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((self.rows, d))))
    }
}
