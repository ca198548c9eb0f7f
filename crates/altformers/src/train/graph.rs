//! The training step captured once as a CUDA graph and replayed at every later step
//! (issue 24). A GPT-2-small step launches about 420 kernels; launched one by one, the GPU
//! waits for the host between them (0.85 ms of a 25.9 ms step, measured), and a small model's
//! step is mostly such waits. A replay is one launch for the whole step.
//!
//! How: the first [`WARM_STEPS`] steps run eagerly, reading the batch from fixed device
//! buffers, with candle's host-to-device cache on (it keeps every shape and stride candle
//! uploads, so the capture finds them on the device); they load every kernel and size
//! cuBLAS's workspace. The next step is captured (forward, backward, AdamW, the loss and
//! gradient norm copied into fixed buffers), and every step from then on is: the batch copied
//! into its buffers, the optimizer's table written with the step's learning rate and bias
//! corrections ([`KeptTable`]), one launch, the loss and norm copied out. The replay runs the
//! same kernels on the same data in the same order: its parameters are the eager step's up to
//! the order of the kernels' atomic sums, which differs between two eager runs as much (GPU
//! test `a_graphed_training_step_is_the_eager_step`: within 1e-6 after seven steps).
//!
//! Dropout: each mask's seed is drawn on the host, a kernel argument (two u32 halves). After
//! the capture, the graph's kernel nodes are searched for the capture step's seeds
//! ([`Seeds`]); each replay draws its step's seeds in the same order and writes them into those
//! nodes' arguments (`cuGraphExecKernelNodeSetParams`), so the masks are the eager step's.
//!
//! A data-parallel worker on GPUs captures its NCCL gradient all-reduce with the rest (NCCL's
//! collectives can be captured; which parameters any rank has a gradient for is settled by
//! the eager warm-up steps), and after each replay waits for it against the job's deadline.
//!
//! It applies where a replay is that computation: one slice per step, an exchange that can be
//! captured (one device, NCCL; a sequence split over NCCL too), a model
//! that does not follow the training step (Performer's redraws), a batch of the captured shape
//! (else that step runs eagerly), the fused AdamW, every dropout seed found in the graph.
//! Elsewhere every step is eager; a capture that fails says why once and leaves the run eager
//! (on every worker of a job: they agree first), except a panic inside a library call while
//! capturing, after which the device is not to be trusted: that stops the run.
//! `ALTFORMERS_UNFUSED=train-graph` switches it off.

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

use super::optim::StepNorm;
use super::step::Trainer;
use super::task::{Batch, Task};
use crate::kernels::{adamw::KeptTable, launch};
use crate::model::Model;
use crate::rng::Rng;

/// Eager steps before the capture: the first loads the kernels and fills the caches, the
/// second shows that nothing new is uploaded.
const WARM_STEPS: usize = 2;

/// Where a trainer is with its graph.
#[derive(Default)]
pub enum Graphing {
    /// Not looked at yet (the first step decides).
    #[default]
    Unchecked,
    /// Eager steps on the fixed buffers so far.
    Warming(Buffers, usize),
    Ready(Box<Captured>),
    /// Every step eager.
    Off,
}

/// The fixed device buffers a captured step reads and writes.
pub struct Buffers {
    batch: Batch,
    /// The loss and gradient norm's buffers, shaped by the first eager step.
    outputs: Option<(Tensor, Tensor)>,
}

pub struct Captured {
    graph: CudaGraph,
    buffers: Buffers,
    table: KeptTable,
    seeds: Seeds,
}

/// Where the captured step's dropout seeds are among its kernels' arguments.
#[derive(Default)]
struct Seeds {
    /// Seeds a step draws (the capture's count).
    draws: usize,
    nodes: Vec<SeededNode>,
}

/// A kernel node with dropout seeds among its arguments: its parameters, its arguments' bytes
/// (copies the replays rewrite) and the pointers to them the driver reads, and for each seed
/// the index of its low half's argument (the high half is the next) and which draw it is.
struct SeededNode {
    node: sys::CUgraphNode,
    params: sys::CUDA_KERNEL_NODE_PARAMS_v2,
    values: Vec<Vec<u8>>,
    pointers: Vec<*mut std::ffi::c_void>,
    seeds: Vec<(usize, usize)>,
}

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| anyhow!("{what}: {e:?}"))
}

