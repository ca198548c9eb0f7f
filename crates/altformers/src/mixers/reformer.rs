//! Reformer's causal LSH attention (Kitaev, Kaiser and Levskaya 2020, "Reformer: The
//! Efficient Transformer", arXiv 2001.04451; the reference is google/trax
//! `trax/layers/research/efficient_attention.py`, `LSHSelfAttention`).
//!
//! Per head, one projection gives the shared query/key `x_t` and another the value `v_t`:
//! - **Shared QK.** Queries are `q_t = x_t`; keys are the queries normalised to unit length,
//!   `k_t = x_t / sqrt(|x_t|^2 + d_h eps)` (trax's `length_normalized` then `/ sqrt(d_h)`),
//!   and the score is `q_i . k_j` (no further `1/sqrt(d_h)`: the key already carries it).
//! - **Hashing by random rotations.** Round `r` draws `R_r: [d_h, n_b / 2]` and hashes
//!   `h_r(k) = argmax([k R_r ; -k R_r])` into `n_b` (even) buckets, `n_hashes` rounds.
//! - **Sort and chunk.** Each round sorts the positions stably by (bucket, position) and cuts
//!   them into chunks of `c` tokens; a chunk attends to itself and to the chunk before it,
//!   causally on the ORIGINAL positions (key j visible to query i iff j <= i).
//! - **Self only when alone.** A query's score for its own key is replaced by -1e5 (trax's
//!   `mask_self`, a large negative value, not -inf): it attends to itself only when nothing
//!   else is visible, and then with weight 1.
//! - **Rounds combined by their log-sum-exp.** With `z_r` the log-sum-exp of round r's scores
//!   and `o_r` its output, `o = sum_r exp(z_r - logsumexp_r z_r) o_r` (the paper's
//!   multi-round equation, trax's combination, without the duplicate-count correction trax
//!   and Hugging Face dropped): one softmax over the union, with multiplicity, of every
//!   round's keys, so identical rounds give one round (tested).
//! - **Layout.** Each round's chunks (queries, and the keys of their chunk and the previous
//!   one) are gathered into `[chunks, Qc, d_h]` and `[chunks, Kc, d_h]` blocks and scored by
//!   one batched product; each query's output and log-sum-exp are then gathered back per
//!   round and combined. Memory O(T c) for scores and O(T d) for the gathered vectors (each
//!   bucket's last chunk is padded to the largest chunk: up to n_b c extra tokens per round).
//!
//! **Where the chunks are cut: exact causality.** trax cuts the sorted sequence of a round
//! every `c` tokens across bucket boundaries. Then the chunk of query i depends on how many
//! LATER tokens hash into lower buckets (they sort before it): a future token moves earlier
//! outputs, so that form is not causal as a function (only masked by position), and no
//! decoding step can reproduce it. Here each bucket's run in the sorted order (its tokens in
//! position order) is cut into chunks of `c` from the run's start: the k-th token of a bucket
//! (k counted from 0) is in chunk `floor(k / c)` of that bucket and attends to the bucket's
//! tokens `c (floor(k / c) - 1) ..= k` (from 0 in the first chunk). That depends only on
//! tokens at or before i, so the layer is exactly causal, and decoding computes exactly what
//! the parallel form computes for the last position. The paper's idealised attention is
//! within a bucket (its `P_i = {j : h(q_i) = h(k_j)}`); trax's chunks also let a token see the
//! neighbouring buckets' tokens that share its chunk, ours do not. With one bucket both are
//! the same: chunks of position order, own and previous (a chunk covering T: full causal
//! shared-QK attention with the self-mask; tested). No divisibility of T by `c` is needed.
//!
//! **Sorting cost.** A stable sort by (bucket, position) of integers in `[0, n_b)` is a
//! counting sort: one pass over the positions per round, O(n_hashes T) on the host (the
//! buckets are copied there); the paper's O(T log T) is the comparison sort's bound.
//!
//! **The rotations** are constants drawn from `model.options.hash_seed` and the layer index
//! (fixed per model: the same in every step, in evaluation and in decoding, and saved
//! weights reproduce the model's hashing). Hashing is an argmax, not differentiated: the
//! bucket indices leave the graph, and the backward pass goes through the gathered keys and
//! values at exactly the positions the forward used (candle records the `index_select`
//! with its index tensor), so it sees the same hashes by construction.
//!
//! **Decoding.** The state is the cache of past normalised keys and values. A step hashes the
//! new key and re-hashes the cache (O(T d_h n_b n_hashes) per step, a matmul over the cache;
//! buckets could be cached instead at O(T n_hashes) integers), finds its chunk by counting
//! its bucket's earlier tokens (O(n_hashes T)), and attends to at most `2 c n_hashes` keys:
//! O(T) per step in all.
//!
//! Shapes: `B` batch, `T` length, `H` heads, `d_h` head width, `R` hash rounds; a chunk
//! holds `Qc <= c` query slots and `Kc <= 2 c` key slots.

use anyhow::{bail, Result as AnyResult};
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{MixerState, SequenceMixer};
use crate::complexity::{Complexity, CostShape, Judgement, Review};
use crate::config::{ModelConfig, Position};
use crate::nn::Linear;
use crate::params::ParamBuilder;
use crate::primitives::rotary;
use crate::rng::Rng;

/// trax's `mask_self` value: a query's score for its own key.
pub const SELF_SCORE: f64 = -1e5;

/// trax's `length_normalized` epsilon (on the mean square).
const NORM_EPS: f64 = 1e-6;

