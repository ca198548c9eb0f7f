//! Data-parallel training across processes, one model replica each (issue 23): the launcher
//! (`altformers train --workers N`) starts N copies of the command as workers, rank 0 to
//! N - 1, and tells each its rank, the world size and a rendezvous address through the
//! environment ([`RANK`], [`WORLD_SIZE`], [`RENDEZVOUS`]; torchrun's `RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR:MASTER_PORT`). Every worker draws the same global batch from the seed and
//! the step and trains on its own slice of the rows ([`super::task::Batch::shard`]); after
//! the backward pass the gradients are averaged across the workers ([`Group`] as the
//! training step's [`GradientSync`]), so every worker takes the same AdamW step and holds the
//! same weights. Each draws its part of the whole batch's dropout masks
//! ([`crate::rng::Rng::shard`]) and evaluates its slice of the evaluation batches (the losses
//! averaged the same way). Only rank 0 writes the run folder and prints.
//!
//! On the CPU the exchange is over TCP through rank 0: rank 0 adds the workers' gradients in
//! rank order and sends the mean back, so every worker gets the same bits. On GPUs
//! (`--gpus N`, one worker per GPU, [`LOCAL_RANK`] choosing it) the workers only meet here
//! and NCCL averages the gradients ([`super::nccl`]).
//!
//! A worker that dies closes its connection, and one that hangs stops answering: the others
//! fail within [`timeout`] naming the rank, and the launcher stops every worker and says
//! which failed first. The run folder keeps its last checkpoint; `--resume` continues with
//! any number of workers (the global batch does not depend on it).

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::step::GradientSync;
use crate::params::ParamStore;

/// The worker's rank, 0 to world size - 1.
pub const RANK: &str = "ALTFORMERS_RANK";
/// The number of workers.
pub const WORLD_SIZE: &str = "ALTFORMERS_WORLD_SIZE";
/// `host:port` where rank 0 listens for the others.
pub const RENDEZVOUS: &str = "ALTFORMERS_RENDEZVOUS";
/// The worker's place on its host, 0 to workers per host - 1: its GPU under `--gpus`.
pub const LOCAL_RANK: &str = "ALTFORMERS_LOCAL_RANK";
/// Seconds a worker waits for a peer's gradients (or any exchange) before it fails.
pub const TIMEOUT_S: &str = "ALTFORMERS_TIMEOUT_S";
/// Seconds a worker waits for the others to meet at the rendezvous before it fails.
pub const JOIN_TIMEOUT_S: &str = "ALTFORMERS_JOIN_TIMEOUT_S";

/// [`TIMEOUT_S`], 120 s by default: long enough for a slow step, short enough that a dead or
/// hung worker stops the job.
pub fn timeout() -> Result<Duration> {
    seconds_from_env(TIMEOUT_S, 120)
}

/// [`JOIN_TIMEOUT_S`], 600 s by default (torchrun's rendezvous `join_timeout`): the hosts of
/// one job may start minutes apart, and a worker meets the others only once it has read (and
/// tokenized) the corpus.
pub fn join_timeout() -> Result<Duration> {
    seconds_from_env(JOIN_TIMEOUT_S, 600)
}

fn seconds_from_env(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Ok(s) => {
            let secs: f64 = s
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v > 0.0)
                .with_context(|| format!("{name}={s}: expected a positive number of seconds"))?;
            Ok(Duration::from_secs_f64(secs))
        }
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

/// `127.0.0.1:PORT` with a port free now: the rendezvous of a job on this host alone.
pub fn free_local_endpoint() -> Result<String> {
    Ok(format!("127.0.0.1:{}", TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()))
}

/// What every worker of a job must share beyond its command line, as text: the build (version,
/// the commit where the build recorded it, CUDA or not) and the switches that decide which
/// collectives a step runs (`ALTFORMERS_UNFUSED`'s `overlap`: the exchange in segments or
/// after the backward; `train-graph`: whether the ranks vote on capturing). Other kernels
/// switched off change a rank's arithmetic only, and may differ between hosts.
pub fn worker_settings() -> String {
    let on = |kernel: &str| if crate::kernels::enabled(kernel) { "on" } else { "off" };
    format!(
        "altformers {} ({}, {}), overlap {}, train-graph {}",
        env!("CARGO_PKG_VERSION"),
        option_env!("ALTFORMERS_COMMIT").unwrap_or("commit not recorded"),
        if cfg!(feature = "cuda") { "CUDA" } else { "CPU only" },
        on("overlap"),
        on("train-graph")
    )
}

/// This worker's place among the others and its connections: rank 0 holds one to every other
/// rank (index r - 1), every other rank one to rank 0.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    links: Vec<TcpStream>,
}

impl Group {
    /// The group the launcher started this process in, or `None` when it runs alone.
    pub fn from_env() -> Result<Option<Group>> {
        let Ok(rank) = std::env::var(RANK) else { return Ok(None) };
        let number = |name: &str, value: &str| -> Result<usize> {
            value.trim().parse().with_context(|| format!("{name}={value}: expected a whole number"))
        };
        let rank = number(RANK, &rank)?;
        let world = number(
            WORLD_SIZE,
            &std::env::var(WORLD_SIZE).with_context(|| format!("{RANK} is set but {WORLD_SIZE} is not"))?,
        )?;
        let addr = std::env::var(RENDEZVOUS).with_context(|| format!("{RANK} is set but {RENDEZVOUS} is not"))?;
        Group::join(rank, world, &addr, join_timeout()?, timeout()?).map(Some)
    }

