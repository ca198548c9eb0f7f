//! Interoperability with the Hugging Face ecosystem: `transformers` checkpoints in and out
//! (GPT-2 as our `transformer`, RWKV-4 as our `rwkv4`), through a run folder that `eval`,
//! `generate`, `train --init-from` and the benchmarks read.
//!
//! Checkpoints are untrusted input: the safetensors header is checked against the
//! configuration (every name, shape and dtype) before any tensor data is read
//! ([`checked`]), the weights for finiteness before anything is written, and pickles are
//! never opened. One name table per format ([`mapping::NameMap`]) serves both directions.

pub mod checked;
pub mod gpt2;
pub mod hf;
pub mod mapping;
pub mod rwkv4;
#[cfg(test)]
mod tests;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

use crate::config::RunConfig;
use crate::data::tokenizer::Tokenizer;
use crate::model::Model;

/// A `transformers` layout we read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfFormat {
    /// `GPT2LMHeadModel`: our `transformer`.
    Gpt2,
    /// `RwkvForCausalLM`: our `rwkv4`.
    Rwkv4,
}

impl HfFormat {
    /// The `transformers` class a folder of this format loads as.
    pub fn class(self) -> &'static str {
        match self {
            HfFormat::Gpt2 => "GPT2LMHeadModel",
            HfFormat::Rwkv4 => "RwkvForCausalLM",
        }
    }

    fn run_config(self, c: &hf::Config) -> Result<RunConfig> {
        match self {
            HfFormat::Gpt2 => gpt2::run_config(c),
            HfFormat::Rwkv4 => rwkv4::run_config(c),
        }
    }

    /// What a file's layer tensors are named before their index.
    fn layer_prefix(self, names: &[&String]) -> String {
        match self {
            HfFormat::Gpt2 => format!("{}h.", gpt2::prefix_of(names)),
            HfFormat::Rwkv4 => "rwkv.blocks.".into(),
        }
    }

    fn name_map(self, m: &crate::config::ModelConfig, names: &[&String]) -> mapping::NameMap {
        match self {
            HfFormat::Gpt2 => gpt2::name_map(m, gpt2::prefix_of(names)),
            HfFormat::Rwkv4 => rwkv4::name_map(m),
        }
    }

    /// The format our model `m` exports as.
    fn of(m: &crate::config::ModelConfig) -> Result<Self> {
        match m.architecture.as_str() {
            "transformer" => Ok(HfFormat::Gpt2),
            "rwkv4" => Ok(HfFormat::Rwkv4),
            other => bail!("`{other}` has no transformers layout to export to (transformer exports as GPT-2, rwkv4 as RwkvForCausalLM)"),
        }
    }

    fn hf_config(self, m: &crate::config::ModelConfig) -> Result<serde_json::Value> {
        match self {
            HfFormat::Gpt2 => gpt2::hf_config(m),
            HfFormat::Rwkv4 => rwkv4::hf_config(m),
        }
    }
}

/// Imports the `save_pretrained` folder (or its `model.safetensors`) at `path` into a new
/// run folder `out`, with the folder's `tokenizer.json` where it has one (then `eval` and
/// `generate` use it). Nothing is written unless every check passes.
pub fn import(format: HfFormat, path: &Path, out: &Path) -> Result<RunConfig> {
    let folder = hf::Folder::open(path)?;
    let config = format.run_config(&folder.config)?;
    let headers = folder.files.headers()?;
    let names: Vec<&String> = headers.declared.keys().collect();
    let origin = folder.files.origin.clone();
    let layers = checked::layer_count(names.iter().copied(), &format.layer_prefix(&names), &origin)?;
    if layers != config.model.depth {
        bail!("{} describes {} layers, but {origin} holds {layers}", folder.config.path.display(), config.model.depth);
    }
    let map = format.name_map(&config.model, &names);
    let expected = map.expected();
    checked::check(&headers.declared, &expected, &origin)?;
    crate::model::size::check_params(&config.model, DType::F32)?;
    let tokenizer = folder.tokenizer()?;
    if tokenizer.vocab() > config.model.vocab {
        bail!(
            "the folder's tokenizer ({}) has more tokens than the model's vocabulary ({})",
            tokenizer.describe(),
            config.model.vocab
        );
    }
    let tensors = map.to_ours(folder.files.load(&headers, &expected)?)?;
    write_run(out, &config, tensors, &origin)?;
    tokenizer.record(out)?;
    Ok(config)
}

/// Exports the run folder `run` (its latest weights, and its tokenizer.json where it has
/// one) into a `save_pretrained` folder `out`:
/// a `transformer` as GPT-2, an `rwkv4` as `RwkvForCausalLM`. A setting the layout cannot
/// express is refused by name before anything is written.
pub fn export(run: &Path, out: &Path) -> Result<HfFormat> {
    let folder = crate::train::RunFolder::open(run)?;
    let config = folder.config()?;
    let format = HfFormat::of(&config.model)?;
    let hf_config = format.hf_config(&config.model)?;
    let model = folder.load_model(&Device::Cpu, DType::F32)?;
    let tensors = format.name_map(&config.model, &[]).to_theirs(&model.params.tensors())?;
    hf::write_folder(out, &tensors, &hf_config)?;
    Tokenizer::of_run(run)?.record(out)?;
    Ok(format)
}

/// Writes a run folder `out` (`config.json`, `model.safetensors`) holding `tensors` (our
/// names) as weights of `config`'s model: every name and shape checked against the model,
/// every value finite, before anything is written; a folder that already holds a run is
/// refused.
pub fn write_run(out: &Path, config: &RunConfig, tensors: BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
    let model = Model::new(&config.model, config.train.seed, &Device::Cpu, DType::F32)
        .with_context(|| format!("building the model {origin} describes"))?;
    let tensors: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, if t.dtype().is_float() { t.to_dtype(DType::F32)? } else { t })))
        .collect::<candle_core::Result<_>>()?;
    model.params.assign(tensors, origin)?;
    let _lock = crate::train::lock::RunLock::acquire(out)?;
    if out.join("config.json").exists() {
        bail!("{} already holds a run; choose another --out", out.display());
    }
    model.params.save(&out.join("model.safetensors"))?;
    crate::util::write_json_atomic(&out.join("config.json"), config)
}