/// The random stream of the rotations (a purpose of [`Rng::derive`] of this file's own).
const ROTATION_STREAM: u64 = 0x4c53_4820;

/// `model.options` of `reformer`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReformerOptions {
    /// Buckets per hash round (even); 0 (the default): about 2 T / c for T = `model.context`
    /// (the paper's choice), rounded up to even, at least 2.
    pub n_buckets: usize,
    /// Hash rounds.
    pub n_hashes: usize,
    /// Chunk length c.
    pub chunk: usize,
    /// Seed of the random rotations (with the layer index).
    pub hash_seed: u64,
    /// Positions per chunk of the FFN in the reversible backbone (position-wise, so the
    /// chunks bound the hidden activation without changing the result).
    pub ffn_chunk: usize,
    /// The reversible backbone's backward recomputes the layers (true) or ordinary
    /// backpropagation keeps every activation (false: the same function and gradients).
    pub reversible: bool,
}

impl Default for ReformerOptions {
    fn default() -> Self {
        Self { n_buckets: 0, n_hashes: 2, chunk: 64, hash_seed: 0, ffn_chunk: 128, reversible: true }
    }
}

impl crate::config::Options for ReformerOptions {
    fn check(&self) -> AnyResult<()> {
        let n = self.n_buckets;
        if n != 0 && (n < 2 || !n.is_multiple_of(2)) {
            bail!("model.options.n_buckets must be even and at least 2, or 0 for the default (h(x) = argmax([xR; -xR]) has 2 x (n_buckets / 2) buckets), got {n}");
        }
        if self.n_hashes == 0 {
            bail!("model.options.n_hashes must be at least 1");
        }
        if self.chunk == 0 {
            bail!("model.options.chunk must be at least 1");
        }
        if self.ffn_chunk == 0 {
            bail!("model.options.ffn_chunk must be at least 1");
        }
        Ok(())
    }
}

impl ReformerOptions {
    /// The number of buckets for a model of context `context`.
    pub fn buckets(&self, context: usize) -> usize {
        match self.n_buckets {
            0 => (2 * context).div_ceil(self.chunk).div_ceil(2).max(1) * 2,
            n => n,
        }
    }
}

/// The chunks of one LSH attention call, laid out for batched products: every chunk of
/// every (batch, head) row and round, each with its queries (`Qc` slots) and the keys it sees
/// (its own chunk and the previous one of the same bucket, `Kc` slots, at most `2 c`), and
/// where each query's output lands.
///
/// Positions are flat indices: `row T_q + (position - from)` for queries, `row T + position`
/// for keys (row = batch x head).
pub struct ChunkPlan {
    pub chunks: usize,
    pub query_slots: usize,
    pub key_slots: usize,
    /// `[chunks, Qc]` flat query indices (padding: 0).
    pub queries: Vec<u32>,
    /// `[chunks, Kc]` flat key indices (padding: 0).
    pub keys: Vec<u32>,
    /// `[chunks, Qc]` original positions of the queries; padding: `f32::MAX` (it sees every
    /// key of its chunk, so no row of scores is empty; its output is never read).
    pub query_positions: Vec<f32>,
    /// `[chunks, Kc]` original positions of the keys; padding: `+inf` (seen by no query). A
    /// key is visible to a query iff its position is at or before the query's (the causal
    /// mask on original positions), and is the query's own iff equal: both are computed on the
    /// device from these O(T) vectors.
    pub key_positions: Vec<f32>,
    /// `[rows, T_q, R]`: the query slot (`chunk Qc + slot`) of each query in each round (a
    /// padded query of an encoder, in no chunk: slot 0; its output is zeroed).
    pub slot_of: Vec<u32>,
    /// Keys visible to a query only at or before its position (the causal layer), or every
    /// key of its chunks (the encoder's).
    pub causal: bool,
}

/// The [`ChunkPlan`] of `chunks`: for each, its (batch x head) row, its queries' positions
/// (all at or after `from`), the positions of the keys it sees, and its round.
fn lay_out(
    chunks: &[(usize, &[u32], Vec<u32>, usize)],
    rows: usize,
    rounds: usize,
    t: usize,
    from: usize,
    causal: bool,
) -> ChunkPlan {
    let nq = t - from;
    let qc = chunks.iter().map(|c| c.1.len()).max().unwrap_or(1);
    let kc = chunks.iter().map(|c| c.2.len()).max().unwrap_or(1);
    let n = chunks.len();
    let mut p = ChunkPlan {
        chunks: n,
        query_slots: qc,
        key_slots: kc,
        queries: vec![0; n * qc],
        keys: vec![0; n * kc],
        query_positions: vec![f32::MAX; n * qc],
        key_positions: vec![f32::INFINITY; n * kc],
        slot_of: vec![0; rows * nq * rounds],
        causal,
    };
    for (ci, (row, queries, keys, r)) in chunks.iter().enumerate() {
        for (ks, &k) in keys.iter().enumerate() {
            p.keys[ci * kc + ks] = (row * t) as u32 + k;
            p.key_positions[ci * kc + ks] = k as f32;
        }
        for (qs, &q) in queries.iter().enumerate() {
            let query = row * nq + q as usize - from;
            p.queries[ci * qc + qs] = query as u32;
            p.query_positions[ci * qc + qs] = q as f32;
            p.slot_of[query * rounds + r] = (ci * qc + qs) as u32;
        }
    }
    p
}

