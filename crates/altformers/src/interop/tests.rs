//! Round trips through the `transformers` layouts, and every kind of bad file refused with
//! nothing written. (The comparison against `transformers` itself, which needs PyTorch, is
//! `bench/peers/hf_roundtrip.py`.)

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::RunConfig;
use crate::testing::{fresh_dir, random_tokens, rel_err, tiny_config};

/// A run folder `dir/name` holding a fresh tiny model of `arch` with `sets`; the model too.
fn tiny_run(dir: &Path, name: &str, arch: &str, sets: &[&str]) -> Result<(PathBuf, Model)> {
    let config = RunConfig { model: tiny_config(arch, sets)?, ..Default::default() };
    let model = Model::new(&config.model, 5, &Device::Cpu, DType::F32)?;
    let run = dir.join(name);
    write_run(&run, &config, model.params.tensors(), "test")?;
    Ok((run, model))
}

/// Exports `run`, imports the export as `format` and checks the logits are the model's.
fn round_trip(dir: &Path, run: &Path, model: &Model, format: HfFormat) -> Result<PathBuf> {
    let name = run.file_name().unwrap().to_string_lossy();
    let hf_dir = dir.join(format!("{name}-hf"));
    assert_eq!(export(run, &hf_dir)?, format);
    let back = dir.join(format!("{name}-back"));
    import(format, &hf_dir, &back)?;
    let loaded = crate::train::load_run(&back, &Device::Cpu, DType::F32)?;
    let tokens = random_tokens(2, 11, model.config.vocab, 3)?;
    let err = rel_err(&loaded.forward(&tokens, None)?, &model.forward(&tokens, None)?)?;
    assert!(err < 1e-6, "{name}: logits differ after export and import: {err}");
    Ok(hf_dir)
}

