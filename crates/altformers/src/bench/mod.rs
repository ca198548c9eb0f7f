//! Measurement: scaling of one layer against T, decoding cost against context, fitted
//! exponents and crossovers. Timing is median-of-N after warm-up, with the device
//! synchronized before every clock read.

pub mod alloc;
pub mod decode;
pub mod fit;
pub mod ops;
pub mod scaling;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use std::time::Instant;

/// The backward pass from the output gradient `dy`, as PyTorch's `y.backward(dy)`: the
/// scalar `<y, dy>` as a `[1, N] x [N, 1]` product, whose backward hands `y` exactly `dy`.
/// (`(y * dy).sum_all()` would do the same, but candle reduces a whole tensor in one block:
/// milliseconds for a large tensor on a GPU, more than the op being measured.)
pub fn backward_with(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    let n = y.elem_count();
    y.reshape((1, n))?.matmul(&dy.reshape((n, 1))?)?.backward()
}

/// Median, min and max seconds of `reps` runs of `f` after `warmup` runs.
pub fn time_it(device: &Device, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut times = Vec::with_capacity(reps);
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
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let device_name = match device {
            Device::Cpu => format!("cpu ({cores} threads)"),
            _ => run("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"])
                .map(|s| s.lines().next().unwrap_or("").to_string())
                .unwrap_or_else(|| "cuda".into()),
        };
        let dirty = run("git", &["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()).unwrap_or(false);
        Provenance {
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into()),
            machine: format!("{cpu}, {cores} threads"),
            device: device_name,
            // the commit the binary was built from where the build recorded it (a binary
            // carried to another machine runs beside some other checkout), else this checkout's
            commit: option_env!("ALTFORMERS_COMMIT")
                .map(String::from)
                .or_else(|| run("git", &["rev-parse", "--short=12", "HEAD"]).map(|c| if dirty { format!("{c}+dirty") } else { c }))
                .unwrap_or_else(|| "unknown".into()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}
