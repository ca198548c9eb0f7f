//! The few-row product (`kernels/gemv.cu`) against the CPU's matmul: outputs and both
//! gradients, f32 and bf16 (the kernel runs by default in bf16 only), for 1 to 8 rows, widths
//! on the 16-byte path and off it.

use altformers::kernels::gemv;
use altformers::testing::{device_rel_err, randn};
use anyhow::Result;
use candle_core::{DType, Device, Var};

#[test]
fn few_row_products_match_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for (rows, k, n) in [(1, 768, 3072), (2, 64, 96), (3, 100, 37), (8, 768, 768), (5, 24, 256)] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            // inputs rounded to the dtype, so both sides multiply the same numbers
            let x = randn(&[rows, k], rows as u64, DType::F32)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
            let w = randn(&[n, k], 7, DType::F32)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
            let r = randn(&[rows, n], 9, DType::F32)?;
            let (xc, wc) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
            let yc = xc.as_tensor().matmul(&wc.as_tensor().t()?)?;
            let gc = (&yc * &r)?.sum_all()?.backward()?;
            let xg = Var::from_tensor(&x.to_dtype(dtype)?.to_device(&gpu)?)?;
            let wg = Var::from_tensor(&w.to_dtype(dtype)?.to_device(&gpu)?)?;
            let applies = gemv::applies(xg.as_tensor(), wg.as_tensor());
            anyhow::ensure!(applies == (dtype == DType::BF16), "{rows} x {k} {dtype:?}: applies {applies}");
            let yg = gemv::gemv(xg.as_tensor(), wg.as_tensor())?;
            anyhow::ensure!(yg.dtype() == dtype && yg.dims() == [rows, n], "output {:?} {:?}", yg.dtype(), yg.dims());
            let gg = (yg.to_dtype(DType::F32)? * r.to_device(&gpu)?)?.sum_all()?.backward()?;
            let label = format!("{rows} x {k} x {n} {dtype:?}");
            let err = device_rel_err(&yg.to_dtype(DType::F32)?, &yc)?;
            anyhow::ensure!(err < tol, "{label}: y rel err {err}");
            for (what, g, c) in [("dx", &xg, &xc), ("dw", &wg, &wc)] {
                let got = gg.get(g.as_tensor()).expect("gradient").to_dtype(DType::F32)?;
                let err = device_rel_err(&got, gc.get(c.as_tensor()).expect("gradient"))?;
                anyhow::ensure!(err < 2.0 * tol, "{label}: {what} rel err {err}");
            }
        }
    }
    // more rows than the kernel keeps sums for: cuBLAS's product
    let x = randn(&[9, 64], 1, DType::BF16)?.to_device(&gpu)?;
    let w = randn(&[32, 64], 2, DType::BF16)?.to_device(&gpu)?;
    anyhow::ensure!(!gemv::applies(&x, &w), "9 rows should go to the GEMM");
    Ok(())
}
