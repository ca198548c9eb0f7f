#!/usr/bin/env bash
# Run on the GPU machine (through the device tool, carrying .gpu and .whl):
#   bash scripts/gpu-bench.sh peers|ours|kernels|baby [extra args]
# Writes JSON lines and logs under $OUT (or ./gpu-out).
set -uo pipefail
FINAL="${OUT:-gpu-out}"
OUT="/tmp/gpu-results"
mkdir -p "$OUT" "$FINAL"
what="${1:-all}"
run() { bash .gpu/run.sh "$@"; }
if [ "$what" = peers ] || [ "$what" = all ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  (cd bench/peers && python3 attention_sdpa.py && python3 retention_fla.py && python3 fftconv_torch.py) > "$OUT/peers.jsonl" 2> "$OUT/peers.err"
fi
if [ "$what" = ours ] || [ "$what" = all ]; then
  # Attention at the peers' shape: 16 heads of 128 (width 2048), B x T = 64K tokens, bf16.
  run bench scaling --device cuda --dtype bf16 --models transformer --width 2048 --heads 16 \
    --lengths 2048,4096,8192 --tokens-per-batch 65536 --reps 10 --memory-cap-gb 100 --mode fwd \
    --out "$OUT/ours-attention-fwd.jsonl" > /dev/null 2> "$OUT/ours.err"
  run bench scaling --device cuda --dtype bf16 --models transformer --width 2048 --heads 16 \
    --lengths 2048,4096 --tokens-per-batch 65536 --reps 5 --memory-cap-gb 100 --mode fwdbwd \
    --out "$OUT/ours-attention-fwdbwd.jsonl" > /dev/null 2>> "$OUT/ours.err"
fi
if [ "$what" = kernels ]; then
  # The fused kernels: GPU tests against the CPU reference, then ours and the peers at the
  # peers' shapes in the same run.
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  timeout 240 bash .gpu/run-tests.sh > "$OUT/gpu-tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu-tests.log"
  tail -5 "$OUT/gpu-tests.log"
  grep -E "test result|FAILED|panicked" "$OUT/gpu-tests.log" | head -20
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  # fla compiles its Triton kernels on first use: give it time; one peer failing stops none
  (cd bench/peers && { timeout 60 python3 attention_sdpa.py 4096,8192; timeout 240 python3 retention_fla.py 8192,16384;
    timeout 90 python3 fftconv_torch.py 1024,4096,16384; }) > "$OUT/peers.jsonl" 2> "$OUT/peers.err"
  timeout 100 bash .gpu/run.sh bench ops --ops attention --lengths 4096,8192 --reps 10 --out "$OUT/ours-ops-attention.jsonl" > /dev/null 2> "$OUT/ours.err"
  timeout 100 bash .gpu/run.sh bench ops --ops retention --lengths 8192,16384 --reps 10 --out "$OUT/ours-ops-retention.jsonl" > /dev/null 2>> "$OUT/ours.err"
  timeout 100 bash .gpu/run.sh bench ops --ops longconv --lengths 1024,4096,16384 --reps 10 --out "$OUT/ours-ops-longconv.jsonl" > /dev/null 2>> "$OUT/ours.err"
  tail -3 "$OUT/ours.err"
fi
if [ "$what" = baby ]; then
  shift
  run train --model transformer --data shakespeare --config configs/nanogpt-baby.toml --out /tmp/baby \
    --device cuda --dtype bf16 "$@" 2> "$OUT/baby.err"
  cp /tmp/baby/metrics.jsonl /tmp/baby/config.json "$OUT/" 2>/dev/null
  run eval --run /tmp/baby --data shakespeare --device cuda > "$OUT/baby-eval.json" 2>> "$OUT/baby.err"
  run generate --run /tmp/baby --prompt "ROMEO:" --tokens 300 --device cuda > "$OUT/baby-sample.txt" 2>> "$OUT/baby.err"
fi
ls -la "$OUT"
# The device tool brings back at most 8 files: pack everything into one.
tar -czf "$FINAL/results-$what.tgz" -C "$OUT" .
