"""Peer for Hyena's long convolution: a causal convolution by torch.fft.rfft/irfft with
zero padding to 2T, f32, batch 64, width 768 (FlashFFTConv's benchmark shape)."""
import json
import sys

import torch

from common import emit, time_cuda

B, C = 64, 768


def fftconv(u, k):
    T = u.shape[-1]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :T]
    return y


for T in [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "1024,2048,4096,8192,16384").split(",")]:
    u = torch.randn(B, C, T, device="cuda", requires_grad=True)
    k = torch.randn(C, T, device="cuda", requires_grad=True)
    dout = torch.randn(B, C, T, device="cuda")
    # FLOPs: 3 FFTs of length 2T per channel row, ~5 n log2 n each, plus the product
    n = 2 * T
    flops = B * C * (3 * 5 * n * torch.log2(torch.tensor(float(n))).item() + 6 * n)
    torch.cuda.reset_peak_memory_stats()
    t = time_cuda(lambda: fftconv(u, k))
    emit("peer:torch-fftconv", "longconv", "fwd", T, B, C, 1, t, flops)

    def fb():
        fftconv(u, k).backward(dout)
    torch.cuda.reset_peak_memory_stats()
    t = time_cuda(fb)
    emit("peer:torch-fftconv", "longconv", "fwdbwd", T, B, C, 1, t, 3 * flops)
    del u, k, dout
