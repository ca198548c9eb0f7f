A=/work/target-wt/release/altformers
T="--set model.width=16 --set model.depth=1 --set model.heads=2 --set model.context=16 --set train.steps=12000 --set train.eval_every=50 --set train.eval_batches=1 --set train.batch_size=2"
d=/tmp/reliab/kill/run; rm -rf /tmp/reliab/kill; mkdir -p /tmp/reliab/kill
steps() { python3 -c "import json,sys; print(' '.join(str(json.loads(l)['step']) for l in open(sys.argv[1]) if l.strip()))" $d/metrics.jsonl 2>/dev/null; }
ck() { python3 -c "import json; print(json.load(open('$d/checkpoint/state.json'))['step'])" 2>/dev/null || echo none; }
resume=""
for i in $(seq 1 12); do
  $A --threads 1 train --model transformer --data shakespeare --out $d --quiet $([ -z "$resume" ] && echo $T) $resume >/tmp/reliab/kill/t$i.out 2>&1 & pid=$!
  s=$(python3 -c "import random; print(round(random.uniform(0.05, 0.6), 2))"); sleep $s; kill -9 $pid 2>/dev/null; wait $pid; rc=$?
  c=$(ck); st=$(steps)
  # every multiple of eval_every up to the checkpoint must be in metrics
  missing=$(python3 -c "
c='$c'; s=set(int(x) for x in '$st'.split())
print(' '.join(str(k) for k in range(50, int(c)+1, 50) if k not in s) if c!='none' else '')")
  echo "kill $i after ${s}s: rc=$rc checkpoint=$c metric lines=$(echo $st | wc -w) last=$(echo $st | awk '{print $NF}') missing<=ckpt:[${missing}] LOCK:$(cat $d/LOCK 2>/dev/null | tr '\n' ' ') $(head -c 200 /tmp/reliab/kill/t$i.out | grep -v '^{' | head -1)"
  if [ "$c" = none ]; then resume=""; else resume="--resume"; fi
done
$A --threads 1 train --model transformer --data shakespeare --out $d --quiet --resume > /tmp/reliab/kill/final.out 2>&1; echo "final --resume: rc=$? $(grep -v '^{' /tmp/reliab/kill/final.out | head -2 | tr '\n' ' ')"
st=$(steps); echo "metric lines after: $(echo $st | wc -w) (expected 240), steps sorted&unique: $(python3 -c "s='$st'.split(); print(s==sorted(set(s),key=int) and len(s)==240)")"
# uninterrupted reference
rm -rf /tmp/reliab/kill/ref; $A --threads 1 train --model transformer --data shakespeare --out /tmp/reliab/kill/ref --quiet $T >/dev/null 2>&1
python3 - <<'PY'
import json
a=[json.loads(l) for l in open('/tmp/reliab/kill/run/metrics.jsonl')]; b=[json.loads(l) for l in open('/tmp/reliab/kill/ref/metrics.jsonl')]
k=('step','train_loss','val_loss','lr')
print('same step/train_loss/val_loss/lr as an uninterrupted run:', [tuple(x[j] for j in k) for x in a]==[tuple(x[j] for j in k) for x in b], len(a), len(b))
PY
$A --threads 1 eval --run $d --data shakespeare --max-bytes 4096; echo "eval rc=$?"
