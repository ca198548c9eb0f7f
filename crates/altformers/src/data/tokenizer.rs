//! Tokenizers: bytes (the identity, vocabulary 256: the default, and the comparison's
//! choice) or a Hugging Face `tokenizer.json` through the `tokenizers` crate (GPT-2's
//! byte-level BPE, or one trained on the corpus by [`train_bpe`]).
//!
//! A run records its tokenizer: a copy of the `tokenizer.json` in the run folder (none for
//! bytes), so `eval`, `generate` and `train --resume` use the same one, and another one is
//! refused. Losses are per token; bits per byte (the loss summed over tokens, divided by the
//! bytes they cover) keep runs with different tokenizers comparable.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The file a run folder records its tokenizer in.
pub const RUN_FILE: &str = "tokenizer.json";

pub enum Tokenizer {
    /// Each byte is a token.
    Bytes,
    /// A `tokenizer.json`: the parsed tokenizer and the file's text (what is recorded and
    /// compared).
    Hf { tokenizer: Box<tokenizers::Tokenizer>, json: String, source: String },
}

impl Tokenizer {
    /// `bytes`, or the path of a `tokenizer.json`.
    pub fn from_arg(arg: &str) -> Result<Self> {
        if arg == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        let json = std::fs::read_to_string(arg)
            .with_context(|| format!("reading the tokenizer {arg} (`bytes`, or a tokenizer.json)"))?;
        Self::from_json(json, arg)
    }

    fn from_json(json: String, source: &str) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| anyhow::anyhow!("{source} is not a valid tokenizer.json: {e}"))?;
        Ok(Tokenizer::Hf { tokenizer: Box::new(tokenizer), json, source: source.to_string() })
    }

    /// The tokenizer `run` recorded: its `tokenizer.json`, or bytes if it has none.
    pub fn of_run(run: &Path) -> Result<Self> {
        let path = run.join(RUN_FILE);
        if !path.exists() {
            return Ok(Tokenizer::Bytes);
        }
        Self::from_json(std::fs::read_to_string(&path)?, &path.display().to_string())
    }

    /// Records this tokenizer in the run folder `run` (nothing for bytes).
    pub fn record(&self, run: &Path) -> Result<()> {
        match self {
            Tokenizer::Bytes => Ok(()),
            Tokenizer::Hf { json, .. } => crate::util::write_atomic(&run.join(RUN_FILE), json.as_bytes()),
        }
    }

    /// The run's own tokenizer, or `given` if it is the same one; another is refused.
    pub fn for_run(run: &Path, given: Option<&str>) -> Result<Self> {
        let recorded = Self::of_run(run)?;
        let Some(given) = given else { return Ok(recorded) };
        recorded.check_same(&Self::from_arg(given)?, run)?;
        Ok(recorded)
    }

    /// The tokenizer to read a run's model with (`eval`, `generate`): [`Tokenizer::for_run`],
    /// except that a model whose vocabulary is wider than bytes and whose folder records no
    /// tokenizer (a `transformers` checkpoint imported without its `tokenizer.json`) takes the
    /// one given, if its ids fit. Without one, such a model cannot generate text: its ids are
    /// not bytes.
    pub fn for_model(run: &Path, given: Option<&str>, model_vocab: usize) -> Result<Self> {
        let recorded = Self::of_run(run)?;
        if !recorded.is_bytes() || model_vocab <= super::VOCAB {
            return Self::for_run(run, given);
        }
        let Some(given) = given else { return Ok(recorded) };
        let given = Self::from_arg(given)?;
        if given.vocab() > model_vocab {
            bail!("--tokenizer {} has more tokens than the model's vocabulary ({model_vocab})", given.describe());
        }
        Ok(given)
    }

    /// Refuses `given` unless it is this tokenizer (the one the run `run` recorded).
    pub fn check_same(&self, given: &Tokenizer, run: &Path) -> Result<()> {
        let same = match (self, given) {
            (Tokenizer::Bytes, Tokenizer::Bytes) => true,
            (Tokenizer::Hf { json: a, .. }, Tokenizer::Hf { json: b, .. }) => a == b,
            _ => false,
        };
        if !same {
            bail!(
                "--tokenizer {} is not the tokenizer {} was trained with ({}); drop --tokenizer to use the run's own",
                given.describe(),
                run.display(),
                self.describe()
            );
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::Hf { source, .. } => format!("{source}, vocabulary {}", self.vocab()),
        }
    }

    pub fn is_bytes(&self) -> bool {
        matches!(self, Tokenizer::Bytes)
    }

    /// Token ids run from 0 to `vocab() - 1`.
    pub fn vocab(&self) -> usize {
        match self {
            Tokenizer::Bytes => super::VOCAB,
            Tokenizer::Hf { tokenizer, .. } => tokenizer.get_vocab_size(true),
        }
    }

    /// `text`'s token ids and, for each, the byte just past the text it covers.
    pub fn encode(&self, text: &[u8]) -> Result<Encoded> {
        match self {
            Tokenizer::Bytes => {
                Ok(Encoded { ids: text.iter().map(|&b| b as u32).collect(), ends: (1..=text.len()).collect() })
            }
            Tokenizer::Hf { tokenizer, source, .. } => {
                let (skipped, text) = utf8_core(text).map_err(|e| {
                    anyhow::anyhow!("{source} reads UTF-8 text, and this text is not: {e} (use --tokenizer bytes)")
                })?;
                let enc =
                    tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("{source} failed to encode: {e}"))?;
                let ends = enc.get_offsets().iter().map(|o| skipped + o.1).collect();
                Ok(Encoded { ids: enc.get_ids().to_vec(), ends })
            }
        }
    }

    /// The text of `ids` (bytes as they are; a tokenizer's decoding).
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Tokenizer::Bytes => Ok(ids.iter().map(|&i| i as u8).collect()),
            Tokenizer::Hf { tokenizer, source, .. } => Ok(tokenizer
                .decode(ids, false)
                .map_err(|e| anyhow::anyhow!("{source} failed to decode: {e}"))?
                .into_bytes()),
        }
    }
}

