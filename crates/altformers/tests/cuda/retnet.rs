//! RetNet's fused output normalisations and group norm (`kernels/retnet_norm.cu`) against the
//! tensor form on the CPU.

use altformers::testing::randn;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

/// RetNet's fused output normalisations and group norm (`kernels/retnet_norm.cu`) against the
/// tensor form on the CPU, f32: the outputs and the gradient of o1, with value widths under
/// and over one warp's 32 lanes, rows whose normaliser |r| is below 1 (the max picks 1) and
/// above it, and a row normalisation per (head, position).
#[test]
fn retnet_normalisation_matches_cpu() -> Result<()> {
    use altformers::mixers::retnet::{normalise_outputs, normalise_outputs_tensor};
    let gpu = Device::new_cuda(0)?;
    for (b, h, t, dv) in [(2, 3, 5, 129), (1, 2, 9, 20)] {
        let o1 = randn(&[b, h, t, dv + 1], 3, DType::F32)?.affine(2.0, 0.0)?;
        let c = randn(&[1, h, t, 1], 4, DType::F32)?.abs()?.affine(1.0, 0.1)?;
        let r = randn(&[b, t, h * dv], 5, DType::F32)?;
        let run = |dev: &Device, fused: bool| -> Result<[Tensor; 2]> {
            let c = c.to_device(dev)?;
            let f = |x: &Tensor| if fused { normalise_outputs(x, &c) } else { normalise_outputs_tensor(x, &c) };
            crate::value_and_input_grad(&f, &o1, &r, dev, DType::F32)
        };
        let (ours, cpu) = (run(&gpu, true)?, run(&Device::Cpu, false)?);
        for (what, (o, c)) in ["z", "d o1"].iter().zip(ours.iter().zip(cpu.iter())) {
            let err = altformers::testing::device_rel_err(o, c)?;
            ensure!(err < 1e-4, "retnet norm {b}x{h}x{t}x{dv}: {what} rel err {err}");
        }
    }
    Ok(())
}
