//! Training memory does not grow with the steps a loop keeps unread: the loss and gradient
//! norm held between reads (`train::step::Deferred`) must not keep their steps' autograd graphs, and
//! so the activations, alive. Measured with the counting allocator the CLI installs.

use altformers::bench::alloc::CountingAlloc;
use altformers::compare::mqar::{train_and_score, MqarSettings};
use altformers::data::mqar::MqarConfig;
use altformers::train::step::SYNC_EVERY;
use candle_core::Device;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

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
    assert_eq!(SYNC_EVERY, 10, "the step counts below assume ten held steps");
    let one = training_peak(1);
    let many = training_peak(100);
    assert!(one > 0);
    assert!(
        (many as f64) < 1.5 * one as f64,
        "peak training memory grew with the held steps: {one} bytes for 1 step, {many} for 100"
    );
}
