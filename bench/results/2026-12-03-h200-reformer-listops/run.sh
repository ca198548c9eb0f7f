#!/usr/bin/env bash
# Why reformer-encoder stays at the majority class (17%) on ListOps at LRA's lengths on the
# H200 while it reached 34.6% at the CPU preset's short lengths: three runs at once on one GPU
# (carry ".gpu" from scripts/gpu-package.sh; $OUT set):
#   short-f32   configs/compare-listops-cpu.toml (32-128 tokens) on the GPU, f32
#   short-bf16  the same in bf16
#   long-f32    configs/compare-listops-gpu.toml (501-1999 tokens) in f32, STEPS steps
set -uo pipefail
bin="bash .gpu/run.sh"
$bin models > /dev/null
mkdir -p /tmp/rl
python3 - <<'PY'
import re
cpu = open("configs/compare-listops-cpu.toml").read()
open("/tmp/rl/short-f32.toml", "w").write(cpu)
open("/tmp/rl/short-bf16.toml", "w").write(cpu.replace("[listops]\n", "[listops]\ndtype = \"bf16\"\n", 1))
gpu = open("configs/compare-listops-gpu.toml").read()
steps = __import__("os").environ.get("STEPS", "600")
gpu = gpu.replace('dtype = "bf16"', 'dtype = "f32"', 1)
gpu = re.sub(r"(?m)^steps = \d+", f"steps = {steps}", gpu)
gpu = re.sub(r"(?m)^decay_steps = \d+", f"decay_steps = {steps}", gpu)
gpu = re.sub(r"(?m)^warmup_steps = 150", f"warmup_steps = {int(steps) // 10}", gpu)
gpu = re.sub(r"(?m)^eval_every = 500", "eval_every = 200", gpu)
open("/tmp/rl/long-f32.toml", "w").write(gpu)
PY
for v in short-f32 short-bf16 long-f32; do
  timeout "${LIMIT:-330}" $bin compare --preset /tmp/rl/$v.toml --parts listops --models reformer-encoder \
    --device cuda --out /tmp/rl/$v > /tmp/rl/$v.log 2>&1 &
done
wait
for v in short-f32 short-bf16 long-f32; do
  echo "== $v"; grep -E "listops reformer|rror" /tmp/rl/$v.log | tail -3
  cp /tmp/rl/$v/runs-listops/reformer-encoder/metrics.jsonl "$OUT/$v.metrics.jsonl" 2>/dev/null && cat "$OUT/$v.metrics.jsonl"
done
