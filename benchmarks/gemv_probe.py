"""The batch-1 projections of a Llama-3-8B decode step: cuBLAS (F.linear) and the torch ops around it against
`kernels.gemv` (one Triton launch with the norm / activation / residual folded in), one shape at a time.

Each row times the shape's calls inside a CUDA graph, cycling through enough copies of the weight (>= 400 MB)
that no call finds its weight in L2, and reports µs a call and TB/s of the weight bytes. First the plain
GEMV over a sweep of (BN, BK, warps, stages); then, at each shape's best, the fused form against the unfused
torch sequence it replaces (the engine's: rms_norm + qkv; o_proj + add_rms_norm; gate/up + SiLU·mul; down +
add; norm + head). `--table PATH` writes the winners for `LONGKV_GEMV_TABLE`.

    python benchmarks/gemv_probe.py --table /tmp/gemv.json
    TRITON_INTERPRET=1 python benchmarks/gemv_probe.py --device cpu --smoke

Last line: JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

from common import emit_json, graph_time, print_table

from longkv.kernels import gemv as gv
from longkv.models.layers import add_rms_norm, rms_norm, silu_mul

# name: (weight rows, K, fusion)
SHAPES = {"qkv": (6144, 4096, "norm"), "o_proj": (4096, 4096, "res+norm"), "gate_up": (28672, 4096, "norm+silu"),
          "down": (4096, 14336, "res"), "head": (128256, 4096, "norm+f32")}
FUSED_GRID = [(4, 1024, 4, 1), (2, 1024, 4, 1), (4, 512, 4, 1), (8, 1024, 4, 1), (4, 1024, 8, 1)]
# the gated form's extra tiles, each timed over [gate; up] rows and over interleaved ones (gemv.interleave: a program's
# gate and up rows one contiguous run)
GATED_GRID = [(2, 1024, 4, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (4, 1024, 8, 1), (8, 512, 4, 1), (8, 1024, 8, 1),
              (2, 2048, 8, 1), (1, 4096, 8, 1), (16, 256, 4, 1)]
SMOKE = {"qkv": (96, 64, "norm"), "o_proj": (64, 64, "res+norm"), "gate_up": (128, 64, "norm+silu"),
         "down": (64, 128, "res"), "head": (200, 64, "norm+f32")}
# The torch side is the engine's unfused sequence (llama.py), each op counted once a layer: qkv's input norm;
# o_proj's add with the post-attention norm (one compiled kernel, "res+norm"); gate/up's SiLU·mul (its norm is
# o_proj's); down's residual add. The fused side moves the post-attention norm into gate/up's prologue.


def fusion_args(fusion: str, g, r) -> dict:
    """`gemv`'s keyword arguments for a fusion label: the norm is the GEMV's own prologue except where the label's norm
    is the one that follows o_proj's residual add ("res+norm": in the fused step it moves to gate/up)."""
    return dict(norm=g if "norm" in fusion and "res" not in fusion else None, act="silu" if "silu" in fusion else None,
                res=r if "res" in fusion else None, out_dtype=torch.float32 if "f32" in fusion else None, eps=1e-5)


def calls(rows, K, fusion, copies, dev, dtype, fused: bool, cfg=None, torch_ops=True, ilv=0):
    """A function making one call on each weight copy: the fused GEMV, or the torch sequence it replaces
    (torch_ops=False: F.linear alone; fused with fusion=None: the plain GEMV)."""
    ws = [torch.randn(rows, K, device=dev, dtype=dtype) / K ** 0.5 for _ in range(copies)]
    x = torch.randn(1, 1, K, device=dev, dtype=dtype)
    g = torch.rand(K, device=dev, dtype=dtype) + 0.5
    r = torch.randn(1, 1, rows, device=dev, dtype=dtype)
    fusion = fusion or ""
    kw = fusion_args(fusion, g, r)
    g_out = torch.rand(rows, device=dev, dtype=dtype) + 0.5

    def fn():
        for w in ws:
            if fused:
                gv.gemv(x, w, cfg=cfg, ilv=ilv, **kw)
            elif not torch_ops:
                F.linear(x, w)
            else:
                h = rms_norm(x, g, 1e-5) if kw["norm"] is not None and not kw["act"] else x
                y = F.linear(h, w)
                if kw["act"]:
                    a, b = y.chunk(2, dim=-1)
                    y = silu_mul(a, b)
                if "res+norm" in fusion:
                    y = add_rms_norm(r, y, g_out, 1e-5)   # o_proj's add and the next norm, one kernel (llama.py)
                elif kw["res"] is not None:
                    y = r + y
                if kw["out_dtype"] is not None:
                    y = y.float()
    return fn, ws, x


