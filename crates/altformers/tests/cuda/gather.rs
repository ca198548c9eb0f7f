//! The row gather's parallel backward (`kernels/gather.cu`) against candle's `index_select`
//! on the CPU: repeated ids (many rows of a small table hit the same row, so the atomics
//! collide), a table row no id touches (its gradient stays exactly zero), widths that are
//! not multiples of the block, one-element rows, and the forward rows themselves; and a
//! bf16 table (its gradient summed in f32) against the f32 reference; the one-pass token
//! embedding (`embed`) against the gather, position add and cast it replaces.

use altformers::nn::gather_rows;
use altformers::testing::{device_rel_err, randn};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};

fn ids(n: usize, rows: u32, seed: u32) -> Vec<u32> {
    // A cheap deterministic mix; the last table row is never chosen.
    (0..n as u32).map(|j| (j.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % (rows - 1)).collect()
}

#[test]
fn gather_grad_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    // d = 1: AFT-local's flattened position bias; d = 4 with T^2 ids: AFT-conv's kernel
    for (rows, d, n) in
        [(37usize, 16usize, 1000usize), (8192, 64, 16384), (5, 129, 3000), (300, 3, 7), (4096, 1, 4096), (33, 4, 65536)]
    {
        let table = randn(&[rows, d], rows as u64, DType::F32)?;
        let r = randn(&[n, d], n as u64, DType::F32)?;
        let id = ids(n, rows as u32, d as u32);
        let mut grads = Vec::new();
        let mut outs = Vec::new();
        for dev in [&Device::Cpu, &gpu] {
            let w = Var::from_tensor(&table.to_device(dev)?)?;
            let idt = Tensor::from_vec(id.clone(), n, dev)?;
            let out = gather_rows(w.as_tensor(), &idt)?;
            let g = (&out * r.to_device(dev)?)?.sum_all()?.backward()?;
            grads.push(g.get(w.as_tensor()).expect("gradient of the table").clone());
            outs.push(out);
        }
        ensure!(device_rel_err(&outs[1], &outs[0])? == 0.0, "({rows}, {d}, {n}): gathered rows differ");
        let err = device_rel_err(&grads[1], &grads[0])?;
        ensure!(err < 1e-5, "({rows}, {d}, {n}): gradient rel err {err}");
        let last = grads[1].get(rows - 1)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        ensure!(last == 0.0, "({rows}, {d}, {n}): an untouched row got gradient {last}");
    }
    Ok(())
}

#[test]
fn gather_grad_bf16_table_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (rows, d, n) = (300usize, 24usize, 5000usize);
    let table = randn(&[rows, d], 11, DType::F32)?;
    let r = randn(&[n, d], 12, DType::F32)?;
    let id = ids(n, rows as u32, 1);
    let cpu_grad = {
        let w = Var::from_tensor(&table)?;
        let out = gather_rows(w.as_tensor(), &Tensor::from_vec(id.clone(), n, &Device::Cpu)?)?;
        (&out * &r)?.sum_all()?.backward()?.get(w.as_tensor()).expect("gradient").clone()
    };
    let w = Var::from_tensor(&table.to_dtype(DType::BF16)?.to_device(&gpu)?)?;
    let out = gather_rows(w.as_tensor(), &Tensor::from_vec(id, n, &gpu)?)?;
    let g = (&out * r.to_dtype(DType::BF16)?.to_device(&gpu)?)?.sum_all()?.backward()?;
    let grad = g.get(w.as_tensor()).expect("gradient of the bf16 table");
    ensure!(grad.dtype() == DType::BF16, "the gradient is {:?}, not the table's bf16", grad.dtype());
    let err = device_rel_err(&grad.to_dtype(DType::F32)?, &cpu_grad)?;
    ensure!(err < 2e-2, "bf16 gradient rel err {err}");
    Ok(())
}

/// (out, d table, d positions) of `sum(embedding * r)` in f32, the embedding computed on `dev`
/// as `embed` (fused on CUDA) or, on the CPU, as the gather, the position add and the cast.
fn embedding(
    table: &Tensor,
    positions: Option<&Tensor>,
    ids: &Tensor,
    r: &Tensor,
    dev: &Device,
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let tv = Var::from_tensor(&table.to_device(dev)?)?;
    let pv = positions.map(|p| Var::from_tensor(&p.to_device(dev)?)).transpose()?;
    let ids = ids.to_device(dev)?;
    let out = if dev.is_cuda() {
        altformers::kernels::gather::embed(tv.as_tensor(), pv.as_ref().map(|p| p.as_tensor()), &ids, dtype)?
    } else {
        let x = tv.as_tensor().index_select(&ids, 0)?;
        let x = match &pv {
            Some(p) => {
                let t = p.dim(0)?;
                let d = x.dim(1)?;
                x.reshape((ids.elem_count() / t, t, d))?.broadcast_add(p.as_tensor())?.reshape(x.shape())?
            }
            None => x,
        };
        x.to_dtype(dtype)?
    };
    ensure!(out.dtype() == dtype, "embedding dtype {:?}", out.dtype());
    let grads = (out.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
    let mut all = vec![out.to_dtype(DType::F32)?, grads.get(tv.as_tensor()).expect("d table").clone()];
    if let Some(p) = &pv {
        all.push(grads.get(p.as_tensor()).expect("d positions").clone());
    }
    Ok(all)
}

/// The one-pass embedding (gather, position add, cast; its backward's scatter and position sums)
/// against the composed form on the CPU: repeated ids, with and without positions, f32 and
/// bf16 activations, a width past the block of 256 threads.
#[test]
fn embedding_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (rows, b, t) = (65usize, 6usize, 33usize);
    for d in [64usize, 300] {
        let table = randn(&[rows, d], 1, DType::F32)?;
        let positions = randn(&[t, d], 2, DType::F32)?;
        let ids = Tensor::new(ids(b * t, rows as u32, 3), &Device::Cpu)?;
        let r = randn(&[b * t, d], 4, DType::F32)?;
        for pos in [true, false] {
            for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
                let p = pos.then_some(&positions);
                let cpu = embedding(&table, p, &ids, &r, &Device::Cpu, dtype)?;
                let ours = embedding(&table, p, &ids, &r, &gpu, dtype)?;
                for (name, (o, c)) in ["out", "d table", "d positions"].iter().zip(ours.iter().zip(cpu.iter())) {
                    let err = device_rel_err(o, c)?;
                    ensure!(err < tol, "d {d} positions {pos} {dtype:?}: {name} rel err {err}");
                }
            }
        }
    }
    Ok(())
}