impl Seeds {
    /// Finds each of `drawn` (the capture step's seeds, in draw order) among the arguments of
    /// `graph`'s kernels; an error if one is not found.
    fn find(graph: &CudaGraph, drawn: &[u64]) -> Result<Self> {
        if drawn.is_empty() {
            return Ok(Self::default());
        }
        let which: HashMap<u64, usize> = drawn.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let mut count = 0usize;
        // SAFETY: the graph is alive (borrowed); the array is sized by the driver's count.
        unsafe { check(sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut count), "graph nodes")? };
        let mut nodes = vec![std::ptr::null_mut(); count];
        unsafe { check(sys::cuGraphGetNodes(graph.cu_graph(), nodes.as_mut_ptr(), &mut count), "graph nodes")? };
        let mut found = vec![false; drawn.len()];
        let mut seeded = Vec::new();
        for &node in &nodes[..count] {
            let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            unsafe { check(sys::cuGraphNodeGetType(node, &mut kind), "node type")? };
            if kind != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
                continue;
            }
            // SAFETY: a kernel node; the driver fills the struct, whose argument pointers stay
            // valid while the graph lives (read here only).
            let mut params: sys::CUDA_KERNEL_NODE_PARAMS_v2 = unsafe { std::mem::zeroed() };
            unsafe { check(sys::cuGraphKernelNodeGetParams_v2(node, &mut params), "kernel node")? };
            // NCCL's kernels pass one packed buffer (`extra`), whose declared parameter (4 KB)
            // is larger than what it holds: never ours, never read
            if params.kernelParams.is_null() || params.func.is_null() || !params.extra.is_null() {
                continue;
            }
            let mut values: Vec<Vec<u8>> = Vec::new();
            let mut ours = true;
            loop {
                let (mut offset, mut size) = (0usize, 0usize);
                let r = unsafe { sys::cuFuncGetParamInfo(params.func, values.len(), &mut offset, &mut size) };
                if r != sys::CUresult::CUDA_SUCCESS {
                    break;
                }
                // our kernels take scalars and pointers; a large by-value argument is another's
                if size > 64 {
                    ours = false;
                    break;
                }
                // SAFETY: argument i of this kernel holds `size` bytes there.
                let at = unsafe { *params.kernelParams.add(values.len()) } as *const u8;
                values.push(unsafe { std::slice::from_raw_parts(at, size) }.to_vec());
            }
            if !ours {
                continue;
            }
            let half = |v: &Vec<u8>| -> Option<u32> { Some(u32::from_ne_bytes(v.as_slice().try_into().ok()?)) };
            let seeds: Vec<(usize, usize)> = (0..values.len().saturating_sub(1))
                .filter_map(|i| {
                    let (lo, hi) = (half(&values[i])?, half(&values[i + 1])?);
                    which.get(&((hi as u64) << 32 | lo as u64)).map(|&d| (i, d))
                })
                .collect();
            if seeds.is_empty() {
                continue;
            }
            for &(_, d) in &seeds {
                found[d] = true;
            }
            let pointers = values.iter_mut().map(|v| v.as_mut_ptr() as *mut std::ffi::c_void).collect();
            seeded.push(SeededNode { node, params, values, pointers, seeds });
        }
        if let Some(missing) = found.iter().position(|&f| !f) {
            bail!("dropout seed {} of {} is not among the captured kernels' arguments", missing + 1, drawn.len());
        }
        Ok(Self { draws: drawn.len(), nodes: seeded })
    }

    /// Writes the next [`Seeds::draws`] seeds of `rng` (this step's dropout stream, drawn in
    /// the capture's order) into the graph's nodes.
    fn write(&mut self, graph: &CudaGraph, rng: &mut Rng) -> Result<()> {
        if self.draws == 0 {
            return Ok(());
        }
        let drawn: Vec<u64> = (0..self.draws).map(|_| rng.next_u64()).collect();
        for n in &mut self.nodes {
            for &(i, d) in &n.seeds {
                n.values[i].copy_from_slice(&(drawn[d] as u32).to_ne_bytes());
                n.values[i + 1].copy_from_slice(&((drawn[d] >> 32) as u32).to_ne_bytes());
            }
            n.params.kernelParams = n.pointers.as_mut_ptr();
            // SAFETY: the node is the graph's, the executable was instantiated from it; the
            // arguments are the captured ones with the seeds replaced, alive during the call.
            unsafe {
                check(
                    sys::cuGraphExecKernelNodeSetParams_v2(graph.cu_graph_exec(), n.node, &n.params),
                    "dropout seeds",
                )?
            };
        }
        Ok(())
    }
}

/// The batch's tensors, those that are present.
fn tensors(b: &Batch) -> impl Iterator<Item = &Tensor> {
    [Some(&b.inputs), Some(&b.targets), b.rows.as_ref()].into_iter().flatten()
}

