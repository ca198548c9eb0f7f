//! The training step replayed from a CUDA graph (`train/graph.rs`) against the same steps
//! launched op by op: the same parameters bit for bit, the same losses, for models of every
//! kind of mixer, with a learning rate that changes every step (warm-up) and clipping on.

use altformers::model::Model;
use altformers::train::step::Trainer;
use altformers::train::task::ByteLm;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Parameters and losses after `steps` steps at width `width` (two heads), context `context`
/// and dropout `dropout`, and whether the steps were replayed.
fn trained(
    arch: &str,
    width: usize,
    context: usize,
    dropout: f64,
    graph: bool,
    steps: usize,
) -> Result<(Vec<f32>, Vec<f64>, bool)> {
    let gpu = Device::new_cuda(0)?;
    let width = format!("model.width={width}");
    let context = format!("model.context={context}");
    let dropout = format!("model.dropout={dropout}");
    let sets = [
        width.as_str(),
        dropout.as_str(),
        "model.depth=2",
        "model.heads=2",
        context.as_str(),
        "train.batch_size=4",
        "train.warmup_steps=4",
        "train.grad_clip=0.5",
    ];
    let cfg = altformers::registry::config(arch, &altformers::config::Overrides::sets(&sets))?;
    let data: Vec<u8> = (0..6000u32).map(|i| ((i * 7919) % 251) as u8).collect();
    let task = ByteLm { split: &data, context: cfg.model.context };
    let model = Model::new(&cfg.model, 1, &gpu, DType::F32)?.with_compute_dtype(DType::BF16);
    let mut trainer = Trainer::new(&model, &cfg.train)?;
    if !graph {
        trainer.eager_only();
    }
    let mut losses = Vec::new();
    for step in 0..steps {
        trainer.step(&model, &task, step)?;
        trainer.settle_if_due(true)?;
        losses.push(trainer.last_loss());
    }
    let all =
        model.params.vars().iter().map(|(_, p)| p.var.as_tensor().flatten_all()).collect::<Result<Vec<_>, _>>()?;
    Ok((Tensor::cat(&all, 0)?.to_vec1::<f32>()?, losses, trainer.graphed()))
}

