//! The Transformer baseline: modes agree, causality, grouped/multi-query attention,
//! gradients, learning, and the persistence of a trained model.

use altformers::config::{RunConfig, TrainConfig};
use altformers::data::{Corpus, DataFormat};
use altformers::generate::{generate, Mode, SampleOptions};
use altformers::mixers::attention::Attention;
use altformers::model::Model;
use altformers::params::ParamBuilder;
use altformers::testing::*;
use altformers::train::{train, TrainOptions};
use candle_core::{DType, Device, IndexOp, Tensor};

type Result<T> = anyhow::Result<T>;

fn model(sets: &[&str], seed: u64) -> Result<Model> {
    Model::new(&tiny_config("transformer", sets)?, seed, &Device::Cpu, DType::F32)
}

#[test]
fn kv_cache_decode_equals_parallel_forward() -> Result<()> {
    for sets in [
        &["model.position=learned"][..],
        &["model.position=rope"],
        &["model.position=none", "model.heads=4", "model.kv_heads=2"],
        &["model.position=rope", "model.heads=4", "model.kv_heads=1", "model.channel_mixer=swiglu"],
    ] {
        let m = model(sets, 1)?;
        let tokens = random_tokens(2, 19, 256, 7)?;
        assert_modes_agree(&m, &tokens, &[0, 1, 8])?;
    }
    Ok(())
}

#[test]
fn attention_mixer_is_causal_and_its_modes_agree() -> Result<()> {
    for sets in [&["model.position=rope"][..], &["model.heads=4", "model.kv_heads=2"]] {
        let cfg = tiny_config("transformer", sets)?;
        let att = Attention::new(&cfg, &ParamBuilder::new(3, &Device::Cpu, DType::F32))?;
        let x = randn(&[2, 17, cfg.width], 5, DType::F32)?;
        assert_causal(&|x| Ok(altformers::mixers::SequenceMixer::forward(&att, x)?), &x)?;
        assert!(mixer_modes_err(&att, &x, 5)? < 1e-4);
    }
    Ok(())
}

#[test]
fn model_is_causal_over_tokens() -> Result<()> {
    let m = model(&["model.position=rope"], 2)?;
    let a = random_tokens(1, 20, 256, 1)?;
    let b = random_tokens(1, 20, 256, 2)?;
    let t = 9;
    let mixed = Tensor::cat(&[a.narrow(1, 0, t + 1)?, b.narrow(1, t + 1, 20 - t - 1)?], 1)?;
    let la: Vec<f32> = m.forward(&a, None)?.narrow(1, 0, t + 1)?.flatten_all()?.to_vec1()?;
    let lb: Vec<f32> = m.forward(&mixed, None)?.narrow(1, 0, t + 1)?.flatten_all()?.to_vec1()?;
    assert_eq!(la, lb, "logits up to t changed when only later tokens changed");
    Ok(())
}

/// Grouped-query attention with g groups equals multi-head attention whose K/V heads are
/// copies within each group: copy the weights across and compare logits. Also the KV cache
/// shrinks by heads / kv_heads.
#[test]
fn grouped_query_attention_equals_multi_head_with_shared_kv() -> Result<()> {
    let (h, kvh, dh) = (4usize, 2usize, 4usize);
    let gqa = model(&["model.heads=4", "model.kv_heads=2", "model.position=rope"], 11)?;
    let mha = model(&["model.heads=4", "model.kv_heads=4", "model.position=rope"], 12)?;
    let mut weights = gqa.params.tensors();
    for layer in 0..2 {
        let name = format!("blocks.{layer}.att.qkv.weight");
        let w = &weights[&name]; // [(h + 2 kvh) dh, D]
        let q = w.narrow(0, 0, h * dh)?;
        let repeat = |start: usize| -> Result<Tensor> {
            let heads: Vec<Tensor> =
                (0..h).map(|i| w.narrow(0, (start + i / (h / kvh)) * dh, dh)).collect::<candle_core::Result<_>>()?;
            Ok(Tensor::cat(&heads, 0)?)
        };
        let (k, v) = (repeat(h)?, repeat(h + kvh)?);
        weights.insert(name, Tensor::cat(&[q, k, v], 0)?);
    }
    mha.params.assign(weights, "GQA weights")?;
    let tokens = random_tokens(2, 16, 256, 3)?;
    let err = rel_err(&mha.forward(&tokens, None)?, &gqa.forward(&tokens, None)?)?;
    assert!(err < 1e-5, "rel err {err}");
    let (_, s_gqa) = gqa.prefill(&tokens)?;
    let (_, s_mha) = mha.prefill(&tokens)?;
    let kv_bytes = |s: &altformers::model::ModelState| s.layers.iter().step_by(2).map(|a| a.bytes()).sum::<usize>();
    assert_eq!(kv_bytes(&s_mha), 2 * kv_bytes(&s_gqa));
    let mqa = model(&["model.heads=4", "model.kv_heads=1"], 1)?;
    let (_, s_mqa) = mqa.prefill(&tokens)?;
    assert_eq!(kv_bytes(&s_mha), 4 * kv_bytes(&s_mqa));
    // the KV cache grows linearly with the context
    let (_, s_half) = mha.prefill(&tokens.narrow(1, 0, 8)?)?;
    assert_eq!(kv_bytes(&s_mha), 2 * kv_bytes(&s_half));
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for sets in [
        &["model.position=learned", "model.bias=true"][..],
        &[
            "model.position=rope",
            "model.heads=4",
            "model.kv_heads=2",
            "model.channel_mixer=swiglu",
            "model.tie_embeddings=false",
        ],
    ] {
        let cfg = tiny_config("transformer", &[sets, &["model.width=8", "model.vocab=11"]].concat())?;
        let err = model_gradient_err(&cfg, 4)?;
        assert!(err < 1e-4, "{sets:?}: {err}");
    }
    Ok(())
}

