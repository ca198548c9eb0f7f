//! Values computed outside autograd, given a backward written by hand: the op's forward
//! passes the precomputed values through, and its backward hands gradients to two other
//! tensors, the ones the values were computed from. Reformer's reversible layers (the forward
//! run without keeping activations, the backward recomputing them layer by layer) and
//! AFT-full's blocked form (the forward in key blocks, the backward from its saved sums) are
//! built this way.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The hand-written backward of [`with_backward`].
pub trait Gradients: Send + Sync {
    /// The op's name in candle's errors.
    fn name(&self) -> &'static str;

    /// The gradients of `a` and `b` from the op's output `values` and its gradient `grad`.
    fn of(&self, values: &Tensor, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// `values`, as the output of an op of `a` and `b` whose backward is `gradients`. `values`
/// must be one contiguous block from its storage's start (a fresh `.contiguous()` result):
/// the op's output is a copy of that storage.
pub fn with_backward(values: &Tensor, a: &Tensor, b: &Tensor, gradients: impl Gradients + 'static) -> Result<Tensor> {
    values.apply_op3(a, b, PassThrough(gradients))
}

struct PassThrough<G>(G);

/// The forward on any device: the first argument's values, as they are.
fn pass_through<S: candle_core::backend::BackendStorage>(values: &S, layout: &Layout) -> Result<(S, Shape)> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("an op passing precomputed values through needs them as a fresh contiguous tensor");
    }
    Ok((values.try_clone(layout)?, layout.shape().clone()))
}

impl<G: Gradients> CustomOp3 for PassThrough<G> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        values: &CpuStorage,
        layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(values, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        values: &candle_core::CudaStorage,
        layout: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(values, layout)
    }

    fn bwd(
        &self,
        _: &Tensor,
        a: &Tensor,
        b: &Tensor,
        values: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = self.0.of(values, a, b, grad)?;
        Ok((None, da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The values pass through unchanged; the backward's gradients reach `a` and `b` (here
    /// the backward of `values = a * b`), none the values themselves; a view that does not
    /// start its storage is refused.
    #[test]
    fn values_pass_through_and_the_gradients_reach_the_inputs() -> Result<()> {
        struct Product;
        impl Gradients for Product {
            fn name(&self) -> &'static str {
                "product"
            }
            fn of(
                &self,
                _: &Tensor,
                a: &Tensor,
                b: &Tensor,
                grad: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                Ok((Some((grad * b)?), Some((grad * a)?)))
            }
        }
        let a = Var::new(&[1.0f64, 2.0, 3.0], &Device::Cpu)?;
        let b = Var::new(&[4.0f64, 5.0, 6.0], &Device::Cpu)?;
        let values = (a.as_tensor() * b.as_tensor())?.detach().contiguous()?;
        let y = with_backward(&values, a.as_tensor(), b.as_tensor(), Product)?;
        assert_eq!(y.to_vec1::<f64>()?, vec![4.0, 10.0, 18.0]);
        let grads = (&y * 2.0)?.sum_all()?.backward()?;
        assert_eq!(grads.get(a.as_tensor()).unwrap().to_vec1::<f64>()?, vec![8.0, 10.0, 12.0]);
        assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f64>()?, vec![2.0, 4.0, 6.0]);
        let view = Tensor::new(&[0.0f64, 1.0, 2.0, 3.0], &Device::Cpu)?.narrow(0, 1, 3)?;
        let err = with_backward(&view, a.as_tensor(), b.as_tensor(), Product).unwrap_err().to_string();
        assert!(err.contains("fresh contiguous tensor"), "{err}");
        Ok(())
    }
}
