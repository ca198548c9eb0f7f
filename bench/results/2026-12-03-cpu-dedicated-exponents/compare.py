"""Each model's three quick-preset time exponents (../2026-12-03-cpu-quick-4cef327: run 1
scaling-fits.jsonl, runs 2 and 3 run2-/run3-scaling-fits.jsonl) beside its dedicated run's
exponent and 95% bootstrap interval (DIR/points-MODEL.jsonl's fit line), as a markdown table.
   python3 compare.py DIR"""
import json
import sys
from pathlib import Path

here = Path(__file__).parent
quick = here / "../2026-12-03-cpu-quick-4cef327"


def fits(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if "time_slope" in r and r.get("mode", "fwd") == "fwd":
            out[r["model"]] = r
    return out


runs = [fits(quick / f) for f in ("scaling-fits.jsonl", "run2-scaling-fits.jsonl", "run3-scaling-fits.jsonl")]
ded = {}
for f in sorted(Path(sys.argv[1]).glob("points-*.jsonl")):
    ded.update(fits(f))
print("| model | quick run 1 / 2 / 3 | dedicated (95% interval) | quick runs inside the interval | largest distance from the dedicated |")
print("|---|---|---|---|---|")
for model, r in runs[0].items():
    qs = [run[model]["time_slope"] for run in runs if model in run]
    d = ded.get(model)
    if d is None:
        print(f"| {model} | {' / '.join(f'{q:.2f}' for q in qs)} | - | - | - |")
        continue
    lo, hi = d["time_slope_interval"] or (d["time_slope"], d["time_slope"])
    inside = sum(lo <= q <= hi for q in qs)
    far = max(abs(q - d["time_slope"]) for q in qs)
    print(f"| {model} | {' / '.join(f'{q:.2f}' for q in qs)} | {d['time_slope']:.2f} ({lo:.2f} to {hi:.2f}) | {inside} of {len(qs)} | {far:.2f} |")
