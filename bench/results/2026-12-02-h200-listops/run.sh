#!/usr/bin/env bash
# Issue 21's H200 runs, on the device tool's machine: carry ".gpu" (scripts/gpu-package.sh) and
# run `bash bench/results/2026-12-02-h200-listops/run.sh PART [...]` with $OUT set.
#   tests        the GPU test binary (fused kernels; every model and every encoder against the CPU)
#   pace M...    ListOps at the GPU preset's shape for 30 steps, the models trained at once
#   first M...   tests beside pace, then scale (SCALE_LIMIT seconds)
#   second M...  the sweeps first did not finish, then listops
#   listops M... configs/compare-listops-gpu.toml's ListOps, the models trained at once
#                (STEPS=N overrides the preset's steps, EVAL=N its evaluation interval, LIMIT=S
#                stops the runs after S seconds), the GPU tests beside them
#   scale        bench scaling, one mixer layer, bf16, T = 1K..64K, width 512, 8 heads: every
#                causal model fwd+bwd (the Transformer by the fused flash kernel), the encoders
#                (unfused attention, Linformer at k = 256), Performer at m = 256 (the tensor-core
#                scan takes it; the default m = d_h ln d_h = 266 does not), then every causal
#                model forward only
set -euo pipefail
part=$1; shift
bin="bash .gpu/run.sh"
$bin models > /dev/null   # unpack once
mkdir -p /tmp/runs
models=$(IFS=,; echo "$*")
preset() {  # the GPU ListOps preset with STEPS, evaluations every EVAL (and a smaller data set for a pace run)
  local steps=$1 examples=$2 evals=$3
  sed -e "s/^steps = .*/steps = $steps/; s/^decay_steps = .*/decay_steps = $steps/" \
      -e "s/^warmup_steps = 150/warmup_steps = $(( steps / 10 ))/; s/^eval_every = .*/eval_every = ${EVAL:-$steps}/" \
      -e "s/^train_examples = 96000/train_examples = $examples/; s/^eval_examples = 2000/eval_examples = $evals/" \
      configs/compare-listops-gpu.toml > /tmp/runs/listops-$steps.toml
  echo /tmp/runs/listops-$steps.toml
}
case $part in
  tests) bash .gpu/run-tests.sh > "$OUT/tests.log" 2>&1; tail -5 "$OUT/tests.log" ;;
  pace)
    # seconds per step of each model when all of them train at once (the 30 steps' elapsed
    # time over the last evaluation, data generation excluded by the first evaluation at step 10)
    EVAL=10 /usr/bin/time -f "pace wall %e s" $bin compare --preset "$(EVAL=10 preset 30 2000 64)" --parts listops --models "$models" \
      --device cuda --jobs $# --out /tmp/runs/pace 2>&1 | grep -E "listops|wall|rror" || true
    for m in "$@"; do python3 - "$m" /tmp/runs/pace/runs-listops/$m/metrics.jsonl <<'PY' || echo "$m: no metrics"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2]) if '"step"' in l]