/// Seven steps eager and seven replayed (two warm-up steps, the capture, four replays):
/// the largest difference of a parameter, of a loss, and the losses.
fn graphed_against_eager(arch: &str, width: usize, context: usize, dropout: f64) -> Result<(f32, f64, Vec<f64>)> {
    let (eager, eager_losses, replayed) = trained(arch, width, context, dropout, false, 7)?;
    anyhow::ensure!(!replayed, "{arch}: eager_only still replayed");
    let (graphed, graphed_losses, replayed) = trained(arch, width, context, dropout, true, 7)?;
    anyhow::ensure!(replayed, "{arch} at width {width}: the training step was not captured");
    // the steps did train: finite losses that changed
    anyhow::ensure!(
        eager_losses.iter().all(|l| l.is_finite()) && eager_losses[0] != eager_losses[6],
        "{arch}: {eager_losses:?}"
    );
    let params = eager.iter().zip(&graphed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let losses = eager_losses.iter().zip(&graphed_losses).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    Ok((params, losses, eager_losses))
}

/// Several kernels sum with atomics (the layer norm's weight gradients, the embedding's
/// scatter, the gradient norm, the flash attention's dQ), whose order varies from run to run,
/// eager or not: eager runs themselves differ in last bits. So the replayed steps must match
/// the eager ones to within that rounding, far below what a stale learning rate, batch or
/// update would change (about 1e-4 of a parameter per step at these rates).
#[test]
fn a_graphed_training_step_is_the_eager_step() -> Result<()> {
    // width 64: heads of 32 (the attention's tensor path); 128: heads of 64 (the flash
    // kernels; RetNet's fused chunkwise retention, at a context longer than its chunk of 64).
    // With dropout, each replay's masks are its own step's (seeds written into the graph): a
    // stale seed would repeat the capture's masks and change every loss after it.
    for (arch, width, context, dropout) in [
        ("transformer", 64, 32, 0.0),
        ("transformer", 128, 32, 0.0),
        ("transformer", 64, 32, 0.2),
        ("transformer", 128, 32, 0.2),
        ("hyena", 64, 32, 0.0),
        ("longnet", 64, 32, 0.0),
        ("aft-simple", 64, 32, 0.1),
        ("rwkv4", 64, 32, 0.0),
        ("retnet", 128, 96, 0.0),
    ] {
        let (params, losses, eager_losses) = graphed_against_eager(arch, width, context, dropout)?;
        anyhow::ensure!(
            params < 1e-6 && losses < 1e-5,
            "{arch} at width {width}, dropout {dropout}: parameters differ by {params:e}, losses by {losses:e} ({eager_losses:?})"
        );
    }
    Ok(())
}

/// An exchange that can be captured (as NCCL's is) runs in every replayed step, not only in
/// the eager ones: a stand-in that zeroes every gradient leaves AdamW only its weight decay,
/// in the replayed steps as in the eager ones (a capture without the exchange would replay
/// real gradients; on one GPU NCCL's own average changes nothing, so this is what shows it).
#[test]
fn a_captured_step_runs_the_exchange() -> Result<()> {
    use altformers::params::ParamStore;
    use altformers::train::step::GradientSync;
    use candle_core::backprop::GradStore;
    struct Zeroes;
    impl GradientSync for Zeroes {
        fn all_reduce(&self, grads: &mut GradStore, params: &ParamStore) -> Result<()> {
            for (_, p) in params.vars() {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), g.zeros_like()?);
                }
            }
            Ok(())
        }
        fn capturable(&self) -> bool {
            true
        }
    }
    let gpu = Device::new_cuda(0)?;
    let sets = ["model.width=32", "model.depth=2", "model.heads=2", "model.context=16", "train.batch_size=4"];
    let cfg = altformers::registry::config("transformer", &altformers::config::Overrides::sets(&sets))?;
    let data: Vec<u8> = (0..4000u32).map(|i| ((i * 7919) % 251) as u8).collect();
    let task = ByteLm { split: &data, context: cfg.model.context };
    let weights = |graph: bool| -> Result<(Vec<f32>, bool)> {
        let model = Model::new(&cfg.model, 1, &gpu, DType::F32)?;
        let mut trainer = Trainer::new(&model, &cfg.train)?;
        trainer.sync = Box::new(Zeroes);
        if !graph {
            trainer.eager_only();
        }
        for step in 0..7 {
            trainer.step(&model, &task, step)?;
        }
        trainer.settle_if_due(true)?;
        let all =
            model.params.vars().iter().map(|(_, p)| p.var.as_tensor().flatten_all()).collect::<Result<Vec<_>, _>>()?;
        Ok((Tensor::cat(&all, 0)?.to_vec1::<f32>()?, trainer.graphed()))
    };
    let (eager, _) = weights(false)?;
    let (graphed, replayed) = weights(true)?;
    anyhow::ensure!(replayed, "the step with a capturable exchange was not captured");
    let worst = eager.iter().zip(&graphed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    anyhow::ensure!(worst < 1e-6, "replayed steps skipped the exchange: weights differ by {worst:e}");
    Ok(())
}

/// The peak memory the training loop reports (`bench::alloc::take_peak`: the pool's
/// high-water mark plus the CUDA graphs') counts a replayed step, whose activations and
/// gradients live in the graph's memory: over one replayed step it is at least the weights,
/// their gradients and AdamW's two moments (four f32 copies of the parameters).
#[test]
fn the_peak_memory_counts_a_replayed_step() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let sets = ["model.width=256", "model.depth=2", "model.heads=2", "model.context=64", "train.batch_size=16"];
    let cfg = altformers::registry::config("transformer", &altformers::config::Overrides::sets(&sets))?;
    let data: Vec<u8> = (0..20000u32).map(|i| ((i * 7919) % 251) as u8).collect();
    let task = ByteLm { split: &data, context: cfg.model.context };
    let model = Model::new(&cfg.model, 1, &gpu, DType::F32)?;
    let mut trainer = Trainer::new(&model, &cfg.train)?;
    for step in 0..6 {
        trainer.step(&model, &task, step)?;
        trainer.settle_if_due(true)?;
    }
    anyhow::ensure!(trainer.graphed(), "the steps were not captured");
    altformers::bench::alloc::take_peak(&gpu)?;
    trainer.step(&model, &task, 6)?;
    trainer.settle_if_due(true)?;
    let peak = altformers::bench::alloc::take_peak(&gpu)?.expect("a GPU with memory pools");
    let params = 4 * model.num_params() as u64;
    anyhow::ensure!(peak >= 4 * params, "a replayed step peaked at {peak} bytes; the parameters take {params}");
    Ok(())
}
