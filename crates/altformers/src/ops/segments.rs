//! The backward pass in segments, so the gradients' exchange between GPUs can start before
//! it ends (PyTorch's DistributedDataParallel reduces a bucket as soon as its gradients are
//! ready, from autograd hooks). candle's `Tensor::backward` computes every gradient in one
//! call and has no hooks; instead the forward pass is cut at a few block boundaries, where
//! the activation continues as a fresh variable, and the backward runs segment by segment,
//! top down: the loss's, giving the gradient of the topmost cut's variable; that gradient
//! handed to the activation it was cut from ([`Inject`]), giving the next; and so on. After
//! segment `s` every parameter that no segment below reaches ([`homes`]) has its final
//! gradient. The sum over the segments is the whole backward's, whatever paths bypass a cut
//! (backpropagation is linear). Each cut costs a copy of its activation (candle makes a
//! variable by copying) and one more accumulation of its gradient.
//!
//! A stack of blocks calls [`boundary`] after each block; outside [`record`] it does nothing.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
use std::cell::RefCell;

/// Where a forward pass was cut: `output`, the activation as computed (the end of the
/// segment below), and `input`, the variable the pass continued from (above).
pub struct Cut {
    pub output: Tensor,
    pub input: Var,
}

/// A recording in progress on this thread: cut after every `every` blocks.
struct Recording {
    every: usize,
    cuts: Vec<Cut>,
}

thread_local! {
    static RECORDING: RefCell<Option<Recording>> = const { RefCell::new(None) };
}

/// Runs `forward` with the stacks' activations cut after every `every` blocks (not after a
/// stack's last); returns its result and the cuts in forward order.
pub fn record<R>(every: usize, forward: impl FnOnce() -> R) -> (R, Vec<Cut>) {
    /// Ends the recording however `forward` ends (a panic unwinding through a CUDA-graph
    /// capture is caught there; later passes on this thread must not go on cutting).
    struct Restore(Option<Option<Recording>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                RECORDING.with(|r| r.replace(previous));
            }
        }
    }
    let previous = RECORDING.with(|r| r.replace(Some(Recording { every: every.max(1), cuts: Vec::new() })));
    let mut restore = Restore(Some(previous));
    let out = forward();
    let previous = restore.0.take().expect("not restored yet");
    let cuts = RECORDING.with(|r| r.replace(previous)).map(|r| r.cuts).unwrap_or_default();
    (out, cuts)
}

/// `x`, the output of block `i` of a stack of `n`: while recording, cut there when `i + 1` is
/// a multiple of the recording's `every` and below `n` (the pass continues from a variable
/// of the same values); otherwise `x` itself.
pub fn boundary(x: Tensor, i: usize, n: usize) -> Result<Tensor> {
    RECORDING.with(|r| {
        let mut r = r.borrow_mut();
        match r.as_mut() {
            Some(rec) if (i + 1).is_multiple_of(rec.every) && i + 1 < n => {
                let input = Var::from_tensor(&x.detach())?;
                let next = input.as_tensor().clone();
                rec.cuts.push(Cut { output: x, input });
                Ok(next)
            }
            _ => Ok(x),
        }
    })
}

/// For each of `vars`, the lowest segment whose graph reaches it (segment `s` lies between
/// cut `s - 1` and cut `s`; the last ends at `top`), or `None` where none does: after the
/// backward of that segment its gradient is final.
pub fn homes<'a>(top: &Tensor, cuts: &[Cut], vars: impl IntoIterator<Item = &'a Tensor>) -> Vec<Option<usize>> {
    let ends: Vec<&Tensor> = cuts.iter().map(|c| &c.output).chain(std::iter::once(top)).collect();
    let mut lowest = std::collections::HashMap::new();
    for (s, end) in ends.iter().enumerate().rev() {
        for node in end.sorted_nodes() {
            if node.is_variable() {
                lowest.insert(node.id(), s);
            }
        }
    }
    vars.into_iter().map(|v| lowest.get(&v.id()).copied()).collect()
}

/// The backward pass of `top` over `cuts`, one segment per [`Backward::next_segment`], top first.
pub struct Backward {
    top: Option<Tensor>,
    cuts: Vec<Cut>,
    /// The gradients of the segments done, summed.
    total: GradStore,
}

impl Backward {
    pub fn new(top: Tensor, cuts: Vec<Cut>) -> Backward {
        Backward { top: Some(top), cuts, total: GradStore::default() }
    }

    /// The backward adding each segment's gradients to `earlier` (gradient accumulation: the
    /// step's micro-batches before this one), so the sums [`Backward::next_segment`] reports are the
    /// step's.
    pub fn adding_to(mut self, earlier: GradStore) -> Backward {
        self.total = earlier;
        self
    }

    /// The number of segments.
    pub fn segments(&self) -> usize {
        self.cuts.len() + 1
    }