    /// Meets the other `world - 1` workers at `addr` (rank 0 listens there), each connection
    /// checked to be one of this job's ranks, waiting for them and for every exchange after up
    /// to `timeout`.
    pub fn connect(rank: usize, world: usize, addr: &str, timeout: Duration) -> Result<Group> {
        Group::join(rank, world, addr, timeout, timeout)
    }

    /// [`Group::connect`], waiting up to `join` for the others to meet.
    pub fn join(rank: usize, world: usize, addr: &str, join: Duration, timeout: Duration) -> Result<Group> {
        if world == 0 || rank >= world {
            bail!("rank {rank} of a world of {world} workers: the rank must be below the world size");
        }
        let deadline = Instant::now() + join;
        let hello = |stream: &mut TcpStream| -> Result<()> {
            stream.set_read_timeout(Some(timeout))?;
            // a peer that hangs stops reading too: a large message would block its sender
            stream.set_write_timeout(Some(timeout))?;
            stream.set_nodelay(true)?;
            Ok(())
        };
        let links = if rank == 0 {
            let listener = listen(addr).with_context(|| format!("rank 0 cannot listen at {addr}"))?;
            listener.set_nonblocking(true)?;
            let mut by_rank: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while by_rank.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false)?;
                        // a worker says its rank as soon as it connects; a connection that
                        // does not, or says another job's (a port scan, a health check, a
                        // worker of a job already gone), is dropped
                        stream.set_read_timeout(Some(timeout.min(Duration::from_secs(10))))?;
                        let Ok([r, w]) = read_words(&mut stream) else {
                            eprintln!("rank 0: dropped a connection from {peer} that did not say a worker's rank");
                            continue;
                        };
                        if w != world as u64 || r == 0 || r >= world as u64 {
                            eprintln!(
                                "rank 0: dropped a connection from {peer} announcing rank {r} of {w} (this job: ranks 1 to {} of {world})",
                                world - 1
                            );
                            continue;
                        }
                        // two workers of this job's size claiming one rank: a host started twice
                        // with one --node-rank, which no waiting mends
                        if by_rank[r as usize - 1].is_some() {
                            bail!("rank 0: two workers announced rank {r} of {world} (is a --node-rank given twice?)");
                        }
                        hello(&mut stream)?;
                        by_rank[r as usize - 1] = Some(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = by_rank
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            bail!(
                                "rank 0: ranks {} did not join within {:.0} s ({JOIN_TIMEOUT_S})",
                                missing.join(", "),
                                join.as_secs_f64()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("rank 0: accepting a worker"),
                }
            }
            by_rank.into_iter().map(|s| s.expect("every rank joined")).collect()
        } else {
            // each try bounded by the time left and by 10 s (an address that drops packets
            // would hold a plain connect for minutes, and the host's other addresses untried)
            let connect = || -> std::io::Result<TcpStream> {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(10), Duration::from_secs(10));
                let mut failed = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} names no address"));
                for a in std::net::ToSocketAddrs::to_socket_addrs(addr)? {
                    match TcpStream::connect_timeout(&a, left) {
                        Ok(s) => return Ok(s),
                        Err(e) => failed = e,
                    }
                }
                Err(failed)
            };
            let mut stream = loop {
                match connect() {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e).with_context(|| {
                            format!(
                                "rank {rank}: rank 0 did not answer at {addr} within {:.0} s ({JOIN_TIMEOUT_S})",
                                join.as_secs_f64()
                            )
                        })
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            hello(&mut stream)?;
            stream.write_all(&words([rank as u64, world as u64]))?;
            vec![stream]
        };
        let group = Group { rank, world, links };
        // rank 0 answers this first exchange once every rank has joined: until the join's
        // deadline, then the exchange's timeout
        let left = deadline.saturating_duration_since(Instant::now());
        group.waiting_for_rank_0(left + timeout, || group.agree_on_settings(&worker_settings()))?;
        Ok(group)
    }

    /// `f`, on a rank above 0 with its reads from rank 0 waiting up to `wait` (rank 0 busy for
    /// longer than an exchange: meeting the last ranks, writing a checkpoint), then for the
    /// usual timeout again; as it is on rank 0.
    fn waiting_for_rank_0<R>(&self, wait: Duration, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.rank == 0 {
            return f();
        }
        let link = &self.links[0];
        let usual = link.read_timeout()?;
        link.set_read_timeout(Some(wait))?;
        let done = f();
        link.set_read_timeout(usual)?;
        done
    }

    /// Refuses a job whose workers differ in `settings` ([`worker_settings`]; compared as up to
    /// 256 bytes), naming the ranks that differ from rank 0 and what each has: each would take
    /// its own path through the step (a worker waiting on a collective its peers never start
    /// stops the job only at the timeout, as a lost peer).
    fn agree_on_settings(&self, settings: &str) -> Result<()> {
        const LEN: usize = 256;
        let mut bytes: Vec<f64> = settings.bytes().take(LEN).map(f64::from).collect();
        bytes.resize(LEN, 0.0);
        let text = |b: &[f64]| {
            String::from_utf8_lossy(&b.iter().map(|&v| v as u8).filter(|&c| c != 0).collect::<Vec<u8>>()).into_owned()
        };
        let all = self.all_gather(&bytes)?;
        let differ: Vec<String> =
            (1..self.world).filter(|&r| all[r] != all[0]).map(|r| format!("rank {r} has {}", text(&all[r]))).collect();
        if !differ.is_empty() {
            bail!(
                "the workers run other builds or switches than rank 0 ({}): {}; every worker must run the same binary with the same ALTFORMERS_UNFUSED overlap and train-graph switches",
                text(&all[0]),
                differ.join("; ")
            );
        }
        Ok(())
    }

    /// Replaces `data` on every rank by its mean over the ranks: rank 0 adds the others'
    /// values to its own in rank order, divides, and sends the result back, so every rank
    /// holds the same bits.
    pub fn all_reduce_mean(&self, data: &mut [f64]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            let mut buf = vec![0f64; data.len()];
            for (i, link) in self.links.iter().enumerate() {
                receive(link, &mut buf, i + 1)?;
                data.iter_mut().zip(&buf).for_each(|(d, b)| *d += b);
            }
            let n = self.world as f64;
            data.iter_mut().for_each(|d| *d /= n);
            for (i, link) in self.links.iter().enumerate() {
                send(link, data).context(PeerLost(Some(i + 1)))?;
            }
        } else {
            send(&self.links[0], data).context(PeerLost(Some(0)))?;
            receive(&self.links[0], data, 0)?;
        }
        Ok(())
    }
}

