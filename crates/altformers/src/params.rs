//! Named trainable parameters: creation with a seeded initialiser, weight-decay and
//! learning-rate groups, and safetensors save/load that names every missing, unexpected or
//! mis-shaped tensor.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::rng::{stream, Rng};

/// One trainable tensor, whether AdamW may decay it and the multiple of the run's learning
/// rate it trains at.
#[derive(Clone)]
pub struct Param {
    pub var: Var,
    /// Matrices decay; norms, biases, embeddings and per-channel constants do not.
    pub decay: bool,
    /// The parameter's learning rate is `lr_scale` times the scheduled one (1 for almost
    /// every parameter). A multiple rather than an absolute rate, so the group follows the
    /// run's warm-up and decay: the official Hyena trainer's groups with their own `lr` are
    /// scheduled the same way, from their own base rate.
    pub lr_scale: f64,
}

/// All parameters of a model, by dotted name (`blocks.0.att.qkv.weight`).
#[derive(Default)]
pub struct ParamStore {
    pub params: BTreeMap<String, Param>,
}

impl ParamStore {
    pub fn num_elements(&self) -> usize {
        self.params.values().map(|p| p.var.elem_count()).sum()
    }

    pub fn vars(&self) -> Vec<(String, Param)> {
        self.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().map(|(k, p)| (k.clone(), p.var.as_tensor().clone())).collect()
    }

    /// Writes the weights to `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        save_tensors(&self.tensors(), path)
    }

    /// Loads weights saved by [`ParamStore::save`]; every name and shape must match.
    pub fn load(&self, path: &Path) -> Result<()> {
        let loaded = load_tensors(path, &self.device()?)?;
        self.assign(loaded, &path.display().to_string())
    }

    /// Overwrites every parameter from `tensors`, converting dtypes; all names and shapes
    /// must match exactly, and the error lists every problem at once.
    pub fn assign(&self, tensors: BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
        self.check(&tensors, origin)?;
        check_finite(&tensors, origin)?;
        self.set_all(&tensors)
    }

    fn check(&self, tensors: &BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
        let mut tensors: BTreeMap<&String, &Tensor> = tensors.iter().collect();
        let mut problems = Vec::new();
        for (name, p) in &self.params {
            match tensors.remove(name) {
                None => problems.push(format!("missing tensor `{name}` (expected shape {:?})", p.var.dims())),
                Some(t) if t.dims() != p.var.dims() => {
                    problems.push(format!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), p.var.dims()))
                }
                Some(_) => {}
            }
        }
        for name in tensors.keys() {
            problems.push(format!("unexpected tensor `{name}`"));
        }
        if !problems.is_empty() {
            bail!("{origin} does not match the model:\n  {}", problems.join("\n  "));
        }
        Ok(())
    }

    /// Like [`ParamStore::assign`] but after the check: sets every variable.
    fn set_all(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, p) in &self.params {
            let t = &tensors[name];
            p.var.set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
        }
        Ok(())
    }

    fn device(&self) -> Result<Device> {
        Ok(self.params.values().next().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu))
    }
}

/// The training step a model is at, shared by every part built from one [`ParamBuilder`]:
/// what a part whose function follows a schedule reads (Performer's feature redraws), so the
/// schedule reaches it without global state. The training step sets it before its forward
/// pass ([`crate::model::Model::set_training_step`]); evaluation after that step sees the
/// same value. A fresh model is at step 0.
/// It also remembers whether a part has read it: the training step's CUDA graph replays one
/// captured step, so it is only for models whose computation does not follow the step.
#[derive(Clone, Debug, Default)]
pub struct StepClock(Arc<(std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicBool)>);

impl StepClock {
    pub fn set(&self, step: usize) {
        self.0 .0.store(step, std::sync::atomic::Ordering::Relaxed);
    }

    /// The step, for a part that follows it (which marks the clock as followed).
    pub fn get(&self) -> usize {
        self.0 .1.store(true, std::sync::atomic::Ordering::Relaxed);
        self.peek()
    }

