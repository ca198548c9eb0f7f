//! RWKV-4's one-token step fused on CUDA (`rwkv4_decode.cu`), for [`super::TimeMix`] and
//! [`super::ChannelMix`] decoding. Per layer the step is then the layer norms, the token-shift
//! mixes (one launch per mixer), the projections, the WKV read-update-gate (one launch), the
//! squared ReLU and the channel gate (one each) and the residual adds: about sixteen launches
//! instead of about seventy, which bound the step (a 12 x 768 model decodes a token in 2 x
//! 10^8 FLOP; the launches cost more than the arithmetic). Forward only: decoding is not
//! differentiated. The tensor expressions in `super` stay the reference (CPU, and this path
//! switched off with `ALTFORMERS_UNFUSED=rwkv4-step`); tests/cuda/models.rs holds the fused
//! decoding to the parallel form on the GPU.
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, DType, Device, Result, Tensor};

use crate::kernels::launch::{self, LaunchConfig, PushKernelArg};
use crate::kernels::ptx;
use crate::ops::decayed::{WkvState, EMPTY_LOG_SCALE};

const MODULE: &str = "altformers_rwkv4_decode";

/// Kernel-name suffix for activations of `act` over parameters of `param`.
fn suffix(act: DType, param: DType) -> Option<&'static str> {
    match (act, param) {
        (DType::F32, DType::F32) => Some("f32"),
        (DType::BF16, DType::BF16) => Some("bf16"),
        (DType::BF16, DType::F32) => Some("bf16_f32"),
        _ => None,
    }
}

/// Whether the fused step takes activations `x` over parameters like `param`.
pub fn applies(x: &Tensor, param: &Tensor) -> bool {
    x.device().is_cuda() && suffix(x.dtype(), param.dtype()).is_some() && crate::kernels::enabled("rwkv4-step")
}

fn cuda(x: &Tensor) -> Result<&CudaDevice> {
    match x.device() {
        Device::Cuda(dev) => Ok(dev),
        _ => bail!("rwkv4 decode: the tensors are not on a CUDA device"),
    }
}

/// A new tensor of `dims` whose every element the kernel writes.
fn output(dev: &CudaDevice, dtype: DType, dims: &[usize]) -> Result<Tensor> {
    let n = dims.iter().product();
    Ok(match dtype {
        DType::F32 => launch::tensor(launch::uninit::<f32>(dev, n)?, dev, dims),
        DType::BF16 => launch::tensor(launch::uninit::<half::bf16>(dev, n)?, dev, dims),
        other => bail!("rwkv4 decode: {other:?} tensors are not supported"),
    })
}