/// `text` as UTF-8 without the pieces of a character a byte split may leave at either end
/// (the 90% / 10% split, `--max-bytes`): the bytes skipped at the start, and the rest.
fn utf8_core(text: &[u8]) -> std::result::Result<(usize, &str), std::str::Utf8Error> {
    let skipped = text.iter().take(3).take_while(|&&b| b & 0xC0 == 0x80).count();
    let text = &text[skipped..];
    match std::str::from_utf8(text) {
        Ok(s) => Ok((skipped, s)),
        // a character cut at the end: what precedes it
        Err(e) if e.error_len().is_none() => Ok((skipped, std::str::from_utf8(&text[..e.valid_up_to()])?)),
        Err(e) => Err(e),
    }
}

/// A text as tokens.
pub struct Encoded {
    pub ids: Vec<u32>,
    /// `ends[i]`: the byte offset just past token `i`'s text.
    pub ends: Vec<usize>,
}

impl Encoded {
    /// The bytes covered by the tokens after the first (the ones a language model predicts).
    pub fn predicted_bytes(&self) -> usize {
        match (self.ends.first(), self.ends.last()) {
            (Some(first), Some(last)) => last - first,
            _ => 0,
        }
    }
}

/// A byte-level BPE tokenizer (GPT-2's scheme: every byte a symbol, then merges) with
/// `vocab` tokens, trained on `text`. No prefix space is added, so decoding gives the text
/// back exactly.
pub fn train_bpe(text: &[u8], vocab: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let alphabet = ByteLevel::alphabet().len();
    if vocab < alphabet {
        bail!("a byte-level BPE needs a vocabulary of at least {alphabet} (every byte), got {vocab}");
    }
    // Each merge shortens the text by a token at least, so no more than its length can be
    // learned; the trainer sizes its tables by `vocab` first (10^12 aborted in the allocator).
    if vocab - alphabet > text.len() {
        bail!(
            "a vocabulary of {vocab} needs {} merges, more than the {} bytes of training text can give",
            vocab - alphabet,
            text.len()
        );
    }
    let text = std::str::from_utf8(text).context("a BPE tokenizer is trained on UTF-8 text")?;
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(0)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    tokenizer.train(&mut trainer, std::iter::once(text)).map_err(|e| anyhow::anyhow!("training the BPE: {e}"))?;
    Ok(tokenizer)
}

