//! The one training step every task uses: batch, forward, loss, backward, the gradient
//! all-reduce across devices, clipping, AdamW; with the loss and gradient norm read from the
//! device only every few steps.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, D};

use super::optim::{learning_rate, AdamW, NonFiniteNorm, StepNorm};
use super::task::{Batch, Task};
use crate::config::{L2Wrap, TrainConfig};
use crate::model::Model;
use crate::ops::segments::{self, Backward};
use crate::params::ParamStore;
use crate::rng::{stream, Rng};

/// Steps between reads of the training loss and gradient norm.
pub const SYNC_EVERY: usize = 10;

/// Where the gradients of every device meet before the update. One device has nothing to
/// exchange; data-parallel training sums (and averages) them across ranks here.
pub trait GradientSync {
    fn all_reduce(&self, grads: &mut GradStore, params: &ParamStore) -> Result<()>;

    /// Whether the exchange is a no-op (one device alone).
    fn alone(&self) -> bool {
        false
    }

    /// Whether [`GradientSync::all_reduce`] can be captured in a CUDA graph with the rest of
    /// the step (it then reads nothing back to the host while capturing): one device, or
    /// NCCL's collectives.
    fn capturable(&self) -> bool {
        self.alone()
    }

    /// After a replayed step: waits for the exchanges enqueued before it (against a deadline
    /// where a peer may be lost), leaving at most this step's running.
    fn after_replay(&self) -> Result<()> {
        Ok(())
    }

    /// Waits for every exchange still running (before anything is read back from the
    /// device: a read behind a lost peer's collective would wait forever).
    fn drain(&self) -> Result<()> {
        Ok(())
    }

    /// Whether every rank says `ok` (each rank calls it at the same point): the ranks capture
    /// their steps together or not at all, since a replayed step and an eager one exchange
    /// different collectives.
    fn all_agree(&self, ok: bool) -> Result<bool> {
        Ok(ok)
    }

    /// Blocks per segment where this exchange takes the gradients segment by segment as a
    /// backward in segments finishes them ([`GradientSync::all_reduce_segments`]), for a
    /// model of `params` in `depth` blocks; `None`: after the whole backward.
    fn blocks_per_segment(&self, _params: &ParamStore, _depth: usize) -> Option<usize> {
        None
    }

    /// Runs `backward` segment by segment, exchanging each segment's finished gradients as it
    /// ends (`homes[i]`: the segment after which parameter i's is final); the averaged
    /// gradients. Here: the whole backward, then [`GradientSync::all_reduce`].
    fn all_reduce_segments(
        &self,
        backward: Backward,
        _homes: &[Option<usize>],
        params: &ParamStore,
    ) -> Result<GradStore> {
        let mut grads = backward.finish()?;
        self.all_reduce(&mut grads, params)?;
        Ok(grads)
    }
}

impl<T: GradientSync + ?Sized> GradientSync for std::sync::Arc<T> {
    fn all_reduce(&self, grads: &mut GradStore, params: &ParamStore) -> Result<()> {
        (**self).all_reduce(grads, params)
    }

    fn alone(&self) -> bool {
        (**self).alone()
    }

    fn capturable(&self) -> bool {
        (**self).capturable()
    }

    fn after_replay(&self) -> Result<()> {
        (**self).after_replay()
    }

    fn drain(&self) -> Result<()> {
        (**self).drain()
    }

    fn all_agree(&self, ok: bool) -> Result<bool> {
        (**self).all_agree(ok)
    }

    fn blocks_per_segment(&self, params: &ParamStore, depth: usize) -> Option<usize> {
        (**self).blocks_per_segment(params, depth)
    }

    fn all_reduce_segments(
        &self,
        backward: Backward,
        homes: &[Option<usize>],
        params: &ParamStore,
    ) -> Result<GradStore> {
        (**self).all_reduce_segments(backward, homes, params)
    }
}

