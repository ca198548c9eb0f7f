//! Reformer's LSH attention kernel on one fixed chunk plan, GPU against CPU. The hashing
//! itself is an argmax, a discrete decision that bf16 rounding flips near a tie (a token then
//! attends to other keys: a legitimate difference, not an error), so the whole-model
//! comparison in `models.rs` cannot hold Reformer's bf16 logits to a tolerance. Here the plan
//! is made once, on the CPU, from f32 keys, and both devices attend by it.

use altformers::mixers::reformer::{attend, hash, normalized_keys, plan, plan_bidirectional};
use altformers::testing::randn;
use candle_core::{DType, Device, Tensor};

#[test]
fn lsh_attention_by_one_plan_on_the_gpu_matches_the_cpu() -> anyhow::Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (b, h, t, dh, rounds, n_buckets, chunk) = (2, 2, 40, 16, 2, 4, 8);
    // x = [q; v]: queries (the keys are their normalised copies, shared QK) and values
    let x = randn(&[2, b, h, t, dh], 5, DType::F32)?;
    let r = randn(&[b, h, t, dh], 6, DType::F32)?;
    let rotations = randn(&[dh, rounds * n_buckets / 2], 7, DType::F32)?;
    let buckets = hash(&normalized_keys(&x.get(0)?)?, &rotations, rounds)?;
    let keep: Vec<u8> = (0..b * t).map(|i| u8::from(i % t < [t, 27][i / t])).collect();
    let plans = [
        ("causal", plan(&buckets, b * h, rounds, t, 0, chunk, n_buckets)),
        ("bidirectional", plan_bidirectional(&buckets, b * h, rounds, t, chunk, n_buckets, Some((&keep, h)))),
    ];
    for (label, p) in &plans {
        let f = |x: &Tensor| {
            let q = x.get(0)?;
            attend(&q, &normalized_keys(&q)?, &x.get(1)?, p, None)
        };
        super::gpu_matches_cpu(&f, &x, &r, &gpu, &format!("LSH attention, {label} plan"))?;
    }
    Ok(())
}
