"""Which fused attention with log-sum-exp is fastest for chunked prefill on this GPU?

A chunk of C queries (32 heads, 8 KV heads, D 128) attends to P past keys; candidates: PyTorch's
flash kernel with the query group folded into the sequence, the cuDNN kernel, and the
memory-efficient kernel; for reference, SDPA's causal attention over the whole context (what a
one-shot prefill runs). Prints TFLOP/s; last line JSON.
"""
from __future__ import annotations

import argparse

import torch

from common import emit_json, print_table, time_cuda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--past", type=int, default=126976)
    a = ap.parse_args()
    C, P, Hq, Hkv, D = a.chunk, a.past, 32, 8, 128
    G = Hq // Hkv
    dt = torch.bfloat16
    q = torch.randn(1, Hq, C, D, device="cuda", dtype=dt)
    k = torch.randn(1, Hkv, P, D, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    flops = 4 * C * P * Hq * D
    qf = q.reshape(1, Hkv, G * C, D)
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    cands = {
        "flash_folded": lambda: torch.ops.aten._scaled_dot_product_flash_attention(qf, k, v, 0.0, False, False, scale=D ** -0.5),
        "flash_expanded": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, False, False, scale=D ** -0.5),
        "cudnn_expanded": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, ke, ve, None, True, 0.0, False, False, scale=D ** -0.5),
        "cudnn_folded": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qf, k, v, None, True, 0.0, False, False, scale=D ** -0.5),
        "efficient_folded": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(qf, k, v, None, True, 0.0, False, scale=D ** -0.5),
        "sdpa_default_expanded": lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve),
    }
    rows = []
    ref = None
    for name, fn in cands.items():
        try:
            out = fn()
            o = out[0] if isinstance(out, tuple) else out
            o = o.reshape(1, Hq, C, D)
            ref = o if ref is None else ref
            err = (o.float() - ref.float()).abs().max().item()
            for _ in range(2):
                fn()
            ms = time_cuda(fn, 5)
            rows.append(dict(kernel=name, ms=round(ms, 2), TFLOPs=round(flops / ms / 1e9, 1), maxdiff=round(err, 4)))
        except Exception as e:  # a kernel this build lacks
            rows.append(dict(kernel=name, ms="n/a", TFLOPs=type(e).__name__))
    lf = torch.ops.aten._scaled_dot_product_flash_attention(qf, k, v, 0.0, False, False, scale=D ** -0.5)[1]
    lc = torch.ops.aten._scaled_dot_product_cudnn_attention(qf, k, v, None, True, 0.0, False, False, scale=D ** -0.5)[1]
    print(f"lse flash {tuple(lf.shape)} vs cudnn {tuple(lc.shape)}: max diff "
          f"{(lf.float().reshape(-1) - lc.float().reshape(-1)).abs().max().item():.2e}")
    T = C + P
    qa = torch.randn(1, Hq, T, D, device="cuda", dtype=dt)
    ka, va = torch.randn(1, Hkv, T, D, device="cuda", dtype=dt), torch.randn(1, Hkv, T, D, device="cuda", dtype=dt)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(qa, ka, va, is_causal=True, enable_gqa=True)
    fn()
    ms = time_cuda(fn, 2)
    rows.append(dict(kernel=f"sdpa_causal_full_{T}", ms=round(ms, 2), TFLOPs=round(2 * T * T * Hq * D / ms / 1e9, 1)))
    print_table(rows, ["kernel", "ms", "TFLOPs", "maxdiff"])
    emit_json({"bench": "attn_prefill", "chunk": C, "past": P, "rows": rows})


if __name__ == "__main__":
    main()