    /// The step, read by the training loop (not a part of the model).
    pub fn peek(&self) -> usize {
        self.0 .0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a part of the model has read the step ([`StepClock::get`]).
    pub fn followed(&self) -> bool {
        self.0 .1.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Hands out parameters under a name prefix; cheap to clone, shares one store and one
/// [`StepClock`].
#[derive(Clone)]
pub struct ParamBuilder {
    store: Arc<Mutex<ParamStore>>,
    rng: Arc<Mutex<Rng>>,
    prefix: String,
    pub device: Device,
    pub dtype: DType,
    /// The model's training step, for parts that follow a schedule.
    pub clock: StepClock,
    /// [`Param::lr_scale`] of the parameters this builder creates.
    lr_scale: f64,
    /// Random parameters drawn on the device by its own generator ([`ParamBuilder::for_timing`]).
    draw_on_device: bool,
    /// The model sees its parameters as plain tensors ([`ParamBuilder::frozen`]).
    frozen: bool,
}

impl ParamBuilder {
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        Self {
            store: Arc::new(Mutex::new(ParamStore::default())),
            rng: Arc::new(Mutex::new(Rng::derive(seed, stream::INIT, 0))),
            prefix: String::new(),
            device: device.clone(),
            dtype,
            clock: StepClock::default(),
            lr_scale: 1.0,
            draw_on_device: false,
            frozen: false,
        }
    }

    /// A builder for a model that never trains (generation, evaluation, timing): the store
    /// keeps each parameter as a variable (a checkpoint loads into it in place), but the model
    /// holds a detached view of the same memory. candle has no no-gradient mode: with
    /// variables every operation records its inputs, so a prefill of 64K tokens would keep
    /// every layer's intermediates alive until its end (and fused kernels keep what their
    /// backward needs); with views nothing is recorded and each layer's working set is freed
    /// as the next one runs.
    pub fn frozen(self) -> Self {
        Self { frozen: true, ..self }
    }

    /// What the model holds of `var`: the variable itself, or its detached view (for a part
    /// that collects its parameters from the store).
    pub fn handed_out(&self, var: &Var) -> Tensor {
        if self.frozen {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        }
    }

    /// A builder for models that are only timed (`bench decode`): random parameters are drawn
    /// on the device by its generator, not from the seeded host stream, so a model of billions
    /// of parameters is made in seconds rather than minutes. Same shapes and scales, other
    /// values, and not reproducible: never for a model that is trained or compared.
    pub fn for_timing(device: &Device, dtype: DType) -> Self {
        Self { draw_on_device: true, ..Self::new(0, device, dtype) }.frozen()
    }

    /// A builder whose parameters train at `scale` times the run's learning rate (a finite
    /// multiple >= 0; 0 freezes them). Sub-builders ([`ParamBuilder::pp`]) inherit it.
    pub fn with_lr_scale(&self, scale: f64) -> Result<Self> {
        if !(scale.is_finite() && scale >= 0.0) {
            bail!("learning-rate multiple must be finite and >= 0, got {scale}");
        }
        let mut b = self.clone();
        b.lr_scale = scale;
        Ok(b)
    }

    /// A builder for the sub-module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut b = self.clone();
        b.prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        b
    }

    /// A builder at the root of the store (no prefix), for a parameter shared by modules
    /// built under different prefixes (Linformer's layerwise projection).
    pub fn root(&self) -> Self {
        let mut b = self.clone();
        b.prefix = String::new();
        b
    }

    /// The parameter `name` under this builder's prefix if it was created already: how a
    /// shared parameter's later users take the first one's tensor (its gradient then sums
    /// over every use, and it is stored, counted and decayed once).
    pub fn existing(&self, name: &str) -> Option<Tensor> {
        let store = self.store.lock().unwrap();
        store.params.get(&self.full_name(name)).map(|p| self.handed_out(&p.var))
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Creates a parameter from host values.
    pub fn from_values(&self, name: &str, dims: &[usize], values: Vec<f32>, decay: bool) -> Result<Tensor> {
        self.register(name, Tensor::from_vec(values, dims, &self.device)?, decay)
    }

    /// Creates the parameter `name` holding `t` (cast to the builder's dtype).
    fn register(&self, name: &str, t: Tensor, decay: bool) -> Result<Tensor> {
        let full = self.full_name(name);
        let var = Var::from_tensor(&t.to_dtype(self.dtype)?)?;
        let mut store = self.store.lock().unwrap();
        if store.params.contains_key(&full) {
            bail!("parameter `{full}` defined twice");
        }
        let tensor = self.handed_out(&var);
        store.params.insert(full, Param { var, decay, lr_scale: self.lr_scale });
        Ok(tensor)
    }

    /// Gaussian N(0, std^2) matrix, decayed.
    pub fn normal(&self, name: &str, dims: &[usize], std: f64) -> Result<Tensor> {
        self.gaussian(name, dims, std, true)
    }

    /// Gaussian, not decayed (embeddings).
    pub fn normal_no_decay(&self, name: &str, dims: &[usize], std: f64) -> Result<Tensor> {
        self.gaussian(name, dims, std, false)
    }

    fn gaussian(&self, name: &str, dims: &[usize], std: f64, decay: bool) -> Result<Tensor> {
        let n = self.elements(name, dims)?;
        if self.draw_on_device {
            return self.register(name, Tensor::randn(0f32, std as f32, dims, &self.device)?, decay);
        }
        let values = self.rng.lock().unwrap().normal_vec(n, std);
        self.from_values(name, dims, values, decay)
    }

    /// Uniform in [lo, hi), decayed.
    pub fn uniform(&self, name: &str, dims: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
        self.flat(name, dims, lo, hi, true)
    }

    /// Uniform in [lo, hi), not decayed (biases with PyTorch's default initialiser).
    pub fn uniform_no_decay(&self, name: &str, dims: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
        self.flat(name, dims, lo, hi, false)
    }

    fn flat(&self, name: &str, dims: &[usize], lo: f64, hi: f64, decay: bool) -> Result<Tensor> {
        let n = self.elements(name, dims)?;
        if self.draw_on_device {
            return self.register(name, Tensor::rand(lo as f32, hi as f32, dims, &self.device)?, decay);
        }
        let values = self.rng.lock().unwrap().uniform_vec(n, lo, hi);
        self.from_values(name, dims, values, decay)
    }

    /// The element count of the parameter `name` of shape `dims`, refused (with its name and
    /// shape) before its values are drawn where they would not fit in memory: host f32 values,
    /// then the tensor in the builder's dtype.
    fn elements(&self, name: &str, dims: &[usize]) -> Result<usize> {
        let what = || format!("the parameter `{}`", self.full_name(name));
        crate::model::size::check_tensor(what, dims, 4 + self.dtype.size_in_bytes())
    }

    /// Orthogonal `[rows, cols]` matrix times `gain`, as `torch.nn.init.orthogonal_`: a
    /// Gaussian from the builder's seeded stream, its rows (if `rows <= cols`) or else its
    /// columns orthonormalised by Gram-Schmidt (applied twice, for accuracy in f32).
    pub fn orthogonal(&self, name: &str, rows: usize, cols: usize, gain: f64, decay: bool) -> Result<Tensor> {
        if self.draw_on_device {
            // a timed model's weights need their scale only: an orthogonal matrix's entries
            // have this standard deviation
            let std = gain / (rows.max(cols) as f64).sqrt();
            return self.gaussian(name, &[rows, cols], std, decay);
        }
        let a = self.rng.lock().unwrap().normal_vec(self.elements(name, &[rows, cols])?, 1.0);
        // the `n` vectors of length `m` to orthonormalise: rows if rows <= cols, else columns
        let (n, m, by_rows) = (rows.min(cols), rows.max(cols), rows <= cols);
        let at = |v: usize, i: usize| if by_rows { v * cols + i } else { i * cols + v };
        let mut q: Vec<f64> =
            (0..n).flat_map(|v| (0..m).map(move |i| (v, i))).map(|(v, i)| a[at(v, i)] as f64).collect();
        orthonormalise_rows(&mut q, n, m)?;
        let mut out = vec![0f32; rows * cols];
        for v in 0..n {
            for i in 0..m {
                out[at(v, i)] = (q[v * m + i] * gain) as f32;
            }
        }
        self.from_values(name, &[rows, cols], out, decay)
    }

    /// Constant fill, not decayed (norm gains, biases).
    pub fn constant(&self, name: &str, dims: &[usize], value: f32) -> Result<Tensor> {
        let n = self.elements(name, dims)?;
        self.from_values(name, dims, vec![value; n], false)
    }

    pub fn zeros(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.constant(name, dims, 0.0)
    }

    pub fn ones(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.constant(name, dims, 1.0)
    }

    /// Everything created so far.
    pub fn into_store(self) -> ParamStore {
        let mut store = self.store.lock().unwrap();
        std::mem::take(&mut *store)
    }

    pub fn store(&self) -> Arc<Mutex<ParamStore>> {
        self.store.clone()
    }
}

/// Refuses weights with a NaN or an infinity (a diverged or tampered file would otherwise
/// evaluate to a NaN loss and generate garbage), naming each such tensor.
pub fn check_finite(tensors: &BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
    let mut bad = Vec::new();
    for (name, t) in tensors.iter().filter(|(_, t)| t.dtype().is_float()) {
        // x - x is 0 for a finite x and NaN otherwise: one reduction on the tensor's device
        let t = t.to_dtype(DType::F32)?;
        if !t.sub(&t)?.sum_all()?.to_scalar::<f32>()?.is_finite() {
            let n = t.flatten_all()?.to_vec1::<f32>()?.iter().filter(|v| !v.is_finite()).count();
            bad.push(format!("tensor `{name}` holds {n} non-finite values (NaN or infinity)"));
        }
    }
    if !bad.is_empty() {
        bail!("{origin} has non-finite weights (a diverged run or a damaged file):\n  {}", bad.join("\n  "));
    }
    Ok(())
}

/// Writes `tensors` to `path` atomically: a temporary file beside it, fsync, rename.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = crate::util::tmp_path(path);
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu.into_iter().collect(), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    crate::util::fsync_and_rename(&tmp, path)
}

/// Reads a safetensors file with a clear error for a missing, truncated or corrupt file.
pub fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        bail!("weights file {} does not exist", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        anyhow::anyhow!("{} is not a valid safetensors file (corrupt or truncated?): {e}", path.display())
    })?;
    Ok(tensors.into_iter().collect())
}

