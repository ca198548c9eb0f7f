//! The CUDA path of the causal FFT convolution ([`super`], `ops::fftconv`): cuFFT
//! real-to-complex / complex-to-real transforms (batched, in place, f32) on candle's stream,
//! with the small kernels of `fftconv.cu` around them (zero padding with the cast to f32,
//! spectrum products, truncation with the cast back).
//!
//! For `x: [B, C, T]`, `h: [C, L]` and the FFT length `n = fft_len(T, L)` (`bins = n/2 + 1`),
//! every signal is one row of `pitch = 2 bins` floats, the layout of an in-place transform:
//!
//! ```text
//! forward   pad h -> R2C (C rows)          pad x -> R2C (B C rows)
//!           Y = X H / n (h's spectrum shared by the batch) -> C2R -> first T samples
//! backward  pad dy -> R2C;  one pass over (c, bin), looping over b:
//!           dX = D conj(H) / n (in place),  dH = sum_b D conj(X) / n
//!           C2R both -> first T (dx) and first L (dh) samples
//! ```
//!
//! The op saves `X` and `H` for the backward pass when a gradient is being tracked (see
//! [`Spectra`]), so training pays five large transforms per call (as many as recomputing
//! would cost six). Inputs are f32, bf16 or f16 (cast to f32 while padding, outputs cast
//! back while truncating); f64 is not supported on CUDA.
//!
//! Plans: one per (n, rows, direction) and thread, created on first use and kept
//! (thread-local, so no two host threads share a plan or its work area: candle's default
//! CUDA stream is per thread). Plans do not allocate their own work areas: the plans of a
//! thread share one buffer, grown to the largest plan's need.
//!
//! cuFFT is loaded at run time by cudarc (`dynamic-loading`, as candle is built here), which
//! tries `libcufft.so`, `libcufft.so.<CUDA major>`, `libcufft.so.12`, `libcufft.so.11`, ...
//! on the library path; CUDA 13 ships cuFFT 12 as `libcufft.so.12` (PyTorch's cu13 wheels:
//! `nvidia/cu13/lib`), which is in that list.
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cufft::{result as cufft, sys as cufft_sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{bail, Error, Layout, Result, Shape};

use super::fft_len;
use crate::kernels::launch::{self, LaunchConfig, PushKernelArg};
use crate::kernels::ptx;

const MODULE: &str = "altformers_fftconv";

/// The spectra of `x` (`[B C, pitch]` floats) and `h` (`[C, pitch]`) from a forward pass,
/// kept for its backward pass.
pub struct Spectra {
    xs: CudaSlice<f32>,
    hs: CudaSlice<f32>,
}

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    c: usize,
    t: usize,
    l: usize,
    n: usize,
    bins: usize,
    pitch: usize,
}

impl Geometry {
    fn new(b: usize, c: usize, t: usize, l: usize) -> Result<Self> {
        let n = fft_len(t, l);
        let bins = n / 2 + 1;
        let g = Geometry { b, c, t, l, n, bins, pitch: 2 * bins };
        if g.pitch > i32::MAX as usize || b * c > i32::MAX as usize {
            bail!("fftconv (CUDA): sizes too large (B {b}, C {c}, T {t}, L {l})");
        }
        Ok(g)
    }

    /// `bins - 1` for even n (the real Nyquist bin), else -1.
    fn nyquist(&self) -> i32 {
        if self.n.is_multiple_of(2) {
            self.bins as i32 - 1
        } else {
            -1
        }
    }

    fn scale(&self) -> f32 {
        1.0 / self.n as f32
    }
}