/// The chunks of queries at positions `from..T`, given `buckets: [rows, R, T]` (each round's
/// bucket of every position). Per round a stable counting sort by (bucket, position) walks
/// the positions in order; each bucket's run is cut into chunks of `c` from its start, and
/// chunk j sees the run's tokens of chunks j - 1 and j, causally. Chunks holding no query at
/// or after `from` are left out (a decoding step keeps one chunk per round).
pub fn plan(
    buckets: &[u32],
    rows: usize,
    rounds: usize,
    t: usize,
    from: usize,
    chunk: usize,
    n_buckets: usize,
) -> ChunkPlan {
    // (row, queries, keys, round) of every chunk
    let mut runs: Vec<Vec<Vec<u32>>> = Vec::with_capacity(rows * rounds);
    for hashed in buckets.chunks(t).take(rows * rounds) {
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); n_buckets];
        for (pos, &b) in hashed.iter().enumerate() {
            members[b as usize].push(pos as u32);
        }
        runs.push(members);
    }
    let mut chunks = Vec::new();
    for (i, members) in runs.iter().enumerate() {
        for run in members {
            for start in (0..run.len()).step_by(chunk) {
                let end = (start + chunk).min(run.len());
                let first = start.saturating_sub(chunk);
                let queries = &run[start..end];
                let skip = queries.partition_point(|&p| (p as usize) < from);
                if skip < queries.len() {
                    chunks.push((i / rounds, &queries[skip..], run[first..end].to_vec(), i % rounds));
                }
            }
        }
    }
    lay_out(&chunks, rows, rounds, t, from, true)
}

/// The encoder's chunks (trax's `LSHSelfAttention` without the causal mask): per row and
/// round, the real positions (`keep: [B, T]` 1, `heads` rows per batch entry; `None`: all)
/// stably sorted by (bucket, position), the sorted sequence cut every `chunk` tokens across
/// bucket boundaries, and chunk j seeing chunks j - 1 (cyclically: the first sees the last,
/// as trax's `look_adjacent`) and j, every key visible. Padded positions are in no chunk, so
/// what they hold moves nothing (not even where the chunks are cut).
pub fn plan_bidirectional(
    buckets: &[u32],
    rows: usize,
    rounds: usize,
    t: usize,
    chunk: usize,
    n_buckets: usize,
    keep: Option<(&[u8], usize)>,
) -> ChunkPlan {
    let real = |row: usize, pos: usize| keep.is_none_or(|(k, heads)| k[(row / heads) * t + pos] != 0);
    let mut sorted: Vec<Vec<u32>> = Vec::with_capacity(rows * rounds);
    for (i, hashed) in buckets.chunks(t).take(rows * rounds).enumerate() {
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); n_buckets];
        for (pos, &b) in hashed.iter().enumerate().filter(|(pos, _)| real(i / rounds, *pos)) {
            members[b as usize].push(pos as u32);
        }
        sorted.push(members.concat());
    }
    let mut chunks = Vec::new();
    for (i, order) in sorted.iter().enumerate() {
        let cut: Vec<&[u32]> = order.chunks(chunk).collect();
        for (j, queries) in cut.iter().enumerate() {
            let keys = match cut.len() {
                1 => queries.to_vec(),
                n => [cut[(j + n - 1) % n], queries].concat(),
            };
            chunks.push((i / rounds, *queries, keys, i % rounds));
        }
    }
    lay_out(&chunks, rows, rounds, t, 0, false)
}

/// Keys of the shared QK: `x / sqrt(|x|^2 + d_h eps)` (trax: `x / rms(x) / sqrt(d_h)`).
/// `x: [..., d_h]`.
pub fn normalized_keys(x: &Tensor) -> Result<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + dh as f64 * NORM_EPS)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Every round's bucket of every key: `keys: [B, H, T, d_h]`, `rotations: [d_h, R n_b / 2]`
/// -> `[B H, R, T]` on the host. `h_r(k) = argmax([k R_r ; -k R_r])`, computed in f32.
pub fn hash(keys: &Tensor, rotations: &Tensor, rounds: usize) -> Result<Vec<u32>> {
    let (b, h, t, dh) = keys.dims4()?;
    let half = rotations.dim(1)? / rounds;
    let rotated =
        keys.to_dtype(DType::F32)?.reshape((b * h * t, dh))?.matmul(rotations)?.reshape((b * h, t, rounds, half))?;
    let both = Tensor::cat(&[&rotated, &rotated.neg()?], D::Minus1)?;
    // [B H, T, R] -> [B H, R, T]
    both.argmax(D::Minus1)?.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<u32>()
}

