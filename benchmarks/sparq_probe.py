"""One layer's SparQ group scoring (`kv4+quest:groups=1,channels=F`, kernels/quest_sparq.py) on synthetic
data, variant by variant: block of groups, warps, rank, and a probe that stops after the loads, so the time
splits into its parts. The scores read `--copies` layers' codes in turn, so the L2 cannot hold them (as in
decode). Also `prepare` (the channel choice before a Triton score). Each call replayed in a CUDA graph
(common.graph_time).

    python benchmarks/sparq_probe.py --context 512k

Prints a table and ends with one JSON line."""
from __future__ import annotations

import argparse

import torch
from common import emit_json, graph_time, parse_tokens, print_table

from longkv.kernels import quest_sparq as qs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="512k")
    ap.add_argument("--heads", default="32,8", help="query heads, KV heads")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--channels", type=float, default=0.125)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--variants", default="4:4,8:2,8:4,16:4,16:8,32:8", help="block_p:warps,... (empty: none)")
    ap.add_argument("--cvts", default="0,1,2", help="code-to-fp16 conversions to time (quest_sparq CVT)")
    ap.add_argument("--cuda", default="1:1:256:0,2:1:256:1,4:1:256:0,4:1:256:1,8:1:256:1",
                    help="CUDA score launches to time, wpt:minb:threads[:vec[:choose[:pipe]]],... "
                         "(quest_sparq.parse_launch; choose is ignored: these rows take `prepare`'s choice); "
                         "empty: none")
    ap.add_argument("--cuda-choose", default="4:1:256:1,4:2:256:1",
                    help="CUDA score launches to time with the channel choice in the kernel (no `prepare`), as --cuda")
    ap.add_argument("--copies", type=int, default=4,
                    help="layers' worth of codes, scored in turn in each timed call (4 x 37.7 MB at 512K: more than "
                         "the L2, as in decode; 1 = one layer replayed, which the L2 may hold)")
    ap.add_argument("--stacks", default="1,0", help="1: groups stacked into one dot (quest_sparq STACK); 0: one a dot")
    a = ap.parse_args()
    dev = torch.device("cuda")
    T = parse_tokens(a.context)
    Hq, H = (int(x) for x in a.heads.split(","))
    D, group = a.d, 64
    MG = T // group
    R = max(1, round(a.channels * D))
    gen = torch.Generator(device=dev).manual_seed(0)
    sks = [torch.randint(0, 256, (1, H, D, T // 2), device=dev, dtype=torch.uint8, generator=gen)
           for _ in range(a.copies)]
    szs = [(torch.rand(1, H, D, MG, 2, device=dev, generator=gen) * 0.2).half() for _ in range(a.copies)]
    q = torch.randn(1, Hq, 1, D, device=dev, dtype=torch.bfloat16, generator=gen)
    n = torch.tensor([T], device=dev)
    kw = dict(group=group, sink=4, window=128, channels=R)
    nbytes = H * R * (T // 2 + MG * 4)
    sel = qs.prepare(q, H, R)
    rows = []
    for w in (4, 1, 2):
        us = graph_time(lambda: qs.prepare(q, H, R, warps=w), a.reps, dev) * 1e3
        rows.append(dict(rank="-", what="prepare (the channel choice, Triton)", block_p=0, warps=w, us=round(us, 1),
                         TBps=None))

    def each(fn):   # fn(sk, sz) on every copy: the time of one is the call's / copies
        return lambda: [fn(k, z) for k, z in zip(sks, szs)]

    for cfg in filter(None, a.cuda.split(",")):
        wpt, minb, nt, vec, pipe = (qs.parse_launch(cfg)[i] for i in (0, 1, 2, 3, 5))
        us = graph_time(each(lambda k, z: qs.sparq_group_scores(q, k, z, n, sel, rank="max", impl="cuda", wpt=wpt,
                                                                minb=minb, threads=nt, vec=vec, pipe=pipe,
                                                                scale=D ** -0.5, **kw)), a.reps, dev) * 1e3 / a.copies
        rows.append(dict(rank="max", what=f"score cuda {cfg}", block_p=0, warps=nt // 32,
                         us=round(us, 1), TBps=round(nbytes / us / 1e6, 2)))
    w = torch.rand(1, H, D, device=dev, generator=gen) + 0.5
    for cfg in filter(None, a.cuda_choose.split(",")):   # the channels picked in every block (no `prepare`)
        wpt, minb, nt, vec, pipe = (qs.parse_launch(cfg)[i] for i in (0, 1, 2, 3, 5))
        us = graph_time(each(lambda k, z: qs.sparq_group_scores(q, k, z, n, None, rank="max", impl="cuda", wpt=wpt,
                                                                minb=minb, threads=nt, vec=vec, pipe=pipe, weight=w,
                                                                scale=D ** -0.5, **kw)), a.reps, dev) * 1e3 / a.copies
        rows.append(dict(rank="max", what=f"score cuda {cfg} + choice (weighed)", block_p=0, warps=nt // 32,
                         us=round(us, 1), TBps=round(nbytes / us / 1e6, 2)))
    for rank in ("max", "mass"):
        for v in filter(None, a.variants.split(",")):
            bp, w = (int(x) for x in v.split(":"))
            runs = [(0, int(c), int(st)) for st in a.stacks.split(",") for c in a.cvts.split(",")] + [(1, 0, 0)]
            for probe, cvt, st in runs:
                fn = each(lambda k, z: qs.sparq_group_scores(q, k, z, n, sel, rank=rank, block_p=bp, warps=w,
                                                             probe=probe, cvt=cvt, stack=bool(st), scale=D ** -0.5,
                                                             **kw))
                us = graph_time(fn, a.reps, dev) * 1e3 / a.copies
                what = "loads only" if probe else f"score cvt={cvt}{' stacked' if st else ''}"
                rows.append(dict(rank=rank, what=what, block_p=bp, warps=w, us=round(us, 1),
                                 TBps=round(nbytes / us / 1e6, 2)))
    print(f"# {torch.cuda.get_device_name()}; {T} tokens, {H} KV heads, D {D}, R {R}: {nbytes / 1e6:.1f} MB read "
          f"a score, {a.copies} copies scored in turn (the scores' times are per copy)")
    print_table(rows, list(rows[0]))
    emit_json({"bench": "sparq_probe", "context": T, "channels": R, "bytes": nbytes, "copies": a.copies, "rows": rows})


if __name__ == "__main__":
    main()
