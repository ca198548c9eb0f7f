#!/usr/bin/env bash
# Run on the GPU machine (through the device tool, carrying .gpu and .whl):
#   bash scripts/gpu-bench.sh peers|ours|kernels|unfused|baby|seeds|mqar|pace|steps|trainspeed|decode|decode-batch|decode-all|decode-large|nccl|longnet-sp|ddp|faults|compare-gpus|multi-gpu-tests|interop [extra args]
# Writes JSON lines and logs under $OUT (or ./gpu-out).
set -uo pipefail
FINAL="${OUT:-gpu-out}"
# Work folder of this invocation (several run side by side, e.g. one per GPU): packed at the end.
OUT="/tmp/gpu-results-$$"
mkdir -p "$OUT" "$FINAL"
what="${1:-all}"
# TAG names this invocation's archive (several invocations in one call keep their results apart)
tag="${TAG:-}"
# The device tool brings back at most 8 files: everything is packed into one, also when a
# `timeout` around this script stops it (what was measured until then comes back).
pack() { tar -czf "$FINAL/results-$what${tag:+-$tag}.tgz" -C "$OUT" .; }
trap pack EXIT
trap 'exit 143' TERM INT
# The binary: the carried one (ALT overrides it, e.g. a CPU build, to try a mode without a GPU).
alt="${ALT:-bash .gpu/run.sh}"
run() { $alt "$@"; }
# The host's GPUs (one line each; MIG instances not counted), at least 1.
gpu_count() { local n; n=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l); [ "$n" -gt 0 ] && echo "$n" || echo 1; }
# One cell of a preset's recall grid: cell PRESET T PAIRS WIDTH LR [more sed arguments]
cell() {
  local preset="$1" seq="$2" pairs="$3" w="$4" lr="$5"; shift 5
  sed -e "s/^tasks = .*/tasks = [[$seq, $pairs]]/" -e "s/^widths = .*/widths = [$w]/" -e "s/^lrs = .*/lrs = [$lr]/" "$@" "$preset"
}
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
  if [ -z "${SKIP_TESTS:-}" ]; then
    timeout 240 bash .gpu/run-tests.sh > "$OUT/gpu-tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu-tests.log"
    tail -5 "$OUT/gpu-tests.log"
    grep -E "test result|FAILED|panicked" "$OUT/gpu-tests.log" | head -20
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  # fla compiles its Triton kernels on first use: give it time; one peer failing stops none
  # KERNEL_OPS picks a subset (default all three), e.g. KERNEL_OPS=attention for an A/B of one kernel.
  ops="${KERNEL_OPS:-attention retention longconv}"
  (cd bench/peers && { [[ $ops != *attention* ]] || timeout 60 python3 attention_sdpa.py 4096,8192
    [[ $ops != *retention* ]] || timeout 240 python3 retention_fla.py 8192,16384
    [[ $ops != *longconv* ]] || timeout 90 python3 fftconv_torch.py 1024,4096,16384; }) > "$OUT/peers.jsonl" 2> "$OUT/peers.err"
  # ours at the peers' shapes with binary $1 into folder $2, then the ours/peer table (report.md)
  time_ours() {
    for op in attention:4096,8192 retention:8192,16384 longconv:1024,4096,16384; do
      [[ $ops == *${op%%:*}* ]] || continue
      timeout 100 $1 bench ops --ops "${op%%:*}" --lengths "${op#*:}" --reps 10 \
        --out "$2/ours-ops-${op%%:*}.jsonl" > /dev/null 2>> "$2/ours.err"
    done
    tail -3 "$2/ours.err"
    $1 report --from "$2" > /dev/null 2>> "$2/ours.err"
  }
  time_ours "$alt" "$OUT"
  # The portable mma.sync attention forward (the default on Hopper is wgmma) of the same
  # package, timed into ours-mma/.
  if [[ $ops == *attention* ]]; then
    mkdir -p "$OUT/ours-mma" && cp "$OUT/peers.jsonl" "$OUT/ours-mma/"
    ALTFORMERS_ATTENTION_FWD=mma timeout 100 $alt bench ops --ops attention --lengths 4096,8192 --reps 10 \
      --out "$OUT/ours-mma/ours-ops-attention.jsonl" > /dev/null 2>> "$OUT/ours-mma/ours.err"
    tail -3 "$OUT/ours-mma/ours.err"
    $alt report --from "$OUT/ours-mma" > /dev/null 2>> "$OUT/ours-mma/ours.err"
  fi
  # A/B in the same run: a second package in .gpu-a (scripts/gpu-package.sh, then copy .gpu
  # to .gpu-a, then build the other commit) times the same ops into ours-a/.
  if [ -f .gpu-a/run.sh ]; then
    mkdir -p "$OUT/ours-a" && cp "$OUT/peers.jsonl" "$OUT/ours-a/"
    time_ours "bash .gpu-a/run.sh" "$OUT/ours-a"
  fi
fi
if [ "$what" = unfused ]; then
  # The tensor paths the kernels replace, at the same shapes (ALTFORMERS_UNFUSED, see
  # kernels/mod.rs): how much each fused kernel gains over plain candle ops.
  for op in attention retention; do
    lengths=8192; [ "$op" = attention ] && lengths=4096,8192
    ALTFORMERS_UNFUSED=$op timeout 150 $alt bench ops --ops $op --lengths $lengths --reps 5 \
      --out "$OUT/unfused-ops-$op.jsonl" > /dev/null 2>> "$OUT/unfused.err"
  done
  tail -3 "$OUT/unfused.err"
fi
if [ "$what" = baby ]; then
  shift
  run train --model transformer --data shakespeare --config configs/nanogpt-baby.toml --out /tmp/baby \
    --device cuda --dtype bf16 "$@" 2> "$OUT/baby.err"
  cp /tmp/baby/metrics.jsonl /tmp/baby/config.json "$OUT/" 2>/dev/null
  run eval --run /tmp/baby --data shakespeare --device cuda > "$OUT/baby-eval.json" 2>> "$OUT/baby.err"
  run generate --run /tmp/baby --prompt "ROMEO:" --tokens 300 --device cuda > "$OUT/baby-sample.txt" 2>> "$OUT/baby.err"
  # the peer: nanoGPT's own GPU recipe for the same run (bf16 autocast, compiled, evaluations
  # of 200 batches every 250 steps), re-implemented in bench/peers; PEER=0 leaves it out
  [ "${PEER:-1}" = 1 ] && (cd bench/peers && timeout 500 python3 nanogpt_char.py --data ../../data/tinyshakespeare.txt \
    --device cuda --bf16 --compile --iters 5000 --eval-iters 200 --block-size 256 --batch-size 64 --n-layer 6 \
    --n-head 6 --n-embd 384 --dropout 0.2) > "$OUT/baby-peer.jsonl" 2> "$OUT/baby-peer.err"
