"""When each program of the CUDA packed-decode kernel starts, gets its first bytes and ends (one layer, Llama-3-8B
shape, random packed data as `quant_cuda_probe.py` builds it): the kernel compiled with TLINE, each program writing
its SM and %globaltimer stamps; four launches (each followed by its merge) in one CUDA graph, replayed, the last
replay read. Where the fixed ~16 µs a layer (BENCHMARKS.md issue 4, session 45) goes: the spread of starts, the
prologue, the first stage's arrival, the last stage's arrival and what is computed after it (the drain), the spread
of ends (the tail), the fp splits, and the gap from one attention's last end to the next one's first start (merge +
two launches). µs after the launch's first start unless named a length (prolog, first, drain, write).

    python benchmarks/quant_timeline.py --contexts 2k,32k,128k --bits 2 --load-only 0,1 --tail 0,64

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
    ap.add_argument("--load-only", default="0",
                    help="0 / 1, comma-separated: the loads alone (LOADONLY, quant_cuda_probe.py's diagnostic)")
    ap.add_argument("--tail", default="0", help="comma-separated: a split's last this many tokens in one-tile stages "
                                                "(quant_cuda.config's tail; 0: off)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    H, G, D, sink, window = 8, 4, 128, 4, 128
    rows, tails = [], []
    for bits in map(int, a.bits.split(",")):
        group = 64 if bits == 4 else 16
        for ctx, lo, tail in [(c, bool(int(x)), int(tl)) for c in map(parse_tokens, a.contexts.split(","))
                              for x in a.load_only.split(",") for tl in a.tail.split(",")]:
            kq, vq, kf, vf = layer(ctx, bits, group, H, D, sink, window, dev)
            q = torch.randn(1, H * G, 1, D, device=dev, dtype=torch.bfloat16)
            length = torch.tensor([ctx], device=dev)
            kw = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5, splits=a.splits or None,
                      load_only=lo, tail=tail)
            attn0, _, _, S = qc.decode_attention(q, kq, vq, kf, vf, length, parts=True, **kw)
            us_plain = graph_time(attn0, 50, dev) * 1e3
            n = H * (S + -(-(sink + window + 2 * group) // 32))     # packed programs + the fp splits'
            bufs = [torch.zeros(n * 8, dtype=torch.int64, device=dev) for _ in range(a.launches)]
            calls = [qc.decode_attention(q, kq, vq, kf, vf, length, parts=True, tline=b, **dict(kw, splits=S))
                     for b in bufs]

            def run():
                for at, mg, _, _ in calls:
                    at()
                    mg()

            us_tl = graph_time(run, a.reps, dev) * 1e3 / a.launches
            torch.cuda.synchronize()
            T = [b.view(n, 8).cpu() for b in bufs]   # SM, start, prologue, first in, last in, loop's end, end, fp
            prev_end = None
            for i, t in enumerate(T):
                packed, fp = t[t[:, 7] == 0], t[t[:, 7] == 1]
                work = packed[packed[:, 3] > 0]     # (programs that had a stage: BULK's stamps)
                t0 = float(t[:, 1].min())

                def rel(c, x=packed):   # µs after the launch's first start
                    return (x[:, c].double() - t0) / 1e3

                def dur(c0, c1, x=work):
                    return (x[:, c1] - x[:, c0]).double() / 1e3

                r2 = lambda x: (lambda f: round(f, 2) if f == f else "")(float(x))   # noqa: E731  (nan: none such)
                rows.append(dict(
                    bits=bits, ctx=ctx, lo=int(lo), tail=tail, launch=i, S=S, span=r2((float(t[:, 6].max()) - t0) / 1e3),
                    gap=r2((t0 - prev_end) / 1e3) if prev_end is not None else "",
                    start_max=r2(rel(1).max()), prolog=r2(pct(dur(1, 2, packed), .5)),
                    first=r2(pct(dur(1, 3), .5)), last_p10=r2(pct(rel(4, work), .1)),
                    last_p50=r2(pct(rel(4, work), .5)), last_max=r2(pct(rel(4, work), 1.)),
                    drain=r2(pct(dur(4, 5), .5)), write=r2(pct(dur(5, 6, packed), .5)),
                    end_p10=r2(pct(rel(6), .1)), end_p50=r2(pct(rel(6), .5)), end_p90=r2(pct(rel(6), .9)),
                    end_max=r2(rel(6).max()), fp_end_p50=r2(pct(rel(6, fp), .5)), fp_end_max=r2(rel(6, fp).max()),
                    per_sm=int(torch.bincount(t[:, 0].long()).max()), us_graph=r2(us_tl), us_plain=r2(us_plain)))
                prev_end = float(t[:, 6].max())
            # the tail: each SM's last end
            last = T[-1]
            ends = torch.zeros(int(last[:, 0].max()) + 1, dtype=torch.float64)
            t0 = float(last[:, 1].min())
            for r in last:
                ends[int(r[0])] = max(float(ends[int(r[0])]), (float(r[6]) - t0) / 1e3)
            tails.append(dict(bits=bits, ctx=ctx, lo=int(lo), tail=tail, sm_end_min=round(float(ends[ends > 0].min()), 2),
                              sm_end_p50=round(pct(ends[ends > 0], .5), 2), sm_end_max=round(float(ends.max()), 2)))
            del kq, vq, kf, vf, bufs, calls
    cols = list(rows[0])
    print_table(rows, cols)
    print_table(tails, list(tails[0]))
    emit_json({"bench": "quant_timeline", "device": torch.cuda.get_device_name(), "rows": rows, "tails": tails})


if __name__ == "__main__":
    main()
