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
//! same kernels on the same data in the same order: its parameters are the eager step's bit
//! for bit (GPU test `a_graphed_training_step_is_the_eager_step`).
//!
//! It applies where a replay is that computation: one device and one slice per step, no
//! dropout (its masks' seeds are drawn on the host each step), a model that does not follow
//! the training step (Performer's redraws), a batch of the captured shape (else that step runs
//! eagerly), the fused AdamW. Elsewhere every step is eager; a capture that fails says why
//! once and leaves the run eager. `ALTFORMERS_UNFUSED=train-graph` switches it off.

use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{Device, Tensor};

use super::optim::StepNorm;
use super::step::{loss_and_gradients, Trainer};
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

impl Trainer {
    /// Why this trainer's steps are not captured, if they are not.
    fn why_not_graphed(&self, model: &Model) -> Option<&'static str> {
        if !crate::kernels::enabled("train-graph") {
            Some("switched off")
        } else if self.shard != (0, 1) || self.slices != 1 || !self.sync.alone() {
            Some("a step of several workers or slices")
        } else if model.config.dropout > 0.0 {
            Some("dropout masks drawn on the host")
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
                match self.capture(model, task, buffers, dev) {
                    Ok(captured) => {
                        self.advance(Graphing::Ready(Box::new(captured)), model, task, batch, dropout_rng, step, dev)
                    }
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
                let replayed = self.replay(&mut g, batch, step, dev);
                (replayed.map(Some), Graphing::Ready(g))
            }
            // a batch of another shape (or none captured): this step eagerly
            other => (Ok(None), other),
        }
    }

    /// Captures a step on `buffers` (nothing runs: the first replay is its step).
    fn capture(&mut self, model: &Model, task: &dyn Task, buffers: Buffers, dev: &CudaDevice) -> Result<Captured> {
        let Some((loss_out, norm_out)) = &buffers.outputs else { bail!("no eager step shaped the outputs") };
        // One stream, no cross-stream events (as the decoder's graph; see decoder.rs).
        // SAFETY: every operation of candle and this crate runs on the device's one stream.
        unsafe { dev.disable_event_tracking() };
        let _cache = dev.enable_cuda_graph_htod_cache();
        let mut table = KeptTable::new(dev, model.params.vars().len())?;
        model.device().synchronize()?;
        let stream = dev.cuda_stream();
        let t0 = self.opt.t;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
        let captured = (|| -> Result<()> {
            // no dropout here (why_not_graphed): the generator is never drawn from
            let mut unused = Rng::derive(0, 0, 0);
            let (loss, grads) = loss_and_gradients(model, task, &buffers.batch, &mut unused, self.l2wrap)?;
            // the learning rate and bias corrections are the table's, written per replay
            let norm = self.opt.step_kept(&grads, 0.0, self.train.grad_clip, &mut table)?;
            launch::copy_into(dev, "training graph", loss_out, &loss)?;
            launch::copy_into(dev, "training graph", norm_out, &norm.0)?;
            Ok(())
        })();
        // end the capture whatever happened, so the stream works again
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).w();
        self.opt.t = t0;
        captured?;
        let Some(graph) = graph? else { bail!("the captured step is empty") };
        graph.upload().w()?;
        Ok(Captured { graph, buffers, table })
    }

    /// Step `step` by the captured graph.
    fn replay(&mut self, g: &mut Captured, batch: &Batch, step: usize, dev: &CudaDevice) -> Result<(Tensor, StepNorm)> {
        g.buffers.fill(dev, batch)?;
        let lr = self.learning_rate(step) as f32;
        let (bc1, bc2, t) = self.opt.next_corrections();
        g.table.upload(dev, lr, bc1, bc2)?;
        g.graph.launch().w()?;
        self.opt.t = t;
        let Some((loss, norm)) = &g.buffers.outputs else { bail!("a captured step without outputs") };
        // copies: the next replay overwrites the buffers, and the loop reads them later
        Ok((loss.copy()?, StepNorm(norm.copy()?)))
    }
}
