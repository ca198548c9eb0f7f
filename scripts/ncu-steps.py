"""Per-step kernel time and launches from two ncu-summary.py tables of the same training run
at two step counts (same evaluation and start-up in both): their difference divided by the
extra steps is what one steady training step launches.
   python3 scripts/ncu-steps.py ncu-baby-3.txt ncu-baby-8.txt 5 [top]"""
import sys


def load(path):
    table = {}
    for line in open(path).readlines()[1:]:
        name, rest = line[:90].strip(), line[90:].split()
        if len(rest) >= 3 and name != "all kernels":
            table[name] = (int(rest[0]), float(rest[1]))
    return table


few, many, steps = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
rows = []
for name, (n, us) in many.items():
    n0, us0 = few.get(name, (0, 0.0))
    rows.append(((us - us0) / steps / 1e3, (n - n0) / steps, name))
rows.sort(reverse=True)
print(f"{'ms/step':>8s} {'launches':>9s}  kernel")
for ms, n, name in rows[:top]:
    print(f"{ms:8.3f} {n:9.1f}  {name[:80]}")
print(f"{sum(r[0] for r in rows):8.3f} {sum(r[1] for r in rows):9.1f}  all kernels, per step")
