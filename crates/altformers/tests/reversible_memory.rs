//! Reformer's reversible layers: peak training memory (forward and backward of one batch)
//! does not grow with depth, while ordinary backpropagation through the same network
//! (`model.options.reversible=false`) grows with every layer. Measured with the counting
//! allocator the CLI installs. Prints the figures (`-- --nocapture`).

use altformers::bench::alloc::{peak_during, CountingAlloc};
use altformers::model::Model;
use altformers::testing::{random_tokens, tiny_config};
use candle_core::{DType, Device};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Peak bytes allocated during the forward and backward pass of one batch (B 4, T 128).
fn training_peak(depth: usize, reversible: bool) -> u64 {
    let depth = format!("model.depth={depth}");
    let reversible = format!("model.options.reversible={reversible}");
    let sets = [
        "model.width=32",
        "model.heads=2",
        "model.context=128",
        "model.options.chunk=16",
        "model.options.n_buckets=8",
        "model.options.ffn_chunk=32",
        depth.as_str(),
        reversible.as_str(),
    ];
    let cfg = tiny_config("reformer", &sets).expect("a valid configuration");
    let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32).expect("the model builds");
    let tokens = random_tokens(4, 128, cfg.vocab, 1).expect("tokens");
    let targets = random_tokens(4, 128, cfg.vocab, 2).expect("targets");
    peak_during(&Device::Cpu, || {
        let loss = Model::loss(&model.forward(&tokens, None)?, &targets)?;
        let grads = loss.backward()?;
        drop(grads);
        Ok(())
    })
    .expect("forward and backward")
    .expect("the counting allocator is installed")
}

#[test]
fn reversible_training_memory_is_flat_in_depth() {
    let depths = [2, 4, 8];
    // the first pass also allocates what lives for the process (thread pools, caches)
    training_peak(2, false);
    let reversible: Vec<u64> = depths.iter().map(|&d| training_peak(d, true)).collect();
    let ordinary: Vec<u64> = depths.iter().map(|&d| training_peak(d, false)).collect();
    for ((d, r), o) in depths.iter().zip(&reversible).zip(&ordinary) {
        println!("depth {d}: reversible {:.2} MB, ordinary backpropagation {:.2} MB", *r as f64 / 1e6, *o as f64 / 1e6);
    }
    // ordinary backpropagation keeps every layer's activations: the measurement sees them
    assert!(
        ordinary[2] as f64 > 2.5 * ordinary[0] as f64,
        "ordinary backpropagation should grow with depth: {ordinary:?}"
    );
    // the recomputing backward holds one layer's graph at a time: what grows with depth is
    // the parameters' own (their gradients, the flat copy the op takes), under a tenth of what
    // ordinary backpropagation adds
    let (grown, grown_ordinary) =
        (reversible[2] as f64 - reversible[0] as f64, ordinary[2] as f64 - ordinary[0] as f64);
    assert!(
        grown < 0.1 * grown_ordinary,
        "reversible peak grew with depth: {reversible:?} bytes at depths {depths:?} (ordinary: {ordinary:?})"
    );
}