fn tiny_run(steps: usize) -> Result<RunConfig> {
    let sets: Vec<String> = [
        "model.width=16",
        "model.depth=2",
        "model.heads=2",
        "model.context=16",
        "model.dropout=0.1",
        "train.batch_size=4",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.warmup_steps=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("train.steps={steps}"), format!("train.decay_steps={steps}")])
    .collect();
    altformers::registry::config("transformer", &altformers::config::Overrides::sets(&sets))
}

fn opts(out: &std::path::Path, resume: bool, stop_after: Option<usize>) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        resume,
        device: Device::Cpu,
        dtype: DType::F32,
        verbose: false,
        stop_after,
        init_from: None,
        sequence_parallel: false,
        group: None,
        peak_memory: false,
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    fresh_dir(&format!("test-{name}")).expect("a temporary folder")
}

/// A `steps`-step tiny run trained into a fresh folder `tag` (stopped after `stop_after`).
fn trained(tag: &str, steps: usize, stop_after: Option<usize>) -> Result<(Corpus, std::path::PathBuf, RunConfig)> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let (dir, cfg) = (temp_dir(tag), tiny_run(steps)?);
    train(&cfg, &corpus, DataFormat::Text, &opts(&dir, false, stop_after))?;
    Ok((corpus, dir, cfg))
}

#[test]
fn resume_reaches_the_same_loss_as_an_uninterrupted_run() -> Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let cfg = tiny_run(10)?;
    let (a, b) = (temp_dir("straight"), temp_dir("resumed"));
    let straight = train(&cfg, &corpus, DataFormat::Text, &opts(&a, false, None))?;
    let first = train(&cfg, &corpus, DataFormat::Text, &opts(&b, false, Some(4)))?;
    assert_eq!(first.last.step, 4);
    let written_before = std::fs::read_to_string(b.join("metrics.jsonl"))?;
    let resumed = train(&cfg, &corpus, DataFormat::Text, &opts(&b, true, None))?;
    assert_eq!(resumed.last.step, 10);
    assert_eq!(straight.last.val_loss, resumed.last.val_loss);
    assert_eq!(straight.last.train_loss, resumed.last.train_loss);
    let wa = altformers::params::load_tensors(&a.join("model.safetensors"), &Device::Cpu)?;
    let wb = altformers::params::load_tensors(&b.join("model.safetensors"), &Device::Cpu)?;
    for (name, t) in &wa {
        assert_eq!(rel_err(t, &wb[name])?, 0.0, "{name} differs after resume");
    }
    // metrics.jsonl holds each evaluation once: steps 3, 4 (the interruption), 6, 9, 10
    let steps: Vec<usize> = std::fs::read_to_string(b.join("metrics.jsonl"))?
        .lines()
        .map(|l| serde_json::from_str::<altformers::train::Metrics>(l).map(|m| m.step))
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(steps, vec![3, 4, 6, 9, 10]);
    // the lines before the interruption are kept as written, byte for byte
    assert!(std::fs::read_to_string(b.join("metrics.jsonl"))?.starts_with(&written_before));
    // a second fresh run into the same folder is refused, not overwritten
    let again = train(&cfg, &corpus, DataFormat::Text, &opts(&a, false, None)).err().unwrap().to_string();
    assert!(again.contains("already holds a run"), "{again}");
    std::fs::remove_dir_all(&a)?;
    std::fs::remove_dir_all(&b)?;
    Ok(())
}

