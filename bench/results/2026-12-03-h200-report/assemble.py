"""Gathers the H200 JSON lines of issues 21 and 27 into this folder for `altformers report`:
run from this folder, then `altformers report --from bench/results/2026-12-03-h200-report`."""
import json

A = "../2026-12-02-h200-listops/"
B = "../2026-12-03-h200-reformer-listops/"
C = "../2026-12-03-h200-listops-matched/"


def points(path, keep):
    return [l for l in open(path) if '"seq"' in l and keep(json.loads(l)["model"])]


# fwd+bwd: every causal model from 2026-12-02 but Performer, re-measured on 2026-12-03 at its
# default m = 266 on the tensor-core scan
fwdbwd = points(A + "call1/scaling-causal.jsonl", lambda m: m != "performer")
fwdbwd += points(A + "call2/scaling-causal.jsonl", lambda m: True)
fwdbwd += points(B + "call1/scaling-performer-transformer.jsonl", lambda m: m == "performer")
# forward: 2026-12-03's sweep with the fixed time cap (stopped after aft-full), the rest from
# 2026-12-02 (its time-cap bug touched only the first three models, re-measured here)
today = points(B + "call2/scaling-causal-fwd.jsonl", lambda m: True)
done = {json.loads(l)["model"] for l in today}
fwd = today + points(A + "call3/scaling-causal-fwd.jsonl", lambda m: m not in done)
open("scaling.jsonl", "w").write("".join(fwd + fwdbwd))

rows = open(C + "call1/listops.jsonl").read() + open(B + "call2/listops.jsonl").read()
open("listops.jsonl", "w").write(rows)

meta = {
    "description": "The H200 results of issues 21 and 27 in one report. ListOps at LRA's lengths "
    "(configs/compare-listops-gpu.toml: 501-1999 tokens, 1000 steps of 32, bf16, parameters matched "
    "without the length-bound ones; Reformer with LRA's settings, in a second call). One causal mixer "
    "layer's time and memory against T (bf16, width 512, 8 heads, 64K tokens per batch), forward and "
    "forward+backward, the Transformer by the fused flash kernel. Assembled by assemble.py from the raw "
    "JSON lines of ../2026-12-02-h200-listops/, ../2026-12-03-h200-listops-matched/ and "
    "../2026-12-03-h200-reformer-listops/ (which curve comes from which run: README.md).",
    "provenance": {
        "date": "2026-12-02 and 2026-12-03",
        "machine": "device tool, Intel Xeon, 16 threads",
        "device": "NVIDIA H200",
        "commit": "7035846 and 5beecc6",
        "command": "bench/results/2026-12-02-h200-listops/run.sh",
    },
}
json.dump(meta, open("meta.json", "w"), indent=1)
