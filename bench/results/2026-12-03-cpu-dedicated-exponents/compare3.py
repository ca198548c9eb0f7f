"""Three quick-preset runs' time exponents (each folder's scaling-fits.jsonl) beside a dedicated
run's (DIR/points-MODEL.jsonl fit lines), with intervals, as a markdown table.
   python3 compare3.py DEDICATED_DIR QUICK1 QUICK2 QUICK3   (a folder, or its scaling-fits.jsonl)"""
import json
import sys
from pathlib import Path


def fits(paths):
    out = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if "time_slope" in r and r.get("mode", "fwd") == "fwd" and r["time_slope"] is not None:
                out[r["model"]] = r
    return out


ded = fits(sorted(Path(sys.argv[1]).glob("points-*.jsonl")))
runs = [fits([Path(d) / "scaling-fits.jsonl" if Path(d).is_dir() else Path(d)]) for d in sys.argv[2:]]
fmt = lambda r: f"{r['time_slope']:.2f} ({r['time_slope_interval'][0]:.2f} to {r['time_slope_interval'][1]:.2f})" if r.get("time_slope_interval") else f"{r['time_slope']:.2f}"
print("| model | quick runs 1 / 2 / 3 | spread | dedicated | runs inside the dedicated interval | runs whose interval overlaps it |")
print("|---|---|---|---|---|---|")
counts = [0, 0, 0, 0]
for model in runs[0]:
    qs = [run[model] for run in runs if model in run]
    slopes = [q["time_slope"] for q in qs]
    d = ded.get(model)
    spread = max(slopes) - min(slopes)
    if d is None or not d.get("time_slope_interval"):
        print(f"| {model} | {' / '.join(fmt(q) for q in qs)} | {spread:.2f} | - | - | - |")
        continue
    lo, hi = d["time_slope_interval"]
    inside = sum(lo <= s <= hi for s in slopes)
    overlap = sum(not (q["time_slope_interval"][1] < lo or hi < q["time_slope_interval"][0]) for q in qs if q.get("time_slope_interval"))
    counts[0] += spread <= 0.2
    counts[1] += all(abs(s - sum(slopes) / len(slopes)) <= 0.1 for s in slopes)
    counts[2] += inside == len(slopes)
    counts[3] += overlap == len(slopes)
    print(f"| {model} | {' / '.join(fmt(q) for q in qs)} | {spread:.2f} | {fmt(d)} | {inside} of {len(slopes)} | {overlap} of {len(slopes)} |")
n = len(runs[0])
print(f"\n{counts[1]} of {n} models: every run within 0.1 of the three runs' mean; {counts[2]} of {n}: every run inside the dedicated interval; {counts[3]} of {n}: every run's interval overlaps the dedicated one.")
