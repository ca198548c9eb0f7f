//! Inverted dropout with a counter-based mask: element `i` of a tensor is kept iff
//! `bits(seed, i) >= p 2^32`, where `bits` is a fixed 32-bit hash of the seed and the index,
//! and kept elements are scaled by `1 / (1 - p)`.
//!
//! Why a hash and not a stream of random numbers: the mask is a pure function of `(seed, i)`,
//! so the forward computes it in the same pass that applies it, the backward recomputes it
//! instead of storing it (dropout is linear: its backward is the same op on the gradient),
//! and the CPU and the CUDA kernel draw the same mask, which makes the kernel testable
//! exactly against the CPU. It replaces, on the GPU, a curand generator seeded per call
//! (about 180 us each on the H200), a uniform draw into an f32 tensor, a comparison, two
//! casts and two products: about a third of the baby GPT's training step
//! (bench/results/2026-12-03-h200-train-speed). The seed comes from the caller's [`Rng`], so
//! masks are reproducible and a resumed run repeats an uninterrupted one.
//!
//! The hash is two rounds of Wellons' `lowbias32` (a 32-bit integer mix with near-ideal
//! avalanche), keyed by the seed's halves: `mix(mix(lo(i) ^ lo(s)) ^ hi(i) ^ hi(s))`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, Real};
use crate::rng::Rng;

/// `x` with each element dropped with probability `p` (`0 <= p < 1`) and the rest scaled by
/// `1 / (1 - p)`, the mask drawn with a seed from `rng`.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    let Some(mut op) = draw(p, rng)? else { return Ok(x.clone()) };
    match rng.positions() {
        // a sequence-parallel worker's slice of every row (of its micro-batch's rows, the
        // batch's from row `shard x rows`): its part of each row of the mask
        Some((rank, world)) => {
            let rows = x.dim(0)?.max(1) as u64;
            let row = x.elem_count() as u64 / rows;
            (op.first, op.row, op.stride) = ((rng.shard() * rows * world + rank) * row, row, world * row);
        }
        // a data-parallel worker's slice of the batch: its part of the whole batch's mask
        None => op.first = rng.shard() * x.elem_count() as u64,
    }
    if fused(x) {
        return x.contiguous()?.apply_op1(op);
    }
    // Other dtypes and devices: the same mask, built on the host.
    let mask = Tensor::from_vec(op.mask(x.elem_count()), x.shape(), &candle_core::Device::Cpu)?;
    x * mask.to_device(x.device())?.to_dtype(x.dtype())?
}

/// The dropout of probability `p` with its seed drawn from `rng` (one draw), or `None` for
/// `p <= 0`; every user of a mask (this module's op, the flash attention kernels) draws it
/// here, so that the fused and unfused paths of one computation draw the same mask.
pub fn draw(p: f64, rng: &mut Rng) -> Result<Option<Dropout>> {
    if p <= 0.0 {
        return Ok(None);
    }
    if p >= 1.0 || p.is_nan() {
        candle_core::bail!("dropout probability must be below 1, got {p}");
    }
    Ok(Some(Dropout::new(p, rng.next_u64())))
}

