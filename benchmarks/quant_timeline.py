"""When each program of the CUDA packed-decode kernel starts, gets its first bytes and ends (one layer, Llama-3-8B
shape, random packed data as `quant_cuda_probe.py` builds it): the kernel compiled with TLINE, each program writing
its SM and %globaltimer stamps; four launches (each followed by its merge) in one CUDA graph, replayed, the last
replay read. Where the fixed ~16 µs a layer (BENCHMARKS.md issue 4, session 45) goes: launch to first start, the
spread of starts, prologue, first stage's latency, the loop, the spread of ends (the tail), the fp splits, and the
gap from one attention's last end to the next one's first start (merge + two launches).

    python benchmarks/quant_timeline.py --contexts 2k,32k,128k --bits 2 --dyn 0,1 --qfirst 0,1

Last line: JSON.
"""
from __future__ import annotations

import argparse

import torch

from common import emit_json, graph_time, parse_tokens, print_table
from quant_cuda_probe import layer

from longkv.kernels import quant_cuda as qc


def pct(x: torch.Tensor, p: float) -> float:
    return float(torch.quantile(x.double(), p)) if x.numel() else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="2k,32k,128k")
    ap.add_argument("--bits", default="2")
    ap.add_argument("--splits", type=int, default=0, help="0: the default (quant_cuda.num_splits)")
    ap.add_argument("--launches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dyn", default="auto", help="DYN (chunks from a counter) 0 / 1, comma-separated")
    ap.add_argument("--qfirst", default="auto", help="QFIRST (the query before the bulk copies) 0 / 1, comma-separated")
    a = ap.parse_args()
    dev = torch.device("cuda")
    H, G, D, sink, window = 8, 4, 128, 4, 128
    rows, tails = [], []
    for bits in map(int, a.bits.split(",")):
        group = 64 if bits == 4 else 16
        for ctx, dyn, qf in [(c, d, f) for c in map(parse_tokens, a.contexts.split(","))
                             for d in (None if x == "auto" else int(x) for x in a.dyn.split(","))
                             for f in (None if x == "auto" else int(x) for x in a.qfirst.split(","))]:
            kq, vq, kf, vf = layer(ctx, bits, group, H, D, sink, window, dev)
            q = torch.randn(1, H * G, 1, D, device=dev, dtype=torch.bfloat16)
            length = torch.tensor([ctx], device=dev)
            kw = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5, splits=a.splits or None,
                      dyn=dyn, qfirst=qf)
            lay = qc.config(D=D, bits=bits, group=group, G=G, sink=sink, ring=window + 2 * group, bf16=True, dyn=dyn,
                            qfirst=qf)
            attn0, merge0, _, S = qc.decode_attention(q, kq, vq, kf, vf, length, parts=True, **kw)
            us_plain = graph_time(attn0, 50, dev) * 1e3
            fps = -(-(sink + window + 2 * group) // 32)
            n = H * (S + fps)
            bufs = [torch.zeros(n * 8, dtype=torch.int64, device=dev) for _ in range(a.launches)]
            calls = [qc.decode_attention(q, kq, vq, kf, vf, length, parts=True, tline=b, **dict(kw, splits=S))
                     for b in bufs]

            def run():
                for at, mg, _, _ in calls:
                    at()
                    mg()

            us_tl = graph_time(run, a.reps, dev) * 1e3 / a.launches
            torch.cuda.synchronize()
            T = [b.view(n, 8).cpu() for b in bufs]
            prev_end = None
            for i, t in enumerate(T):
                packed, fp = t[t[:, 6] == 0], t[t[:, 6] == 1]
                t0 = float(t[:, 1].min())
                rel = lambda c, x=packed: (x[:, c].double() - t0) / 1e3   # noqa: E731  (µs after the first start)
                work = packed[packed[:, 7] > 0]
                row = dict(bits=bits, ctx=ctx, dyn=lay["DYN"], qf=lay["QFIRST"], launch=i, S=S, span=round((float(t[:, 5].max()) - t0) / 1e3, 2),
                           gap=round((t0 - prev_end) / 1e3, 2) if prev_end is not None else "",
                           start_p50=round(pct(rel(1), .5), 2), start_max=round(float(rel(1).max()), 2),
                           prolog=round(pct((packed[:, 2] - packed[:, 1]).double() / 1e3, .5), 2),
                           first=round(pct((work[:, 3] - work[:, 1]).double() / 1e3, .5), 2) if len(work) else "",
                           loop_p50=round(pct((work[:, 4] - work[:, 3]).double() / 1e3, .5), 2) if len(work) else "",
                           loop_max=round(float((work[:, 4] - work[:, 3]).max()) / 1e3, 2) if len(work) else "",
                           write=round(pct((packed[:, 5] - packed[:, 4]).double() / 1e3, .5), 2),
                           end_p10=round(pct(rel(5), .1), 2), end_p50=round(pct(rel(5), .5), 2),
                           end_p90=round(pct(rel(5), .9), 2), end_max=round(float(rel(5).max()), 2),
                           fp_end_max=round(float(rel(5, fp).max()), 2), fp_end_p50=round(pct(rel(5, fp), .5), 2),
                           per_sm=int(torch.bincount(t[:, 0].long()).max()), us_graph=round(us_tl, 2),
                           us_plain=round(us_plain, 2))
                prev_end = float(t[:, 5].max())
                rows.append(row)
            # the tail: per SM, its last end; and the ends of the programs by when they started
            last = T[-1]
            ends = torch.zeros(int(last[:, 0].max()) + 1, dtype=torch.float64)
            t0 = float(last[:, 1].min())
            for r in last:
                ends[int(r[0])] = max(float(ends[int(r[0])]), (float(r[5]) - t0) / 1e3)
            tails.append(dict(bits=bits, ctx=ctx, dyn=lay["DYN"], qf=lay["QFIRST"], sm_end_min=round(float(ends[ends > 0].min()), 2),
                              sm_end_p50=round(pct(ends[ends > 0], .5), 2), sm_end_max=round(float(ends.max()), 2)))
            del kq, vq, kf, vf, bufs, calls
    cols = list(rows[0])
    print_table(rows, cols)
    print_table(tails, list(tails[0]))
    emit_json({"bench": "quant_timeline", "device": torch.cuda.get_device_name(), "rows": rows, "tails": tails})


if __name__ == "__main__":
    main()
