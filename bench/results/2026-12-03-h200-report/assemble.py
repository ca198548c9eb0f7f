"""Gathers the H200 JSON lines of issues 21 and 27 into this folder for `altformers report`:
run from this folder, then `altformers report --from bench/results/2026-12-03-h200-report`."""
import json, os

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

# decoding: every causal model at 12 x 768 (bf16, batch 1); 1K and 8K in one process, 16K and
# 64K each model in its own process (the pool's cached memory now handed back between models, `device::release_cached_memory`;
# lines that did not come back as files were re-typed from the call's printed output, marked
# in ../2026-12-03-h200-decode-long/README.md); M2 and AFT-local at 16K from the one-process
# call before it (eager models: the capture failures there touch only replayed ones)
D = "../2026-12-03-h200-decode-long/"


def decode(path, keep=lambda r: True):
    return [l for l in open(path) if '"latency_s"' in l and keep(json.loads(l))]


# AFT-local and AFT-conv replayed since ea7a0d3 (call 4) replace their op-by-op lines
replayed = ("aft-local", "aft-conv")
dec = decode(D + "call1/ours-decode-all.jsonl", lambda r: r["model"] not in replayed)
for f in ["aft-local", "aft-conv", "reformer"]:
    dec += decode(D + f"call4/d-{f}.jsonl")
for f in ["aft-full", "aft-simple", "hourglass", "hyena", "longnet"]:
    dec += decode(D + f"call3/long-{f}.jsonl")
dec += decode(D + "call3/reconstructed-from-printed-output.jsonl")
dec += decode(D + "call2/long.stdout", lambda r: r["model"] == "m2")
# call 6 (75f550f: models for inference record no gradient graph): the 64K prefills that ran out
# of memory before now run; their lines replace the failed ones
redone = [l for f in ["m2", "longnet", "performer", "aft-conv"] for l in decode(D + f"call6/long-{f}.jsonl")]
point = lambda l: (json.loads(l)["model"], json.loads(l)["context"])
dec = [l for l in dec if point(l) not in {point(r) for r in redone}] + redone
open("decode.jsonl", "w").write("".join(dec))

# training throughput (issue 24), ../2026-12-03-h200-train-speed/: the Transformer and PyTorch's
# nanoGPT recipe in one call (call 12, 0ba1e11); the other models at the baby size from call 10
# (1040a0e), RetNet from call 15 (its rotary embedding and normalisations fused); ours = the
# second 100-step window's rate; ours (every model) and the peers in one call (session 47's last,
# 92d7ae7: the training step replayed from a CUDA graph)
T = "../2026-12-03-h200-train-speed/"
FINAL = T + "s47-call10-92d7ae7-final/"
speed = []
def ours(path):
    for l in open(path):
        r = json.loads(l)
        last = r["metrics"][-1]
        speed.append({"model": r.get("model", "transformer"), "size": r.get("size", "baby"),
                      "trainer": "altformers", "tokens_per_s": last["tokens_per_s"], "loss": last["train_loss"]})
ours(FINAL + "ours.jsonl")
ours(FINAL + "ours-models.jsonl")
for l in open(FINAL + "peer.jsonl"):
    r = json.loads(l)
    speed.append({"model": "transformer", "size": r["size"], "trainer": r["peer"].replace("gpt-", ""),
                  "tokens_per_s": r["tokens_per_s"], "loss": r["loss"]})
open("training-speed.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in speed))

meta = {
    "description": "The H200 results of issues 21, 27 and 28 in one report. ListOps at LRA's lengths "
    "(configs/compare-listops-gpu.toml: 501-1999 tokens, 1000 steps of 32, bf16, parameters matched "
    "without the length-bound ones; Reformer with LRA's settings, in a second call). One causal mixer "
    "layer's time and memory against T (bf16, width 512, 8 heads, 64K tokens per batch), forward and "
    "forward+backward, the Transformer by the fused flash kernel. Decoding: every causal model at 12 layers x 768 (GPT-2 small's shape), bf16, batch 1, after 1K-64K tokens of context. Assembled by assemble.py from the raw "
    "JSON lines of ../2026-12-02-h200-listops/, ../2026-12-03-h200-listops-matched/ and "
    "../2026-12-03-h200-reformer-listops/, ../2026-12-03-h200-decode-long/ (which curve comes from which run: README.md).",
    "provenance": {
        "date": "2026-12-02 and 2026-12-03",
        "machine": "device tool, Intel Xeon, 16 threads",
        "device": "NVIDIA H200",
        "commit": "7035846 and 5beecc6; decoding 41c674c (AFT-local/conv ea7a0d3)",
        "command": "bench/results/2026-12-02-h200-listops/run.sh; decoding: altformers bench decode (../2026-12-03-h200-decode-long/README.md)",
    },
}
json.dump(meta, open("meta.json", "w"), indent=1)
