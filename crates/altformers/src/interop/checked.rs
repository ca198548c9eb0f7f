//! Reading an untrusted safetensors file in two steps: its header first (names, dtypes,
//! shapes: a few kilobytes), checked against what the model needs, and only then its data.
//! A file that names a tensor of 10^12 elements, or an integer tensor where weights belong,
//! is refused before its data is read or anything of its size is allocated.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The safetensors format's own bound on the JSON header (the `safetensors` crate's
/// `MAX_HEADER_SIZE`): a larger length prefix is a damaged or hostile file.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Float dtypes a checkpoint may store weights in (the names safetensors headers use).
pub const WEIGHT_DTYPES: [&str; 3] = ["F32", "F16", "BF16"];

/// One tensor as a safetensors header declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// The tensors a safetensors file declares, by name, read from its header alone.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, Declared>> {
    let origin = path.display();
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {origin}"))?;
    let size = file.metadata()?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .with_context(|| format!("{origin} is not a safetensors file: shorter than 8 bytes"))?;
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_BYTES || len > size - 8 {
        bail!("{origin} is not a valid safetensors file: its header claims {len} bytes ({size} in the file)");
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).with_context(|| format!("reading the header of {origin}"))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{origin} is not a valid safetensors file: its header is not a JSON object"))?;
    let mut declared = BTreeMap::new();
    for (name, entry) in json.into_iter().filter(|(name, _)| name != "__metadata__") {
        let dtype = entry.get("dtype").and_then(|d| d.as_str());
        let shape = entry.get("shape").and_then(|s| s.as_array()).and_then(|dims| {
            dims.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<usize>>>()
        });
        let (Some(dtype), Some(shape)) = (dtype, shape) else {
            bail!("{origin} is not a valid safetensors file: the header entry of `{name}` has no dtype or shape");
        };
        declared.insert(name, Declared { dtype: dtype.to_string(), shape });
    }
    Ok(declared)
}

/// The number of layers in a file whose layers are named `{prefix}{i}.*`: the indices must
/// run 0..n without gaps, checked before a model of that depth is planned (a file naming
/// `blocks.99999999.x` would otherwise plan 10^8 layers).
pub fn layer_count<'a>(names: impl IntoIterator<Item = &'a String>, prefix: &str, origin: &str) -> Result<usize> {
    let layers: std::collections::BTreeSet<usize> =
        names.into_iter().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).collect();
    let depth = layers.last().map(|m| m + 1).with_context(|| format!("{origin} holds no `{prefix}N.*` tensors"))?;
    if layers.len() != depth {
        let missing = (0..depth).find(|i| !layers.contains(i)).unwrap_or(0);
        bail!(
            "{origin}: its layers are not numbered 0..N without gaps: `{prefix}{missing}.*` is missing but `{prefix}{}.*` is present",
            depth - 1
        );
    }
    Ok(depth)
}

/// What a model needs from a file: every name with its shape, and which other names may be
/// present and are skipped (buffers such as GPT-2's stored causal masks).
pub struct Expected {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub skippable: fn(&str) -> bool,
}

