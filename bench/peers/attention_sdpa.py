"""Peer for causal attention: torch scaled_dot_product_attention, flash backend, bf16.
Same shapes as the issue's target: 16 heads of 128, batch x T = 64K tokens.
FLOPs counted causally: 2 B H T^2 D forward, 3.5x that for forward+backward."""
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import ceilings, emit, time_cuda

H, D, TOKENS = 16, 128, 65536
print(json.dumps({"ceilings": ceilings()}), flush=True)
for T in [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "2048,4096,8192,16384").split(",")]:
    B = TOKENS // T
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    fwd_flops = 2 * B * H * T * T * D
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.cuda.reset_peak_memory_stats()
        t = time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        emit("peer:torch-sdpa-flash", "attention", "fwd", T, B, H * D, H, t, fwd_flops)

        def fb():
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(dout)
        torch.cuda.reset_peak_memory_stats()
        t = time_cuda(fb)
        emit("peer:torch-sdpa-flash", "attention", "fwdbwd", T, B, H * D, H, t, 3.5 * fwd_flops)
    del q, k, v, dout
