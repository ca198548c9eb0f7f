//! Gradients averaged by NCCL: data-parallel training on GPUs (issue 23), the engine PyTorch's
//! DistributedDataParallel uses. The workers meet over [`Group`]'s TCP rendezvous, where rank
//! 0 hands out NCCL's unique id (torchrun's store does the same); from then on the gradients
//! never leave the GPUs: each step they are packed into buckets of about
//! [`BUCKET_BYTES`] (DDP's 25 MB), each bucket averaged by one in-place NCCL all-reduce on
//! the worker's stream, and the averaged buckets are cut back into the gradients (views, no
//! copy). Everything around the exchange (the global batch, the shards, the evaluation, the
//! launcher, resuming) is [`super::distributed`]'s, shared with the CPU workers.
//!
//! The exchange overlaps the backward pass, as DDP's autograd hooks make it: candle's
//! backward hands over every gradient at once, so the step runs it in segments of a few
//! blocks ([`crate::ops::segments`]) and each segment's finished gradients are reduced on a
//! stream of their own while the segments below run ([`GradientSync::all_reduce_segments`];
//! `ALTFORMERS_UNFUSED=overlap`: after the whole backward instead, as models without a stack
//! of blocks and a split sequence's steps always are).
//!
//! The exchange can be captured in the training step's CUDA graph ([`super::graph`]): which
//! parameters any rank has a gradient for is exchanged at every eager step and, while
//! capturing, taken from the last eager step (the same pattern on this rank, or the capture
//! fails and every rank stays eager: [`GradientSync::all_agree`]); nothing is read back or
//! waited for while capturing; after each replay the trainer waits for the step before it
//! (the GPU keeps one step queued ahead: [`GradientSync::after_replay`]) and for every step
//! before it reads anything back ([`GradientSync::drain`]).
//!
//! The same communicator is a split sequence's collective (LongNet's sequence parallelism,
//! [`crate::mixers::longnet::sequence_parallel::AllGather`]): `ncclAllGather` forward,
//! `ncclReduceScatter` (sum) backward, each waited for against the deadline as the gradients
//! are (after the replay, in a captured step), so a peer lost in the middle of a forward pass
//! fails the same way.
//!
//! Faults: NCCL waits forever for a rank that died or hangs. A worker waits for its
//! reduction against a deadline ([`super::distributed::timeout`]); past it, or on an
//! asynchronous NCCL error, it fails with [`PeerLost`], naming the ranks whose rendezvous
//! connection closed where it can see them (an error NCCL pins on this worker, a CUDA fault
//! or invalid usage, fails as its own instead), and aborts the communicator
//! (`ncclCommAbort`, as PyTorch's watchdog does) as it stops, once its CUDA graph is gone
//! ([`NcclGroup`]'s `Drop`). The launcher then stops the others and names the cause.
//! The communicator is non-blocking (`blocking = 0`), so no NCCL call can hold a worker past
//! the deadline either: joining it (which lasts until every rank has joined,
//! [`join_communicator`]) and
//! enqueueing each collective (which can wait on a peer, connecting or behind a full queue)
//! return at once and are polled against the same deadline ([`settle`]).
//!
//! NVLink multicast (NVLS) is switched off in every worker: on the machines this project
//! runs on it can put the host's GPUs out of service.

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{DType, Device, Tensor};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::distributed::{Group, PeerLost};
use super::step::GradientSync;
use crate::mixers::longnet::sequence_parallel::AllGather;
use crate::ops::segments::Backward;
use crate::params::{Param, ParamStore};

/// The size a bucket of gradients grows to before it is reduced (the last may be smaller).
pub const BUCKET_BYTES: usize = 25 << 20;

/// The environment NCCL reads to keep NVLink multicast off; set in every worker.
pub const NVLS_OFF: [(&str, &str); 3] =
    [("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")];