/// `y = causal_conv(x, h)` on CUDA: `x: [B, C, T]`, `h: [C, L]` (contiguous, same dtype:
/// f32, bf16 or f16) -> `[B, C, T]` in that dtype, with the spectra when `keep`.
pub fn conv(
    x: &CudaStorage,
    lx: &Layout,
    h: &CudaStorage,
    lh: &Layout,
    keep: bool,
) -> Result<(CudaStorage, Option<Spectra>)> {
    let (b, c, t) = lx.shape().dims3()?;
    let (_, l) = lh.shape().dims2()?;
    let g = Geometry::new(b, c, t, l)?;
    let dev = x.device.clone();
    macro_rules! run {
        ($xs:expr, $hs:expr, $sfx:literal) => {{
            let (out, spectra) = conv_typed(&dev, &launch::slice($xs, lx)?, &launch::slice($hs, lh)?, $sfx, g, keep)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), spectra))
        }};
    }
    match (&x.slice, &h.slice) {
        (CudaStorageSlice::F32(xs), CudaStorageSlice::F32(hs)) => run!(xs, hs, "f32"),
        (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(hs)) => run!(xs, hs, "bf16"),
        (CudaStorageSlice::F16(xs), CudaStorageSlice::F16(hs)) => run!(xs, hs, "f16"),
        _ => bail!(
            "fftconv (CUDA): supports f32, bf16 and f16 (transformed in f32), got {:?} and {:?}",
            candle_core::backend::BackendStorage::dtype(x),
            candle_core::backend::BackendStorage::dtype(h)
        ),
    }
}

