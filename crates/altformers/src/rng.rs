//! A tiny seedable random number generator.
//!
//! candle's CPU backend cannot be seeded, so everything random in altformers (initial
//! weights, batch offsets, dropout masks, sampling) draws from this generator instead.
//! Streams are derived from `(seed, purpose, step)`, which makes every batch and every
//! dropout mask a pure function of the step: resuming a run needs only the seed and the step.

/// SplitMix64 (Steele, Lea, Flood 2014): one `u64` of state, passes BigCrush.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
    /// Which slice of the batch's rows this stream's dropout masks are for, in units of the
    /// slice (data-parallel workers: the rank; a micro-batch: its place; 0 alone), so that each
    /// draws its own part of the whole batch's masks.
    shard: u64,
    /// `(rank, world)` where every sequence is split into `world` slices of positions and the
    /// masks are for slice `rank` (sequence-parallel workers); `world` 0 otherwise.
    positions: (u64, u64),
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed, shard: 0, positions: (0, 0) }
    }

    /// This stream for slice `rank` of `world` of every sequence (sequence parallelism): a
    /// mask over a tensor `[B, L, ..]` is, row by row, positions `rank L ..` of the whole
    /// sequences' mask ([`Rng::positions`]).
    pub fn for_positions(mut self, rank: u64, world: u64) -> Self {
        self.positions = (rank, world);
        self
    }

    /// `(rank, world)` where every sequence is split ([`Rng::for_positions`]).
    pub fn positions(&self) -> Option<(u64, u64)> {
        (self.positions.1 > 1).then_some(self.positions)
    }

    /// This stream for slice `shard` of every batch ([`Rng::shard`]).
    pub fn for_shard(mut self, shard: u64) -> Self {
        self.shard = shard;
        self
    }

    /// This stream for slice `index` of `count` equal slices of its own rows (a micro-batch,
    /// or a thread's part of one): slice `shard x count + index` of the whole batch's rows,
    /// in units of the slice (of every sequence's positions as before, where they are split).
    pub fn for_slice(mut self, index: u64, count: u64) -> Self {
        self.shard = self.shard * count + index;
        self
    }

    /// The slice of the batch's rows the dropout masks drawn from this stream are for: a mask
    /// over a tensor of `n` elements starts at element `shard x n` of the whole batch's mask
    /// (the batch is the outermost dimension of every tensor dropout meets; rows of whole
    /// sequences, where they are split, [`Rng::positions`]).
    pub fn shard(&self) -> u64 {
        self.shard
    }

    /// An independent stream for `(seed, purpose, index)`.
    pub fn derive(seed: u64, purpose: u64, index: u64) -> Self {
        let mut r = Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(purpose.wrapping_add(1)));
        let a = r.next_u64();
        Rng::new(a ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal by Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| (lo + (hi - lo) * self.uniform()) as f32).collect()
    }
}

/// Purposes for [`Rng::derive`], so no two uses share a stream.
pub mod stream {
    pub const INIT: u64 = 1;
    pub const TRAIN_BATCH: u64 = 2;
    pub const EVAL_BATCH: u64 = 3;
    pub const DROPOUT: u64 = 4;
    pub const SAMPLE: u64 = 5;
    pub const TEST: u64 = 6;
    /// Random features (Performer), per (layer, redraw epoch).
    pub const FEATURES: u64 = 7;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::derive(7, 1, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::derive(7, 1, 3).next_u64(), Rng::derive(7, 1, 4).next_u64());
        assert_ne!(Rng::derive(7, 1, 3).next_u64(), Rng::derive(7, 2, 3).next_u64());
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(1);
        let xs: Vec<f64> = (0..200_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
