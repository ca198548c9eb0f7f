//! AdamW (Loshchilov & Hutter 2019) with PyTorch's update rule, global-norm gradient
//! clipping, decay only on matrices, per-parameter learning-rate multiples
//! ([`Param::lr_scale`]: a parameter with multiple `s` steps and decays as a PyTorch
//! parameter group of rate `s lr`), and state that checkpoints exactly.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

use crate::params::{check_finite, load_tensors, save_tensors, Param, ParamStore};

pub struct AdamW {
    params: Vec<(String, Param)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (the bias corrections use it).
    pub t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// A gradient norm that is not finite: [`AdamW::step`] refuses it, changing no parameter
/// (the run diverged; any other error of a step is not this).
#[derive(Debug)]
pub struct NonFiniteNorm(pub f64);

impl std::fmt::Display for NonFiniteNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gradient norm is {}", self.0)
    }
}

impl std::error::Error for NonFiniteNorm {}

/// The gradient norm (before clipping) one [`AdamW::step`] measured, as an f64 scalar. The
/// fused GPU step leaves it on the device: reading it waits for the GPU to finish the step,
/// so training loops read it every few steps ([`super::step::Deferred`]), not every step.
pub struct StepNorm(pub Tensor);

impl StepNorm {
    /// The norm on the host; an error if it is not finite (the step then changed nothing).
    pub fn value(&self) -> Result<f64> {
        let norm = self.0.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !norm.is_finite() {
            bail!("gradient norm is {norm}");
        }
        Ok(norm)
    }
}

