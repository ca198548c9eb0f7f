//! Multi-query associative recall (MQAR), following Zoology (Arora et al. 2023, arXiv
//! 2312.04927): a sequence opens with K key-value pairs, then the keys reappear in random
//! order at later positions, each followed by its value. The model is scored only where it
//! must produce a value right after seeing a key again.
//!
//! Tokens: 0 pads the gaps, keys come from `[1, V/2)`, values from `[V/2, V)`. Query
//! positions are drawn without replacement with weights `(j + 1)^(alpha - 1)` over the
//! free slots `j` after the pairs (Zoology's power law: most queries come early).

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct MqarConfig {
    pub vocab: usize,
    pub seq_len: usize,
    /// Key-value pairs per sequence (every key is queried once).
    pub pairs: usize,
    /// Power-law exponent of the query placement (Zoology uses 0.01).
    pub alpha: f64,
}

/// One sequence: inputs, next-token targets, and where the targets count.
#[derive(Clone, Debug)]
pub struct MqarExample {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub scored: Vec<bool>,
}

impl MqarConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.pairs > 0, "MQAR needs at least one key-value pair");
        ensure!(
            self.vocab / 2 > self.pairs,
            "MQAR vocabulary {} is too small for {} distinct keys",
            self.vocab,
            self.pairs
        );
        ensure!(self.vocab - self.vocab / 2 >= self.pairs, "MQAR vocabulary too small for {} values", self.pairs);
        ensure!(
            self.seq_len >= 4 * self.pairs,
            "MQAR length {} cannot hold {} pairs and their queries",
            self.seq_len,
            self.pairs
        );
        Ok(())
    }

    pub fn sample(&self, rng: &mut Rng) -> MqarExample {
        let (v, t, k) = (self.vocab, self.seq_len, self.pairs);
        let keys = distinct(rng, 1, v / 2, k);
        let values = distinct(rng, v / 2, v, k);
        let mut seq = vec![0u32; t + 1];
        for i in 0..k {
            seq[2 * i] = keys[i];
            seq[2 * i + 1] = values[i];
        }
        // free two-token slots after the pairs: slot j covers positions 2k + 2j, 2k + 2j + 1
        let slots = (t + 1 - 2 * k) / 2;
        let mut weights: Vec<f64> = (0..slots).map(|j| ((j + 1) as f64).powf(self.alpha - 1.0)).collect();
        let mut order: Vec<usize> = (0..k).collect();
        shuffle(rng, &mut order);
        let mut scored = vec![false; t];
        for &pair in &order {
            let total: f64 = weights.iter().sum();
            let mut r = rng.uniform() * total;
            let mut slot = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
            for (j, &w) in weights.iter().enumerate() {
                if w > 0.0 && r < w {
                    slot = j;
                    break;
                }
                r -= w;
            }
            weights[slot] = 0.0;
            let p = 2 * k + 2 * slot;
            seq[p] = keys[pair];
            seq[p + 1] = values[pair];
            scored[p] = true;
        }
        MqarExample { inputs: seq[..t].to_vec(), targets: seq[1..=t].to_vec(), scored }
    }

    /// `batch` examples as tensors: inputs `[B, T]` (u32), the scored positions as rows of
    /// the flattened `[B T]` (`[N]`, u32), and the value expected at each (`[N]`, u32). Only
    /// those rows need logits (see `Model::forward_at`).
    pub fn batch(&self, batch: usize, rng: &mut Rng, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let (mut xs, mut rows, mut ys) = (vec![], vec![], vec![]);
        for b in 0..batch {
            let e = self.sample(rng);
            for (p, _) in e.scored.iter().enumerate().filter(|(_, &s)| s) {
                rows.push((b * self.seq_len + p) as u32);
                ys.push(e.targets[p]);
            }
            xs.extend(e.inputs);
        }
        let n = rows.len();
        Ok((
            Tensor::from_vec(xs, (batch, self.seq_len), device)?,
            Tensor::from_vec(rows, n, device)?,
            Tensor::from_vec(ys, n, device)?,
        ))
    }
}

fn distinct(rng: &mut Rng, lo: usize, hi: usize, n: usize) -> Vec<u32> {
    let mut pool: Vec<u32> = (lo as u32..hi as u32).collect();
    for i in 0..n {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(n);
    pool
}

fn shuffle(rng: &mut Rng, xs: &mut [usize]) {
    for i in (1..xs.len()).rev() {
        xs.swap(i, rng.below(i + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_is_answered_by_its_pair_and_keys_are_unique() {
        for (t, k) in [(64, 4), (128, 8), (256, 16), (16, 4)] {
            let cfg = MqarConfig { vocab: 8192, seq_len: t, pairs: k, alpha: 0.01 };
            cfg.validate().unwrap();
            let mut rng = Rng::new(t as u64);
            for _ in 0..50 {
                let e = cfg.sample(&mut rng);
                assert_eq!((e.inputs.len(), e.targets.len(), e.scored.len()), (t, t, t));
                let keys: Vec<u32> = (0..k).map(|i| e.inputs[2 * i]).collect();
                let mut sorted = keys.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), k, "keys not unique");
                assert!(keys.iter().all(|&x| (1..4096).contains(&x)));
                let value_of = |key: u32| e.inputs[2 * keys.iter().position(|&x| x == key).unwrap() + 1];
                let queries: Vec<usize> = (0..t).filter(|&p| e.scored[p]).collect();
                assert_eq!(queries.len(), k, "one query per key");
                for &p in &queries {
                    assert!(p >= 2 * k);
                    assert_eq!(e.targets[p], value_of(e.inputs[p]));
                    assert!(e.targets[p] >= 4096);
                }
                // targets are the inputs shifted by one
                assert_eq!(&e.targets[..t - 1], &e.inputs[1..]);
            }
        }
    }

    #[test]
    fn generator_is_seeded() {
        let cfg = MqarConfig { vocab: 64, seq_len: 32, pairs: 4, alpha: 0.01 };
        let a = cfg.sample(&mut Rng::new(3));
        let b = cfg.sample(&mut Rng::new(3));
        let c = cfg.sample(&mut Rng::new(4));
        assert_eq!(a.inputs, b.inputs);
        assert_ne!(a.inputs, c.inputs);
        assert!(MqarConfig { vocab: 8, seq_len: 32, pairs: 4, alpha: 0.01 }.validate().is_err());
        // a batch's scored rows point at queried keys, and their targets are those keys' values
        let (x, rows, y) = cfg.batch(3, &mut Rng::new(5), &Device::Cpu).unwrap();
        let (x, rows, y) = (
            x.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            rows.to_vec1::<u32>().unwrap(),
            y.to_vec1::<u32>().unwrap(),
        );
        assert_eq!((rows.len(), y.len()), (3 * 4, 3 * 4));
        let mut rng = Rng::new(5);
        let examples: Vec<MqarExample> = (0..3).map(|_| cfg.sample(&mut rng)).collect();
        for (&r, &v) in rows.iter().zip(&y) {
            let (b, p) = (r as usize / 32, r as usize % 32);
            assert!(examples[b].scored[p]);
            assert_eq!((x[r as usize], v), (examples[b].inputs[p], examples[b].targets[p]));
        }
        assert!(MqarConfig { vocab: 64, seq_len: 15, pairs: 4, alpha: 0.01 }.validate().is_err());
    }
}
