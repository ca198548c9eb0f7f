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

/// Whether [`embed`] runs: an f32 `[R, d]` table on a CUDA device, u32 ids, activations in f32
/// or bf16, unless switched off (`ALTFORMERS_UNFUSED=embedding`).
pub fn supports_embed(table: &Tensor, ids: &Tensor, dtype: DType) -> bool {
    table.device().is_cuda()
        && table.dtype() == DType::F32
        && table.rank() == 2
        && ids.dtype() == DType::U32
        && matches!(dtype, DType::F32 | DType::BF16)
        && super::enabled("embedding")
}

/// A token embedding in `dtype`: `table[ids[r]] + positions[r % T]` for the `[N]` (flattened
/// `[B, T]`) ids, `positions: [T, d]` f32 (or none), `[N, d]`; one pass each way where the
/// gather, the position add and the cast were three. Requires [`supports_embed`].
pub fn embed(table: &Tensor, positions: Option<&Tensor>, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    if !supports_embed(table, ids, dtype) {
        bail!("embedding: needs an f32 [R, d] table on CUDA, u32 ids and f32 or bf16 activations")
    }
    let d = table.dim(1)?;
    if let Some(p) = positions {
        if p.dtype() != DType::F32
            || p.rank() != 2
            || p.dim(1)? != d
            || p.dim(0)? == 0
            || !ids.elem_count().is_multiple_of(p.dim(0)?)
        {
            bail!(
                "embedding: positions {:?} {:?} do not fit the table's width {d} and {} ids",
                p.dtype(),
                p.shape(),
                ids.elem_count()
            )
        }
    }
    let op = Embed { dtype, has_positions: positions.is_some() };
    let positions = positions.unwrap_or(table).contiguous()?;
    table.contiguous()?.apply_op3(&positions, &ids.flatten_all()?.contiguous()?, op)
}

struct Embed {
    dtype: DType,
    has_positions: bool,
}

/// A block per row at a time, 256 threads along it.
fn row_blocks(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, 65535 * 4) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("embedding: {what} {x} exceeds i32")))
}

impl candle_core::CustomOp3 for Embed {
    fn name(&self) -> &'static str {
        "embedding"
    }

    launch::cuda_only!("embedding: the fused op runs on CUDA only (the CPU gathers and adds)", _, _, _);

    fn cuda_fwd(
        &self,
        ts: &CudaStorage,
        tl: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, d) = tl.shape().dims2()?;
        let n = il.shape().elem_count();
        let t = if self.has_positions { pl.shape().dims2()?.0 } else { 1 };
        let dev = launch::device(ts);
        let (table, pos, ids) =
            (launch::view::<f32>(ts, tl)?, launch::view::<f32>(ps, pl)?, launch::view::<u32>(is, il)?);
        let (n64, d32, t32, has) = (n as i64, int(d, "width")?, int(t, "positions")?, self.has_positions as i32);
        let rows32 = u32::try_from(rows).map_err(|_| candle_core::Error::Msg("embedding: table too tall".into()))?;
        macro_rules! run {
            ($ty:ty, $sfx:literal) => {{
                let mut out = launch::uninit::<$ty>(dev, n * d)?;
                if n > 0 {
                    let f = launch::func(dev, MODULE, ptx::GATHER, concat!("embed_fwd_", $sfx))?;
                    let mut b = f.builder();
                    b.arg(&table)
                        .arg(&pos)
                        .arg(&ids)
                        .arg(&mut out)
                        .arg(&n64)
                        .arg(&d32)
                        .arg(&t32)
                        .arg(&rows32)
                        .arg(&has);
                    // SAFETY: table holds rows x d, positions t x d (when used), ids n, out n x d.
                    unsafe { b.launch(row_blocks(n)) }.w()?;
                }
                <$ty as candle_core::cuda_backend::CudaDType>::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match self.dtype {
            DType::F32 => run!(f32, "f32"),
            DType::BF16 => run!(half::bf16, "bf16"),
            other => bail!("embedding: activations in {other:?}"),
        };
        Ok((out, Shape::from((n, d))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        positions: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(self.dtype)?.contiguous()?;
        let (rows, d) = table.dims2()?;
        let n = ids.elem_count();
        let guards = [&grad, ids].map(|t| t.storage_and_layout());
        let [(gg, gl), (ig, il)] = &guards;
        let what = "embedding backward";
        let gs = launch::storage(gg, what, "the gradient")?;
        let dev = launch::device(gs);
        let ids_view = launch::view::<u32>(launch::storage(ig, what, "ids")?, il)?;
        let mut dtable = launch::zeros::<f32>(dev, rows * d)?;
        let t = if self.has_positions { positions.dim(0)? } else { 1 };
        let mut dpos = launch::uninit::<f32>(dev, if self.has_positions { t * d } else { 1 })?;
        let (n64, d32, t32) = (n as i64, int(d, "width")?, int(t, "positions")?);
        let b32 = int(n / t, "sequences")?;
        let rows32 = u32::try_from(rows).map_err(|_| candle_core::Error::Msg("embedding: table too tall".into()))?;
        launch::f32_or_bf16!(
            sfx,
            [g = (gs, gl)],
            {
                if n > 0 {
                    let f = launch::func(dev, MODULE, ptx::GATHER, &format!("embed_bwd_table_{sfx}"))?;
                    let mut b = f.builder();
                    b.arg(&g).arg(&ids_view).arg(&mut dtable).arg(&n64).arg(&d32).arg(&rows32);
                    // SAFETY: g holds n x d, ids n, dtable rows x d (ids past it are skipped).
                    unsafe { b.launch(row_blocks(n)) }.w()?;
                    if self.has_positions {
                        let f = launch::func(dev, MODULE, ptx::GATHER, &format!("embed_bwd_positions_{sfx}"))?;
                        let mut b = f.builder();
                        b.arg(&g).arg(&mut dpos).arg(&b32).arg(&d32).arg(&t32);
                        // SAFETY: g holds (n / t) x t x d, dpos t x d, every element written.
                        unsafe { b.launch(row_blocks(t)) }.w()?;
                    }
                }
            },
            "embedding backward: the gradient must be f32 or bf16"
        );
        let dpos = self.has_positions.then(|| launch::tensor(dpos, dev, (t, d)));
        Ok((Some(launch::tensor(dtable, dev, (rows, d))), dpos, None))
    }
}
