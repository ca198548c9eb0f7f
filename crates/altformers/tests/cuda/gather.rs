//! The row gather's parallel backward (`kernels/gather.cu`) against candle's `index_select`
//! on the CPU: repeated ids (many rows of a small table hit the same row, so the atomics
//! collide), a table row no id touches (its gradient stays exactly zero), widths that are
//! not multiples of the block, one-element rows, and the forward rows themselves; and a
//! bf16 table (its gradient summed in f32) against the f32 reference.

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
