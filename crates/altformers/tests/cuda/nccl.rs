//! The NCCL gradient exchange (`altformers::train::nccl`) on the device machine's one GPU: a
//! world of one rank through NCCL (gradients packed into many small buckets, averaged, cut
//! back; a gradient no rank has stays absent) trains as one process does; a reduction that
//! misses its deadline fails as a lost peer and gives the communicator up; LongNet split over a
//! world of one through NCCL's all-gather and reduce-scatter computes the unsplit model's loss
//! and gradients. Two ranks need two GPUs (NCCL refuses two ranks on one device).

use altformers::model::Model;
use altformers::train::distributed::{Group, PeerLost};
use altformers::train::nccl::{NcclGroup, NVLS_OFF};
use altformers::train::step::{GradientSync, Trainer};
use altformers::train::task::ByteLm;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;
use std::time::Duration;

/// NVLink multicast off, as the launcher sets it for every worker (NCCL's workers check).
fn nvls_off() {
    for (name, value) in NVLS_OFF {
        std::env::set_var(name, value);
    }
}

/// GPU 0 as a worker has it: on a stream of its own (NCCL refuses the thread's default stream).
fn worker_gpu() -> Result<Device> {
    altformers::device::with_own_stream(&Device::new_cuda(0)?)
}

fn world_of_one(gpu: &Device, timeout: Duration) -> Result<NcclGroup> {
    nvls_off();
    let endpoint = altformers::train::distributed::free_local_endpoint()?;
    let group = Arc::new(Group::connect(0, 1, &endpoint, Duration::from_secs(30))?);
    NcclGroup::connect(group, gpu, timeout)
}

fn config() -> Result<altformers::config::RunConfig> {
    let sets = ["model.width=32", "model.depth=2", "model.heads=2", "model.context=16", "train.batch_size=4"];
    altformers::registry::config("transformer", &altformers::config::Overrides::sets(&sets))
}

/// `steps` training steps of `model` by `trainer` on `task`: every parameter after them,
/// flattened, and whether the steps were replayed from a CUDA graph.
fn train_steps(model: &Model, trainer: &mut Trainer, task: &ByteLm<u8>, steps: usize) -> Result<(Vec<f32>, bool)> {
    for step in 0..steps {
        trainer.step(model, task, step)?;
    }
    trainer.settle_if_due(true)?;
    let all =
        model.params.vars().iter().map(|(_, p)| p.var.as_tensor().flatten_all()).collect::<Result<Vec<_>, _>>()?;
    Ok((Tensor::cat(&all, 0)?.to_vec1::<f32>()?, trainer.graphed()))
}

/// The largest difference of two parameter vectors, relative to 1 + |a|.
fn largest_gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + x.abs())).fold(0f32, f32::max)
}

