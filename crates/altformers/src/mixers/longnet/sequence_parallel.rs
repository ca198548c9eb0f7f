//! LongNet's distributed dilated attention (paper 2307.02486, section 3.2 and its Figure 4):
//! the sequence cut into `world` equal slices of `L = T / world` positions, one per device.
//!
//! A pair (w, r) whose segments fit in a slice (`w <= L`) is computed where its slice is, as
//! on one device (the slice starts on a segment boundary). For a longer segment each device
//! sparsifies its own keys and values by the pair's dilation first, keeping for query head j
//! only its rows at offset `j mod r` (`L / r` of them), every device gathers those
//! ([`Shard::contribution`], then the caller's all-gather), and each device's kept queries
//! attend to the gathered rows of their segment at or before them ([`Shard::attention`]).
//! The pairs' outputs are mixed per position as on one device, which needs nothing from other
//! devices. A device sends `H L / r` rows of K and of V per gathered pair; with the geometric
//! pairs (`w_i / r_i = w0`) the gathered pairs are those with `w_i > L`, where `L / r_i <
//! w0`, so what a device sends is bounded by a constant whatever T (the paper's point: test
//! `what_a_device_sends_does_not_grow_with_the_sequence`).
//!
//! The two halves sit on either side of the collective, which is the caller's: on CPU
//! workers the group's differentiable [`crate::train::distributed::all_gather`] (its backward
//! sends each worker the gradients of the rows it sent; test
//! `two_workers_through_the_group_compute_one_devices_attention`), every shard in one process
//! in the other tests; on GPUs NCCL's all-gather and reduce-scatter
//! (`crate::train::nccl`). Both are an [`AllGather`]. [`pack`] makes a device's rows one
//! tensor, so a layer is one collective each way; [`split_attention`] is the whole layer's
//! attention on one device, what a sequence-parallel LongNet layer runs
//! ([`crate::mixers::SequenceMixer::split_sequence`]).

use candle_core::{bail, Result, Tensor};
use std::sync::Arc;

use super::{combine, mask_uncovered, pair_attention, softmax_attention, stats_dtype, Indices};

/// The collective between the devices a sequence is split across: every device's `x` (one
/// shape on every device) stacked in rank order, `[world, ..x's shape]`, and differentiable:
/// the gradient of a device's `x` is the sum over devices of their gradients of its rows (a
/// reduce-scatter). Every device calls it at the same point of its computation.
pub trait AllGather: Send + Sync {
    /// This device's place, 0 to `world() - 1`: it holds positions `rank L ..` of the sequence.
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
}

/// How a sequence is split: the collective, shared by every layer of a model.
pub type Split = Arc<dyn AllGather>;

/// Dilated attention over this device's slice of the sequence (`q: [B, H, L, d_h]`, `k, v:
/// [B, KVH, L, d_h]`, the slice at positions `rank L ..`) -> `[B, H, L, d_h]`: one all-gather
/// of the longer pairs' dilated rows, none when every pair fits a slice. Index tensors from
/// the layer's `indices` (built once per shape: none is uploaded in a captured step).
pub(crate) fn split_attention(
    split: &dyn AllGather,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pairs: &[(usize, usize)],
    indices: &Indices,
) -> Result<Tensor> {
    let shard = Shard { rank: split.rank(), world: split.world(), pairs };
    let sent = shard.contribution_indexed(k, v, q.dim(1)?, indices)?;
    let gathered = if sent.is_empty() {
        (0..shard.world).map(|_| Vec::new()).collect()
    } else {
        unpack(&split.all_gather(&pack(&sent)?)?, &sent)?
    };
    shard.attention_indexed(q, k, v, &gathered, indices)
}

/// Device `rank` of `world`, computing LongNet's `pairs` over its slice.
pub struct Shard<'a> {
    pub rank: usize,
    pub world: usize,
    pub pairs: &'a [(usize, usize)],
}

