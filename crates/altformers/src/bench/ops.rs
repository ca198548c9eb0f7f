//! `altformers bench ops`: the bare operations the peers in `bench/peers/` time, at their
//! shapes, printing the same JSON lines, so ours/peer ratios come from one run on one GPU:
//!
//! - `attention`: causal softmax attention, `q, k, v: [B, 16, T, 128]`, B x T = 64K tokens
//!   (peer: torch SDPA, flash backend);
//! - `retention`: chunkwise decayed linear attention with RetNet's per-head decays, same
//!   shape (peer: flash-linear-attention's `chunk_retention`);
//! - `longconv`: the causal FFT convolution of Hyena, `x: [64, 768, T]`, filters `[768, T]`,
//!   f32 as the peer (peer: `torch.fft.rfft` / `irfft`);
//!
//! and, with no external peer, ours against ours (M2, arXiv 2310.12109):
//!
//! - `monarch` and `dense`: the Monarch product `P L P^T R x` (random `[m, m, m]` blocks) and
//!   the dense matrix product of the same size, `x: [4096, N]`, `N = T` a square `m^2`;
//! - `longconv-monarch` and `longconv-fft`: M2's causal long convolution by Monarch DFTs and
//!   the FFT one, `x: [B, 768, T]` with `B T = 64K` tokens (at T = 1K the `longconv` shape),
//!   f32.
//!
//! Each runs whatever path the library takes on that device (the fused kernel on CUDA where
//! one exists), so this measures what a model actually gets.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::scaling::{BenchMode, ScalingPoint};
use super::time_it;
use crate::ops::attention::causal_attention;
use crate::ops::{decayed, fftconv};

pub const OPS: [&str; 7] =
    ["attention", "retention", "longconv", "monarch", "dense", "longconv-monarch", "longconv-fft"];

#[derive(Clone, Debug)]
pub struct OpsOptions {
    pub ops: Vec<String>,
    pub modes: Vec<BenchMode>,
    pub lengths: Vec<usize>,
    pub warmup: usize,
    pub reps: usize,
    /// Compute dtype of attention and retention (long convolution runs in f32, as the peer).
    pub dtype: DType,
    /// Lengths whose tensors (inputs, output and their gradients) would exceed this many
    /// bytes are recorded as skipped, not allocated.
    pub memory_cap_bytes: f64,
}

impl OpsOptions {
    pub fn validate(&self) -> Result<()> {
        check_ops(&self.ops)?;
        crate::util::counts_at_least_one(&[("--lengths", &self.lengths)])?;
        crate::util::positive(&[("--reps", self.reps as f64), ("--memory-cap-gb", self.memory_cap_bytes / 1e9)])
    }
}

const HEADS: usize = 16;
const HEAD_DIM: usize = 128;
const TOKENS: usize = 65536;
const CONV_BATCH: usize = 64;
const CONV_WIDTH: usize = 768;
const RETENTION_CHUNK: usize = 64;
const MONARCH_ROWS: usize = 4096;

/// Runs an op on its inputs.
type OpFn = Box<dyn Fn(&[Var]) -> candle_core::Result<Tensor>>;

/// One op's inputs (as variables, for the backward) and how to run it.
struct Case {
    inputs: Vec<Var>,
    run: OpFn,
    batch: usize,
    width: usize,
    heads: usize,
    /// Forward FLOPs, counted as the peer script counts them.
    flops_fwd: f64,
    /// FLOPs of forward + backward over forward, as the peer script counts them.
    bwd_factor: f64,
}

