#!/usr/bin/env bash
# CPU training speed, ours beside the PyTorch peer (bench/peers/nanogpt_char.py) in one run
# (issue 29): for each thread count and shape, STEPS training steps of each, evaluations left
# out of the time, and the ratio of tokens/s. Run it on an otherwise idle machine.
#   scripts/cpu-train-bench.sh [OUT.jsonl]      STEPS=300 THREADS="1 2" PY=python3 BIN=altformers
# Shapes: nanoGPT's CPU run (configs/nanogpt-cpu.toml: 4 x 128, 4 heads, context 64, batch 12)
# and the quick preset's LM Transformer (2 x 64, 4 heads, context 64, batch 8). The vocabulary
# is the peer's, the corpus's 65 characters (bench/tokenizers/shakespeare-chars.json, nanoGPT's
# character-level encoding as a tokenizer.json), so both train the same model; TOKENIZER=bytes
# gives ours the 256 bytes instead (a head four times wider, as before session 47).
# One JSON line per run to OUT (default: stdout only), then the table.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
steps=${STEPS:-300}
py=${PY:-python3}
bin=${BIN:-$root/target/release/altformers}
out=${1:-/dev/null}
tokenizer=${TOKENIZER:-$root/bench/tokenizers/shakespeare-chars.json}
data="$root/data/tinyshakespeare.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/rows"
shape() {  # name layers heads width batch
  local name=$1 layers=$2 heads=$3 width=$4 batch=$5 threads=$6
  "$bin" --threads "$threads" train --model transformer --data "$data" --config "$root/configs/nanogpt-cpu.toml" \
    --set model.depth="$layers" --set model.heads="$heads" --set model.width="$width" --set train.batch_size="$batch" \
    --set train.steps="$steps" --set train.eval_every=$((steps * 10)) --set train.eval_batches=1 --tokenizer "$tokenizer" \
    --out "$tmp/ours-$name-$threads" > /dev/null 2>&1
  local ours
  ours=$(grep '"step"' "$tmp/ours-$name-$threads/metrics.jsonl" | tail -1 | $py -c "import json,sys; print(json.load(sys.stdin)['elapsed_s'])")
  # on several cores also ours as that many single-threaded data-parallel workers (`--workers`):
  # no hand-offs between threads inside a step, the gradients averaged between processes
  local workers=0
  if [ "$threads" -gt 1 ]; then
    "$bin" --threads 1 train --model transformer --data "$data" --config "$root/configs/nanogpt-cpu.toml" \
      --set model.depth="$layers" --set model.heads="$heads" --set model.width="$width" --set train.batch_size="$batch" \
      --set train.steps="$steps" --set train.eval_every=$((steps * 10)) --set train.eval_batches=1 --tokenizer "$tokenizer" --workers "$threads" \
      --out "$tmp/ours-$name-w$threads" > /dev/null 2>&1
    workers=$(grep '"step"' "$tmp/ours-$name-w$threads/metrics.jsonl" | tail -1 | $py -c "import json,sys; print(json.load(sys.stdin)['elapsed_s'])")
  fi
  local peer
  peer=$(OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads $py "$root/bench/peers/nanogpt_char.py" --device cpu --data "$data" \
    --iters "$steps" --eval-interval $((steps * 10)) --eval-iters 1 --n-layer "$layers" --n-head "$heads" --n-embd "$width" \
    --batch-size "$batch" | $py -c "import json,sys; r=json.load(sys.stdin); print(r['train_s'])")
  $py - "$name" "$threads" "$steps" "$batch" "$ours" "$peer" "$workers" "$(basename "$tokenizer")" <<'PY' | tee -a "$tmp/rows" >> "$out"
import json, sys
name, threads, steps, batch, ours, peer, workers = sys.argv[1:8]
tokens = int(steps) * int(batch) * 64
row = {"shape": name, "threads": int(threads), "tokenizer": sys.argv[8], "steps": int(steps), "ours_s": float(ours), "peer_s": float(peer),
       "ours_tokens_per_s": tokens / float(ours), "peer_tokens_per_s": tokens / float(peer),
       "ours_over_peer": float(peer) / float(ours)}
if float(workers) > 0:
    row.update({"ours_workers_s": float(workers), "ours_workers_tokens_per_s": tokens / float(workers),
                "ours_workers_over_peer": float(peer) / float(workers)})
print(json.dumps(row))
PY
}
for threads in ${THREADS:-1 2}; do
  shape nanogpt-cpu 4 4 128 12 "$threads"
  shape quick-lm 2 4 64 8 "$threads"
done
$py - "$tmp/rows" <<'PY'
import json, sys
print("| shape | threads | ours tokens/s | PyTorch tokens/s | ours / PyTorch | ours as single-threaded workers | / PyTorch |\n|---|---|---|---|---|---|---|")
for l in open(sys.argv[1]):
    r = json.loads(l)
    w = r.get("ours_workers_tokens_per_s")
    extra = f"{w:.0f} | {r['ours_workers_over_peer']:.2f}" if w else "- | -"
    print(f"| {r['shape']} | {r['threads']} | {r['ours_tokens_per_s']:.0f} | {r['peer_tokens_per_s']:.0f} | {r['ours_over_peer']:.2f} | {extra} |")
PY