impl Group {
    /// Every rank's `data` (one length on every rank) on every rank, in rank order: rank 0
    /// collects them and sends the whole back.
    pub fn all_gather(&self, data: &[f64]) -> Result<Vec<Vec<f64>>> {
        if self.world == 1 {
            return Ok(vec![data.to_vec()]);
        }
        let n = data.len();
        let mut all = vec![0f64; n * self.world];
        if self.rank == 0 {
            all[..n].copy_from_slice(data);
            for (i, link) in self.links.iter().enumerate() {
                receive(link, &mut all[(i + 1) * n..(i + 2) * n], i + 1)?;
            }
            for (i, link) in self.links.iter().enumerate() {
                send(link, &all).context(PeerLost(Some(i + 1)))?;
            }
        } else {
            send(&self.links[0], data).context(PeerLost(Some(0)))?;
            receive(&self.links[0], &mut all, 0)?;
        }
        Ok((0..self.world).map(|s| all[s * n..(s + 1) * n].to_vec()).collect())
    }

    /// The reverse of [`Group::all_gather`] (its gradient): `parts` holds one piece per rank
    /// (`world` equal pieces); rank s gets the sum over ranks of their piece s, added by rank
    /// 0 in rank order (the same bits however the messages arrive).
    pub fn reduce_scatter_sum(&self, parts: &[f64]) -> Result<Vec<f64>> {
        if !parts.len().is_multiple_of(self.world) {
            bail!("reduce-scatter: {} values do not cut into {} equal pieces", parts.len(), self.world);
        }
        let n = parts.len() / self.world;
        if self.world == 1 {
            return Ok(parts.to_vec());
        }
        if self.rank == 0 {
            let mut sum = parts.to_vec();
            let mut buf = vec![0f64; parts.len()];
            for (i, link) in self.links.iter().enumerate() {
                receive(link, &mut buf, i + 1)?;
                sum.iter_mut().zip(&buf).for_each(|(s, b)| *s += b);
            }
            for (i, link) in self.links.iter().enumerate() {
                send(link, &sum[(i + 1) * n..(i + 2) * n]).context(PeerLost(Some(i + 1)))?;
            }
            sum.truncate(n);
            Ok(sum)
        } else {
            send(&self.links[0], parts).context(PeerLost(Some(0)))?;
            let mut mine = vec![0f64; n];
            receive(&self.links[0], &mut mine, 0)?;
            Ok(mine)
        }
    }