/// Every parameter's gradient in `grads`, flattened, in registry order.
fn gradients(model: &Model, grads: &candle_core::backprop::GradStore) -> Result<Vec<Vec<f32>>> {
    model
        .params
        .vars()
        .iter()
        .map(|(_, p)| Ok(grads.get(p.var.as_tensor()).expect("a gradient").flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

/// A split sequence's loss within 1e-5 of the whole one's (f32 means taken in another order:
/// a few 1e-7; a wrong split is off by 1e-3 or more) and each gradient within 1e-4
/// (relative, above 1e-3).
fn ensure_split_is_whole(whole: (f64, &[Vec<f32>]), split: (f64, &[Vec<f32>])) -> Result<()> {
    let ((lw, gw), (ls, gs)) = (whole, split);
    anyhow::ensure!((lw - ls).abs() <= 1e-5 * lw.abs(), "loss {ls} against {lw}");
    for (a, b) in gw.iter().zip(gs) {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1e-3 + x.abs())).fold(0f32, f32::max);
        anyhow::ensure!(worst < 1e-4, "a gradient differs by {worst:e} (relative)");
    }
    Ok(())
}

#[test]
fn a_world_of_one_through_nccl_trains_as_one_process() -> Result<()> {
    let gpu = worker_gpu()?;
    let cfg = config()?;
    let data: Vec<u8> = (0..4000u32).map(|i| ((i * 7919) % 251) as u8).collect();
    let task = ByteLm { split: &data, context: cfg.model.context };
    let weights = |sync: Option<NcclGroup>, accumulate: usize| -> Result<Vec<f32>> {
        let model = Model::new(&cfg.model, 1, &gpu, DType::F32)?;
        let train = altformers::config::TrainConfig { accumulate, ..cfg.train.clone() };
        let mut trainer = Trainer::new(&model, &train)?;
        if let Some(s) = sync {
            trainer.sync = Box::new(s);
        }
        let (weights, replayed) = train_steps(&model, &mut trainer, &task, 6)?;
        // micro-batches run eagerly
        anyhow::ensure!(replayed == (accumulate == 1), "six steps of {accumulate} micro-batches: replayed {replayed}");
        Ok(weights)
    };
    let one = weights(None, 1)?;
    // 1 KB buckets: every parameter of the model crosses or starts a bucket boundary
    let nccl = || -> Result<NcclGroup> { Ok(world_of_one(&gpu, Duration::from_secs(60))?.with_bucket_bytes(1024)) };
    let worst = largest_gap(&one, &weights(Some(nccl()?), 1)?);
    anyhow::ensure!(
        worst < 1e-6,
        "six steps through NCCL (overlapped, the last three replayed) differ from one process's by {worst:e}"
    );
    // two micro-batches a step, the second's backward overlapped with the exchange of the sums
    let worst = largest_gap(&one, &weights(Some(nccl()?), 2)?);
    anyhow::ensure!(worst < 1e-5, "six steps of two micro-batches through NCCL differ by {worst:e}");

    // the exchange itself: every gradient back in place, a missing one still missing
    let model = Model::new(&cfg.model, 2, &gpu, DType::F32)?;
    let tokens = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &gpu)?;
    let logits = model.forward(&tokens, None)?;
    let mut grads = Model::loss(&logits.narrow(1, 0, 5)?, &tokens.narrow(1, 1, 5)?)?.backward()?;
    let vars = model.params.vars();
    let (_, dropped) = &vars[1];
    grads.remove(dropped.var.as_tensor());
    let before: Vec<Option<Vec<f32>>> = vars
        .iter()
        .map(|(_, p)| grads.get(p.var.as_tensor()).map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose())
        .collect::<Result<_, _>>()?;
    world_of_one(&gpu, Duration::from_secs(60))?.with_bucket_bytes(1000).all_reduce(&mut grads, &model.params)?;
    for ((name, p), want) in vars.iter().zip(&before) {
        let got = grads.get(p.var.as_tensor()).map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose()?;
        anyhow::ensure!(&got == want, "{name}: the gradient after the exchange is not this rank's own");
    }
    Ok(())
}

/// The training step with its NCCL all-reduce captured as one CUDA graph (`train/graph.rs`):
/// replayed steps give the eager steps' parameters (within 1e-6 after six steps, the three
/// last replayed), and the exchange's pattern of gradients is settled before the capture.
#[test]
fn a_graphed_step_captures_the_nccl_exchange() -> Result<()> {
    let gpu = worker_gpu()?;
    let cfg = config()?;
    let data: Vec<u8> = (0..4000u32).map(|i| ((i * 7919) % 251) as u8).collect();
    let task = ByteLm { split: &data, context: cfg.model.context };
    let weights = |graph: bool| -> Result<(Vec<f32>, bool)> {
        let model = Model::new(&cfg.model, 1, &gpu, DType::F32)?;
        let mut trainer = Trainer::new(&model, &cfg.train)?;
        trainer.sync = Box::new(world_of_one(&gpu, Duration::from_secs(60))?.with_bucket_bytes(4096));
        if !graph {
            trainer.eager_only();
        }
        train_steps(&model, &mut trainer, &task, 6)
    };
    let (eager, replayed) = weights(false)?;
    anyhow::ensure!(!replayed, "eager_only replayed");
    let (graphed, replayed) = weights(true)?;
    anyhow::ensure!(replayed, "the step with an NCCL exchange was not captured");
    let worst = largest_gap(&eager, &graphed);
    anyhow::ensure!(worst < 1e-6, "replayed steps through NCCL differ from eager ones by {worst:e}");
    Ok(())
}

