//! Checks every architecture's tests share: modes agree, causality is exact, gradients
//! match finite differences, a tiny model memorises a batch. `tests/every_model.rs` runs them
//! over the whole registry; each mixer's own tests call them with its paper's settings.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

use crate::config::ModelConfig;
use crate::mixers::SequenceMixer;
use crate::model::Model;
use crate::rng::{stream, Rng};

/// A tiny configuration of `mixer` (width 16, 2 layers, 2 heads, context 24), with
/// `sets` applied (`key=value` as on the command line).
pub fn tiny_config(mixer: &str, sets: &[&str]) -> Result<ModelConfig> {
    let mut all = vec!["model.width=16", "model.depth=2", "model.heads=2", "model.context=24"];
    all.extend_from_slice(sets);
    Ok(crate::registry::config(mixer, &crate::config::Overrides::sets(&all))?.model)
}

/// A fresh, empty folder under the system's temporary directory, named after `tag` and this
/// process (tests running side by side never share one).
pub fn fresh_dir(tag: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("altformers-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Gaussian tensor from a seeded stream.
pub fn randn(dims: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let n = dims.iter().product();
    let v = Rng::derive(seed, stream::TEST, 0).normal_vec(n, 1.0);
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Random tokens `[B, T]`.
pub fn random_tokens(b: usize, t: usize, vocab: usize, seed: u64) -> Result<Tensor> {
    let mut rng = Rng::derive(seed, stream::TEST, 1);
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(vocab) as u32).collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

/// `max |a - b|`, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()
}

/// `max |a - b| / max |b|`, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
    ensure!(diff.is_finite(), "non-finite difference");
    Ok(diff / scale)
}

/// [`rel_err`] of a result on any device (a GPU's, say) against a reference, failing on any
/// non-finite value in the result: a NaN must never pass as close.
pub fn device_rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    ensure!(a.flatten_all()?.to_vec1::<f64>()?.iter().all(|x| x.is_finite()), "non-finite value in the result");
    rel_err(&a, &b.to_device(&Device::Cpu)?)
}

