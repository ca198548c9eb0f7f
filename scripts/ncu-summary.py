"""Sums Nsight Compute's per-launch kernel durations by kernel name, largest first.
   ncu --clock-control none --metrics gpu__time_duration.sum --csv PROGRAM > profile.csv
   python3 scripts/ncu-summary.py profile.csv"""
import csv
import sys
from collections import defaultdict

rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
total = defaultdict(float)
count = defaultdict(int)
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    us = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1.0)
    name = r["Kernel Name"][:90]
    total[name] += us
    count[name] += 1
grand = sum(total.values())
print(f"{'kernel':90s} {'launches':>8s} {'total us':>10s} {'share':>6s}")
for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"{name:90s} {count[name]:8d} {us:10.1f} {100 * us / grand:5.1f}%")
print(f"{'all kernels':90s} {sum(count.values()):8d} {grand:10.1f}")