/// What a device sends for one gathered pair: `k, v: [B, H, L / r, d_h]`, query head j's keys
/// and values at the positions of this slice that head keeps (offset `j mod r`).
pub struct Dilated {
    pub k: Tensor,
    pub v: Tensor,
}

impl Shard<'_> {
    /// Checks the slices of `len` positions against the pairs: a local pair's segments must
    /// tile the slice; a gathered pair's segment must start on a slice boundary (or span the
    /// whole sequence) and its dilation divide the slice.
    pub(super) fn check(&self, len: usize) -> Result<()> {
        if self.rank >= self.world {
            bail!("LongNet sequence parallel: rank {} of a world of {}", self.rank, self.world);
        }
        for &(w, r) in self.pairs {
            let ok = if w <= len {
                len.is_multiple_of(w)
            } else {
                (w % len == 0 || w >= len * self.world) && len.is_multiple_of(r)
            };
            if !ok {
                bail!(
                    "LongNet sequence parallel: slices of {len} positions do not fit the pair (w {w}, r {r}) \
                     (a segment within a slice must tile it; a longer one must start on a slice boundary \
                     and its dilation divide the slice)"
                );
            }
        }
        Ok(())
    }

    /// The pairs whose segments span several slices.
    fn gathered(&self, len: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.pairs.iter().copied().filter(move |&(w, _)| w > len)
    }

    /// For pair dilation `r` over a slice of `len`, query head j's kept rows (`j mod r + i r`,
    /// `i < len / r`) as indices into the rows of `[heads x len]`, head j's rows read from
    /// row block `block(j)`.
    fn kept(heads: usize, len: usize, r: usize, block: impl Fn(usize) -> usize) -> Vec<u32> {
        (0..heads)
            .flat_map(|j| (0..len / r).map(move |i| (j, i)))
            .map(|(j, i)| (block(j) * len + j % r + i * r) as u32)
            .collect()
    }

    /// This device's rows to gather, one [`Dilated`] per gathered pair in pair order, from its
    /// slice's `k, v: [B, KVH, L, d_h]` for `heads` query heads.
    pub fn contribution(&self, k: &Tensor, v: &Tensor, heads: usize) -> Result<Vec<Dilated>> {
        self.contribution_indexed(k, v, heads, &Indices::default())
    }

    fn contribution_indexed(&self, k: &Tensor, v: &Tensor, heads: usize, indices: &Indices) -> Result<Vec<Dilated>> {
        let (b, kvh, len, dh) = k.dims4()?;
        self.check(len)?;
        let g = heads / kvh;
        self.gathered(len)
            .map(|(_, r)| {
                let idx = indices.tensor("sent rows", &[heads, len, r, g], || {
                    Tensor::from_vec(Self::kept(heads, len, r, |j| j / g), heads * (len / r), k.device())
                })?;
                let rows = |x: &Tensor| -> Result<Tensor> {
                    x.contiguous()?.reshape((b, kvh * len, dh))?.index_select(&idx, 1)?.reshape((b, heads, len / r, dh))
                };
                Ok(Dilated { k: rows(k)?, v: rows(v)? })
            })
            .collect()
    }

    /// This device's output `[B, H, L, d_h]` from its slice's `q: [B, H, L, d_h]` and `k, v:
    /// [B, KVH, L, d_h]`, with `gathered[s]` device s's [`Shard::contribution`] (every device,
    /// in rank order).
    pub fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, gathered: &[Vec<Dilated>]) -> Result<Tensor> {
        self.attention_indexed(q, k, v, gathered, &Indices::default())
    }

    fn attention_indexed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        gathered: &[Vec<Dilated>],
        indices: &Indices,
    ) -> Result<Tensor> {
        let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
        let (b, h, len, dh) = q.dims4()?;
        self.check(len)?;
        if gathered.len() != self.world {
            bail!("LongNet sequence parallel: {} contributions for a world of {}", gathered.len(), self.world);
        }
        let dev = q.device();
        let mut outs = Vec::with_capacity(self.pairs.len());
        let mut lses = Vec::with_capacity(self.pairs.len());
        let mut slot = 0;
        for &(w, r) in self.pairs {
            if w <= len {
                // the slice starts on a segment boundary: one device's computation
                let (out, lse) = pair_attention(q, k, v, (w, r), indices)?;
                outs.push(out);
                lses.push(lse);
                continue;
            }
            let rows = len / r;
            let kept = || Self::kept(h, len, r, |j| j);
            let idx = indices.tensor("kept rows", &[h, len, r], || Tensor::from_vec(kept(), h * rows, dev))?;
            let cover = indices.tensor("kept cover", &[h, len, r], || {
                let mut cover = vec![0u8; h * len];
                kept().iter().for_each(|&p| cover[p as usize] = 1);
                Tensor::from_vec(cover, (1, h * len), dev)
            })?;
            let qr = q.reshape((b, h * len, dh))?.index_select(&idx, 1)?.reshape((b, h, rows, dh))?;
            // the devices holding this segment up to this one (later ones hold later positions)
            let first = (self.rank * len / w * w) / len;
            let mut keys = Vec::new();
            let mut values = Vec::new();
            for sent in &gathered[first..=self.rank] {
                let Some(d) = sent.get(slot) else {
                    bail!("LongNet sequence parallel: a device sent {} gathered pairs, expected more", sent.len())
                };
                keys.push(d.k.clone());
                values.push(d.v.clone());
            }
            let (keys, values) = (Tensor::cat(&keys, 2)?, Tensor::cat(&values, 2)?);
            // key c (device first + c / rows, row c % rows) is visible to query row i iff it
            // is on an earlier device or at or before row i on this one (every head alike)
            let n_k = keys.dim(2)?;
            let mine = (self.rank - first) * rows;
            let stats = stats_dtype(q.dtype());
            let mask = indices.tensor("gathered mask", &[rows, n_k, mine, stats as usize], || {
                let mask: Vec<f64> = (0..rows)
                    .flat_map(|i| {
                        (0..n_k).map(move |c| if c < mine || c - mine <= i { 0.0 } else { f64::NEG_INFINITY })
                    })
                    .collect();
                Tensor::from_vec(mask, (rows, n_k), dev)?.to_dtype(stats)
            })?;
            let (o, lse) = softmax_attention(&qr, &keys, &values, Some(&mask))?;
            let out = Tensor::zeros((b, h * len, dh), q.dtype(), dev)?
                .index_add(&idx, &o.reshape((b, h * rows, dh))?, 1)?
                .reshape((b, h, len, dh))?;
            let lse =
                Tensor::zeros((b, h * len), lse.dtype(), dev)?.index_add(&idx, &lse.reshape((b, h * rows))?, 1)?;
            let cover = cover.broadcast_as((b, h * len))?;
            outs.push(out);
            lses.push(mask_uncovered(&cover, &lse)?.reshape((b, h, len))?);
            slot += 1;
        }
        combine(&outs, &lses)
    }
}