/// A grid-stride launch over `n` elements.
fn config(n: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel's scalar argument.
enum Scalar {
    I64(i64),
    I32(i32),
    F32(f32),
}

/// Launches `kernel` over `n` elements with the addresses of `tensors` (`None`: 0) then
/// `scalars` as its arguments. The caller passes tensors of the sizes the kernel reads and
/// writes for those `n` (each kernel's comment in `rwkv4_decode.cu`); every output element is
/// written.
fn run(dev: &CudaDevice, kernel: &str, tensors: &[Option<&Tensor>], scalars: &[Scalar], n: usize) -> Result<()> {
    launch::with_addresses(dev, "rwkv4 decode", tensors, |addresses| {
        let func = launch::func(dev, MODULE, ptx::RWKV4_DECODE, kernel)?;
        let mut b = func.builder();
        for address in addresses {
            b.arg(address);
        }
        for s in scalars {
            match s {
                Scalar::I64(v) => b.arg(v),
                Scalar::I32(v) => b.arg(v),
                Scalar::F32(v) => b.arg(v),
            };
        }
        // SAFETY: as the caller promises above.
        unsafe { b.launch(config(n)) }.w()?;
        Ok(())
    })
}

/// Checks that each parameter holds `d` elements.
fn per_channel(what: &str, params: &[&Tensor], d: usize) -> Result<()> {
    for p in params {
        if p.elem_count() != d {
            bail!("rwkv4 decode: {what} of {} elements for width {d}", p.elem_count());
        }
    }
    Ok(())
}

/// `prev + (x - prev) * mix_i` for each of the 2 or 3 `mixes` (`[D]` each, any shape of D
/// elements): `x: [B, D]`, `prev: [B, D]` (`None`: zeros) -> `[n, B, D]`.
pub fn shift_mix(x: &Tensor, prev: Option<&Tensor>, mixes: &[&Tensor]) -> Result<Tensor> {
    let dev = cuda(x)?;
    let (rows, d) = x.dims2()?;
    if !(2..=3).contains(&mixes.len()) {
        bail!("rwkv4 decode: 2 or 3 mixes, got {}", mixes.len())
    }
    per_channel("a mix", mixes, d)?;
    let prev = prev.map(|p| p.contiguous()).transpose()?;
    if let Some(p) = &prev {
        if p.dims() != [rows, d] || p.dtype() != x.dtype() {
            bail!("rwkv4 decode: previous token {:?} {:?} for x {:?} {:?}", p.dims(), p.dtype(), x.dims(), x.dtype());
        }
    }
    let Some(sfx) = suffix(x.dtype(), mixes[0].dtype()).filter(|_| mixes.iter().all(|m| m.dtype() == mixes[0].dtype()))
    else {
        bail!("rwkv4 decode: activations {:?} over mixes {:?}", x.dtype(), mixes[0].dtype())
    };
    let n = mixes.len();
    let out = output(dev, x.dtype(), &[n, rows, d])?;
    let total = (rows * d) as i64;
    let (d_i, n_i) = (d as i32, n as i32);
    let x = x.contiguous()?;
    let tensors = [Some(&x), prev.as_ref(), Some(mixes[0]), Some(mixes[1]), mixes.get(2).copied(), Some(&out)];
    // x and prev hold rows x d elements, each mix d, out n x rows x d
    run(
        dev,
        &format!("shift_mix_{sfx}"),
        &tensors,
        &[Scalar::I64(total), Scalar::I32(d_i), Scalar::I32(n_i)],
        rows * d,
    )?;
    Ok(out)
}

/// One WKV token with the receptance gate: `k, v, r: [B, D]` (activations), `state` (f32;
/// `None`: empty), raw `decay` and bonus `[D]` -> (`sigmoid(r) * wkv: [B, D]`, the new state).
pub fn wkv_step(
    k: &Tensor,
    v: &Tensor,
    r: &Tensor,
    state: Option<&WkvState>,
    decay: &Tensor,
    bonus: &Tensor,
) -> Result<(Tensor, WkvState)> {
    let dev = cuda(k)?;
    let (rows, d) = k.dims2()?;
    for (what, t) in [("v", v), ("r", r)] {
        if t.dims() != [rows, d] || t.dtype() != k.dtype() {
            bail!("rwkv4 decode: {what} {:?} {:?} for k {:?} {:?}", t.dims(), t.dtype(), k.dims(), k.dtype());
        }
    }
    per_channel("the decay or bonus", &[decay, bonus], d)?;
    let Some(sfx) = suffix(k.dtype(), decay.dtype()).filter(|_| bonus.dtype() == decay.dtype()) else {
        bail!("rwkv4 decode: activations {:?} over decay {:?}, bonus {:?}", k.dtype(), decay.dtype(), bonus.dtype())
    };
    let state = match state {
        Some(s) => {
            let parts = [&s.aa, &s.bb, &s.pp].map(|t| t.contiguous());
            let [aa, bb, pp] = parts;
            let (aa, bb, pp) = (aa?, bb?, pp?);
            if [&aa, &bb, &pp].iter().any(|t| t.dims() != [rows, d] || t.dtype() != DType::F32) {
                bail!(
                    "rwkv4 decode: the WKV state must be three f32 [{rows}, {d}] tensors, got {:?} {:?}",
                    aa.dims(),
                    aa.dtype()
                );
            }
            Some([aa, bb, pp])
        }
        None => None,
    };
    let y = output(dev, k.dtype(), &[rows, d])?;
    let next = output(dev, DType::F32, &[3, rows, d])?;
    let total = (rows * d) as i64;
    let (d_i, empty) = (d as i32, EMPTY_LOG_SCALE as f32);
    let s = state.as_ref();
    let (k, v, r) = (k.contiguous()?, v.contiguous()?, r.contiguous()?);
    let inputs = [Some(&k), Some(&v), Some(&r), s.map(|s| &s[0]), s.map(|s| &s[1]), s.map(|s| &s[2])];
    let rest = [Some(decay), Some(bonus), Some(&y), Some(&next)];
    let all: Vec<Option<&Tensor>> = inputs.into_iter().chain(rest).collect();
    // k, v, r, y and each state part hold rows x d elements, decay and bonus d, next 3 x rows x d
    run(dev, &format!("wkv_step_{sfx}"), &all, &[Scalar::I64(total), Scalar::I32(d_i), Scalar::F32(empty)], rows * d)?;
    let state = WkvState { aa: next.get(0)?, bb: next.get(1)?, pp: next.get(2)? };
    Ok((y, state))
}

/// `name` (`relu_square`: `max(x, 0)^2`; `sigmoid_gate`: `sigmoid(x) * g`) elementwise.
fn elementwise(name: &str, inputs: &[&Tensor]) -> Result<Tensor> {
    let dev = cuda(inputs[0])?;
    let x = inputs[0];
    if inputs.iter().any(|t| t.dims() != x.dims() || t.dtype() != x.dtype()) {
        bail!("rwkv4 decode: {name} of tensors of different shapes or dtypes");
    }
    let Some(sfx) = suffix(x.dtype(), x.dtype()) else { bail!("rwkv4 decode: {name} of {:?}", x.dtype()) };
    let inputs = inputs.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let y = output(dev, x.dtype(), x.dims())?;
    let n = x.elem_count() as i64;
    let mut all: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
    all.push(Some(&y));
    // every input and the output hold n elements
    run(dev, &format!("{name}_{sfx}"), &all, &[Scalar::I64(n)], n as usize)?;
    Ok(y)
}

/// The channel mix's key activation, `max(x, 0)^2`.
pub fn relu_square(x: &Tensor) -> Result<Tensor> {
    elementwise("relu_square", &[x])
}

/// The channel mix's gate, `sigmoid(r) * v`.
pub fn sigmoid_gate(r: &Tensor, v: &Tensor) -> Result<Tensor> {
    elementwise("sigmoid_gate", &[r, v])
}
