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
where `accumulate` adds to an existing gradient, and otherwise stores the new one if it has
the node's shape and dtype (made contiguous, as the sum was), falling back to the original
zeros-plus-add (with its errors) if not. Results are identical: 0 + g == g exactly. Every
other accumulation form (sub, index_add, to_device, ...) is left as it was.

    patch-candle-autograd.py PATH/TO/candle-core/src/backprop.rs
Idempotent; fails loudly if candle's code no longer has the shapes it expects.
"""
import re
import sys

path = sys.argv[1]
src = open(path).read()
MARK = "fn accumulate("
if MARK in src:
    print(f"patch-candle-autograd: {path} already patched")
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
                    grad.contiguous()?
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
open(path, "w").write(src)
print(f"patch-candle-autograd: {count} accumulations in {path} now store the first gradient")
