//! Fused causal attention on the CPU (f32 and f64): FlashAttention's recipe for a core's
//! caches. For each sequence and key/value head (one task each, spread over the threads),
//! blocks of 64 queries: the block's scores against the keys it can see, their softmax and the
//! weighted sum of values, in a block-sized buffer; the backward recomputes the block's
//! probabilities the same way and accumulates the group's key and value gradients in the
//! task, so tasks never write the same memory.
//!
//! What it replaces ([`super::causal_attention_reference`], still the path for bf16 and with
//! dropout): contiguous copies of q, k and v, a scaled copy of q, the full `[B, H, T, S]`
//! scores and probabilities, and about ten graph nodes per layer, each of whose gradients
//! candle's backward adds to a fresh tensor of zeros. Here q, k, v and the output gradient are
//! read where they lie (any strides: the mixer's heads are views of its projections), the
//! products are single-threaded calls of the `gemm` crate inside the task (candle's batched
//! product calls it once per matrix and, with two threads, hands every 64 x 64 product of a
//! head to the thread pool), and the op is one node.
//!
//! Shapes as [`super::causal_attention`]: `q: [B, H, T, d_h]`, `k, v: [B, KVH, S, d_h]`, query
//! `t` sees keys `s <= offset + t`; the output `[B, H, T, d_h]` contiguous. The packed form
//! ([`causal_attention_packed`]) reads q, k and v from one projection's output and writes a
//! token-major output and one gradient, through the same forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Dims;
use crate::cpu::{product, product_into, Mat, Real};

/// Queries per block: the block's scores (64 x S) stay in the cache at the lengths training
/// uses, and a long sequence's never grow past 64 rows.
const BLOCK: usize = 64;

/// Whether [`causal_attention`] takes these inputs: CPU tensors of one dtype, f32 or f64,
/// non-empty, unless switched off (`ALTFORMERS_UNFUSED=attention`).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dtype_ok = matches!(q.dtype(), DType::F32 | DType::F64) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    let non_empty = q.elem_count() > 0 && k.elem_count() > 0;
    q.device().is_cpu() && dtype_ok && non_empty && crate::kernels::enabled("attention")
}

/// Causal softmax attention, fused (see the module doc).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
    let dims = Dims::of(q, k, v, "CPU attention")?;
    q.apply_op3(k, v, FusedAttention { dims, offset })
}

impl Dims {
    /// The blocks of key/value head `g`'s query heads: (head within the group, head, first
    /// query, queries in the block).
    fn blocks(&self, g: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        (0..self.group()).flat_map(move |hg| {
            (0..self.t).step_by(BLOCK).map(move |t0| (hg, g * self.group() + hg, t0, BLOCK.min(self.t - t0)))
        })
    }

    /// Keys query `t` sees.
    fn visible(&self, t: usize, offset: usize) -> usize {
        (offset + t + 1).min(self.s)
    }
}

struct FusedAttention {
    dims: Dims,
    offset: usize,
}

/// A `[B, heads, rows, d_h]` operand where it lies in its storage: element `(b, h, r, j)` at
/// `start + b sb + h sh + r sr + j sj`.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    stride: [usize; 4],
}