/// The shapes of `op`'s inputs at length `t`, each with its dtype (the long convolutions run
/// in f32, as their peers).
fn input_shapes(op: &str, t: usize, dtype: DType) -> Result<Vec<(Vec<usize>, DType)>> {
    let b = (TOKENS / t.max(1)).max(1);
    Ok(match op {
        "attention" | "retention" => vec![(vec![b, HEADS, t, HEAD_DIM], dtype); 3],
        "longconv" => vec![(vec![CONV_BATCH, CONV_WIDTH, t], DType::F32), (vec![CONV_WIDTH, t], DType::F32)],
        "dense" => vec![(vec![MONARCH_ROWS, t], dtype), (vec![t, t], dtype)],
        "monarch" => {
            let m = crate::ops::monarch::side(t)?;
            vec![(vec![MONARCH_ROWS, t], dtype), (vec![m, m, m], dtype), (vec![m, m, m], dtype)]
        }
        "longconv-monarch" | "longconv-fft" => {
            vec![(vec![b, CONV_WIDTH, t], DType::F32), (vec![CONV_WIDTH, t], DType::F32)]
        }
        other => bail!("unknown op `{other}`: choose from {}", OPS.join(", ")),
    })
}

/// A lower bound of the bytes one run of `op` at length `t` holds: its inputs, and as much
/// again for their gradients, the output and its gradient (each no larger than the inputs
/// together). Intermediates come on top; the cap is a guard against lengths that cannot fit
/// at all, not a prediction.
pub fn tensor_bytes(op: &str, t: usize, dtype: DType) -> Result<f64> {
    let inputs: f64 = input_shapes(op, t, dtype)?
        .iter()
        .map(|(dims, dt)| dims.iter().map(|&d| d as f64).product::<f64>() * dt.size_in_bytes() as f64)
        .sum();
    Ok(2.0 * inputs)
}

