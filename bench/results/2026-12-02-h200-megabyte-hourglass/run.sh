#!/usr/bin/env bash
# The H200 runs of issue 20 (MegaByte, Hourglass), on the device tool's machine: carry ".gpu"
# (scripts/gpu-package.sh) and run `bash bench/results/2026-12-02-h200-megabyte-hourglass/run.sh PART`
# with $OUT set. Widths match the Transformer's parameter count (`altformers params --model M
# --config configs/nanogpt-baby.toml --matching transformer`): 10.82M / 10.97M / 10.99M; issue 22's
# M2 (width 492, 10.92M) and One Wide FFN (width 384, 10.82M).
#   tests       the GPU test binary (fused kernels; every model against the CPU)
#   baby M...   nanoGPT's baby GPT budget (configs/nanogpt-baby.toml: 5000 steps of 64 x 256
#               bytes, bf16), one process per model, side by side; SETS="--set k=v ..." adds settings
#   long M...   the same models at a 2048-byte context: batch 8 (the same 16K bytes a step),
#               2000 steps, eval every 500 on 100 batches, one model at a time
#   pace M...   each model alone, 300 steps of the baby budget: its training rate
#   scale       bench scaling (whole model and mixer, fwd+bwd, bf16) T = 1K..64K and bench decode
#   monarch     issue 22's kernels: Monarch product vs dense, Monarch vs FFT long convolution
set -euo pipefail
part=$1; shift
bin="bash .gpu/run.sh"
$bin models > /dev/null   # unpack once before processes start side by side
mkdir -p /tmp/runs
width() { case $1 in transformer|one-wide-ffn) echo 384 ;; megabyte) echo 336 ;; hourglass) echo 372 ;; m2) echo 492 ;; esac; }
case $part in
  tests) bash .gpu/run-tests.sh > "$OUT/tests.log" 2>&1; tail -5 "$OUT/tests.log" ;;
  long)
    # one model at a time (solo wall times), each run's metrics copied out as soon as it ends,
    # so a deadline keeps the finished ones (the side-by-side version lost all three)
    for m in "$@"; do
      /usr/bin/time -f "$m wall %e s" $bin train --model "$m" --data shakespeare --config configs/nanogpt-baby.toml \
        --set model.width="$(width "$m")" --set model.context=2048 --set train.batch_size=8 --set train.steps=2000 \
        --set train.decay_steps=2000 --set train.eval_every=500 --set train.eval_batches=100 \
        --out "/tmp/runs/long-$m" --device cuda --dtype bf16 --quiet 2>&1 | tail -n 1
      cp "/tmp/runs/long-$m/metrics.jsonl" "$OUT/long-$m.metrics.jsonl"
      tail -n 1 "$OUT/long-$m.metrics.jsonl"
    done ;;
  baby)
    for m in "$@"; do
      ( /usr/bin/time -v $bin train --model "$m" --data shakespeare --config configs/nanogpt-baby.toml \
          --set model.width="$(width "$m")" ${SETS:-} --out "/tmp/runs/$part-$m" --device cuda --dtype bf16 --quiet \
          > "/tmp/runs/$part-$m.log" 2>&1; echo "$m exit $?" >> "/tmp/runs/$part-$m.log" ) &
    done
    wait
    # the device tool brings back 8 files: the metrics, and one log for all
    for m in "$@"; do
      cp "/tmp/runs/$part-$m/metrics.jsonl" "$OUT/$part-$m.metrics.jsonl"
      { echo "== $m"; grep -E "Elapsed|Maximum resident|exit" "/tmp/runs/$part-$m.log"; } >> "/tmp/runs/$part.log"
      tail -n 1 "$OUT/$part-$m.metrics.jsonl"
    done
    cat "/tmp/runs/$part.log" ;;
  pace)
    # each model alone for 300 steps of the baby budget: the training rate without a
    # neighbour on the GPU (the 5000-step runs above ran two at a time)
    for m in "$@"; do
      $bin train --model "$m" --data shakespeare --config configs/nanogpt-baby.toml --set model.width="$(width "$m")" \
        --set train.steps=300 --set train.eval_every=300 --set train.eval_batches=10 \
        --out "/tmp/runs/pace-$m" --device cuda --dtype bf16 --quiet > /dev/null 2>&1
      echo "{\"model\":\"$m\",\"last\":$(tail -n 1 /tmp/runs/pace-$m/metrics.jsonl)}" >> "$OUT/pace.jsonl"
    done
    cat "$OUT/pace.jsonl" ;;
  scale)
    $bin bench scaling --models transformer,megabyte,hourglass --components mixer,model --mode fwdbwd \
      --lengths 1024,2048,4096,8192,16384,32768,65536 --width 384 --heads 6 --tokens-per-batch 65536 \
      --memory-cap-gb 120 --device cuda --dtype bf16 --out "$OUT/scaling.jsonl" > /tmp/runs/scaling.log 2>&1
    $bin bench decode --models transformer,megabyte,hourglass --contexts 1024,4096,16384,65536 --batches 1,16 \
      --width 384 --heads 6 --depth 6 --steps 5 --memory-cap-gb 120 --device cuda --dtype bf16 --out "$OUT/decode.jsonl" > /tmp/runs/decode.log 2>&1
    tail -n 12 /tmp/runs/scaling.log; tail -n 3 /tmp/runs/decode.log ;;
  monarch)
    # issue 22: the Monarch product against a dense matmul of the same N, M2's long
    # convolution by Monarch DFTs against the FFT one, and the M2 and Hyena mixers
    { $bin bench ops --device cuda --ops monarch,dense --lengths 1024,4096,16384,65536 --dtype bf16 --modes fwd,fwdbwd --reps 10
      $bin bench ops --device cuda --ops longconv-monarch,longconv-fft --lengths 1024,4096,16384,65536 --modes fwd,fwdbwd --reps 10
      $bin bench scaling --device cuda --dtype bf16 --models m2,hyena --components mixer --width 768 --heads 12 \
        --lengths 1024,4096,16384,65536 --tokens-per-batch 65536 --reps 10 --memory-cap-gb 100 --mode fwd
    } > "$OUT/monarch.jsonl" 2> /tmp/runs/monarch.log
    tail -n 12 "$OUT/monarch.jsonl" ;;
esac