#[test]
fn gpt2_and_rwkv4_round_trip_through_the_transformers_layouts() -> Result<()> {
    let dir = fresh_dir("interop-round-trip")?;
    // GPT-2 exactly, our default Transformer (no biases: exported as zeros; the exact GELU:
    // `activation_function = gelu`), an untied head, and no positions (a zero `wpe`)
    for (name, sets) in [
        ("gpt2", &["model.bias=true", "model.channel_mixer=mlp-tanh"][..]),
        ("default", &[][..]),
        ("untied", &["model.tie_embeddings=false", "model.ffn_mult=3"][..]),
        ("no-positions", &["model.position=none"][..]),
    ] {
        let (run, model) = tiny_run(&dir, name, "transformer", sets)?;
        let hf_dir = round_trip(&dir, &run, &model, HfFormat::Gpt2)?;
        let config: serde_json::Value = crate::util::read_json(&hf_dir.join("config.json"))?;
        assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
        let declared = checked::read_header(&hf_dir.join("model.safetensors"))?;
        // Conv1D: [in, out]
        let hidden = (model.config.ffn_mult * 16.0) as usize;
        assert_eq!(declared["transformer.h.0.mlp.c_fc.weight"].shape, vec![16, hidden]);
        if name == "gpt2" {
            // the Hub's `gpt2` stores a bare GPT2Model (`h.0.*`, no `transformer.`), older
            // files with each layer's causal-mask buffer: both read
            let bare = edited(&hf_dir, &dir, "bare", |t| {
                *t = std::mem::take(t).into_iter().map(|(k, v)| (k.replace("transformer.", ""), v)).collect();
                t.insert("h.0.attn.bias".into(), Tensor::ones((1, 1, 24, 24), DType::F32, &Device::Cpu).unwrap());
            })?;
            import(HfFormat::Gpt2, &bare, &dir.join("bare-run"))?;
            let loaded = crate::train::load_run(&dir.join("bare-run"), &Device::Cpu, DType::F32)?;
            let tokens = random_tokens(1, 9, model.config.vocab, 8)?;
            assert!(rel_err(&loaded.forward(&tokens, None)?, &model.forward(&tokens, None)?)? < 1e-6);
        }
    }
    let (run, model) = tiny_run(&dir, "rwkv", "rwkv4", &["model.options.init=normal"])?;
    let hf_dir = round_trip(&dir, &run, &model, HfFormat::Rwkv4)?;
    // the same weights as two shards with their index, as save_pretrained writes a large model
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded)?;
    std::fs::copy(hf_dir.join("config.json"), sharded.join("config.json"))?;
    let all = crate::params::load_tensors(&hf_dir.join("model.safetensors"), &Device::Cpu)?;
    let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) = all.into_iter().partition(|(k, _)| k.contains("blocks.0."));
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", &first), ("model-00002-of-00002.safetensors", &second)] {
        crate::params::save_tensors(part, &sharded.join(file))?;
        part.keys().for_each(|k| drop(weight_map.insert(k.clone(), file.into())));
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    crate::util::write_json_atomic(&sharded.join("model.safetensors.index.json"), &index)?;
    import(HfFormat::Rwkv4, &sharded, &dir.join("sharded-run"))?;
    let loaded = crate::train::load_run(&dir.join("sharded-run"), &Device::Cpu, DType::F32)?;
    let tokens = random_tokens(1, 9, model.config.vocab, 8)?;
    assert!(rel_err(&loaded.forward(&tokens, None)?, &model.forward(&tokens, None)?)? < 1e-6);
    // an index naming a file elsewhere is refused, and so is a tensor in two shards
    let mut evil = index.clone();
    evil["weight_map"]["head.weight"] = "../elsewhere.safetensors".into();
    crate::util::write_json_atomic(&sharded.join("model.safetensors.index.json"), &evil)?;
    let err = format!("{:#}", import(HfFormat::Rwkv4, &sharded, &dir.join("evil-run")).unwrap_err());
    assert!(err.contains("is not a plain file name"), "{err}");
    crate::params::save_tensors(&second, &sharded.join("model-00001-of-00002.safetensors"))?;
    crate::util::write_json_atomic(&sharded.join("model.safetensors.index.json"), &index)?;
    let err = format!("{:#}", import(HfFormat::Rwkv4, &sharded, &dir.join("twice-run")).unwrap_err());
    assert!(err.contains("is declared by two shards"), "{err}");
    // half-precision files import too (checkpoints on the Hub are often f16 or bf16)
    let tokens = random_tokens(1, 7, model.config.vocab, 4)?;
    for dtype in [DType::F16, DType::BF16] {
        let half = edited(&hf_dir, &dir, &format!("{dtype:?}"), |t| {
            t.values_mut().for_each(|v| *v = v.to_dtype(dtype).unwrap());
        })?;
        let back = dir.join(format!("{dtype:?}-run"));
        import(HfFormat::Rwkv4, &half, &back)?;
        let loaded = crate::train::load_run(&back, &Device::Cpu, DType::F32)?;
        let err = rel_err(&loaded.forward(&tokens, None)?, &model.forward(&tokens, None)?)?;
        assert!(err < 0.05, "{dtype:?}: {err}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn exports_name_the_setting_the_layout_cannot_express() -> Result<()> {
    let dir = fresh_dir("interop-refusals")?;
    for (arch, sets, needle) in [
        ("transformer", &["model.position=rope"][..], "model.position = rope"),
        ("transformer", &["model.kv_heads=1"][..], "model.kv_heads = 1 (grouped or multi-query K/V)"),
        ("transformer", &["model.channel_mixer=swiglu"][..], "model.channel_mixer = swiglu"),
        ("rwkv4", &["model.options.embed_norm=false"][..], "model.options.embed_norm = false"),
        ("retnet", &[][..], "`retnet` has no transformers layout"),
    ] {
        let (run, _) = tiny_run(&dir, &format!("{arch}-{}", sets.join("-")), arch, sets)?;
        let out = dir.join("refused");
        let err = format!("{:#}", export(&run, &out).unwrap_err());
        assert!(err.contains(needle), "{err}");
        assert!(!out.exists(), "a refused export wrote {}", out.display());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A copy of the `transformers` folder `hf_dir` as `dir/name` whose weights `edit` changed.
fn edited(hf_dir: &Path, dir: &Path, name: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> Result<PathBuf> {
    let out = dir.join(name);
    std::fs::create_dir_all(&out)?;
    std::fs::copy(hf_dir.join("config.json"), out.join("config.json"))?;
    let mut tensors: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(hf_dir.join("model.safetensors"), &Device::Cpu)?.into_iter().collect();
    edit(&mut tensors);
    crate::params::save_tensors(&tensors, &out.join("model.safetensors"))?;
    Ok(out)
}

/// A change to a file's tensors.
type Edit<'a> = Box<dyn FnOnce(&mut BTreeMap<String, Tensor>) + 'a>;

/// `t` with one value replaced by `v`.
fn poisoned(t: &Tensor, v: f32) -> Tensor {
    let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[1] = v;
    Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn bad_checkpoints_are_refused_by_name_with_nothing_written() -> Result<()> {
    let dir = fresh_dir("interop-bad")?;
    for (format, arch, sets, victim, shape) in [
        (HfFormat::Gpt2, "transformer", &["model.bias=true"][..], "transformer.h.1.attn.c_attn.weight", "[16, 48]"),
        (
            HfFormat::Rwkv4,
            "rwkv4",
            &["model.options.init=normal"][..],
            "rwkv.blocks.1.feed_forward.key.weight",
            "[64, 16]",
        ),
    ] {
        let (run, _) = tiny_run(&dir, arch, arch, sets)?;
        let hf_dir = dir.join(format!("{arch}-hf"));
        export(&run, &hf_dir)?;
        let victim = victim.to_string();
        let layers = if format == HfFormat::Gpt2 { "transformer.h." } else { "rwkv.blocks." };
        let far = format!("{layers}99999999.x");
        let cases: Vec<(&str, Edit, String)> = vec![
            (
                "missing",
                Box::new(|t| drop(t.remove(&victim))),
                format!("missing tensor `{victim}` (expected shape {shape})"),
            ),
            (
                "shape",
                Box::new(|t| drop(t.insert(victim.clone(), Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap()))),
                format!("tensor `{victim}` has shape [3, 5], expected {shape}"),
            ),
            (
                "dtype",
                Box::new(|t| {
                    let ints = t[&victim].to_dtype(DType::I64).unwrap();
                    t.insert(victim.clone(), ints);
                }),
                format!("tensor `{victim}` is stored as I64, expected a float dtype"),
            ),
            (
                "nan",
                Box::new(|t| {
                    let bad = poisoned(&t[&victim], f32::NAN);
                    t.insert(victim.clone(), bad);
                }),
                format!("tensor `{victim}` holds 1 non-finite values"),
            ),
            (
                "far-layer",
                Box::new(|t| drop(t.insert(far.clone(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()))),
                format!("`{layers}2.*` is missing but `{layers}99999999.*` is present"),
            ),
            (
                "extra",
                Box::new(|t| {
                    drop(t.insert("rogue.weight".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()))
                }),
                "unexpected tensor `rogue.weight`".into(),
            ),
        ];
        for (case, edit, needle) in cases {
            let bad = edited(&hf_dir, &dir, &format!("{arch}-{case}"), edit)?;
            let out = dir.join(format!("{arch}-{case}-run"));
            let err = format!("{:#}", import(format, &bad, &out).unwrap_err());
            assert!(err.contains(&needle) && err.contains("model.safetensors"), "{case}: {err}");
            assert!(!out.exists(), "{case}: a refused import wrote {}", out.display());
        }
        // a pickle is never opened: neither given directly nor found in place of the weights
        let pickled = dir.join(format!("{arch}-pickle"));
        std::fs::create_dir_all(&pickled)?;
        std::fs::copy(hf_dir.join("config.json"), pickled.join("config.json"))?;
        std::fs::write(pickled.join("pytorch_model.bin"), b"\x80\x02crandom\nthing\n")?;
        std::fs::write(pickled.join("pytorch_model.bin.index.json"), b"{}")?;
        for path in [pickled.clone(), pickled.join("pytorch_model.bin"), pickled.join("pytorch_model.bin.index.json")] {
            let out = dir.join(format!("{arch}-pickle-run"));
            let err = format!("{:#}", import(format, &path, &out).unwrap_err());
            assert!(err.contains("pickled PyTorch checkpoint") && err.contains("save_pretrained"), "{err}");
            assert!(!out.exists());
        }
        // the other format's folder
        let other = if format == HfFormat::Gpt2 { HfFormat::Rwkv4 } else { HfFormat::Gpt2 };
        let err = format!("{:#}", import(other, &hf_dir, &dir.join("other-run")).unwrap_err());
        assert!(err.contains("model, not `"), "{err}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