/// Attention of `q: [B, H, T_q, d_h]` (positions `from..T`) over `keys, v: [B, H, T, d_h]`
/// as `plan` chunks them: per round, scores `q . k` of each chunk's queries and keys, the own
/// key's replaced by [`SELF_SCORE`], invisible keys excluded, softmax (optional dropout on the
/// probabilities) and the round's output `o_r` with its log-sum-exp `z_r`; then the rounds
/// combined, `o = sum_r exp(z_r - logsumexp_r z_r) o_r`. -> `[B, H, T_q, d_h]`.
pub fn attend(
    q: &Tensor,
    keys: &Tensor,
    v: &Tensor,
    plan: &ChunkPlan,
    dropout: Option<(f64, &mut Rng)>,
) -> Result<Tensor> {
    let (b, h, nq, dh) = q.dims4()?;
    let t = keys.dim(2)?;
    let (n, qc, kc) = (plan.chunks, plan.query_slots, plan.key_slots);
    let rounds = plan.slot_of.len() / (b * h * nq);
    let dev = q.device();
    if n == 0 {
        // nothing real to attend from (an encoder's all-padding batch)
        return q.zeros_like();
    }
    let index = |i: &[u32]| Tensor::from_slice(i, i.len(), dev);
    let gather = |x: &Tensor, rows: usize, i: &[u32], slots: usize| -> Result<Tensor> {
        crate::nn::gather_rows(&x.reshape((rows, dh))?, &index(i)?)?.reshape((n, slots, dh))
    };
    let qg = gather(q, b * h * nq, &plan.queries, qc)?;
    let (kg, vg) = (gather(keys, b * h * t, &plan.keys, kc)?, gather(v, b * h * t, &plan.keys, kc)?);
    // the softmax and the rounds' weights in f32 at least
    let work = if matches!(q.dtype(), DType::BF16 | DType::F16) { DType::F32 } else { q.dtype() };
    let scores = qg.matmul(&kg.t()?)?.to_dtype(work)?;
    let query_positions = Tensor::from_slice(&plan.query_positions, (n, qc, 1), dev)?;
    let key_positions = Tensor::from_slice(&plan.key_positions, (n, 1, kc), dev)?;
    let own = key_positions.broadcast_eq(&query_positions)?.to_dtype(work)?;
    let scores = ((scores * own.affine(-1.0, 1.0)?)? + own.affine(SELF_SCORE, 0.0)?)?;
    let visible = if plan.causal {
        key_positions.broadcast_le(&query_positions)?
    } else {
        // every key slot but the padding (+inf)
        key_positions.broadcast_le(&Tensor::full(f32::MAX, (n, qc, 1), dev)?)?
    };
    let scores = visible.where_cond(&scores, &Tensor::full(f32::NEG_INFINITY, (n, qc, kc), dev)?.to_dtype(work)?)?;
    // log-sum-exp with the row maximum held constant (it cancels analytically)
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let lse = (max + sum.log()?)?;
    let probs = exp.broadcast_div(&sum)?.to_dtype(v.dtype())?;
    let probs = match dropout {
        Some((p, rng)) if p > 0.0 => crate::nn::dropout(&probs, p, rng)?,
        _ => probs,
    };
    let out = probs.matmul(&vg)?;
    // each query's output and log-sum-exp in every round: [B H T_q, R, ...]
    let slot_of = index(&plan.slot_of)?;
    let out = crate::nn::gather_rows(&out.reshape((n * qc, dh))?, &slot_of)?.reshape((b * h * nq, rounds, dh))?;
    let lse = crate::nn::gather_rows(&lse.reshape((n * qc, 1))?, &slot_of)?.reshape((b * h * nq, rounds))?;
    let weights = crate::nn::softmax(&lse)?.to_dtype(out.dtype())?.unsqueeze(2)?;
    out.broadcast_mul(&weights)?.sum(1)?.reshape((b, h, nq, dh))
}

/// Causal multi-head LSH attention with shared QK (see the module doc).
pub struct LshAttention {
    /// `[D] -> [2 H d_h]`: the shared query/key, then the value.
    qv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    /// `[d_h, R n_b / 2]`, f32, one block of `n_b / 2` columns per round.
    rotations: Tensor,
    n_buckets: usize,
    n_hashes: usize,
    chunk: usize,
    rope_base: Option<f64>,
    /// Causal (`reformer`) or bidirectional (`reformer-encoder`, [`plan_bidirectional`]).
    causal: bool,
}

impl LshAttention {
    /// Parameters `qv.*`, `out.*` under `pb`; the rotations of layer `layer` from the options'
    /// seed.
    pub fn new(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Self> {
        Self::with_causality(cfg, layer, pb, true)
    }

    /// [`LshAttention::new`], causal or bidirectional.
    pub fn with_causality(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder, causal: bool) -> AnyResult<Self> {
        let o: ReformerOptions = cfg.options()?;
        let (d, h, dh) = (cfg.width, cfg.heads, cfg.head_dim());
        let n_buckets = o.buckets(cfg.context);
        // the rotations are no parameter, so the builder's size check does not see them
        let what = || format!("layer {layer}'s LSH rotations (model.options.n_hashes x n_buckets / 2 columns)");
        let n = crate::model::size::check_tensor(what, &[dh, o.n_hashes, n_buckets / 2], 4)?;
        let columns = n / dh;
        let values = Rng::derive(o.hash_seed, ROTATION_STREAM, layer as u64).normal_vec(n, 1.0);
        Ok(Self {
            qv: Linear::new(pb, "qv", d, 2 * h * dh, 0.02, cfg.bias)?,
            out: Linear::new(pb, "out", h * dh, d, 0.02 / (2.0 * cfg.depth as f64).sqrt(), cfg.bias)?,
            heads: h,
            head_dim: dh,
            rotations: Tensor::from_vec(values, (dh, columns), &pb.device)?,
            n_buckets,
            n_hashes: o.n_hashes,
            chunk: o.chunk,
            rope_base: (cfg.position == Position::Rope).then_some(cfg.rope_base),
            causal,
        })
    }

    /// `x: [B, T, D]` at positions `offset..` -> queries and normalised keys `[B, H, T, d_h]`
    /// and values `[B, H, T, d_h]`.
    fn project(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, dh) = (self.heads, self.head_dim);
        let qv = self.qv.forward_parts(x, &[h * dh, h * dh])?;
        let heads = |p: &Tensor| -> Result<Tensor> { p.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous() };
        let mut q = heads(&qv[0])?;
        if let Some(base) = self.rope_base {
            q = rotary::apply(&q, offset, base)?;
        }
        let k = normalized_keys(&q)?;
        Ok((q, k, heads(&qv[1])?))
    }

