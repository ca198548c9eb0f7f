//! Data- and sequence-parallel jobs from the command line: the launcher that starts this
//! host's workers (as torchrun's standalone mode does) and waits for them, naming the rank that
//! failed, and each worker's device.

use anyhow::{Context, Result};

/// Refuses a process torchrun started as one of several on its host (`torchrun
/// --nproc-per-node N --no-python altformers ...`): this program starts its own workers, and
/// each of torchrun's would otherwise run the whole job alone, all into the same run folder.
/// One process per host is a launcher (as `srun` starts them).
pub(crate) fn refuse_torchrun_workers() -> Result<()> {
    if std::env::var_os(altformers::train::distributed::RANK).is_some()
        || std::env::var_os("TORCHELASTIC_RUN_ID").is_none()
    {
        return Ok(());
    }
    let Ok(here) = std::env::var("LOCAL_WORLD_SIZE").or_else(|_| std::env::var("WORLD_SIZE")) else { return Ok(()) };
    anyhow::ensure!(
        here.trim().parse::<usize>().is_ok_and(|n| n <= 1),
        "started by torchrun as one of {here} processes on this host: altformers starts its own workers; \
         run it once per host instead, `altformers train ... --gpus N` (across hosts with --nnodes, \
         --node-rank and --rdzv-endpoint, as torchrun's)"
    );
    Ok(())
}

/// The device `name` for this process: a data-parallel worker's (the launcher set
/// `ALTFORMERS_RANK`) with a CUDA stream of its own, since NCCL launches a non-blocking
/// communicator's collectives from a thread of its own, where the per-thread default stream
/// of candle's devices would be another stream (NVIDIA/nccl#1976).
pub(crate) fn this_process_device(name: &str) -> Result<candle_core::Device> {
    let device = altformers::device::select(name)?;
    match std::env::var(altformers::train::distributed::RANK) {
        Ok(_) => altformers::device::with_own_stream(&device),
        Err(_) => Ok(device),
    }
}

/// `train --workers N [--nnodes M --node-rank K --rdzv-endpoint host:port]` (data- or
/// sequence-parallel training) and `bench sequence-parallel`: runs this same command N times
/// on this host as ranks K N to K N + N - 1 of one job (`job` names it) of M N
/// workers (`altformers::train::distributed`), rank 0 listening at the endpoint (a free local
/// port on one host), and waits. A worker that fails stops this host's others (those of other
/// hosts stop when they lose it); the error names the cause among the ranks that failed.
pub(crate) fn launch_workers(
    n: usize,
    nnodes: usize,
    node_rank: usize,
    endpoint: Option<String>,
    gpus: bool,
    job: &str,
    run_folder: Option<&std::path::Path>,
) -> Result<()> {
    use altformers::train::distributed::{LOCAL_RANK, RANK, RENDEZVOUS, WORLD_SIZE};
    if gpus {
        let visible = altformers::device::cuda_count()?;
        anyhow::ensure!(n <= visible, "--gpus {n}: this host has {visible} CUDA GPU(s) visible");
    }
    let endpoint = match endpoint {
        Some(e) => e,
        None => altformers::train::distributed::free_local_endpoint()?,
    };
    let world = n * nnodes;
    let exe = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut children = Running(Vec::with_capacity(n));
    for rank in node_rank * n..(node_rank + 1) * n {
        let mut command = std::process::Command::new(&exe);
        if gpus {
            // NVLink multicast stays off in every worker (it can put the host's GPUs out of
            // service on the machines this project runs on)
            #[cfg(feature = "cuda")]
            command.envs(altformers::train::nccl::NVLS_OFF);
        }
        let child = command
            .args(&args)
            .env(RANK, rank.to_string())
            .env(LOCAL_RANK, (rank - node_rank * n).to_string())
            .env(WORLD_SIZE, world.to_string())
            .env(RENDEZVOUS, &endpoint)
            // rank 0 prints the run's summary; the others' output would repeat it
            .stdout(if rank == 0 { std::process::Stdio::inherit() } else { std::process::Stdio::null() })
            .spawn()
            .with_context(|| format!("starting worker rank {rank}"))?;
        children.0.push(Some((rank, child)));
    }
    // (rank, status) of each worker that failed, in the order seen
    let mut failed: Vec<(usize, std::process::ExitStatus)> = Vec::new();
    // workers still running when another failed, stopped by this launcher
    let mut killed: Vec<usize> = Vec::new();
    loop {
        for slot in children.0.iter_mut() {
            if let Some((rank, child)) = slot {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        failed.push((*rank, status));
                    }
                    *slot = None;
                }
            }
        }
        if !failed.is_empty() {
            // the others would only wait for the failed one until their timeout
            std::thread::sleep(std::time::Duration::from_millis(300));
            for (rank, mut child) in children.0.iter_mut().filter_map(Option::take) {
                match child.try_wait()? {
                    Some(status) if !status.success() => failed.push((rank, status)),
                    Some(_) => {}
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        killed.push(rank);
                    }
                }
            }
            // (rank 0 writes the checkpoints: on its host only, where hosts share no filesystem)
            let checkpoint = match run_folder.filter(|_| node_rank == 0) {
                None => "",
                Some(out) if altformers::train::RunFolder::open(out).is_ok_and(|f| f.latest_checkpoint().is_ok()) => {
                    "; the run folder keeps its last checkpoint (--resume continues, on any number of workers or GPUs)"
                }
                Some(_) => "; no checkpoint was written",
            };
            anyhow::bail!(
                "{job} in {world} worker{} failed: {}; every worker was stopped{checkpoint}",
                if world == 1 { "" } else { "s" },
                which_failed(&failed, &killed)
            );
        }
        if children.0.iter().all(Option::is_none) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `(workers on this host, this process's device name)` of `--workers N` (CPU workers) or
