//! Every registered model goes through every benchmark and a training step, so an
//! architecture added to the registry that breaks any of them fails here.

use altformers::bench::{decode, scaling};
use altformers::data::{Corpus, DataFormat};
use altformers::registry::ARCHITECTURES;
use altformers::train::{train, TrainOptions};
use candle_core::{DType, Device};

#[test]
fn every_model_benches_decodes_and_trains() -> anyhow::Result<()> {
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    for arch in ARCHITECTURES.iter().filter(|a| a.causal) {
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
        };
        let (points, fits) = scaling::run(&sopts, &Device::Cpu, |_| {})?;
        assert_eq!(points.len(), 4, "{name}");
        for p in &points {
            assert_eq!(p.status, "ok", "{name} scaling at T = {}: {}", p.seq, p.status);
            assert!(p.timing.unwrap().median_s > 0.0 && p.flops > 0.0, "{name}");
        }
        assert!(fits.iter().all(|f| f.time_slope.is_some()), "{name}: no fitted slope");

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
        let dir = std::env::temp_dir().join(format!("altformers-every-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = TrainOptions {
            out: dir.clone(),
            resume: false,
            device: Device::Cpu,
            dtype: DType::F32,
            verbose: false,
            stop_after: None,
        };
        let summary = train(&cfg, &corpus, DataFormat::Text, &opts)?;
        assert!(summary.last.val_loss.is_finite() && summary.last.step == 2, "{name}");
        std::fs::remove_dir_all(&dir)?;

        // Decoding keeps no autograd history in its state (else memory grows per token).
        let model = altformers::model::Model::new(&cfg.model, 1, &Device::Cpu, DType::F32)?;
        let (_, mut state) = model.prefill(&candle_core::Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?)?;
        assert!(!state.tracks_graph(), "{name}: prefill state records its history");
        for token in [4u32, 5] {
            model.step(&candle_core::Tensor::new(&[token], &Device::Cpu)?, &mut state)?;
        }
        assert!(!state.tracks_graph(), "{name}: decode state records its history");

        // Logits at chosen rows (the recall suite's loss) are those rows of the full forward.
        let tokens = candle_core::Tensor::new(&[[1u32, 7, 3, 9], [4, 4, 2, 8]], &Device::Cpu)?;
        let rows = candle_core::Tensor::new(&[6u32, 1, 3], &Device::Cpu)?;
        let full = model.forward(&tokens, None)?.flatten_to(1)?.index_select(&rows, 0)?;
        let picked = model.forward_at(&tokens, &rows)?;
        let diff = (full - picked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{name}: forward_at differs from forward by {diff}");
    }
    Ok(())
}