impl AdamW {
    pub fn new(store: &ParamStore, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        let params = store.vars();
        // Moments are kept in f32 whatever the parameter dtype (bf16 training keeps f32 state).
        let zeros = |p: &Param| p.var.zeros_like()?.to_dtype(moment_dtype(p.var.dtype()));
        let m = params.iter().map(|(_, p)| zeros(p)).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, p)| zeros(p)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, m, v, t: 0, beta1, beta2, eps, weight_decay })
    }

    /// Decays the embedding tables (`emb.weight`, `pos_emb.weight`) as well as the matrices.
    pub fn decay_embeddings(mut self) -> Self {
        for (name, p) in &mut self.params {
            if name == "emb.weight" || name == "pos_emb.weight" {
                p.decay = true;
            }
        }
        self
    }

    /// Adam's bias corrections `1 - beta^t` of the moments at update `t` (counted from 1).
    fn bias_corrections(&self, t: usize) -> (f64, f64) {
        (1.0 - self.beta1.powi(t as i32), 1.0 - self.beta2.powi(t as i32))
    }

    /// The same step by the fused CUDA kernel (`kernels/adamw.cu`), or `None` where it does
    /// not apply (CPU, f64 or bf16 tensors).
    #[cfg(feature = "cuda")]
    fn fused_step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        clip: f64,
        kept: Option<&mut crate::kernels::adamw::KeptTable>,
    ) -> Result<Option<StepNorm>> {
        use crate::kernels::adamw;
        // (the backward may leave a gradient as a strided view; the kernel reads contiguous ones)
        let contiguous: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, p)| grads.get(p.var.as_tensor()).map(|g| g.contiguous()).transpose())
            .collect::<candle_core::Result<_>>()?;
        let slots: Vec<adamw::Slot> = (0..self.params.len())
            .filter_map(|i| {
                let p = &self.params[i].1;
                let grad = contiguous[i].as_ref()?;
                Some(adamw::Slot {
                    weight: p.var.as_tensor(),
                    m: &self.m[i],
                    v: &self.v[i],
                    grad,
                    decay: p.decay,
                    lr_scale: p.lr_scale as f32,
                })
            })
            .collect();
        if !adamw::applies(&slots) || !crate::kernels::enabled("adamw") {
            return Ok(None);
        }
        let t = self.t + 1;
        let (bc1, bc2) = self.bias_corrections(t);
        let hyper = adamw::Hyper {
            lr: lr as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            bc1: bc1 as f32,
            bc2: bc2 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            clip: clip as f32,
        };
        // The kernel skips the update when the norm is not finite, and so does `t`: that
        // happens only in a run that is about to stop when its caller reads the norm.
        let norm = adamw::step(&slots, &hyper, kept)?;
        self.t = t;
        Ok(Some(StepNorm(norm)))
    }

    /// The fused step with its table in `kept`, as a captured training step runs it (see
    /// [`crate::kernels::adamw::KeptTable`]); an error where the fused step does not apply.
    #[cfg(feature = "cuda")]
    pub fn step_kept(
        &mut self,
        grads: &GradStore,
        lr: f64,
        clip: f64,
        kept: &mut crate::kernels::adamw::KeptTable,
    ) -> Result<StepNorm> {
        match self.fused_step(grads, lr, clip, Some(kept))? {
            Some(norm) => Ok(norm),
            None => bail!(
                "the fused AdamW step does not apply (parameters not all f32 on one CUDA device, or switched off)"
            ),
        }
    }

    /// The bias corrections of the next update as f32, and the update count after it: what a
    /// replayed step's table is given ([`crate::kernels::adamw::KeptTable::upload`]).
    pub fn next_corrections(&self) -> (f32, f32, usize) {
        let (bc1, bc2) = self.bias_corrections(self.t + 1);
        (bc1 as f32, bc2 as f32, self.t + 1)
    }

    /// Global L2 norm of the gradients (f64 on the host), with one device synchronisation.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut squares = Vec::with_capacity(self.params.len());
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                squares.push(g.to_dtype(moment_dtype(g.dtype()))?.sqr()?.sum_all()?.to_dtype(DType::F64)?);
            }
        }
        if squares.is_empty() {
            return Ok(0.0);
        }
        Ok(Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
    }

    /// One update at learning rate `lr`, gradients scaled down to norm `clip` if larger
    /// (0 = no clipping). Returns the gradient norm before clipping. A non-finite norm
    /// changes no parameter: here it is an error at once; the fused GPU step leaves it in the
    /// returned norm, for the caller to find when it reads it ([`StepNorm::value`]).
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: f64) -> Result<StepNorm> {
        #[cfg(feature = "cuda")]
        if let Some(norm) = self.fused_step(grads, lr, clip, None)? {
            return Ok(norm);
        }
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Err(NonFiniteNorm(norm).into());
        }
        let scale = if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.t += 1;
        let (bc1, bc2) = self.bias_corrections(self.t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = &g.contiguous()?;
            let lr = lr * p.lr_scale;
            let decay = if p.decay { self.weight_decay } else { 0.0 };
            let rule = Rule { scale, lr, decay, beta1: self.beta1, beta2: self.beta2, eps: self.eps, bc1, bc2 };
            let w = p.var.as_tensor();
            let (w, m, v) = match cpu_update(w, g, &self.m[i], &self.v[i], &rule)? {
                Some(updated) => updated,
                None => tensor_update(w, g, &self.m[i], &self.v[i], &rule)?,
            };
            p.var.set(&w)?;
            (self.m[i], self.v[i]) = (m, v);
        }
        Ok(StepNorm(Tensor::new(norm, &candle_core::Device::Cpu)?))
    }

    /// Writes the moments and, for every parameter whose learning-rate multiple is not 1,
    /// that multiple (`lr_scale.NAME`, so a resumed run can check it trains every parameter
    /// at the rates it was trained at; files of models without multiples are unchanged).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = BTreeMap::new();
        for (i, (name, p)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
            if p.lr_scale != 1.0 {
                map.insert(format!("lr_scale.{name}"), Tensor::new(p.lr_scale, &candle_core::Device::Cpu)?);
            }
        }
        save_tensors(&map, path)
    }

    /// Loads [`AdamW::save`]'s moments; every name and shape must match, and so must every
    /// learning-rate multiple (absent: 1), listing every problem at once.
    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let device = self.m.first().map(|m| m.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let mut map = load_tensors(path, &device)?;
        // a NaN moment would surface only as a "diverged" run on the first resumed step
        check_finite(&map, &path.display().to_string())?;
        let mut problems = Vec::new();
        for (name, p) in &self.params {
            let saved = match map.remove(&format!("lr_scale.{name}")) {
                Some(s) => {
                    s.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(f64::NAN)
                }
                None => 1.0,
            };
            if saved != p.lr_scale {
                problems.push(format!(
                    "`{name}` was trained at {saved} x the learning rate, the model now asks for {}",
                    p.lr_scale
                ));
            }
        }
        for (i, (name, _)) in self.params.iter().enumerate() {
            for (slot, key) in [(&mut self.m[i], format!("m.{name}")), (&mut self.v[i], format!("v.{name}"))] {
                match map.remove(&key) {
                    Some(t) if t.dims() == slot.dims() => *slot = t.to_dtype(slot.dtype())?,
                    Some(t) => problems.push(format!("`{key}` has shape {:?}, expected {:?}", t.dims(), slot.dims())),
                    None => problems.push(format!("missing `{key}`")),
                }
            }
        }
        problems.extend(map.keys().map(|k| format!("unexpected `{k}`")));
        if !problems.is_empty() {
            bail!("optimizer state {} does not match the model:\n  {}", path.display(), problems.join("\n  "));
        }
        self.t = t;
        Ok(())
    }
}