fi
if [ "$what" = seeds ]; then
  # Issue 2: nanoGPT's CPU configuration over seeds. Ours on the GPU in f32 (the CPU run's
  # arithmetic: it reproduced the CPU's val_loss to the printed digits), each run followed by
  # `eval` over the whole validation split; beside it the PyTorch peer
  # (bench/peers/nanogpt_char.py, nanoGPT re-implemented) over its own seeds, every process at once.
  #   gpu-bench.sh seeds "OUR SEEDS" "PEER,SEEDS PEER,SEEDS"   (one peer process per comma group)
  shift
  ours="${1:-1337 1 2 3}"; peers="${2:-1337,1338 1339,1340}"
  $alt --version > /dev/null  # unpack the binary once, before the processes start
  for s in $ours; do
    ( run --threads 1 train --model transformer --data shakespeare --config configs/nanogpt-cpu.toml \
        --set train.seed=$s --device cuda --quiet --out /tmp/seeds/ours-$s > /dev/null 2> "$OUT/seed-$s.err" \
      && run --threads 1 eval --run /tmp/seeds/ours-$s --data shakespeare --device cuda > /tmp/seeds/ours-$s/eval.json 2>> "$OUT/seed-$s.err" ) &
  done
  for group in $peers; do
    (cd bench/peers && python3 nanogpt_char.py --data ../../data/tinyshakespeare.txt --seeds "$group" \
      > "$OUT/peer-$group.jsonl" 2> "$OUT/peer-$group.err") &
  done
  wait
  for s in $ours; do
    echo "{\"seed\":$s,\"last_eval\":$(tail -1 /tmp/seeds/ours-$s/metrics.jsonl 2>/dev/null || echo null),\"whole_split\":$(cat /tmp/seeds/ours-$s/eval.json 2>/dev/null || echo null)}"
  done > "$OUT/ours-seeds.jsonl"
  cat "$OUT"/peer-*.jsonl > "$OUT/peer-seeds.jsonl" 2>/dev/null
  cut -c1-300 "$OUT/ours-seeds.jsonl" "$OUT/peer-seeds.jsonl"
fi
if [ "$what" = mqar ]; then
  # The recall part of a comparison as one process per (model, task, width, lr), short tasks
  # and then narrow widths first, at most PROCS at once (default: 4 per GPU), spread over the GPUs
  # (GPUS, default every visible one). Nothing starts with under a minute left of `seconds`.
  # Then one report. Processes sharing a GPU are time-sliced, not overlapped: on the H200 16
  # of them made about 55 steps/s in all at T = 128-256, where one alone makes 48 steps/s
  # at T = 256 (bench/results/2026-11-29-h200-mqar-full); the best count is not measured.
  # (One process per GPU with `compare --jobs` workers on CUDA streams: about 66 steps/s in
  # all at T = 64, bench/results/2026-11-29-h200-retention-tc.)
  #   gpu-bench.sh mqar PRESET "model1 model2 ..." [seconds] [tag] [previous mqar.jsonl]
  # Rows of the previous file with the same budget are kept, not retrained (compare skips
  # them), so a grid too large for one call is finished by calling again with the last
  # call's mqar.jsonl. With ALT, MQAR_DEVICE=cpu runs it without a GPU (to try the script).
  preset="$2"; models="$3"; limit="${4:-500}"; tag="${5:-mqar}"; previous="${6:-}"
  deadline=$((SECONDS + limit))
  $alt --version > /dev/null  # unpack the binary once, before the processes start
  gpus="${GPUS:-$(gpu_count)}"
  procs="${PROCS:-$((4 * gpus))}"
  read -r tasks widths lrs < <(python3 -c "import tomllib,sys; m = tomllib.load(open(sys.argv[1], 'rb'))['mqar']; print(','.join(f'{a}x{b}' for a, b in m['tasks']), ','.join(map(str, m['widths'])), ','.join(map(str, m['lrs'])))" "$preset")
  i=0
  for task in ${tasks//,/ }; do
    for w in ${widths//,/ }; do
      for lr in ${lrs//,/ }; do
      for m in $models; do
        seq="${task%x*}"; pairs="${task#*x}"; dir="/tmp/$tag/$m-$seq-$w-$lr"
        while [ "$(jobs -rp | wc -l)" -ge "$procs" ]; do wait -n; done
        left=$((deadline - SECONDS)); [ "$left" -ge 60 ] || break 4
        # this cell's rows in a previous file (both rates); one it holds at this rate is not
        # rerun (compare would skip it anyway)
        row="\"model\":\"$m\",\"seq_len\":$seq,\"pairs\":$pairs,\"width\":$w,"
        if [ -n "$previous" ] && grep -q "$row.*\"lr\":$(awk -v x="$lr" 'BEGIN { printf "%g", x }')[,}]" "$previous"; then
          continue
        fi
        # With a pace file, a run starts only if the work started so far and its own, each
        # at its time alone, fit in `seconds`: processes on one GPU are time-sliced, so the
        # work adds up (session 16: 439 s alone in all took 437 s as three runs side by side,
        # 504 s took 531 s as two).
        # A killed run is lost whole, so one that would not fit leaves its turn to a shorter
        # one. Invocations started together for one GPU share the ledger (LEDGER, a file: remove
        # it before starting them).
        if [ -n "${PACE:-}" ]; then
          # (a width not paced takes the next wider one's figure: an upper bound)
          est=$(sort -k3,3n "$PACE" | awk -v m="$m" -v t="$seq" -v w="$w" '$1 == m && $2 == t && $3 >= w { print int($4); exit }')
          ledger="${LEDGER:-/tmp/mqar-ledger}"
          committed=$(awk '{ s += $1 } END { print s + 0 }' "$ledger" 2>/dev/null || echo 0)
          # (8% for the slicing's overhead, as measured above, and 20 s for start and scoring)
          if [ -n "$est" ] && [ $(((committed + est) * 108 / 100 + 20)) -gt "$limit" ]; then
            echo "skip $m T $seq width $w lr $lr: about ${est} s alone, ${committed} s of ${limit} s taken" >> "$OUT/$tag-skipped.txt"
            continue
          fi
          echo "${est:-0} $m $seq $w $lr" >> "$ledger"
        fi
        mkdir -p "$dir"
        cell "$preset" "$seq" "$pairs" "$w" "$lr" > "$dir/preset.toml"
        if [ -n "$previous" ]; then grep "$row" "$previous" > "$dir/mqar.jsonl"; fi
        device="cuda:$((i % gpus))"; [ "${MQAR_DEVICE:-}" = cpu ] && device=cpu
        timeout "$left" $alt --threads 1 compare --preset "$dir/preset.toml" --parts mqar --models "$m" \
          --device "$device" --out "$dir" > /dev/null 2> "$OUT/$tag-$m-$seq-$w-$lr.err" &
        i=$((i + 1))
      done
      done
    done
  done
  wait
  mkdir -p "$OUT/$tag-report"
  # The previous rows and every process's, once each (a process's file holds the previous
  # rows of its model, task and width, both learning rates).
  cat $previous /tmp/$tag/*/mqar.jsonl 2>/dev/null | python3 -c "
import json, sys
rows = {}
for line in sys.stdin:
    r = json.loads(line); rows.setdefault((r['model'], r['seq_len'], r['pairs'], r['width'], r['lr']), line)
sys.stdout.write(''.join(rows.values()))" > "$OUT/$tag-report/mqar.jsonl"
  cp "$(ls -d /tmp/$tag/*/ | head -1)meta.json" "$OUT/$tag-report/" 2>/dev/null
  $alt report --from "$OUT/$tag-report" > /dev/null 2>> "$OUT/$tag-report.err"
  cut -c1-200 "$OUT/$tag-report/mqar.jsonl"
fi
if [ "$what" = pace ]; then
  # How long one MQAR run of the preset takes alone on this GPU, per model and width at one
  # task: a 5-step run first (the driver compiles each PTX module once per machine), then
  # STEPS (default 40) timed steps alone; prints "model T width seconds-for-the-preset's-steps"
  # lines for `PACE=file gpu-bench.sh mqar` to plan with (appended to $OUT/pace.txt).
  #   gpu-bench.sh pace PRESET "model1 ..." "T,pairs" "width1 width2 ..."
  preset="$2"; models="$3"; task="$4"; widths="$5"; n="${STEPS:-40}"
  seq="${task%,*}"; pairs="${task#*,}"
  total=$(python3 -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1], 'rb'))['mqar']['steps'])" "$preset")
  for m in $models; do
    for w in $widths; do
      for k in 5 $n; do
        [ "$k" = 5 ] && [ "$w" != "${widths%% *}" ] && continue
        dir="/tmp/pace/$m-$seq-$w-$k"; mkdir -p "$dir"
        cell "$preset" "$seq" "$pairs" "$w" 1e-3 \
          -e "s/^steps = .*/steps = $k/" -e "s/^eval_examples = .*/eval_examples = 16/" -e "/^curve_every/d" > "$dir/preset.toml"
        timeout 120 $alt --threads 1 compare --preset "$dir/preset.toml" --parts mqar --models "$m" --device cuda \
          --out "$dir" > /dev/null 2> "$OUT/pace-$m-$w-$k.err"
      done
      python3 -c "import json,sys; r = json.loads(open(sys.argv[1]).readline()); print(sys.argv[2], sys.argv[3], sys.argv[4], round(r['train_s'] / int(sys.argv[5]) * int(sys.argv[6]), 1))" \
        "/tmp/pace/$m-$seq-$w-$n/mqar.jsonl" "$m" "$seq" "$w" "$n" "$total" >> "$OUT/pace.txt" 2>> "$OUT/pace.err"
    done
  done
  cat "$OUT/pace.txt" >> "$FINAL/pace.txt"  # appended: several calls may pace in one run
  cat "$OUT/pace.txt"