a, b = rows[0], rows[-1]
print(f"{sys.argv[1]}: {(b['elapsed_s'] - a['elapsed_s']) / (b['step'] - a['step']):.3f} s/step (steps {a['step']}-{b['step']})")
PY
    done ;;
  first)
    # the GPU tests beside a pace run of the ListOps models, then the scaling sweep alone on the GPU
    bash "$0" tests > /dev/null 2>&1 &
    bash "$0" pace "$@"
    wait; tail -4 "$OUT/tests.log"
    REPS=${REPS:-3} timeout "${SCALE_LIMIT:-300}" bash "$0" scale || echo "scale stopped at ${SCALE_LIMIT:-300} s" ;;
  listops)
    # the GPU tests beside it (they check, they time nothing); the runs stopped at LIMIT seconds
    # keep their evaluations so far (runs-listops/NAME/metrics.jsonl). The device tool brings
    # back few files: the table, the report and one archive of every run's metrics and config.
    bash .gpu/run-tests.sh > "$OUT/tests.log" 2>&1 &
    /usr/bin/time -f "listops wall %e s" timeout "${LIMIT:-540}" $bin compare --preset "$(preset "${STEPS:-1500}" 96000 2000)" \
      --parts listops --models "$models" --device cuda --jobs $# --out /tmp/runs/listops 2>&1 | grep -E "listops|wall|rror" || true
    wait; tail -3 "$OUT/tests.log"
    cp /tmp/runs/listops/listops.jsonl /tmp/runs/listops/report.md "$OUT/" 2>/dev/null || true
    (cd /tmp/runs/listops && tar czf "$OUT/listops-runs.tgz" runs-listops/*/metrics.jsonl runs-listops/*/config.json runs-listops/*/result.json 2>/dev/null || true)
    for m in "$@"; do echo "$m $(tail -n 1 /tmp/runs/listops/runs-listops/$m/metrics.jsonl 2>/dev/null)"; done ;;
  scale)
    # every causal model (issue 27's GPU table), the encoders, Performer at m = 256 (the
    # tensor-core scan; the default m = 266 takes the general path), fwd+bwd, then fwd; each
    # sweep's JSON lines as they are printed (a sweep stopped early keeps its points)
    common="--components mixer --lengths 1024,2048,4096,8192,16384,32768,65536 --width 512 --heads 8
      --tokens-per-batch 65536 --reps ${REPS:-5} --memory-cap-gb 100 --time-cap ${TIME_CAP:-20} --device cuda --dtype bf16"
    # CAUSAL overrides the causal models, SWEEPS the sweeps run
    causal=${CAUSAL:-transformer,performer,reformer,retnet,rwkv4,hyena,longnet,aft-full,aft-simple,aft-conv,aft-local,m2,megabyte,hourglass,one-wide-ffn}
    encoders=transformer-encoder,linformer,performer-encoder,reformer-encoder,m2-bert
    for sweep in ${SWEEPS:-causal encoders m256 fwd}; do case $sweep in
      causal) $bin bench scaling --models $causal --mode fwdbwd $common > "$OUT/scaling-causal.jsonl" 2> /tmp/runs/s1.log || echo "causal sweep: rc $?" ;;
      encoders) $bin bench scaling --models $encoders --mode fwdbwd --set linformer:model.options.k=256 $common > "$OUT/scaling-encoders.jsonl" 2> /tmp/runs/s2.log || echo "encoder sweep: rc $?" ;;
      m256) $bin bench scaling --models performer --mode fwdbwd --set model.options.features=256 $common > "$OUT/scaling-performer-m256.jsonl" 2> /tmp/runs/s3.log || echo "m=256 sweep: rc $?" ;;
      fwd) $bin bench scaling --models $causal --mode fwd $common > "$OUT/scaling-causal-fwd.jsonl" 2> /tmp/runs/s4.log || echo "fwd sweep: rc $?" ;;
    esac; done
    tail -n 3 /tmp/runs/s*.log
    grep -h '"time_slope"' "$OUT"/scaling-*.jsonl ;;
  short)
    # what a short budget allows: the model tests (every model and encoder on the GPU against
    # the CPU, Performer's tensor-core path included), then the causal sweep
    timeout 150 bash .gpu/run-tests.sh on_the_gpu_matches > "$OUT/tests-models.log" 2>&1 || echo "model tests: rc $?"
    tail -4 "$OUT/tests-models.log"
    common="--components mixer --mode fwdbwd --lengths 1024,2048,4096,8192,16384,32768,65536 --width 512 --heads 8
      --tokens-per-batch 65536 --reps 3 --memory-cap-gb 100 --time-cap 20 --device cuda --dtype bf16"
    timeout "${SCALE_LIMIT:-150}" $bin bench scaling --models transformer,performer,reformer --set performer:model.options.features=256 \
      $common > "$OUT/scaling-causal.jsonl" 2> /tmp/runs/s1.log || echo "scale stopped"
    grep -h '"time_slope"' "$OUT"/scaling-*.jsonl || true ;;
  second)
    # the sweep's models the first call did not reach (a run over TIME_CAP = 2 s ends a model's
    # sweep: 25x the fused kernel's time at 64K), the encoders and m = 256, then ListOps
    CAUSAL=aft-full,aft-simple,aft-conv,aft-local,m2,megabyte,hourglass,one-wide-ffn SWEEPS="causal encoders m256" \
      TIME_CAP=${TIME_CAP:-2} REPS=3 bash "$0" scale
    bash "$0" listops "$@" ;;
  both)
    # one call: the scaling sweep (SCALE_LIMIT seconds at most), then ListOps as above
    REPS=${REPS:-3} timeout "${SCALE_LIMIT:-170}" bash "$0" scale || echo "scale stopped at ${SCALE_LIMIT:-170} s"
    bash "$0" listops "$@" ;;
esac