#[test]
fn a_reduction_past_its_deadline_fails_as_a_lost_peer_and_refuses_more_work() -> Result<()> {
    let gpu = worker_gpu()?;
    let cfg = config()?;
    let model = Model::new(&cfg.model, 3, &gpu, DType::F32)?;
    let tokens = Tensor::new(&[[1u32, 2, 3, 4]], &gpu)?;
    let mut grads =
        Model::loss(&model.forward(&tokens.narrow(1, 0, 3)?, None)?, &tokens.narrow(1, 1, 3)?)?.backward()?;
    let nccl = world_of_one(&gpu, Duration::from_secs(60))?.with_timeout(Duration::from_micros(1));
    // tens of milliseconds of products ahead of the reduction on the stream
    let a = (Tensor::randn(0f32, 1.0, (4096, 4096), &gpu)? * 1e-3)?;
    let mut x = a.clone();
    for _ in 0..20 {
        x = x.matmul(&a)?;
    }
    let err = nccl.all_reduce(&mut grads, &model.params).expect_err("the deadline passed");
    anyhow::ensure!(err.downcast_ref::<PeerLost>().is_some(), "not reported as a lost peer: {err:#}");
    anyhow::ensure!(format!("{err:#}").contains("aborted"), "{err:#}");
    // the failed communicator refuses further work instead of hanging
    let again = nccl.all_reduce(&mut grads, &model.params).expect_err("refused after the abort");
    anyhow::ensure!(format!("{again:#}").contains("aborted"), "{again:#}");
    drop(x);
    Ok(())
}

/// A small LongNet whose longest pair (w 128, r 16) spans more than a sequence of 64, so its
/// rows go through the collective even on one rank; `extra` settings laid over it.
fn longnet_config(extra: &[&str]) -> Result<altformers::config::RunConfig> {
    let mut sets = vec![
        "model.width=32",
        "model.depth=2",
        "model.heads=4",
        "model.context=64",
        "model.options.segment_lengths=[8,16,128]",
        "model.options.dilation_rates=[1,2,16]",
    ];
    sets.extend_from_slice(extra);
    altformers::registry::config("longnet", &altformers::config::Overrides::sets(&sets))
}

/// Sequence parallelism through NCCL (one rank): a LongNet whose longest pair spans more than
/// the slice (so its dilated rows go through `ncclAllGather`, and their gradients back through
/// `ncclReduceScatter`) gives the unsplit model's loss and every parameter's gradient, f32.
#[test]
fn a_sequence_split_over_nccl_is_the_whole_sequence() -> Result<()> {
    let gpu = worker_gpu()?;
    let cfg = longnet_config(&[])?;
    let tokens = Tensor::new((0..128u32).map(|i| (i * 37) % 251).collect::<Vec<_>>(), &gpu)?.reshape((2, 64))?;
    let loss_and_grads = |split: bool| -> Result<(f64, Vec<Vec<f32>>)> {
        let mut model = Model::new(&cfg.model, 5, &gpu, DType::F32)?;
        if split {
            let nccl = Arc::new(world_of_one(&gpu, Duration::from_secs(60))?);
            model.split_sequence(Arc::new(nccl))?;
        }
        let logits = model.forward(&tokens.narrow(1, 0, 63)?.pad_with_zeros(1, 0, 1)?, None)?;
        let loss = Model::loss(&logits, &tokens)?;
        Ok((loss.to_scalar::<f32>()? as f64, gradients(&model, &loss.backward()?)?))
    };
    let (whole, g1) = loss_and_grads(false)?;
    let (split, g2) = loss_and_grads(true)?;
    ensure_split_is_whole((whole, &g1), (split, &g2))
}

/// Joining a communicator whose other rank never comes (a world of two, one rank here) fails
/// within the deadline as a lost peer, naming the rank and the wait, instead of blocking in
/// `ncclCommInitRank` forever.
#[test]
fn a_rank_that_never_joins_fails_the_join_within_the_deadline() -> Result<()> {
    let gpu = worker_gpu()?;
    nvls_off();
    let Device::Cuda(cuda) = &gpu else { unreachable!("a CUDA device") };
    let uid = cudarc::nccl::result::get_uniqueid().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let started = std::time::Instant::now();
    let err = altformers::train::nccl::join_communicator(uid, 2, 0, &cuda.cuda_stream(), Duration::from_secs(2))
        .expect_err("nobody else joined");
    let waited = started.elapsed().as_secs_f64();
    anyhow::ensure!(err.downcast_ref::<PeerLost>().is_some(), "not reported as a lost peer: {err:#}");
    anyhow::ensure!(format!("{err:#}").contains("rank 0 of 2: the other ranks did not join"), "{err:#}");
    anyhow::ensure!((2.0..10.0).contains(&waited), "failed after {waited:.1} s, not at the 2 s deadline");
    Ok(())
}