/// A step whose loss or gradient norm is not finite: the run diverged (a training loop says
/// so and where its last good checkpoint is). Other errors of a step (a batch that cannot be
/// drawn, a device out of memory) are not this.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// Training on one device.
pub struct OneDevice;

impl GradientSync for OneDevice {
    fn all_reduce(&self, _grads: &mut GradStore, _params: &ParamStore) -> Result<()> {
        Ok(())
    }

    fn alone(&self) -> bool {
        true
    }
}

/// The losses and gradient norms of the last few steps, still where they were computed. A
/// value read on the host waits for the GPU to finish its step, and a read every step leaves
/// the GPU idle while the host prepares the next one; so a training loop reads them together
/// every [`SYNC_EVERY`] steps, and always before it evaluates or saves. A non-finite value is
/// found then, naming its step; the fused GPU step has changed no parameter on a non-finite
/// norm, and the CPU step fails at once.
#[derive(Default)]
pub struct Deferred {
    steps: Vec<usize>,
    losses: Vec<Tensor>,
    norms: Vec<Tensor>,
    /// The loss of the last step read.
    pub last_loss: f64,
}

impl Deferred {
    /// Holds `step`'s loss (a scalar) and gradient norm, detached: a tensor keeps the graph
    /// that computed it, so holding the loss itself would keep every activation of the step
    /// alive until the next read (ten steps' worth of GPU memory).
    pub fn push(&mut self, step: usize, loss: &Tensor, norm: StepNorm) {
        self.steps.push(step);
        self.losses.push(loss.detach());
        self.norms.push(norm.0.detach());
    }

    pub fn due(&self) -> bool {
        self.steps.len() >= SYNC_EVERY
    }

    /// Reads what is held (two reads); the first step with a non-finite loss or norm is an error.
    pub fn settle(&mut self) -> Result<()> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let read = |v: &[Tensor]| -> Result<Vec<f64>> { Ok(Tensor::stack(v, 0)?.to_dtype(DType::F64)?.to_vec1()?) };
        let (losses, norms) = (read(&self.losses)?, read(&self.norms)?);
        for ((step, loss), norm) in self.steps.iter().zip(&losses).zip(&norms) {
            if !loss.is_finite() {
                return Err(Diverged(format!("training loss is {loss} in step {step}")).into());
            }
            if !norm.is_finite() {
                return Err(Diverged(format!("gradient norm is {norm} in step {step}")).into());
            }
        }
        self.last_loss = *losses.last().expect("not empty");
        self.steps.clear();
        self.losses.clear();
        self.norms.clear();
        Ok(())
    }
}

/// `batch`'s mean loss and the gradients of what the step minimises over it as one of
/// `pieces` equal pieces of the step's batch ([`objective`]).
fn loss_and_gradients(
    model: &Model,
    task: &dyn Task,
    batch: &Batch,
    dropout: &mut Rng,
    l2wrap: bool,
    pieces: usize,
) -> Result<(Tensor, GradStore)> {
    let scored = task.scored(model, batch, Some(dropout))?;
    let grads = objective(&scored, l2wrap, pieces)?.backward()?;
    Ok((scored.loss, grads))
}

/// What a step minimises over one of `pieces` equal pieces of its batch: the piece's loss,
/// plus L2Wrap's term where `l2wrap`, over `pieces` (the pieces' gradients then add up to the
/// whole batch's).
fn objective(scored: &super::task::Scored, l2wrap: bool, pieces: usize) -> Result<Tensor> {
    let objective = if l2wrap {
        (&scored.loss + l2wrap_penalty(&scored.logits)?.to_dtype(scored.loss.dtype())?)?
    } else {
        scored.loss.clone()
    };
    Ok(if pieces == 1 { objective } else { (objective / pieces as f64)? })
}

