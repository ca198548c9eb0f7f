//! The mixed-precision product (`kernels/linear.rs`) against candle's cast and product on the
//! same GPU: output and both gradients, the weight's in f32 and its own `[N, K]` layout,
//! also for a block of a weight's rows (a fused projection's part).

use altformers::kernels::linear;
use altformers::testing::{device_rel_err, randn};
use anyhow::Result;
use candle_core::{DType, Device, Var};

#[test]
fn mixed_products_match_cast_and_matmul() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    // the last case's block starts one row in (k 37: an unaligned weight, the cast's scalar path)
    for (rows, k, n, rows_of_w) in
        [(1024, 768, 2304, (768, 768)), (300, 64, 96, (0, 96)), (17, 100, 37, (5, 20)), (9, 37, 11, (1, 7))]
    {
        let x = randn(&[rows, k], rows as u64, DType::F32)?.to_dtype(DType::BF16)?.to_device(&gpu)?;
        let w = randn(&[n, k], 7, DType::F32)?.to_device(&gpu)?;
        let r = randn(&[rows, rows_of_w.1], 9, DType::F32)?.to_device(&gpu)?;
        let run = |fused: bool| -> Result<[candle_core::Tensor; 3]> {
            let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
            let part = wv.as_tensor().narrow(0, rows_of_w.0, rows_of_w.1)?;
            let y = if fused {
                anyhow::ensure!(linear::applies(xv.as_tensor(), &part), "applies");
                linear::mixed_linear(xv.as_tensor(), &part)?
            } else {
                xv.as_tensor().matmul(&part.to_dtype(DType::BF16)?.t()?)?
            };
            anyhow::ensure!(y.dtype() == DType::BF16 && y.dims() == [rows, rows_of_w.1], "output {:?}", y.dims());
            let g = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
            let dw = g.get(wv.as_tensor()).expect("dw");
            anyhow::ensure!(dw.dtype() == DType::F32 && dw.dims() == [n, k], "dw {:?} {:?}", dw.dtype(), dw.dims());
            Ok([y.to_dtype(DType::F32)?, g.get(xv.as_tensor()).expect("dx").to_dtype(DType::F32)?, dw.clone()])
        };
        let (fused, reference) = (run(true)?, run(false)?);
        for (what, a, b) in
            [("y", &fused[0], &reference[0]), ("dx", &fused[1], &reference[1]), ("dw", &fused[2], &reference[2])]
        {
            let err = device_rel_err(a, b)?;
            anyhow::ensure!(err < 1e-2, "{rows} x {k} x {n} rows {rows_of_w:?}: {what} rel err {err}");
        }
    }
    Ok(())
}