/// Whether [`dropout`] runs the op on `x` (CPU f32/f64, CUDA f32/bf16).
fn fused(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if crate::kernels::dropout::supports(x) {
        return true;
    }
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Wellons' `lowbias32` integer hash.
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The 32 random bits of element `i` under `seed` (the CUDA kernel computes the same).
pub fn bits(seed: u64, i: u64) -> u32 {
    mix32(mix32(i as u32 ^ seed as u32) ^ (i >> 32) as u32 ^ (seed >> 32) as u32)
}

/// One dropout: its probability as the integer threshold of [`bits`], the scale, the seed.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    /// Element `i` is kept iff `bits(seed, i) >= threshold` (`round(p 2^32)`).
    pub threshold: u32,
    pub scale: f64,
    pub seed: u64,
    /// The index in the mask of this tensor's first element: 0, or where a data-parallel
    /// worker's slice of the batch starts ([`Rng::shard`]), or a sequence-parallel worker's
    /// slice of the first row.
    pub first: u64,
    /// Elements of a row of this tensor when it holds a slice of every row of the whole mask
    /// (sequence parallelism), each row `stride` apart there; 0: one contiguous run.
    pub row: u64,
    pub stride: u64,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        let threshold = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
        Self { threshold, scale: 1.0 / (1.0 - p), seed, first: 0, row: 0, stride: 0 }
    }

    /// Where this tensor's element `i` is in the whole mask (the CUDA kernel computes the same).
    fn index(&self, i: u64) -> u64 {
        match self.row {
            0 => self.first + i,
            row => self.first + i / row * self.stride + i % row,
        }
    }

    fn keeps(&self, i: u64) -> bool {
        bits(self.seed, self.index(i)) >= self.threshold
    }

    /// The multiplier of each of the first `n` elements: `scale` where kept, else 0.
    pub fn mask(&self, n: usize) -> Vec<f32> {
        (0..n as u64).map(|i| if self.keeps(i) { self.scale as f32 } else { 0.0 }).collect()
    }

    fn apply<T: Real>(&self, x: &[T]) -> Vec<T> {
        const BLOCK: usize = 1 << 14;
        let scale = T::narrow(self.scale);
        let mut y = x.to_vec();
        y.par_chunks_mut(BLOCK).enumerate().for_each(|(b, ys)| {
            let start = (b * BLOCK) as u64;
            for (j, v) in ys.iter_mut().enumerate() {
                *v = if self.keeps(start + j as u64) { *v * scale } else { T::zero() };
            }
        });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.apply(contiguous(x, l, "dropout: input")?)),
            CpuStorage::F64(x) => CpuStorage::F64(self.apply(contiguous(x, l, "dropout: input")?)),
            _ => candle_core::bail!("dropout op: f32 or f64 on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        Ok((crate::kernels::dropout::forward(s, l, self)?, l.shape().clone()))
    }

    /// Linear in `x` with the same mask: the gradient goes through the same op.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(x.dtype())?.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The kept share is 1 - p (to sampling error over 200K elements), kept values are
    /// scaled, and the mean is preserved.
    #[test]
    fn keeps_one_minus_p_and_preserves_the_mean() -> Result<()> {
        let n = 200_000;
        let x = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        for p in [0.1, 0.2, 0.5, 0.9] {
            let y: Vec<f32> = dropout(&x, p, &mut Rng::new(7))?.to_vec1()?;
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            // 5 standard deviations of a binomial share
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {kept}");
            assert!(y.iter().all(|&v| v == 0.0 || (v as f64 - 1.0 / (1.0 - p)).abs() < 1e-6));
        }
        Ok(())
    }

    /// Neighbouring elements and neighbouring seeds are uncorrelated: the mask of seed s and
    /// of seed s + 1 agree where independent masks would (p^2 + (1-p)^2 of the time), and
    /// runs of kept elements have the geometric lengths of independent draws.
    #[test]
    fn masks_look_independent_across_elements_and_seeds() {
        let (n, p) = (100_000u64, 0.3);
        let (a, b) = (Dropout::new(p, 41), Dropout::new(p, 42));
        let agree = (0..n).filter(|&i| a.keeps(i) == b.keeps(i)).count() as f64 / n as f64;
        let expected = p * p + (1.0 - p) * (1.0 - p);
        assert!((agree - expected).abs() < 0.01, "seeds agree {agree}, independent {expected}");
        let both_kept = (0..n - 1).filter(|&i| a.keeps(i) && a.keeps(i + 1)).count() as f64 / (n - 1) as f64;
        assert!((both_kept - (1.0 - p) * (1.0 - p)).abs() < 0.01, "neighbours kept together {both_kept}");
    }

    /// The backward is the same mask and scale on the gradient (f64, against the mask built
    /// on the host), and the same seed draws the same mask.
    #[test]
    fn backward_applies_the_forward_mask() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5, 7), &dev)?)?;
        let g = Tensor::randn(0f64, 1.0, (3, 5, 7), &dev)?;
        let y = dropout(x.as_tensor(), 0.25, &mut Rng::new(3))?;
        // the host mask holds the scale in f32: rebuilt from its zeros at f64's scale
        let kept = Tensor::from_vec(Dropout::new(0.25, Rng::new(3).next_u64()).mask(105), (3, 5, 7), &dev)?;
        let mask = (kept.ne(0f32)?.to_dtype(DType::F64)? * (1.0 / 0.75))?;
        assert!(crate::testing::max_abs_diff(&y, &(x.as_tensor() * &mask)?)? < 1e-15);
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).unwrap();
        assert!(crate::testing::max_abs_diff(dx, &(&g * &mask)?)? < 1e-15);
        let again = dropout(x.as_tensor(), 0.25, &mut Rng::new(3))?;
        assert_eq!(crate::testing::max_abs_diff(&y, &again)?, 0.0);
        Ok(())
    }

    /// Sequence parallelism: the masks of the slices of every row (`Rng::for_positions`), put
    /// side by side, are the whole tensor's mask, and a worker's backward is its slice's.
    #[test]
    fn slices_of_every_sequence_make_the_whole_mask() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (2, 12, 5), &candle_core::Device::Cpu)?;
        let whole = dropout(&x, 0.5, &mut Rng::new(21))?;
        for world in [2, 3, 4] {
            let len = 12 / world;
            let parts = (0..world)
                .map(|r| {
                    dropout(&x.narrow(1, r * len, len)?, 0.5, &mut Rng::new(21).for_positions(r as u64, world as u64))
                })
                .collect::<Result<Vec<_>>>()?;
            assert_eq!(crate::testing::max_abs_diff(&Tensor::cat(&parts, 1)?, &whole)?, 0.0, "{world} slices");
        }
        Ok(())
    }

    /// Sequence parallelism with gradient accumulation: each worker's slice of the positions
    /// of each micro-batch's rows (`for_positions(rank, world).for_slice(j, k)`), put in place,
    /// make the whole tensor's mask.
    #[test]
    fn micro_batches_of_every_sequence_slice_make_the_whole_mask() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (4, 12, 3), &candle_core::Device::Cpu)?;
        let whole = dropout(&x, 0.5, &mut Rng::new(5))?;
        for (world, micro) in [(2, 2), (3, 4), (4, 1)] {
            let (len, rows) = (12 / world, 4 / micro);
            let mut micro_batches = Vec::new();
            for j in 0..micro {
                let slices = (0..world)
                    .map(|r| {
                        let part = x.narrow(0, j * rows, rows)?.narrow(1, r * len, len)?;
                        let mut rng =
                            Rng::new(5).for_positions(r as u64, world as u64).for_slice(j as u64, micro as u64);
                        dropout(&part, 0.5, &mut rng)
                    })
                    .collect::<Result<Vec<_>>>()?;
                micro_batches.push(Tensor::cat(&slices, 1)?);
            }
            let diff = crate::testing::max_abs_diff(&Tensor::cat(&micro_batches, 0)?, &whole)?;
            assert_eq!(diff, 0.0, "{world} slices of the positions x {micro} micro-batches");
        }
        Ok(())
    }

    /// Data parallelism with gradient accumulation: each worker's micro-batches
    /// (`Rng::for_shard(rank).for_slice(j, k)`), in rank then micro-batch order, make the
    /// whole batch's mask.
    #[test]
    fn micro_batches_of_every_worker_make_the_whole_mask() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (12, 3, 5), &candle_core::Device::Cpu)?;
        let whole = dropout(&x, 0.5, &mut Rng::new(9))?;
        for (world, micro) in [(1, 3), (2, 2), (3, 4), (2, 6)] {
            let rows = 12 / (world * micro);
            let mut parts = Vec::new();
            for r in 0..world {
                for j in 0..micro {
                    let mut rng = Rng::new(9).for_shard(r as u64).for_slice(j as u64, micro as u64);
                    parts.push(dropout(&x.narrow(0, (r * micro + j) * rows, rows)?, 0.5, &mut rng)?);
                }
            }
            let diff = crate::testing::max_abs_diff(&Tensor::cat(&parts, 0)?, &whole)?;
            assert_eq!(diff, 0.0, "{world} workers x {micro} micro-batches");
        }
        Ok(())
    }

    #[test]
    fn a_probability_of_one_is_refused() {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let err = dropout(&x, 1.0, &mut Rng::new(1)).unwrap_err().to_string();
        assert!(err.contains("below 1"), "{err}");
    }
}
