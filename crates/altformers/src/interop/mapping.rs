//! One table per format pairs each of its tensor names with ours: the importer reads it one
//! way, the exporter the other, so the two cannot disagree.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

use super::checked::Expected;

/// One tensor under both names.
pub struct Pair {
    /// Its name in the other format's file.
    pub theirs: String,
    /// Its name among our parameters.
    pub ours: String,
    /// Its shape in their file.
    pub shape: Vec<usize>,
    /// Stored transposed there (GPT-2's `Conv1D`: `[in, out]` where our linear layers hold
    /// `[out, in]`).
    pub transposed: bool,
    /// Where our model has no such parameter (a bias-free model, no learned positions), their
    /// tensor is zeros: the same function.
    pub zero_if_absent: bool,
}

/// Every tensor of a format, and the names its files may hold besides (buffers) that are
/// skipped.
pub struct NameMap {
    pub pairs: Vec<Pair>,
    pub skippable: fn(&str) -> bool,
}

impl NameMap {
    pub fn expected(&self) -> Expected {
        Expected {
            shapes: self.pairs.iter().map(|p| (p.theirs.clone(), p.shape.clone())).collect(),
            skippable: self.skippable,
        }
    }

    /// Their tensors (as [`super::checked::load`] returns them) under our names and layout.
    pub fn to_ours(&self, mut theirs: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        let mut ours = BTreeMap::new();
        for p in &self.pairs {
            let Some(t) = theirs.remove(&p.theirs) else { bail!("tensor `{}` was not loaded", p.theirs) };
            ours.insert(p.ours.clone(), if p.transposed { t.t()?.contiguous()? } else { t });
        }
        Ok(ours)
    }

    /// Our tensors under their names and layout, in f32.
    pub fn to_theirs(&self, ours: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        let mut theirs = BTreeMap::new();
        for p in &self.pairs {
            let t = match ours.get(&p.ours) {
                Some(t) => {
                    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                    if p.transposed {
                        t.t()?.contiguous()?
                    } else {
                        t
                    }
                }
                None if p.zero_if_absent => Tensor::zeros(p.shape.as_slice(), DType::F32, &Device::Cpu)?,
                None => bail!("our model has no parameter `{}` (exported as `{}`)", p.ours, p.theirs),
            };
            if t.dims() != p.shape.as_slice() {
                bail!("our `{}` has shape {:?}; `{}` needs {:?}", p.ours, t.dims(), p.theirs, p.shape);
            }
            theirs.insert(p.theirs.clone(), t);
        }
        Ok(theirs)
    }
}

/// Builds a [`NameMap`]'s pairs with little noise: `pair(theirs, ours, shape)` and variants.
#[derive(Default)]
pub struct Pairs(pub Vec<Pair>);

impl Pairs {
    pub fn same(&mut self, theirs: impl Into<String>, ours: impl Into<String>, shape: &[usize]) {
        self.push(theirs.into(), ours.into(), shape, false, false);
    }

    /// A `Conv1D` weight: `[in, out]` there, `[out, in]` here.
    pub fn transposed(&mut self, theirs: impl Into<String>, ours: impl Into<String>, shape: &[usize]) {
        self.push(theirs.into(), ours.into(), shape, true, false);
    }

    /// A tensor our model may lack (then exported as zeros).
    pub fn optional(&mut self, theirs: impl Into<String>, ours: impl Into<String>, shape: &[usize]) {
        self.push(theirs.into(), ours.into(), shape, false, true);
    }

    /// A layer norm `name.{weight, bias}` (the bias optional here).
    pub fn layer_norm(&mut self, theirs: &str, ours: &str, width: usize) {
        self.same(format!("{theirs}.weight"), format!("{ours}.weight"), &[width]);
        self.optional(format!("{theirs}.bias"), format!("{ours}.bias"), &[width]);
    }

    fn push(&mut self, theirs: String, ours: String, shape: &[usize], transposed: bool, zero_if_absent: bool) {
        self.0.push(Pair { theirs, ours, shape: shape.to_vec(), transposed, zero_if_absent });
    }
}