/// One parameter's update: gradient scale (clipping), learning rate, decoupled weight decay
/// (0: none), Adam's constants and the step's bias corrections.
struct Rule {
    scale: f64,
    lr: f64,
    decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
}

/// The update as tensor operations, on any device and dtype (the moments' dtype: f32 for
/// bf16 parameters).
fn tensor_update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, rule: &Rule) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = m.dtype();
    let g = (g.to_dtype(dtype)? * rule.scale)?;
    let m = ((m * rule.beta1)? + (&g * (1.0 - rule.beta1))?)?;
    let v = ((v * rule.beta2)? + (g.sqr()? * (1.0 - rule.beta2))?)?;
    let update = ((&m / rule.bc1)? / ((&v / rule.bc2)?.sqrt()? + rule.eps)?)?;
    let mut w2 = w.to_dtype(dtype)?;
    if rule.decay > 0.0 {
        w2 = (w2 * (1.0 - rule.lr * rule.decay))?;
    }
    let w2 = (w2 - (update * rule.lr)?)?;
    Ok((w2.to_dtype(w.dtype())?, m, v))
}

/// The update of a CPU parameter in one pass over `(w, g, m, v)` (the tensor expression of
/// [`AdamW::step`] walks them about fifteen times), or `None` where it does not apply
/// (another device, or the parameter, gradient and moments not all f32 or all f64).
fn cpu_update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, rule: &Rule) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let same = [g, m, v].iter().all(|t| t.dtype() == w.dtype() && t.dims() == w.dims());
    if !w.device().is_cpu() || !same {
        return Ok(None);
    }
    let g = g.contiguous()?;
    Ok(match w.dtype() {
        DType::F32 => Some(cpu_update_as::<f32>(w, &g, m, v, rule)?),
        DType::F64 => Some(cpu_update_as::<f64>(w, &g, m, v, rule)?),
        _ => None,
    })
}

fn cpu_update_as<T: crate::cpu::Real>(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    rule: &Rule,
) -> Result<(Tensor, Tensor, Tensor)> {
    let names = ["AdamW: the parameter", "AdamW: its gradient", "AdamW: its first moment", "AdamW: its second moment"];
    // in T's arithmetic, one pass per output (each vectorises): the moments, then the weight
    let c = |x: f64| T::narrow(x);
    let (b1, b2, scale) = (c(rule.beta1), c(rule.beta2), c(rule.scale));
    let (inv_bc1, inv_sqrt_bc2, eps) = (c(1.0 / rule.bc1), c(1.0 / rule.bc2.sqrt()), c(rule.eps));
    let (lr, shrink) = (c(rule.lr), c(1.0 - rule.lr * rule.decay));
    let k = Coefficients { b1, b2, scale, inv_bc1, inv_sqrt_bc2, eps, lr, shrink };
    let (w2, m2, v2) = crate::cpu::with_slices::<T, _>(&[w, g, m, v], &names, |d| {
        let n = d[0].len();
        let (mut w2, mut m2, mut v2) = (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
        adamw_slices(d[0], d[1], d[2], d[3], &mut w2, &mut m2, &mut v2, k);
        (w2, m2, v2)
    })?;
    let dev = candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(w2, w.shape(), &dev)?,
        Tensor::from_vec(m2, w.shape(), &dev)?,
        Tensor::from_vec(v2, w.shape(), &dev)?,
    ))
}

/// The constants of one parameter's AdamW update, in its arithmetic.
#[derive(Clone, Copy)]
struct Coefficients<T> {
    b1: T,
    b2: T,
    scale: T,
    inv_bc1: T,
    inv_sqrt_bc2: T,
    eps: T,
    lr: T,
    shrink: T,
}