/// [`loss_and_gradients`] with the backward in segments of `every` blocks
/// ([`crate::ops::segments`]), each segment's gradients added to `earlier` (the sums of the
/// step's pieces before this one) and `sync` exchanging the finished ones as it ends, so the
/// exchange overlaps the segments below: the loss and the averaged gradients.
#[allow(clippy::too_many_arguments)]
fn loss_and_overlapped_gradients(
    model: &Model,
    task: &dyn Task,
    batch: &Batch,
    dropout: &mut Rng,
    l2wrap: bool,
    pieces: usize,
    earlier: GradStore,
    every: usize,
    sync: &dyn GradientSync,
) -> Result<(Tensor, GradStore)> {
    let (scored, cuts) = segments::record(every, || task.scored(model, batch, Some(dropout)));
    let scored = scored?;
    let top = objective(&scored, l2wrap, pieces)?;
    let vars = model.params.vars();
    // (a parameter only earlier pieces reached would have no home, and no exchange: the
    // registry's graphs do not depend on the data, so every piece reaches the same ones)
    let homes = segments::homes(&top, &cuts, vars.iter().map(|(_, p)| p.var.as_tensor()));
    let grads = sync.all_reduce_segments(Backward::new(top, cuts).adding_to(earlier), &homes, &model.params)?;
    Ok((scored.loss, grads))
}

/// Adds one piece's loss and gradients to `sum`, detached: a backward's loss and gradients
/// hold its graph, and with it the piece's activations, which must go before the next piece.
/// Only the parameters' gradients are kept (a backward's store also holds gradients of
/// constants, a decay mask's say: tensors of the piece's graph).
fn add_piece(
    sum: &mut Option<(Tensor, GradStore)>,
    (loss, mut grads): (Tensor, GradStore),
    params: &ParamStore,
) -> Result<()> {
    let (total, acc) = match sum {
        Some(sum) => sum,
        None => sum.insert((loss.zeros_like()?, GradStore::default())),
    };
    *total = (&*total + loss.detach())?;
    for p in params.params.values() {
        let var = p.var.as_tensor();
        if let Some(g) = grads.remove(var) {
            let g = match acc.remove(var) {
                Some(a) => (a + g.detach())?,
                None => g.detach(),
            };
            acc.insert(var, g);
        }
    }
    Ok(())
}

/// L2Wrap's coefficient in the official RWKV trainers (`1e-4 / (B T)` per position).
pub const L2WRAP: f64 = 1e-4;

/// L2Wrap (BlinkDL/RWKV-LM, `RWKV-v4neo/src/model.py` and its successors' trainers), as a
/// term of the objective: `L2WRAP / (2 N) * sum_n (max_c y_{n,c})^2` over the `N` positions of
/// `logits: [.., C]`. The official form is a custom autograd op that returns the loss
/// unchanged and, in its backward, adds `L2WRAP / N * max_c y_n` to the gradient of each
/// position's largest logit: exactly this term's gradient (the max's gradient is the one-hot
/// of its arg-max, candle's too). It keeps logits from drifting large. The training step
/// adds it to what it differentiates and reports the cross-entropy alone, so the logged loss
/// is unchanged, as in the official code.
pub fn l2wrap_penalty(logits: &Tensor) -> candle_core::Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let positions = (logits.elem_count() / classes.max(1)).max(1);
    logits.max_keepdim(D::Minus1)?.sqr()?.sum_all()? * (L2WRAP / (2.0 * positions as f64))
}

