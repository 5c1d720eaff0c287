"""Profile helper: one layer's packed decode attention at one context (default launch), run N times.
Use under ncu / with TRITON_CACHE_DIR set to inspect the compiled kernel.

    python benchmarks/quant_probe.py --context 128k --cache kv4
"""
from __future__ import annotations

import argparse

import torch

from common import LLAMA3_8B, parse_tokens, random_model, time_cuda
from quant_decode import fill

from longkv.cache import spec as cache_spec
from longkv.kernels import quant as qk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="128k")
    ap.add_argument("--cache", default="kv4")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    ctx = parse_tokens(a.context)
    model = random_model(dict(LLAMA3_8B, num_hidden_layers=1))
    sp = model.layer_specs()[0]
    kv = cache_spec.parse(a.cache).build(model.layer_specs(), batch=1, capacity=ctx + 8, device="cuda",
                                         dtype=torch.bfloat16)
    fill(model, kv, ctx, 16384, torch.device("cuda"))
    q = torch.randn(1, sp.num_heads, 1, sp.head_dim, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor([ctx], device="cuda")
    kw = kv.kernel_kwargs(0)
    f = lambda: qk.quant_decode_attention(q, kv.kq[0], kv.vq[0], kv.kf[0], kv.vf[0], length, **kw)
    for _ in range(a.reps):
        f()
    torch.cuda.synchronize()
    print("us", round(time_cuda(f, 10) * 1e3, 1))


if __name__ == "__main__":
    main()