/// Six steps of LongNet with each sequence split over `nccl`, this worker's slice `shard`
/// (rank, world), captured as a CUDA graph or eager: the weights after them and whether the
/// steps were replayed.
fn split_steps(
    cfg: &altformers::config::RunConfig,
    task: &ByteLm<u8>,
    dev: &Device,
    nccl: Arc<NcclGroup>,
    shard: (usize, usize),
    graph: bool,
) -> Result<(Vec<f32>, bool)> {
    let mut model = Model::new(&cfg.model, 1, dev, DType::F32)?;
    model.split_sequence(Arc::new(nccl.clone()))?;
    let mut trainer = Trainer::new(&model, &cfg.train)?;
    trainer.sync = Box::new(nccl);
    trainer.shard = shard;
    trainer.sequence_parallel = true;
    if !graph {
        trainer.eager_only();
    }
    train_steps(&model, &mut trainer, task, 6)
}

/// A sequence split over NCCL, its step captured as one CUDA graph: the all-gathers and
/// reduce-scatters of LongNet's longer pairs replayed with the rest give the eager steps'
/// parameters (within 1e-6 after six steps, the last three replayed).
#[test]
fn a_split_sequence_step_is_captured_with_its_collectives() -> Result<()> {
    let gpu = worker_gpu()?;
    let cfg = longnet_config(&["model.dropout=0.1", "train.batch_size=4"])?;
    let data: Vec<u8> = (0..6000u32).map(|i| ((i * 7919) % 251) as u8).collect();
    let task = ByteLm { split: &data, context: cfg.model.context };
    let weights = |graph: bool| -> Result<(Vec<f32>, bool)> {
        split_steps(&cfg, &task, &gpu, Arc::new(world_of_one(&gpu, Duration::from_secs(60))?), (0, 1), graph)
    };
    let (eager, _) = weights(false)?;
    let (graphed, replayed) = weights(true)?;
    anyhow::ensure!(replayed, "the split step was not captured");
    let worst = largest_gap(&eager, &graphed);
    anyhow::ensure!(worst < 1e-6, "replayed split steps differ from eager ones by {worst:e}");
    Ok(())
}

/// A device on the thread's default stream (candle's `Device::new_cuda`) is refused: a
/// non-blocking communicator launches its collectives from a thread of its own, where that
/// handle would name another stream (NVIDIA/nccl#1976).
#[test]
fn a_device_on_the_threads_default_stream_is_refused() -> Result<()> {
    let err = world_of_one(&Device::new_cuda(0)?, Duration::from_secs(10)).err().expect("refused");
    anyhow::ensure!(format!("{err:#}").contains("a stream of its own"), "{err:#}");
    Ok(())
}

/// The same exchanges between two GPUs, ranks as threads of this process
/// (`train::distributed::in_threads`, as `compare --data-parallel` runs them): NCCL's path
/// between peers (its connections, the non-blocking communicator's enqueue thread) that one
/// GPU never takes. Ignored on one GPU; `scripts/gpu-bench.sh multi-gpu-tests` runs them on a
/// host with two or more.
mod two_gpus {
    use super::*;
    use altformers::train::distributed::in_threads;
    use std::sync::Mutex;