/// `--gpus N` (N workers on CUDA, the worker of local rank r on GPU r), checked.
pub(crate) fn workers_and_device(workers: usize, gpus: Option<usize>, device: String) -> Result<(usize, String)> {
    anyhow::ensure!(
        workers == 1 || device == "cpu",
        "--workers runs CPU workers; on GPUs use --gpus N (one worker per GPU, gradients through NCCL)"
    );
    anyhow::ensure!(workers >= 1, "--workers must be at least 1");
    let Some(n) = gpus else { return Ok((workers, device)) };
    anyhow::ensure!(workers == 1, "--gpus N starts N workers, one per GPU: drop --workers");
    anyhow::ensure!(n >= 1, "--gpus must be at least 1");
    anyhow::ensure!(
        device == "cpu" || device == "cuda",
        "--gpus uses GPUs 0 to N - 1 of this host: drop --device {device}"
    );
    let device = match std::env::var(altformers::train::distributed::LOCAL_RANK) {
        Ok(local) => format!("cuda:{}", local.trim()),
        Err(_) => "cuda".to_string(),
    };
    Ok((n, device))
}

/// Whether this process is to launch the workers of a job of `world` (not one of them): with
/// `--gpus` even one, whose gradients go through NCCL as torchrun's one process's do.
pub(crate) fn launches(world: usize, gpus: bool) -> bool {
    (world > 1 || gpus) && std::env::var(altformers::train::distributed::RANK).is_err()
}

/// The workers a launcher started that still run, by rank: those left when it returns early
/// (an error starting or watching them) are killed, not left waiting at the rendezvous.
struct Running(Vec<Option<(usize, std::process::Child)>>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, mut child) in self.0.iter_mut().filter_map(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Which workers failed, the cause first: a worker that stopped because a peer went away
/// (exit `PEER_LOST_EXIT`) is not the cause; where every failure is such, the cause is the
/// workers that were `killed` still running (they hung).
fn which_failed(failed: &[(usize, std::process::ExitStatus)], killed: &[usize]) -> String {
    let stopped_by_peer =
        |s: &std::process::ExitStatus| s.code() == Some(altformers::train::distributed::PEER_LOST_EXIT);
    let (causes, followers): (Vec<_>, Vec<_>) = failed.iter().partition(|(_, s)| !stopped_by_peer(s));
    let list = |v: &[&(usize, std::process::ExitStatus)]| {
        v.iter().map(|(r, s)| format!("rank {r} ({s})")).collect::<Vec<_>>().join(", ")
    };
    if !causes.is_empty() {
        let after =
            if followers.is_empty() { String::new() } else { format!("; {} stopped because it did", list(&followers)) };
        format!("worker {} failed{after}", list(&causes))
    } else if !killed.is_empty() {
        let ranks = killed.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        format!("worker {ranks} stopped answering and was killed; {} gave up waiting", list(&followers))
    } else {
        format!("worker {} failed", list(&followers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_left_running_are_stopped_when_the_launcher_returns() {
        let child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep starts");
        let pid = child.id();
        drop(Running(vec![None, Some((1, child))]));
        // killed and reaped: no such process any more
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