/// One worker's NCCL communicator, on the stream candle runs its GPU work on.
pub struct NcclGroup {
    tcp: Arc<Group>,
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    bucket_bytes: usize,
    timeout: Duration,
    /// Set once a collective failed: the communicator refuses further work and is aborted,
    /// not destroyed, when dropped ([`Drop`]).
    failed: AtomicBool,
    /// Which parameters this rank had a gradient for, and which any rank had, as last read
    /// back: the same local pattern reuses the second without reading (a captured step must).
    presence: std::sync::Mutex<Option<(Vec<bool>, Vec<bool>)>>,
    /// The stream the overlapped exchange runs on, beside the backward's
    /// ([`GradientSync::all_reduce_segments`]); made at its first use.
    side: std::sync::Mutex<Option<Arc<CudaStream>>>,
    /// The replayed steps not yet waited for (at most the last one: [`GradientSync::after_replay`]).
    replays: std::sync::Mutex<std::collections::VecDeque<CudaEvent>>,
    /// Set while collectives may be running that no wait has seen finish: a communicator
    /// left so is aborted, not destroyed (destroying waits for them, forever if a peer is
    /// gone).
    in_flight: AtomicBool,
    /// The segments' homes all ranks agreed on at the last eager step (a captured step must
    /// cut the same buckets).
    homes: std::sync::Mutex<Option<Vec<Option<usize>>>>,
}