/// AdamW, the schedule and clipping of a [`TrainConfig`], and the steps not yet read.
pub struct Trainer {
    pub opt: AdamW,
    pub train: TrainConfig,
    /// `train.l2wrap`, or where it is absent the architecture's default.
    pub l2wrap: bool,
    pub sync: Box<dyn GradientSync>,
    /// This worker's slice of every batch, `(rank, world)`: `(0, 1)` alone.
    pub shard: (usize, usize),
    /// The slice is of every row's positions (sequence parallelism, the model split with
    /// [`Model::split_sequence`]), not of the rows.
    pub sequence_parallel: bool,
    /// Slices of each batch this process scores side by side, one per thread of its pool,
    /// their gradients averaged before the update (CPU training on several threads; 1
    /// otherwise). Each slice's forward and backward runs on one thread without hand-offs, as
    /// a single-threaded data-parallel worker's does, and the dropout masks are the whole
    /// batch's, so the step is the unsliced one up to the order of floating-point sums.
    pub slices: usize,
    pub pending: Deferred,
    /// The step as a CUDA graph, where it applies ([`super::graph`]).
    #[cfg(feature = "cuda")]
    pub(super) graph: super::graph::Graphing,
}

/// The captured step goes first: NCCL frees no communicator while a CUDA graph that captured
/// its collectives lives (`ncclCommDestroy` waits for the graph's destruction, so with the
/// graph dropped after the exchange, every graphed worker of several would hang on exit).
impl Drop for Trainer {
    fn drop(&mut self) {
        self.eager_only();
    }
}

impl Trainer {
    /// AdamW over `model`'s parameters with `train`'s settings, on one device.
    pub fn new(model: &Model, train: &TrainConfig) -> Result<Self> {
        let mut opt = AdamW::new(&model.params, train.beta1, train.beta2, train.eps, train.weight_decay)?;
        if train.decay_embeddings {
            opt = opt.decay_embeddings();
        }
        let l2wrap = match train.l2wrap {
            L2Wrap::On => true,
            L2Wrap::Off => false,
            L2Wrap::Auto => crate::registry::find(&model.config.architecture)?.l2wrap,
        };
        Ok(Self {
            opt,
            train: train.clone(),
            l2wrap,
            sync: Box::new(OneDevice),
            shard: (0, 1),
            sequence_parallel: false,
            slices: 1,
            pending: Deferred::default(),
            #[cfg(feature = "cuda")]
            graph: super::graph::Graphing::default(),
        })
    }

