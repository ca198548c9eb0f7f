#!/usr/bin/env bash
# Is it LSH's sparsity that keeps reformer-encoder at ListOps' majority class at LRA's lengths,
# or the rest of the Reformer (shared QK with the self-mask, the reversible two-stream block)?
# Reformer with one bucket pair and one chunk covering every position (n_buckets 2, chunk
# 2000, 1 round: its LSH attention is then full shared-QK attention with the self-mask; tested
# equal) beside the Transformer encoder, STEPS steps of the GPU preset, trained at once.
# Carry ".gpu"; $OUT set.
set -uo pipefail
bin="bash .gpu/run.sh"
$bin models > /dev/null
mkdir -p /tmp/dg
python3 - <<'PY'
import os, re
s = open("configs/compare-listops-gpu.toml").read()
steps = os.environ.get("STEPS", "600")
s = re.sub(r"(?m)^steps = \d+", f"steps = {steps}", s)
s = re.sub(r"(?m)^decay_steps = \d+", f"decay_steps = {steps}", s)
s = re.sub(r"(?m)^warmup_steps = 150", f"warmup_steps = {int(steps) // 10}", s)
s = re.sub(r"(?m)^eval_every = 500", "eval_every = 200", s)
s = s.replace("n_buckets = 10\nchunk = 200", "n_buckets = 2\nchunk = 2000", 1)
assert "chunk = 2000" in s
open("/tmp/dg/full.toml", "w").write(s)
PY
timeout "${LIMIT:-300}" $bin compare --preset /tmp/dg/full.toml --parts listops --models transformer-encoder,reformer-encoder \
  --device cuda --jobs 2 --out /tmp/dg/out 2>&1 | grep -E "listops |rror"
for m in transformer-encoder reformer-encoder; do
  cp /tmp/dg/out/runs-listops/$m/metrics.jsonl "$OUT/full-$m.metrics.jsonl" 2>/dev/null
  grep -o '"n_buckets":[0-9]*\|"chunk":[0-9]*' /tmp/dg/out/runs-listops/$m/config.json 2>/dev/null | tr '\n' ' '
  echo "== $m"; cat "$OUT/full-$m.metrics.jsonl" 2>/dev/null
done
cp /tmp/dg/out/listops.jsonl "$OUT/" 2>/dev/null || true