impl<'a, T> View<'a, T> {
    fn new(data: &'a [T], layout: &Layout, what: &str) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if dims.len() != 4 {
            candle_core::bail!("CPU attention: {what} must have 4 dimensions, not {dims:?}")
        }
        let stride = [stride[0], stride[1], stride[2], stride[3]];
        Self::strided(data, layout.start_offset(), [dims[0], dims[1], dims[2], dims[3]], stride, what)
    }

    /// `dims` elements from `start` at `stride`, checked to lie in `data`.
    fn strided(data: &'a [T], start: usize, dims: [usize; 4], stride: [usize; 4], what: &str) -> Result<Self> {
        // The last element the view reaches must lie in the storage: the products below read
        // through raw pointers.
        let last = start + dims.iter().zip(stride).map(|(&n, st)| n.saturating_sub(1) * st).sum::<usize>();
        if last >= data.len() {
            candle_core::bail!("CPU attention: {what} reaches element {last} of a storage of {}", data.len())
        }
        Ok(Self { data, start, stride })
    }

    /// Heads of `dh` at columns `first * dh..` of token-major `[B, T, width]` data from
    /// `start`, seen as `[B, heads, T, dh]` (`dims`).
    fn token_major(
        data: &'a [T],
        start: usize,
        dims: [usize; 4],
        width: usize,
        first: usize,
        what: &str,
    ) -> Result<Self> {
        let [_, _, t, dh] = dims;
        Self::strided(data, start + first * dh, dims, [t * width, dh, width, 1], what)
    }

    /// Rows `r..` of head `h` of sequence `b` as a matrix (row stride, column stride).
    fn rows(&self, b: usize, h: usize, r: usize) -> Mat<T> {
        let at = self.start + b * self.stride[0] + h * self.stride[1] + r * self.stride[2];
        Mat { ptr: self.data[at..].as_ptr(), rs: self.stride[2] as isize, cs: self.stride[3] as isize }
    }

    fn at(&self, b: usize, h: usize, r: usize, j: usize) -> T
    where
        T: Copy,
    {
        self.data[self.start + b * self.stride[0] + h * self.stride[1] + r * self.stride[2] + j * self.stride[3]]
    }
}

/// Where the op writes a `[B, heads, rows, d_h]` result: element `(b, h, r, j)` at
/// `ptr + b sb + h sh + r sr + j`, in a buffer the caller holds. The tasks (one per sequence
/// and key/value head) write disjoint elements through it from several threads.
#[derive(Clone, Copy)]
struct Dest<T> {
    ptr: *mut T,
    stride: [usize; 3],
}

// SAFETY: a `Dest` is handed to tasks that write disjoint elements of a buffer that outlives them.
unsafe impl<T: Send> Send for Dest<T> {}
unsafe impl<T: Sync> Sync for Dest<T> {}

impl<T> Dest<T> {
    /// `buf` from `start`, at `stride`; `dims` checked to fit.
    fn new(buf: &mut [T], start: usize, dims: [usize; 4], stride: [usize; 3]) -> Self {
        if dims.contains(&0) {
            // nothing is written
            return Self { ptr: buf.as_mut_ptr(), stride };
        }
        let last = start + (0..3).map(|i| dims[i].saturating_sub(1) * stride[i]).sum::<usize>() + dims[3];
        assert!(last <= buf.len(), "CPU attention: a result of {dims:?} does not fit its buffer");
        // SAFETY: start < last <= len, checked above
        Self { ptr: unsafe { buf.as_mut_ptr().add(start) }, stride }
    }

    /// A contiguous `[B, heads, rows, d_h]` buffer.
    fn head_major(buf: &mut [T], [b, h, r, d]: [usize; 4]) -> Self {
        Self::new(buf, 0, [b, h, r, d], [h * r * d, r * d, d])
    }

    /// Heads of `d` at columns `first * d..` of a token-major `[B, rows, width]` buffer.
    fn token_major(buf: &mut [T], dims: [usize; 4], width: usize, first: usize) -> Self {
        let [_, _, r, d] = dims;
        Self::new(buf, first * d, dims, [r * width, d, width])
    }

    /// Rows `r..` of head `h` of sequence `b`.
    fn rows(&self, b: usize, h: usize, r: usize) -> *mut T {
        // SAFETY: within the buffer `new` checked (callers stay inside the dims).
        unsafe { self.ptr.add(b * self.stride[0] + h * self.stride[1] + r * self.stride[2]) }
    }

    fn row_stride(&self) -> usize {
        self.stride[2]
    }
}

impl FusedAttention {
    /// Block `t0..t0 + rows` of query head `h` of sequence `b`: the probabilities `[rows, n]`
    /// over the `n` keys the block's last query sees, into `p` (zero where a query cannot see).
    fn probabilities<T: Real>(
        &self,
        q: &View<T>,
        k: &View<T>,
        (b, h, t0, rows): (usize, usize, usize, usize),
        p: &mut [T],
    ) -> usize {
        let d = self.dims;
        let n = d.visible(t0 + rows - 1, self.offset);
        let scale = T::narrow(1.0 / (d.dh as f64).sqrt());
        // SAFETY: the views were checked; p holds rows x n.
        unsafe { product(p, n, false, q.rows(b, h, t0), k.rows(b, h / d.group(), 0).t(), (rows, n, d.dh), scale, 1) };
        for (i, row) in p[..rows * n].chunks_mut(n).enumerate() {
            let seen = d.visible(t0 + i, self.offset);
            softmax_in_place(&mut row[..seen]);
            row[seen..].fill(T::zero());
        }
        n
    }

