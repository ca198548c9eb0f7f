#!/usr/bin/env bash
# Issue 27: each model's time exponent from a dedicated run (one process per model, nothing
# else in it, 10 repetitions) at the quick preset's scaling settings (configs/compare-quick.toml
# [scaling]), to set beside the three quick-preset runs of ../2026-12-03-cpu-quick-4cef327.
#   BIN=path/to/altformers [PROCESSES=1] [REPS=10] bash run.sh OUTDIR
set -euo pipefail
bin="${BIN:-target/release/altformers}"
out="$1"; mkdir -p "$out"
models=$(python3 -c "import json; print(' '.join(json.loads(l)['model'] for l in open('$(dirname "$0")/../2026-12-03-cpu-quick-4cef327/scaling-fits.jsonl')))")
for m in $models; do
  "$bin" --threads 1 bench scaling --models "$m" --components mixer --lengths 1024,2048,4096,8192 \
    --width 64 --heads 2 --tokens-per-batch 8192 --reps "${REPS:-10}" --processes "${PROCESSES:-1}" --time-cap 8 --memory-cap-gb 4 \
    --set linformer:model.options.k=128 --out "$out/points-$m.jsonl" > /dev/null
done
# one folder the report fits (each file's provenance line is not a point: the report skips it)
cat "$out"/points-*.jsonl > "$out/scaling.jsonl"
"$bin" report --from "$out" > /dev/null
