//! Training memory does not grow with the steps a loop keeps unread: the loss and gradient
//! norm held between reads (`train::step::Deferred`) must not keep their steps' autograd graphs, and
//! so the activations, alive; nor may a step's micro-batches (gradient accumulation) keep each
//! other's. Measured with the counting allocator the CLI installs.

use altformers::bench::alloc::CountingAlloc;
use altformers::compare::mqar::{train_and_score, MqarSettings};
use altformers::data::mqar::MqarConfig;
use altformers::train::step::SYNC_EVERY;
use candle_core::Device;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The allocator's counts are the process's: the tests measure one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn training_peak(steps: usize) -> u64 {
    let task = MqarConfig { vocab: 64, seq_len: 32, pairs: 4, alpha: 0.01 };
    let settings = MqarSettings {
        vocab: 64,
        tasks: vec![(32, 4)],
        widths: vec![32],
        depth: 2,
        steps,
        batch_size: 32,
        eval_examples: 16,
        ..Default::default()
    };
    let row = train_and_score("transformer", &task, 32, &settings, 1e-3, &Device::Cpu, 3).expect("MQAR trains");
    row.train_peak_bytes.expect("the counting allocator is installed")
}

#[test]
fn unread_steps_do_not_hold_their_activations() {
    // One step, read at once, against 100 steps: the loop logs (and reads) every 10th step, so
    // SYNC_EVERY steps are held between reads.
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(SYNC_EVERY, 10, "the step counts below assume ten held steps");
    let one = training_peak(1);
    let many = training_peak(100);
    assert!(one > 0);
    assert!(
        (many as f64) < 1.5 * one as f64,
        "peak training memory grew with the held steps: {one} bytes for 1 step, {many} for 100"
    );
}

/// Peak bytes above the level before it of one training step (after a first, which makes
/// AdamW's state) of a tiny `arch` on `rows` rows of 64 bytes, scored in `accumulate`
/// micro-batches.
fn step_peak(arch: &str, rows: usize, accumulate: usize) -> u64 {
    use altformers::config::{Overrides, TrainConfig};
    use altformers::model::Model;
    use altformers::train::step::Trainer;
    use altformers::train::task::ByteLm;
    let sets = ["model.width=64", "model.depth=2", "model.heads=2", "model.context=64", "model.dropout=0"];
    let cfg = altformers::registry::config(arch, &Overrides::sets(&sets)).expect("config");
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 37 % 251) as u8).collect();
    let task = ByteLm { split: &bytes, context: cfg.model.context };
    let model = Model::new(&cfg.model, 1, &Device::Cpu, candle_core::DType::F32).expect("model");
    let train = TrainConfig { batch_size: rows, accumulate, ..cfg.train.clone() };
    let mut trainer = Trainer::new(&model, &train).expect("trainer");
    trainer.step(&model, &task, 0).and_then(|_| trainer.settle_if_due(true)).expect("a first step");
    let peak = altformers::bench::alloc::peak_during(&Device::Cpu, || {
        trainer.step(&model, &task, 1).and_then(|_| trainer.settle_if_due(true)).map_err(candle_core::Error::wrap)
    });
    peak.expect("a step").expect("the counting allocator is installed")
}

/// Gradient accumulation (`train.accumulate`) holds one micro-batch's activations at a time:
/// a step of 32 rows in 8 micro-batches peaks near a step of 4 rows (above it by less than a
/// tenth of what 32 rows in one piece add to 4: one more set of gradients, the sums), for the
/// Transformer and RetNet (whose backward also leaves a gradient of its decay mask, a tensor
/// of the piece's graph). It failed before the pieces' losses and gradients were detached
/// (Transformer: 5.5 MB for 4 rows, 43.7 MB for 32, 31.5 MB for 32 in 8: each piece's graph
/// stayed alive through its sums).
#[test]
fn micro_batches_hold_one_micro_batch_of_activations() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for arch in ["transformer", "retnet"] {
        let (whole, micro, four) = (step_peak(arch, 32, 1), step_peak(arch, 32, 8), step_peak(arch, 4, 1));
        eprintln!("{arch}: peak of one step: 32 rows {whole} bytes, in 8 micro-batches {micro}, 4 rows {four}");
        assert!(whole > four, "{arch}: 32 rows peak at {whole} bytes, 4 rows at {four}");
        let (added, extra) = (whole - four, micro.saturating_sub(four));
        assert!(
            (extra as f64) < 0.1 * added as f64,
            "{arch}: 32 rows in 8 micro-batches peak {extra} bytes above 4 rows; in one piece {added} above"
        );
    }
}

/// The training loop's metrics carry the peak memory of the steps since the previous
/// evaluation (`peak_memory_bytes`, weights and data included), and gradient accumulation
/// lowers it: 32 rows of 64 bytes in 8 micro-batches against one piece.
#[test]
fn metrics_record_the_training_peak_and_accumulation_lowers_it() {
    use altformers::config::Overrides;
    use altformers::data::{Corpus, DataFormat};
    use altformers::train::{train, TrainOptions};
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let corpus = Corpus::load("shakespeare", DataFormat::Text).expect("the bundled corpus");
    let peak = |accumulate: usize| -> u64 {
        let sets = [
            "model.width=64".to_string(),
            "model.depth=2".to_string(),
            "model.heads=2".to_string(),
            "model.context=64".to_string(),
            "train.batch_size=32".to_string(),
            "train.steps=4".to_string(),
            "train.eval_every=2".to_string(),
            "train.eval_batches=1".to_string(),
            format!("train.accumulate={accumulate}"),
        ];
        let cfg = altformers::registry::config("transformer", &Overrides::sets(&sets)).expect("config");
        let out = std::env::temp_dir().join(format!("altformers-peak-{accumulate}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let opts = TrainOptions { peak_memory: true, ..TrainOptions::fresh(out.clone(), &Device::Cpu, false) };
        let summary = train(&cfg, &corpus, DataFormat::Text, &opts).expect("a tiny run");
        let _ = std::fs::remove_dir_all(&out);
        let peaks: Vec<Option<u64>> = summary.history.iter().map(|m| m.peak_memory_bytes).collect();
        assert!(peaks.iter().all(|p| p.is_some_and(|b| b > 0)), "{peaks:?}");
        summary.last.peak_memory_bytes.expect("measured")
    };
    let (whole, micro) = (peak(1), peak(8));
    eprintln!("training peak: {whole} bytes in one piece, {micro} in 8 micro-batches");
    assert!((micro as f64) < 0.5 * whole as f64, "{whole} bytes in one piece, {micro} in 8 micro-batches");
}
