"""Three quick-preset runs' time exponents (each folder's scaling-fits.jsonl) beside a dedicated
run's (DIR/points-MODEL.jsonl fit lines), with intervals, as a markdown table.
   python3 compare3.py DEDICATED_DIR QUICK1 QUICK2 QUICK3   (a folder, or its scaling-fits.jsonl)

With DEDICATED_PROCESSES=n (the dedicated run's processes, its interval a t interval over their
exponents, estimate +- t s / sqrt(n)) it also counts the runs inside the dedicated run's 95%
prediction interval, estimate +- t s sqrt(1 + 1/n): the range a further independent run's
exponent falls in 95% of the time. A confidence interval for the dedicated estimate holds an
independent run of the same spread only about 83% of the time, so that is the fair test of
"within the dedicated run's interval"."""
import json
import math
import os
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
counts = [0, 0, 0, 0, 0]
runs_inside = 0
processes = int(os.environ.get("DEDICATED_PROCESSES", "0"))
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
    runs_inside += inside
    counts[3] += overlap == len(slopes)
    if processes:
        half = (hi - lo) / 2 * math.sqrt(processes + 1)
        counts[4] += sum(abs(s - d["time_slope"]) <= half for s in slopes)
    print(f"| {model} | {' / '.join(fmt(q) for q in qs)} | {spread:.2f} | {fmt(d)} | {inside} of {len(slopes)} | {overlap} of {len(slopes)} |")
n = len(runs[0])
print(f"\n{counts[1]} of {n} models: every run within 0.1 of the three runs' mean; {counts[2]} of {n}: every run inside the dedicated interval ({runs_inside} runs in all); {counts[3]} of {n}: every run's interval overlaps the dedicated one.")
if processes:
    total = sum(len([run for run in runs if m in run]) for m in runs[0] if ded.get(m, {}).get("time_slope_interval"))
    print(f"{counts[4]} of {total} runs inside the dedicated run's 95% prediction interval ({processes} processes).")