fi
if [ "$what" = steps ]; then
  # Training-step rate of the carried package and, if present, of .gpu-a (an A/B in one run):
  # MQAR (T 256, width 64, batch 64 and 512) for the Transformer and RetNet, and the baby GPT,
  # a few hundred steps each, one process at a time. train_s / tokens_per_s are what to read.
  sed -e 's/^tasks = .*/tasks = [[256, 16]]/' -e 's/^lrs = .*/lrs = [1e-3]/' -e '/^curve_every/d' \
    -e 's/^steps = .*/steps = 300/' -e 's/^eval_examples = .*/eval_examples = 512/' configs/mqar-curve.toml > /tmp/steps-b512.toml
  sed -e 's/^batch_size = 512/batch_size = 64/' /tmp/steps-b512.toml > /tmp/steps-b64.toml
  # The driver compiles each PTX module the first time a process loads it (then caches it):
  # a few steps of every run first, untimed, so no timed run pays for that.
  sed -e 's/^steps = .*/steps = 20/' /tmp/steps-b64.toml > /tmp/steps-warm.toml
  for pkg in .gpu .gpu-a; do
    [ -f $pkg/run.sh ] || continue
    for m in transformer retnet; do
      bash $pkg/run.sh --threads 1 compare --preset /tmp/steps-warm.toml --parts mqar --models $m --device cuda \
        --out /tmp/steps-warm-$pkg-$m > /dev/null 2>> "$OUT/steps.err"
    done
    bash $pkg/run.sh train --model transformer --data shakespeare --config configs/nanogpt-baby.toml --set train.steps=10 \
      --set train.eval_every=10 --set train.eval_batches=2 --device cuda --dtype bf16 --out /tmp/steps-warm-$pkg-baby > /dev/null 2>> "$OUT/steps.err"
  done
  for pkg in .gpu .gpu-a; do
    [ -f $pkg/run.sh ] || continue
    bin="bash $pkg/run.sh"; $bin --version >> "$OUT/steps.txt"
    for b in 64 512; do
      for m in transformer retnet; do
        timeout 120 $bin --threads 1 compare --preset /tmp/steps-b$b.toml --parts mqar --models $m --device cuda \
          --out /tmp/steps-$pkg-$b-$m > /dev/null 2>> "$OUT/steps.err"
        echo "$pkg mqar batch $b $(cut -c1-160 /tmp/steps-$pkg-$b-$m/mqar.jsonl)" >> "$OUT/steps.txt"
      done
    done
    timeout 150 $bin train --model transformer --data shakespeare --config configs/nanogpt-baby.toml --set train.steps=300 \
      --set train.eval_every=300 --device cuda --dtype bf16 --out /tmp/steps-$pkg-baby > /dev/null 2>> "$OUT/steps.err"
    echo "$pkg baby $(tail -1 /tmp/steps-$pkg-baby/metrics.jsonl)" >> "$OUT/steps.txt"
  done
  cat "$OUT/steps.txt"
