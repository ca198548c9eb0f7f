//! `altformers bench performer-error`: how far causal FAVOR+ (Performer, arXiv 2009.14794)
//! is from exact causal softmax attention as the number of random features `m` grows, for
//! orthogonal and iid features; one JSON row per `(input_std, m)`.
//!
//! Queries, keys and values are Gaussian, `[1, heads, T, d_h]`, entries of standard deviation
//! `input_std` for queries and keys (logits `q . k / sqrt(d_h)` then have standard deviation
//! `input_std^2`; the estimator's variance grows as `exp(|x + y|^2)` with `x = q d_h^-1/4`), 1
//! for values. The error is `|Y~ - Y|_F / |Y|_F` ([`approximation_error`]), computed in f64 on
//! the CPU, its mean and standard deviation over `draws` independent feature draws.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::mixers::performer::{approximation_error, MAX_FEATURES};
use crate::rng::{stream, Rng};

/// The bench's settings; also a comparison preset's `[performer_error]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerformerErrorOptions {
    pub head_dim: usize,
    pub heads: usize,
    pub length: usize,
    pub input_stds: Vec<f64>,
    pub features: Vec<usize>,
    pub draws: usize,
    pub seed: u64,
}

impl Default for PerformerErrorOptions {
    /// Performer's default head width, a 256-token sequence, four input scales, m from 16 to
    /// 4096, 16 draws: the recorded run (`bench/results/2026-12-02-cpu-performer-error/`).
    fn default() -> Self {
        Self {
            head_dim: 64,
            heads: 4,
            length: 256,
            input_stds: vec![0.25, 0.5, 0.75, 1.0],
            features: vec![16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
            draws: 16,
            seed: 0,
        }
    }
}

/// One row: the error's mean and standard deviation over the draws, for each feature kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PerformerErrorRow {
    pub bench: String,
    pub head_dim: usize,
    pub heads: usize,
    pub length: usize,
    pub input_std: f64,
    pub features: usize,
    pub draws: usize,
    pub orthogonal_mean: f64,
    pub orthogonal_sd: f64,
    pub iid_mean: f64,
    pub iid_sd: f64,
}

/// Mean and sample standard deviation.
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

impl PerformerErrorOptions {
    /// Checked at the start of [`run`], whether the settings came from the command line or a
    /// `compare` preset's `[performer_error]` table.
    pub fn validate(&self) -> Result<()> {
        crate::util::positive(&[
            ("--head-dim", self.head_dim as f64),
            ("--heads", self.heads as f64),
            ("--length", self.length as f64),
            ("--draws", self.draws as f64),
        ])?;
        if let Some(m) = self.features.iter().find(|&&m| m == 0 || m > MAX_FEATURES) {
            bail!("--features: {m} is not in 1..={MAX_FEATURES}");
        }
        if let Some(s) = self.input_stds.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("--input-stds: {s} is not a positive number");
        }
        // q, k, v and the output, and per head the exact scores (T x T) and both feature maps
        // (T x m), all f64: refused with the figure before anything is allocated (a --length of
        // 10^12 aborted in the allocator)
        let (h, t, dh) = (self.heads as f64, self.length as f64, self.head_dim as f64);
        let m = self.features.iter().max().copied().unwrap_or(0) as f64;
        crate::model::size::check_or_lower(
            8.0 * h * t * (4.0 * dh + t + 2.0 * m),
            || format!("{} heads of {} x {} inputs", self.heads, self.length, self.head_dim),
            "--heads, --length, --head-dim or --features",
        )?;
        Ok(())
    }
}

pub fn run(opts: &PerformerErrorOptions, mut on_row: impl FnMut(&PerformerErrorRow)) -> Result<Vec<PerformerErrorRow>> {
    opts.validate()?;
    let shape = [1, opts.heads, opts.length, opts.head_dim];
    let n: usize = shape.iter().product();
    let gaussian = |index: u64, std: f64| -> Result<Tensor> {
        let v: Vec<f64> = {
            let mut rng = Rng::derive(opts.seed, stream::TEST, index);
            (0..n).map(|_| rng.normal() * std).collect()
        };
        Ok(Tensor::from_vec(v, &shape[..], &Device::Cpu)?.to_dtype(DType::F64)?)
    };
    let mut rows = Vec::new();
    for &input_std in &opts.input_stds {
        let (q, k, v) = (gaussian(0, input_std)?, gaussian(1, input_std)?, gaussian(2, 1.0)?);
        for &m in &opts.features {
            let errors = |orthogonal: bool| -> Result<Vec<f64>> {
                (0..opts.draws)
                    .map(|draw| {
                        let mut rng = Rng::derive(opts.seed, stream::FEATURES, ((m as u64) << 32) ^ draw as u64);
                        Ok(approximation_error(&q, &k, &v, m, orthogonal, &mut rng)?)
                    })
                    .collect()
            };
            let (orthogonal_mean, orthogonal_sd) = mean_sd(&errors(true)?);
            let (iid_mean, iid_sd) = mean_sd(&errors(false)?);
            let row = PerformerErrorRow {
                bench: "performer-error".into(),
                head_dim: opts.head_dim,
                heads: opts.heads,
                length: opts.length,
                input_std,
                features: m,
                draws: opts.draws,
                orthogonal_mean,
                orthogonal_sd,
                iid_mean,
                iid_sd,
            };
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn performer_error_bench_writes_one_row_per_point_and_refuses_bad_input() -> Result<()> {
        let mut opts = PerformerErrorOptions {
            head_dim: 8,
            heads: 1,
            length: 16,
            input_stds: vec![0.5],
            features: vec![8, 512],
            draws: 3,
            seed: 0,
        };
        let rows = run(&opts, |_| {})?;
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.orthogonal_mean > 0.0 && r.iid_mean > 0.0 && r.orthogonal_sd > 0.0));
        assert!(rows[1].orthogonal_mean < rows[0].orthogonal_mean && rows[1].iid_mean < rows[0].iid_mean);
        opts.features = vec![0];
        assert!(run(&opts, |_| {}).unwrap_err().to_string().contains("--features"));
        opts.features = vec![8];
        opts.input_stds = vec![-1.0];
        assert!(run(&opts, |_| {}).unwrap_err().to_string().contains("--input-stds"));
        opts.input_stds = vec![0.5];
        opts.draws = 0;
        assert!(run(&opts, |_| {}).unwrap_err().to_string().contains("--draws must be a positive number"));
        // inputs beyond memory: refused with the figure, where the allocator aborted
        opts.draws = 1;
        opts.length = 1 << 40;
        let err = run(&opts, |_| {}).unwrap_err().to_string();
        assert!(err.contains("needs about") && err.contains("--length"), "{err}");
        Ok(())
    }
}
