//! Byte-level data: the tokenizer is the identity on bytes (vocabulary 256), so any file is
//! a corpus. Splits follow the conventions the published figures use.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::rng::Rng;

pub mod listops;
pub mod mqar;
pub mod tokenizer;

/// Tiny Shakespeare (Karpathy's char-rnn corpus, public domain), bundled in the binary.
pub static TINY_SHAKESPEARE: &[u8] = include_bytes!("../../../../data/tinyshakespeare.txt");

pub const VOCAB: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Any file: first 90% train, last 10% validation (nanoGPT's split).
    Text,
    /// enwik8: first 90M bytes train, next 5M validation, last 5M test.
    Enwik8,
}

pub struct Corpus {
    /// What the user named: `shakespeare` or a path.
    pub source: String,
    pub train: Vec<u8>,
    pub val: Vec<u8>,
    pub test: Option<Vec<u8>>,
}

impl Corpus {
    /// `shakespeare` (bundled) or a file path, split according to `format`.
    pub fn load(source: &str, format: DataFormat) -> Result<Self> {
        let bytes = if source == "shakespeare" && format == DataFormat::Text {
            TINY_SHAKESPEARE.to_vec()
        } else if source == "shakespeare" && !Path::new(source).exists() {
            bail!("the bundled `shakespeare` corpus is text: drop --data-format enwik8 (or name a file)");
        } else {
            let path = Path::new(source);
            if !path.exists() {
                bail!("data file {source} does not exist (use `shakespeare` for the bundled corpus)");
            }
            std::fs::read(path).with_context(|| format!("reading data file {source}"))?
        };
        if bytes.is_empty() {
            bail!("data file {source} is empty");
        }
        let (train, val, test) = match format {
            DataFormat::Text => {
                let n = (bytes.len() as f64 * 0.9) as usize;
                (bytes[..n].to_vec(), bytes[n..].to_vec(), None)
            }
            DataFormat::Enwik8 => {
                const M: usize = 1_000_000;
                if bytes.len() < 100 * M {
                    bail!("enwik8 must hold 100,000,000 bytes; {source} has {}", bytes.len());
                }
                (bytes[..90 * M].to_vec(), bytes[90 * M..95 * M].to_vec(), Some(bytes[95 * M..100 * M].to_vec()))
            }
        };
        Ok(Self { source: source.to_string(), train, val, test })
    }

    /// Checks both splits can fill a window of `context` tokens plus its target.
    pub fn check_context(&self, context: usize) -> Result<()> {
        for (name, split) in [("training", &self.train), ("validation", &self.val)] {
            if split.len() < context + 1 {
                bail!(
                    "the {name} split of {} has {} bytes, fewer than model.context + 1 = {}",
                    self.source,
                    split.len(),
                    context + 1
                );
            }
        }
        Ok(())
    }
}

/// `batch` random windows of `context` tokens from `split` (bytes, or token ids): inputs
/// `[B, T]` and the same windows shifted by one as targets, both u32.
pub fn random_batch<T: Copy + Into<u32>>(
    split: &[T],
    batch: usize,
    context: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let max_start = split.len() - context; // window [i, i + context] inclusive of the target
    let mut xs = Vec::with_capacity(batch * context);
    let mut ys = Vec::with_capacity(batch * context);
    for _ in 0..batch {
        let i = rng.below(max_start);
        xs.extend(split[i..i + context].iter().map(|&b| b.into()));
        ys.extend(split[i + 1..i + context + 1].iter().map(|&b| b.into()));
    }
    Ok((Tensor::from_vec(xs, (batch, context), device)?, Tensor::from_vec(ys, (batch, context), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shakespeare_split_matches_nanogpt() {
        let c = Corpus::load("shakespeare", DataFormat::Text).unwrap();
        assert_eq!(c.train.len() + c.val.len(), 1_115_394);
        assert_eq!(c.train.len(), 1_003_854);
        assert!(c.train.starts_with(b"First Citizen:"));
    }

    #[test]
    fn batches_are_shifted_windows_and_reproducible() {
        let split: Vec<u8> = (0..200u8).collect();
        let dev = Device::Cpu;
        let (x, y) = random_batch(&split, 4, 8, &mut Rng::new(5), &dev).unwrap();
        let (x2, _) = random_batch(&split, 4, 8, &mut Rng::new(5), &dev).unwrap();
        let x: Vec<Vec<u32>> = x.to_vec2().unwrap();
        let y: Vec<Vec<u32>> = y.to_vec2().unwrap();
        assert_eq!(x, x2.to_vec2::<u32>().unwrap());
        for (xr, yr) in x.iter().zip(&y) {
            for j in 0..8 {
                assert_eq!(xr[j] + 1, yr[j]);
            }
        }
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let missing = Corpus::load("/nonexistent/file.txt", DataFormat::Text).err().unwrap().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        let dir = std::env::temp_dir().join(format!("altformers-empty-{}", std::process::id()));
        std::fs::write(&dir, b"").unwrap();
        let empty = Corpus::load(dir.to_str().unwrap(), DataFormat::Text).err().unwrap().to_string();
        assert!(empty.contains("is empty"), "{empty}");
        std::fs::write(&dir, b"tiny").unwrap();
        let short = Corpus::load(dir.to_str().unwrap(), DataFormat::Enwik8).err().unwrap().to_string();
        assert!(short.contains("100,000,000"), "{short}");
        std::fs::remove_file(&dir).unwrap();
    }
}
