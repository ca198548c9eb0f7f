//! The one-pass rotary embedding (`kernels/rotary.cu`) against the tensor form on the CPU:
//! the rotated values and the input gradient (the rotation back), f32 and bf16, a width and
//! length that are not multiples of anything in particular, tables of positions 5.. .

use altformers::primitives::rotary;
use altformers::testing::randn;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

#[test]
fn rotary_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let (b, h, t, d) = (2, 3, 37, 22);
    let x = randn(&[b, h, t, d], 1, DType::F32)?;
    let r = randn(&[b, h, t, d], 2, DType::F32)?;
    let (cos, sin) = rotary::tables(5, t, d, 10_000.0, &x)?;
    ensure!(rotary::apply_tables(&x.to_device(&gpu)?, &cos, &sin)?.dims() == [b, h, t, d]);
    let rotate = |x: &Tensor| -> candle_core::Result<Tensor> {
        let (c, s) = (cos.to_device(x.device())?.to_dtype(x.dtype())?, sin.to_device(x.device())?.to_dtype(x.dtype())?);
        rotary::apply_tables(x, &c, &s)
    };
    crate::gpu_matches_cpu(&rotate, &x, &r, &gpu, "rotary")
}