    /// The output into `out`: one task per sequence and key/value head.
    fn forward<T: Real>(&self, q: &View<T>, k: &View<T>, v: &View<T>, out: Dest<T>) {
        let d = self.dims;
        (0..d.b * d.kvh).into_par_iter().for_each(|task| {
            let (b, g) = (task / d.kvh, task % d.kvh);
            let mut p = vec![T::zero(); BLOCK * d.s];
            for (_, h, t0, rows) in d.blocks(g) {
                let n = self.probabilities(q, k, (b, h, t0, rows), &mut p);
                // SAFETY: p holds rows x n, v was checked, the task alone writes head h's rows.
                unsafe {
                    let o = out.rows(b, h, t0);
                    product_into(
                        o,
                        out.row_stride(),
                        false,
                        Mat::dense(&p, n),
                        v.rows(b, g, 0),
                        (rows, d.dh, n),
                        T::one(),
                        1,
                    )
                };
            }
        });
    }

    /// `dq`, `dk` and `dv` into `[dq, dk, dv]` (zeroed: dk and dv are sums over the blocks), from
    /// the output `o` and its gradient `go`: with `P` the probabilities and `D_i = sum_j go_ij
    /// o_ij`, `dV = P^T dO`, `dS = P (dO V^T - D)`, `dQ = scale dS K`, `dK = scale dS^T Q`.
    fn backward<T: Real>(&self, q: &View<T>, k: &View<T>, v: &View<T>, o: &View<T>, go: &View<T>, grads: [Dest<T>; 3]) {
        let d = self.dims;
        let scale = T::narrow(1.0 / (d.dh as f64).sqrt());
        let [dq, dk, dv] = grads;
        (0..d.b * d.kvh).into_par_iter().for_each(|task| {
            let (b, g) = (task / d.kvh, task % d.kvh);
            let mut p = vec![T::zero(); BLOCK * d.s];
            let mut dp = vec![T::zero(); BLOCK * d.s];
            for (_, h, t0, rows) in d.blocks(g) {
                let n = self.probabilities(q, k, (b, h, t0, rows), &mut p);
                let go_blk = go.rows(b, h, t0);
                // SAFETY (all four products): views checked, buffers sized rows x n; the task
                // alone writes key/value head g's rows of dk and dv and its query heads' of dq.
                unsafe {
                    let dv_rows = dv.rows(b, g, 0);
                    product_into(
                        dv_rows,
                        dv.row_stride(),
                        true,
                        Mat::dense(&p, n).t(),
                        go_blk,
                        (n, d.dh, rows),
                        T::one(),
                        1,
                    );
                    product(&mut dp, n, false, go_blk, v.rows(b, g, 0).t(), (rows, n, d.dh), T::one(), 1);
                }
                for i in 0..rows {
                    let dot = (0..d.dh).fold(T::zero(), |acc, j| acc + go.at(b, h, t0 + i, j) * o.at(b, h, t0 + i, j));
                    let seen = d.visible(t0 + i, self.offset);
                    for (ds, &pr) in dp[i * n..i * n + seen].iter_mut().zip(&p[i * n..i * n + seen]) {
                        *ds = pr * (*ds - dot);
                    }
                    dp[i * n + seen..(i + 1) * n].fill(T::zero());
                }
                unsafe {
                    let (dq_rows, dk_rows) = (dq.rows(b, h, t0), dk.rows(b, g, 0));
                    product_into(
                        dq_rows,
                        dq.row_stride(),
                        false,
                        Mat::dense(&dp, n),
                        k.rows(b, g, 0),
                        (rows, d.dh, n),
                        scale,
                        1,
                    );
                    product_into(
                        dk_rows,
                        dk.row_stride(),
                        true,
                        Mat::dense(&dp, n).t(),
                        q.rows(b, h, t0),
                        (n, d.dh, rows),
                        scale,
                        1,
                    );
                }
            }
        });
    }
}

