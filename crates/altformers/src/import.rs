//! Importers: checkpoints written elsewhere, checked tensor by tensor, into a run folder
//! (`config.json` + `model.safetensors`) that `eval`, `generate` and the benchmarks read.

use anyhow::{bail, Result};
use std::path::Path;

use crate::config::RunConfig;
use crate::interop::checked::{self, Files};
use crate::mixers::rwkv4::{Init, Rwkv4Options};

/// Imports an official RWKV-4 checkpoint into a run folder `out` (`config.json` with a
/// [`RunConfig`], `model.safetensors`) that `train::load_run`, `eval` and `generate` accept.
///
/// `file` is a safetensors file with the official names (`emb.weight`,
/// `blocks.0.ln0.weight`, `blocks.N.att.time_decay`, ..., `head.weight`); width, depth,
/// vocabulary and FFN width are inferred from the header's shapes, then every tensor is
/// checked as for the `transformers` importers ([`crate::interop::checked`]) before its data is
/// read: a missing, mis-shaped, non-float or unexpected tensor is an error that names each
/// one, and so is a NaN or an infinity. `time_decay` is kept raw (per-step decay
/// `exp(-exp(time_decay))`), as the checkpoints store it. f32, f16 and bf16 tensors are
/// converted to f32. The context (1024) only sets the training window;
/// RWKV's recurrence itself is unbounded.
///
/// Official checkpoints are PyTorch `.pth` files; convert one with
/// `python -c "import torch, safetensors.torch as st; p='RWKV.pth'; st.save_file({k: v.float().contiguous() for k, v in torch.load(p, map_location='cpu').items()}, 'RWKV.safetensors')"`
/// i.e. `safetensors.torch.save_file({k: v.float().contiguous() for k,v in torch.load(p, map_location='cpu').items()}, out)`.
pub fn rwkv4(file: &Path, out: &Path) -> Result<RunConfig> {
    crate::interop::checked::refuse_pickle(file)?;
    let files = Files::one(file);
    let headers = files.headers()?;
    let origin = &files.origin;
    let shape = |name: &str| headers.declared.get(name).map(|d| d.shape.as_slice());
    let Some(&[vocab, width]) = shape("emb.weight") else {
        bail!("{origin} is not an RWKV-4 checkpoint: no tensor `emb.weight` of shape [vocab, width]");
    };
    let depth = checked::layer_count(headers.declared.keys(), "blocks.", origin)?;
    let hidden = match shape("blocks.0.ffn.key.weight") {
        Some(&[hidden, _]) if hidden > 0 => hidden,
        _ => 4 * width, // the check below names the problem
    };
    let mut config = crate::registry::find("rwkv4")?.defaults();
    let m = &mut config.model;
    (m.vocab, m.width, m.depth, m.heads, m.context) = (vocab, width, depth, 1, 1024);
    m.ffn_mult = hidden as f64 / width as f64;
    m.set_options(&Rwkv4Options { init: Init::Normal, ..Default::default() })?;
    m.validate()?;
    // the official names are ours: the transformers table with our names on both sides
    let mut map = crate::interop::rwkv4::name_map(m);
    map.pairs.iter_mut().for_each(|p| p.theirs = p.ours.clone());
    let expected = map.expected();
    checked::check(&headers.declared, &expected, origin)?;
    crate::model::size::check_params(m, candle_core::DType::F32)?;
    let tensors = files.load(&headers, &expected)?;
    crate::interop::write_run(out, &config, tensors, origin)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{random_tokens, rel_err, tiny_config};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn rwkv4_round_trips_and_rejects_bad_files() -> Result<()> {
        let dir = crate::testing::fresh_dir("rwkv4-import")?;
        let cfg = tiny_config("rwkv4", &["model.options.chunk=5", "model.options.init=normal"])?;
        let model = Model::new(&cfg, 11, &Device::Cpu, DType::F32)?;
        let file = dir.join("rwkv.safetensors");
        model.params.save(&file)?;
        let imported = rwkv4(&file, &dir.join("run"))?;
        assert_eq!(
            (imported.model.width, imported.model.depth, imported.model.vocab),
            (cfg.width, cfg.depth, cfg.vocab)
        );
        let loaded = crate::train::load_run(&dir.join("run"), &Device::Cpu, DType::F32)?;
        let tokens = random_tokens(2, 9, cfg.vocab, 2)?;
        assert!(rel_err(&loaded.forward(&tokens, None)?, &model.forward(&tokens, None)?)? < 1e-6);

        // a file with a tensor missing and another mis-shaped
        let mut t = model.params.tensors();
        t.remove("blocks.1.att.time_first");
        t.insert("blocks.0.ffn.value.weight".into(), Tensor::zeros((cfg.width, 7), DType::F32, &Device::Cpu)?);
        let bad = dir.join("bad.safetensors");
        crate::params::save_tensors(&t, &bad)?;
        let err = format!("{:#}", rwkv4(&bad, &dir.join("run2")).unwrap_err());
        assert!(err.contains("blocks.1.att.time_first") && err.contains("blocks.0.ffn.value.weight"), "{err}");
        assert!(!dir.join("run2").join("config.json").exists());

        // a layer index far past the others is refused before anything is built
        let mut t = model.params.tensors();
        t.insert("blocks.99999999.x".into(), Tensor::zeros(2, DType::F32, &Device::Cpu)?);
        let far = dir.join("far.safetensors");
        crate::params::save_tensors(&t, &far)?;
        let err = format!("{:#}", rwkv4(&far, &dir.join("run4")).unwrap_err());
        assert!(err.contains("`blocks.2.*` is missing but `blocks.99999999.*` is present"), "{err}");

        // NaN and infinite weights are refused at import and at load, by tensor name
        let mut t = model.params.tensors();
        let poisoned = |t: &Tensor, v: f32| -> Result<Tensor> {
            let mut values = t.flatten_all()?.to_vec1::<f32>()?;
            values[1] = v;
            Ok(Tensor::from_vec(values, t.dims(), &Device::Cpu)?)
        };
        t.insert("blocks.1.att.time_first".into(), poisoned(&t["blocks.1.att.time_first"], f32::NAN)?);
        t.insert("head.weight".into(), poisoned(&t["head.weight"], f32::INFINITY)?);
        let nan = dir.join("nan.safetensors");
        crate::params::save_tensors(&t, &nan)?;
        for err in [rwkv4(&nan, &dir.join("run3")).unwrap_err(), model.params.load(&nan).unwrap_err()] {
            let err = format!("{err:#}");
            assert!(err.contains("non-finite") && err.contains("`blocks.1.att.time_first` holds 1"), "{err}");
            assert!(err.contains("`head.weight`") && !err.contains("emb.weight"), "{err}");
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