    /// Causal LSH attention of the queries at positions `from..T` over keys `0..T`.
    fn lsh(&self, q: &Tensor, k: &Tensor, v: &Tensor, from: usize, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let (b, h, t, _) = k.dims4()?;
        let buckets = hash(k, &self.rotations, self.n_hashes)?;
        let plan = plan(&buckets, b * h, self.n_hashes, t, from, self.chunk, self.n_buckets);
        attend(q, k, v, &plan, dropout)
    }

    /// The encoder's LSH attention of `x: [B, T, D]`, padding where `keep: [B, T]` is 0 (in
    /// no chunk; its outputs zeroed).
    fn bidirectional(&self, x: &Tensor, keep: Option<&Tensor>, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let (q, k, v) = self.project(x, 0)?;
        let (b, h, t, _) = k.dims4()?;
        let buckets = hash(&k, &self.rotations, self.n_hashes)?;
        let mask = keep.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
        let plan = plan_bidirectional(
            &buckets,
            b * h,
            self.n_hashes,
            t,
            self.chunk,
            self.n_buckets,
            mask.as_deref().map(|m| (m, h)),
        );
        let y = attend(&q, &k, &v, &plan, dropout)?;
        let y = match keep {
            Some(keep) => y.broadcast_mul(&keep.reshape((b, 1, t, 1))?.to_dtype(y.dtype())?)?,
            None => y,
        };
        self.merge(&y)
    }

    fn refuse_recurrence(&self) -> Result<()> {
        if !self.causal {
            candle_core::bail!(
                "reformer-encoder: bidirectional LSH attention sees later tokens: it has no recurrent form"
            );
        }
        Ok(())
    }

    /// `[B, H, T, d_h] -> [B, T, D]` through the output projection.
    fn merge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, h, t, dh) = y.dims4()?;
        self.out.forward(&y.transpose(1, 2)?.reshape((b, t, h * dh))?)
    }
}

impl SequenceMixer for LshAttention {
    /// The attention's dropout falls on chunks padded to the longest in the whole batch: a
    /// slice of the batch pads differently, so its masks are not its part of the whole's.
    fn per_example_dropout(&self) -> bool {
        false
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.causal {
            return self.bidirectional(x, None, None);
        }
        let (q, k, v) = self.project(x, 0)?;
        self.merge(&self.lsh(&q, &k, &v, 0, None)?)
    }

    fn forward_train(&self, x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
        if !self.causal {
            return self.bidirectional(x, None, Some((p, rng)));
        }
        let (q, k, v) = self.project(x, 0)?;
        self.merge(&self.lsh(&q, &k, &v, 0, Some((p, rng)))?)
    }

    fn forward_padded(&self, x: &Tensor, keep: &Tensor, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        if self.causal {
            return super::refuse_padding();
        }
        self.bidirectional(x, Some(keep), dropout)
    }

    /// The state is the cache `[normalised keys, values]`, each `[B, H, T, d_h]`.
    fn prefill(&self, x: &Tensor) -> Result<(Tensor, MixerState)> {
        self.refuse_recurrence()?;
        let (q, k, v) = self.project(x, 0)?;
        let y = self.merge(&self.lsh(&q, &k, &v, 0, None)?)?;
        Ok((y, MixerState { tensors: vec![k, v], pos: x.dim(1)? }))
    }

    /// Re-hashes the whole cache with the new key and attends from the last position only:
    /// O(T) per step (see the module doc).
    fn step(&self, x: &Tensor, state: &mut MixerState) -> Result<Tensor> {
        self.refuse_recurrence()?;
        let (q, k, v) = self.project(x, state.pos)?;
        let (k, v) = match state.tensors.as_slice() {
            [kc, vc] => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
            _ => (k, v),
        };
        let t = k.dim(2)?;
        let y = self.lsh(&q, &k, &v, t - 1, None)?;
        state.tensors = vec![k, v];
        state.pos += 1;
        self.merge(&y)
    }
}

/// The Reformer's head reads the concatenated pair of its reversible stack (2 d wide): it is
/// not tied to the embedding.
pub fn adjust_defaults(cfg: &mut ModelConfig) {
    cfg.tie_embeddings = false;
}

pub fn build(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(LshAttention::new(cfg, layer, pb)?))
}

/// The encoder's mixer (`reformer-encoder`): bidirectional LSH attention (LRA's Reformer).
pub fn build_bidirectional(cfg: &ModelConfig, layer: usize, pb: &ParamBuilder) -> AnyResult<Box<dyn SequenceMixer>> {
    Ok(Box::new(LshAttention::with_causality(cfg, layer, pb, false)?))
}