/// Both gradients of `y = causal_conv(x, h)` on CUDA for the output gradient `dy: [B, C, T]`:
/// one flat buffer `[B C T + C L]` holding `dx: [B, C, T]` then `dh: [C, L]`, in the
/// inputs' dtype. `saved` are the forward pass's spectra (recomputed when `None`).
pub fn grads(
    dy: &CudaStorage,
    ldy: &Layout,
    x: &CudaStorage,
    lx: &Layout,
    h: &CudaStorage,
    lh: &Layout,
    saved: Option<&Spectra>,
) -> Result<CudaStorage> {
    let (b, c, t) = lx.shape().dims3()?;
    let (_, l) = lh.shape().dims2()?;
    if ldy.shape().dims() != [b, c, t] {
        bail!("fftconv (CUDA): gradient {:?} does not match input {:?}", ldy.shape(), lx.shape());
    }
    let g = Geometry::new(b, c, t, l)?;
    let dev = x.device.clone();
    macro_rules! run {
        ($ds:expr, $xs:expr, $hs:expr, $sfx:literal) => {{
            let out = grads_typed(
                &dev,
                &launch::slice($ds, ldy)?,
                &launch::slice($xs, lx)?,
                &launch::slice($hs, lh)?,
                $sfx,
                g,
                saved,
            )?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match (&dy.slice, &x.slice, &h.slice) {
        (CudaStorageSlice::F32(ds), CudaStorageSlice::F32(xs), CudaStorageSlice::F32(hs)) => {
            run!(ds, xs, hs, "f32")
        }
        (CudaStorageSlice::BF16(ds), CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(hs)) => {
            run!(ds, xs, hs, "bf16")
        }
        (CudaStorageSlice::F16(ds), CudaStorageSlice::F16(xs), CudaStorageSlice::F16(hs)) => {
            run!(ds, xs, hs, "f16")
        }
        _ => bail!("fftconv (CUDA): gradients support f32, bf16 and f16, with one dtype for dy, x and h"),
    }
}

fn conv_typed<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    h: &CudaView<T>,
    sfx: &str,
    g: Geometry,
    keep: bool,
) -> Result<(CudaSlice<T>, Option<Spectra>)> {
    let rows = g.b * g.c;
    let mut out = launch::uninit::<T>(dev, rows * g.t)?;
    if out.is_empty() {
        return Ok((out, None));
    }
    let hs = spectrum(dev, h, sfx, g.c, g.l, g)?;
    let mut xs = spectrum(dev, x, sfx, rows, g.t, g)?;
    let stream = dev.cuda_stream();
    let cfg = row_cfg(rows, g.bins);
    let mul = launch::func(dev, MODULE, ptx::FFTCONV, "spectra_mul")?;
    let (c, bins, nyq, scale) = (g.c as i32, g.bins as i32, g.nyquist(), g.scale());
    let spectra = if keep {
        // Y into a new buffer, so that X stays for the backward pass.
        let mut ys = launch::uninit::<f32>(dev, rows * g.pitch)?;
        {
            let mut bld = mul.builder();
            bld.arg(&xs).arg(&hs).arg(&mut ys).arg(&c).arg(&bins).arg(&bins).arg(&nyq).arg(&scale);
            unsafe { bld.launch(cfg) }.w()?;
        }
        transform(&stream, &mut ys, g.n, rows, true)?;
        unpad(dev, &ys, &mut out.slice_mut(..), sfx, rows, g.t, g)?;
        Some(Spectra { xs, hs })
    } else {
        {
            let (p, _guard) = xs.device_ptr_mut(&stream);
            let mut bld = mul.builder();
            bld.arg(&p).arg(&hs).arg(&p).arg(&c).arg(&bins).arg(&bins).arg(&nyq).arg(&scale);
            unsafe { bld.launch(cfg) }.w()?;
        }
        transform(&stream, &mut xs, g.n, rows, true)?;
        unpad(dev, &xs, &mut out.slice_mut(..), sfx, rows, g.t, g)?;
        None
    };
    Ok((out, spectra))
}

fn grads_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    h: &CudaView<T>,
    sfx: &str,
    g: Geometry,
    saved: Option<&Spectra>,
) -> Result<CudaSlice<T>> {
    let rows = g.b * g.c;
    let (nx, nh) = (rows * g.t, g.c * g.l);
    if rows == 0 || g.t == 0 {
        return launch::zeros::<T>(dev, nx + nh);
    }
    let mut out = launch::uninit::<T>(dev, nx + nh)?;
    let recomputed;
    let sp = match saved {
        Some(s) => s,
        None => {
            recomputed = Spectra { xs: spectrum(dev, x, sfx, rows, g.t, g)?, hs: spectrum(dev, h, sfx, g.c, g.l, g)? };
            &recomputed
        }
    };
    let stream = dev.cuda_stream();
    let mut ds = spectrum(dev, dy, sfx, rows, g.t, g)?;
    let mut dhs = launch::uninit::<f32>(dev, g.c * g.pitch)?;
    let k = launch::func(dev, MODULE, ptx::FFTCONV, "spectra_grads")?;
    let (b, c, bins, nyq, scale) = (g.b as i32, g.c as i32, g.bins as i32, g.nyquist(), g.scale());
    {
        let mut bld = k.builder();
        bld.arg(&mut ds).arg(&sp.xs).arg(&sp.hs).arg(&mut dhs);
        bld.arg(&b).arg(&c).arg(&bins).arg(&bins).arg(&nyq).arg(&scale);
        unsafe { bld.launch(row_cfg(g.c, g.bins)) }.w()?;
    }
    transform(&stream, &mut ds, g.n, rows, true)?;
    transform(&stream, &mut dhs, g.n, g.c, true)?;
    unpad(dev, &ds, &mut out.slice_mut(..nx), sfx, rows, g.t, g)?;
    unpad(dev, &dhs, &mut out.slice_mut(nx..), sfx, g.c, g.l, g)?;
    Ok(out)
}

/// Spectra of `rows` signals of length `len` (`src: [rows, len]`), zero-padded to `n`:
/// `[rows, pitch]` floats, each row `bins` complex values.
fn spectrum<T: DeviceRepr>(
    dev: &CudaDevice,
    src: &CudaView<T>,
    sfx: &str,
    rows: usize,
    len: usize,
    g: Geometry,
) -> Result<CudaSlice<f32>> {
    let mut buf = launch::uninit::<f32>(dev, rows * g.pitch)?;
    let f = launch::func(dev, MODULE, ptx::FFTCONV, &format!("pad_{sfx}"))?;
    let (len_i, pitch) = (len as i32, g.pitch as i32);
    {
        let mut bld = f.builder();
        bld.arg(src).arg(&mut buf).arg(&len_i).arg(&pitch);
        unsafe { bld.launch(row_cfg(rows, g.pitch)) }.w()?;
    }
    transform(&dev.cuda_stream(), &mut buf, g.n, rows, false)?;
    Ok(buf)
}

/// The first `len` samples of each of the `rows` rows of `src` (`[rows, pitch]`), cast to
/// the output type, into `dst: [rows, len]`.
fn unpad<T: DeviceRepr>(
    dev: &CudaDevice,
    src: &CudaSlice<f32>,
    dst: &mut CudaViewMut<T>,
    sfx: &str,
    rows: usize,
    len: usize,
    g: Geometry,
) -> Result<()> {
    if rows * len == 0 {
        return Ok(());
    }
    let f = launch::func(dev, MODULE, ptx::FFTCONV, &format!("unpad_{sfx}"))?;
    let (len_i, pitch) = (len as i32, g.pitch as i32);
    let mut bld = f.builder();
    bld.arg(src).arg(dst).arg(&len_i).arg(&pitch);
    unsafe { bld.launch(row_cfg(rows, len)) }.w()?;
    Ok(())
}

/// One block row per signal (grid.x), blocks of 256 threads over its `cols` columns
/// (grid.y, the kernels loop past 65535 of them).
fn row_cfg(rows: usize, cols: usize) -> LaunchConfig {
    let y = cols.div_ceil(256).clamp(1, 65535) as u32;
    LaunchConfig { grid_dim: (rows as u32, y, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A cuFFT plan handle with the size of the work area it needs.
struct Plan {
    handle: cufft_sys::cufftHandle,
    work: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the handle came from cufftCreate and is destroyed once, here.
        let _ = unsafe { cufft::destroy(self.handle) };
    }
}

/// One thread's plans for one stream, and their shared work area.
struct Plans {
    stream: Arc<CudaStream>,
    plans: HashMap<(usize, usize, bool), Plan>,
    work: Option<CudaSlice<u8>>,
}

thread_local! {
    /// Per (device ordinal, stream): this thread's plans.
    static PLANS: RefCell<HashMap<(usize, usize), Plans>> = RefCell::new(HashMap::new());
}

fn fft_err(what: &str, e: cufft::CufftError) -> Error {
    Error::Msg(format!("fftconv (CUDA): cuFFT {what} failed: {e:?}"))
}

impl Plans {
    /// The plan for `rows` transforms of length `n` (`inverse`: complex-to-real), in place
    /// on rows of `pitch = 2 (n/2 + 1)` floats.
    fn get(&mut self, n: usize, rows: usize, inverse: bool) -> Result<&Plan> {
        if !self.plans.contains_key(&(n, rows, inverse)) {
            let plan = make_plan(&self.stream, n, rows, inverse)?;
            self.plans.insert((n, rows, inverse), plan);
        }
        Ok(&self.plans[&(n, rows, inverse)])
    }
}

fn make_plan(stream: &Arc<CudaStream>, n: usize, rows: usize, inverse: bool) -> Result<Plan> {
    stream.context().bind_to_thread().w()?;
    // cudarc panics when it cannot load the library: turn that into an error that says why.
    let handle = std::panic::catch_unwind(cufft::create).map_err(|_| {
        Error::Msg(
            "fftconv (CUDA): cannot load cuFFT: put the folder holding libcufft.so.12 (CUDA 13; \
             libcufft.so.11 for CUDA 12) on LD_LIBRARY_PATH (PyTorch's CUDA 13 wheels: nvidia/cu13/lib)"
                .into(),
        )
    })?;
    let handle = handle.map_err(|e| fft_err("create", e))?;
    let mut plan = Plan { handle, work: 0 };
    let bins = (n / 2 + 1) as i64;
    let mut len = [n as i64];
    let mut real = [2 * bins];
    let mut complex = [bins];
    let (inembed, idist, onembed, odist, kind) = if inverse {
        (complex.as_mut_ptr(), bins, real.as_mut_ptr(), 2 * bins, cufft_sys::cufftType::CUFFT_C2R)
    } else {
        (real.as_mut_ptr(), 2 * bins, complex.as_mut_ptr(), bins, cufft_sys::cufftType::CUFFT_R2C)
    };
    // SAFETY: a fresh plan; the size arrays live across the call.
    plan.work = unsafe {
        cufft::set_auto_allocation(plan.handle, false).map_err(|e| fft_err("set_auto_allocation", e))?;
        let work = cufft::make_plan_many64(
            plan.handle,
            1,
            len.as_mut_ptr(),
            inembed,
            1,
            idist,
            onembed,
            1,
            odist,
            kind,
            rows as i64,
        )
        .map_err(|e| fft_err(&format!("plan (n {n}, batch {rows})"), e))?;
        cufft::set_stream(plan.handle, stream.cu_stream() as _).map_err(|e| fft_err("set_stream", e))?;
        work
    };
    Ok(plan)
}

/// In-place batched transform of `buf: [rows, pitch]` floats: real-to-complex, or
/// (`inverse`) complex-to-real (unscaled), on `stream`.
fn transform(stream: &Arc<CudaStream>, buf: &mut CudaSlice<f32>, n: usize, rows: usize, inverse: bool) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let key = (stream.context().ordinal(), stream.cu_stream() as usize);
    PLANS.with(|all| {
        let mut all = all.borrow_mut();
        let plans =
            all.entry(key).or_insert_with(|| Plans { stream: stream.clone(), plans: HashMap::new(), work: None });
        let (handle, need) = {
            let p = plans.get(n, rows, inverse)?;
            (p.handle, p.work)
        };
        if plans.work.as_ref().is_none_or(|w| w.len() < need) {
            // Grow the shared work area (the old one is freed in stream order, after the
            // transforms already queued that use it).
            plans.work = None;
            // SAFETY: a work area needs no initial contents.
            plans.work = Some(unsafe { stream.alloc::<u8>(need.max(256)) }.w()?);
        }
        stream.context().bind_to_thread().w()?;
        let work = plans.work.as_mut().expect("allocated above");
        let (wp, _wg) = work.device_ptr_mut(stream);
        let (p, _g) = buf.device_ptr_mut(stream);
        // SAFETY: the plan belongs to this thread and stream; the buffer holds `rows` rows of
        // `2 (n/2 + 1)` floats, as the plan's layout says; the work area is large enough.
        unsafe {
            cufft::set_work_area(handle, wp as *mut c_void).map_err(|e| fft_err("set_work_area", e))?;
            if inverse {
                cufft::exec_c2r(handle, p as *mut cufft_sys::cufftComplex, p as *mut cufft_sys::cufftReal)
                    .map_err(|e| fft_err("exec C2R", e))
            } else {
                cufft::exec_r2c(handle, p as *mut cufft_sys::cufftReal, p as *mut cufft_sys::cufftComplex)
                    .map_err(|e| fft_err("exec R2C", e))
            }
        }
    })
}

/// Both gradients on CUDA: inputs `dy: [B, C, T]`, `x: [B, C, T]`, `h: [C, L]` ->
/// `[B C T + C L]`, `dx` then `dh` (see [`grads`]).
pub(super) struct ConvGrads {
    pub(super) saved: Option<Spectra>,
}

impl candle_core::CustomOp3 for ConvGrads {
    fn name(&self) -> &'static str {
        "fftconv-conv-grads"
    }

    launch::cuda_only!("fftconv-conv-grads runs on CUDA only (the CPU backward is cpu::Backward)", _, _, _);

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = grads(s1, l1, s2, l2, s3, l3, self.saved.as_ref())?;
        Ok((out, Shape::from(l1.shape().elem_count() + l3.shape().elem_count())))
    }
}
