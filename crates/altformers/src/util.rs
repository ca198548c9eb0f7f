//! Small helpers shared by the trainer, checkpoints and the CLI.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// fsyncs `tmp`, renames it over `dest` and fsyncs the folder: after a crash `dest` holds
/// either the old or the new content, never a mix.
pub fn fsync_and_rename(tmp: &Path, dest: &Path) -> Result<()> {
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if let Some(dir) = dest.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A temporary name beside `path` that an atomic write renames into place: `NAME.tmp.PID.N`,
/// unique to this process and call, so two writers (or two threads) never share one.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|s| s.to_os_string()).unwrap_or_default();
    name.push(format!("{TMP_MARK}{}.{n}", std::process::id()));
    path.with_file_name(name)
}

/// What every name [`tmp_path`] makes contains, so leftovers of a crash can be found.
pub const TMP_MARK: &str = ".tmp.";

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(dest);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()));
    drop(f);
    let done = written.and_then(|_| fsync_and_rename(&tmp, dest));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

pub fn write_json_atomic<T: serde::Serialize>(dest: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(dest, s.as_bytes())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid: corrupt or from another version?", path.display()))
}

/// Each `(name, values)` must be a non-empty list of counts of at least 1 (a length or batch
/// of 0 divides by zero).
pub fn counts_at_least_one(lists: &[(&str, &[usize])]) -> Result<()> {
    for (name, values) in lists {
        if values.is_empty() {
            anyhow::bail!("{name} is empty: give at least one value");
        }
        if values.contains(&0) {
            anyhow::bail!("{name}: every value must be at least 1, got {values:?}");
        }
    }
    Ok(())
}

/// Each `(name, value)` must be a positive, finite number.
pub fn positive(values: &[(&str, f64)]) -> Result<()> {
    for (name, v) in values {
        if !(v.is_finite() && *v > 0.0) {
            // counts arrive as floats: 0 reads as 0, not 0.0; 1e300 as such, not 301 digits
            let shown = if v.is_finite() && v.abs() < 1e16 { format!("{v}") } else { format!("{v:?}") };
            anyhow::bail!("{name} must be a positive number, got {shown}");
        }
    }
    Ok(())
}

/// Human-readable count: 1234567 -> "1.23M".
pub fn human(n: f64) -> String {
    let a = n.abs();
    if a >= 1e12 {
        format!("{:.2}T", n / 1e12)
    } else if a >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if a >= 1e3 {
        format!("{:.2}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}
