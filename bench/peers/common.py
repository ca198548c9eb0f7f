"""Shared timing and output for the peer scripts: the same JSON lines as
`altformers bench scaling`, so one report holds ours and theirs."""
import json
import sys

import torch


def time_cuda(fn, warmup=3, reps=10):
    """Median/min/max seconds of `fn()` over `reps` runs after `warmup`, with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    n = len(times)
    median = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    return {"median_s": median, "min_s": times[0], "max_s": times[-1], "reps": n}


def emit(model, component, mode, seq, batch, width, heads, timing, flops, status="ok", out=sys.stdout):
    peak = torch.cuda.max_memory_allocated()
    line = {
        "model": model, "component": component, "mode": mode, "device": "cuda", "seq": seq,
        "batch": batch, "width": width, "heads": heads, "status": status, "timing": timing,
        "peak_bytes": peak, "flops": flops,
        "flops_per_s": (flops / timing["median_s"]) if timing else None,
    }
    print(json.dumps(line), file=out, flush=True)


def ceilings():
    """bf16 matmul 8192^3 and device-to-device copy on this GPU, for the roofline."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b)
    x = torch.empty(2 * 1024**3 // 4, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    c = time_cuda(lambda: y.copy_(x))
    return {"bf16_matmul_tflops": 2 * n**3 / t["median_s"] / 1e12,
            "copy_tb_s": 2 * x.numel() * 4 / c["median_s"] / 1e12,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