    /// Rank 0's `bytes` on every rank (NCCL's unique id, handed out at the rendezvous).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()> {
        if self.rank == 0 {
            for (i, mut link) in self.links.iter().enumerate() {
                link.write_all(bytes).context(PeerLost(Some(i + 1)))?;
            }
        } else {
            (&self.links[0]).read_exact(bytes).context(PeerLost(Some(0)))?;
        }
        Ok(())
    }

    /// Rank 0 says it has written a checkpoint; the other ranks wait for that, up to
    /// `patience`. Without it they would go on into the next step's exchange and wait there
    /// for rank 0 against the exchange's timeout, which a large checkpoint on a slow disk can
    /// outlast. A rank 0 that exits closes its connections: the others stop at once.
    pub fn checkpoint_written(&self, patience: Duration) -> Result<()> {
        let mut byte = [1u8];
        if self.rank == 0 {
            for (i, link) in self.links.iter().enumerate() {
                (&*link).write_all(&byte).context(PeerLost(Some(i + 1)))?;
            }
            return Ok(());
        }
        self.waiting_for_rank_0(patience, || (&self.links[0]).read_exact(&mut byte).context(PeerLost(Some(0))))
            .map_err(|e| e.context(format!("waiting up to {:.0} s for rank 0's checkpoint", patience.as_secs_f64())))
    }

    /// The ranks whose connection to this one has closed (a worker that exited; one that
    /// hangs keeps its connection open). Rank 0 sees every other rank, the others rank 0.
    pub fn closed_peers(&self) -> Vec<usize> {
        let mut closed = Vec::new();
        for (i, link) in self.links.iter().enumerate() {
            let peer = if self.rank == 0 { i + 1 } else { 0 };
            let mut byte = [0u8; 1];
            if link.set_nonblocking(true).is_ok() {
                if let Ok(0) = link.peek(&mut byte) {
                    closed.push(peer);
                }
                link.set_nonblocking(false).ok();
            }
        }
        closed
    }
}

/// The error of a worker whose peer went away (`Some(rank)`; `None` where this worker cannot
/// tell which, as NCCL does not say): not this worker's own failure. A worker exits with
/// [`PEER_LOST_EXIT`] for it, so the launcher can name the worker that failed first.
#[derive(Debug)]
pub struct PeerLost(pub Option<usize>);

impl std::fmt::Display for PeerLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(rank) => write!(f, "rank {rank} stopped answering (it exited, crashed or hangs)"),
            None => write!(f, "another rank stopped answering (it exited, crashed or hangs)"),
        }
    }
}

/// The exit status of a worker that stopped because a peer went away ([`PeerLost`]).
pub const PEER_LOST_EXIT: i32 = 3;

