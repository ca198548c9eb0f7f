//! AFT-full's blocked form: peak training memory (forward and backward of one batch) grows
//! linearly with the sequence length, while one block as long as the sequence (the pairwise
//! form's `[B, T, T]` weights) grows quadratically. Measured with the counting allocator the
//! CLI installs. Prints the figures (`-- --nocapture`).

use altformers::bench::alloc::{peak_during, CountingAlloc};
use altformers::model::Model;
use altformers::testing::{random_tokens, tiny_config};
use candle_core::{DType, Device};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Peak bytes allocated during the forward and backward pass of one sequence of `t` bytes,
/// the keys in blocks of `block`.
fn training_peak(t: usize, block: usize) -> u64 {
    let (context, block) = (format!("model.context={t}"), format!("model.options.block={block}"));
    let sets = ["model.width=32", "model.heads=2", "model.depth=1", "model.options.rank=16", &context, &block];
    let cfg = tiny_config("aft-full", &sets).expect("a valid configuration");
    let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32).expect("the model builds");
    let tokens = random_tokens(1, t, cfg.vocab, 1).expect("tokens");
    let targets = random_tokens(1, t, cfg.vocab, 2).expect("targets");
    peak_during(&Device::Cpu, || {
        let loss = Model::loss(&model.forward(&tokens, None)?, &targets)?;
        drop(loss.backward()?);
        Ok(())
    })
    .expect("forward and backward")
    .expect("the counting allocator is installed")
}

#[test]
fn aft_full_training_memory_is_linear_in_length() {
    // the first pass also allocates what lives for the process (thread pools, caches)
    training_peak(256, 64);
    let lengths = [512, 1024, 2048];
    let blocked: Vec<u64> = lengths.iter().map(|&t| training_peak(t, 64)).collect();
    let whole: Vec<u64> = lengths.iter().map(|&t| training_peak(t, t)).collect();
    for ((t, b), w) in lengths.iter().zip(&blocked).zip(&whole) {
        println!("T {t}: blocks of 64 {:.2} MB, one block {:.2} MB", *b as f64 / 1e6, *w as f64 / 1e6);
    }
    // one block of T x T: the measurement sees the quadratic term (9.8x from T 512 to 2048
    // when written, the linear terms still a third of the peak at 512)
    assert!(whole[2] as f64 > 7.0 * whole[0] as f64, "one block should grow as T^2: {whole:?}");
    // blocks of 64: doubling T at most doubles the peak, and a bit (the per-block terms)
    for pair in blocked.windows(2) {
        assert!((pair[1] as f64) < 2.5 * pair[0] as f64, "blocked peak grew faster than T: {blocked:?}");
    }
}