// SAFETY: the communicator is a handle NCCL allows any thread to use; a worker's training
// loop is one thread, so it is never used from two at once.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// Starts NCCL among the workers `tcp` connects, each on its own GPU (`device`).
    pub fn connect(tcp: Arc<Group>, device: &Device, timeout: Duration) -> Result<NcclGroup> {
        let Device::Cuda(cuda) = device else {
            bail!("NCCL exchanges gradients between GPUs: this worker's device is the CPU");
        };
        for (name, value) in NVLS_OFF {
            if std::env::var(name).ok().as_deref() != Some(value) {
                bail!("{name} must be {value} in every worker (NVLink multicast stays off); the launcher sets it");
            }
        }
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "NCCL's library (libnccl.so) could not be loaded: put the folder holding it on LD_LIBRARY_PATH (PyTorch's wheels carry it in nvidia/nccl/lib)"
            );
        }
        let stream = cuda.cuda_stream();
        // The null, legacy (0x1) and per-thread (0x2) handles name a stream by the calling
        // thread, and a non-blocking communicator launches its collectives from a thread of
        // its own: there they would name that thread's stream, unordered with the step
        // (NVIDIA/nccl#1976; one rank never launches from that thread, so one GPU hides it).
        if (stream.cu_stream() as usize) <= 2 {
            bail!(
                "NCCL needs the worker's device on a stream of its own (crate::device::with_own_stream), not the thread's default stream"
            );
        }
        stream.context().bind_to_thread()?;
        let mut id = [0u8; 128];
        if tcp.rank == 0 {
            let uid = result::get_uniqueid().map_err(|e| nccl_error("creating the unique id", e.0, None))?;
            id.iter_mut().zip(uid.internal).for_each(|(b, c)| *b = c as u8);
        }
        tcp.broadcast_bytes(&mut id)?;
        let uid = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        let comm = join_communicator(uid, tcp.world, tcp.rank, &stream, timeout).map_err(|e| {
            match tcp.closed_peers().first() {
                Some(&gone) => e.context(PeerLost(Some(gone))),
                None => e,
            }
        })?;
        Ok(NcclGroup {
            tcp,
            comm,
            side: Default::default(),
            in_flight: Default::default(),
            replays: Default::default(),
            stream,
            bucket_bytes: BUCKET_BYTES,
            timeout,
            failed: Default::default(),
            presence: Default::default(),
            homes: Default::default(),
        })
    }

    /// Another deadline for the exchanges from now on (tests: one that has passed at once).
    pub fn with_timeout(mut self, timeout: Duration) -> NcclGroup {
        self.timeout = timeout;
        self
    }

    /// Smaller buckets (tests: many buckets on a tiny model).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> NcclGroup {
        self.bucket_bytes = bytes.max(1);
        self
    }

    /// Refuses work on a communicator after an earlier failure.
    fn usable(&self) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            bail!("NCCL: the communicator failed earlier (it is aborted as the worker stops)");
        }
        Ok(())
    }

    /// Enqueues the in-place average of `t` (contiguous, on this worker's GPU) over the ranks
    /// on `stream` (the device's, or the overlapped exchange's).
    fn enqueue_mean(&self, t: &Tensor, stream: &Arc<CudaStream>) -> Result<()> {
        if !matches!(t.device(), Device::Cuda(_)) {
            bail!("NCCL all-reduce of a tensor on the CPU");
        }
        let (kind, n) = (nccl_type(t.dtype(), "all-reduce")?, t.elem_count());
        self.enqueue(stream, "the all-reduce", &[Some(t)], |a, stream| {
            let ptr = a[0] as *mut std::ffi::c_void;
            // SAFETY: `t` holds n elements on this worker's GPU, read and written in place.
            unsafe { result::all_reduce(ptr, ptr, n, kind, sys::ncclRedOp_t::ncclAvg, self.comm, stream) }
        })
    }

    /// Enqueues one collective, `what`, on `stream` over the buffers of `tensors` (`call` gets
    /// their device addresses, in order, and the stream's handle): refused on a communicator an
    /// earlier failure gave up, and settled as [`Self::enqueued`] says.
    fn enqueue(
        &self,
        stream: &Arc<CudaStream>,
        what: &str,
        tensors: &[Option<&Tensor>],
        call: impl FnOnce(&[u64], sys::cudaStream_t) -> std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        self.usable()?;
        let mut enqueued = None;
        crate::kernels::launch::with_addresses_on(stream, what, tensors, |a| {
            enqueued = Some(self.enqueued(call(a, stream.cu_stream() as sys::cudaStream_t), what));
            Ok(())
        })?;
        enqueued.expect("the launch ran")
    }

    /// The end of a call that enqueued `what` on the stream: NCCL's refusal as an error, or,
    /// the communicator being non-blocking, the enqueueing finished within the timeout (it
    /// can wait on a peer, setting up a connection or behind a full queue: past the deadline
    /// this fails as a lost peer).
    fn enqueued(&self, r: Result<result::NcclStatus, result::NcclError>, what: &str) -> Result<()> {
        self.in_flight.store(true, Ordering::SeqCst);
        if let Err(e) = r {
            self.failed.store(true, Ordering::SeqCst);
            return Err(nccl_error(&format!("enqueueing {what}"), e.0, Some(self.comm)));
        }
        match settle(self.comm, Instant::now() + self.timeout) {
            Settled::Done => Ok(()),
            Settled::Failed(state) => {
                Err(self.fail(format!("NCCL failed enqueueing {what} ({})", error_string(state)), Some(state)))
            }
            Settled::Late => {
                Err(self
                    .fail(format!("enqueueing {what} did not finish within {:.0} s", self.timeout.as_secs_f64()), None))
            }
        }
    }

    /// Gives the communicator up after `why` (no further work; aborted when dropped): NCCL's
    /// error `state`, or none where the work did not finish in time. This worker's own fault
    /// where NCCL says so unambiguously (a CUDA error, an invalid argument or usage), so the
    /// launcher names it as the cause; otherwise a lost peer (named where its rendezvous
    /// connection closed): a timeout, or an error that a dead peer can also cause (remote,
    /// system, internal: NCCL's proxy and bootstrap report a lost connection so).
    fn fail(&self, why: String, state: Option<sys::ncclResult_t>) -> anyhow::Error {
        use sys::ncclResult_t::{ncclInvalidArgument, ncclInvalidUsage, ncclUnhandledCudaError};
        self.failed.store(true, Ordering::SeqCst);
        let why = format!("{why}; the communicator is aborted as the worker stops");
        let gone = self.tcp.closed_peers();
        let own_fault = matches!(state, Some(ncclUnhandledCudaError | ncclInvalidArgument | ncclInvalidUsage));
        let peers_fault = !gone.is_empty() || !own_fault;
        if peers_fault {
            anyhow::Error::msg(PeerLost(gone.first().copied())).context(why)
        } else {
            anyhow::Error::msg(why)
        }
    }

    /// The stream of the overlapped exchange, made (a fork of the device's) at its first use.
    fn side_stream(&self) -> Result<Arc<CudaStream>> {
        let mut side = self.side.lock().map_err(|_| anyhow::anyhow!("NCCL: the side stream's lock is poisoned"))?;
        if side.is_none() {
            // With a second stream cudarc would record an event per buffer per launch (see
            // crate::device::with_own_stream): the exchange orders its two streams itself.
            // SAFETY: only the exchange uses the side stream, after waiting for an event the
            // device's stream recorded once the buffers it reads were written; the device's
            // stream waits for the side stream before anything reads them back or frees them.
            unsafe { self.stream.context().disable_event_tracking() };
            *side = Some(self.stream.fork()?);
        }
        Ok(side.clone().expect("made"))
    }

    /// Waits until the stream has done everything enqueued so far, at most the timeout: a
    /// hung or dead peer leaves NCCL's kernel waiting, and reading any result would block
    /// forever. Past the deadline, or on an NCCL error, the communicator is given up. `what`
    /// names the exchange in the error.
    fn wait(&self, what: &str) -> Result<()> {
        self.wait_for(&self.stream.record_event(None)?, what)?;
        self.replays.lock().map_err(|_| anyhow::anyhow!("NCCL: the replays' lock is poisoned"))?.clear();
        self.in_flight.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Waits until `done` has happened on the stream, at most the timeout (as [`Self::wait`]).
    fn wait_for(&self, done: &CudaEvent, what: &str) -> Result<()> {
        self.usable()?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if done.try_is_complete()? {
                return Ok(());
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                return Err(self.fail(format!("NCCL failed during {what} ({})", error_string(state)), Some(state)));
            }
            if Instant::now() > deadline {
                return Err(
                    self.fail(format!("{what} did not finish within {:.0} s", self.timeout.as_secs_f64()), None)
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// After a failure, or with collectives that may still run, `ncclCommAbort` (as PyTorch's
/// watchdog does: every collective stops, where destroying would wait for them, forever if a
/// peer is gone); otherwise `ncclCommDestroy`. Only here, as the worker lets the communicator
/// go, after any CUDA graph that captured its collectives (the trainer drops its graph
/// first): both calls wait until no such graph lives, so a worker that aborted on the spot,
/// its graph alive, would hang instead of stopping.
impl Drop for NcclGroup {
    fn drop(&mut self) {
        if self.failed.load(Ordering::SeqCst) || self.in_flight.load(Ordering::SeqCst) {
            unsafe { result::comm_abort(self.comm) }.ok();
        } else {
            unsafe { result::comm_destroy(self.comm) }.ok();
        }
    }
}

/// The gradients of every parameter averaged over the ranks, in bucket after bucket of
/// parameters of one dtype, registry order. A parameter some rank's slice did not reach
/// counts as zeros there; one that no rank's reached keeps no gradient (as one process).
impl GradientSync for NcclGroup {
    fn all_reduce(&self, grads: &mut GradStore, params: &ParamStore) -> Result<()> {
        let vars = params.vars();
        if vars.is_empty() {
            return Ok(());
        }
        let capturing = self.capturing();
        let mine: Vec<bool> = vars.iter().map(|(_, p)| grads.get(p.var.as_tensor()).is_some()).collect();
        let buckets = self.buckets(&vars, 0..vars.len());
        // An eager step exchanges which parameters have a gradient, as every rank does: 1 where
        // this rank has it, averaged, above 0 where any rank has. A captured step cannot read
        // the answer back: it takes the last eager step's, for the same pattern here (a capture
        // that cannot fails, and the ranks then all stay eager: `GradientSync::all_agree`).
        let has = if capturing {
            None
        } else {
            let flags: Vec<f32> = mine.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
            let has = Tensor::from_vec(flags, vars.len(), vars[0].1.var.as_tensor().device())?;
            self.enqueue_mean(&has, &self.stream)?;
            Some(has)
        };
        let mut reduced = Vec::with_capacity(buckets.len());
        for bucket in &buckets {
            let flat = packed(grads, &vars, bucket)?;
            self.enqueue_mean(&flat, &self.stream)?;
            reduced.push(flat);
        }
        let mut presence = self.presence.lock().map_err(|_| anyhow::anyhow!("NCCL: the presence lock is poisoned"))?;
        let any = match has {
            Some(has) => {
                self.wait("the gradient all-reduce")?;
                let any: Vec<bool> = has.to_vec1::<f32>()?.iter().map(|&h| h > 0.0).collect();
                *presence = Some((mine, any.clone()));
                any
            }
            None => match presence.as_ref().filter(|(m, _)| *m == mine) {
                Some((_, any)) => any.clone(),
                None => bail!("NCCL: a captured step whose gradients differ from the eager steps'"),
            },
        };
        for (bucket, flat) in buckets.iter().zip(&reduced) {
            unpack(grads, &vars, bucket, flat, |i| any[i])?;
        }
        Ok(())
    }

    fn blocks_per_segment(&self, params: &ParamStore, depth: usize) -> Option<usize> {
        let bytes: usize = params.params.values().map(|p| p.var.elem_count() * p.var.dtype().size_in_bytes()).sum();
        // blocks whose parameters fill about a bucket (DDP's bucket of 25 MB: a cut costs an
        // accumulation of the activation's gradient, so not one per block of a small model)
        let every = (self.bucket_bytes * depth).div_ceil(bytes.max(1)).max(1);
        (crate::kernels::enabled("overlap") && every < depth).then_some(every)
    }

    /// Each segment's parameters (those at home there) reduced in buckets on the side stream
    /// as soon as its backward is queued, while the segments below run on the device's stream;
    /// the device's stream waits for the side stream before the update. The ranks check at
    /// every eager step that they cut the same segments (a captured step takes the last
    /// check's). A parameter no segment reaches keeps no gradient; one a segment reaches but
    /// that gets none (an op without a gradient for it) takes part as zeros, on every rank.
    /// A failure once buckets are queued joins the streams and gives the communicator up (a
    /// peer may wait on a bucket this rank never sends).
    fn all_reduce_segments(
        &self,
        mut backward: Backward,
        homes: &[Option<usize>],
        params: &ParamStore,
    ) -> Result<GradStore> {
        let vars = params.vars();
        let capturing = self.capturing();
        self.agree_on(homes, capturing)?;
        let mut buckets = Vec::new(); // (segment, parameter indices)
        for s in 0..backward.segments() {
            let members = (0..vars.len()).filter(|&i| homes[i] == Some(s));
            buckets.extend(self.buckets(&vars, members).into_iter().map(|b| (s, b)));
        }
        let side = self.side_stream()?;
        let mut reduced = Vec::with_capacity(buckets.len());
        let exchange = || -> Result<GradStore> {
            while let Some((s, done)) = backward.next_segment()? {
                for (_, bucket) in buckets.iter().filter(|(at, _)| *at == s) {
                    let flat = packed(done, &vars, bucket)?;
                    side.wait(&self.stream.record_event(None)?)?;
                    self.enqueue_mean(&flat, &side)?;
                    reduced.push((bucket, flat));
                }
            }
            backward.finish().map_err(anyhow::Error::from)
        };
        let finished = exchange();
        // the device's stream takes up the side stream's work whatever happened (a capture
        // cannot end with a stream not joined; nothing queued is freed before it has run)
        let joined = side.record_event(None).and_then(|e| self.stream.wait(&e));
        let mut grads = match (finished, joined) {
            (Ok(grads), Ok(())) => grads,
            (finished, joined) => {
                let err = match (finished, joined) {
                    (Err(e), _) => e,
                    (_, Err(e)) => anyhow::Error::from(e).context("joining the overlapped exchange's stream"),
                    (Ok(_), Ok(())) => unreachable!("handled above"),
                };
                // nothing queued ran: none before this, or only into a capture (the ranks then
                // vote to stay eager, and need the communicator)
                if reduced.is_empty() || capturing {
                    return Err(err);
                }
                self.failed.store(true, Ordering::SeqCst);
                return Err(err.context(
                    "the overlapped gradient exchange failed; the communicator is aborted as the worker stops",
                ));
            }
        };
        if !capturing {
            self.wait("the gradient all-reduce")?;
        }
        for (bucket, flat) in &reduced {
            unpack(&mut grads, &vars, bucket, flat, |_| true)?;
        }
        for ((_, p), home) in vars.iter().zip(homes) {
            if home.is_none() {
                grads.remove(p.var.as_tensor());
            }
        }
        Ok(grads)
    }

    fn capturable(&self) -> bool {
        true
    }

    fn all_agree(&self, ok: bool) -> Result<bool> {
        let mut votes = [if ok { 1.0 } else { 0.0 }];
        self.tcp.all_reduce_mean(&mut votes)?;
        Ok(votes[0] == 1.0)
    }

    /// The step just replayed is left running while the host prepares and queues the next:
    /// the one before it is waited for (waiting for this one would leave the GPU idle between
    /// steps; a lost peer is then found one step later, still within the deadline).
    fn after_replay(&self) -> Result<()> {
        // the replayed collectives may still run: a worker that stops before they end aborts
        self.in_flight.store(true, Ordering::SeqCst);
        let mut queued = self.replays.lock().map_err(|_| anyhow::anyhow!("NCCL: the replays' lock is poisoned"))?;
        queued.push_back(self.stream.record_event(None)?);
        while queued.len() > 1 {
            let older = queued.pop_front().expect("two queued");
            self.wait_for(&older, "the gradient all-reduce")?;
        }
        Ok(())
    }

    fn drain(&self) -> Result<()> {
        let queued =
            !self.replays.lock().map_err(|_| anyhow::anyhow!("NCCL: the replays' lock is poisoned"))?.is_empty();
        if queued {
            self.wait("the gradient all-reduce")?;
        }
        Ok(())
    }
}

impl NcclGroup {
    /// `members` (indices into `vars`, in order) as buckets: runs of one dtype up to
    /// `bucket_bytes`.
    fn buckets(&self, vars: &[(String, Param)], members: impl IntoIterator<Item = usize>) -> Vec<Vec<usize>> {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0;
        for i in members {
            let t = vars[i].1.var.as_tensor();
            let size = t.elem_count() * t.dtype().size_in_bytes();
            let fits = buckets
                .last()
                .and_then(|b| b.first())
                .is_some_and(|&first| bytes + size <= self.bucket_bytes && vars[first].1.var.dtype() == t.dtype());
            if fits {
                buckets.last_mut().expect("a bucket").push(i);
                bytes += size;
            } else {
                buckets.push(vec![i]);
                bytes = size;
            }
        }
        buckets
    }

    /// Checks (eager steps) that every rank cut the backward into the same segments, so they
    /// reduce the same buckets: one exchange of each home and its square, whose means agree
    /// with each other exactly when every rank sent the same homes (each rank concludes the
    /// same). A captured step must cut as the last eager step did.
    fn agree_on(&self, homes: &[Option<usize>], capturing: bool) -> Result<()> {
        let mut agreed = self.homes.lock().map_err(|_| anyhow::anyhow!("NCCL: the homes lock is poisoned"))?;
        if capturing {
            if agreed.as_deref() != Some(homes) {
                bail!("NCCL: a captured step cut into other segments than the eager steps'");
            }
            return Ok(());
        }
        let values: Vec<f64> = homes.iter().map(|h| h.map_or(-1.0, |s| s as f64)).collect();
        let mut moments: Vec<f64> =
            values.iter().chain(&values.iter().map(|v| v * v).collect::<Vec<_>>()).copied().collect();
        self.tcp.all_reduce_mean(&mut moments)?;
        let (mean, square) = moments.split_at(values.len());
        if mean.iter().zip(square).any(|(m, q)| (q - m * m).abs() > 1e-9) {
            *agreed = None;
            bail!("NCCL: the workers cut the backward into different segments (do they train the same model?)");
        }
        *agreed = Some(homes.to_vec());
        Ok(())
    }

    /// Whether this worker's stream is being captured into a CUDA graph.
    fn capturing(&self) -> bool {
        self.stream.capture_status().is_ok_and(|s| {
            s != candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        })
    }
}

/// A split sequence's collective between GPUs: NCCL's all-gather, differentiable
/// ([`NcclGather`]).
impl AllGather for Arc<NcclGroup> {
    fn rank(&self) -> usize {
        self.tcp.rank
    }
    fn world(&self) -> usize {
        self.tcp.world
    }
    fn all_gather(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(NcclGather(self.clone()))
    }
}

/// Every rank's tensor stacked in rank order (`ncclAllGather`); backward: each rank's
/// gradient of its rows summed over the ranks (`ncclReduceScatter`).
struct NcclGather(Arc<NcclGroup>);

impl NcclGather {
    fn gather<T: CudaDType + DeviceRepr>(&self, dev: &CudaDevice, x: &CudaView<T>, kind: DType) -> Result<CudaStorage> {
        let g = &self.0;
        g.usable()?;
        let n = x.len();
        let mut out = crate::kernels::launch::uninit::<T>(dev, n * g.tcp.world)?;
        {
            let (src, _read) = x.device_ptr(&g.stream);
            let (dst, _write) = out.device_ptr_mut(&g.stream);
            let (kind, stream) = (nccl_type(kind, "all-gather")?, g.stream.cu_stream() as sys::cudaStream_t);
            // SAFETY: `x` holds n elements and `out` world n, both on this worker's GPU and
            // stream; every element of `out` is written.
            let r = unsafe { result::all_gather(src as *const _, dst as *mut _, n, kind, g.comm, stream) };
            g.enqueued(r, "the sequence's all-gather")?;
        }
        // (a captured step is waited for after its replay)
        if !g.capturing() {
            g.wait("the sequence's all-gather")?;
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

impl candle_core::CustomOp1 for NcclGather {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("NCCL all-gather of a tensor on the CPU (CPU workers gather through their group)")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        use crate::kernels::launch::slice;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dev = s.device();
        let out = match &s.slice {
            S::F32(x) => self.gather(dev, &slice(x, l)?, DType::F32),
            S::BF16(x) => self.gather(dev, &slice(x, l)?, DType::BF16),
            S::F16(x) => self.gather(dev, &slice(x, l)?, DType::F16),
            S::F64(x) => self.gather(dev, &slice(x, l)?, DType::F64),
            _ => Err(anyhow::anyhow!("NCCL all-gather of {:?} tensors", s.dtype())),
        }
        .map_err(super::distributed::collective_error)?;
        let mut dims = vec![self.0.tcp.world];
        dims.extend(l.dims());
        Ok((out, dims.into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = &self.0;
        // summed in f32 at least (bf16 would round at every rank's addition; the CPU path sums
        // in f64), the sum in the input's dtype
        let sum_dtype = if arg.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let grad = grad.to_dtype(sum_dtype)?.contiguous()?;
        let mine = Tensor::zeros(arg.shape(), sum_dtype, arg.device())?;
        if !matches!(arg.device(), Device::Cuda(_)) {
            candle_core::bail!("NCCL reduce-scatter of a tensor on the CPU")
        }
        let fail = super::distributed::collective_error;
        let (kind, n) = (nccl_type(sum_dtype, "reduce-scatter").map_err(fail)?, arg.elem_count());
        g.enqueue(&g.stream, "the sequence's reduce-scatter", &[Some(&grad), Some(&mine)], |a, stream| {
            // SAFETY: `grad` holds world n elements, `mine` n, on this worker's stream.
            unsafe {
                result::reduce_scatter(
                    a[0] as *const _,
                    a[1] as *mut _,
                    n,
                    kind,
                    sys::ncclRedOp_t::ncclSum,
                    g.comm,
                    stream,
                )
            }
        })
        .map_err(fail)?;
        if !g.capturing() {
            g.wait("the sequence's reduce-scatter").map_err(fail)?;
        }
        Ok(Some(mine.to_dtype(arg.dtype())?))
    }
}

/// The gradients of `bucket`'s parameters in one flat tensor (zeros for one this rank has
/// none of), to be reduced in place.
fn packed(grads: &GradStore, vars: &[(String, Param)], bucket: &[usize]) -> Result<Tensor> {
    let parts = bucket
        .iter()
        .map(|&i| {
            let t = vars[i].1.var.as_tensor();
            match grads.get(t) {
                Some(g) => g.flatten_all(),
                None => Tensor::zeros(t.elem_count(), t.dtype(), t.device()),
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Cuts a reduced bucket back into `grads` (views of `flat`, no copy); a parameter for which
/// `keep` is false loses its gradient instead.
fn unpack(
    grads: &mut GradStore,
    vars: &[(String, Param)],
    bucket: &[usize],
    flat: &Tensor,
    keep: impl Fn(usize) -> bool,
) -> Result<()> {
    let mut at = 0;
    for &i in bucket {
        let t = vars[i].1.var.as_tensor();
        let n = t.elem_count();
        if keep(i) {
            grads.insert(t, flat.narrow(0, at, n)?.reshape(t.dims())?);
        } else {
            grads.remove(t);
        }
        at += n;
    }
    Ok(())
}

/// NCCL's name for `dtype`; `doing` names the collective in the error.
fn nccl_type(dtype: DType, doing: &str) -> Result<sys::ncclDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        DType::F64 => sys::ncclDataType_t::ncclFloat64,
        other => bail!("NCCL {doing} of {other:?} tensors"),
    })
}

/// The leading fields of NCCL's `ncclConfig_t` as of NCCL 2.17 (`NCCL_CONFIG_INITIALIZER`
/// with `blocking = 0`): NCCL reads a config by its `size` and `version`, so this prefix means
/// the same to every later library (the fields after it keep their defaults), whichever
/// release cudarc's bindings were generated for.
#[repr(C)]
struct NonBlockingConfig {
    size: usize,
    magic: std::ffi::c_uint,
    version: std::ffi::c_uint,
    blocking: std::ffi::c_int,
    cga_cluster_size: std::ffi::c_int,
    min_ctas: std::ffi::c_int,
    max_ctas: std::ffi::c_int,
    net_name: *const std::ffi::c_char,
}

impl NonBlockingConfig {
    fn new() -> NonBlockingConfig {
        const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN; // NCCL_CONFIG_UNDEF_INT
        NonBlockingConfig {
            size: std::mem::size_of::<NonBlockingConfig>(),
            magic: 0xcafe_beef,            // NCCL_API_MAGIC
            version: 2 * 10000 + 17 * 100, // NCCL_VERSION(2, 17, 0)
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
        }
    }
}

/// Joins the communicator as `rank` of `world` within `timeout`. The communicator is
/// non-blocking (`ncclCommInitRankConfig`, `blocking = 0`): joining returns at once and is polled until every rank
/// has come; past the deadline it is aborted and this fails as a lost peer (the cause is
/// another rank, one that died or hangs before joining). Every later call on it returns at
/// once as well ([`settle`]). `NCCL_COMM_BLOCKING=1` in the environment (NCCL's own switch)
/// makes it blocking again (joining and enqueueing are then no longer bounded by the
/// deadline; the reductions still are).
pub fn join_communicator(
    uid: sys::ncclUniqueId,
    world: usize,
    rank: usize,
    stream: &Arc<CudaStream>,
    timeout: Duration,
) -> Result<sys::ncclComm_t> {
    stream.context().bind_to_thread()?;
    let deadline = Instant::now() + timeout;
    let mut comm = std::ptr::null_mut();
    let mut config = NonBlockingConfig::new();
    // SAFETY: `config` is a well-formed prefix of ncclConfig_t (its size says how much NCCL
    // may read); `comm` receives the handle, set before the call returns.
    let r = unsafe {
        sys::ncclCommInitRankConfig(
            &mut comm,
            world as i32,
            uid,
            rank as i32,
            (&mut config as *mut NonBlockingConfig).cast(),
        )
    };
    // NCCL refuses two ranks on one GPU as invalid usage
    let joining = |r: sys::ncclResult_t| {
        let hint = if r == sys::ncclResult_t::ncclInvalidUsage { " (each worker needs a GPU of its own)" } else { "" };
        format!("rank {rank} of {world} joining the communicator{hint}")
    };
    if let Err(e) = r.result() {
        if !comm.is_null() {
            unsafe { result::comm_abort(comm) }.ok();
        }
        return Err(nccl_error(&joining(e.0), e.0, None));
    }
    match settle(comm, deadline) {
        Settled::Done => Ok(comm),
        Settled::Failed(state) => {
            let err = nccl_error(&joining(state), state, Some(comm));
            unsafe { result::comm_abort(comm) }.ok();
            Err(err)
        }
        Settled::Late => {
            unsafe { result::comm_abort(comm) }.ok();
            Err(anyhow::Error::msg(PeerLost(None)).context(format!(
                "NCCL: rank {rank} of {world}: the other ranks did not join the communicator within {:.0} s",
                timeout.as_secs_f64()
            )))
        }
    }
}

/// How a non-blocking NCCL call ended.
enum Settled {
    Done,
    /// NCCL's error.
    Failed(sys::ncclResult_t),
    /// Still in progress at the deadline.
    Late,
}

/// Polls a non-blocking communicator until the call made on it last has finished (NCCL's
/// `ncclInProgress` gone: the communicator joined, or a collective enqueued on its stream),
/// at most until `deadline`. Nothing else may be called on the communicator, nor enqueued on
/// its stream, before it has.
fn settle(comm: sys::ncclComm_t, deadline: Instant) -> Settled {
    loop {
        let mut state = sys::ncclResult_t::ncclSuccess;
        let asked = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if asked != sys::ncclResult_t::ncclSuccess {
            return Settled::Failed(asked);
        }
        match state {
            sys::ncclResult_t::ncclSuccess => return Settled::Done,
            sys::ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(20))
            }
            sys::ncclResult_t::ncclInProgress => return Settled::Late,
            failed => return Settled::Failed(failed),
        }
    }
}

fn error_string(r: sys::ncclResult_t) -> String {
    let s = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(r)) };
    format!("{r:?}: {}", s.to_string_lossy())
}

/// An NCCL call's failure as an error naming what was done, NCCL's own words, and the last
/// message NCCL logged on the communicator where there is one.
fn nccl_error(doing: &str, r: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> anyhow::Error {
    let last = comm
        .map(|c| unsafe { std::ffi::CStr::from_ptr(sys::ncclGetLastError(c)) }.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    anyhow::anyhow!("NCCL: {doing} failed: {}{last}", error_string(r))
}