crate::cpu::vectorised! {
    /// The softmax of a row of scores, in place (vector loops: its max, exponentials and sum).
    fn softmax_in_place<T: Real>(row: &mut [T]) -> () {
        let max = crate::cpu::lane_max(row);
        for x in row.iter_mut() {
            *x = (*x - max).exp_vec();
        }
        let inv = crate::cpu::lane_sum(row, |x| x).recip();
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

impl FusedAttention {
    /// The views of `tensors` (CPU storages of dtype `T`), `names` naming them in errors.
    fn with_views<T: Real, R>(tensors: &[&Tensor], names: &[&str], f: impl FnOnce(&[View<T>]) -> R) -> Result<R> {
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(guards.len());
        for ((storage, layout), name) in guards.iter().zip(names) {
            let candle_core::Storage::Cpu(cpu) = &**storage else {
                candle_core::bail!("CPU attention: {name} is not on the CPU")
            };
            views.push(View::new(cpu.as_slice::<T>()?, layout, name)?);
        }
        Ok(f(&views))
    }

    fn forward_storage<T: Real>(
        &self,
        (qs, ql): (&CpuStorage, &Layout),
        (ks, kl): (&CpuStorage, &Layout),
        (vs, vl): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let (q, k, v) = (
            View::new(qs.as_slice::<T>()?, ql, "q")?,
            View::new(ks.as_slice::<T>()?, kl, "k")?,
            View::new(vs.as_slice::<T>()?, vl, "v")?,
        );
        let d = self.dims;
        let mut out = vec![T::zero(); d.b * d.h * d.t * d.dh];
        self.forward(&q, &k, &v, Dest::head_major(&mut out, [d.b, d.h, d.t, d.dh]));
        Ok(T::to_cpu_storage_owned(out))
    }

    fn gradients<T: Real>(&self, tensors: [&Tensor; 5]) -> Result<(Tensor, Tensor, Tensor)> {
        let d = self.dims;
        let names = ["q", "k", "v", "the output", "the output gradient"];
        let mut dq = vec![T::zero(); d.b * d.h * d.t * d.dh];
        let mut dk = vec![T::zero(); d.b * d.kvh * d.s * d.dh];
        let mut dv = vec![T::zero(); d.b * d.kvh * d.s * d.dh];
        let grads = [
            Dest::head_major(&mut dq, [d.b, d.h, d.t, d.dh]),
            Dest::head_major(&mut dk, [d.b, d.kvh, d.s, d.dh]),
            Dest::head_major(&mut dv, [d.b, d.kvh, d.s, d.dh]),
        ];
        Self::with_views::<T, _>(&tensors, &names, |x| self.backward(&x[0], &x[1], &x[2], &x[3], &x[4], grads))?;
        Ok((
            Tensor::from_vec(dq, (d.b, d.h, d.t, d.dh), &Device::Cpu)?,
            Tensor::from_vec(dk, (d.b, d.kvh, d.s, d.dh), &Device::Cpu)?,
            Tensor::from_vec(dv, (d.b, d.kvh, d.s, d.dh), &Device::Cpu)?,
        ))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "cpu-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let out = match qs.dtype() {
            DType::F32 => self.forward_storage::<f32>((qs, ql), (ks, kl), (vs, vl))?,
            DType::F64 => self.forward_storage::<f64>((qs, ql), (ks, kl), (vs, vl))?,
            dtype => candle_core::bail!("CPU attention: {dtype:?} unsupported (f32 or f64)"),
        };
        Ok((out, Shape::from((d.b, d.h, d.t, d.dh))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let go = go.to_dtype(q.dtype())?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.gradients::<f32>([q, k, v, o, &go])?,
            DType::F64 => self.gradients::<f64>([q, k, v, o, &go])?,
            dtype => candle_core::bail!("CPU attention backward: {dtype:?} unsupported"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Whether [`causal_attention_packed`] takes a fused projection's output like `qkv`: a CPU
/// tensor in f32 or f64, unless switched off (`ALTFORMERS_UNFUSED=attention` or
/// `attention-packed`).
pub fn supports_packed(qkv: &Tensor) -> bool {
    qkv.device().is_cpu()
        && matches!(qkv.dtype(), DType::F32 | DType::F64)
        && qkv.elem_count() > 0
        && crate::kernels::enabled("attention")
        && crate::kernels::enabled("attention-packed")
}

/// Causal attention over one fused projection's output `qkv: [B, T, (H + 2 KVH) d_h]`
/// (queries, keys, values in consecutive blocks of features, positions from 0) -> `[B, T, H
/// d_h]`, token-major, as [`causal_attention`] on the blocks read in place; the backward writes
/// qkv's gradient as one tensor (the blocks as views would come back as three zero-padded
/// gradients to sum), and the output needs no transpose for the output projection.
pub fn causal_attention_packed(qkv: &Tensor, heads: usize, kv_heads: usize) -> Result<Tensor> {
    let dims = Dims::packed(qkv.shape(), heads, kv_heads, "CPU attention")?;
    qkv.apply_op1(PackedAttention(FusedAttention { dims, offset: 0 }))
}

struct PackedAttention(FusedAttention);

impl PackedAttention {
    /// q, k and v: the three blocks of `qkv`'s contiguous data.
    fn operands<'a, T: Real>(&self, qkv: &'a [T]) -> Result<[View<'a, T>; 3]> {
        let d = self.0.dims;
        let width = (d.h + 2 * d.kvh) * d.dh;
        Ok([
            View::token_major(qkv, 0, [d.b, d.h, d.t, d.dh], width, 0, "q")?,
            View::token_major(qkv, 0, [d.b, d.kvh, d.t, d.dh], width, d.h, "k")?,
            View::token_major(qkv, 0, [d.b, d.kvh, d.t, d.dh], width, d.h + d.kvh, "v")?,
        ])
    }

    fn forward<T: Real>(&self, qkv: &[T]) -> Result<Vec<T>> {
        let d = self.0.dims;
        let [q, k, v] = self.operands(qkv)?;
        let mut out = vec![T::zero(); d.b * d.t * d.h * d.dh];
        self.0.forward(&q, &k, &v, Dest::token_major(&mut out, [d.b, d.h, d.t, d.dh], d.h * d.dh, 0));
        Ok(out)
    }

    /// qkv's gradient, `[B, T, (H + 2 KVH) d_h]`, from the output `o` and its gradient `go`.
    fn gradient<T: Real>(&self, qkv: &Tensor, o: &Tensor, go: &Tensor) -> Result<Tensor> {
        let d = self.0.dims;
        let width = (d.h + 2 * d.kvh) * d.dh;
        let mut grad = vec![T::zero(); d.b * d.t * width];
        let grads = [
            Dest::token_major(&mut grad, [d.b, d.h, d.t, d.dh], width, 0),
            Dest::token_major(&mut grad, [d.b, d.kvh, d.t, d.dh], width, d.h),
            Dest::token_major(&mut grad, [d.b, d.kvh, d.t, d.dh], width, d.h + d.kvh),
        ];
        let (o, go) = (o.contiguous()?, go.contiguous()?);
        let names = ["CPU attention: qkv", "CPU attention: the output", "CPU attention: the output gradient"];
        crate::cpu::with_slices::<T, _>(&[qkv, &o, &go], &names, |data| -> Result<()> {
            let [q, k, v] = self.operands(data[0])?;
            let heads = [d.b, d.h, d.t, d.dh];
            let o = View::token_major(data[1], 0, heads, d.h * d.dh, 0, "the output")?;
            let go = View::token_major(data[2], 0, heads, d.h * d.dh, 0, "the output gradient")?;
            self.0.backward(&q, &k, &v, &o, &go, grads);
            Ok(())
        })??;
        Tensor::from_vec(grad, (d.b, d.t, width), &Device::Cpu)
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "cpu-causal-attention-packed"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.0.dims;
        let out = match storage {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.forward(crate::cpu::contiguous(x, layout, "CPU attention: qkv")?)?)
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.forward(crate::cpu::contiguous(x, layout, "CPU attention: qkv")?)?)
            }
            _ => candle_core::bail!("CPU attention: {:?} unsupported (f32 or f64)", storage.dtype()),
        };
        Ok((out, Shape::from((d.b, d.t, d.h * d.dh))))
    }

    fn bwd(&self, qkv: &Tensor, o: &Tensor, go: &Tensor) -> Result<Option<Tensor>> {
        let go = go.to_dtype(qkv.dtype())?;
        Ok(Some(match qkv.dtype() {
            DType::F32 => self.gradient::<f32>(qkv, o, &go)?,
            DType::F64 => self.gradient::<f64>(qkv, o, &go)?,
            dtype => candle_core::bail!("CPU attention backward: {dtype:?} unsupported"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::causal_attention_reference;
    use crate::testing::{randn, rel_err};
    use candle_core::Var;

    /// Token-major `[B, T, heads, d_h]` data seen head-major (the mixer's view of its
    /// projections: not contiguous).
    fn heads(dims: (usize, usize, usize, usize), seed: u64, dtype: DType) -> anyhow::Result<Var> {
        let (b, h, t, dh) = dims;
        Ok(Var::from_tensor(&randn(&[b, t, h, dh], seed, dtype)?)?)
    }

    /// The fused op against the unfused reference on random inputs: outputs and all three
    /// gradients, with grouped heads, an offset, a length that is not a whole number of blocks,
    /// and head-major views that are not contiguous.
    #[test]
    fn matches_the_reference_forward_and_backward() -> anyhow::Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            for (b, h, kvh, t, offset, dh) in [(2, 4, 2, 70, 0, 8), (1, 3, 3, 5, 4, 16), (2, 2, 1, 130, 3, 4)] {
                let s = offset + t;
                let q = heads((b, h, t, dh), 1, dtype)?;
                let k = heads((b, kvh, s, dh), 2, dtype)?;
                let v = heads((b, kvh, s, dh), 3, dtype)?;
                let view = |x: &Var| x.as_tensor().transpose(1, 2);
                let (qv, kv, vv) = (view(&q)?, view(&k)?, view(&v)?);
                assert!(!qv.is_contiguous());
                let w = randn(&[b, h, t, dh], 4, dtype)?;
                let fused = causal_attention(&qv, &kv, &vv, offset)?;
                let reference = causal_attention_reference(&qv, &kv, &vv, offset, None)?;
                assert!(rel_err(&fused, &reference)? < tol, "{dtype:?} {:?}", (b, h, kvh, t, offset, dh));
                let gf = (fused * &w)?.sum_all()?.backward()?;
                let gr = (reference * &w)?.sum_all()?.backward()?;
                for (x, name) in [(&q, "q"), (&k, "k"), (&v, "v")] {
                    let (a, r) = (gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap());
                    assert!(rel_err(a, r)? < tol, "{dtype:?} d{name} {:?}", (b, h, kvh, t, offset, dh));
                }
            }
        }
        Ok(())
    }

    /// Causality: changing the keys and values after position offset + t leaves query t's
    /// output unchanged.
    #[test]
    fn later_keys_do_not_reach_earlier_queries() -> anyhow::Result<()> {
        let (b, h, t, dh) = (1, 2, 9, 4);
        let q = randn(&[b, h, t, dh], 1, DType::F64)?;
        let k = randn(&[b, h, t, dh], 2, DType::F64)?;
        let v = randn(&[b, h, t, dh], 3, DType::F64)?;
        let before = causal_attention(&q, &k, &v, 0)?;
        let later = |x: &Tensor, seed| -> anyhow::Result<Tensor> {
            Ok(Tensor::cat(&[x.narrow(2, 0, 5)?, randn(&[b, h, t - 5, dh], seed, DType::F64)?], 2)?)
        };
        let after = causal_attention(&q, &later(&k, 7)?, &later(&v, 8)?, 0)?;
        assert!(rel_err(&before.narrow(2, 0, 5)?, &after.narrow(2, 0, 5)?)? < 1e-15);
        assert!(rel_err(&before.narrow(2, 5, 4)?, &after.narrow(2, 5, 4)?)? > 1e-3);
        Ok(())
    }
}