    /// Two GPUs with half of every batch each train as one GPU with the whole batch: the same
    /// weights within 1e-5 after six steps (three eager, three replayed from the captured
    /// step with its NCCL all-reduce), and the two ranks hold the same bits.
    #[test]
    #[ignore = "needs two GPUs: scripts/gpu-bench.sh multi-gpu-tests"]
    fn two_gpus_with_half_the_batch_each_train_as_one() -> Result<()> {
        nvls_off();
        let cfg = config()?;
        let data: Vec<u8> = (0..4000u32).map(|i| ((i * 7919) % 251) as u8).collect();
        let task = ByteLm { split: &data, context: cfg.model.context };
        let gpu = Device::new_cuda(0)?;
        let model = Model::new(&cfg.model, 1, &gpu, DType::F32)?;
        let (one, _) = train_steps(&model, &mut Trainer::new(&model, &cfg.train)?, &task, 6)?;
        // each rank's weights after the steps and whether its steps were captured
        type Seen = Option<(Vec<f32>, bool)>;
        let ranks: Mutex<Vec<Seen>> = Mutex::new(vec![None, None]);
        in_threads(2, &gpu, |dev, group| {
            let rank = group.rank;
            let nccl = NcclGroup::connect(group, dev, Duration::from_secs(60))?.with_bucket_bytes(4096);
            let model = Model::new(&cfg.model, 1, dev, DType::F32)?;
            let mut trainer = Trainer::new(&model, &cfg.train)?;
            trainer.sync = Box::new(nccl);
            trainer.shard = (rank, 2);
            let weights = train_steps(&model, &mut trainer, &task, 6)?;
            ranks.lock().expect("not poisoned")[rank] = Some(weights);
            Ok(())
        })?;
        let ranks = ranks.into_inner().expect("not poisoned");
        let (w0, graphed) = ranks[0].as_ref().expect("rank 0 trained");
        let (w1, _) = ranks[1].as_ref().expect("rank 1 trained");
        anyhow::ensure!(*graphed, "the two-GPU step was not captured");
        anyhow::ensure!(w0 == w1, "the two ranks hold different weights");
        let worst = largest_gap(&one, w0);
        anyhow::ensure!(worst < 1e-5, "two GPUs differ from one by {worst:e}");
        Ok(())
    }

    /// A sequence split over two GPUs, its step captured as one CUDA graph on each: the
    /// gathers and reduce-scatters between the GPUs replayed with the rest (NCCL's persistent
    /// plans, which one GPU never makes) give the eager steps' parameters, the same on both.
    #[test]
    #[ignore = "needs two GPUs: scripts/gpu-bench.sh multi-gpu-tests"]
    fn a_split_sequence_step_over_two_gpus_is_captured_with_its_collectives() -> Result<()> {
        nvls_off();
        let cfg = longnet_config(&["model.dropout=0.1", "train.batch_size=4"])?;
        let data: Vec<u8> = (0..6000u32).map(|i| ((i * 7919) % 251) as u8).collect();
        let task = ByteLm { split: &data, context: cfg.model.context };
        // each rank's weights after eager steps and after graphed ones, and whether captured
        type Runs = Option<(Vec<f32>, Vec<f32>, bool)>;
        let ranks: Mutex<Vec<Runs>> = Mutex::new(vec![None, None]);
        in_threads(2, &Device::new_cuda(0)?, |dev, group| {
            let rank = group.rank;
            let weights = |graph: bool| -> Result<(Vec<f32>, bool)> {
                let nccl = Arc::new(NcclGroup::connect(group.clone(), dev, Duration::from_secs(60))?);
                split_steps(&cfg, &task, dev, nccl, (rank, 2), graph)
            };
            let (eager, _) = weights(false)?;
            let (graphed, replayed) = weights(true)?;
            ranks.lock().expect("not poisoned")[rank] = Some((eager, graphed, replayed));
            Ok(())
        })?;
        let ranks = ranks.into_inner().expect("not poisoned");
        let (eager0, graphed0, replayed) = ranks[0].as_ref().expect("rank 0 trained");
        let (_, graphed1, _) = ranks[1].as_ref().expect("rank 1 trained");
        anyhow::ensure!(*replayed, "the split step over two GPUs was not captured");
        anyhow::ensure!(graphed0 == graphed1, "the two ranks hold different weights");
        let worst = largest_gap(eager0, graphed0);
        anyhow::ensure!(worst < 1e-6, "replayed split steps differ from eager ones by {worst:e}");
        Ok(())
    }