/// Trains [`train_bpe`] on `text` and writes it as `out` (a `tokenizer.json`).
pub fn train_bpe_file(text: &[u8], vocab: usize, out: &Path) -> Result<usize> {
    let tokenizer = train_bpe(text, vocab)?;
    let json = tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    crate::util::write_atomic(out, json.as_bytes())?;
    Ok(tokenizer.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n  é, ünïcödé and\ttabs\r\n";

    /// `bench/tokenizers/shakespeare-chars.json`, the CPU speed benchmark's vocabulary
    /// (scripts/cpu-train-bench.sh), is nanoGPT's character-level encoding of Shakespeare: its
    /// 65 characters in sorted order, token i the i-th; it round-trips the whole corpus, and a
    /// character outside it is an error, not a silent substitute.
    #[test]
    fn the_character_tokenizer_is_nanogpts_encoding() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let tok = Tokenizer::from_arg(&root.join("bench/tokenizers/shakespeare-chars.json").display().to_string())?;
        let text = std::fs::read(root.join("data/tinyshakespeare.txt"))?;
        let mut chars: Vec<u8> = text.clone();
        chars.sort_unstable();
        chars.dedup();
        assert_eq!(tok.vocab(), 65);
        assert_eq!(chars.len(), 65);
        let enc = tok.encode(&text)?;
        let want: Vec<u32> = text.iter().map(|b| chars.binary_search(b).unwrap() as u32).collect();
        assert!(enc.ids == want, "ids are not the sorted-character indices");
        assert_eq!(enc.ends.last().copied(), Some(text.len()));
        assert!(tok.decode(&enc.ids)? == text);
        assert!(tok.encode(b"a~b").is_err(), "a character outside the vocabulary was encoded");
        Ok(())
    }

    /// A byte-level BPE written in the test (GPT-2's layout: `model.vocab` of byte-level
    /// symbols, `merges`) round-trips text exactly, and so does one trained here.
    #[test]
    fn byte_level_bpe_round_trips_text_exactly() -> Result<()> {
        // GPT-2's byte-to-symbol table: printable bytes stand for themselves, the others for
        // 256, 257, ... in byte order
        let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let mut next = 256;
        let symbols: Vec<char> = (0..256u32)
            .map(|b| {
                let code = if printable(b) {
                    b
                } else {
                    next += 1;
                    next - 1
                };
                char::from_u32(code).unwrap()
            })
            .collect();
        let mut vocab: serde_json::Map<String, serde_json::Value> =
            symbols.iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
        vocab.insert("Sp".into(), 256.into());
        vocab.insert("Spe".into(), 257.into());
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
                      "merges": ["S p", "Sp e"]}
        });
        let written = Tokenizer::from_json(json.to_string(), "test")?;
        let enc = written.encode(TEXT.as_bytes())?;
        assert!(enc.ids.contains(&257), "the merges were not applied: {:?}", enc.ids);
        assert_eq!(written.decode(&enc.ids)?, TEXT.as_bytes());
        assert_eq!(*enc.ends.last().unwrap(), TEXT.len());

        let trained = train_bpe(crate::data::TINY_SHAKESPEARE, 300)?;
        assert_eq!(trained.get_vocab_size(true), 300);
        let trained = Tokenizer::from_json(trained.to_string(false).unwrap(), "trained")?;
        let enc = trained.encode(TEXT.as_bytes())?;
        assert!(enc.ids.len() < TEXT.len(), "no merge used");
        assert_eq!(trained.decode(&enc.ids)?, TEXT.as_bytes());
        assert_eq!(enc.predicted_bytes(), TEXT.len() - enc.ends[0]);
        // a character cut by a byte split at either end is left out, not an error
        let cut = [&TEXT.as_bytes()[TEXT.find('é').unwrap() + 1..], &"é".as_bytes()[..1]].concat();
        let enc = trained.encode(&cut)?;
        assert_eq!(trained.decode(&enc.ids)?, &cut[1..cut.len() - 1]);
        assert_eq!(*enc.ends.last().unwrap(), cut.len() - 1);
        assert!(trained.encode(b"ok \xff no").is_err());
        // more merges than the text can give: refused before the trainer sizes its tables
        let err = train_bpe(b"abc", 1_000_000_000_000).unwrap_err().to_string();
        assert!(err.contains("more than the 3 bytes of training text"), "{err}");
        Ok(())
    }

    #[test]
    fn a_run_uses_its_own_tokenizer_and_refuses_another() -> Result<()> {
        let dir = crate::testing::fresh_dir("tokenizer-run")?;
        let file = dir.join("bpe.json");
        train_bpe_file(b"abababab cdcdcd abab", 260, &file)?;
        let tokenizer = Tokenizer::from_arg(file.to_str().unwrap())?;
        tokenizer.record(&dir)?;
        assert_eq!(Tokenizer::for_run(&dir, None)?.vocab(), 260);
        assert_eq!(Tokenizer::for_run(&dir, Some(file.to_str().unwrap()))?.vocab(), 260);
        let err = Tokenizer::for_run(&dir, Some("bytes")).err().unwrap().to_string();
        assert!(err.contains("is not the tokenizer"), "{err}");
        std::fs::remove_file(dir.join(RUN_FILE))?;
        let err = Tokenizer::for_run(&dir, Some(file.to_str().unwrap())).err().unwrap().to_string();
        assert!(err.contains("(bytes)"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
