//! The exclusive lock on a run folder: a `LOCK` file naming the process (pid and host) that
//! writes the folder, held for the run's life and removed when it ends.
//!
//! It is created whole or not at all (written under a name of its own, then hard-linked to
//! `LOCK`, which fails if one exists), so a crash never leaves an empty lock. A lock whose
//! process is gone (same host, no `/proc/PID`: a kill -9, a power cut) is stale and taken
//! over with a message; one of another host, or where `/proc` cannot tell, is reported with
//! how to remove it.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The lock file's name inside a run folder.
pub const LOCK: &str = "LOCK";

/// Held while a run writes its folder; dropping it (any return, error or panic) releases it.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    owner: String,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Whether the process `pid` of this host is certainly gone (false where `/proc` cannot say).
fn is_dead(pid: u32) -> bool {
    Path::new("/proc/self").exists() && !Path::new("/proc").join(pid.to_string()).exists()
}

/// `(pid, host)` of a lock's text `pid PID host HOST`.
fn parse(text: &str) -> Option<(u32, String)> {
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("pid"), Some(pid), Some("host"), host) => Some((pid.parse().ok()?, host.unwrap_or("").to_string())),
        _ => None,
    }
}

impl RunLock {
    /// Takes `dir`'s lock (creating `dir`), or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(LOCK);
        let owner = format!("pid {} host {}\n", std::process::id(), host());
        // a few rounds: a stale lock taken over by another process at the same moment
        for _ in 0..4 {
            let mine = crate::util::tmp_path(&path);
            std::fs::write(&mine, &owner).with_context(|| format!("writing {}", mine.display()))?;
            let linked = std::fs::hard_link(&mine, &path);
            let _ = std::fs::remove_file(&mine);
            match linked {
                Ok(()) => return Ok(Self { path, owner }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                // the folder's writer, cleaning up after crashes, removed our temporary file
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
            let held = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // released meanwhile
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            match parse(&held) {
                Some((pid, h)) if h == host() && is_dead(pid) => Self::take_over(&path, &held, pid)?,
                Some((pid, h)) => bail!(
                    "{} is in use: process {pid} on host `{h}` is writing it ({}). Wait for it to end; if it is no longer running, delete {} and retry",
                    dir.display(),
                    path.display(),
                    path.display()
                ),
                None => bail!(
                    "{} is locked by an unreadable {}: if no training is writing this folder, delete it and retry",
                    dir.display(),
                    path.display()
                ),
            }
        }
        bail!("{} is being taken by other processes: retry", dir.display())
    }

    /// Removes the stale lock `held` of the dead `pid` unless another process took it first:
    /// it is renamed to a name of ours, then checked, and put back if it was not the stale one.
    fn take_over(path: &Path, held: &str, pid: u32) -> Result<()> {
        let aside = crate::util::tmp_path(path);
        if std::fs::rename(path, &aside).is_err() {
            return Ok(()); // gone already: retry
        }
        let moved = std::fs::read_to_string(&aside).unwrap_or_default();
        if moved == held {
            eprintln!(
                "note: {} was left by process {pid}, which is no longer running (killed?); taking the folder over",
                path.display()
            );
        } else {
            let _ = std::fs::hard_link(&aside, path); // a live lock, taken by mistake: restore it
        }
        let _ = std::fs::remove_file(&aside);
        Ok(())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // only our own lock: never one a later process took over
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.owner) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_exclusive_released_on_drop_and_a_dead_owner_s_is_taken_over() -> Result<()> {
        let dir = crate::testing::fresh_dir("run-lock")?;
        let lock = RunLock::acquire(&dir)?;
        let err = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains("is in use") && err.contains(&format!("process {}", std::process::id())), "{err}");
        drop(lock);
        assert!(!dir.join(LOCK).exists());
        // a lock left by a process that no longer exists (pids above the kernel's maximum
        // are never alive) is stale
        std::fs::write(dir.join(LOCK), format!("pid 4294967295 host {}\n", host()))?;
        let lock = RunLock::acquire(&dir)?;
        assert_eq!(std::fs::read_to_string(dir.join(LOCK))?, lock.owner);
        drop(lock);
        // another host's lock cannot be checked: it is reported, not taken
        std::fs::write(dir.join(LOCK), "pid 4294967295 host elsewhere-altformers\n")?;
        let err = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains("elsewhere-altformers") && err.contains("delete"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