/// A worker process's last resort against a hang that no deadline covers (a host call stuck
/// behind a collective that a lost peer never lets finish, such as an upload the driver
/// orders after a replayed step): unless [`Watchdog::kick`]ed within `limit`, `expire` runs,
/// as PyTorch's heartbeat monitor ends a stuck worker. Stops when dropped.
pub struct Watchdog {
    last: std::sync::Arc<std::sync::Mutex<Instant>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    pub fn start(limit: Duration, expire: impl FnOnce() + Send + 'static) -> Watchdog {
        use std::sync::{atomic::Ordering, Arc, Mutex};
        let last = Arc::new(Mutex::new(Instant::now()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (last.clone(), stop.clone());
        std::thread::spawn(move || {
            let tick = (limit / 20).clamp(Duration::from_millis(1), Duration::from_secs(1));
            loop {
                std::thread::sleep(tick);
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                if seen.lock().map(|t| t.elapsed() > limit).unwrap_or(false) {
                    return expire();
                }
            }
        });
        Watchdog { last, stop }
    }

    /// Progress: the limit counts from now.
    pub fn kick(&self) {
        if let Ok(mut t) = self.last.lock() {
            *t = Instant::now();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A [`Watchdog`]'s end for worker `rank`'s process: says why and exits as a worker stopped by
/// a peer ([`PEER_LOST_EXIT`]; the launcher then names the cause among the others, or this
/// worker where it is the one left), with `_exit`: no exit handlers (NCCL's join a thread)
/// while another thread is stuck inside CUDA or NCCL.
pub fn stop_stuck_worker(rank: usize, limit: Duration) -> impl FnOnce() + Send + 'static {
    move || {
        eprintln!(
            "error: worker rank {rank} made no progress in {:.0} s (a device call or collective is stuck, most likely behind a lost peer); stopping",
            limit.as_secs_f64()
        );
        // SAFETY: ends the process at once; stderr is unbuffered, so the line is out
        unsafe { libc::_exit(PEER_LOST_EXIT) }
    }
}

/// Set once a collective that candle runs as an op (LongNet's gathers, forward and backward)
/// found a peer gone: candle carries the error on as text, losing the [`PeerLost`] type, so
/// the worker's exit status asks this too ([`peer_lost_in_an_op`]).
static PEER_LOST_IN_AN_OP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a collective run as an op in this process found a peer gone ([`collective_error`]).
pub fn peer_lost_in_an_op() -> bool {
    PEER_LOST_IN_AN_OP.load(std::sync::atomic::Ordering::SeqCst)
}

/// A collective's error as candle's, an op's: a lost peer recorded first
/// ([`peer_lost_in_an_op`]).
pub(crate) fn collective_error(e: anyhow::Error) -> candle_core::Error {
    if e.downcast_ref::<PeerLost>().is_some() {
        PEER_LOST_IN_AN_OP.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    candle_core::Error::Msg(format!("{e:#}"))
}

/// The gradients of every parameter averaged over the ranks, in the parameters' dtype, f64 on
/// the wire. A parameter some rank's slice did not reach counts as zeros there; one that no
/// rank's reached keeps no gradient (the optimizer leaves it alone, as one process would).
impl GradientSync for Group {
    fn all_reduce(&self, grads: &mut GradStore, params: &ParamStore) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let vars = params.vars();
        // one flag per parameter (1: this rank has its gradient), then the gradients
        let mut flat: Vec<f64> = vars.iter().map(|(_, p)| grads.get(p.var.as_tensor()).map_or(0.0, |_| 1.0)).collect();
        for (_, p) in &vars {
            let t = p.var.as_tensor();
            match grads.get(t) {
                Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
                None => flat.extend(std::iter::repeat_n(0.0, t.elem_count())),
            }
        }
        self.all_reduce_mean(&mut flat)?;
        let mut at = vars.len();
        for (i, (_, p)) in vars.iter().enumerate() {
            let t = p.var.as_tensor();
            let n = t.elem_count();
            if flat[i] > 0.0 {
                let g = Tensor::from_slice(&flat[at..at + n], t.dims(), t.device())?.to_dtype(t.dtype())?;
                grads.insert(t, g);
            }
            at += n;
        }
        Ok(())
    }
}

/// Runs a data-parallel job of `world` workers as threads of this process (`compare
/// --data-parallel`), each `run` with its device and its place in the job, and returns rank
/// 0's result. On GPUs worker r trains on GPU r (`device` CUDA: GPUs 0 to world - 1, each
/// worker on a stream of its own, the gradients through NCCL as between processes); on the
/// CPU every worker trains on the CPU (the exchange through rank 0 over TCP). A worker's
/// failure stops the others within [`timeout`] (they lose a peer); the error returned is the
/// cause, not a lost peer, where one worker says so.
pub fn in_threads<R: Send>(
    world: usize,
    device: &candle_core::Device,
    run: impl Fn(&candle_core::Device, std::sync::Arc<Group>) -> Result<R> + Sync,
) -> Result<R> {
    anyhow::ensure!(world >= 1, "a data-parallel job needs at least one worker");
    let devices = (0..world)
        .map(|r| match device {
            candle_core::Device::Cpu => Ok(candle_core::Device::Cpu),
            _ => crate::device::with_own_stream(&crate::device::select(&format!("cuda:{r}"))?),
        })
        .collect::<Result<Vec<_>>>()?;
    let addr = free_local_endpoint()?;
    let wait = timeout()?;
    let threads = rayon::current_num_threads();
    let mut outcomes: Vec<Result<R>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, dev)| {
                let (run, addr) = (&run, &addr);
                s.spawn(move || -> Result<R> {
                    let group = std::sync::Arc::new(Group::connect(rank, world, addr, wait)?);
                    // a pool of its own, as a comparison's workers have (see compare::run_queue)
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).stack_size(8 << 20).build()?;
                    pool.install(|| run(dev, group))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked"))))
            .collect()
    });
    let cause = outcomes.iter().position(|o| o.as_ref().is_err_and(|e| e.downcast_ref::<PeerLost>().is_none()));
    match cause {
        Some(rank) => Err(outcomes.swap_remove(rank).err().expect("an error").context(format!("worker rank {rank}"))),
        None => outcomes.swap_remove(0),
    }
}

/// Rank 0's listener for the rendezvous at `addr` (`host:port`): at that address where the
/// host is a loopback address or `localhost` (a job on one host, as the launcher gives it),
/// on every interface at its port otherwise (several hosts). The other hosts reach node 0 by
/// a name that on node 0 itself often resolves to a loopback address (Debian's `127.0.1.1` in
/// /etc/hosts): listening there, they could never connect. IPv4's every interface, or IPv6's
/// where the endpoint is an IPv6 address.
fn listen(addr: &str) -> Result<TcpListener> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let (host, port) = addr.rsplit_once(':').with_context(|| format!("{addr} is not host:port"))?;
    let port: u16 = port.parse().with_context(|| format!("{addr}: the port must be a number below 65536"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let everywhere = match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => None,
        Ok(IpAddr::V6(_)) => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        Ok(IpAddr::V4(_)) => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Err(_) if host == "localhost" => None,
        Err(_) => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    };
    Ok(match everywhere {
        Some(ip) => TcpListener::bind(SocketAddr::new(ip, port))?,
        None => TcpListener::bind(addr)?,
    })
}

fn words(w: [u64; 2]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_words(stream: &mut TcpStream) -> Result<[u64; 2]> {
    let mut b = [0u8; 16];
    stream.read_exact(&mut b)?;
    Ok([u64::from_le_bytes(b[..8].try_into()?), u64::from_le_bytes(b[8..].try_into()?)])
}

/// Every rank's `x` (one shape on every rank), stacked in rank order: `[world, ..x's shape]`,
/// differentiable: the gradient of a rank's `x` is the sum over ranks of their gradients of
/// its slice ([`Group::reduce_scatter_sum`]). CPU tensors (the exchange is through the
/// host); every rank must call it at the same point of its computation, and so reach its
/// backward at the same point (one all-gather per step of a layer keeps that simple).
pub fn all_gather(group: &std::sync::Arc<Group>, x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(TcpGather(group.clone()))
}

/// A split sequence's collective on CPU workers (LongNet's sequence parallelism).
impl crate::mixers::longnet::sequence_parallel::AllGather for std::sync::Arc<Group> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        all_gather(self, x)
    }
}

/// [`all_gather`]'s op.
struct TcpGather(std::sync::Arc<Group>);

impl candle_core::CustomOp1 for TcpGather {
    fn name(&self) -> &'static str {
        "all-gather"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let values: Vec<f64> = match storage {
            CpuStorage::F64(d) => crate::cpu::contiguous(d, layout, "all-gather's input")?.to_vec(),
            CpuStorage::F32(d) => {
                crate::cpu::contiguous(d, layout, "all-gather's input")?.iter().map(|&v| v as f64).collect()
            }
            _ => candle_core::bail!("all-gather: f32 or f64 tensors only"),
        };
        let all = self.0.all_gather(&values).map_err(collective_error)?.concat();
        let mut dims = vec![self.0.world];
        dims.extend(layout.dims());
        let out = match storage {
            CpuStorage::F64(_) => CpuStorage::F64(all),
            _ => CpuStorage::F32(all.iter().map(|&v| v as f32).collect()),
        };
        Ok((out, candle_core::Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g: Vec<f64> = grad_res.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let mine = self.0.reduce_scatter_sum(&g).map_err(collective_error)?;
        Ok(Some(Tensor::from_vec(mine, arg.shape(), arg.device())?.to_dtype(arg.dtype())?))
    }
}

/// `data`'s length, then its values, little-endian.
fn send(mut link: &TcpStream, data: &[f64]) -> Result<()> {
    let mut bytes = Vec::with_capacity(8 + 8 * data.len());
    bytes.extend((data.len() as u64).to_le_bytes());
    data.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
    link.write_all(&bytes)?;
    Ok(())
}

/// Reads what [`send`] wrote from rank `peer` into `data`, whose length it must match: a
/// connection that fails or times out is [`PeerLost`], a length that differs is not (the
/// workers disagree about the model).
fn receive(mut link: &TcpStream, data: &mut [f64], peer: usize) -> Result<()> {
    let mut len = [0u8; 8];
    link.read_exact(&mut len).context(PeerLost(Some(peer)))?;
    let n = u64::from_le_bytes(len) as usize;
    if n != data.len() {
        bail!(
            "rank {peer} sent {n} values where {} were expected: the workers do not train the same model",
            data.len()
        );
    }
    let mut bytes = vec![0u8; 8 * n];
    link.read_exact(&mut bytes).context(PeerLost(Some(peer)))?;
    for (d, c) in data.iter_mut().zip(bytes.chunks_exact(8)) {
        *d = f64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What ranks 0 and 1 of a job of two hold after averaging `a` (rank 0's) and `b`.
    fn mean_of_two(zero: &Group, one: &Group, a: f64, b: f64) -> Result<(f64, f64)> {
        let (mut x, mut y) = ([a], [b]);
        std::thread::scope(|s| {
            let t = s.spawn(|| one.all_reduce_mean(&mut y));
            zero.all_reduce_mean(&mut x)?;
            t.join().expect("rank thread")
        })?;
        Ok((x[0], y[0]))
    }

    /// Three ranks in threads: each ends with the mean, the same bits everywhere; a rank that
    /// goes away is named by rank 0.
    #[test]
    fn ranks_meet_and_average() -> Result<()> {
        let addr = free_local_endpoint()?;
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || -> Result<Vec<f64>> {
                    let g = Group::connect(rank, 3, &addr, Duration::from_secs(20))?;
                    let mut data = vec![rank as f64, 1.0 + rank as f64 * 0.1, -3.0];
                    g.all_reduce_mean(&mut data)?;
                    Ok(data)
                })
            })
            .collect();
        let results: Vec<Vec<f64>> = handles.into_iter().map(|h| h.join().expect("thread")).collect::<Result<_>>()?;
        for r in &results {
            assert_eq!(r, &results[0], "every rank holds the same bits");
        }
        assert_eq!(results[0][0], 1.0);
        assert!((results[0][1] - 1.1).abs() < 1e-12);
        assert_eq!(results[0][2], -3.0);

        // rank 1 leaves after meeting: rank 0's exchange fails naming it
        let addr = free_local_endpoint()?;
        let a2 = addr.clone();
        let leaver = std::thread::spawn(move || Group::connect(1, 2, &a2, Duration::from_secs(20)).map(drop));
        let g = Group::connect(0, 2, &addr, Duration::from_secs(20))?;
        leaver.join().expect("thread")?;
        let err = g.all_reduce_mean(&mut [1.0]).unwrap_err();
        assert!(format!("{err:#}").contains("rank 1 stopped answering"), "{err:#}");
        Ok(())
    }

    /// A job in threads returns rank 0's result; a worker that fails stops it, and the error
    /// returned is that worker's (named), not the lost peer the others then see.
    #[test]
    fn a_job_in_threads_returns_rank_0s_result_or_the_failing_workers_error() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let mean = in_threads(3, &device, |_, g| {
            let mut v = [g.rank as f64];
            g.all_reduce_mean(&mut v)?;
            Ok((g.rank, v[0]))
        })?;
        assert_eq!(mean, (0, 1.0));
        let started = Instant::now();
        let err = in_threads(2, &device, |_, g| -> Result<()> {
            if g.rank == 1 {
                bail!("rank 1's batch cannot be drawn");
            }
            g.all_reduce_mean(&mut [0.0])
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("worker rank 1: rank 1's batch cannot be drawn"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(30), "the job waited {:?}", started.elapsed());
        Ok(())
    }

    /// Every causal model of the registry, with dropout, in f64: three steps of two workers
    /// (each its slice of the batch and its part of every dropout mask, the gradients
    /// averaged) leave both workers with the weights three steps of one process leave. Rank 1
    /// scores its rows in two micro-batches (`train.accumulate`), rank 0 in one: both paths
    /// meet in the same exchange.
    #[test]
    fn two_workers_step_as_one_process_for_every_model() -> Result<()> {
        use crate::model::Model;
        use crate::train::step::tests::{weights_after_three_steps, worst};
        use crate::train::task::ByteLm;
        use candle_core::Device;
        let data: Vec<u8> = (0..4000u32).map(|i| ((i * 7919) % 251) as u8).collect();
        let mut bad = Vec::new();
        for arch in crate::registry::ARCHITECTURES.iter().filter(|a| a.causal) {
            let sets = [
                "model.width=16",
                "model.depth=2",
                "model.heads=2",
                "model.context=24",
                "model.dropout=0.1",
                "train.batch_size=4",
            ];
            let cfg = crate::registry::config(arch.name, &crate::config::Overrides::sets(&sets))?;
            let task = ByteLm { split: &data, context: cfg.model.context };
            if !Model::new(&cfg.model, 1, &Device::Cpu, DType::F64)?.per_example_dropout() {
                continue; // refused by the training loop (Reformer's padded chunks)
            }
            let weights = |shard: Option<(usize, Group)>| {
                let train = crate::config::TrainConfig {
                    accumulate: 1 + shard.as_ref().map_or(0, |s| s.0),
                    ..cfg.train.clone()
                };
                weights_after_three_steps(&cfg.model, &train, &task, |trainer| {
                    if let Some((rank, group)) = shard {
                        trainer.shard = (rank, group.world);
                        trainer.sync = Box::new(group);
                    }
                })
            };
            let one = weights(None)?;
            let addr = free_local_endpoint()?;
            let workers: Vec<Vec<f64>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|rank| {
                        let addr = addr.clone();
                        let weights = &weights;
                        s.spawn(move || weights(Some((rank, Group::connect(rank, 2, &addr, Duration::from_secs(60))?))))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("worker thread")).collect::<Result<Vec<_>>>()
            })?;
            for (rank, w) in workers.iter().enumerate() {
                let worst = worst(&one, w);
                if worst > 1e-9 {
                    bad.push(format!("{} rank {rank}: {worst:e}", arch.name));
                }
            }
        }
        assert!(bad.is_empty(), "workers' weights differ from one process's: {bad:?}");
        Ok(())
    }

    /// Rank 0 listens on the loopback address it is given (one host), on every interface at
    /// the port of a name or another address (several hosts: a name need not resolve there).
    #[test]
    fn rank_0_listens_where_the_other_hosts_can_reach_it() -> Result<()> {
        let at = |addr: &str| -> Result<std::net::SocketAddr> { Ok(listen(addr)?.local_addr()?) };
        assert!(at("127.0.0.1:0")?.ip().is_loopback());
        assert!(at("localhost:0")?.ip().is_loopback());
        assert_eq!(at("10.1.2.3:0")?.ip().to_string(), "0.0.0.0");
        assert_eq!(at("node0.invalid:0")?.ip().to_string(), "0.0.0.0");
        let err = listen("node0.invalid").unwrap_err().to_string();
        assert!(err.contains("is not host:port"), "{err}");
        Ok(())
    }

    /// A checkpoint slower than the exchange's timeout: the other ranks wait for rank 0 to
    /// say it is written (their patience, not the timeout), and a plain read (the timeout)
    /// would have given up.
    #[test]
    fn ranks_wait_for_a_checkpoint_longer_than_the_timeout() -> Result<()> {
        let addr = free_local_endpoint()?;
        let timeout = Duration::from_millis(200);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || -> Result<()> {
                        let g = Group::connect(rank, 2, &addr, Duration::from_secs(10))?;
                        // the usual read timeout, as connect sets it, but short
                        g.links[0].set_read_timeout(Some(timeout))?;
                        if rank == 0 {
                            std::thread::sleep(Duration::from_millis(600)); // writing the checkpoint
                        }
                        g.checkpoint_written(Duration::from_secs(10))?;
                        // then the exchanges go on as before, at the usual timeout
                        let mut x = [rank as f64];
                        g.all_reduce_mean(&mut x)?;
                        anyhow::ensure!(x[0] == 0.5, "mean {}", x[0]);
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        for r in results {
            r?;
        }
        Ok(())
    }

    #[test]
    fn a_rank_outside_the_world_or_a_missing_peer_is_refused() -> Result<()> {
        let err = Group::connect(2, 2, "127.0.0.1:1", Duration::from_millis(50)).err().expect("refused");
        assert!(err.to_string().contains("below the world size"), "{err}");
        let err = Group::connect(0, 3, &free_local_endpoint()?, Duration::from_millis(200)).err().expect("refused");
        assert!(err.to_string().contains("ranks 1, 2 did not join"), "{err}");
        Ok(())
    }

    #[test]
    fn a_connection_that_says_no_rank_is_dropped_and_the_ranks_still_meet() -> Result<()> {
        let addr = free_local_endpoint()?;
        let a = addr.clone();
        let zero = std::thread::spawn(move || Group::connect(0, 2, &a, Duration::from_secs(20)));
        // strays: one closes at once, one says half a rank
        let stray = || loop {
            match TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        drop(stray());
        stray().write_all(&[1, 2, 3])?;
        // a worker of another job (rank 5 of 9) and an HTTP health check
        stray().write_all(&words([5, 9]))?;
        stray().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let one = Group::connect(1, 2, &addr, Duration::from_secs(20))?;
        let zero = zero.join().expect("rank thread")?;
        assert_eq!(mean_of_two(&zero, &one, 1.0, 5.0)?, (3.0, 3.0));
        Ok(())
    }

    #[test]
    fn workers_with_other_settings_than_rank_0s_are_named() -> Result<()> {
        let addr = free_local_endpoint()?;
        let groups: Vec<Group> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn({
                        let a = &addr;
                        move || Group::connect(r, 3, a, Duration::from_secs(20))
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("rank thread")).collect::<Result<_>>()
        })?;
        let outcomes: Vec<Result<()>> = std::thread::scope(|s| {
            let checks: Vec<_> = groups
                .iter()
                .map(|g| s.spawn(move || g.agree_on_settings(if g.rank == 2 { "overlap off" } else { "overlap on" })))
                .collect();
            checks.into_iter().map(|c| c.join().expect("rank thread")).collect()
        });
        for (rank, outcome) in outcomes.iter().enumerate() {
            let err = format!("{:#}", outcome.as_ref().expect_err("refused on every rank"));
            assert!(
                err.contains("than rank 0 (overlap on): rank 2 has overlap off; every worker"),
                "rank {rank}: {err}"
            );
        }
        // the same settings everywhere: accepted
        std::thread::scope(|s| {
            let checks: Vec<_> = groups.iter().map(|g| s.spawn(move || g.agree_on_settings("same"))).collect();
            checks.into_iter().try_for_each(|c| c.join().expect("rank thread"))
        })
    }

    #[test]
    fn a_watchdog_not_kicked_within_its_limit_expires_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        // (margins of several times the kicks' interval: a loaded CI machine delays sleeps)
        let limit = Duration::from_secs(1);
        let expired = Arc::new(AtomicUsize::new(0));
        // kicked every 100 ms for 2 s: never expires
        let e = expired.clone();
        let kept = Watchdog::start(limit, move || _ = e.fetch_add(1, Ordering::SeqCst));
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            kept.kick();
        }
        assert_eq!(expired.load(Ordering::SeqCst), 0, "expired although kicked");
        // left alone: expires, once
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(expired.load(Ordering::SeqCst), 1, "did not expire, or more than once");
        // dropped before its limit: never expires
        let e = expired.clone();
        drop(Watchdog::start(limit, move || _ = e.fetch_add(1, Ordering::SeqCst)));
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(expired.load(Ordering::SeqCst), 1, "a dropped watchdog expired");
    }