    /// LongNet's sequence split over two GPUs (each 32 of 64 positions; the longest pair spans
    /// the whole sequence, so its dilated rows cross between the GPUs): the mean of the
    /// ranks' losses and gradients is the unsplit model's.
    #[test]
    #[ignore = "needs two GPUs: scripts/gpu-bench.sh multi-gpu-tests"]
    fn a_sequence_split_over_two_gpus_is_the_whole_sequence() -> Result<()> {
        nvls_off();
        let cfg = longnet_config(&[])?;
        let ids: Vec<u32> = (0..256u32).map(|i| (i * 37) % 251).collect();
        let batch = |dev: &Device| -> Result<(Tensor, Tensor)> {
            let t = Tensor::new(ids.as_slice(), dev)?.reshape((2, 128))?;
            Ok((t.narrow(1, 0, 64)?, t.narrow(1, 1, 64)?))
        };
        let gpu = Device::new_cuda(0)?;
        let model = Model::new(&cfg.model, 5, &gpu, DType::F32)?;
        let (x, y) = batch(&gpu)?;
        let loss = Model::loss(&model.forward(&x, None)?, &y)?;
        let (whole, g1) = (loss.to_scalar::<f32>()? as f64, gradients(&model, &loss.backward()?)?);
        let (split, g2) = in_threads(2, &gpu, |dev, group| {
            let rank = group.rank;
            let nccl = Arc::new(NcclGroup::connect(group.clone(), dev, Duration::from_secs(60))?);
            let mut model = Model::new(&cfg.model, 5, dev, DType::F32)?;
            model.split_sequence(Arc::new(nccl.clone()))?;
            let (x, y) = batch(dev)?;
            let (x, y) = (x.narrow(1, 32 * rank, 32)?, y.narrow(1, 32 * rank, 32)?);
            let loss = Model::loss(&model.forward(&x, None)?, &y)?;
            let mut grads = loss.backward()?;
            nccl.all_reduce(&mut grads, &model.params)?;
            let mut mean = [loss.to_scalar::<f32>()? as f64];
            group.all_reduce_mean(&mut mean)?;
            Ok((mean[0], gradients(&model, &grads)?))
        })?;
        ensure_split_is_whole((whole, &g1), (split, &g2))
    }

    /// A rank that stops after joining, before its first collective: the other's first
    /// all-reduce (whose enqueueing sets up the connection to it) fails within its deadline
    /// as a lost peer instead of waiting forever, and the job's error is the stopped rank's.
    #[test]
    #[ignore = "needs two GPUs: scripts/gpu-bench.sh multi-gpu-tests"]
    fn a_rank_gone_before_the_first_collective_fails_the_other_within_the_deadline() -> Result<()> {
        nvls_off();
        let cfg = config()?;
        let gpu = Device::new_cuda(0)?;
        let rank0: Mutex<Option<(String, bool, f64)>> = Mutex::new(None);
        let started = std::time::Instant::now();
        let err = in_threads(2, &gpu, |dev, group| -> Result<()> {
            let rank = group.rank;
            let nccl = NcclGroup::connect(group, dev, Duration::from_secs(10))?;
            if rank == 1 {
                anyhow::bail!("rank 1 stopped");
            }
            let model = Model::new(&cfg.model, 3, dev, DType::F32)?;
            let tokens = Tensor::new(&[[1u32, 2, 3, 4]], dev)?;
            let logits = model.forward(&tokens.narrow(1, 0, 3)?, None)?;
            let mut grads = Model::loss(&logits, &tokens.narrow(1, 1, 3)?)?.backward()?;
            let at = std::time::Instant::now();
            let e = nccl.all_reduce(&mut grads, &model.params).expect_err("rank 1 is gone");
            *rank0.lock().expect("not poisoned") =
                Some((format!("{e:#}"), e.downcast_ref::<PeerLost>().is_some(), at.elapsed().as_secs_f64()));
            Err(e)
        })
        .expect_err("rank 1 failed");
        anyhow::ensure!(format!("{err:#}").contains("worker rank 1: rank 1 stopped"), "{err:#}");
        let (message, lost, waited) = rank0.into_inner().expect("not poisoned").expect("rank 0 reached its all-reduce");
        anyhow::ensure!(lost, "rank 0 did not fail as a lost peer: {message}");
        anyhow::ensure!(waited < 20.0, "rank 0 failed after {waited:.1} s (deadline 10 s): {message}");
        anyhow::ensure!(started.elapsed().as_secs_f64() < 60.0, "the job took {:?}", started.elapsed());
        Ok(())
    }
}