def time_us(fn, copies, reps, dev):
    return graph_time(fn, reps, dev) * 1e3 / copies


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two configs (CPU interpreter check)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--table", help="write the best config per shape here (JSON for LONGKV_GEMV_TABLE)")
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), torch.bfloat16 if a.device == "cuda" else torch.float32
    shapes = SMOKE if a.smoke else SHAPES
    if a.smoke:
        grid = [(8, 64, 4, 1), (4, 128, 4, 2)]
    else:
        # one stage: Triton pipelines only the loads that feed tl.dot (the PTX has no cp.async at 3), so the
        # bytes in flight are one tile a program times the programs resident on an SM
        grid = [(bn, bk, w, 1) for bn, bk, w in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8))
                if bn * bk <= 4096 * w]
    sweep, best, fused_rows = [], {}, []
    for name in a.shapes.split(","):
        rows, K, fusion = shapes[name]
        nbytes = rows * K * 2
        copies = 1 if a.smoke else max(1, math.ceil(400e6 / nbytes))
        fn, *_ = calls(rows, K, None, copies, dev, dtype, fused=False, torch_ops=False)
        t_cub = time_us(fn, copies, a.reps, dev)
        sweep.append(dict(shape=name, cfg="cuBLAS", us=round(t_cub, 2), tbs=round(nbytes / t_cub / 1e6, 3)))
        for cfg in grid:
            fn, *_ = calls(rows, K, None, copies, dev, dtype, fused=True, cfg=cfg)
            try:
                t = time_us(fn, copies, a.reps, dev)
            except Exception as e:   # noqa: BLE001 (a config that fails to compile or launch is a finding)
                print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                continue
            sweep.append(dict(shape=name, cfg="%d,%d,%d,%d" % cfg, us=round(t, 2), tbs=round(nbytes / t / 1e6, 3)))
            if name not in best or t < best[name][1]:
                best[name] = (cfg, t)
        del fn
        # the fused form at the plain winner and a few tiles around the default (the gated form reads two tiles a
        # step), against the unfused torch sequence; outputs checked against the reference
        n_out = rows // 2 if "silu" in fusion else rows
        t_f, cfg = None, None
        for c in dict.fromkeys([best[name][0]] + ([] if a.smoke else FUSED_GRID)):
            fn_f, ws, x = calls(rows, K, fusion, copies, dev, dtype, fused=True, cfg=c)
            t = time_us(fn_f, copies, a.reps, dev)
            sweep.append(dict(shape=name + "+" + fusion, cfg="%d,%d,%d,%d" % c, us=round(t, 2),
                              tbs=round(nbytes / t / 1e6, 3)))
            if t_f is None or t < t_f:
                t_f, cfg = t, c
        if "silu" in fusion:
            for c, il in itertools.product([] if a.smoke else GATED_GRID, (0, 1)):
                fn_i, *_ = calls(rows, K, fusion, copies, dev, dtype, fused=True, cfg=c, ilv=c[0] * il)
                t = time_us(fn_i, copies, a.reps, dev)
                sweep.append(dict(shape=name + "+" + fusion + (" ilv" if il else ""), cfg="%d,%d,%d,%d" % c,
                                  us=round(t, 2), tbs=round(nbytes / t / 1e6, 3)))
                del fn_i
        best[name + "+"] = (cfg, t_f)
        fn_t, *_ = calls(rows, K, fusion, copies, dev, dtype, fused=False)
        t_t = time_us(fn_t, copies, a.reps, dev)
        g = torch.rand(K, device=dev, dtype=dtype) + 0.5
        r = torch.randn(1, 1, n_out, device=dev, dtype=dtype)
        kw = fusion_args(fusion, g, r)
        err = (gv.gemv(x, ws[0], cfg=cfg, **kw).float() - gv.reference(x, ws[0], **kw).float()).abs().max().item()
        fused_rows.append(dict(shape=name, fusion=fusion, cfg="%d,%d,%d,%d" % cfg, cublas_us=round(t_cub, 2),
                               gemv_us=round(best[name][1], 2), torch_seq_us=round(t_t, 2), fused_us=round(t_f, 2),
                               saved_us=round(t_t - t_f, 2), max_err=err))
        del fn_f, fn_t, ws
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    print_table(sweep, ["shape", "cfg", "us", "tbs"])
    print()
    print_table(fused_rows, list(fused_rows[0]))
    layer = sum(r["saved_us"] for r in fused_rows if r["shape"] != "head")
    print(f"\nsaved a layer (qkv + o_proj + gate_up + down): {layer:.1f} us; a 32-layer step + head: "
          f"{32 * layer + sum(r['saved_us'] for r in fused_rows if r['shape'] == 'head'):.0f} us")
    if a.table:   # the fused forms' winners: the decode step runs those
        tab = {}
        for name, (cfg, _) in best.items():
            if not name.endswith("+"):
                continue
            rows, K, fusion = shapes[name[:-1]]
            tab[f"{rows // 2 if 'silu' in fusion else rows},{K}"] = list(cfg)
        with open(a.table, "w") as f:
            json.dump(tab, f)
    emit_json(dict(bench="gemv_probe", fused=fused_rows, best={k: list(v[0]) for k, v in best.items()}))


if __name__ == "__main__":
    main()