/// Gradient accumulation through the training loop (f64): a run scoring each batch in two
/// micro-batches reports the one-piece run's losses at every evaluation, and one stopped
/// half-way resumes with another `train.accumulate` (4) to the same losses and weights.
#[test]
fn accumulated_runs_match_and_resume_with_another_accumulation() -> Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let cfg = tiny_run(6)?;
    let with = |accumulate| RunConfig { train: TrainConfig { accumulate, ..cfg.train.clone() }, ..cfg.clone() };
    let f64_opts =
        |dir: &std::path::Path, resume, stop_after| TrainOptions { dtype: DType::F64, ..opts(dir, resume, stop_after) };
    let (a, b) = (temp_dir("accumulate-one"), temp_dir("accumulate-two"));
    let one = train(&cfg, &corpus, DataFormat::Text, &f64_opts(&a, false, None))?;
    train(&with(2), &corpus, DataFormat::Text, &f64_opts(&b, false, Some(3)))?;
    let resumed = train(&with(4), &corpus, DataFormat::Text, &f64_opts(&b, true, None))?;
    assert_eq!(one.history.len(), resumed.history.len());
    for (x, y) in one.history.iter().zip(&resumed.history) {
        assert_eq!(x.step, y.step);
        for (what, p, q) in [("val", x.val_loss, y.val_loss), ("train", x.train_loss, y.train_loss)] {
            assert!((p - q).abs() < 1e-9 * p.abs(), "step {}: {what} loss {p} vs {q}", x.step);
        }
    }
    let wa = altformers::params::load_tensors(&a.join("model.safetensors"), &Device::Cpu)?;
    let wb = altformers::params::load_tensors(&b.join("model.safetensors"), &Device::Cpu)?;
    for (name, t) in &wa {
        assert!(rel_err(t, &wb[name])? < 1e-9, "{name} differs");
    }
    std::fs::remove_dir_all(&a)?;
    std::fs::remove_dir_all(&b)?;
    Ok(())
}