/// Checks a header against `expected`: every tensor present with its shape and a float
/// dtype, nothing unexplained. The error lists every problem at once, each with the file,
/// the tensor and the expected shape.
pub fn check(declared: &BTreeMap<String, Declared>, expected: &Expected, origin: &str) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in &expected.shapes {
        match declared.get(name) {
            None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some(d) => {
                if &d.shape != shape {
                    problems.push(format!("tensor `{name}` has shape {:?}, expected {shape:?}", d.shape));
                }
                if !WEIGHT_DTYPES.contains(&d.dtype.as_str()) {
                    problems.push(format!(
                        "tensor `{name}` is stored as {}, expected a float dtype ({})",
                        d.dtype,
                        WEIGHT_DTYPES.join(", ")
                    ));
                }
            }
        }
    }
    for name in declared.keys().filter(|n| !expected.shapes.contains_key(*n) && !(expected.skippable)(n)) {
        problems.push(format!("unexpected tensor `{name}`"));
    }
    if !problems.is_empty() {
        bail!("{origin} does not hold the expected checkpoint:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// A checkpoint's safetensors files: one, or the shards a `model.safetensors.index.json`
/// lists (what `save_pretrained` writes for a large model).
pub struct Files {
    pub paths: Vec<PathBuf>,
    /// What error messages call the whole: the file, or the index.
    pub origin: String,
}

/// Every tensor the files' headers declare, and the file (an index into [`Files::paths`])
/// that holds it.
pub struct Headers {
    pub declared: BTreeMap<String, Declared>,
    file_of: BTreeMap<String, usize>,
}

impl Files {
    pub fn one(path: &Path) -> Self {
        Self { paths: vec![path.to_path_buf()], origin: path.display().to_string() }
    }

    /// The shards an index lists (`weight_map`: tensor name -> file name beside the index).
    /// A shard named by a path rather than a plain file name is refused: the index is
    /// untrusted too.
    pub fn sharded(index: &Path) -> Result<Self> {
        let origin = index.display().to_string();
        let json: serde_json::Value = crate::util::read_json(index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{origin} has no `weight_map`"))?;
        let mut names: Vec<&str> = Vec::new();
        for file in map.values() {
            let file = file.as_str().with_context(|| format!("{origin}: a `weight_map` entry is not a file name"))?;
            if Path::new(file).file_name() != Some(std::ffi::OsStr::new(file)) || file.starts_with('.') {
                bail!("{origin}: the shard `{file}` is not a plain file name beside the index");
            }
            if !names.contains(&file) {
                names.push(file);
            }
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        Ok(Self { paths: names.iter().map(|f| dir.join(f)).collect(), origin })
    }

    /// Reads every file's header (never its data); a tensor declared twice is refused.
    pub fn headers(&self) -> Result<Headers> {
        let (mut declared, mut file_of) = (BTreeMap::new(), BTreeMap::new());
        for (i, path) in self.paths.iter().enumerate() {
            for (name, d) in read_header(path)? {
                if declared.insert(name.clone(), d).is_some() {
                    bail!("{}: tensor `{name}` is declared by two shards", self.origin);
                }
                file_of.insert(name, i);
            }
        }
        Ok(Headers { declared, file_of })
    }

    /// The tensors `expected` names, from files whose headers passed [`check`], in f32 and
    /// refused if any holds a NaN or an infinity. Each file is read once.
    pub fn load(&self, headers: &Headers, expected: &Expected) -> Result<BTreeMap<String, Tensor>> {
        let mut tensors = BTreeMap::new();
        for (i, path) in self.paths.iter().enumerate() {
            let names: Vec<&String> = expected.shapes.keys().filter(|n| headers.file_of.get(*n) == Some(&i)).collect();
            if names.is_empty() {
                continue;
            }
            let origin = path.display().to_string();
            let bytes = std::fs::read(path).with_context(|| format!("reading {origin}"))?;
            let file = candle_core::safetensors::SliceSafetensors::new(&bytes).map_err(|e| {
                anyhow::anyhow!("{origin} is not a valid safetensors file (corrupt or truncated?): {e}")
            })?;
            for name in names {
                let t = file.load(name, &Device::Cpu).with_context(|| format!("{origin}: reading tensor `{name}`"))?;
                tensors.insert(name.clone(), t.to_dtype(DType::F32)?);
            }
        }
        crate::params::check_finite(&tensors, &self.origin)?;
        Ok(tensors)
    }
}

/// Pickled PyTorch checkpoints (`.bin`, `.pth`, `.pt`, `.ckpt`) run code when loaded: never
/// read here. The error says how to convert one to safetensors with `transformers`.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    // a pickle, or the index of pickled shards (`pytorch_model.bin.index.json`)
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let name = name.strip_suffix(".index.json").unwrap_or(&name);
    let is_pickle = [".bin", ".pth", ".pt", ".ckpt", ".pkl"].iter().any(|e| name.ends_with(e));
    if is_pickle {
        bail!(
            "{} is a pickled PyTorch checkpoint: loading one can run arbitrary code, so it is never read here. \
             Convert it to safetensors first, where PyTorch is installed: \
             python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('IN_DIR').save_pretrained('OUT_DIR', safe_serialization=True)\" \
             (or, for a bare state dict: python -c \"import torch, safetensors.torch as st; st.save_file({{k: v.float().contiguous() for k, v in torch.load('FILE.pth', map_location='cpu', weights_only=True).items()}}, 'FILE.safetensors')\")",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_claiming_more_than_the_file_holds_is_refused() -> Result<()> {
        let dir = crate::testing::fresh_dir("checked-header")?;
        let path = dir.join("bad.safetensors");
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes)?;
        let err = format!("{:#}", read_header(&path).unwrap_err());
        assert!(err.contains("header claims"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