    /// Runs the next segment's backward (the top one first): its index and the gradients of
    /// every segment done so far, summed; `None` after the lowest.
    pub fn next_segment(&mut self) -> Result<Option<(usize, &GradStore)>> {
        let root = match self.top.take() {
            Some(top) => Some(top),
            None => match self.cuts.pop() {
                // the cut's variable has its whole gradient: every segment reaching it is above
                Some(cut) => match self.total.remove(cut.input.as_tensor()) {
                    Some(g) => Some(cut.output.apply_op1(Inject(g))?),
                    None => Some(cut.output.zeros_like()?.sum_all()?), // nothing above used it
                },
                None => return Ok(None),
            },
        };
        let root = root.expect("a root");
        let grads = root.backward()?;
        self.total.extend(grads)?;
        Ok(Some((self.cuts.len(), &self.total)))
    }

    /// The whole backward's gradients (running what is left).
    pub fn finish(mut self) -> Result<GradStore> {
        while self.next_segment()?.is_some() {}
        Ok(self.total)
    }
}

/// A scalar (zero) whose backward hands `0`, a gradient of the argument's shape, to the
/// argument: the root of a segment's backward, its activation's gradient from above.
struct Inject(Tensor);

impl CustomOp1 for Inject {
    fn name(&self) -> &'static str {
        "segment-gradient"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((s.device().zeros_impl(&Shape::from(()), candle_core::DType::F32)?, Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use candle_core::{DType, Device};

    /// The backward in segments (cut after every block) gives every parameter the gradient of
    /// the one-call backward, for each causal model of the registry (stacks, MegaByte's two
    /// stacks, Hourglass's levels, the reversible stack), in f64; the cuts were taken where
    /// the model has stacks, and the homes name the lowest segment reaching each parameter.
    #[test]
    fn segments_sum_to_the_whole_backward() -> anyhow::Result<()> {
        let tokens =
            Tensor::new((0..24u32).map(|i| (i * 37) % 251).collect::<Vec<_>>(), &Device::Cpu)?.reshape((2, 12))?;
        let mut cut_somewhere = 0;
        for arch in crate::registry::ARCHITECTURES.iter().filter(|a| a.causal) {
            let sets = ["model.width=16", "model.depth=3", "model.heads=2", "model.context=12"];
            let cfg = crate::registry::config(arch.name, &crate::config::Overrides::sets(&sets))?;
            let model = Model::new(&cfg.model, 1, &Device::Cpu, DType::F64)?;
            let loss = |logits: &Tensor| Model::loss(&logits.narrow(1, 0, 11)?, &tokens.narrow(1, 1, 11)?);
            let whole = loss(&model.forward(&tokens, None)?)?.backward()?;
            let (logits, cuts) = record(1, || model.forward(&tokens, None));
            let top = loss(&logits?)?;
            cut_somewhere += usize::from(!cuts.is_empty());
            let vars = model.params.vars();
            let homes = homes(&top, &cuts, vars.iter().map(|(_, p)| p.var.as_tensor()));
            let mut backward = Backward::new(top, cuts);
            let n = backward.segments();
            let mut seen = Vec::new();
            while let Some((s, done)) = backward.next_segment()? {
                seen.push(s);
                // a parameter at home in this segment has its final gradient already
                for ((name, p), home) in vars.iter().zip(&homes) {
                    if *home == Some(s) {
                        let (g, w) = (done.get(p.var.as_tensor()), whole.get(p.var.as_tensor()));
                        let gap = (g.expect(name) - w.expect(name))?.abs()?.max_all()?.to_scalar::<f64>()?;
                        assert!(gap < 1e-12, "{}: {name} after its segment {s} differs by {gap}", arch.name);
                    }
                }
            }
            assert_eq!(seen, (0..n).rev().collect::<Vec<_>>(), "{}", arch.name);
            let segmented = backward.finish()?;
            for ((name, p), home) in vars.iter().zip(&homes) {
                let (g, w) = (segmented.get(p.var.as_tensor()), whole.get(p.var.as_tensor()));
                assert_eq!(g.is_some(), w.is_some(), "{}: {name}", arch.name);
                assert_eq!(home.is_some(), w.is_some(), "{}: {name}'s home", arch.name);
                if let (Some(g), Some(w)) = (g, w) {
                    let gap = (g - w)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(gap < 1e-12, "{}: {name} differs by {gap}", arch.name);
                }
            }
        }
        assert!(cut_somewhere >= 10, "only {cut_somewhere} models were cut");
        Ok(())
    }

    /// Outside a recording a boundary is the activation itself; inside, cuts fall after every
    /// `every` blocks but never after a stack's last.
    #[test]
    fn boundaries_cut_only_while_recording() -> Result<()> {
        let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        assert_eq!(boundary(x.clone(), 0, 4)?.id(), x.id());
        let ((), cuts) = record(2, || {
            for i in 0..6 {
                boundary(x.clone(), i, 6).expect("a boundary");
            }
        });
        assert_eq!(cuts.len(), 2, "after blocks 2 and 4 of 6");
        assert!(cuts.iter().all(|c| c.output.id() == x.id() && c.input.as_tensor().id() != x.id()));
        assert_eq!(boundary(x.clone(), 1, 4)?.id(), x.id(), "the recording ended");
        Ok(())
    }
}
