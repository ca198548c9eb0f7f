//! The folder `transformers`' `save_pretrained` writes: `config.json` and `model.safetensors`
//! (or the shards `model.safetensors.index.json` lists), a Hub folder's `tokenizer.json` too.
//! Reading one (pickles refused, with how to convert them) and writing one that
//! `from_pretrained` reads.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::checked::Files;

/// A `save_pretrained` folder (or its `model.safetensors` given directly, `config.json`
/// beside it): the weights (one file, or shards with their index) and the parsed
/// configuration.
pub struct Folder {
    pub dir: PathBuf,
    pub files: Files,
    pub config: Config,
}

impl Folder {
    pub fn open(path: &Path) -> Result<Self> {
        super::checked::refuse_pickle(path)?;
        let dir =
            if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
        let files = if !path.is_dir() {
            if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".index.json")) {
                Files::sharded(path)?
            } else {
                Files::one(path)
            }
        } else if dir.join("model.safetensors").exists() {
            Files::one(&dir.join("model.safetensors"))
        } else if dir.join("model.safetensors.index.json").exists() {
            Files::sharded(&dir.join("model.safetensors.index.json"))?
        } else {
            for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pth", "model.pt"] {
                if dir.join(pickle).exists() {
                    super::checked::refuse_pickle(&dir.join(pickle))?;
                }
            }
            bail!("{} holds no model.safetensors (nor model.safetensors.index.json)", dir.display());
        };
        let config = Config::read(&dir.join("config.json"))?;
        Ok(Self { dir, files, config })
    }

    /// The folder's `tokenizer.json` (a Hub folder has one; `save_pretrained` of a model
    /// alone writes none: then bytes).
    pub fn tokenizer(&self) -> Result<crate::data::tokenizer::Tokenizer> {
        let path = self.dir.join(crate::data::tokenizer::RUN_FILE);
        if !path.exists() {
            return Ok(crate::data::tokenizer::Tokenizer::Bytes);
        }
        crate::data::tokenizer::Tokenizer::from_arg(&path.display().to_string())
    }
}

/// A `transformers` `config.json`, with typed, checked reads of its fields.
pub struct Config {
    pub path: PathBuf,
    pub json: serde_json::Map<String, serde_json::Value>,
}

/// Bound on every size read from a config (vocabulary, width, depth, context): anything
/// larger is a damaged or hostile file, refused before a model of that shape is planned.
const MAX_SIZE: u64 = 1 << 24;

impl Config {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} (save_pretrained writes it beside the weights)", path.display()))?;
        let json = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON object", path.display()))?;
        Ok(Self { path: path.to_path_buf(), json })
    }

    /// A positive size `key`, or `default` where the key is absent or null.
    pub fn size(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => {
                default.with_context(|| format!("{}: `{key}` is missing", self.path.display()))
            }
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= MAX_SIZE => Ok(n as usize),
                _ => bail!("{}: `{key}` must be an integer in 1..={MAX_SIZE}, got {v}", self.path.display()),
            },
        }
    }

    pub fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => {
                v.as_f64().with_context(|| format!("{}: `{key}` must be a number, got {v}", self.path.display()))
            }
        }
    }

    pub fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => {
                v.as_bool().with_context(|| format!("{}: `{key}` must be true or false, got {v}", self.path.display()))
            }
        }
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default.to_string()),
            Some(v) => Ok(v
                .as_str()
                .with_context(|| format!("{}: `{key}` must be a string, got {v}", self.path.display()))?
                .into()),
        }
    }

    /// Refuses a config whose `model_type` is not `expected` (a GPT-2 folder given to the
    /// RWKV importer, say).
    pub fn expect_model_type(&self, expected: &str) -> Result<()> {
        let found = self.string("model_type", "")?;
        if found != expected {
            bail!("{} describes a `{found}` model, not `{expected}`", self.path.display());
        }
        Ok(())
    }

    /// Refuses a setting whose value changes the computation in a way our model does not.
    pub fn require(&self, key: &str, ok: bool, why: &str) -> Result<()> {
        if !ok {
            bail!(
                "{}: `{key}` = {} is not supported: {why}",
                self.path.display(),
                self.json.get(key).unwrap_or(&serde_json::Value::Null)
            );
        }
        Ok(())
    }
}

/// Writes a `save_pretrained`-style folder: `model.safetensors` (with the `format: pt`
/// metadata `transformers` checks) and `config.json`. Refuses a folder that already holds a
/// model.
pub fn write_folder(out: &Path, tensors: &BTreeMap<String, Tensor>, config: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for file in ["model.safetensors", "config.json"] {
        if out.join(file).exists() {
            bail!("{} already holds {file}; choose another --out", out.display());
        }
    }
    let weights = out.join("model.safetensors");
    let tmp = crate::util::tmp_path(&weights);
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let contiguous: Vec<(String, Tensor)> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.contiguous()?))).collect::<Result<_>>()?;
    safetensors::serialize_to_file(contiguous, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    crate::util::fsync_and_rename(&tmp, &weights)?;
    crate::util::write_json_atomic(&out.join("config.json"), config)
}