/// Costs at the default options (2 rounds, c = 64, n_b about 2 T / c).
pub const COMPLEXITY: Complexity = Complexity {
    review: Review {
        row: Some("Reformer"),
        judgement: Judgement::Imprecise(
            "right for time with the hash rounds n_r and the chunk c constant (O(n_r T c d) attention, O(n_r T log T) sorting, plus the O(T d^2) projections the line leaves out); decoding re-hashes the cache, O(T) per token",
        ),
    },
    true_time: "O(T d^2) projections + O(n_r T d_h n_b h) hashing + O(n_r T) counting sort (O(n_r T log T) as a comparison sort) + O(n_r T c d) chunked attention (n_r rounds, chunk c); decode O(T) per token (re-hashing the cache)",
    true_space: "O(n_r (T + n_b c) c h) scores + O(n_r (T + n_b c) d) gathered queries, keys and values (chunks of c padded at each bucket's end); decode cache O(T d)",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let o = ReformerOptions::default();
        let (rounds, chunk) = (o.n_hashes as f64, o.chunk as f64);
        let buckets = o.buckets(s.seq) as f64;
        // qv (2 d^2) and out (d^2) projections; hashing (d_h x n_b / 2 per head and round);
        // scores and weighted sum over 2 c slots per round (2 FLOPs x d per slot, twice)
        b * (6.0 * t * d * d + rounds * t * d * buckets + 8.0 * rounds * chunk * t * d)
    },
    memory: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        let o = ReformerOptions::default();
        let (rounds, chunk) = (o.n_hashes as f64, o.chunk as f64);
        // chunked tokens per round: T, plus each bucket's last chunk's padding
        let padded = rounds * (t + o.buckets(s.seq) as f64 * chunk);
        // q, k, v, merged, projected; gathered queries (1x), keys and values (2x each);
        // scores and probabilities (2 c per query and head)
        b * (5.0 * t * d + 5.0 * padded * d + 2.0 * padded * 2.0 * chunk * h)
    },
    state: |s: &CostShape| 2.0 * (s.batch * s.seq * s.width) as f64,
};