/// A crash after the checkpoint is written but before anything else (here: the latest
/// weights cannot be written) keeps the metrics line of that checkpoint's evaluation.
#[test]
fn a_crash_after_a_checkpoint_keeps_its_metrics_line() -> Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let (dir, cfg) = (temp_dir("crash-metrics"), tiny_run(6)?);
    // a folder where the weights go: the rename that ends the checkpoint fails
    std::fs::create_dir_all(dir.join("model.safetensors").join("blocker"))?;
    assert!(train(&cfg, &corpus, DataFormat::Text, &opts(&dir, false, None)).is_err());
    let state: altformers::train::TrainState = altformers::util::read_json(&dir.join("checkpoint/state.json"))?;
    assert_eq!(state.step, 3);
    std::fs::remove_dir_all(dir.join("model.safetensors"))?;
    train(&cfg, &corpus, DataFormat::Text, &opts(&dir, true, None))?;
    let steps: Vec<usize> = altformers::train::RunFolder::open(&dir)?.metrics()?.iter().map(|m| m.step).collect();
    assert_eq!(steps, vec![3, 6]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A metrics line cut short (a crash or a full disk in the middle of its write, so past the
/// last checkpoint) is dropped on resume and written again; a damaged line elsewhere is an
/// error naming the file and the line.
#[test]
fn a_metrics_line_cut_short_is_dropped_on_resume() -> Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let (dir, cfg) = (temp_dir("torn-metrics"), tiny_run(6)?);
    train(&cfg, &corpus, DataFormat::Text, &opts(&dir, false, Some(3)))?;
    let metrics = dir.join("metrics.jsonl");
    let whole = std::fs::read_to_string(&metrics)?;
    std::fs::write(&metrics, format!("{whole}{{\"step\":6,\"train_lo"))?;
    train(&cfg, &corpus, DataFormat::Text, &opts(&dir, true, None))?;
    let steps: Vec<usize> = altformers::train::RunFolder::open(&dir)?.metrics()?.iter().map(|m| m.step).collect();
    assert_eq!(steps, vec![3, 6]);
    std::fs::write(&metrics, format!("{{\"step\":3,\"tr\n{whole}"))?;
    let err = format!("{:#}", altformers::train::RunFolder::open(&dir)?.metrics().unwrap_err());
    assert!(err.contains("metrics.jsonl line 1"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A run that diverges before its first checkpoint leaves a folder that resume refuses
/// (saying how to go on) and a fresh run starts over.
#[test]
fn a_run_that_died_before_its_first_checkpoint_can_be_rerun() -> Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let (dir, cfg) = (temp_dir("no-checkpoint"), tiny_run(6)?);
    let mut bad = cfg.clone();
    (bad.train.lr, bad.train.min_lr, bad.train.grad_clip, bad.train.warmup_steps) = (1e37, 1e37, 0.0, 0);
    let err = train(&bad, &corpus, DataFormat::Text, &opts(&dir, false, None)).err().expect("diverges").to_string();
    assert!(err.contains("no checkpoint was written yet"), "{err}");
    let err = train(&bad, &corpus, DataFormat::Text, &opts(&dir, true, None)).err().expect("nothing to resume");
    assert!(err.to_string().contains("train without --resume to start it over"), "{err}");
    let run = train(&cfg, &corpus, DataFormat::Text, &opts(&dir, false, None))?;
    assert_eq!(run.last.step, 6);
    assert_eq!(altformers::train::RunFolder::open(&dir)?.config()?.train.lr, cfg.train.lr);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Resume compares the corpus's bytes (size and hash), not its path: a file replaced between
/// runs is refused, the same file by another path is accepted.
#[test]
fn resume_checks_the_corpus_bytes_not_its_path() -> Result<()> {
    let dir = temp_dir("corpus-id");
    let shakespeare = Corpus::load("shakespeare", DataFormat::Text)?.train;
    let file = dir.join("corpus.txt");
    std::fs::write(&file, &shakespeare[..20_000])?;
    let (run, cfg) = (dir.join("run"), tiny_run(6)?);
    let corpus = |path: &std::path::Path| Corpus::load(path.to_str().unwrap(), DataFormat::Text);
    train(&cfg, &corpus(&file)?, DataFormat::Text, &opts(&run, false, Some(3)))?;
    // the same length, other bytes
    std::fs::write(&file, &shakespeare[20_000..40_000])?;
    let err = train(&cfg, &corpus(&file)?, DataFormat::Text, &opts(&run, true, None)).err().expect("other bytes");
    assert!(err.to_string().contains("is other data"), "{err}");
    std::fs::write(&file, &shakespeare[..20_000])?;
    let elsewhere = dir.join(".").join("corpus.txt");
    let done = train(&cfg, &corpus(&elsewhere)?, DataFormat::Text, &opts(&run, true, None))?;
    assert_eq!(done.last.step, 6);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn saved_model_loads_with_identical_logits_and_generates_the_same_text_in_both_modes() -> Result<()> {
    let (_, dir, cfg) = trained("save-load", 6, None)?;
    let loaded = altformers::train::load_run(&dir, &Device::Cpu, DType::F32)?;
    let fresh = Model::new(&cfg.model, cfg.train.seed, &Device::Cpu, DType::F32)?;
    let tokens = random_tokens(2, 16, 256, 3)?;
    // the loaded weights are the trained ones, not a fresh initialisation
    assert!(rel_err(&loaded.forward(&tokens, None)?, &fresh.forward(&tokens, None)?)? > 1e-3);
    let reloaded = altformers::train::load_run(&dir, &Device::Cpu, DType::F32)?;
    let (l1, l2) = (loaded.forward(&tokens, None)?, reloaded.forward(&tokens, None)?);
    assert_eq!(l1.flatten_all()?.to_vec1::<f32>()?, l2.flatten_all()?.to_vec1::<f32>()?);
    // generation runs past the 16-byte window: recurrent mode must rebuild its state
    let opts = SampleOptions { tokens: 40, temperature: 1.0, top_k: Some(20), seed: 9 };
    let p = generate(&loaded, b"ROMEO:", &opts, Mode::Parallel)?;
    let r = generate(&loaded, b"ROMEO:", &opts, Mode::Recurrent)?;
    assert_eq!(p.len(), 40);
    assert_eq!(p, r);
    let other = generate(&loaded, b"ROMEO:", &SampleOptions { seed: 10, ..opts.clone() }, Mode::Recurrent)?;
    assert_ne!(p, other, "the seed should matter");
    let _ = l1.i(0)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() -> Result<()> {
    let (corpus, dir, cfg) = trained("nan", 12, Some(3))?;
    // Continue with an absurd learning rate: the weights blow up and the loss turns NaN.
    let mut bad = cfg.clone();
    (bad.train.lr, bad.train.min_lr, bad.train.grad_clip) = (1e37, 1e37, 0.0);
    altformers::util::write_json_atomic(&dir.join("config.json"), &bad)?;
    let err = train(&bad, &corpus, DataFormat::Text, &opts(&dir, true, None)).err().expect("must fail").to_string();
    assert!(err.contains("diverged") && err.contains("checkpoint (step 3)"), "{err}");
    let state: altformers::train::TrainState = altformers::util::read_json(&dir.join("checkpoint/state.json"))?;
    assert_eq!(state.step, 3);
    let m = altformers::train::load_run(&dir, &Device::Cpu, DType::F32)?;
    let logits = m.forward(&random_tokens(1, 8, 256, 1)?, None)?;
    assert!(logits.abs()?.max_all()?.to_scalar::<f32>()?.is_finite());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
