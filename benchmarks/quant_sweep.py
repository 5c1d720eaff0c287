"""Tuning sweep of the packed decode-attention kernel (tile size, warps, stages, splits):
layer 0's attention alone at one context, TB/s on the bytes it must read, and the max difference
from the default launch. Last line: JSON.

    python benchmarks/quant_sweep.py --context 128k --caches kv4,kv2
    python benchmarks/quant_sweep.py --shape gemma3-4b --context 128k --caches kivi4 --block-n 16,32,64 --warps 2,4,8
(a Gemma 3 shape: its first six layers, the sixth global; that layer is timed)
"""
from __future__ import annotations

import argparse
import itertools

import torch

from common import SHAPES, emit_json, parse_tokens, print_table, random_model, time_cuda
from quant_decode import attention_bytes, fill, global_layer

from longkv.cache import spec as cache_spec
from longkv.kernels import quant as qk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="128k")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--caches", default="kv4,kv2")
    ap.add_argument("--dot", default="1,0", help="tensor-core tiles (1) and/or CUDA-core FMAs (0)")
    ap.add_argument("--block-n", default="16,32,64")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--splits", default="0", help="0 = the default split count")
    ap.add_argument("--stages", default="0", help="software-pipelining stages; 0 = Triton's default")
    ap.add_argument("--prefetch", default="-1", help="L2 prefetch distance in tiles; -1 = the default")
    ap.add_argument("--maxnreg", default="0", help="register cap per thread; 0 = none")
    ap.add_argument("--pipe", default="1", help="the fast path's double-buffered loop (1) and/or the plain loop (0)")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per launch (10 moved by +-30 %% between runs)")
    a = ap.parse_args()
    ctx = parse_tokens(a.context)
    cfg = SHAPES[a.shape]
    cfg = dict(cfg, num_hidden_layers=6, layer_types=cfg["layer_types"][:6]) if "layer_types" in cfg else \
        dict(cfg, num_hidden_layers=1)
    model = random_model(cfg)
    rows = []
    for spec in a.caches.split(","):
        kv = cache_spec.parse(spec).build(model.layer_specs(), batch=1, capacity=ctx + 8, device="cuda",
                                          dtype=torch.bfloat16)
        fill(model, kv, ctx, 16384, torch.device("cuda"))
        i = global_layer(kv)
        sp = model.layer_specs()[i]
        q = torch.randn(1, sp.num_heads, 1, sp.head_dim, device="cuda", dtype=torch.bfloat16)
        length = torch.tensor([ctx], device="cuda")
        kw = kv.kernel_kwargs(i)
        base = qk.quant_decode_attention(q, kv.kq[i], kv.vq[i], kv.kf[i], kv.vf[i], length, prefetch=0, **kw).float()
        nbytes = attention_bytes(kv, ctx)
        ints = lambda x: [int(v) for v in x.split(",")]
        grid = itertools.product([bool(d) for d in ints(a.dot)], ints(a.block_n), ints(a.warps), ints(a.splits),
                                 ints(a.stages), ints(a.prefetch), ints(a.maxnreg), ints(a.pipe))
        for dot, bn, w, nsp, st, pf, mr, pipe in grid:
            if bn > kv.group:
                continue
            cfg = dict(cache=spec, dot=dot, block_n=bn, warps=w, stages=st or None, splits=nsp or None,
                       prefetch=None if pf < 0 else pf, maxnreg=mr or None, pipe=pipe)
            f = lambda: qk.quant_decode_attention(q, kv.kq[i], kv.vq[i], kv.kf[i], kv.vf[i], length, block_n=bn,
                                                  num_warps=w, num_stages=cfg["stages"], splits=cfg["splits"],
                                                  use_dot=dot, prefetch=cfg["prefetch"], max_regs=cfg["maxnreg"],
                                                  pipe=bool(pipe), **kw)
            try:
                diff = (f().float() - base).abs().max().item()
                ms = time_cuda(f, a.reps)
            except Exception as e:  # a launch that does not compile (registers, shared memory)
                rows.append(dict(cfg, us=type(e).__name__))
                continue
            rows.append(dict(cfg, us=round(ms * 1e3, 1), TBps=round(nbytes / (ms / 1e3) / 1e12, 3),
                             maxdiff=round(diff, 5)))
            print(rows[-1], flush=True)
        del kv
        torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["cache"], r["us"] if isinstance(r["us"], float) else 1e9))
    print_table(rows, ["cache", "dot", "block_n", "warps", "stages", "splits", "prefetch", "maxnreg", "pipe", "us", "TBps",
                       "maxdiff"])
    emit_json({"bench": "quant_sweep", "shape": a.shape, "context": ctx, "rows": rows})


if __name__ == "__main__":
    main()