/// Orthonormalises the `n` rows of `q` (`[n, m]`, row-major, `n <= m`) in order, Gram-Schmidt
/// twice: each block of 64 rows is projected off the rows before it twice as two matrix
/// products, then orthonormalised within the block row by row. Row by row against every
/// earlier row, the initialiser of a 12 x 768 RWKV-4 took 18 s (each pass streamed all the
/// earlier rows from memory); in blocks, under a second.
fn orthonormalise_rows(q: &mut [f64], n: usize, m: usize) -> candle_core::Result<()> {
    const BLOCK: usize = 64;
    let mut done = 0;
    while done < n {
        let b = BLOCK.min(n - done);
        if done > 0 {
            let before = Tensor::from_slice(&q[..done * m], (done, m), &Device::Cpu)?;
            for _ in 0..2 {
                let x = Tensor::from_slice(&q[done * m..(done + b) * m], (b, m), &Device::Cpu)?;
                let x = (&x - x.matmul(&before.t()?)?.matmul(&before)?)?;
                q[done * m..(done + b) * m].copy_from_slice(&x.flatten_all()?.to_vec1::<f64>()?);
            }
        }
        for r in done..done + b {
            let (earlier, rest) = q.split_at_mut(r * m);
            let x = &mut rest[..m];
            for _ in 0..2 {
                for p in done..r {
                    let p = &earlier[p * m..(p + 1) * m];
                    let dot: f64 = x.iter().zip(p).map(|(a, b)| a * b).sum();
                    x.iter_mut().zip(p).for_each(|(a, b)| *a -= dot * b);
                }
            }
            let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            x.iter_mut().for_each(|a| *a /= norm);
        }
        done += b;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timed model's builder gives every parameter the seeded builder's name, shape, dtype
    /// and scale (standard deviation within 5% of the asked one), from the device's own
    /// generator: other values.
    #[test]
    fn parameters_for_timing_have_the_seeded_shapes_and_scales() -> Result<()> {
        let (seeded, timed) =
            (ParamBuilder::new(3, &Device::Cpu, DType::F32), ParamBuilder::for_timing(&Device::Cpu, DType::F32));
        for pb in [&seeded, &timed] {
            pb.normal("w", &[256, 128], 0.02)?;
            pb.uniform("u", &[64, 64], -0.5, 0.5)?;
            pb.orthogonal("o", 192, 96, 2.0, true)?;
            pb.constant("c", &[8], 1.5)?;
        }
        let (a, b) = (seeded.into_store(), timed.into_store());
        let std = |t: &Tensor| -> Result<f64> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
            Ok((v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt())
        };
        assert_eq!(a.params.keys().collect::<Vec<_>>(), b.params.keys().collect::<Vec<_>>());
        for (name, p) in &a.params {
            let (x, y) = (p.var.as_tensor(), b.params[name].var.as_tensor());
            assert_eq!((x.dims(), x.dtype(), p.decay), (y.dims(), y.dtype(), b.params[name].decay), "{name}");
            let (sx, sy) = (std(x)?, std(y)?);
            assert!((sx - sy).abs() <= 0.05 * sx.max(1e-12), "{name}: std {sx} seeded, {sy} timed");
            if name != "c" {
                assert!(x.sub(y)?.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}: the same values");
            }
        }
        Ok(())
    }

    /// A parameter too large for memory (an option sizing one tensor at 10^12) or whose
    /// element count overflows is refused with its name and shape before anything is
    /// allocated, where the allocator would abort the process.
    #[test]
    fn a_parameter_beyond_memory_is_refused_by_name() {
        let pb = ParamBuilder::new(0, &Device::Cpu, DType::F32).pp("blocks.0");
        let err = pb.normal("filter", &[1_000_000_000_000, 33], 0.02).unwrap_err().to_string();
        assert!(err.contains("`blocks.0.filter` of shape [1000000000000, 33] needs about"), "{err}");
        let err = pb.zeros("w", &[usize::MAX / 2, 3]).unwrap_err().to_string();
        assert!(err.contains("`blocks.0.w`") && err.contains("more elements than"), "{err}");
        let err = pb.orthogonal("o", 1 << 40, 1 << 20, 1.0, true).unwrap_err().to_string();
        assert!(err.contains("`blocks.0.o`"), "{err}");
        assert_eq!(pb.ones("fine", &[2, 3]).unwrap().dims(), &[2, 3]);
    }
}