impl Buffers {
    fn like(batch: &Batch) -> Result<Self> {
        let fresh = |t: &Tensor| -> Result<Tensor> { Ok(t.zeros_like()?) };
        let batch = Batch {
            inputs: fresh(&batch.inputs)?,
            targets: fresh(&batch.targets)?,
            rows: batch.rows.as_ref().map(fresh).transpose()?,
        };
        Ok(Self { batch, outputs: None })
    }

    /// Whether `batch` has the buffers' shapes and dtypes.
    fn fits(&self, batch: &Batch) -> bool {
        let of = |b: &Batch| tensors(b).map(|t| (t.dims().to_vec(), t.dtype())).collect::<Vec<_>>();
        of(&self.batch) == of(batch)
    }

    fn fill(&self, dev: &CudaDevice, batch: &Batch) -> Result<()> {
        for (dst, src) in tensors(&self.batch).zip(tensors(batch)) {
            launch::copy_into(dev, "training graph", dst, src)?;
        }
        Ok(())
    }
}

/// A library call panicked while the step was being captured.
#[derive(Debug)]
struct CapturePanicked(String);

impl std::fmt::Display for CapturePanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capturing the training step as a CUDA graph failed inside a library call ({}); \
             train without the graph: ALTFORMERS_UNFUSED=train-graph",
            self.0
        )
    }
}

impl std::error::Error for CapturePanicked {}

