//! Sampling text from a trained model, in parallel mode (the whole window re-run for every
//! token) or recurrent mode (prefill once, then one `step` per token). Both modes compute
//! the same logits, so with the same seed they produce the same text.

use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::decoder::Decoder;
use crate::model::Model;
use crate::rng::{stream, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Parallel,
    Recurrent,
}

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub tokens: usize,
    /// 0 picks the most likely byte (greedy).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// Picks the next byte from `logits: [V]`.
pub fn sample(logits: &[f64], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best }) as u32;
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mut scaled: Vec<f64> = logits.iter().map(|l| l / opts.temperature).collect();
    if let Some(k) = opts.top_k.filter(|&k| k > 0 && k < scaled.len()) {
        let mut sorted = scaled.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        scaled.iter_mut().filter(|l| **l < kth).for_each(|l| *l = f64::NEG_INFINITY);
    }
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|l| (l - max).exp()).collect();
    let mut r = rng.uniform() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        r -= w;
        if r < 0.0 {
            return i as u32;
        }
    }
    argmax()
}

/// The logits of each row's last position as host vectors: `logits: [N, T, V]` or `[N, V]`
/// -> N rows of V (one copy from the device for the whole batch).
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f64>>> {
    let rows = if logits.rank() == 3 { logits.i((.., logits.dim(1)? - 1))? } else { logits.clone() };
    Ok(rows.to_dtype(DType::F64)?.to_vec2()?)
}

