//! The cuFFT path of `ops::fftconv::causal_conv` against the CPU op (itself held to
//! the direct convolution by its unit tests): forward and both gradients, f32 / bf16 / f16,
//! filters as long as the input and shorter, with and without the spectra kept by the
//! forward pass. Runs on the GPU machine (needs libcufft on the library path).

use altformers::ops::fftconv::{causal_conv, causal_conv_direct};
use altformers::testing::{device_rel_err, randn};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

fn gpu() -> Result<Device> {
    Ok(Device::new_cuda(0)?)
}

/// (T, L) pairs: L = T and L < T (and one L > T).
const SIZES: [(usize, usize); 10] =
    [(1, 1), (7, 7), (7, 3), (64, 64), (64, 5), (1000, 1000), (1000, 37), (4096, 4096), (4096, 300), (13, 40)];

/// Forward, and gradients of `sum(w * conv(x, h))`, on `dev` in `dtype` (inputs from the
/// given f32 tensors). `track`: whether x and h are variables (the op then keeps spectra).
fn run(
    x: &Tensor,
    h: &Tensor,
    w: &Tensor,
    dev: &Device,
    dtype: DType,
    track: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let (x, h, w) =
        (x.to_device(dev)?.to_dtype(dtype)?, h.to_device(dev)?.to_dtype(dtype)?, w.to_device(dev)?.to_dtype(dtype)?);
    if !track {
        return Ok((causal_conv(&x, &h)?, None));
    }
    let (xv, hv) = (Var::from_tensor(&x)?, Var::from_tensor(&h)?);
    let y = causal_conv(&xv, &hv)?;
    let loss = (&y * &w)?.sum_all()?;
    let g = loss.backward()?;
    let dx = g.get(&xv).expect("dx").clone();
    let dh = g.get(&hv).expect("dh").clone();
    Ok((y, Some((dx, dh))))
}

#[test]
fn forward_and_gradients_match_the_cpu_op_in_f32() -> Result<()> {
    let dev = gpu()?;
    for (t, l) in SIZES {
        let x = randn(&[2, 8, t], 10 + t as u64, DType::F32)?;
        let h = randn(&[8, l], 20 + l as u64, DType::F32)?;
        let w = randn(&[2, 8, t], 30, DType::F32)?;
        let (y_cpu, g_cpu) = run(&x, &h, &w, &Device::Cpu, DType::F32, true)?;
        let (dx_cpu, dh_cpu) = g_cpu.unwrap();
        let (y, g) = run(&x, &h, &w, &dev, DType::F32, true)?;
        let (dx, dh) = g.unwrap();
        assert_eq!(y.dims(), &[2, 8, t]);
        assert_eq!(dx.dims(), &[2, 8, t]);
        assert_eq!(dh.dims(), &[8, l]);
        assert!(y.device().is_cuda() && dx.device().is_cuda() && dh.device().is_cuda());
        let (ey, edx, edh) =
            (device_rel_err(&y, &y_cpu)?, device_rel_err(&dx, &dx_cpu)?, device_rel_err(&dh, &dh_cpu)?);
        assert!(ey < 1e-4, "T {t} L {l}: forward rel err {ey}");
        assert!(edx < 1e-4, "T {t} L {l}: dx rel err {edx}");
        assert!(edh < 1e-4, "T {t} L {l}: dh rel err {edh}");
        // Without gradient tracking (no spectra kept): the same forward.
        let (y2, _) = run(&x, &h, &w, &dev, DType::F32, false)?;
        let e2 = device_rel_err(&y2, &y_cpu)?;
        assert!(e2 < 1e-4, "T {t} L {l}: untracked forward rel err {e2}");
    }
    Ok(())
}

#[test]
fn small_case_matches_the_direct_convolution() -> Result<()> {
    let dev = gpu()?;
    let x = randn(&[3, 5, 33], 1, DType::F32)?;
    let h = randn(&[5, 33], 2, DType::F32)?;
    let direct = causal_conv_direct(&x, &h)?;
    let fast = causal_conv(&x.to_device(&dev)?, &h.to_device(&dev)?)?;
    let e = device_rel_err(&fast, &direct)?;
    assert!(e < 1e-5, "rel err {e}");
    Ok(())
}