fn case(op: &str, t: usize, dtype: DType, dev: &Device) -> Result<Case> {
    let var = |dims: &[usize], dt: DType| -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(0f32, 1f32, dims, dev)?.to_dtype(dt)?)?)
    };
    Ok(match op {
        "attention" => {
            let b = (TOKENS / t).max(1);
            let dims = [b, HEADS, t, HEAD_DIM];
            Case {
                inputs: vec![var(&dims, dtype)?, var(&dims, dtype)?, var(&dims, dtype)?],
                run: Box::new(|x| causal_attention(&x[0], &x[1], &x[2], 0)),
                batch: b,
                width: HEADS * HEAD_DIM,
                heads: HEADS,
                flops_fwd: 2.0 * (b * HEADS * t * t * HEAD_DIM) as f64,
                bwd_factor: 3.5,
            }
        }
        "retention" => {
            let b = (TOKENS / t).max(1);
            let dims = [b, HEADS, t, HEAD_DIM];
            // RetNet's decays, gamma_h = 1 - 2^(-5-h)
            let log_gamma: Vec<f32> = (0..HEADS).map(|h| (1.0 - 2f64.powi(-5 - h as i32)).ln() as f32).collect();
            let log_gamma = Tensor::from_vec(log_gamma, HEADS, dev)?.to_dtype(dtype)?;
            Case {
                inputs: vec![var(&dims, dtype)?, var(&dims, dtype)?, var(&dims, dtype)?],
                run: Box::new(move |x| {
                    Ok(decayed::linear_chunked(&x[0], &x[1], &x[2], &log_gamma, RETENTION_CHUNK, None)?.0)
                }),
                batch: b,
                width: HEADS * HEAD_DIM,
                heads: HEADS,
                flops_fwd: (4 * b * HEADS * t * RETENTION_CHUNK * HEAD_DIM + 4 * b * HEADS * t * HEAD_DIM * HEAD_DIM)
                    as f64,
                bwd_factor: 3.0,
            }
        }
        "longconv" => {
            let n = (2 * t) as f64;
            Case {
                inputs: vec![var(&[CONV_BATCH, CONV_WIDTH, t], DType::F32)?, var(&[CONV_WIDTH, t], DType::F32)?],
                run: Box::new(|x| fftconv::causal_conv(&x[0], &x[1])),
                batch: CONV_BATCH,
                width: CONV_WIDTH,
                heads: 1,
                flops_fwd: (CONV_BATCH * CONV_WIDTH) as f64 * (15.0 * n * n.log2() + 6.0 * n),
                bwd_factor: 3.0,
            }
        }
        "monarch" | "dense" => {
            let dense = op == "dense";
            let m = if dense { 0 } else { crate::ops::monarch::side(t)? };
            let weights =
                if dense { vec![var(&[t, t], dtype)?] } else { vec![var(&[m, m, m], dtype)?, var(&[m, m, m], dtype)?] };
            let mut inputs = vec![var(&[MONARCH_ROWS, t], dtype)?];
            inputs.extend(weights);
            Case {
                inputs,
                run: if dense {
                    Box::new(|x| x[0].matmul(&x[1].t()?))
                } else {
                    Box::new(|x| crate::ops::monarch::multiply(&x[0], &x[1], &x[2]))
                },
                batch: MONARCH_ROWS,
                width: t,
                heads: 1,
                flops_fwd: if dense {
                    2.0 * (MONARCH_ROWS * t * t) as f64
                } else {
                    4.0 * (MONARCH_ROWS * t * m) as f64
                },
                bwd_factor: 3.0,
            }
        }
        "longconv-monarch" | "longconv-fft" => {
            let b = (TOKENS / t).max(1);
            let rows = (b * CONV_WIDTH) as f64;
            let monarch = op == "longconv-monarch";
            let flops_fwd = if monarch {
                // a transform of a real row and the inverse to a real row: 12 n m + 6 n each;
                // the filters' transforms once; the spectral product
                let n = crate::ops::monarch::dft::conv_len(t, t) as f64;
                let transform = 12.0 * n * n.sqrt() + 6.0 * n;
                rows * (2.0 * transform + 6.0 * n) + CONV_WIDTH as f64 * transform
            } else {
                let n = (2 * t) as f64;
                rows * (15.0 * n * n.log2() + 6.0 * n)
            };
            Case {
                inputs: vec![var(&[b, CONV_WIDTH, t], DType::F32)?, var(&[CONV_WIDTH, t], DType::F32)?],
                run: if monarch {
                    Box::new(|x| crate::ops::monarch::dft::causal_conv(&x[0], &x[1]))
                } else {
                    Box::new(|x| fftconv::causal_conv(&x[0], &x[1]))
                },
                batch: b,
                width: CONV_WIDTH,
                heads: 1,
                flops_fwd,
                bwd_factor: 3.0,
            }
        }
        other => bail!("unknown op `{other}`: choose from {}", OPS.join(", ")),
    })
}

/// An error naming the first op that is not one of [`OPS`].
pub fn check_ops(ops: &[String]) -> Result<()> {
    if let Some(op) = ops.iter().find(|op| !OPS.contains(&op.as_str())) {
        bail!("unknown op `{op}`: choose from {}", OPS.join(", "));
    }
    Ok(())
}