/// The encoder's (`reformer-encoder`): the same review line, no decoding.
pub const ENCODER_COMPLEXITY: Complexity = Complexity {
    true_time: "O(T d^2) projections + O(n_r T d_h n_b h) hashing + O(n_r T) counting sort + O(n_r T c d) chunked attention; encoder only, no decoding",
    true_space: "O(n_r T c h) scores + O(n_r T d) gathered queries, keys and values; no decoding",
    state: |_: &CostShape| 0.0,
    ..COMPLEXITY
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_causal, assert_mixer_modes_agree, randn, rel_err, tiny_config};
    use candle_core::Device;

    fn mixer(sets: &[&str]) -> AnyResult<(ModelConfig, LshAttention)> {
        let mut all = vec!["model.width=16", "model.heads=2", "model.context=64"];
        all.extend_from_slice(sets);
        let cfg = tiny_config("reformer", &all)?;
        let pb = ParamBuilder::new(3, &Device::Cpu, DType::F64);
        let m = LshAttention::new(&cfg, 0, &pb)?;
        Ok((cfg, m))
    }

    /// Full causal shared-QK attention with the self-mask, straight from the definition:
    /// query i sees keys j <= i with score q_i . k_j, its own score replaced by -1e5.
    /// `q, k, v: [B, H, T, d_h]` (f64).
    fn full_shared_qk_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> AnyResult<Tensor> {
        shared_qk_reference(q, k, v, true)
    }

    /// [`full_shared_qk_reference`], or with every key visible (`causal` false: the encoder's).
    fn shared_qk_reference(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> AnyResult<Tensor> {
        let (b, h, t, dh) = q.dims4()?;
        let (q, k, v): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (q.flatten_all()?.to_vec1()?, k.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?);
        let mut out = vec![0.0; b * h * t * dh];
        for row in 0..b * h {
            let at = |x: &[f64], i: usize| x[(row * t + i) * dh..][..dh].to_vec();
            for i in 0..t {
                let qi = at(&q, i);
                let scores: Vec<f64> = (0..if causal { i + 1 } else { t })
                    .map(|j| if j == i { SELF_SCORE } else { qi.iter().zip(at(&k, j)).map(|(a, b)| a * b).sum() })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (j, w) in weights.iter().enumerate() {
                    for (o, vj) in out[(row * t + i) * dh..][..dh].iter_mut().zip(at(&v, j)) {
                        *o += w / total * vj;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(out, (b, h, t, dh), &Device::Cpu)?)
    }

    /// One bucket and a chunk covering T, one round: exactly full causal shared-QK attention
    /// with the self-mask (position 0 attends to itself alone).
    #[test]
    fn one_bucket_and_a_covering_chunk_is_full_shared_qk_attention() -> AnyResult<()> {
        let t = 23;
        let (_, m) = mixer(&["model.options.n_buckets=2", "model.options.chunk=32", "model.options.n_hashes=1"])?;
        let x = randn(&[2, t, 16], 1, DType::F64)?;
        let (q, k, v) = m.project(&x, 0)?;
        // one bucket: every position hashed to bucket 0
        let buckets = vec![0u32; 2 * 2 * t];
        let y = attend(&q, &k, &v, &plan(&buckets, 4, 1, t, 0, 32, 1), None)?;
        let e = rel_err(&y, &full_shared_qk_reference(&q, &k, &v)?)?;
        assert!(e < 1e-12, "LSH attention with one bucket vs full shared-QK attention: {e}");
        // position 0, alone, takes its own value
        let e0 = rel_err(&y.narrow(2, 0, 1)?, &v.narrow(2, 0, 1)?)?;
        assert!(e0 < 1e-12, "position 0 attends to itself: {e0}");
        Ok(())
    }

    /// The encoder's form, one bucket and one chunk covering T: exactly full bidirectional
    /// shared-QK attention with the self-mask; with padding, attention over the real positions
    /// alone (the padded ones' outputs 0), whatever buckets the padding hashed to.
    #[test]
    fn encoder_with_one_bucket_and_a_covering_chunk_is_full_bidirectional_attention() -> AnyResult<()> {
        let t = 23;
        let (_, m) = mixer(&["model.options.n_buckets=2", "model.options.chunk=32", "model.options.n_hashes=1"])?;
        let x = randn(&[2, t, 16], 1, DType::F64)?;
        let (q, k, v) = m.project(&x, 0)?;
        let y = attend(&q, &k, &v, &plan_bidirectional(&vec![0u32; 4 * t], 4, 1, t, 32, 1, None), None)?;
        let e = rel_err(&y, &shared_qk_reference(&q, &k, &v, false)?)?;
        assert!(e < 1e-12, "bidirectional LSH attention with one bucket vs full attention: {e}");
        // the second sequence padded after 15 positions, its padding hashed anywhere
        let real = 15;
        let keep: Vec<u8> = (0..2 * t).map(|i| u8::from(i < t || i % t < real)).collect();
        let buckets: Vec<u32> = (0..4 * t).map(|i| u32::from(i >= 2 * t && i % t >= real && i % 3 == 0)).collect();
        let y = attend(&q, &k, &v, &plan_bidirectional(&buckets, 4, 1, t, 32, 2, Some((&keep, 2))), None)?;
        let part = |x: &Tensor| x.narrow(0, 1, 1)?.narrow(2, 0, real);
        let alone = shared_qk_reference(&part(&q)?, &part(&k)?, &part(&v)?, false)?;
        assert!(rel_err(&part(&y)?, &alone)? < 1e-12);
        Ok(())
    }

    /// trax's encoder chunking: the sorted sequence cut every c tokens ACROSS bucket
    /// boundaries, each chunk seeing itself and the one before, the first seeing the last.
    #[test]
    fn encoder_chunks_are_cut_across_buckets_and_look_back_cyclically() {
        // positions 0..6 in buckets [1, 0, 1, 0, 1, 0]: sorted 1 3 5 | 0 2 4, chunks of 2:
        // [1 3] [5 0] [2 4]
        let p = plan_bidirectional(&[1, 0, 1, 0, 1, 0], 1, 1, 6, 2, 2, None);
        assert!(!p.causal);
        let seen = |pos: usize| -> Vec<u32> {
            let slot = p.slot_of[pos] as usize;
            let chunk = slot / p.query_slots;
            let mut k: Vec<u32> = (0..p.key_slots)
                .filter(|&s| p.key_positions[chunk * p.key_slots + s].is_finite())
                .map(|s| p.keys[chunk * p.key_slots + s])
                .collect();
            k.sort();
            k
        };
        assert_eq!(seen(1), vec![1, 2, 3, 4], "the first chunk looks back to the last");
        assert_eq!(seen(0), vec![0, 1, 3, 5], "[5 0] crosses from bucket 0 to 1 and sees [1 3]");
        assert_eq!(seen(4), vec![0, 2, 4, 5]);
    }

    /// The keys query `pos` of row 0 sees in round `round`.
    fn seen(p: &ChunkPlan, t: usize, round: usize, pos: usize) -> Vec<u32> {
        let rounds = p.slot_of.len() / t;
        let slot = p.slot_of[pos * rounds + round] as usize;
        let (chunk, kc) = (slot / p.query_slots, p.key_slots);
        let q = p.query_positions[slot];
        (0..kc).filter(|&k| p.key_positions[chunk * kc + k] <= q).map(|k| p.keys[chunk * kc + k]).collect()
    }

    /// With one bucket and chunks shorter than T, a query sees its position chunk and the one
    /// before (trax's chunking of an unsorted sequence), causally: a key two chunks back is
    /// invisible.
    #[test]
    fn chunks_see_their_own_and_the_previous_chunk() {
        let (t, c) = (10, 3);
        let p = plan(&[0u32; 10], 1, 1, t, 0, c, 1);
        assert_eq!(p.chunks, 4);
        assert_eq!(seen(&p, t, 0, 0), vec![0]);
        assert_eq!(seen(&p, t, 0, 2), vec![0, 1, 2]);
        assert_eq!(seen(&p, t, 0, 3), vec![0, 1, 2, 3]);
        assert_eq!(seen(&p, t, 0, 8), vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(seen(&p, t, 0, 9), vec![6, 7, 8, 9]);
        // a decoding step's plan: one chunk, one query, the same keys
        let step = plan(&[0u32; 10], 1, 1, t, 9, c, 1);
        assert_eq!((step.chunks, step.query_slots), (1, 1));
        assert_eq!(seen(&step, 1, 0, 0), vec![6, 7, 8, 9]);
    }

    /// Buckets are sorted stably by (bucket, position) and chunked within each bucket's run:
    /// a query sees only keys of its own bucket, at or before it.
    #[test]
    fn queries_see_only_their_bucket_up_to_themselves() {
        let buckets = [1u32, 0, 1, 1, 0, 1, 1];
        let p = plan(&buckets, 1, 1, 7, 0, 2, 2);
        // bucket 1's run: positions 0, 2, 3, 5, 6 (chunks {0, 2}, {3, 5}, {6})
        assert_eq!(seen(&p, 7, 0, 3), vec![0, 2, 3]);
        assert_eq!(seen(&p, 7, 0, 5), vec![0, 2, 3, 5]);
        assert_eq!(seen(&p, 7, 0, 6), vec![3, 5, 6]);
        // bucket 0's run: positions 1, 4
        assert_eq!(seen(&p, 7, 0, 4), vec![1, 4]);
        let slot = p.slot_of[4] as usize;
        assert_eq!(p.query_positions[slot], 4.0);
        // padding keys are seen by no query, padding queries see every key of their chunk
        assert!(p.key_positions.iter().filter(|k| k.is_infinite()).count() > 0);
        assert!(p.query_positions.iter().filter(|&&q| q == f32::MAX).count() > 0);
    }

    /// Why the chunks are cut inside each bucket's run: trax's chunks of the whole sorted
    /// sequence let a LATER token change which earlier keys a query sees (it sorts into a
    /// lower bucket and shifts everything after it), so that form is not causal; ours keeps
    /// the query's keys whatever comes later.
    #[test]
    fn global_chunks_would_let_a_later_token_move_an_earlier_query() {
        // trax: stable sort by (bucket, position), chunks of c, own and previous chunk, causal
        fn trax_visible(buckets: &[u32], c: usize, query: u32) -> Vec<u32> {
            let mut order: Vec<u32> = (0..buckets.len() as u32).collect();
            order.sort_by_key(|&p| buckets[p as usize]);
            let at = order.iter().position(|&p| p == query).unwrap();
            let mut seen: Vec<u32> = order[(at / c).saturating_sub(1) * c..((at / c + 1) * c).min(order.len())]
                .iter()
                .copied()
                .filter(|&k| k <= query)
                .collect();
            seen.sort();
            seen
        }
        let (before, after) = ([1u32, 1, 1, 1], [1u32, 1, 1, 1, 0]);
        assert_eq!(trax_visible(&before, 2, 3), vec![0, 1, 2, 3]);
        assert_eq!(trax_visible(&after, 2, 3), vec![1, 2, 3], "position 4 took key 0 from query 3");
        let ours = |b: &[u32]| seen(&plan(b, 1, 1, b.len(), 0, 2, 2), b.len(), 0, 3);
        assert_eq!(ours(&before), vec![0, 1, 2, 3]);
        assert_eq!(ours(&after), vec![0, 1, 2, 3]);
    }

    /// The same rotation twice gives exactly one round: the union of the two rounds' keys
    /// holds every key twice, and the log-sum-exp combination weighs the rounds equally.
    #[test]
    fn identical_hash_rounds_equal_one_round() -> AnyResult<()> {
        let (_, mut m) = mixer(&["model.options.n_buckets=4", "model.options.chunk=4", "model.options.n_hashes=1"])?;
        let x = randn(&[2, 40, 16], 2, DType::F64)?;
        let one = m.forward(&x)?;
        m.rotations = Tensor::cat(&[&m.rotations, &m.rotations], 1)?;
        m.n_hashes = 2;
        let two = m.forward(&x)?;
        let e = rel_err(&two, &one)?;
        assert!(e < 1e-12, "two identical rounds vs one: {e}");
        // a different second rotation does change the result (the check can fail)
        m.rotations = Tensor::cat(&[&m.rotations.narrow(1, 0, 2)?, &randn(&[8, 2], 9, DType::F32)?], 1)?;
        assert!(rel_err(&m.forward(&x)?, &one)? > 1e-3, "a second, different round changed nothing");
        Ok(())
    }

    /// Exact causality at a length spanning many chunks and buckets, several rounds: the
    /// chunks are cut inside each bucket's run, so no later token moves an earlier output.
    #[test]
    fn lsh_attention_is_exactly_causal() -> AnyResult<()> {
        let (_, m) = mixer(&["model.options.n_buckets=4", "model.options.chunk=4", "model.options.n_hashes=3"])?;
        let x = randn(&[2, 48, 16], 4, DType::F64)?;
        assert_causal(&|x| m.forward(x).map_err(Into::into), &x)
    }

    /// Decoding (prefill, then steps that re-hash the cache) equals the parallel form.
    #[test]
    fn recurrent_equals_parallel() -> AnyResult<()> {
        let (_, m) = mixer(&["model.options.n_buckets=4", "model.options.chunk=3", "model.options.n_hashes=2"])?;
        let x = randn(&[2, 30, 16], 5, DType::F64)?;
        assert_mixer_modes_agree(&m, &x, &[0, 1, 7, 29])
    }

    /// Gradients reach the projections through the gathered keys and values and match
    /// central differences (the hashing stays fixed under the small step).
    #[test]
    fn gradients_match_finite_differences() -> AnyResult<()> {
        let cfg = tiny_config("reformer", &["model.options.n_buckets=4", "model.options.chunk=4"])?;
        let e = crate::testing::model_gradient_err_with_step(&cfg, 3, 1e-5)?;
        assert!(e < 1e-5, "gradient vs finite differences: {e}");
        Ok(())
    }

    #[test]
    fn bad_options_are_clear_errors() {
        for (set, expect) in [
            ("model.options.n_buckets=7", "n_buckets must be even"),
            ("model.options.n_hashes=0", "n_hashes must be at least 1"),
            ("model.options.chunk=0", "chunk must be at least 1"),
            ("model.options.ffn_chunk=0", "ffn_chunk must be at least 1"),
        ] {
            let err = tiny_config("reformer", &[set]).map(|_| ()).unwrap_err();
            assert!(format!("{err:#}").contains(expect), "{set}: {err:#}");
        }
    }

    #[test]
    fn default_buckets_follow_the_paper() {
        let o = ReformerOptions::default();
        assert_eq!(o.buckets(4096), 128);
        assert_eq!(o.buckets(24), 2);
        assert_eq!(o.buckets(200), 8);
    }
}