crate::cpu::vectorised! {
    /// The moments `m2`, `v2` and the weight `w2` after one update of `w` with gradient `g`.
    #[allow(clippy::too_many_arguments)]
    fn adamw_slices<T: crate::cpu::Real>(w: &[T], g: &[T], m: &[T], v: &[T], w2: &mut [T], m2: &mut [T], v2: &mut [T], k: Coefficients<T>) -> () {
        let n = w2.len();
        let (w, g, m, v, m2, v2) = (&w[..n], &g[..n], &m[..n], &v[..n], &mut m2[..n], &mut v2[..n]);
        for i in 0..n {
            let gs = g[i] * k.scale;
            m2[i] = k.b1 * m[i] + (T::one() - k.b1) * gs;
            v2[i] = k.b2 * v[i] + (T::one() - k.b2) * gs * gs;
            w2[i] = w[i] * k.shrink - k.lr * (m2[i] * k.inv_bc1) / (v2[i].sqrt() * k.inv_sqrt_bc2 + k.eps);
        }
    }
}

/// f64 parameters (the gradient tests) keep f64 moments; everything else keeps f32.
fn moment_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Linear warm-up from 0 to `lr` over `warmup` steps, cosine decay to `min_lr` at `decay`
/// steps, `min_lr` after (nanoGPT's schedule).
pub fn learning_rate(step: usize, lr: f64, min_lr: f64, warmup: usize, decay: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / (warmup + 1) as f64;
    }
    if step >= decay {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (decay - warmup).max(1) as f64;
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let f = |s| learning_rate(s, 1e-3, 1e-4, 100, 2000);
        assert!(f(0) < f(50) && f(50) < f(99));
        assert!((f(100) - 1e-3).abs() < 1e-12);
        assert!(f(1000) < f(500));
        assert!((f(2000) - 1e-4).abs() < 1e-12 && (f(5000) - 1e-4).abs() < 1e-12);
        assert!((f(1999) - 1e-4).abs() < 1e-8);
    }

    /// With (nearly) zero gradients the update is pure decay: the matrix shrinks by `1 - lr wd`, the
    /// embedding only when `decay_embeddings` asks for it.
    #[test]
    fn embeddings_decay_only_when_asked() -> Result<()> {
        use crate::params::ParamBuilder;
        use candle_core::Device;
        let pb = ParamBuilder::new(0, &Device::Cpu, DType::F32);
        let emb = pb.normal_no_decay("emb.weight", &[4, 3], 0.02)?;
        let w = pb.normal("w", &[3, 3], 0.02)?;
        let store = pb.into_store();
        // a tiny gradient (candle prunes a product by exactly zero from the graph): the
        // update, about 1e-22, vanishes beside the weights
        let loss = ((emb.sum_all()? + w.sum_all()?)? * 1e-30)?;
        let grads = loss.backward()?;
        let shrink = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok(a.sum_all()?.to_scalar::<f32>()? / b.sum_all()?.to_scalar::<f32>()?)
        };
        for (ask, emb_factor) in [(false, 1.0f32), (true, 0.9)] {
            let (emb0, w0) = (emb.copy()?, w.copy()?);
            let mut opt = AdamW::new(&store, 0.9, 0.99, 1e-8, 0.1)?;
            if ask {
                opt = opt.decay_embeddings();
            }
            opt.step(&grads, 1.0, 0.0)?;
            let emb1 = store.tensors()["emb.weight"].clone();
            let w1 = store.tensors()["w"].clone();
            assert!(
                (shrink(&w1, &w0)? - 0.9).abs() < 1e-5,
                "w shrank by {} (decay_embeddings = {ask})",
                shrink(&w1, &w0)?
            );
            assert!((shrink(&emb1, &emb0)? - emb_factor).abs() < 1e-5, "decay_embeddings = {ask}");
            // undo, so the second round starts from the same weights
            for (name, t) in [("emb.weight", &emb0), ("w", &w0)] {
                store.vars().into_iter().find(|(n, _)| n == name).unwrap().1.var.set(t)?;
            }
        }
        Ok(())
    }

    /// A parameter with multiple `s` steps and decays as a PyTorch group of rate `s lr`: on the
    /// first step Adam's update is sign(g) (|g| >> eps), so `w1 = w0 (1 - s lr wd) - s lr`.
    /// Its moments are the same as at multiple 1 (only the rate differs).
    #[test]
    fn learning_rate_multiples_scale_the_step_and_the_decay() -> Result<()> {
        use crate::params::ParamBuilder;
        use candle_core::Device;
        let pb = ParamBuilder::new(0, &Device::Cpu, DType::F32);
        let scales = [1.0, 0.25, 0.0, 3.0];
        let ws: Vec<Tensor> = scales
            .iter()
            .enumerate()
            .map(|(i, &s)| pb.with_lr_scale(s)?.normal(&format!("w{i}"), &[2, 3], 0.5))
            .collect::<anyhow::Result<_>>()?;
        assert!(pb.with_lr_scale(-1.0).is_err() && pb.with_lr_scale(f64::NAN).is_err());
        let store = pb.into_store();
        let before: Vec<Vec<f32>> =
            ws.iter().map(|w| w.flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?;
        let loss = ws.iter().map(|w| w.sum_all()).reduce(|a, b| a? + b?).unwrap()?;
        let (lr, wd) = (0.01, 0.1);
        AdamW::new(&store, 0.9, 0.99, 1e-8, wd)?.step(&loss.backward()?, lr, 0.0)?;
        for (i, &s) in scales.iter().enumerate() {
            let after: Vec<f32> = store.tensors()[&format!("w{i}")].flatten_all()?.to_vec1()?;
            for (a, b) in after.iter().zip(&before[i]) {
                let want = *b as f64 * (1.0 - s * lr * wd) - s * lr;
                assert!((*a as f64 - want).abs() < 1e-6, "multiple {s}: {a} vs {want}");
            }
        }
        Ok(())
    }

    /// The one-pass CPU update is the tensor expression's, element for element (f64, with
    /// clipping and decay, over three steps of evolving moments).
    #[test]
    fn cpu_update_is_the_tensor_rule() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        let mut ours = (Tensor::randn(0f64, 1.0, (7, 5), &dev)?, Tensor::zeros((7, 5), DType::F64, &dev)?);
        let mut theirs = (ours.0.clone(), ours.1.clone(), ours.1.clone());
        let mut v = ours.1.clone();
        for t in 1..=3 {
            let g = Tensor::randn(0f64, 2.0, (7, 5), &dev)?;
            let rule = Rule {
                scale: 0.7,
                lr: 0.01,
                decay: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                bc1: 1.0 - 0.9f64.powi(t),
                bc2: 1.0 - 0.99f64.powi(t),
            };
            let (w1, m1, v1) =
                cpu_update(&ours.0, &g, &ours.1, &v, &rule)?.expect("f64 on the CPU takes the one-pass update");
            theirs = tensor_update(&theirs.0, &g, &theirs.1, &theirs.2, &rule)?;
            (ours, v) = ((w1, m1), v1);
            for (a, b) in [(&ours.0, &theirs.0), (&ours.1, &theirs.1), (&v, &theirs.2)] {
                let err = crate::testing::max_abs_diff(a, b)?;
                assert!(err < 1e-15, "step {t}: {err}");
            }
        }
        // bf16 (the GPU's mixed precision) is left to the tensor expression
        let w = ours.0.to_dtype(DType::BF16)?;
        let rule = Rule { scale: 1.0, lr: 0.01, decay: 0.0, beta1: 0.9, beta2: 0.99, eps: 1e-8, bc1: 0.1, bc2: 0.01 };
        assert!(cpu_update(&w, &w, &ours.1.to_dtype(DType::F32)?, &v.to_dtype(DType::F32)?, &rule)?.is_none());
        Ok(())
    }

    /// The optimizer file records multiples other than 1; loading it into a model that asks
    /// for other multiples is an error naming the parameter, the same ones load.
    #[test]
    fn saved_learning_rate_multiples_must_match_on_load() -> Result<()> {
        use crate::params::ParamBuilder;
        use candle_core::Device;
        let build = |scale: f64| -> Result<ParamStore> {
            let pb = ParamBuilder::new(0, &Device::Cpu, DType::F32);
            pb.normal("a", &[2], 0.5)?;
            pb.with_lr_scale(scale)?.normal("z", &[3], 0.5)?;
            Ok(pb.into_store())
        };
        let dir = std::env::temp_dir().join(format!("altformers-lr-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("optimizer.safetensors");
        AdamW::new(&build(0.5)?, 0.9, 0.99, 1e-8, 0.1)?.save(&path)?;
        AdamW::new(&build(0.5)?, 0.9, 0.99, 1e-8, 0.1)?.load(&path, 3)?;
        let err = AdamW::new(&build(1.0)?, 0.9, 0.99, 1e-8, 0.1)?.load(&path, 3).unwrap_err().to_string();
        assert!(err.contains("`z` was trained at 0.5"), "{err}");
        // and the other way: saved at 1 (not written), loaded at 0.5
        AdamW::new(&build(1.0)?, 0.9, 0.99, 1e-8, 0.1)?.save(&path)?;
        let err = AdamW::new(&build(0.5)?, 0.9, 0.99, 1e-8, 0.1)?.load(&path, 3).unwrap_err().to_string();
        assert!(err.contains("`z` was trained at 1"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
