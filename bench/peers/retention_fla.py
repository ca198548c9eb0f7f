"""Peer for chunked retention: flash-linear-attention's chunk_retention (Triton), bf16,
16 heads of 128, batch x T = 64K tokens. Needs the fla wheel carried to the GPU machine."""
import json
import sys

import torch

from common import emit, time_cuda

try:
    from fla.ops.retention import chunk_retention
except Exception as e:  # noqa: BLE001
    print(json.dumps({"model": "peer:fla-chunk-retention", "status": f"unavailable: {e}"}))
    sys.exit(0)

H, D, TOKENS = 16, 128, 65536
for T in [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "2048,4096,8192,16384").split(",")]:
    B = TOKENS // T
    # fla's layout: [B, T, H, D]
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    C = 64
    # chunkwise FLOPs: intra-chunk 2 (QK^T, PV) x 2 B H T C D, state read/update 2 x 2 B H T D^2
    flops = 4 * B * H * T * C * D + 4 * B * H * T * D * D
    torch.cuda.reset_peak_memory_stats()
    t = time_cuda(lambda: chunk_retention(q, k, v))
    emit("peer:fla-chunk-retention", "retention", "fwd", T, B, H * D, H, t, flops)

    def fb():
        o, _ = chunk_retention(q, k, v)
        o.backward(dout)
    torch.cuda.reset_peak_memory_stats()
    t = time_cuda(fb)
    emit("peer:fla-chunk-retention", "retention", "fwdbwd", T, B, H * D, H, t, 3 * flops)
    del q, k, v, dout