    #[test]
    fn ranks_meet_later_than_the_exchange_timeout_but_within_the_join_timeout() -> Result<()> {
        let addr = free_local_endpoint()?;
        let (exchange, late) = (Duration::from_millis(100), Duration::from_millis(600));
        // rank 0 starts after the exchange's timeout: a rank waiting only that long gives up
        let a = addr.clone();
        let impatient = std::thread::spawn(move || Group::join(1, 2, &a, exchange, exchange).map(drop));
        let err = impatient.join().expect("rank thread").expect_err("gave up");
        assert!(format!("{err:#}").contains("rank 0 did not answer") && format!("{err:#}").contains(JOIN_TIMEOUT_S));
        let a = addr.clone();
        let patient = std::thread::spawn(move || Group::join(1, 2, &a, Duration::from_secs(20), exchange));
        std::thread::sleep(late);
        let zero = Group::join(0, 2, &addr, Duration::from_secs(20), exchange)?;
        let one = patient.join().expect("rank thread")?;
        // three ranks, the last later than the exchange's timeout: the first two wait in the
        // rendezvous's first exchange, under the join's deadline
        let addr3 = free_local_endpoint()?;
        std::thread::scope(|s| -> Result<()> {
            let early: Vec<_> = (0..2)
                .map(|r| {
                    let a = &addr3;
                    s.spawn(move || Group::join(r, 3, a, Duration::from_secs(20), exchange).map(drop))
                })
                .collect();
            std::thread::sleep(late);
            Group::join(2, 3, &addr3, Duration::from_secs(20), exchange)?;
            early.into_iter().try_for_each(|t| t.join().expect("rank thread"))
        })?;
        // met, and the exchange after still works
        assert_eq!(mean_of_two(&zero, &one, 1.0, 3.0)?, (2.0, 2.0));
        Ok(())
    }
}
