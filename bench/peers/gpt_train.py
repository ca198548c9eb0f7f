"""Peer for issue 24: whole-model GPT training speed on one GPU, the way a PyTorch user writes
it (nanoGPT's recipe): `torch.autocast(bfloat16)`, `F.scaled_dot_product_attention(is_causal=True)`,
`torch.optim.AdamW(fused=True)`, gradient clipping at 1.0, optionally `torch.compile(model)`.
The model is nanogpt_char.py's GPT (tied embeddings, no biases, dropout as configured); the
data are random windows of the character-level corpus, as `altformers train` draws them.

One JSON line per (size, mode): tokens/s and the median step time over the timed steps (after
untimed warm-up steps, which include compilation), the share of the bf16 matmul ceiling that
rate is (model FLOPs utilisation, PaLM's count: 6 N + 12 L T d per token), peak memory, and the
training loss at the last step (so two trainers are seen doing the same computation).

    python3 gpt_train.py --data ../../data/tinyshakespeare.txt --sizes baby,gpt2-small --modes eager,compile

Launched by torchrun (`torchrun --standalone --nproc-per-node N gpt_train.py ...`), it trains
data-parallel with `DistributedDataParallel` over NCCL (its default 25 MB buckets, overlapped
with the backward), each rank on its own GPU and its own random windows, the batch per GPU as
the size says (so N GPUs train N times the tokens per step); rank 0 prints the whole job's
tokens/s, `world` and MFU per GPU. The peer of `altformers train --gpus N`.

`--arch fla-retnet` trains flash-linear-attention's own RetNet model (`fla.models`,
RetNetForCausalLM: chunked retention in Triton, its fused norms, SwiGLU and cross-entropy;
no dropout) at the same sizes instead, the peer of `altformers train --model retnet`. Its
loss is over T - 1 positions (fla shifts the labels inside the model).
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nanogpt_char import GPT

# name: (layers, heads, width, context, batch, dropout) -- configs/nanogpt-baby.toml and
# configs/gpt2-small-char.toml
SIZES = {
    "baby": (6, 6, 384, 256, 64, 0.2),
    "gpt2-small": (12, 12, 768, 1024, 16, 0.0),
}


def distributed():
    """(rank, world, device) of a torchrun worker, NCCL joined; (0, 1, "cuda") alone."""
    import os
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, "cuda"
    # NVLink multicast stays off (on this project's machines it can put the host's GPUs out
    # of service); read by NCCL when the process group starts
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[name] = value
    import torch.distributed as dist
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}"


def run(size, mode, text, args):
    layers, heads, width, context, batch, dropout = SIZES[size]
    rank, world, dev = args.rank, args.world, args.device
    torch.manual_seed(args.seed + rank)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    train = data[: int(0.9 * len(data))].to(dev)

    def get_batch():
        ix = torch.randint(len(train) - context, (batch,), device=dev)
        offsets = torch.arange(context + 1, device=dev)
        w = train[ix[:, None] + offsets]
        return w[:, :-1], w[:, 1:]

    if args.arch == "fla-retnet":
        from fla.models import RetNetConfig, RetNetForCausalLM

        config = RetNetConfig(hidden_size=width, num_hidden_layers=layers, num_heads=heads, vocab_size=len(chars),
                              max_position_embeddings=context, tie_word_embeddings=False)
        model = RetNetForCausalLM(config).to(dev)
        dropout = 0.0
    else:
        model = GPT(len(chars), context, layers, heads, width, dropout).to(dev)
    ddp = model
    if world > 1 or args.ddp:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(dev).index or 0])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), fused=True)
    compiled = torch.compile(ddp) if mode == "compile" else ddp
    if args.arch == "fla-retnet":
        def step_fn(x, y):  # fla shifts the labels itself: the window is both
            return compiled(input_ids=x, labels=x).loss
    else:
        step_fn = compiled
    model.train()
    if args.verbose:
        print(f"{args.arch} built: {sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr, flush=True)
    torch.cuda.reset_peak_memory_stats()

    def step():
        x, y = get_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if args.profile:
        return profile(step, size, mode, args)
    compile_start = time.time()
    for i in range(args.warmup_steps):
        step()
        if args.verbose:  # where a first run's compilation and autotuning spend their time
            torch.cuda.synchronize()
            print(f"warm-up step {i}: {time.time() - compile_start:.1f} s", file=sys.stderr, flush=True)
    torch.cuda.synchronize()
    warmup_s = time.time() - compile_start
    # step times from CUDA events (no synchronisation between steps, as in a training loop);
    # the rate from the wall time of all timed steps
    events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    start = time.time()
    events[0].record()
    for i in range(args.steps):
        loss = step()
        events[i + 1].record()
    torch.cuda.synchronize()
    wall = time.time() - start
    step_ms = [events[i].elapsed_time(events[i + 1]) for i in range(args.steps)]
    tokens = args.steps * batch * context * world
    params = sum(p.numel() for p in model.parameters())
    if args.arch == "gpt":
        params -= model.wpe.weight.numel()
    flops_per_token = 6 * params + 12 * layers * context * width
    tokens_per_s = tokens / wall
    return {
        "peer": f"{args.arch}-pytorch-{mode}", "size": size, "layers": layers, "heads": heads, "width": width,
        "context": context, "batch": batch, "dropout": dropout, "params": params,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "warmup_s": warmup_s,
        "tokens_per_s": tokens_per_s, "step_ms_median": statistics.median(step_ms),
        "world": world, "ddp": ddp is not model,
        "mfu": tokens_per_s / world * flops_per_token / args.ceiling, "ceiling_flops": args.ceiling,
        "peak_bytes": torch.cuda.max_memory_allocated(), "loss": loss.item(),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
    }


def profile(step, size, mode, args):
    """Kernels per step and their GPU time per step, from PyTorch's profiler over `steps` steps
    after the warm-up (launch counts to set beside ours from Nsight Compute)."""
    for _ in range(args.warmup_steps):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kinds, names = {}, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = "memcpy/memset" if e.name.lower().startswith(("memcpy", "memset")) else "kernel"
        n, us = kinds.get(kind, (0, 0.0))
        kinds[kind] = (n + 1, us + e.time_range.elapsed_us())
        n, us = names.get(e.name, (0, 0.0))
        names[e.name] = (n + 1, us + e.time_range.elapsed_us())
    # the kernels that take the most time, to set beside ours kernel by kernel
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:30]
    return {
        "peer": f"{args.arch}-pytorch-{mode}", "size": size, "profile_steps": args.steps,
        **{f"{k}_per_step": n / args.steps for k, (n, _) in kinds.items()},
        **{f"{k}_gpu_ms_per_step": us / 1e3 / args.steps for k, (_, us) in kinds.items()},
        "top_kernels": [{"name": k[:100], "per_step": n / args.steps, "gpu_ms_per_step": us / 1e3 / args.steps}
                        for k, (n, us) in top],
        "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--arch", default="gpt", choices=["gpt", "fla-retnet"])
    p.add_argument("--sizes", default="baby,gpt2-small")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--profile", action="store_true", help="kernels per step instead of timing")
    p.add_argument("--verbose", action="store_true", help="print each warm-up step's time to stderr")
    # the bf16 dense matmul rate measured on this GPU type (bench/results/2026-11-29-h200-kernels)
    p.add_argument("--ceiling", type=float, default=788e12)
    p.add_argument("--ddp", action="store_true", help="wrap in DistributedDataParallel even on one GPU (under torchrun)")
    args = p.parse_args()
    args.rank, args.world, args.device = distributed()
    text = open(args.data, encoding="utf-8").read()
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            try:
                row = run(size, mode, text, args)
            except Exception as e:  # one failing row stops none
                row = {"peer": f"{args.arch}-pytorch-{mode}", "size": size, "status": f"failed: {e}"[:300]}
            if args.rank == 0:
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.world > 1 or args.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
