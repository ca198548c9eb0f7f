//! Measurement: scaling of one layer against T, decoding cost against context, fitted
//! exponents and crossovers. Timing is median-of-N after warm-up, with the device
//! synchronized before every clock read.

pub mod alloc;
pub mod decode;
pub mod fit;
pub mod ops;
pub mod performer_error;
pub mod scaling;
pub mod sequence_parallel;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use std::time::Instant;

/// The backward pass from the output gradient `dy`, as PyTorch's `y.backward(dy)`. candle
/// starts a backward pass from a scalar only, and any scalar built from `y` with its tensor
/// ops costs a pass over `y` and another in the backward (`(y * dy).sum_all()` reduces in one
/// block per output: 4.8 ms for a 50M-element tensor on the H200; a `[1, N] x [N, 1]`
/// product runs cuBLAS's k = N path: 1.3 ms each way). The root here is [`SeedGradient`]:
/// a scalar computed from nothing whose backward hands `y` exactly `dy`.
pub fn backward_with(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    y.apply_op1(SeedGradient { dy: dy.clone() })?.backward()
}

/// The root of [`backward_with`]: forward, a zero scalar (no pass over the input); backward,
/// the stored `dy`. Valid only as the root of a backward pass, where the incoming gradient
/// is one.
struct SeedGradient {
    dy: Tensor,
}

impl candle_core::CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "bench-seed-gradient"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((s.device().zeros_impl(&().into(), s.dtype())?, ().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((s.device().zeros_impl(&().into(), s.dtype())?, ().into()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.dy.clone()))
    }
}

/// Median, min and max seconds of `reps` runs of `f` after `warmup` runs.
pub fn time_it(device: &Device, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    // no capacity reserved for `reps`: a huge count would abort in the allocator, where it
    // should only take long
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        device.synchronize()?;
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(Timing::from_samples(times))
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub reps: usize,
}

impl Timing {
    pub fn from_samples(mut times: Vec<f64>) -> Self {
        times.sort_by(f64::total_cmp);
        let n = times.len();
        let median = if n % 2 == 1 { times[n / 2] } else { 0.5 * (times[n / 2 - 1] + times[n / 2]) };
        Timing { median_s: median, min_s: times[0], max_s: times[n - 1], reps: n }
    }
}

/// A byte count that a `compare` preset writes in gigabytes (`memory_cap_gb`), for serde's
/// `with`.
pub(crate) mod gigabytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(bytes / 1e9)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(f64::deserialize(d)? * 1e9)
    }
}

/// A point's status after error `e`: its first line only (candle's CUDA errors carry a
/// backtrace, which would break the report's tables).
pub fn failure(e: &impl std::fmt::Display) -> String {
    format!("failed: {}", e.to_string().lines().next().unwrap_or(""))
}

/// What a `compare` preset's bench runs compute in (f32), for serde's `default`.
pub(crate) fn preset_dtype() -> candle_core::DType {
    candle_core::DType::F32
}

/// Machine, date and commit, for every recorded figure.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    pub date: String,
    pub machine: String,
    pub device: String,
    pub commit: String,
    pub command: String,
}

impl Provenance {
    pub fn capture(device: &Device) -> Self {
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let device_name = match device {
            // the threads candle splits work over (RAYON_NUM_THREADS, set by --threads or
            // the preset), not the machine's
            Device::Cpu => match candle_core::utils::get_num_threads() {
                1 => "cpu (1 thread)".to_string(),
                n => format!("cpu ({n} threads)"),
            },
            _ => run("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"])
                .map(|s| s.lines().next().unwrap_or("").to_string())
                .unwrap_or_else(|| "cuda".into()),
        };
        let dirty =
            run("git", &["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()).unwrap_or(false);
        Provenance {
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into()),
            machine: format!("{cpu}, {cores} threads"),
            device: device_name,
            // the commit the binary was built from where the build recorded it (a binary
            // carried to another machine runs beside some other checkout), else this checkout's
            commit: option_env!("ALTFORMERS_COMMIT")
                .map(String::from)
                .or_else(|| {
                    run("git", &["rev-parse", "--short=12", "HEAD"]).map(
                        |c| {
                            if dirty {
                                format!("{c}+dirty")
                            } else {
                                c
                            }
                        },
                    )
                })
                .unwrap_or_else(|| "unknown".into()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

#[cfg(test)]
mod seed_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The seeded backward gives what the (slower) scalar `sum(y * dy)` gives.
    #[test]
    fn backward_with_hands_y_its_output_gradient() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu)?)?;
        let dy = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu)?;
        let y = (x.as_tensor().sqr()? * 3.0)?;
        let seeded = backward_with(&y, &dy)?.get(x.as_tensor()).unwrap().clone();
        let reference = (&y * &dy)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().clone();
        let diff = (seeded - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "differs by {diff}");
        Ok(())
    }
}
