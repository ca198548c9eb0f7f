//! The fused flash-attention kernel (forward and backward) against the reference tensor
//! expression computed in f32 on the CPU from the same bf16-rounded inputs. Needs a CUDA GPU
//! (sm_90); built and packed by scripts/gpu-package.sh.
use altformers::ops::attention::cuda::{self as flash_attention, AttentionKernel, Direction, Kernels};
use altformers::ops::attention::{causal_attention_reference, causal_attention_with_dropout};
use altformers::ops::dropout::draw;
use altformers::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};

/// Seeded standard normal values (splitmix64 + Box-Muller), so every run sees the same inputs.
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform().max(1e-300), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// A bf16 CPU tensor of seeded normal values.
fn random_bf16(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(normal(n, seed), shape, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()
}

/// Fills and frees a large NaN buffer, so that memory handed out next (the kernels' outputs,
/// which are not zeroed) holds NaN wherever a kernel fails to write.
fn poison_allocator(dev: &Device) {
    drop(Tensor::full(f32::NAN, 64 << 20, dev).unwrap());
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let want = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let (g, w) = (got.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
    assert_eq!(g.len(), w.len(), "{name}: length");
    assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite values in the fused result");
    let max_ref = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let err_sq: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let ref_sq: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (err_sq / ref_sq.max(1e-30)).sqrt();
    assert!(max_err <= 2e-2 * max_ref + 1e-2, "{name}: max abs error {max_err} (max |ref| {max_ref})");
    // A reference that is zero up to rounding (dq at T = 1: one key, softmax weight 1, so
    // dq = dO.v - rowsum(dO * O) vanishes) has no relative error to speak of; the absolute
    // bound above covers it.
    if max_ref > 1e-3 {
        assert!(rel < 1e-2, "{name}: relative Frobenius error {rel}");
    }
}

/// Fused forward and gradients on the GPU vs the f32 CPU reference, for `q: [B, H, T, dh]`,
/// `k, v: [B, KVH, offset + T, dh]`.
fn check(b: usize, h: usize, kvh: usize, t: usize, offset: usize, dh: usize) {
    check_with(b, h, kvh, t, offset, dh, Kernels::both(AttentionKernel::MmaSync), 0.0)
}

/// [`check`] with the kernels named and dropout `p` on the probabilities (the reference and the
/// kernel drawing their mask from the same seed).
#[allow(clippy::too_many_arguments)]
fn check_with(b: usize, h: usize, kvh: usize, t: usize, offset: usize, dh: usize, kernels: Kernels, p: f64) {
    let case = format!("B {b} H {h} KVH {kvh} T {t} offset {offset} dh {dh} {kernels:?} dropout {p}");
    let s = offset + t;
    let seed = (b * 1_000_003 + h * 10_007 + kvh * 1009 + t * 101 + offset * 7 + dh) as u64;
    let q = random_bf16((b, h, t, dh), seed);
    let k = random_bf16((b, kvh, s, dh), seed + 1);
    let v = random_bf16((b, kvh, s, dh), seed + 2);
    let grad = random_bf16((b, h, t, dh), seed + 3);

    let f32_var = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
    let (qr, kr, vr) = (f32_var(&q), f32_var(&k), f32_var(&v));
    let out_ref = causal_attention_reference(&qr, &kr, &vr, offset, Some((p, &mut Rng::new(seed)))).unwrap();
    let grads_ref = (&out_ref * grad.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();

    let dev = Device::new_cuda(0).unwrap();
    let on_gpu = |x: &Tensor| Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
    let (qg, kg, vg) = (on_gpu(&q), on_gpu(&k), on_gpu(&v));
    assert!(flash_attention::supports(&qg, &kg, &vg), "{case}: fused kernel should apply");
    poison_allocator(&dev);
    let dropout = draw(p, &mut Rng::new(seed)).unwrap();
    let out = flash_attention::causal_attention_with(&qg, &kg, &vg, offset, kernels, dropout, 0).unwrap();
    assert_close(&format!("{case}: output"), &out, &out_ref);
    let grad_gpu = grad.to_device(&dev).unwrap().to_dtype(DType::F32).unwrap();
    poison_allocator(&dev);
    let grads = (out.to_dtype(DType::F32).unwrap() * grad_gpu).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var, var_ref) in [("dq", &qg, &qr), ("dk", &kg, &kr), ("dv", &vg, &vr)] {
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: no {name}"));
        let want = grads_ref.get(var_ref.as_tensor()).unwrap_or_else(|| panic!("{case}: no reference {name}"));
        assert_close(&format!("{case}: {name}"), got, want);
    }
}

#[test]
fn matches_reference_short_sequences() {
    for dh in [64, 128] {
        for kvh in [4, 2, 1] {
            for t in [1, 17, 128] {
                check(2, 4, kvh, t, 0, dh);
            }
        }
    }
}

#[test]
fn matches_reference_long_sequences() {
    for dh in [64, 128] {
        for kvh in [4, 2, 1] {
            check(2, 4, kvh, 1000, 0, dh);
        }
    }
    check(2, 4, 2, 2048, 0, 128);
    check(2, 4, 1, 2048, 0, 64);
}

/// The wgmma kernels at head width `dh` (the forward at 64 and 128, the backward at 64; asked
/// for where there is none, `mma.sync` runs) against the reference: grouped heads, ragged
/// lengths (one key block, a block and a bit, many), offsets.
fn check_wgmma(dh: usize) {
    let wgmma = Kernels::both(AttentionKernel::Wgmma);
    for kvh in [4, 2, 1] {
        for t in [1, 17, 128, 130, 1000] {
            check_with(2, 4, kvh, t, 0, dh, wgmma, 0.0);
        }
    }
    check_with(2, 4, 2, 2048, 0, dh, wgmma, 0.0);
    check_with(2, 4, 2, 17, 100, dh, wgmma, 0.0);
    check_with(2, 4, 1, 1, 299, dh, wgmma, 0.0);
    check_with(2, 4, 4, 130, 70, dh, wgmma, 0.0);
    check_with(2, 4, 4, 200, 60, dh, wgmma, 0.0);
}

#[test]
fn wgmma_matches_reference_width_128() {
    check_wgmma(128);
}

#[test]
fn wgmma_matches_reference_width_64() {
    check_wgmma(64);
}

/// Dropout on the probabilities inside the kernels draws the unfused path's mask: forward and
/// gradients match the reference given the same seed (the wgmma forward has no dropout: the
/// `mma.sync` forward runs; the wgmma backward has it), at both widths, grouped heads, ragged
/// lengths and an offset.
#[test]
fn dropout_matches_reference() {
    for dh in [64, 128] {
        for kvh in [4, 1] {
            for t in [17, 130, 1000] {
                check_with(2, 4, kvh, t, 0, dh, Kernels::both(AttentionKernel::Auto), 0.2);
            }
        }
        check_with(2, 4, 2, 17, 100, dh, Kernels::both(AttentionKernel::MmaSync), 0.5);
        check_with(2, 4, 2, 17, 100, dh, Kernels::both(AttentionKernel::Wgmma), 0.5);
    }
}

#[test]
fn matches_reference_with_offset() {
    for dh in [64, 128] {
        // prefill after a cache, and single-token decoding
        check(2, 4, 2, 17, 100, dh);
        check(2, 4, 1, 1, 299, dh);
        check(2, 4, 4, 130, 70, dh);
    }
}

#[test]
fn mixer_entry_point_dispatches_to_fused() {
    let dev = Device::new_cuda(0).unwrap();
    let q = random_bf16((2, 4, 65, 64), 1).to_device(&dev).unwrap();
    let k = random_bf16((2, 2, 65, 64), 2).to_device(&dev).unwrap();
    let v = random_bf16((2, 2, 65, 64), 3).to_device(&dev).unwrap();
    let via_mixer = causal_attention_with_dropout(&q, &k, &v, 0, None).unwrap();
    let fused = flash_attention::causal_attention(&q, &k, &v, 0, None, 0).unwrap();
    let diff = (via_mixer.to_dtype(DType::F32).unwrap() - fused.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "the mixer's causal attention should be the fused kernel for bf16 on CUDA");
}

/// The attention mixer's operands are views of one token-major projection (rows 3 H d_h
/// apart): the kernels read them in place and give what they give on contiguous copies,
/// forward and gradients, every kernel.
#[test]
fn views_of_a_projection_are_read_in_place() {
    let dev = Device::new_cuda(0).unwrap();
    for dh in [64, 128] {
        for kernel in [AttentionKernel::MmaSync, AttentionKernel::Wgmma] {
            views_are_read_in_place(&dev, dh, Kernels::both(kernel));
        }
    }
}

fn views_are_read_in_place(dev: &Device, dh: usize, kernels: Kernels) {
    let (b, t, h) = (2, 130, 4);
    let qkv = Var::from_tensor(
        &random_bf16((b, t, 3, h * dh), 21).reshape((b, t, 3 * h * dh)).unwrap().to_device(dev).unwrap(),
    )
    .unwrap();
    let heads = |x: &Tensor, i: usize| {
        x.narrow(2, i * h * dh, h * dh).unwrap().reshape((b, t, h, dh)).unwrap().transpose(1, 2).unwrap()
    };
    let grad = random_bf16((b, h, t, dh), 22).to_device(dev).unwrap().to_dtype(DType::F32).unwrap();
    let run = |copy: bool| {
        let x = qkv.as_tensor();
        let [q, k, v] = [0, 1, 2].map(|i| if copy { heads(x, i).contiguous().unwrap() } else { heads(x, i) });
        let out = flash_attention::causal_attention_with(&q, &k, &v, 0, kernels, None, 0).unwrap();
        let grads = (out.to_dtype(DType::F32).unwrap() * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x).unwrap().to_dtype(DType::F32).unwrap();
        (out.to_dtype(DType::F32).unwrap(), dx)
    };
    let ((out_views, dx_views), (out_copies, dx_copies)) = (run(false), run(true));
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff(&out_views, &out_copies), 0.0, "dh {dh} {kernels:?}: output");
    assert_eq!(diff(&dx_views, &dx_copies), 0.0, "dh {dh} {kernels:?}: projection gradient");
}

/// Attention over a fused projection's output as one operand (`causal_attention_packed`: the
/// blocks read in place, the gradient written by the kernels as one tensor) gives exactly what
/// the three blocks as views give, forward and the projection's gradient: both kernel families,
/// both widths, grouped heads, with and without dropout.
#[test]
fn a_packed_projection_matches_its_blocks() {
    let dev = Device::new_cuda(0).unwrap();
    for dh in [64, 128] {
        for kernel in [AttentionKernel::MmaSync, AttentionKernel::Wgmma] {
            for p in [0.0, 0.3] {
                packed_matches_blocks(&dev, dh, Kernels::both(kernel), p);
            }
        }
    }
}

fn packed_matches_blocks(dev: &Device, dh: usize, kernels: Kernels, p: f64) {
    let (b, t, h, kvh) = (2, 130, 4, 2);
    let width = (h + 2 * kvh) * dh;
    let on_gpu = |x: Tensor| x.reshape((b, t, x.elem_count() / (b * t))).unwrap().to_device(dev).unwrap();
    let qkv = Var::from_tensor(&on_gpu(random_bf16((b, t, 1, width), 31))).unwrap();
    let grad = on_gpu(random_bf16((b, t, 1, h * dh), 32)).to_dtype(DType::F32).unwrap();
    let block = |x: &Tensor, start: usize, n: usize| {
        x.narrow(2, start * dh, n * dh).unwrap().reshape((b, t, n, dh)).unwrap().transpose(1, 2).unwrap()
    };
    let run = |packed: bool| {
        let x = qkv.as_tensor();
        poison_allocator(dev);
        let dropout = draw(p, &mut Rng::new(9)).unwrap();
        let out = if packed {
            flash_attention::causal_attention_packed(x, h, kvh, kernels, dropout, 0).unwrap()
        } else {
            let (q, k, v) = (block(x, 0, h), block(x, h, kvh), block(x, h + kvh, kvh));
            let y = flash_attention::causal_attention_with(&q, &k, &v, 0, kernels, dropout, 0).unwrap();
            y.transpose(1, 2).unwrap().reshape((b, t, h * dh)).unwrap()
        };
        let out = out.to_dtype(DType::F32).unwrap();
        let grads = (&out * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        (out, grads.get(x).unwrap().to_dtype(DType::F32).unwrap())
    };
    let ((out_packed, dx_packed), (out_blocks, dx_blocks)) = (run(true), run(false));
    let case = format!("dh {dh} {kernels:?} dropout {p}");
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let total = |x: &Tensor| x.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    for (name, x) in [("output", &out_packed), ("gradient", &dx_packed)] {
        assert!(total(x).is_finite() && total(x) > 0.0, "{case}: {name} unwritten or not finite");
    }
    assert_eq!(diff(&out_packed, &out_blocks), 0.0, "{case}: output");
    assert_eq!(diff(&dx_packed, &dx_blocks), 0.0, "{case}: projection gradient");
}

/// On Hopper the default forward at widths 64 and 128 and the default backward at width 64 are
/// the wgmma kernels; the backward at 128 and the explicit choice `mma` stay on `mma.sync`.
#[test]
fn default_kernels_are_wgmma_on_hopper() {
    let Device::Cuda(dev) = Device::new_cuda(0).unwrap() else { unreachable!() };
    let (major, minor) = dev.cuda_stream().context().compute_capability().unwrap();
    let want = if (major, minor) == (9, 0) { AttentionKernel::Wgmma } else { AttentionKernel::MmaSync };
    let (auto, mma) = (AttentionKernel::Auto, AttentionKernel::MmaSync);
    assert_eq!(auto.resolve(&dev, 128, Direction::Forward).unwrap(), want);
    assert_eq!(auto.resolve(&dev, 64, Direction::Backward).unwrap(), want);
    assert_eq!(auto.resolve(&dev, 64, Direction::Forward).unwrap(), want);
    assert_eq!(auto.resolve(&dev, 128, Direction::Backward).unwrap(), mma);
    assert_eq!(mma.resolve(&dev, 128, Direction::Forward).unwrap(), mma);
    assert_eq!(mma.resolve(&dev, 64, Direction::Backward).unwrap(), mma);
}

/// More sequences than the grid's batch axis holds (65535): MegaByte's local model at 16 x
/// 64K bytes runs 131072 patches of 8. The entry point slices the batch; forward and
/// gradients still match the reference.
#[test]
fn batches_beyond_the_grid_limit_are_sliced() {
    for p in [0.0, 0.3] {
        sliced_batch(p);
    }
}

/// B = 65538 through the sliced entry point against the reference, with dropout `p` (the
/// slices' masks must continue the whole batch's).
fn sliced_batch(p: f64) {
    let (b, h, t, dh) = (65_535 + 3, 1, 8, 64);
    let q = random_bf16((b, h, t, dh), 11);
    let k = random_bf16((b, h, t, dh), 12);
    let v = random_bf16((b, h, t, dh), 13);
    let f32_var = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
    let (qr, kr, vr) = (f32_var(&q), f32_var(&k), f32_var(&v));
    let out_ref = causal_attention_reference(&qr, &kr, &vr, 0, Some((p, &mut Rng::new(5)))).unwrap();
    let grads_ref = out_ref.sum_all().unwrap().backward().unwrap();
    let dev = Device::new_cuda(0).unwrap();
    let on_gpu = |x: &Tensor| Var::from_tensor(&x.to_device(&dev).unwrap()).unwrap();
    let (qg, kg, vg) = (on_gpu(&q), on_gpu(&k), on_gpu(&v));
    let out = flash_attention::causal_attention(&qg, &kg, &vg, 0, draw(p, &mut Rng::new(5)).unwrap(), 0).unwrap();
    assert_close(&format!("B 65538 dropout {p}: output"), &out, &out_ref);
    let grads = out.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var, var_ref) in [("dq", &qg, &qr), ("dk", &kg, &kr), ("dv", &vg, &vr)] {
        assert_close(
            &format!("B 65538 dropout {p}: {name}"),
            grads.get(var.as_tensor()).unwrap(),
            grads_ref.get(var_ref.as_tensor()).unwrap(),
        );
    }
}

/// A data-parallel worker's slice of the batch (`Rng::for_shard`) draws its sequences' part of
/// the whole batch's mask: the fused kernel on sequences 2..4 as shard 1 of 2 gives the
/// reference's rows for those sequences of the whole batch.
#[test]
fn a_workers_slice_draws_its_part_of_the_whole_batch_mask() {
    let (b, h, t, dh) = (4, 2, 32, 64);
    let [q, k, v] = [21, 22, 23].map(|s| random_bf16((b, h, t, dh), s));
    let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let whole = causal_attention_reference(&f32_of(&q), &f32_of(&k), &f32_of(&v), 0, Some((0.3, &mut Rng::new(7))))
        .unwrap()
        .narrow(0, 2, 2)
        .unwrap();
    let dev = Device::new_cuda(0).unwrap();
    let slice = |x: &Tensor| x.narrow(0, 2, 2).unwrap().to_device(&dev).unwrap();
    let mut rng = Rng::new(7).for_shard(1);
    let part = causal_attention_with_dropout(&slice(&q), &slice(&k), &slice(&v), 0, Some((0.3, &mut rng))).unwrap();
    assert_close("shard 1 of a batch of 4, dropout 0.3", &part, &whole);
}