fi
if [ "$what" = trainspeed ]; then
  # Issue 24: whole-model training speed, ours and the PyTorch peer (bench/peers/gpt_train.py:
  # eager and torch.compile, bf16 autocast, SDPA, fused AdamW) in the same call, at nanoGPT's
  # baby GPT and GPT-2 small's shape on characters; then where our step's time goes: Nsight
  # Compute's kernel durations over 3 and over 8 steps of the baby GPT (their difference is
  # five steady steps: launches and GPU time per step), and PyTorch's per-step kernel count
  # and GPU time from its profiler.
  #   gpu-bench.sh trainspeed [steps]     (SIZES="baby gpt2-small", NCU_SIZES="baby", MODELS=""; NCU=0 skips the profile,
  #                                         TIMING=0 the timing, PEER_PROFILE=0 PyTorch's profile,
  #                                         NCU_STEPS="3 8" the two profiled run lengths, FLA_PEER=0 no fla RetNet,
  #                                         PEER=0 ours alone, e.g. an A/B under ALTFORMERS_* switches with TAG=...)
  steps="${2:-200}"; rm -rf /tmp/ts-*
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  $alt --version > "$OUT/ours-version.txt"
  [ "${TIMING:-1}" = 1 ] && for size in ${SIZES:-baby gpt2-small}; do
    cfg=configs/nanogpt-baby.toml; [ "$size" = gpt2-small ] && cfg=configs/gpt2-small-char.toml
    # untimed: the driver compiles each PTX module once per machine
    run train --model transformer --data shakespeare --config $cfg --set train.steps=5 --set train.eval_every=5 \
      --set train.eval_batches=1 --device cuda --dtype bf16 --quiet --out /tmp/ts-warm-$size > /dev/null 2>> "$OUT/ours.err"
    # two windows: the first includes start-up, the second is the steady rate
    timeout 250 $alt train --model transformer --data shakespeare --config $cfg --set train.steps=$steps \
      --set train.eval_every=$((steps / 2)) --set train.eval_batches=1 --device cuda --dtype bf16 --quiet \
      --out /tmp/ts-$size > /dev/null 2>> "$OUT/ours.err"
    echo "{\"size\":\"$size\",\"metrics\":[$(paste -sd, /tmp/ts-$size/metrics.jsonl)]}" >> "$OUT/ours.jsonl"
  done
  [ "${TIMING:-1}" = 1 ] && [ "${PEER:-1}" = 1 ] && (cd bench/peers && timeout 400 python3 gpt_train.py --data ../../data/tinyshakespeare.txt \
    --sizes "$(echo ${SIZES:-baby gpt2-small} | tr ' ' ,)" --steps 100) > "$OUT/peer.jsonl" 2> "$OUT/peer.err"
  # The other models at the baby size (MODELS="rwkv4 retnet hyena longnet aft-simple", ours
  # only, no dropout), and RetNet against flash-linear-attention's RetNet model (its wheel in
  # .whl/, as for `kernels`).
  if [ -n "${MODELS:-}" ]; then
    for m in $MODELS; do
      timeout 200 $alt train --model $m --data shakespeare --config configs/nanogpt-baby.toml --set train.steps=$steps \
        --set train.eval_every=$((steps / 2)) --set train.eval_batches=1 --set model.dropout=0 --device cuda --dtype bf16 \
        --quiet --out /tmp/ts-baby-$m > /dev/null 2>> "$OUT/ours.err"
      echo "{\"size\":\"baby\",\"model\":\"$m\",\"metrics\":[$(paste -sd, /tmp/ts-baby-$m/metrics.jsonl)]}" >> "$OUT/ours-models.jsonl"
    done
    if [[ " $MODELS " == *" retnet "* ]] && [ "${FLA_PEER:-1}" = 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      (cd bench/peers && PYTHONPATH=/tmp/site timeout 480 python3 gpt_train.py --arch fla-retnet --sizes baby \
        --modes eager --data ../../data/tinyshakespeare.txt --steps 100) > "$OUT/peer-retnet.jsonl" 2>> "$OUT/peer.err"
    fi
  fi
  if [ "${NCU:-1}" = 1 ]; then
    for size in ${NCU_SIZES:-baby}; do
      cfg=configs/nanogpt-baby.toml; [ "$size" = gpt2-small ] && cfg=configs/gpt2-small-char.toml
      for n in ${NCU_STEPS:-3 8}; do
        timeout 200 ncu --clock-control none --metrics gpu__time_duration.sum --csv $alt train --model transformer \
          --data shakespeare --config $cfg --set train.steps=$n --set train.eval_every=$n \
          --set train.eval_batches=1 --device cuda --dtype bf16 --quiet --out /tmp/ts-ncu-$size-$n > "$OUT/ncu-$size-$n.csv" 2>> "$OUT/ncu.err"
        python3 scripts/ncu-summary.py "$OUT/ncu-$size-$n.csv" > "$OUT/ncu-$size-$n.txt" 2>> "$OUT/ncu.err"
        rm -f "$OUT/ncu-$size-$n.csv"
      done
    done
    [ "${PEER_PROFILE:-1}" = 1 ] && (cd bench/peers && timeout 200 python3 gpt_train.py \
      --data ../../data/tinyshakespeare.txt --sizes "$(echo ${NCU_SIZES:-baby} | tr ' ' ,)" --steps 10 --profile) \
      > "$OUT/peer-profile.jsonl" 2>> "$OUT/peer.err"
  fi
  cut -c1-400 "$OUT/ours.jsonl" "$OUT/peer.jsonl" "$OUT/peer-profile.jsonl"; tail -n 3 "$OUT/ours.err" "$OUT/peer.err"
  for f in "$OUT"/ncu-*.txt; do tail -n 1 "$f"; done
fi
if [ "$what" = decode ]; then
  # Issue 28: RWKV-4 12 x 768 decoding at batch 1 after a context, ours (bench decode's step,
  # and the generate command, load excluded) and the official rwkv package (its wheel in
  # .whl/; bench/peers/rwkv_decode.py) on one checkpoint, in the same call.
  #   gpu-bench.sh decode [context]
  ctx="${2:-1024}"; rm -rf /tmp/dec-run /tmp/dec-hf
  stamp() { echo "[$(date +%T)] $*" >> "$OUT/ours.err"; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  $alt --version > "$OUT/ours-version.txt"
  stamp train
  run train --model rwkv4 --data shakespeare --config configs/nanogpt-cpu.toml --set model.width=768 --set model.depth=12 \
    --set model.context=$ctx --set train.steps=5 --set train.eval_every=5 --set train.eval_batches=1 --device cuda \
    --quiet --out /tmp/dec-run > /dev/null 2>> "$OUT/ours.err"
  run export --run /tmp/dec-run --out /tmp/dec-hf >> "$OUT/ours.err" 2>&1
  # the default (fused step, few-row products, replayed from a CUDA graph), then each of the
  # three switched off, then all three off (the step before issue 28's work)
  for dt in f32 bf16; do
    stamp "ours $dt"
    # batch 1 to 256: where the replayed step stops being bound by launch latency
    timeout 100 $alt bench decode --models rwkv4 --device cuda --width 768 --depth 12 --contexts $ctx \
      --batches 1,4,16,64,256 --memory-cap-gb 120 --dtype $dt --steps 10 --out "$OUT/ours-decode-$dt.jsonl" > /dev/null 2>> "$OUT/ours.err"
    for off in gemv decode-graph rwkv4-step,decode-graph,gemv; do
      stamp "ours $dt without $off"
      ALTFORMERS_UNFUSED=$off timeout 100 $alt bench decode --models rwkv4 --device cuda --width 768 --depth 12 \
        --contexts $ctx --batches 1 --dtype $dt --steps 10 --out "$OUT/ours-decode-$dt-off-${off//,/+}.jsonl" > /dev/null 2>> "$OUT/ours.err"
    done
  done
  if ls .whl/rwkv-*.whl > /dev/null 2>&1; then
    stamp peer
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/rwkv-*.whl
    (cd bench/peers && PYTHONPATH=/tmp/site timeout 240 python3 rwkv_decode.py --hf /tmp/dec-hf --context $ctx --tokens 300) \
      > "$OUT/peer-rwkv.jsonl" 2> "$OUT/peer-rwkv.err"
  fi
  head -c $ctx data/tinyshakespeare.txt > /tmp/dec-prompt
  for off in "" decode-graph; do
    stamp "generate without '$off'"
    echo "ALTFORMERS_UNFUSED=$off" >> "$OUT/ours-generate.txt"
    ALTFORMERS_UNFUSED=$off timeout 60 $alt generate --run /tmp/dec-run --device cuda --prompt "$(cat /tmp/dec-prompt)" \
      --tokens 1000 > /dev/null 2>> "$OUT/ours-generate.txt"
  done
  stamp done
  cut -c1-300 "$OUT"/ours-decode-*.jsonl "$OUT/peer-rwkv.jsonl"; cat "$OUT/ours-generate.txt"; tail -n 3 "$OUT/ours.err" "$OUT/peer-rwkv.err"
fi
if [ "$what" = decode-batch ]; then
  # Issue 28: tokens/s against batch size at 12 x 768 in bf16, up to where the step stops
  # scaling: RWKV-4, RetNet and the Transformer after 1K tokens (batch 1-1024), then RWKV-4 and
  # RetNet, whose state does not grow with the context, after 64 tokens up to batch 16384 (a
  # 1K-token prefill of 1024 sequences already leaves too little memory to capture the step).
  #   gpu-bench.sh decode-batch
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  for m in rwkv4 retnet transformer; do
    timeout 100 $alt bench decode --device cuda --models $m --width 768 --depth 12 --heads 12 --contexts 1024 \
      --batches 1,64,256,512,1024 --dtype bf16 --steps 5 --memory-cap-gb 120 --out "$OUT/decode-batch-$m.jsonl" > /dev/null 2>> "$OUT/ours.err"
  done
  for m in rwkv4 retnet; do
    timeout 100 $alt bench decode --device cuda --models $m --width 768 --depth 12 --heads 12 --contexts 64 \
      --batches 512,1024,2048,4096,8192,16384 --dtype bf16 --steps 5 --memory-cap-gb 120 --out "$OUT/decode-batch-short-$m.jsonl" > /dev/null 2>> "$OUT/ours.err"
  done
  # RetNet's one-token retention as tensor operations, for the fused step's gain
  ALTFORMERS_UNFUSED=retention-step timeout 60 $alt bench decode --device cuda --models retnet --width 768 --depth 12 --heads 12 \
    --contexts 64 --batches 1,256 --dtype bf16 --steps 5 --out "$OUT/decode-retnet-unfused-step.jsonl" > /dev/null 2>> "$OUT/ours.err"
  cut -c1-250 "$OUT"/decode-*.jsonl; tail -n 3 "$OUT/ours.err"
fi
if [ "$what" = decode-all ]; then
  # Issue 28's table: every causal model's step at GPT-2 small's shape (12 x 768, 12 heads),
  # bf16, batch 1, after 1K and 8K tokens; the Transformer's peer is transformers' GPT-2
  # with its KV cache (bench/peers/gpt2_decode.py), f32 and bf16, same contexts.
  #   gpu-bench.sh decode-all [contexts]
  ctxs="${2:-1024,8192}"
  $alt --version > "$OUT/ours-version.txt"
  echo "[$(date +%T)] ours" >> "$OUT/ours.err"
  # stdout kept too: each point is printed as it is measured, so a timeout keeps the finished ones
  timeout 220 $alt bench decode --device cuda --width 768 --depth 12 --heads 12 --contexts $ctxs --batches 1 \
    --dtype bf16 --steps 5 --time-cap 10 --out "$OUT/ours-decode-all.jsonl" > "$OUT/ours-decode-all.stdout" 2>> "$OUT/ours.err"
  echo "[$(date +%T)] peer" >> "$OUT/ours.err"
  (cd bench/peers && timeout 100 python3 gpt2_decode.py --contexts $ctxs --tokens 100) > "$OUT/peer-gpt2.jsonl" 2> "$OUT/peer-gpt2.err"
  echo "[$(date +%T)] done" >> "$OUT/ours.err"
  cut -c1-250 "$OUT/ours-decode-all.stdout" "$OUT/peer-gpt2.jsonl"; tail -n 3 "$OUT/ours.err" "$OUT/peer-gpt2.err"
fi
if [ "$what" = decode-large ]; then
  # Issue 28: RetNet's decoding claim (8.4x a Transformer with its KV cache at 8K context,
  # 6.7B parameters) at the paper's 6.7B shape: 32 layers x 4096, RetNet with 16 heads of 256
  # (the paper's), the Transformer with 32 of 128; bf16, batch 1. Weights drawn on the device.
  #   gpu-bench.sh decode-large [contexts]
  ctxs="${2:-1024,8192}"
  for m in retnet:16 transformer:32; do
    echo "[$(date +%T)] ${m%%:*}" >> "$OUT/ours.err"
    timeout 200 $alt bench decode --device cuda --models "${m%%:*}" --width 4096 --depth 32 --heads "${m#*:}" \
      --contexts $ctxs --batches 1 --dtype bf16 --steps 5 --time-cap 120 --memory-cap-gb 120 \
      --out "$OUT/ours-decode-large-${m%%:*}.jsonl" > "$OUT/ours-decode-large-${m%%:*}.stdout" 2>> "$OUT/ours.err"
  done
  cut -c1-300 "$OUT"/ours-decode-large-*.stdout; tail -n 3 "$OUT/ours.err"
fi
if [ "$what" = nccl ]; then
  # Issue 23's equality: the baby GPT trained in one process (batch B) and by `--gpus N` (N
  # workers of B / N rows each, gradients through NCCL), the same steps, in f32 and bf16
  # (DTYPES), twice each in one process (the GPU's run-to-run spread, the bf16 criterion), and
  # by the N workers each in two micro-batches (train.accumulate=2); the N-GPU run stopped
  # half-way and resumed in one process; the launcher's refusal of more GPUs than the host
  # has. N = GPUS (default: every GPU of the host).
  #   gpu-bench.sh nccl [steps]
  steps="${2:-200}"; half=$((steps / 2))
  gpus="${GPUS:-$(gpu_count)}"
  rm -rf /tmp/nccl-*
  for dtype in ${DTYPES:-f32 bf16}; do
    base="--model transformer --data shakespeare --config configs/nanogpt-baby.toml --set train.steps=$steps --set train.eval_every=$half --set train.eval_batches=4 --dtype $dtype --quiet"
    for how in one again gpus accumulated; do
      flags="--device cuda"; [ $how = gpus ] && flags="--gpus $gpus"
      # the same rows in two micro-batches per worker (eager: not captured)
      [ $how = accumulated ] && flags="--gpus $gpus --set train.accumulate=2"
      echo "[$(date +%T)] $dtype $how" >> "$OUT/nccl.err"
      start=$(date +%s%N)
      run train $base $flags --out /tmp/nccl-$dtype-$how > "$OUT/nccl-$dtype-$how.json" 2>> "$OUT/nccl.err"
      echo "$dtype $how ($flags) rc=$? wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))" >> "$OUT/nccl-summary.txt"
      cp /tmp/nccl-$dtype-$how/metrics.jsonl "$OUT/nccl-$dtype-$how.metrics.jsonl" 2>/dev/null
    done
  done
  echo "[$(date +%T)] stop and resume" >> "$OUT/nccl.err"
  base="--model transformer --data shakespeare --config configs/nanogpt-baby.toml --set train.steps=$steps --set train.eval_every=$half --set train.eval_batches=4 --dtype bf16 --quiet"
  run train $base --gpus $gpus --stop-after $half --out /tmp/nccl-resumed > /dev/null 2>> "$OUT/nccl.err"
  run train --model transformer --data shakespeare --resume --device cuda --dtype bf16 --quiet --out /tmp/nccl-resumed > "$OUT/nccl-resumed.json" 2>> "$OUT/nccl.err"
  cp /tmp/nccl-resumed/metrics.jsonl "$OUT/nccl-resumed.metrics.jsonl" 2>/dev/null
  echo "[$(date +%T)] more GPUs than the host has" >> "$OUT/nccl.err"
  run train $base --gpus $((gpus + 1)) --out /tmp/nccl-more > /dev/null 2> "$OUT/nccl-more.err"; echo "gpus $((gpus + 1)) rc=$?" >> "$OUT/nccl-summary.txt"
  cat "$OUT/nccl-summary.txt" "$OUT"/nccl-*.json "$OUT/nccl-more.err"; tail -n 5 "$OUT/nccl.err"
fi
if [ "$what" = multi-gpu-tests ]; then
  # Issue 23: the GPU tests that need two GPUs (ignored elsewhere): two ranks through NCCL as
  # threads of one process, data parallel against one GPU, LongNet's split sequence (eager,
  # and its step captured on both GPUs), a rank gone before the first collective.
  timeout 300 bash .gpu/run-tests.sh two_gpus --ignored > "$OUT/multi-gpu-tests.log" 2>&1; echo "rc=$?" >> "$OUT/multi-gpu-tests.log"
  grep -E "^test |test result|panicked|^Error|rc=" "$OUT/multi-gpu-tests.log"
fi
if [ "$what" = compare-gpus ]; then
  # Issue 23: which finishes a preset's language-model part sooner on this host's GPUs: one
  # run per GPU (compare's default) or each run data-parallel over every GPU, one after
  # another (`compare --data-parallel`); the same runs, so the losses should agree too.
  #   gpu-bench.sh compare-gpus        (PRESET=full|quick|FILE, MODELS=a,b to narrow)
  preset="${PRESET:-full}"; rm -rf /tmp/cmp-*
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  # a first process pays the driver's kernel compilation (about 20 s, cached on disk after)
  timeout 120 $alt compare --preset quick --parts lm --models transformer --device cuda --out /tmp/cmp-warm > /dev/null 2>&1
  for how in per-gpu data-parallel; do
    flags=""; [ $how = data-parallel ] && flags="--data-parallel"
    start=$(date +%s%N)
    timeout "${LIMIT:-280}" $alt compare --preset "$preset" --parts lm ${MODELS:+--models $MODELS} --device cuda $flags \
      --out /tmp/cmp-$how > "$OUT/cmp-$how.out" 2> "$OUT/cmp-$how.err"
    echo "$how rc=$? wall_s=$(( ($(date +%s%N) - start) / 1000000000 ))" >> "$OUT/compare-gpus.txt"
    cp /tmp/cmp-$how/quality.jsonl "$OUT/cmp-$how.quality.jsonl" 2>/dev/null
  done
  cat "$OUT/compare-gpus.txt"; tail -n 3 "$OUT"/cmp-*.err
  python3 - "$OUT" <<'PY'
import json, sys, os
rows = {}
for how in ("per-gpu", "data-parallel"):
    f = os.path.join(sys.argv[1], f"cmp-{how}.quality.jsonl")
    if os.path.exists(f):
        rows[how] = {(r["model"], r.get("seed")): r for r in map(json.loads, open(f))}
for key, r in rows.get("per-gpu", {}).items():
    d = rows.get("data-parallel", {}).get(key)
    print(key, "val_loss", r["val_loss"], "data-parallel", d and d["val_loss"], "elapsed_s", r["elapsed_s"], d and d["elapsed_s"])
PY
fi
if [ "$what" = longnet-sp ]; then
  # Issue 23, LongNet's sequence parallelism on the GPUs of this host (GPUS, default all):
  # training in one process against --gpus N --sequence-parallel (f32, dropout SP_DROPOUT or 0; pairs whose
  # longest segment spans more than a slice, so its dilated rows go through NCCL), then one
  # layer's forward and backward against T, one GPU alone and split over N.
  #   gpu-bench.sh longnet-sp [steps] [lengths]
  steps="${2:-100}"; lengths="${3:-65536,131072,262144,524288,1048576}"
  gpus="${GPUS:-$(gpu_count)}"
  base="--model longnet --data shakespeare --config configs/nanogpt-baby.toml --set model.dropout=${SP_DROPOUT:-0} --set model.options.segment_lengths=[32,64,128,512] --set model.options.dilation_rates=[1,2,4,16] --set train.steps=$steps --set train.eval_every=$((steps / 2)) --set train.eval_batches=4 --dtype f32 --quiet"
  rm -rf /tmp/sp-*
  for how in one split; do
    flags="--device cuda"; [ $how = split ] && flags="--gpus $gpus --sequence-parallel"
    echo "[$(date +%T)] train $how" >> "$OUT/sp.err"
    start=$(date +%s%N)
    run train $base $flags --out /tmp/sp-$how > "$OUT/sp-train-$how.json" 2>> "$OUT/sp.err"
    echo "train $how rc=$? wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))" >> "$OUT/sp-summary.txt"
    cp /tmp/sp-$how/metrics.jsonl "$OUT/sp-train-$how.metrics.jsonl" 2>/dev/null
  done
  for how in one split; do
    flags="--device cuda"; [ $how = split ] && flags="--gpus $gpus"
    echo "[$(date +%T)] bench $how" >> "$OUT/sp.err"
    timeout "${SP_TIMEOUT:-150}" $alt bench sequence-parallel $flags --lengths $lengths --width 512 --heads 8 --dtype bf16 --reps 3 \
      > "$OUT/sp-bench-$how.jsonl" 2>> "$OUT/sp.err"
    echo "bench $how rc=$?" >> "$OUT/sp-summary.txt"
  done
  cat "$OUT/sp-summary.txt" "$OUT"/sp-train-*.json; cut -c1-250 "$OUT"/sp-bench-*.jsonl; tail -n 8 "$OUT/sp.err"
fi
if [ "$what" = ddp ]; then
  # Issue 23, data-parallel scaling: ours (`train --gpus N`, NCCL) and PyTorch's
  # DistributedDataParallel (torchrun, bench/peers/gpt_train.py, eager and torch.compile) on
  # N GPUs of this host, N in NS (default: 1 and the host's count), the batch per GPU fixed
  # (baby 64, GPT-2-small shape 16: N GPUs train N times the tokens per step), nanoGPT's
  # character vocabulary on both sides; and ours in one process (no NCCL, the step as a CUDA
  # graph) as the one-GPU reference. Tokens/s of the second of two windows (ours), of the
  # timed steps (peer).
  #   gpu-bench.sh ddp [steps]     (SIZES="baby gpt2-small", NS="1 4", PEER=0 ours alone)
  steps="${2:-100}"; rm -rf /tmp/ddp-*
  gpus="$(gpu_count)"
  ns="${NS:-$( [ "$gpus" = 1 ] && echo 1 || echo "1 $gpus")}"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  for size in ${SIZES:-baby gpt2-small}; do
    cfg=configs/nanogpt-baby.toml; per=64; [ "$size" = gpt2-small ] && cfg=configs/gpt2-small-char.toml && per=16
    common="--model transformer --data shakespeare --config $cfg --tokenizer bench/tokenizers/shakespeare-chars.json --set train.steps=$steps --set train.eval_every=$((steps / 2)) --set train.eval_batches=1 --dtype bf16 --quiet"
    for n in alone $ns; do
      if [ $n = alone ]; then flags="--device cuda --set train.batch_size=$per"; else flags="--gpus $n --set train.batch_size=$((per * n))"; fi
      echo "[$(date +%T)] ours $size $n" >> "$OUT/ddp.err"
      timeout 250 $alt train $common $flags --out /tmp/ddp-$size-$n > /dev/null 2>> "$OUT/ddp.err"
      echo "{\"size\":\"$size\",\"gpus\":\"$n\",\"metrics\":[$(paste -sd, /tmp/ddp-$size-$n/metrics.jsonl)]}" >> "$OUT/ddp-ours.jsonl"
      if [ $n != alone ] && [ "${PEER:-1}" = 1 ]; then
        echo "[$(date +%T)] peer $size $n" >> "$OUT/ddp.err"
        (cd bench/peers && NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout 300 torchrun --standalone --nproc-per-node $n gpt_train.py --ddp \
          --data ../../data/tinyshakespeare.txt --sizes $size --steps $steps) >> "$OUT/ddp-peer.jsonl" 2>> "$OUT/ddp.err"
      fi
    done
  done
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for line in open(f"{out}/ddp-ours.jsonl"):
    r = json.loads(line)
    m = r["metrics"]
    print("ours", r["size"], "gpus", r["gpus"], "tokens/s", round(m[-1]["tokens_per_s"]) if m else None, "val", m[-1]["val_loss"] if m else None,
          "peak_bytes", m[-1].get("peak_memory_bytes") if m else None)
try:
    for line in open(f"{out}/ddp-peer.jsonl"):
        r = json.loads(line)
        print(r.get("peer"), r.get("size"), "gpus", r.get("world"), "tokens/s", round(r.get("tokens_per_s", 0)), "loss", r.get("loss"),
              "peak_bytes", r.get("peak_bytes"), r.get("status", ""))
except FileNotFoundError:
    pass
PY
  tail -n 5 "$OUT/ddp.err"
fi
if [ "$what" = faults ]; then
  # Issue 23, faults on the GPUs of this host (GPUS, default all): `train --gpus N` with a
  # checkpoint every 20 steps; once the first is written the last rank's worker is killed
  # (SIGKILL), and with two or more GPUs in a second job stopped (SIGSTOP: a hung worker; a
  # lone worker stopped has no peer to notice). Each job must stop within the timeout naming
  # that rank (read the launcher's lines); the first job's checkpoint must stay intact and
  # `--resume` on another GPU count (one process when N > 1, else still one) reach the loss
  # of the same job run without a stop (run after it, same step).
  gpus="${GPUS:-$(gpu_count)}"
  base="--model transformer --data shakespeare --config configs/nanogpt-baby.toml --dtype bf16 --quiet --set train.eval_every=20 --set train.eval_batches=1"
  rm -rf /tmp/fault-run
  start=$(date +%s%N)
  ALTFORMERS_TIMEOUT_S=30 timeout 300 $alt train $base --set train.steps=100000 --gpus $gpus --out /tmp/fault-run > "$OUT/fault-launcher.out" 2> "$OUT/fault-launcher.err" &
  launcher=$!
  for _ in $(seq 600); do [ -f /tmp/fault-run/checkpoint/state.json ] && break; sleep 0.1; done
  victim=$(pgrep -f "altformers.*--out /tmp/fault-run" | while read p; do
    r=$(tr '\0' '\n' < /proc/$p/environ 2>/dev/null | sed -n "s/^ALTFORMERS_RANK=//p"); [ "$r" = $((gpus - 1)) ] && echo $p; done | head -1)
  echo "checkpoint seen after $(( ($(date +%s%N) - start) / 1000000 )) ms; killing rank $((gpus - 1)) (pid $victim)" > "$OUT/fault-summary.txt"
  # no victim found: stop the launcher rather than wait on its 100000 steps
  if [ -n "$victim" ]; then kill -9 "$victim"; else echo "no worker of rank $((gpus - 1)) found" >> "$OUT/fault-summary.txt"; kill $launcher; fi
  killed=$(date +%s%N)
  wait $launcher; echo "launcher rc=$? after $(( ($(date +%s%N) - killed) / 1000000 )) ms" >> "$OUT/fault-summary.txt"
  python3 -c "import json; print('checkpoint step', json.load(open('/tmp/fault-run/checkpoint/state.json'))['step'])" >> "$OUT/fault-summary.txt" 2>&1
  # a hung worker (SIGSTOP) rather than a dead one: the others must give up after the 30 s
  # timeout (aborting NCCL once their CUDA graph is gone) and the launcher kill it, naming it
  if [ "$gpus" -gt 1 ]; then
  rm -rf /tmp/fault-hang
  ALTFORMERS_TIMEOUT_S=30 timeout 200 $alt train $base --set train.steps=100000 --gpus $gpus --out /tmp/fault-hang > /dev/null 2> "$OUT/fault-hang.err" &
  hanger=$!
  for _ in $(seq 600); do [ -f /tmp/fault-hang/checkpoint/state.json ] && break; sleep 0.1; done
  stopped=$(pgrep -f "altformers.*--out /tmp/fault-hang" | while read p; do
    r=$(tr '\0' '\n' < /proc/$p/environ 2>/dev/null | sed -n "s/^ALTFORMERS_RANK=//p"); [ "$r" = $((gpus - 1)) ] && echo $p; done | head -1)
  if [ -n "$stopped" ]; then kill -STOP "$stopped"; else echo "hang: no worker of rank $((gpus - 1)) found" >> "$OUT/fault-summary.txt"; kill $hanger; fi
  hung=$(date +%s%N)
  wait $hanger; echo "hang: launcher rc=$? after $(( ($(date +%s%N) - hung) / 1000000 )) ms (timeout 30 s; rc 124: it never stopped)" >> "$OUT/fault-summary.txt"
  [ -n "$stopped" ] && kill -9 "$stopped" 2>/dev/null
  grep -v "^ " "$OUT/fault-hang.err" | tail -n 3 >> "$OUT/fault-summary.txt"
  fi
  # resume (the saved config's steps: lower them to 40 past the checkpoint is not allowed, so
  # resume with the same settings on another count and stop 40 steps later)
  step=$(python3 -c "import json; print(json.load(open('/tmp/fault-run/checkpoint/state.json'))['step'])")
  flags="--device cuda"; [ "$gpus" = 1 ] && flags="--gpus 1"
  $alt train --model transformer --data shakespeare --resume --dtype bf16 --quiet $flags --stop-after $((step + 40)) --out /tmp/fault-run > "$OUT/fault-resume.out" 2> "$OUT/fault-resume.err"
  echo "resume ($flags) rc=$?" >> "$OUT/fault-summary.txt"; cp /tmp/fault-run/metrics.jsonl "$OUT/fault-metrics.jsonl"
  # the reference: the same job never stopped, to the same step ("reaches the same loss": bf16,
  # so within the run-to-run spread; `nccl` measures that spread)
  rm -rf /tmp/fault-ref
  $alt train $base --set train.steps=100000 --gpus $gpus --stop-after $((step + 40)) --out /tmp/fault-ref > /dev/null 2> "$OUT/fault-ref.err"
  echo "uninterrupted reference (--gpus $gpus) rc=$?" >> "$OUT/fault-summary.txt"; cp /tmp/fault-ref/metrics.jsonl "$OUT/fault-ref-metrics.jsonl" 2>/dev/null
  cat "$OUT/fault-summary.txt" "$OUT/fault-launcher.err" | grep -v "^ " | head -20; tail -n 1 "$OUT/fault-metrics.jsonl" "$OUT/fault-ref-metrics.jsonl"
fi
if [ "$what" = interop ]; then
  # Issue 26: the Hugging Face round trip against this machine's transformers.
  python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__)" > "$OUT/versions.txt" 2>&1
  $alt --version >> "$OUT/versions.txt"
  timeout 400 python3 bench/peers/hf_roundtrip.py --altformers "$PWD/.gpu/run.sh" --work /tmp/hf-roundtrip \
    > "$OUT/roundtrip.jsonl" 2> "$OUT/roundtrip.err"; echo "rc=$?" >> "$OUT/roundtrip.err"
  cat "$OUT/versions.txt"; cut -c1-300 "$OUT/roundtrip.jsonl"; tail -n 5 "$OUT/roundtrip.err"
fi
ls -la "$OUT"
