"""Issue 28's peer: the official `rwkv` package (BlinkDL's ChatRWKV inference code, PyPI
`rwkv`) decoding one RWKV-4 checkpoint token by token, as its users run it.

The checkpoint is ours, exported with `altformers export --format hf` (transformers'
`RwkvForCausalLM` layout); it is renamed here to the original RWKV-4 `.pth` layout the package
reads (the inverse of transformers' conversion script). Before timing, the package's fp32
logits on the prompt are compared with transformers' own `RwkvForCausalLM` on the same folder
(which the round trip in hf_roundtrip.py matches against ours), so the timed model is the
checkpoint's model.

Each setting runs in its own process (the package reads RWKV_JIT_ON / RWKV_CUDA_ON when it is
imported): prefill `--context` tokens with `forward(tokens, None)`, then `--tokens` steps of
`forward([token], state)` with greedy sampling on the GPU (`argmax(...).item()`: one host
sync per token, as any generation loop has). The median of the per-token wall times (each
token timed between two CUDA synchronisations) and the mean over the whole run are printed
as one JSON line per setting.

    python3 rwkv_decode.py --hf HF_FOLDER [--context 1024] [--tokens 300]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def convert(hf, pth):
    """transformers' RwkvForCausalLM safetensors -> the original RWKV-4 .pth state dict."""
    import torch
    from safetensors.torch import load_file

    weights = {}
    for name in sorted(os.listdir(hf)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(hf, name)))
    out = {}
    for key, value in weights.items():
        k = key.removeprefix("rwkv.")
        k = k.replace("embeddings.", "emb.").replace(".pre_ln.", ".ln0.")
        k = k.replace(".attention.", ".att.").replace(".feed_forward.", ".ffn.")
        for long, short in (("time_mix_key", "time_mix_k"), ("time_mix_value", "time_mix_v"),
                            ("time_mix_receptance", "time_mix_r")):
            k = k.replace(long, short)
        out[k] = value.float().contiguous()
    torch.save(out, pth)


def check(hf, pth, prompt, strategy):
    """Largest |logit difference| between the package (fp32, on the GPU) and transformers."""
    import torch
    from transformers import RwkvForCausalLM
    from rwkv.model import RWKV

    ref = RwkvForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0, -1]
    ours = RWKV(model=pth.removesuffix(".pth"), strategy=strategy, verbose=False)
    got, _ = ours.forward(prompt, None)
    return float((got.float().cpu() - want).abs().max()), float(want.abs().max())


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_setting(pth, strategy, context, tokens):
    import torch
    from rwkv.model import RWKV

    model = RWKV(model=pth.removesuffix(".pth"), strategy=strategy, verbose=False)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (context,), generator=gen).tolist()
    sync()
    t0 = time.perf_counter()
    out, state = model.forward(prompt, None)
    sync()
    prefill_s = time.perf_counter() - t0
    token = int(torch.argmax(out))
    for _ in range(20):  # warm-up: TorchScript profiles and specialises its graphs
        out, state = model.forward([token], state)
        token = int(torch.argmax(out))
    times = []
    start = time.perf_counter()
    for _ in range(tokens):
        t = time.perf_counter()
        out, state = model.forward([token], state)
        token = int(torch.argmax(out))  # .item(): the sync every sampler has
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {
        "ms_per_token_median": 1e3 * statistics.median(times),
        "ms_per_token_mean": 1e3 * total / tokens,
        "ms_per_token_min": 1e3 * min(times),
        "prefill_s": prefill_s,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True, help="an RwkvForCausalLM folder (altformers export --format hf)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--strategies", default="cuda fp32,cuda fp16,cuda bf16")
    ap.add_argument("--check-strategy", default="cuda fp32")
    ap.add_argument("--kernels", default="0,1", help="RWKV_CUDA_ON values to run (1 compiles the package's kernel)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one setting in this process
    args = ap.parse_args()
    pth = os.path.join("/tmp", "rwkv-peer-" + os.path.basename(os.path.abspath(args.hf)) + ".pth")
    if args.one:
        import rwkv
        import torch
        row = {"peer": "rwkv", "version": getattr(rwkv, "__version__", None) or "0.8.32", "strategy": args.one,
               "cuda_kernel": os.environ["RWKV_CUDA_ON"] == "1", "jit": os.environ["RWKV_JIT_ON"] == "1",
               "context": args.context, "batch": 1, "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        row.update(time_setting(pth, args.one, args.context, args.tokens))
        print(json.dumps(row), flush=True)
        return
    convert(args.hf, pth)
    os.environ.update(RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    diff, scale = check(args.hf, pth, list(b"ROMEO:\nWhat say you, my lord?"), args.check_strategy)
    print(json.dumps({"check": "rwkv package fp32 vs transformers RwkvForCausalLM", "max_abs_diff": diff,
                      "largest_logit": scale}), flush=True)
    if diff > 1e-3 * max(1.0, scale):
        sys.exit(f"the converted checkpoint does not give transformers' logits (difference {diff})")
    failed = False
    for kernel in args.kernels.split(","):
        for strategy in args.strategies.split(","):
            env = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON=kernel)
            r = subprocess.run([sys.executable, __file__, "--hf", args.hf, "--context", str(args.context),
                                "--tokens", str(args.tokens), "--one", strategy], env=env, capture_output=True, text=True)
            sys.stdout.write(r.stdout)
            sys.stdout.flush()
            if r.returncode != 0:
                failed = True
                print(json.dumps({"peer": "rwkv", "strategy": strategy, "cuda_kernel": kernel == "1",
                                  "error": r.stderr.strip().splitlines()[-1:] }), flush=True)
                sys.stderr.write(r.stderr[-3000:])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
