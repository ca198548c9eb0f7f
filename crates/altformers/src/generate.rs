//! Sampling text from a trained model, in parallel mode (the whole window re-run for every
//! token) or recurrent mode (prefill once, then one `step` per token). Both modes compute
//! the same logits, so with the same seed they produce the same text.

use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::encode;
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

fn last_logits(logits: &Tensor) -> Result<Vec<f64>> {
    // logits: [1, T, V] or [1, V]
    let row = if logits.rank() == 3 { logits.i((0, logits.dim(1)? - 1))? } else { logits.i(0)? };
    Ok(row.to_dtype(DType::F64)?.to_vec1()?)
}

/// Continues `prompt` by `opts.tokens` bytes; returns only the new bytes.
pub fn generate(model: &Model, prompt: &[u8], opts: &SampleOptions, mode: Mode) -> Result<Vec<u8>> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one byte");
    }
    if !model.causal() {
        bail!(
            "`{}` is an encoder (bidirectional): it predicts no next byte, so it cannot generate",
            model.config.architecture
        );
    }
    let window = model.window();
    let crop = |toks: &[u8]| -> Vec<u8> {
        match window {
            Some(w) if toks.len() > w => toks[toks.len() - w..].to_vec(),
            _ => toks.to_vec(),
        }
    };
    let dev = model.device();
    let mut rng = Rng::derive(opts.seed, stream::SAMPLE, 0);
    let mut all = prompt.to_vec();
    let mut out = Vec::with_capacity(opts.tokens);
    match mode {
        Mode::Parallel => {
            for _ in 0..opts.tokens {
                let logits = model.forward(&encode(&crop(&all), dev)?, None)?;
                let next = sample(&last_logits(&logits)?, opts, &mut rng) as u8;
                all.push(next);
                out.push(next);
            }
        }
        Mode::Recurrent => {
            let (logits, mut state) = model.prefill(&encode(&crop(&all), dev)?)?;
            let mut logits = last_logits(&logits)?;
            for _ in 0..opts.tokens {
                let next = sample(&logits, opts, &mut rng) as u8;
                all.push(next);
                out.push(next);
                logits = match window {
                    // The window is full: the parallel form would drop the oldest byte, so
                    // rebuild the state from the window (exact, at prefill cost).
                    Some(w) if state.pos + 1 > w => {
                        let (l, s) = model.prefill(&encode(&crop(&all), dev)?)?;
                        state = s;
                        last_logits(&l)?
                    }
                    _ => last_logits(&model.step(&Tensor::new(&[next as u32], dev)?, &mut state)?)?,
                };
            }
        }
    }
    Ok(out)
}