/// Token ids as a `[1, T]` tensor.
fn encode(ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// `N` copies of the token sequence `ids` as a `[N, T]` batch.
fn encode_rows(ids: &[u32], n: usize, device: &candle_core::Device) -> Result<Tensor> {
    Ok(encode(ids, device)?.repeat((n, 1))?)
}

/// Continues `prompt` by `opts.tokens` bytes; returns only the new bytes.
pub fn generate(model: &Model, prompt: &[u8], opts: &SampleOptions, mode: Mode) -> Result<Vec<u8>> {
    let mut rows = generate_batch(model, prompt, opts, mode, 1)?;
    Ok(rows.remove(0))
}

/// `samples` continuations of `prompt` by `opts.tokens` bytes each, generated as one batch
/// (one forward or step for all of them per byte); returns only the new bytes of each. Sample
/// `i` draws from its own random stream (`opts.seed`, index `i`), so sample 0 is what
/// [`generate`] returns and each sample is the same whatever the batch it is generated in
/// (up to the batch's rounding).
pub fn generate_batch(
    model: &Model,
    prompt: &[u8],
    opts: &SampleOptions,
    mode: Mode,
    samples: usize,
) -> Result<Vec<Vec<u8>>> {
    Ok(generate_batch_timed(model, prompt, opts, mode, samples)?.0)
}

/// [`generate_batch`], with where its time went.
pub fn generate_batch_timed(
    model: &Model,
    prompt: &[u8],
    opts: &SampleOptions,
    mode: Mode,
    samples: usize,
) -> Result<(Vec<Vec<u8>>, GenerationTime)> {
    let prompt: Vec<u32> = prompt.iter().map(|&b| b as u32).collect();
    let (rows, time) = generate_ids_timed(model, &prompt, opts, mode, samples)?;
    Ok((rows.into_iter().map(|row| row.into_iter().map(|id| id as u8).collect()).collect(), time))
}

/// [`generate_batch`] over token ids (a tokenizer's, or bytes): `samples` continuations of
/// `prompt` by `opts.tokens` tokens each.
pub fn generate_ids(
    model: &Model,
    prompt: &[u32],
    opts: &SampleOptions,
    mode: Mode,
    samples: usize,
) -> Result<Vec<Vec<u32>>> {
    Ok(generate_ids_timed(model, prompt, opts, mode, samples)?.0)
}

/// Where a generation's time went: the prompt (its prefill, and the decoder's set-up: a
/// CUDA graph's capture), then the tokens one step at a time (each step's logits read on
/// the host and sampled there).
#[derive(Clone, Copy, Debug, Default)]
pub struct GenerationTime {
    pub prompt_s: f64,
    pub steps_s: f64,
    pub steps: usize,
    /// Whether the steps were replayed from a CUDA graph ([`Decoder::replays`]).
    pub replayed: bool,
}

/// [`generate_ids`], with where its time went.
pub fn generate_ids_timed(
    model: &Model,
    prompt: &[u32],
    opts: &SampleOptions,
    mode: Mode,
    samples: usize,
) -> Result<(Vec<Vec<u32>>, GenerationTime)> {
    let start = std::time::Instant::now();
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one byte");
    }
    if samples == 0 {
        bail!("the number of samples must be at least 1");
    }
    if !model.causal() {
        bail!(
            "`{}` is an encoder (bidirectional): it predicts no next byte, so it cannot generate",
            model.config.architecture
        );
    }
    crate::model::size::check_generation(
        &model.config,
        samples,
        prompt.len().saturating_add(opts.tokens),
        model.dtype(),
        model.device().is_cpu(),
    )?;
    let window = model.window();
    let crop = |toks: &[u32]| -> Vec<u32> {
        match window {
            Some(w) if toks.len() > w => toks[toks.len() - w..].to_vec(),
            _ => toks.to_vec(),
        }
    };
    let dev = model.device();
    let mut rngs: Vec<Rng> = (0..samples).map(|i| Rng::derive(opts.seed, stream::SAMPLE, i as u64)).collect();
    // every row holds the prompt and its own continuation (all of one length)
    let mut all: Vec<Vec<u32>> = vec![prompt.to_vec(); samples];
    let mut pick = |logits: &[Vec<f64>], all: &mut Vec<Vec<u32>>| -> Vec<u32> {
        let next: Vec<u32> = logits.iter().zip(rngs.iter_mut()).map(|(l, rng)| sample(l, opts, rng)).collect();
        for (row, &b) in all.iter_mut().zip(&next) {
            row.push(b);
        }
        next
    };
    let windows = |all: &[Vec<u32>]| -> Result<Tensor> {
        let rows = all.iter().map(|r| encode(&crop(r), dev)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    };
    let mut steps_from = start;
    let mut replayed = false;
    match mode {
        Mode::Parallel => {
            for _ in 0..opts.tokens {
                let logits = model.forward(&windows(&all)?, None)?;
                pick(&last_logits(&logits)?, &mut all);
            }
        }
        Mode::Recurrent => {
            let (logits, state) = model.prefill(&encode_rows(&crop(prompt), samples, dev)?)?;
            let mut logits = last_logits(&logits)?;
            let mut decoder = Decoder::new(model, state, samples)?;
            replayed = decoder.replays();
            steps_from = std::time::Instant::now();
            for _ in 0..opts.tokens {
                let next = pick(&logits, &mut all);
                logits = match window {
                    // The window is full: the parallel form would drop the oldest byte, so
                    // rebuild the state from the window (exact, at prefill cost).
                    Some(w) if decoder.state().pos + 1 > w => {
                        let (l, s) = model.prefill(&windows(&all)?)?;
                        // every later token comes here too: no graph to capture
                        decoder = Decoder::eager(model, s);
                        last_logits(&l)?
                    }
                    _ => last_logits(&decoder.step(&next)?)?,
                };
            }
        }
    }
    let time = GenerationTime {
        prompt_s: (steps_from - start).as_secs_f64(),
        steps_s: steps_from.elapsed().as_secs_f64(),
        steps: opts.tokens,
        replayed,
    };
    Ok((all.into_iter().map(|row| row[prompt.len()..].to_vec()).collect(), time))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{perturb, tiny_config};
    use candle_core::Device;

    /// A tiny f64 Transformer of context 16 (generation below runs past it), its weights
    /// perturbed so that sampling has something to choose between.
    fn model() -> Result<Model> {
        let cfg = tiny_config("transformer", &["model.context=16"])?;
        let m = Model::new(&cfg, 3, &Device::Cpu, DType::F64)?;
        perturb(&m, 0.5, 4)?;
        Ok(m)
    }

    #[test]
    fn batched_samples_are_the_single_samples_of_their_streams() -> Result<()> {
        let m = model()?;
        let opts = SampleOptions { tokens: 24, temperature: 1.0, top_k: None, seed: 9 };
        for mode in [Mode::Recurrent, Mode::Parallel] {
            let three = generate_batch(&m, b"ab", &opts, mode, 3)?;
            assert_eq!(three.len(), 3);
            assert!(three.iter().all(|r| r.len() == 24));
            // sample 0 is generate's; sample 1 the same in a batch of 2 as in a batch of 3
            assert_eq!(three[0], generate(&m, b"ab", &opts, mode)?, "{mode:?}");
            assert_eq!(three[1], generate_batch(&m, b"ab", &opts, mode, 2)?[1], "{mode:?}");
            // the streams differ, so the samples do
            assert!(three[0] != three[1] || three[1] != three[2], "{mode:?}: three identical samples");
            // both modes compute the same logits, past the window too (re-prefilled per row)
            if mode == Mode::Parallel {
                assert_eq!(three, generate_batch(&m, b"ab", &opts, Mode::Recurrent, 3)?);
            }
        }
        // greedy: every sample is the single greedy continuation
        let greedy = SampleOptions { temperature: 0.0, ..opts };
        let rows = generate_batch(&m, b"ab", &greedy, Mode::Recurrent, 4)?;
        let single = generate(&m, b"ab", &greedy, Mode::Recurrent)?;
        assert!(rows.iter().all(|r| *r == single));
        Ok(())
    }

    #[test]
    fn zero_or_too_many_samples_or_an_empty_prompt_are_clear_errors() -> Result<()> {
        let m = model()?;
        let opts = SampleOptions { tokens: 2, temperature: 1.0, top_k: None, seed: 1 };
        let zero = generate_batch(&m, b"a", &opts, Mode::Recurrent, 0).unwrap_err().to_string();
        assert!(zero.contains("at least 1"), "{zero}");
        let empty = generate_batch(&m, b"", &opts, Mode::Recurrent, 2).unwrap_err().to_string();
        assert!(empty.contains("prompt is empty"), "{empty}");
        // more samples, or longer ones, than memory holds: refused with the figure, where the
        // allocator aborted the process
        let many = generate_batch(&m, b"a", &opts, Mode::Recurrent, 100_000_000_000).unwrap_err().to_string();
        assert!(many.contains("generating 100000000000 x 3 tokens") && many.contains("--batch"), "{many}");
        let long = SampleOptions { tokens: usize::MAX, ..opts };
        let long = generate_batch(&m, b"a", &long, Mode::Recurrent, 1).unwrap_err().to_string();
        assert!(long.contains("needs about"), "{long}");
        Ok(())
    }
}
