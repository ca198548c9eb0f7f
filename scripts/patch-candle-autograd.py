#!/usr/bin/env python3
"""Patches a copy of candle-core's src/backprop.rs (scripts/cuda-env.sh calls it on the copy
it builds the CUDA binary with) so that a node's first gradient is stored as it is instead of
being added to a fresh tensor of zeros.

candle's backward accumulates every gradient as

    let sum_grad = grads.or_insert(arg)?;      // a new zero tensor the first time
    *sum_grad = sum_grad.add(&arg_grad)?;      // read both, write a third

so every node's gradient costs a memset and a full read-read-write pass even when it has one
consumer (almost always). On the H200 that was 4 x 0.57 ms of the 7.5 ms retention fwd+bwd
(bench/results/2026-11-29-h200-retention-tc/ncu). PyTorch stores the first gradient.

The rewrite turns exactly that two-line pattern into `grads.accumulate(arg, &arg_grad)?`,
where `accumulate` adds to an existing gradient, and otherwise stores the new one as it
comes if it has the node's shape and dtype, falling back to the original zeros-plus-add (with
its errors) if not. Results are identical: 0 + g == g exactly. Every other accumulation form
(sub, index_add, to_device, ...) is left as it was.

The first gradient is stored as it comes, a strided view where the backward made one (a
transpose's): the sum made every such gradient contiguous at every node, so a gradient
passing through two transposes was copied twice (the attention heads' and the weights'
transposes: 14 copies per layer of a GPT, about a quarter of a GPT-2-small training step on
the H200; bench/results/2026-12-03-h200-train-speed). Not every backward rule of candle reads
any strides (scatter-add and some products refuse them), so the second rewrite makes a
node's gradient contiguous when the node is taken up, unless the node is a view (reshape,
transpose, permute, copy), whose backward only makes another view: a gradient goes through a
chain of views uncopied, and is copied at most once, where a computation needs it. The
optimizer makes the parameters' gradients contiguous itself.

The third rewrite lets the program sum a node's gradients: `GRADIENT_SUM` (a function
pointer the program may set once) is tried before candle's `add`. altformers' CUDA build sets
it to a kernel with 16-byte accesses for contiguous f32/bf16 tensors (candle's bf16 add moves
two bytes a thread: about half the bandwidth, 73 sums of [B, T, D] per GPT-2-small step).

    patch-candle-autograd.py PATH/TO/candle-core/src/backprop.rs
Idempotent; fails loudly if candle's code no longer has the shapes it expects.
"""
import re
import sys

path = sys.argv[1]
src = open(path).read()
MARK = "fn accumulate("
SUM_OLD = """            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                *entry.get_mut() = sum;
            }
"""
SUM_NEW = """            Entry::Occupied(mut entry) => {
                // (altformers patch) the program's sum where it has one for these tensors
                let sum = match GRADIENT_SUM.get().map(|f| f(entry.get(), grad)).transpose()?.flatten() {
                    Some(sum) => sum,
                    None => entry.get().add(grad)?,
                };
                *entry.get_mut() = sum;
            }
"""
HOOK = """/// (altformers patch) The sum of two gradients of one tensor, where the program sets a faster
/// one than `add` for some tensors (`Ok(None)`: not for these, `add` runs).
pub static GRADIENT_SUM: std::sync::OnceLock<fn(&Tensor, &Tensor) -> Result<Option<Tensor>>> =
    std::sync::OnceLock::new();

"""


def add_sum_hook(src):
    """The third rewrite (idempotent): GRADIENT_SUM tried before add."""
    if "GRADIENT_SUM" in src:
        return src
    if src.count(SUM_OLD) != 1:
        sys.exit(f"patch-candle-autograd: the gradient sum of accumulate() not found in {path}")
    src = src.replace(SUM_OLD, SUM_NEW)
    anchor = "impl GradStore {"
    if src.count(anchor) != 1:
        sys.exit(f"patch-candle-autograd: impl GradStore not found in {path}")
    return src.replace(anchor, HOOK + anchor)


if MARK in src:
    if "views pass a strided gradient on" not in src:
        sys.exit(f"patch-candle-autograd: {path} was patched by an earlier version of this script: remove it "
                 "(scripts/cuda-env.sh copies candle-core afresh)")
    if "GRADIENT_SUM" in src:
        print(f"patch-candle-autograd: {path} already patched")
    else:
        open(path, "w").write(add_sum_hook(src))
        print(f"patch-candle-autograd: {path}: the gradient-sum hook added")
    sys.exit(0)

pattern = re.compile(
    r"let (\w+) = grads\.or_insert\((\w+)\)\?;\n\s*\*\1 = \1\.add\(&(\w+)\)\?(;?)"
)
src, count = pattern.subn(lambda m: f"grads.accumulate({m.group(2)}, &{m.group(3)})?{m.group(4)}", src)
if count < 20:
    sys.exit(f"patch-candle-autograd: only {count} accumulations matched in {path}; candle changed?")

anchor = "    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,\n"
if src.count(anchor) != 1:
    sys.exit(f"patch-candle-autograd: GradStore::or_insert not found in {path}")
method = '''    /// (altformers patch) Adds `grad` to the gradient of `tensor`, storing it as the first
    /// gradient when there is none yet (instead of adding it to zeros).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                *entry.get_mut() = sum;
            }
            Entry::Vacant(entry) => {
                let first = if grad.shape() == tensor.shape() && grad.dtype() == tensor.dtype() {
                    grad.clone()
                } else {
                    tensor.zeros_like()?.add(grad)?
                };
                entry.insert(first);
            }
        }
        Ok(())
    }

'''
src = src.replace(anchor, method + anchor)

# A node's gradient contiguous when it is taken up, unless the node is a view.
taken = """            let grad = if do_not_detach { grad } else { grad.detach() };
"""
if src.count(taken) != 1:
    sys.exit(f"patch-candle-autograd: the backward's gradient take-up not found in {path}")
src = src.replace(taken, taken + """            // (altformers patch) views pass a strided gradient on; other ops get it contiguous
            let grad = match node.op() {
                Some(Op::Reshape(_) | Op::Transpose(..) | Op::Permute(..) | Op::Copy(_)) => grad,
                _ => grad.contiguous()?,
            };
""")
src = add_sum_hook(src)
open(path, "w").write(src)
print(f"patch-candle-autograd: {count} accumulations in {path} now store the first gradient")
