# usage: p LABEL cmd...   records command, rc, first line of output (stderr then stdout)
A=/work/target-wt/release/altformers
T="--set model.width=16 --set model.depth=1 --set model.heads=2 --set train.steps=3 --set train.eval_every=3 --set train.eval_batches=1 --set train.batch_size=2 --set model.context=16"
p() { local label=$1; shift
  local out; out=$("$@" 2>/tmp/reliab/err.txt >/tmp/reliab/out.txt); local rc=$?
  local first; first=$(grep -v "^\s*$" /tmp/reliab/err.txt | head -1); case "$first" in *:) first="$first $(grep -v "^\s*$" /tmp/reliab/err.txt | sed -n 2p | sed "s/^ *//")";; esac; [ -z "$first" ] && first=$(head -c 300 /tmp/reliab/out.txt | head -1); local e; e=$(grep -m1 "^error:" /tmp/reliab/err.txt); case "$first" in error:*) ;; *) [ -n "$e" ] && first="$first | $e";; esac
  local bt=""; grep -q -E "panicked|backtrace|RUST_BACKTRACE|Stack backtrace" /tmp/reliab/err.txt && bt=" [PANIC/BACKTRACE]"
  echo "### $label"; echo "\$ ${*/\/work\/target-wt\/release\//}"; echo "rc=$rc$bt"; echo "> $first"; echo
}
