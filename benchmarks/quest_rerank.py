"""Quest's second stage alone: re-scoring the candidate pages from exact keys (`rerank_scores`) or
from page-relative codes (`rerank_code_scores`), over launch settings. One layer of the Llama-3-8B
shape (8 KV heads, 4 queries each, head dim 128, 16-token pages), random keys; the candidates are
the bound's top F·k pages from random scores (which pages does not matter for the timing). Each
launch timed in a CUDA graph; `GB/s` = bytes the launch must read (candidate keys, or candidate codes
plus their min/max) / time; `maxdiff` against the plain-torch reference of the same stage.

    python benchmarks/quest_rerank.py --context 512k --per 2,4,8 --warps 1,2,4
    python benchmarks/quest_rerank.py --smoke          # CPU, tiny: runs or not
Last line: JSON.
"""
from __future__ import annotations

import argparse

import torch
from common import emit_json, parse_tokens, print_table, time_cuda

from longkv.kernels import quest as kq
from longkv.kernels import quest_rerank as kr
from longkv.kernels import sparse_reference as ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", default="512k")
    ap.add_argument("--ratio", type=int, default=8, help="pages read = 1/ratio of the pages")
    ap.add_argument("--rerank", type=int, default=4, help="candidates = rerank x the pages read")
    ap.add_argument("--bits", default="2", help="code widths to time (comma list)")
    ap.add_argument("--per", default="4", help="candidate pages a program (comma list)")
    ap.add_argument("--warps", default="4", help="warps a program (comma list)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    dev = "cpu" if a.smoke else "cuda"
    dt = torch.float32 if a.smoke else torch.bfloat16
    ctx = 4096 if a.smoke else parse_tokens(a.context)
    Hkv, G, D, P = (2, 2, 32, 16) if a.smoke else (8, 4, 128, 16)
    MP = ctx // P
    g = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(1, Hkv, ctx, D, device=dev, dtype=dt, generator=g)
    mn, mx = ref.page_minmax(keys, P)
    q = torch.randn(1, Hkv * G, 1, D, device=dev, dtype=dt, generator=g)
    bound = torch.randn(1, Hkv, MP, device=dev, generator=g)
    pos = torch.tensor([ctx - 1], device=dev)
    k_read = MP // a.ratio
    cand = kq.select_pages(bound, a.rerank * k_read, pos, page=P, row_pages=MP)
    n_cand = int(cand[1][0])
    pool = keys.view(-1, P, D)
    rows = []

    def row(name, fn, want, nbytes, **kw):
        for _ in range(3):   # compile and warm up outside the timing
            fn()
        t = 1e-3 if a.smoke else time_cuda(fn, a.reps) * 1e-3   # seconds
        fin = torch.isfinite(want)
        err = (fn() - want)[fin].abs().max().item()
        rows.append(dict(stage=name, **kw, us=round(t * 1e6, 1), GBs=round(nbytes / t / 1e9), maxdiff=f"{err:.3g}"))
        print_table(rows[-1:], list(rows[-1]))

    row("exact", lambda: kq.rerank_scores(q, pool, bound, *cand, row_pages=MP),
        ref.rerank_scores(q, pool, bound, *cand, row_pages=MP), Hkv * n_cand * P * D * 2)
    for bits in map(int, a.bits.split(",")):
        codes = ref.page_codes(keys, mn, mx, bits).view(-1, P, D * bits // 8)
        mnp, mxp = mn.reshape(-1, D), mx.reshape(-1, D)
        nbytes = Hkv * n_cand * (P * D * bits // 8 + 2 * D * 2)
        want = ref.rerank_code_scores(q, codes, mnp, mxp, bound, *cand, row_pages=MP, bits=bits)
        for per in map(int, a.per.split(",")):
            for w in map(int, a.warps.split(",")):
                kr.RERANK_PER, kr.RERANK_WARPS = per, w
                row(f"codes{bits}", lambda: kq.rerank_code_scores(q, codes, mnp, mxp, bound, *cand, row_pages=MP,
                                                                  bits=bits), want, nbytes, per=per, warps=w)
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    emit_json({"bench": "quest_rerank", "device": "CPU (smoke)" if a.smoke else torch.cuda.get_device_name(),
               "context": ctx, "candidates_per_row": n_cand, "rows": rows})


if __name__ == "__main__":
    main()