    /// Every step launched op by op, never from a CUDA graph (tests compare the two).
    pub fn eager_only(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.graph = super::graph::Graphing::Off;
        }
    }

    /// Whether steps are being replayed from a captured CUDA graph.
    pub fn graphed(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let super::graph::Graphing::Ready(_) = self.graph {
            return true;
        }
        false
    }

    /// The learning rate of step `step` (counted from 0).
    pub fn learning_rate(&self, step: usize) -> f64 {
        let t = &self.train;
        learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.decay_steps)
    }

    /// Step `step` (counted from 0) of `task`: its batch and dropout masks are functions of
    /// the seed and the step only, so a resumed run repeats an uninterrupted one exactly. The
    /// loss and gradient norm are held until [`Trainer::settle`]; an error names the step.
    pub fn step(&mut self, model: &Model, task: &dyn Task, step: usize) -> Result<()> {
        let t = &self.train;
        let mut batch_rng = Rng::derive(t.seed, stream::TRAIN_BATCH, step as u64);
        let dropout_rng = Rng::derive(t.seed, stream::DROPOUT, step as u64);
        let (rank, world) = (self.shard.0 as u64, self.shard.1 as u64);
        let mut dropout_rng =
            if self.sequence_parallel { dropout_rng.for_positions(rank, world) } else { dropout_rng.for_shard(rank) };
        let batch =
            task.batch(t.batch_size, &mut batch_rng, model.device())?.share(self.shard, self.sequence_parallel)?;
        model.set_training_step(step);
        #[cfg(feature = "cuda")]
        if let Some((loss, norm)) = self.graphed_step(model, task, &batch, &mut dropout_rng, step)? {
            self.pending.push(step + 1, &loss, norm);
            return Ok(());
        }
        let (loss, norm) = self.eager_step(model, task, &batch, &mut dropout_rng, step)?;
        self.pending.push(step + 1, &loss, norm);
        Ok(())
    }

    /// Step `step` on `batch`, each operation launched as it comes: the loss (on the device)
    /// and the gradient norm.
    pub(super) fn eager_step(
        &mut self,
        model: &Model,
        task: &dyn Task,
        batch: &Batch,
        dropout_rng: &mut Rng,
        step: usize,
    ) -> Result<(Tensor, StepNorm)> {
        let (loss, grads) = self.loss_and_averaged_gradients(model, task, batch, dropout_rng)?;
        let lr = self.learning_rate(step);
        // The optimizer refuses a non-finite gradient norm (the fused GPU step defers that to
        // the norm read, where `Deferred::settle` finds it).
        let norm =
            self.opt.step(&grads, lr, self.train.grad_clip).map_err(|e| match e.downcast::<NonFiniteNorm>() {
                Ok(norm) => Diverged(format!("{norm} in step {}", step + 1)).into(),
                Err(other) => other,
            })?;
        Ok((loss, norm))
    }

    /// `batch`'s loss and gradients (its masks drawn from `dropout_rng`), averaged across the
    /// workers by [`Trainer::sync`]: the step up to the update, eager or being captured
    /// ([`super::graph`]).
    pub(super) fn loss_and_averaged_gradients(
        &self,
        model: &Model,
        task: &dyn Task,
        batch: &Batch,
        dropout_rng: &mut Rng,
    ) -> Result<(Tensor, GradStore)> {
        let l2wrap = self.l2wrap;
        // segments: not with a split sequence, whose backward has collectives of its own
        let segments = match self.sequence_parallel {
            false => self.sync.blocks_per_segment(&model.params, model.config.depth),
            true => None,
        };
        let micro = self.train.accumulate;
        let slices = if self.shard == (0, 1) && batch.rows.is_none() { self.slices } else { 1 };
        let pieces = micro * slices;
        // one piece draws from `dropout_rng` itself: a capture counts the draws made from it
        // (`graph.rs`), where the pieces below draw from copies (and are never captured)
        if pieces == 1 {
            let Some(every) = segments else {
                let (loss, mut grads) = loss_and_gradients(model, task, batch, dropout_rng, l2wrap, 1)?;
                self.sync.all_reduce(&mut grads, &model.params)?;
                return Ok((loss, grads));
            };
            let none = GradStore::default();
            return loss_and_overlapped_gradients(model, task, batch, dropout_rng, l2wrap, 1, none, every, &*self.sync);
        }
        // The worker's rows in `micro` micro-batches one after another (the activations of
        // one held at a time), each in `slices` slices side by side on the CPU's threads; each
        // piece draws its part of the batch's dropout masks, and its gradients are summed
        // into the others'. The exchange waits for the last micro-batch, overlapping its
        // backward where the exchange takes segments (DDP's `no_sync` before it).
        let mut sum: Option<(Tensor, GradStore)> = None;
        for j in 0..micro {
            let part = batch.micro_batch(j, micro)?;
            let rng = dropout_rng.clone().for_slice(j as u64, micro as u64);
            if slices == 1 {
                if let Some(every) = segments.filter(|_| j + 1 == micro) {
                    let (before, earlier) = sum.take().expect("micro-batches before the last");
                    let (loss, grads) = loss_and_overlapped_gradients(
                        model,
                        task,
                        &part,
                        &mut rng.clone(),
                        l2wrap,
                        pieces,
                        earlier,
                        every,
                        &*self.sync,
                    )?;
                    return Ok((((before + loss.detach())? / pieces as f64)?, grads));
                }
                let piece = loss_and_gradients(model, task, &part, &mut rng.clone(), l2wrap, pieces)?;
                add_piece(&mut sum, piece, &model.params)?;
                continue;
            }
            use rayon::prelude::*;
            let scored = (0..slices)
                .into_par_iter()
                .map(|i| {
                    let mut rng = rng.clone().for_slice(i as u64, slices as u64);
                    loss_and_gradients(model, task, &part.micro_batch(i, slices)?, &mut rng, l2wrap, pieces)
                })
                .collect::<Result<Vec<_>>>()?;
            for piece in scored {
                add_piece(&mut sum, piece, &model.params)?;
            }
        }
        let (loss, mut grads) = sum.expect("at least one piece");
        self.sync.all_reduce(&mut grads, &model.params)?;
        Ok(((loss / pieces as f64)?, grads))
    }

    /// Reads the held losses and norms if [`SYNC_EVERY`] steps are held or `now`.
    pub fn settle_if_due(&mut self, now: bool) -> Result<()> {
        if now || self.pending.due() {
            self.sync.drain()?;
            self.pending.settle()?;
        }
        Ok(())
    }

    /// The last training loss read.
    pub fn last_loss(&self) -> f64 {
        self.pending.last_loss
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// The weights (flattened, in the store's order) of a fresh f64 CPU model of `model`
    /// after three steps of `task`, its trainer set up by `set_up` (slices, an exchange).
    pub(crate) fn weights_after_three_steps(
        model: &crate::config::ModelConfig,
        train: &TrainConfig,
        task: &dyn Task,
        set_up: impl FnOnce(&mut Trainer),
    ) -> Result<Vec<f64>> {
        let model = Model::new(model, 1, &Device::Cpu, DType::F64)?;
        let mut trainer = Trainer::new(&model, train)?;
        set_up(&mut trainer);
        for step in 0..3 {
            trainer.step(&model, task, step)?;
        }
        let all = model
            .params
            .vars()
            .iter()
            .map(|(_, p)| p.var.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&all, 0)?.to_vec1::<f64>()?)
    }

    /// The largest difference between two weight vectors.
    pub(crate) fn worst(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// L2Wrap's gradient is the official backward: `1e-4 / N * max_c y_n` at each of the N
    /// positions' arg-max, nothing elsewhere (issue 19).
    #[test]
    fn l2wrap_gradient_is_the_official_formula() -> Result<()> {
        let (b, t, c) = (2, 3, 5);
        let y = candle_core::Var::from_tensor(&crate::testing::randn(&[b, t, c], 3, DType::F32)?)?;
        let grads = l2wrap_penalty(y.as_tensor())?.backward()?;
        let g: Vec<f32> = grads.get(y.as_tensor()).unwrap().flatten_all()?.to_vec1()?;
        let y: Vec<f32> = y.as_tensor().flatten_all()?.to_vec1()?;
        for (yn, gn) in y.chunks(c).zip(g.chunks(c)) {
            let arg = (0..c).max_by(|&i, &j| yn[i].total_cmp(&yn[j])).unwrap();
            for (k, gk) in gn.iter().enumerate() {
                let want = if k == arg { 1e-4 / (b * t) as f32 * yn[arg] } else { 0.0 };
                assert!((gk - want).abs() <= 1e-6 * want.abs() + 1e-12, "{k}: {gk} vs {want}");
            }
        }
        Ok(())
    }

    /// The batch in pieces takes the one-piece step (weights after three steps, dropout 0.1,
    /// f64), for models of every kind of mixer: two slices side by side (CPU threads), 2 or 4
    /// micro-batches one after another (gradient accumulation, `train.accumulate`), and 2
    /// micro-batches of two slices each.
    #[test]
    fn steps_in_pieces_equal_whole_batch_steps() -> Result<()> {
        use crate::train::task::ByteLm;
        let bytes: Vec<u8> = (0..600u32).map(|i| (i * 37 % 251) as u8).collect();
        for arch in ["transformer", "rwkv4", "hyena", "retnet", "megabyte"] {
            let sets = ["model.width=16", "model.depth=2", "model.heads=2", "model.context=16", "model.dropout=0.1"];
            let cfg = crate::registry::config(arch, &crate::config::Overrides::sets(&sets))?;
            let task = ByteLm { split: &bytes, context: cfg.model.context };
            let weights = |accumulate, slices| {
                let train = TrainConfig { batch_size: 8, accumulate, ..cfg.train.clone() };
                weights_after_three_steps(&cfg.model, &train, &task, |t| t.slices = slices)
            };
            let whole = weights(1, 1)?;
            for (accumulate, slices) in [(1, 2), (2, 1), (4, 1), (2, 2)] {
                let pieces = weights(accumulate, slices)?;
                let worst = worst(&whole, &pieces);
                assert!(worst < 1e-10, "{arch}: {accumulate} micro-batches x {slices} slices differ by {worst}");
                // the pieced path ran: its sums, in another order, move some last bits
                assert!(whole != pieces, "{arch}: {accumulate} x {slices} gave the one-piece step's bits exactly");
            }
        }
        Ok(())
    }

    /// A step whose backward runs in segments (an exchange that takes them: here one that
    /// takes each parameter's gradient as it stands right after its home segment, as NCCL's
    /// reduction of that segment's buckets does) updates the weights as the one-call backward
    /// does, with dropout (and L2Wrap, RWKV-4's default), f64; also with two micro-batches,
    /// the second's segments adding to the first's gradients.
    #[test]
    fn segmented_steps_equal_whole_steps() -> Result<()> {
        use crate::train::task::ByteLm;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        /// Counts the segments of the backward passes it is handed.
        struct Segmented(Arc<AtomicUsize>);
        impl GradientSync for Segmented {
            fn all_reduce(&self, _: &mut GradStore, _: &ParamStore) -> Result<()> {
                Ok(())
            }
            fn blocks_per_segment(&self, _: &ParamStore, _: usize) -> Option<usize> {
                Some(1)
            }
            fn all_reduce_segments(
                &self,
                mut backward: Backward,
                homes: &[Option<usize>],
                params: &ParamStore,
            ) -> Result<GradStore> {
                self.0.fetch_add(backward.segments(), Ordering::SeqCst);
                let vars = params.vars();
                let mut taken: Vec<Option<Tensor>> = vec![None; vars.len()];
                while let Some((segment, sums)) = backward.next_segment()? {
                    for (i, (_, p)) in vars.iter().enumerate() {
                        if homes[i] == Some(segment) {
                            taken[i] = sums.get(p.var.as_tensor()).cloned();
                        }
                    }
                }
                let mut grads = backward.finish()?;
                for ((_, p), g) in vars.iter().zip(taken) {
                    if let Some(g) = g {
                        grads.insert(p.var.as_tensor(), g);
                    }
                }
                Ok(grads)
            }
        }
        let bytes: Vec<u8> = (0..600u32).map(|i| (i * 37 % 251) as u8).collect();
        for arch in ["transformer", "rwkv4", "hyena", "megabyte"] {
            let sets = ["model.width=16", "model.depth=3", "model.heads=2", "model.context=16", "model.dropout=0.1"];
            let cfg = crate::registry::config(arch, &crate::config::Overrides::sets(&sets))?;
            let task = ByteLm { split: &bytes, context: cfg.model.context };
            let segments = Arc::new(AtomicUsize::new(0));
            let weights = |segmented: bool, accumulate| {
                let train = TrainConfig { batch_size: 2, accumulate, ..cfg.train.clone() };
                weights_after_three_steps(&cfg.model, &train, &task, |t| {
                    if segmented {
                        t.sync = Box::new(Segmented(segments.clone()));
                    }
                })
            };
            let whole = weights(false, 1)?;
            for accumulate in [1, 2] {
                let worst = worst(&whole, &weights(true, accumulate)?);
                assert!(worst < 1e-12, "{arch}: segmented steps ({accumulate} micro-batches) differ by {worst}");
            }
            // two runs of three steps, each cut after both of the first two of three blocks (at least)
            assert!(segments.load(Ordering::SeqCst) >= 18, "{arch}: {segments:?} segments in six steps");
        }
        Ok(())
    }

    /// `train.l2wrap` defaults to the architecture's (on for RWKV-4, as its official
    /// trainer; off for the Transformer); on, it changes the update and not the reported loss.
    #[test]
    fn l2wrap_changes_the_update_not_the_reported_loss() -> Result<()> {
        use crate::train::task::ByteLm;
        let bytes: Vec<u8> = (0..400u32).map(|i| (i * 37 % 251) as u8).collect();
        let task = ByteLm { split: &bytes, context: 8 };
        let train = TrainConfig { batch_size: 2, warmup_steps: 0, ..TrainConfig::default() };
        let fresh = |name: &str| -> Result<Model> {
            Model::new(&crate::testing::tiny_config(name, &[])?, 1, &Device::Cpu, DType::F32)
        };
        assert!(Trainer::new(&fresh("rwkv4")?, &train)?.l2wrap);
        assert!(!Trainer::new(&fresh("transformer")?, &train)?.l2wrap);
        let mut after = Vec::new();
        for on in [true, false] {
            let model = fresh("rwkv4")?;
            // as the command line sets it
            let set = if on { "train.l2wrap=on" } else { "train.l2wrap=off" };
            let t = crate::registry::config("rwkv4", &crate::config::Overrides::sets(&[set]))?.train;
            let mut trainer = Trainer::new(&model, &TrainConfig { l2wrap: t.l2wrap, ..train.clone() })?;
            assert_eq!(trainer.l2wrap, on);
            trainer.step(&model, &task, 0)?;
            trainer.settle_if_due(true)?;
            after.push((trainer.last_loss(), model.params.tensors()["head.weight"].flatten_all()?.to_vec1::<f32>()?));
        }
        assert_eq!(after[0].0, after[1].0, "the reported loss is the cross-entropy alone");
        assert_ne!(after[0].1, after[1].1, "L2Wrap's gradient reaches the update");
        Ok(())
    }

    #[test]
    fn deferred_reads_report_the_first_bad_step_and_keep_the_last_loss() -> Result<()> {
        let dev = Device::Cpu;
        let norm = |v: f64| -> Result<StepNorm> { Ok(StepNorm(Tensor::new(v, &dev)?)) };
        let mut d = Deferred::default();
        for (step, loss) in [(1, 2.0f32), (2, 1.5)] {
            d.push(step, &Tensor::new(loss, &dev)?, norm(1.0)?);
        }
        assert!(!d.due());
        d.settle()?;
        assert_eq!(d.last_loss, 1.5);
        for (step, loss) in [(3, 1.0f32), (4, f32::NAN), (5, f32::NAN)] {
            d.push(step, &Tensor::new(loss, &dev)?, norm(1.0)?);
        }
        let err = d.settle().unwrap_err().to_string();
        assert!(err.contains("training loss is NaN in step 4"), "{err}");
        let mut d = Deferred::default();
        d.push(7, &Tensor::new(0.5f32, &dev)?, norm(f64::INFINITY)?);
        let err = d.settle().unwrap_err().to_string();
        assert!(err.contains("gradient norm is inf in step 7"), "{err}");
        for step in 0..SYNC_EVERY {
            d.push(step, &Tensor::new(0.5f32, &dev)?, norm(1.0)?);
        }
        assert!(d.due());
        Ok(())
    }

    #[test]
    fn deferred_holds_values_not_the_graph_that_computed_them() -> Result<()> {
        let dev = Device::Cpu;
        let w = candle_core::Var::new(&[1.0f32, 2.0], &dev)?;
        let loss = w.as_tensor().sqr()?.sum_all()?;
        let norm = loss.sqrt()?;
        assert!(loss.track_op() && norm.track_op());
        let mut d = Deferred::default();
        d.push(1, &loss, StepNorm(norm));
        assert!(!d.losses[0].track_op() && !d.norms[0].track_op());
        d.settle()?;
        assert_eq!(d.last_loss, 5.0);
        Ok(())
    }
}
