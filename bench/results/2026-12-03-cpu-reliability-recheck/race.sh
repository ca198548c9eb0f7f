A=/work/target-wt/release/altformers
T="--set model.width=16 --set model.depth=1 --set model.heads=2 --set model.context=16 --set train.steps=20 --set train.eval_every=5 --set train.eval_batches=1 --set train.batch_size=2"
for i in $(seq 1 10); do d=/tmp/reliab/race/r$i; rm -rf $d; mkdir -p /tmp/reliab/race
  $A --threads 1 train --model transformer --data shakespeare --out $d --quiet --set train.seed=1 $T >/tmp/reliab/race/a$i.out 2>&1 & pa=$!
  $A --threads 1 train --model transformer --data shakespeare --out $d --quiet --set train.seed=2 $T >/tmp/reliab/race/b$i.out 2>&1 & pb=$!
  wait $pa; ra=$?; wait $pb; rb=$?
  seed=$(grep -o '"seed": *[0-9]*' $d/config.json | head -1)
  $A --threads 1 eval --run $d --data shakespeare --max-bytes 4096 >/tmp/reliab/race/e$i.out 2>&1; re=$?
  msg=$( (grep -h -v '^{' /tmp/reliab/race/a$i.out /tmp/reliab/race/b$i.out) | head -1)
  echo "trial $i: seed1 rc=$ra seed2 rc=$rb | config $seed | eval rc=$re $(tail -1 /tmp/reliab/race/e$i.out | head -c 80) | LOCK left: $(ls $d/LOCK 2>/dev/null || echo none) | tmp left: $(ls $d | grep -c tmp) | refusal: $msg"
done