/// Recurrent form of a mixer: prefill the first `split` positions, then `step` one at a
/// time. `x: [B, T, D]` -> `[B, T, D]`.
pub fn mixer_recurrent(mixer: &dyn SequenceMixer, x: &Tensor, split: usize) -> Result<Tensor> {
    let t = x.dim(1)?;
    let mut outs = Vec::new();
    let mut state = if split > 0 {
        let (y, s) = mixer.prefill(&x.narrow(1, 0, split)?)?;
        outs.push(y);
        s
    } else {
        Default::default()
    };
    for i in split..t {
        outs.push(mixer.step(&x.narrow(1, i, 1)?, &mut state)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}

/// Relative error between a mixer's parallel form and its recurrent form (prefill of
/// `split` tokens, then steps).
pub fn mixer_modes_err(mixer: &dyn SequenceMixer, x: &Tensor, split: usize) -> Result<f64> {
    rel_err(&mixer_recurrent(mixer, x, split)?, &mixer.forward(x)?)
}

/// [`mixer_modes_err`] under 1e-4 for every prefill length in `splits`; the error names the
/// split that disagrees.
pub fn assert_mixer_modes_agree(mixer: &dyn SequenceMixer, x: &Tensor, splits: &[usize]) -> Result<()> {
    for &split in splits {
        let err = mixer_modes_err(mixer, x, split)?;
        ensure!(err < 1e-4, "mixer: recurrent form (prefill {split}, then steps) vs parallel: rel err {err}");
    }
    Ok(())
}

/// Checks that changing `x[:, t+1..]` leaves `f(x)[:, ..=t]` bit-identical, for several t.
pub fn assert_causal(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<()> {
    assert_causal_within(f, x, 0.0)
}

/// [`assert_causal`] where earlier outputs may move by `tol` times the output's largest
/// magnitude: an FFT convolution is causal as a function, yet every output's rounding depends
/// on the whole transform. In f64 a `tol` of 1e-10 still catches any leak of information.
pub fn assert_causal_within(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, tol: f64) -> Result<()> {
    let t_len = x.dim(1)?;
    let y = f(x)?;
    let scale = y.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()?;
    for t in [0, t_len / 3, t_len / 2, t_len - 2] {
        let noise = randn(x.dims(), 99 + t as u64, x.dtype())?.narrow(1, t + 1, t_len - t - 1)?;
        let x2 = Tensor::cat(&[x.narrow(1, 0, t + 1)?, (x.narrow(1, t + 1, t_len - t - 1)? + noise * 3.0)?], 1)?;
        let y2 = f(&x2)?;
        let a: Vec<f64> = y.narrow(1, 0, t + 1)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let b: Vec<f64> = y2.narrow(1, 0, t + 1)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let moved = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
        ensure!(
            moved <= tol * scale,
            "output at positions <= {t} moved by {moved:e} (scale {scale:e}) when only later inputs changed"
        );
        let later_changed = y
            .narrow(1, t + 1, t_len - t - 1)?
            .ne(&y2.narrow(1, t + 1, t_len - t - 1)?)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        ensure!(later_changed > 0.0, "later outputs did not change at all: the check would prove nothing");
    }
    Ok(())
}

/// Logits of the whole model in recurrent mode (prefill `split`, then steps) against the
/// parallel form; returns the relative error.
pub fn model_modes_err(model: &Model, tokens: &Tensor, split: usize) -> Result<f64> {
    let parallel = model.forward(tokens, None)?;
    let (mut outs, mut state) = if split > 0 {
        let (l, s) = model.prefill(&tokens.narrow(1, 0, split)?)?;
        (vec![l], s)
    } else {
        (vec![], Default::default())
    };
    for i in split..tokens.dim(1)? {
        outs.push(model.step(&tokens.i((.., i))?, &mut state)?.unsqueeze(1)?);
    }
    rel_err(&Tensor::cat(&outs, 1)?, &parallel)
}

/// [`model_modes_err`] under 1e-4 for every prefill length in `splits`; the error names the
/// split that disagrees.
pub fn assert_modes_agree(model: &Model, tokens: &Tensor, splits: &[usize]) -> Result<()> {
    for &split in splits {
        let err = model_modes_err(model, tokens, split)?;
        ensure!(err < 1e-4, "recurrent form (prefill {split}, then steps) vs parallel: rel err {err}");
    }
    Ok(())
}

/// `cfg` with bf16 activations (f32 weights) against the same weights in f32, on random
/// tokens (B 2, T 13): returns the relative error of the parallel logits and, for a causal
/// model, the mixed model's recurrent-vs-parallel error ([`model_modes_err`], prefill 4); for
/// an encoder (no recurrent form), its pooled logits over padded sequences against f32's.
pub fn mixed_precision_errs(cfg: &ModelConfig) -> Result<(f64, f64)> {
    let tokens = random_tokens(2, 13, cfg.vocab, 3)?;
    let full = Model::new(cfg, 1, &Device::Cpu, DType::F32)?;
    let mixed = Model::new(cfg, 1, &Device::Cpu, DType::F32)?.with_compute_dtype(DType::BF16);
    let forward = rel_err(&mixed.forward(&tokens, None)?, &full.forward(&tokens, None)?)?;
    let second = if full.causal() {
        model_modes_err(&mixed, &tokens, 4)?
    } else {
        let keep = keep_first(&[13, 9], 13)?;
        rel_err(&mixed.pooled_logits(&tokens, &keep, None)?, &full.pooled_logits(&tokens, &keep, None)?)?
    };
    Ok((forward, second))
}

/// A keep mask `[B, T]` (u8) of sequences of `lengths` padded at the end to `t`.
pub fn keep_first(lengths: &[usize], t: usize) -> Result<Tensor> {
    let v: Vec<u8> = lengths.iter().flat_map(|&n| (0..t).map(move |i| u8::from(i < n))).collect();
    Ok(Tensor::from_vec(v, (lengths.len(), t), &Device::Cpu)?)
}

/// An encoder's padding contract, on `tokens: [2, T]` whose second sequence is padded after
/// `real` positions: (1) the pooled logits do not move when the padded positions hold other
/// tokens; (2) they equal the unpadded sequence's, run alone; (3) with nothing padded they are
/// the mean of the per-position logits of [`Model::forward`]. Fails naming the broken one.
pub fn assert_padding_changes_nothing(model: &Model, tokens: &Tensor, real: usize) -> Result<()> {
    let (b, t) = tokens.dims2()?;
    ensure!(b == 2 && real > 0 && real < t, "two sequences, the second padded after 0 < {real} < {t} positions");
    let keep = keep_first(&[t, real], t)?;
    let pooled = model.pooled_logits(tokens, &keep, None)?;
    let other = random_tokens(2, t, model.config.vocab, 555)?;
    let repadded =
        Tensor::cat(&[tokens.i(0..1)?, Tensor::cat(&[tokens.i((1..2, ..real))?, other.i((1..2, real..))?], 1)?], 0)?;
    let moved = rel_err(&model.pooled_logits(&repadded, &keep, None)?, &pooled)?;
    ensure!(moved < 1e-6, "other tokens at padded positions moved the pooled logits by {moved:e}");
    let alone = model.pooled_logits(&tokens.i((1..2, ..real))?, &keep_first(&[real], real)?, None)?;
    let err = rel_err(&pooled.i(1..2)?, &alone)?;
    ensure!(err < 1e-5, "a padded sequence's pooled logits differ from the unpadded one's by {err:e}");
    let mean = model.forward(tokens, None)?.mean(1)?;
    let err = rel_err(&model.pooled_logits(tokens, &keep_first(&[t, t], t)?, None)?, &mean)?;
    ensure!(err < 1e-5, "pooled logits differ from the mean of the per-position logits by {err:e}");
    Ok(())
}

/// Builds `cfg` in f64 and compares the backward pass with central finite differences on a
/// few coordinates of every parameter; returns the worst relative error.
pub fn model_gradient_err(cfg: &ModelConfig, seed: u64) -> Result<f64> {
    model_gradient_err_with_step(cfg, seed, 1e-5)
}

/// [`model_gradient_err`] with finite-difference step `eps`. The loss carries ~1e-15 of f64
/// rounding noise, so the estimate's error is about 1e-15 / eps: models whose gradients at
/// initialisation are mostly under 1e-6 (deep multiplicative gating, as in Hyena) need a
/// larger step than 1e-5 for the check to measure the gradient rather than the noise.
pub fn model_gradient_err_with_step(cfg: &ModelConfig, seed: u64, eps: f64) -> Result<f64> {
    let model = Model::new(cfg, seed, &Device::Cpu, DType::F64)?;
    let tokens = random_tokens(2, cfg.context.min(12), cfg.vocab, seed)?;
    let targets = random_tokens(2, cfg.context.min(12), cfg.vocab, seed + 1)?;
    params_gradient_err(&model.params, &|| Ok(Model::loss(&model.forward(&tokens, None)?, &targets)?), seed, eps)
}

/// The backward pass of `loss` (a scalar, f64) against central finite differences with step
/// `eps` on three coordinates (drawn from `seed`) of every parameter of `store`; fails on an
/// error of 1e-4, else returns the worst relative error.
pub fn params_gradient_err(
    store: &crate::params::ParamStore,
    loss: &dyn Fn() -> Result<Tensor>,
    seed: u64,
    eps: f64,
) -> Result<f64> {
    let loss_of = || -> Result<f64> { Ok(loss()?.to_scalar::<f64>()?) };
    let grads = loss()?.backward()?;
    let mut rng = Rng::new(seed);
    let mut worst: f64 = 0.0;
    for (name, p) in store.vars() {
        let g = grads.get(p.var.as_tensor()).map(|g| g.flatten_all()).transpose()?;
        let base: Vec<f64> = p.var.as_tensor().flatten_all()?.to_vec1()?;
        // A step of at most 1% of the tensor's scale: RWKV-4's official token table is
        // U(-1e-4, 1e-4), where a 1e-4 step is as large as the values and central differences
        // through `ln0` (in its eps-dominated regime) are off by 10%.
        let rms = (base.iter().map(|v| v * v).sum::<f64>() / base.len().max(1) as f64).sqrt();
        let eps = if rms > 0.0 { eps.min(1e-2 * rms) } else { eps };
        for _ in 0..3 {
            let i = rng.below(base.len());
            let probe = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                p.var.set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu)?)?;
                loss_of()
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps);
            p.var.set(&Tensor::from_vec(base.clone(), p.var.shape(), &Device::Cpu)?)?;
            let analytic = match &g {
                Some(g) => g.i(i)?.to_scalar::<f64>()?,
                None => 0.0,
            };
            let err = (numeric - analytic).abs() / (numeric.abs() + analytic.abs()).max(1e-6);
            ensure!(err < 1e-4, "{name}[{i}]: backward {analytic:e} vs finite difference {numeric:e}");
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

/// Checks that changing `tokens[:, t+1..]` moves the logits at positions `..=t` by at most
/// `tol` times their largest magnitude (0: bit-identical), for several t, and moves later
/// ones: the whole model is causal.
pub fn assert_causal_tokens(model: &Model, tokens: &Tensor, tol: f64) -> Result<()> {
    let (b, t_len) = tokens.dims2()?;
    let y = model.forward(tokens, None)?.to_dtype(DType::F64)?;
    let scale = y.abs()?.max_all()?.to_scalar::<f64>()?;
    for t in [0, t_len / 3, t_len / 2, t_len - 2] {
        let other = random_tokens(b, t_len, model.config.vocab, 77 + t as u64)?;
        let mixed = Tensor::cat(&[tokens.narrow(1, 0, t + 1)?, other.narrow(1, t + 1, t_len - t - 1)?], 1)?;
        let y2 = model.forward(&mixed, None)?.to_dtype(DType::F64)?;
        let early = (y.narrow(1, 0, t + 1)? - y2.narrow(1, 0, t + 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        ensure!(early <= tol * scale, "logits at positions <= {t} moved by {early:e} when only later tokens changed");
        let late = (y.narrow(1, t + 1, t_len - t - 1)? - y2.narrow(1, t + 1, t_len - t - 1)?)?;
        ensure!(
            late.abs()?.max_all()?.to_scalar::<f64>()? > 0.0,
            "later logits did not move: the check proves nothing"
        );
    }
    Ok(())
}

/// Adds N(0, std^2) noise to every parameter, so that no path of a model is zero at
/// initialisation (RWKV-4's paper init zeroes its output projections, for one) and every
/// check sees every path carry signal.
pub fn perturb(model: &Model, std: f64, seed: u64) -> Result<()> {
    let mut rng = Rng::derive(seed, stream::TEST, 2);
    for (_, p) in model.params.vars() {
        let t = p.var.as_tensor();
        let noise = Tensor::from_vec(rng.normal_vec(t.elem_count(), std), t.shape(), t.device())?;
        p.var.set(&(t + noise.to_dtype(t.dtype())?)?)?;
    }
    Ok(())
}

/// Can a tiny model memorise one batch? Trains `cfg` (f32) for `steps` AdamW steps at
/// learning rate `lr` on one fixed batch of 2 x 16 random tokens; returns the loss before the
/// first step and after the last. (A broken gradient path or a dead initialisation shows up
/// as a loss that barely moves.)
pub fn overfit(cfg: &ModelConfig, steps: usize, lr: f64) -> Result<(f64, f64)> {
    let model = Model::new(cfg, 5, &Device::Cpu, DType::F32)?;
    let t = cfg.context.min(16);
    let x = random_tokens(2, t, cfg.vocab, 21)?;
    let y = random_tokens(2, t, cfg.vocab, 22)?;
    let mut opt = crate::train::optim::AdamW::new(&model.params, 0.9, 0.99, 1e-8, 0.0)?;
    let loss_now = || -> Result<f64> { Ok(Model::loss(&model.forward(&x, None)?, &y)?.to_scalar::<f32>()? as f64) };
    let first = loss_now()?;
    for _ in 0..steps {
        let loss = Model::loss(&model.forward(&x, None)?, &y)?;
        opt.step(&loss.backward()?, lr, 1.0)?;
    }
    Ok((first, loss_now()?))
}

/// Checks the gradients of a scalar function of several tensors (f64) against central finite
/// differences with step `eps`: every coordinate of a small input, six spread over a large
/// one. The error `|numeric - backward| / max(|numeric| + |backward|, 1e-6)` must stay under
/// `tol`; the error names the input and coordinate that disagree.
pub fn assert_gradients(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    eps: f64,
    tol: f64,
) -> Result<()> {
    let vars = inputs.iter().map(candle_core::Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&tensors)?.backward()?;
    for (k, var) in vars.iter().enumerate() {
        let base: Vec<f64> = var.flatten_all()?.to_vec1()?;
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; base.len()],
        };
        let n = base.len();
        let coords: Vec<usize> = if n <= 64 { (0..n).collect() } else { (0..6).map(|i| i * (n - 1) / 5).collect() };
        for i in coords {
            let probe = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let mut moved = tensors.clone();
                moved[k] = Tensor::from_vec(v, var.shape(), var.device())?;
                Ok(f(&moved)?.to_scalar::<f64>()?)
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs() / (numeric.abs() + analytic[i].abs()).max(1e-6);
            ensure!(err < tol, "input {k}[{i}]: backward {:e} vs finite difference {numeric:e}", analytic[i]);
        }
    }
    Ok(())
}