/// Rows of K (and as many of V) one device sends per query head and layer, with slices of
/// `len` positions: `len / r` for each pair longer than a slice.
pub fn sent_rows(pairs: &[(usize, usize)], len: usize) -> usize {
    pairs.iter().filter(|&&(w, _)| w > len).map(|&(_, r)| len / r).sum()
}

/// A device's [`Dilated`] rows as one flat tensor (one collective per layer, whatever the
/// number of gathered pairs).
pub fn pack(sent: &[Dilated]) -> Result<Tensor> {
    let parts = sent.iter().flat_map(|d| [&d.k, &d.v]).map(|x| x.flatten_all()).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// Every device's rows from the gathered `[world, n]` of [`pack`]ed rows, shaped as this
/// device's `like` (every device sends the same shapes).
pub fn unpack(gathered: &Tensor, like: &[Dilated]) -> Result<Vec<Vec<Dilated>>> {
    (0..gathered.dim(0)?)
        .map(|s| {
            let flat = gathered.get(s)?;
            let mut at = 0;
            let mut take = |shape: &candle_core::Shape| -> Result<Tensor> {
                let n = shape.elem_count();
                let x = flat.narrow(0, at, n)?.reshape(shape)?;
                at += n;
                Ok(x)
            };
            like.iter().map(|d| Ok(Dilated { k: take(d.k.shape())?, v: take(d.v.shape())? })).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixers::longnet::dilated_attention;
    use candle_core::{DType, Device, Var};

    /// Every shard's output, the collective done in one process (each shard's contribution
    /// handed to all): `[B, H, T, d_h]`.
    fn sharded(q: &Tensor, k: &Tensor, v: &Tensor, pairs: &[(usize, usize)], world: usize) -> Result<Tensor> {
        let (h, t) = (q.dim(1)?, q.dim(2)?);
        let len = t / world;
        let slice = |x: &Tensor, s: usize| x.narrow(2, s * len, len);
        let shards: Vec<Shard> = (0..world).map(|rank| Shard { rank, world, pairs }).collect();
        let sent = shards
            .iter()
            .enumerate()
            .map(|(s, sh)| sh.contribution(&slice(k, s)?, &slice(v, s)?, h))
            .collect::<Result<Vec<_>>>()?;
        let outs = shards
            .iter()
            .enumerate()
            .map(|(s, sh)| sh.attention(&slice(q, s)?, &slice(k, s)?, &slice(v, s)?, &sent))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 2)
    }

    fn worst(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// Outputs and the gradients of q, k and v equal one device's dilated attention: 2 and 4
    /// devices, multi-head and grouped keys, local pairs, gathered pairs and a segment longer
    /// than the sequence (f64, so equal to rounding).
    #[test]
    fn shards_compute_single_device_dilated_attention() -> anyhow::Result<()> {
        let pairs = [(8, 1), (16, 2), (32, 4), (64, 8), (128, 16)];
        for (world, kvh) in [(2, 4), (4, 4), (4, 2)] {
            let (b, h, t, dh) = (2, 4, 64, 8);
            let var = |dims: (usize, usize, usize, usize), seed| -> anyhow::Result<Var> {
                Ok(Var::from_tensor(&crate::testing::randn(&[dims.0, dims.1, dims.2, dims.3], seed, DType::F64)?)?)
            };
            let (q, k, v) = (var((b, h, t, dh), 1)?, var((b, kvh, t, dh), 2)?, var((b, kvh, t, dh), 3)?);
            let weights = crate::testing::randn(&[b, h, t, dh], 4, DType::F64)?;
            let one = dilated_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &pairs)?;
            let many = sharded(q.as_tensor(), k.as_tensor(), v.as_tensor(), &pairs, world)?;
            assert!(worst(&one, &many)? < 1e-12, "world {world}, kvh {kvh}: outputs differ by {}", worst(&one, &many)?);
            let g1 = (&one * &weights)?.sum_all()?.backward()?;
            let g2 = (&many * &weights)?.sum_all()?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, c) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
                assert!(worst(a, c)? < 1e-12, "world {world}, kvh {kvh}: d{name} differs by {}", worst(a, c)?);
            }
        }
        Ok(())
    }

    /// The paper's claim, with the geometric default pairs (w0 = 32, ratio 2) and 4 devices:
    /// what one device sends (rows of K and V over every gathered pair) is the same at T =
    /// 512, 2048 and 8192, while its slice grows 16 times.
    #[test]
    fn what_a_device_sends_does_not_grow_with_the_sequence() -> anyhow::Result<()> {
        let (world, h, dh) = (4, 2, 2);
        let mut sent = Vec::new();
        for t in [512, 2048, 8192] {
            let pairs = super::super::default_pairs(t);
            let len = t / world;
            let kv = Tensor::zeros((1, h, len, dh), DType::F32, &Device::Cpu)?;
            let shard = Shard { rank: world - 1, world, pairs: &pairs };
            let rows: usize = shard.contribution(&kv, &kv, h)?.iter().map(|d| d.k.dim(2).unwrap()).sum();
            assert_eq!(rows, sent_rows(&pairs, len), "T = {t}: what is sent against its count");
            sent.push(rows);
        }
        assert_eq!(sent, [24, 24, 24], "rows sent per head at T = 512, 2048, 8192");
        Ok(())
    }

    /// Two workers, each in its own thread with its own connection (as two processes would
    /// be), exchanging through the CPU group's all-gather, whose backward sends each worker the
    /// gradients of its rows: the outputs and the q/k/v gradients are one device's.
    #[test]
    fn two_workers_through_the_group_compute_one_devices_attention() -> anyhow::Result<()> {
        use crate::train::distributed::{all_gather, Group};
        let pairs = [(8, 1), (16, 2), (32, 4), (64, 8)];
        let (b, h, t, dh, world) = (1, 4, 64, 4, 2);
        let len = t / world;
        let full = |seed| crate::testing::randn(&[b, h, t, dh], seed, DType::F64);
        let (q, k, v, weights) = (full(1)?, full(2)?, full(3)?, full(4)?);
        let addr = crate::train::distributed::free_local_endpoint()?;
        let workers: Vec<_> = (0..world)
            .map(|rank| {
                let (q, k, v, weights, addr) = (q.clone(), k.clone(), v.clone(), weights.clone(), addr.clone());
                std::thread::spawn(move || -> anyhow::Result<Vec<Tensor>> {
                    let group =
                        std::sync::Arc::new(Group::connect(rank, world, &addr, std::time::Duration::from_secs(30))?);
                    let slice = |x: &Tensor| Var::from_tensor(&x.narrow(2, rank * len, len)?);
                    let (qs, ks, vs) = (slice(&q)?, slice(&k)?, slice(&v)?);
                    let shard = Shard { rank, world, pairs: &pairs };
                    let sent = shard.contribution(ks.as_tensor(), vs.as_tensor(), h)?;
                    let gathered = unpack(&all_gather(&group, &pack(&sent)?)?, &sent)?;
                    let out = shard.attention(qs.as_tensor(), ks.as_tensor(), vs.as_tensor(), &gathered)?;
                    let grads = (&out * weights.narrow(2, rank * len, len)?)?.sum_all()?.backward()?;
                    let grad =
                        |x: &Var| grads.get(x.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient"));
                    Ok(vec![out, grad(&qs)?, grad(&ks)?, grad(&vs)?])
                })
            })
            .collect();
        let results =
            workers.into_iter().map(|w| w.join().expect("worker thread")).collect::<anyhow::Result<Vec<_>>>()?;
        // one device
        let (qv, kv, vv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
        let one = dilated_attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &pairs)?;
        let grads = (&one * &weights)?.sum_all()?.backward()?;
        let want = [
            one,
            grads.get(qv.as_tensor()).unwrap().clone(),
            grads.get(kv.as_tensor()).unwrap().clone(),
            grads.get(vv.as_tensor()).unwrap().clone(),
        ];
        for (i, name) in ["output", "dq", "dk", "dv"].iter().enumerate() {
            let got = Tensor::cat(&results.iter().map(|r| r[i].clone()).collect::<Vec<_>>(), 2)?;
            assert!(worst(&got, &want[i])? < 1e-12, "{name} differs by {}", worst(&got, &want[i])?);
        }
        Ok(())
    }

    #[test]
    fn slices_that_do_not_fit_the_pairs_are_refused_by_name() -> anyhow::Result<()> {
        let kv = Tensor::zeros((1, 2, 12, 4), DType::F32, &Device::Cpu)?;
        let err = Shard { rank: 0, world: 4, pairs: &[(8, 1)] }.contribution(&kv, &kv, 2).err().unwrap().to_string();
        assert!(err.contains("slices of 12 positions do not fit the pair (w 8, r 1)"), "{err}");
        let err = Shard { rank: 4, world: 4, pairs: &[(4, 1)] }.contribution(&kv, &kv, 2).err().unwrap().to_string();
        assert!(err.contains("rank 4 of a world of 4"), "{err}");
        Ok(())
    }
}