/// The backward pass recomputes the spectra when the forward pass kept none: an op
/// applied to an untracked x and a tracked h still has both gradients right (h's), and
/// calling backward twice on the same graph (the second finds no kept spectra) agrees.
#[test]
fn backward_twice_and_partial_tracking() -> Result<()> {
    let dev = gpu()?;
    let (t, l) = (200, 50);
    let x = randn(&[2, 8, t], 3, DType::F32)?;
    let h = randn(&[8, l], 4, DType::F32)?;
    let w = randn(&[2, 8, t], 5, DType::F32)?;
    let (_, g_cpu) = run(&x, &h, &w, &Device::Cpu, DType::F32, true)?;
    let (dx_cpu, dh_cpu) = g_cpu.unwrap();
    let xv = Var::from_tensor(&x.to_device(&dev)?)?;
    let hv = Var::from_tensor(&h.to_device(&dev)?)?;
    let loss = (causal_conv(&xv, &hv)? * w.to_device(&dev)?)?.sum_all()?;
    for pass in 0..2 {
        let g = loss.backward()?;
        let (edx, edh) = (device_rel_err(g.get(&xv).unwrap(), &dx_cpu)?, device_rel_err(g.get(&hv).unwrap(), &dh_cpu)?);
        assert!(edx < 1e-4 && edh < 1e-4, "pass {pass}: dx {edx} dh {edh}");
    }
    let loss = (causal_conv(&x.to_device(&dev)?, &hv)? * w.to_device(&dev)?)?.sum_all()?;
    let g = loss.backward()?;
    let edh = device_rel_err(g.get(&hv).unwrap(), &dh_cpu)?;
    assert!(edh < 1e-4, "h only: dh {edh}");
    Ok(())
}

#[test]
fn half_precision_matches_the_cpu_op() -> Result<()> {
    let dev = gpu()?;
    for dtype in [DType::BF16, DType::F16] {
        for (t, l) in [(7, 7), (64, 5), (1000, 1000), (4096, 300)] {
            let x = randn(&[2, 8, t], 40 + t as u64, DType::F32)?;
            let h = randn(&[8, l], 50 + l as u64, DType::F32)?;
            let w = randn(&[2, 8, t], 60, DType::F32)?;
            // The reference: the CPU op on the same rounded inputs, in f32.
            let round = |v: &Tensor| -> Result<Tensor> { Ok(v.to_dtype(dtype)?.to_dtype(DType::F32)?) };
            let (y_ref, g_ref) = run(&round(&x)?, &round(&h)?, &round(&w)?, &Device::Cpu, DType::F32, true)?;
            let (dx_ref, dh_ref) = g_ref.unwrap();
            let (y, g) = run(&x, &h, &w, &dev, dtype, true)?;
            let (dx, dh) = g.unwrap();
            assert_eq!((y.dtype(), dx.dtype(), dh.dtype()), (dtype, dtype, dtype));
            let tol = if dtype == DType::BF16 { 1e-2 } else { 2e-3 };
            let (ey, edx, edh) =
                (device_rel_err(&y, &y_ref)?, device_rel_err(&dx, &dx_ref)?, device_rel_err(&dh, &dh_ref)?);
            assert!(ey < tol && edx < tol && edh < tol, "{dtype:?} T {t} L {l}: y {ey} dx {edx} dh {edh}");
        }
    }
    Ok(())
}

#[test]
fn rejects_f64_on_cuda() -> Result<()> {
    let dev = gpu()?;
    let x = randn(&[1, 2, 8], 1, DType::F64)?.to_device(&dev)?;
    let h = randn(&[2, 8], 2, DType::F64)?.to_device(&dev)?;
    let err = causal_conv(&x, &h).unwrap_err();
    assert!(err.to_string().contains("f32, bf16 and f16"), "{err}");
    Ok(())
}