impl Trainer {
    /// Why this trainer's steps are not captured, if they are not.
    fn why_not_graphed(&self, model: &Model) -> Option<&'static str> {
        if !crate::kernels::enabled("train-graph") {
            Some("switched off")
        } else if self.slices != 1 || self.train.accumulate != 1 || !self.sync.capturable() {
            Some("a step of several slices or micro-batches, or an exchange that reads back to the host")
        } else if model.follows_training_step() {
            Some("a model that follows the training step")
        } else {
            None
        }
    }

    /// Step `step` on `batch` through the graph where it applies (warm-up steps included):
    /// its loss and norm, or `None` where the caller runs the step eagerly.
    pub(super) fn graphed_step(
        &mut self,
        model: &Model,
        task: &dyn Task,
        batch: &Batch,
        dropout_rng: &mut Rng,
        step: usize,
    ) -> Result<Option<(Tensor, StepNorm)>> {
        let Device::Cuda(dev) = model.device() else { return Ok(None) };
        let dev = dev.clone();
        let mut state = std::mem::take(&mut self.graph);
        if let Graphing::Unchecked = state {
            state = match self.why_not_graphed(model) {
                None => Graphing::Warming(Buffers::like(batch)?, 0),
                Some(_) => Graphing::Off,
            };
        }
        let (result, state) = self.advance(state, model, task, batch, dropout_rng, step, &dev);
        self.graph = state;
        result
    }

    /// One step in `state`; the state after it.
    #[allow(clippy::too_many_arguments)]
    fn advance(
        &mut self,
        state: Graphing,
        model: &Model,
        task: &dyn Task,
        batch: &Batch,
        dropout_rng: &mut Rng,
        step: usize,
        dev: &CudaDevice,
    ) -> (Result<Option<(Tensor, StepNorm)>>, Graphing) {
        match state {
            Graphing::Warming(mut buffers, done) if buffers.fits(batch) => {
                if done < WARM_STEPS {
                    let warm = (|| {
                        buffers.fill(dev, batch)?;
                        let _cache = dev.enable_cuda_graph_htod_cache();
                        let (loss, norm) = self.eager_step(model, task, &buffers.batch, dropout_rng, step)?;
                        buffers.outputs = Some((loss.zeros_like()?, norm.0.zeros_like()?));
                        Ok((loss, norm))
                    })();
                    let next = match &warm {
                        Ok(_) if self.why_not_graphed(model).is_none() => Graphing::Warming(buffers, done + 1),
                        _ => Graphing::Off,
                    };
                    return (warm.map(Some), next);
                }
                let captured = self.capture(model, task, buffers, dropout_rng.clone(), dev);
                // every worker replays, or none does (their steps exchange different collectives)
                let agreed = match self.sync.all_agree(captured.is_ok()) {
                    Ok(agreed) => agreed,
                    Err(e) => return (Err(e), Graphing::Off),
                };
                match captured {
                    Ok(captured) if agreed => {
                        self.advance(Graphing::Ready(Box::new(captured)), model, task, batch, dropout_rng, step, dev)
                    }
                    Ok(_) => {
                        eprintln!(
                            "note: the training step runs without a CUDA graph (another worker's capture failed)"
                        );
                        (Ok(None), Graphing::Off)
                    }
                    Err(e) if e.is::<CapturePanicked>() => (Err(e), Graphing::Off),
                    Err(e) => {
                        // (the first line, unless asked for candle's backtrace: RUST_BACKTRACE)
                        let full = format!("{e:#}");
                        let why = match std::env::var_os("RUST_BACKTRACE") {
                            Some(_) => &full,
                            None => full.lines().next().unwrap_or_default(),
                        };
                        eprintln!("note: the training step runs without a CUDA graph (its capture failed: {why})");
                        (Ok(None), Graphing::Off)
                    }
                }
            }
            Graphing::Ready(mut g) if g.buffers.fits(batch) => {
                let replayed = self.replay(&mut g, batch, dropout_rng, step, dev);
                (replayed.map(Some), Graphing::Ready(g))
            }
            // a batch of another shape (or none captured): this step eagerly
            other => (Ok(None), other),
        }
    }

    /// Captures a step on `buffers` with its dropout stream `dropout_rng` (nothing runs: the
    /// first replay is its step).
    fn capture(
        &mut self,
        model: &Model,
        task: &dyn Task,
        buffers: Buffers,
        dropout_rng: Rng,
        dev: &CudaDevice,
    ) -> Result<Captured> {
        let Some((loss_out, norm_out)) = &buffers.outputs else { bail!("no eager step shaped the outputs") };
        // No cross-stream events (as the decoder's graph; see decoder.rs).
        // SAFETY: every operation of candle and this crate runs on the device's one stream,
        // but NCCL's overlapped exchange, which orders its stream by events of its own.
        unsafe { dev.disable_event_tracking() };
        let _cache = dev.enable_cuda_graph_htod_cache();
        let mut table = KeptTable::new(dev, model.params.vars().len())?;
        model.device().synchronize()?;
        let stream = dev.cuda_stream();
        let t0 = self.opt.t;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
        let mut rng = dropout_rng.clone();
        // A library call that cannot run while capturing may panic instead of failing (cudarc
        // unwraps its copies: seen with an upload from candle's cache under capture). The
        // device's state is then not to be trusted (an eager step after it read an illegal
        // address): the run stops with a message saying how to train without the graph.
        let captured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
            // the exchange between workers (NCCL's collectives) is captured with the rest
            let (loss, grads) = self.loss_and_averaged_gradients(model, task, &buffers.batch, &mut rng)?;
            // the learning rate and bias corrections are the table's, written per replay
            let norm = self.opt.step_kept(&grads, 0.0, self.train.grad_clip, &mut table)?;
            launch::copy_into(dev, "training graph", loss_out, &loss)?;
            launch::copy_into(dev, "training graph", norm_out, &norm.0)?;
            Ok(())
        }))
        .unwrap_or_else(|panic| {
            let why = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
            Err(anyhow::Error::new(CapturePanicked(why.unwrap_or("(no message)").to_string())))
        });
        // end the capture whatever happened, so the stream works again
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).w();
        self.opt.t = t0;
        captured?;
        let Some(graph) = graph? else { bail!("the captured step is empty") };
        // the seeds the capture drew, in order
        let mut probe = dropout_rng;
        let mut drawn = Vec::new();
        while probe != rng {
            if drawn.len() > 1 << 20 {
                bail!("the step's dropout stream could not be followed");
            }
            drawn.push(probe.next_u64());
        }
        let seeds = Seeds::find(&graph, &drawn)?;
        graph.upload().w()?;
        Ok(Captured { graph, buffers, table, seeds })
    }

    /// Step `step` by the captured graph, its dropout masks from `dropout_rng`.
    fn replay(
        &mut self,
        g: &mut Captured,
        batch: &Batch,
        dropout_rng: &mut Rng,
        step: usize,
        dev: &CudaDevice,
    ) -> Result<(Tensor, StepNorm)> {
        g.buffers.fill(dev, batch)?;
        g.seeds.write(&g.graph, dropout_rng)?;
        let lr = self.learning_rate(step) as f32;
        let (bc1, bc2, t) = self.opt.next_corrections();
        g.table.upload(dev, lr, bc1, bc2)?;
        g.graph.launch().w()?;
        self.sync.after_replay()?;
        self.opt.t = t;
        let Some((loss, norm)) = &g.buffers.outputs else { bail!("a captured step without outputs") };
        // copies: the next replay overwrites the buffers, and the loop reads them later
        Ok((loss.copy()?, StepNorm(norm.copy()?)))
    }
}