/// Measures every (op, length, mode); a failure at one point (out of memory, unsupported
/// shape) is recorded in its status and the run goes on.
pub fn run(opts: &OpsOptions, device: &Device, mut on_point: impl FnMut(&ScalingPoint)) -> Result<Vec<ScalingPoint>> {
    opts.validate()?;
    let mut points = Vec::new();
    let device_name = if device.is_cpu() { "cpu" } else { "cuda" }.to_string();
    for op in &opts.ops {
        for &t in &opts.lengths {
            for &mode in &opts.modes {
                let mut point = ScalingPoint {
                    model: "altformers".into(),
                    component: op.clone(),
                    mode,
                    device: device_name.clone(),
                    seq: t,
                    batch: 0,
                    width: 0,
                    heads: 0,
                    status: "ok".into(),
                    timing: None,
                    peak_bytes: None,
                    flops: 0.0,
                    flops_per_s: None,
                    samples_s: vec![],
                    process_samples_s: vec![],
                };
                let bytes = tensor_bytes(op, t, opts.dtype).unwrap_or(0.0);
                if bytes > opts.memory_cap_bytes {
                    point.status =
                        format!("skipped: its tensors alone take {:.1} GB, over the memory cap", bytes / 1e9);
                    on_point(&point);
                    points.push(point);
                    continue;
                }
                let measured = (|| -> Result<()> {
                    let c = case(op, t, opts.dtype, device)?;
                    (point.batch, point.width, point.heads) = (c.batch, c.width, c.heads);
                    point.flops = match mode {
                        BenchMode::Fwd => c.flops_fwd,
                        BenchMode::Fwdbwd => c.bwd_factor * c.flops_fwd,
                    };
                    let out_grad = (c.run)(&c.inputs)?.randn_like(0.0, 1.0)?;
                    let run_once = || {
                        let y = (c.run)(&c.inputs)?;
                        if mode == BenchMode::Fwdbwd {
                            drop(super::backward_with(&y, &out_grad)?);
                        }
                        Ok(())
                    };
                    let timing = time_it(device, opts.warmup, opts.reps, run_once)?;
                    point.peak_bytes = super::alloc::peak_during(device, run_once)?;
                    point.flops_per_s = Some(point.flops / timing.median_s);
                    point.timing = Some(timing);
                    Ok(())
                })();
                if let Err(e) = measured {
                    point.status = super::failure(&e);
                }
                on_point(&point);
                points.push(point);
            }
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length whose tensors cannot fit is recorded as skipped without allocating them (a
    /// dense [T, T] weight at T = 2^20 is 4 TB), and the run goes on.
    #[test]
    fn lengths_over_the_memory_cap_are_skipped_unallocated() -> Result<()> {
        let opts = OpsOptions {
            ops: vec!["dense".into()],
            modes: vec![BenchMode::Fwd],
            lengths: vec![1 << 20, 16],
            warmup: 0,
            reps: 1,
            dtype: DType::F32,
            memory_cap_bytes: 1e9,
        };
        let points = run(&opts, &Device::Cpu, |_| {})?;
        assert!(points[0].status.starts_with("skipped") && points[0].status.contains("GB"), "{}", points[0].status);
        assert!(points[1].timing.is_some(), "{}", points[1].status);
        assert!(tensor_bytes("dense", 1 << 20, DType::F32)? > 4e12);
        Ok(())
    }

    /// The Monarch product and its dense peer run at a square N and record why at any other
    /// (the run goes on), with the FLOPs each is counted for.
    #[test]
    fn monarch_and_dense_run_and_a_non_square_size_is_recorded() -> Result<()> {
        let opts = OpsOptions {
            ops: vec!["monarch".into(), "dense".into()],
            modes: vec![BenchMode::Fwd, BenchMode::Fwdbwd],
            lengths: vec![16, 20],
            warmup: 0,
            reps: 1,
            dtype: DType::F32,
            memory_cap_bytes: 1e9,
        };
        let points = run(&opts, &Device::Cpu, |_| {})?;
        assert_eq!(points.len(), 8);
        let at = |op: &str, t: usize| points.iter().find(|p| p.component == op && p.seq == t).unwrap();

        assert!(
            at("monarch", 16).timing.is_some() && at("dense", 16).timing.is_some() && at("dense", 20).timing.is_some()
        );
        let status = &at("monarch", 20).status;
        assert!(status.starts_with("failed") && status.contains("not a positive square"), "{status}");
        // 4 m N per row against 2 N^2: N / (2 m) = 2 times fewer at N = 16
        assert_eq!(at("dense", 16).flops / at("monarch", 16).flops, 2.0);
        assert!(
            check_ops(&["longconv-monarch".into(), "longconv-fft".into()]).is_ok()
                && check_ops(&["fft".into()]).is_err()
        );
        Ok(())
    }
}
