//! The contract, over the whole registry: an architecture added to it is held to all of this
//! with no edit here. Its forms agree (parallel, recurrent, chunkwise where defined), a causal
//! one is exactly causal, its gradients match finite differences (f64), bf16 activations stay
//! close to f32, a tiny model memorises a batch, saved weights reload to identical logits
//! (also into a model for inference, which records no graph), a decoding state keeps no
//! autograd history, and it goes through every benchmark and a training run. An encoder (`causal: false`) instead sees later tokens, refuses the
//! recurrent form, language-model training and generation by name, leaves what padded
//! positions hold without effect, and trains on ListOps. Each architecture's own file keeps
//! only its paper-specific tests.

use altformers::bench::{decode, scaling};
use altformers::data::{Corpus, DataFormat};
use altformers::model::Model;
use altformers::registry::ARCHITECTURES;
use altformers::testing::{self, randn, random_tokens, rel_err, tiny_config};
use altformers::train::{train, TrainOptions};
use candle_core::{DType, Device, Tensor};

#[test]
fn every_model_meets_the_contract() -> anyhow::Result<()> {
    for arch in ARCHITECTURES {
        let name = arch.name;
        let cfg = tiny_config(name, &[])?;
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        testing::perturb(&model, 0.05, 1)?;

        let tokens = random_tokens(2, 13, cfg.vocab, 5)?;
        if arch.causal {
            // Forms agree: the recurrent form (prefill, then steps) against the parallel one.
            testing::assert_modes_agree(&model, &tokens, &[0, 5]).map_err(|e| e.context(name))?;
        } else {
            encoder_contract(&model, &tokens).map_err(|e| e.context(name))?;
        }
        // The mixer alone, chunkwise (chunks of 4 over 13 positions) where it has that form.
        if let Some(build) = arch.mixer {
            let pb = altformers::params::ParamBuilder::new(2, &Device::Cpu, DType::F32);
            let mixer = build(&cfg, 0, &pb)?;
            let x = randn(&[2, 13, cfg.width], 3, DType::F32)?;
            if let Some(chunked) = mixer.chunked(&x, 4) {
                let e = rel_err(&chunked?, &mixer.forward(&x)?)?;
                assert!(e < 1e-4, "{name}: chunkwise vs parallel: {e}");
            }
        }
        // Causality in f64, every weight perturbed so every path carries signal: no later
        // token moves an earlier logit beyond rounding (an FFT convolution is causal as a
        // function but not bit for bit; each file asserts bit-exactness where its forms have it).
        if arch.causal {
            let model64 = Model::new(&cfg, 1, &Device::Cpu, DType::F64)?;
            testing::perturb(&model64, 0.05, 1)?;
            testing::assert_causal_tokens(&model64, &tokens, 1e-10).map_err(|e| e.context(name))?;
        }

        // An encoder's pooled form over padded sequences, differentiated: against central
        // differences in f64 too.
        if !arch.causal {
            let e = pooled_gradient_err(&cfg)?;
            assert!(e < 1e-4, "{name}: pooled gradient vs finite differences: {e}");
        }
        // Gradients against central differences in f64 (a step of 1e-4: deep multiplicative
        // gating has gradients near 1e-6 at initialisation, under a 1e-5 step's noise).
        let e = testing::model_gradient_err_with_step(&cfg, 7, 1e-4)?;
        assert!(e < 1e-4, "{name}: gradient vs finite differences: {e}");

        // bf16 activations (f32 weights) against f32, in both forms.
        let (forward, modes) = testing::mixed_precision_errs(&cfg)?;
        assert!(forward < 0.05 && modes < 0.05, "{name}: bf16 vs f32 {forward}, bf16 modes {modes}");

        // A tiny model memorises one batch.
        let (first, last) = testing::overfit(&cfg, 50, 3e-3)?;
        assert!(last < 0.5 * first, "{name}: overfitting one batch took the loss from {first} to {last} only");

        // Saved weights reload into a differently seeded model with identical logits.
        let file = std::env::temp_dir().join(format!("altformers-contract-{name}-{}.safetensors", std::process::id()));
        model.params.save(&file)?;
        let other = Model::new(&cfg, 99, &Device::Cpu, DType::F32)?;
        other.load_weights(&file)?;
        // ... and into a model for inference, which computes the same logits without
        // recording a gradient graph (a long prefill then holds one layer at a time)
        let frozen = Model::for_inference(&cfg, 99, &Device::Cpu, DType::F32)?;
        frozen.load_weights(&file)?;
        std::fs::remove_file(&file)?;
        let (a, b) = (model.forward(&tokens, None)?, other.forward(&tokens, None)?);
        assert_eq!((&a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{name}: reloaded logits differ");
        let c = frozen.forward(&tokens, None)?;
        assert!(a.track_op() && !c.track_op(), "{name}: the inference model records a graph");
        assert_eq!((&a - c)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{name}: inference logits differ");
        if arch.causal {
            let ((p, _), (q, _)) = (model.prefill(&tokens)?, frozen.prefill(&tokens)?);
            assert!(!q.track_op(), "{name}: the inference model's prefill records a graph");
            assert_eq!((p - q)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{name}: inference prefill differs");
        }

        // Decoding keeps no autograd history in its state (else memory grows per token).
        if !arch.causal {
            assert_forward_at_picks_rows(&model, name)?;
            continue;
        }
        let (_, mut state) = model.prefill(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?)?;
        assert!(!state.tracks_graph(), "{name}: prefill state records its history");
        for token in [4u32, 5] {
            model.step(&Tensor::new(&[token], &Device::Cpu)?, &mut state)?;
        }
        assert!(!state.tracks_graph(), "{name}: decode state records its history");
        assert!(state.bytes() > 0, "{name}: a decoding state of no bytes");

        assert_forward_at_picks_rows(&model, name)?;
    }
    Ok(())
}

/// Logits at chosen rows (the recall suite's loss) are those rows of the full forward.
fn assert_forward_at_picks_rows(model: &Model, name: &str) -> anyhow::Result<()> {
    let tokens = Tensor::new(&[[1u32, 7, 3, 9], [4, 4, 2, 8]], &Device::Cpu)?;
    let rows = Tensor::new(&[6u32, 1, 3], &Device::Cpu)?;
    let full = model.forward(&tokens, None)?.flatten_to(1)?.index_select(&rows, 0)?;
    let picked = model.forward_at(&tokens, &rows)?;
    let diff = (full - picked)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{name}: forward_at differs from forward by {diff}");
    Ok(())
}

/// The worst error of the backward pass of a pooled classification loss (sequences of 12 and
/// 7 tokens padded to 12) against finite differences, in f64, with a step of 1e-5: at 1e-4
/// the truncation error of M2-BERT's sine filters (frequency 10) reaches 1e-4 of a gradient
/// of 1e-5 (measured; the error falls with the step squared, as truncation does).
fn pooled_gradient_err(cfg: &altformers::config::ModelConfig) -> anyhow::Result<f64> {
    let model = Model::new(cfg, 7, &Device::Cpu, DType::F64)?;
    // perturbed, so no gated path's gradient sits at the finite differences' noise floor
    testing::perturb(&model, 0.05, 3)?;
    let tokens = random_tokens(2, 12, cfg.vocab, 8)?;
    let keep = testing::keep_first(&[12, 7], 12)?;
    let targets = Tensor::new(&[3u32, 250], &Device::Cpu)?;
    let loss = || -> anyhow::Result<Tensor> {
        Ok(candle_nn::loss::cross_entropy(&model.pooled_logits(&tokens, &keep, None)?, &targets)?)
    };
    testing::params_gradient_err(&model.params, &loss, 7, 1e-5)
}

/// What an encoder owes in place of the recurrent and causal checks: later tokens do move
/// earlier logits (its mixers see the whole sequence); prefill, step, generation and language-
/// model training are refused with a message naming it an encoder; padding changes nothing.
fn encoder_contract(model: &Model, tokens: &Tensor) -> anyhow::Result<()> {
    let name = &model.config.architecture;
    let seen = testing::assert_causal_tokens(model, tokens, 1e-10).expect_err("an encoder that is causal");
    anyhow::ensure!(seen.to_string().contains("moved"), "{seen}");
    let named = |e: anyhow::Error| -> anyhow::Result<()> {
        let e = format!("{e:#}");
        anyhow::ensure!(e.contains(name.as_str()) && e.contains("encoder"), "the refusal does not say why: {e}");
        Ok(())
    };
    named(model.prefill(tokens).expect_err("prefill refused").into())?;
    named(
        model.step(&Tensor::new(&[1u32, 2], &Device::Cpu)?, &mut Default::default()).expect_err("step refused").into(),
    )?;
    let opts = altformers::generate::SampleOptions { tokens: 2, temperature: 0.0, top_k: None, seed: 1 };
    named(
        altformers::generate::generate(model, b"ab", &opts, altformers::generate::Mode::Parallel)
            .expect_err("generation refused"),
    )?;
    testing::assert_padding_changes_nothing(model, tokens, 8)
}

#[test]
fn every_model_benches_decodes_and_trains() -> anyhow::Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    for arch in ARCHITECTURES {
        let name = arch.name.to_string();
        let sopts = scaling::ScalingOptions {
            models: vec![name.clone()],
            components: vec!["mixer".into(), "block".into()],
            mode: scaling::BenchMode::Fwdbwd,
            lengths: vec![16, 32],
            width: 16,
            heads: 2,
            tokens_per_batch: 64,
            warmup: 0,
            reps: 1,
            time_cap_s: 60.0,
            memory_cap_bytes: 1e9,
            dtype: DType::F32,
            sets: vec![],
            processes: 1,
        };
        let (points, fits) = scaling::run(&sopts, &Device::Cpu, |_| {})?;
        // one curve of two lengths per component; a backbone without a per-layer mixer is
        // timed as a whole model instead
        let curves = if arch.mixer.is_some() { 2 } else { 1 };
        assert_eq!(scaling::curves(arch, &sopts.components)?.len(), curves, "{name}");
        assert_eq!(points.len(), 2 * curves, "{name}");
        for p in &points {
            assert_eq!(p.status, "ok", "{name} scaling at T = {}: {}", p.seq, p.status);
            assert!(p.timing.unwrap().median_s > 0.0 && p.flops > 0.0, "{name}");
        }
        assert!(fits.iter().all(|f| f.time_slope.is_some()), "{name}: no fitted slope");
        if !arch.causal {
            // an encoder is timed like the others; it decodes and trains no language model
            continue;
        }

        let dopts = decode::DecodeOptions {
            models: vec![name.clone()],
            contexts: vec![8, 16],
            batches: vec![1, 2],
            width: 16,
            heads: 2,
            depth: 1,
            steps: 1,
            memory_cap_bytes: 1e9,
            time_cap_s: 60.0,
            dtype: DType::F32,
        };
        let decoded = decode::run(&dopts, &Device::Cpu, |_| {})?;
        assert_eq!(decoded.len(), 4);
        for d in &decoded {
            assert_eq!(d.status, "ok", "{name} decode: {}", d.status);
            assert!(d.state_bytes.unwrap() > 0 && d.latency_s.unwrap() > 0.0, "{name}");
        }

        let sets: Vec<String> = [
            "model.width=16",
            "model.depth=1",
            "model.heads=2",
            "model.context=16",
            "train.steps=2",
            "train.batch_size=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.warmup_steps=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = arch.config(&altformers::config::Overrides::sets(&sets))?;
        let dir = testing::fresh_dir(&format!("every-{name}"))?;
        let opts = TrainOptions::fresh(dir.clone(), &Device::Cpu, false);
        let summary = train(&cfg, &corpus, DataFormat::Text, &opts)?;
        assert!(summary.last.val_loss.is_finite() && summary.last.step == 2, "{name}");
        std::fs::remove_dir_all(&dir)?;
        listops_trains(arch)?;
    }
    Ok(())
}

/// Two steps of ListOps (every model: a causal one read at its last position, an encoder
/// pooled) with validation and test accuracy.
fn listops_trains(arch: &altformers::registry::Architecture) -> anyhow::Result<()> {
    use altformers::train::listops::{train_listops, ListOpsSettings};
    let name = arch.name;
    let mut over = altformers::config::Overrides::sets(&[
        "model.width=16",
        "model.depth=1",
        "model.heads=2",
        "model.context=24",
        "train.steps=2",
        "train.batch_size=2",
        "train.eval_every=2",
        "train.warmup_steps=1",
        "listops.generator.min_len=4",
        "listops.generator.max_len=20",
        "listops.train_examples=4",
        "listops.eval_examples=2",
    ]);
    let settings = ListOpsSettings::take_from(&mut over)?;
    let cfg = arch.config(&over)?;
    let dir = testing::fresh_dir(&format!("listops-{name}"))?;
    std::fs::remove_dir_all(&dir)?;
    let opts = TrainOptions::fresh(dir.clone(), &Device::Cpu, false);
    let s = train_listops(&cfg, &settings, &opts).map_err(|e| e.context(name.to_string()))?;
    let readout = if arch.causal { "last-position" } else { "mean-pool" };
    assert!(s.readout == readout && s.train_loss.is_finite() && (0.0..=1.0).contains(&s.test_accuracy), "{name}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Encoders are refused as language models by name (they see the byte they would predict),
/// and train on ListOps.
#[test]
fn every_encoder_is_refused_as_a_language_model_and_classifies() -> anyhow::Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    for arch in ARCHITECTURES.iter().filter(|a| !a.causal) {
        let name = arch.name;
        let cfg = arch.config(&altformers::config::Overrides::sets(&["model.width=16", "model.depth=1"]))?;
        let dir = testing::fresh_dir(&format!("encoder-lm-{name}"))?;
        let opts = TrainOptions::fresh(dir.clone(), &Device::Cpu, false);
        let Err(err) = train(&cfg, &corpus, DataFormat::Text, &opts) else { panic!("{name} trained as an LM") };
        let err = format!("{err:#}");
        assert!(err.contains(name) && err.contains("encoder"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        listops_trains(arch)?;
    }
    Ok(())
}

/// Sequence parallelism (`train --sequence-parallel`) is LongNet's: every other architecture
/// refuses to split its sequence, by name, before any step runs (LongNet's own equality with
/// one process: the CLI test `sequence_parallel_longnet_trains_as_one_process`).
#[test]
fn only_longnet_splits_a_sequence_across_devices() -> anyhow::Result<()> {
    struct Unused;
    impl altformers::mixers::longnet::sequence_parallel::AllGather for Unused {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn all_gather(&self, _: &Tensor) -> candle_core::Result<Tensor> {
            candle_core::bail!("not called while splitting")
        }
    }
    for arch in ARCHITECTURES {
        let cfg = tiny_config(arch.name, &[])?;
        let mut model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        let split = model.split_sequence(std::sync::Arc::new(Unused));
        match arch.name {
            "longnet" => split?,
            name => {
                let err = split.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.contains(&format!("`{name}` cannot be trained sequence-parallel")), "{name}: {err}");
            }
        }
    }
    Ok(())
}

/// Every parameter of every model takes part in its loss: its gradient exists and is not all
/// zeros. An unused parameter would count toward a comparison's parameter budget without
/// working, and the data-parallel exchanges rely on it (one that a backward reaches without a
/// gradient is averaged as zeros when the exchange overlaps the backward, and left alone
/// otherwise).
#[test]
fn every_parameter_gets_a_gradient() -> anyhow::Result<()> {
    for arch in ARCHITECTURES {
        let cfg = tiny_config(arch.name, &[])?;
        let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
        testing::perturb(&model, 0.05, 1)?;
        let t = cfg.context.min(13);
        let (tokens, targets) = (random_tokens(2, t, cfg.vocab, 5)?, random_tokens(2, t, cfg.vocab, 6)?);
        let grads = Model::loss(&model.forward(&tokens, None)?, &targets)?.backward()?;
        for (param, p) in model.params.vars() {
            let g = grads.get(p.var.as_tensor());
            let size = g.map(|g| g.abs()?.sum_all()?.to_scalar::<f32>()).transpose()?;
            assert!(size.is_some_and(|s| s > 0.0), "{}: parameter {param} gets {size:?} as its gradient", arch.name);
        }
    }
    Ok(())
}
