"""Where the CUDA packed-decode kernel's time goes, one layer (Llama-3-8B shape: 8 KV heads, 32 query
heads, head dim 128), random packed data: the splits kernel alone (packed and full-precision splits),
the merge alone and the whole call (`quant_cuda.decode_attention`), the Triton kernel's whole call,
and bf16 flash-decoding over the same context; each captured in a CUDA graph and replayed, TB/s on
the packed bytes (codes and statistics).

    python benchmarks/quant_cuda_probe.py --context 128k --bits 4,2 --tile 16,32 --gpf 0,1 --cw 1,2,4 --minb 0,16
    python benchmarks/quant_cuda_probe.py --context 128k --bits 4,2 --tile 16 --load-only
    python benchmarks/quant_cuda_probe.py --context 512k --bits 4 --tile 16 --res --paged 0.125 --load-only
    python benchmarks/quant_cuda_probe.py --context 128k --bits 2,4 --tile 16 --kdq 0,1
    python benchmarks/quant_cuda_probe.py --context 128k --bits 2,4 --tile 16 --bulk 0,1 --stok 32,64 --nst 2,3,4 --load-only

--paged F adds Quest's paged kernel (`quant_cuda.paged_attention`) reading a random F of each head's key groups
(ascending, as the select lists them), its loads alone too with --load-only; --res gives the keys residual bits
(`kres=1`, 4 bits), as the issue-5 spec `kv4:kres=1+quest:...` stores them.

Last line: JSON.
"""
from __future__ import annotations

import argparse

import torch

from common import emit_json, graph_time, parse_tokens, print_table

from longkv.kernels import quant as qk
from longkv.kernels import quant_cuda as qc
from longkv.kernels.decode import decode_attention


def graphed(fn, reps: int) -> float:
    return graph_time(fn, reps, torch.device("cuda")) * 1e3   # µs


def layer(ctx: int, bits: int, group: int, H: int, D: int, sink: int, window: int, dev, res: bool = False):
    cap = group * ((ctx - sink) // group + 1)
    w = D * bits // 8
    kq = {"planes": [torch.randint(0, 256, (1, H, cap, w), dtype=torch.uint8, device=dev)],
          "scale": (torch.rand(1, H, cap // group, D, device=dev) * 0.1 + 0.01).half(),
          "zero": (torch.randn(1, H, cap // group, D, device=dev)).half()}
    if res:
        kq["res"] = torch.randint(0, 256, (1, H, cap, D // 8), dtype=torch.uint8, device=dev)
    vq = {"planes": [torch.randint(0, 256, (1, H, cap, w), dtype=torch.uint8, device=dev)],
          "scale": (torch.rand(1, H, cap, 1, device=dev) * 0.1 + 0.01).half(),
          "zero": torch.randn(1, H, cap, 1, device=dev).half()}
    ring = window + 2 * group
    kf = torch.randn(1, H, sink + ring, D, device=dev, dtype=torch.bfloat16)
    vf = torch.randn(1, H, sink + ring, D, device=dev, dtype=torch.bfloat16)
    return kq, vq, kf, vf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", default="128k")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--splits", default="0", help="0: the default (quant_cuda.num_splits)")
    ap.add_argument("--tile", default="16,32")
    ap.add_argument("--gpf", default="auto",
                    help="L1 prefetch of the key group statistics (tiles ahead; auto: the kernel's own choice)")
    ap.add_argument("--minb", default="0", help="__launch_bounds__ minimum programs an SM")
    ap.add_argument("--cw", default="1", help="warps a program")
    ap.add_argument("--load-only", action="store_true",
                    help="also time each launch's loads alone (LOADONLY: the same loads, no attention): what the "
                         "access pattern costs without the arithmetic")
    ap.add_argument("--kdq", default="auto",
                    help="keys dequantized in registers (KDQ) 0 / 1, comma-separated (auto: the kernel's default)")
    ap.add_argument("--bulk", default="auto",
                    help="bulk copies into shared memory (sm_90) 0 / 1, comma-separated (auto: the kernel's default)")
    ap.add_argument("--stok", default="0", help="bulk: tokens a stage, comma-separated (0: quant_cuda.BULK_STOK)")
    ap.add_argument("--nst", default="0", help="bulk: stages in flight, comma-separated (0: quant_cuda.BULK_NST)")
    ap.add_argument("--group", type=int, default=0, help="key group (0: 64 at 4 bits, 16 at 2)")
    ap.add_argument("--res", action="store_true", help="keys with residual bits (kres=1; 4 bits only)")
    ap.add_argument("--paged", type=float, default=0.0,
                    help="also the paged kernel over this share of each head's key groups (e.g. 0.125)")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    dev = torch.device("cuda")
    ctx = parse_tokens(a.context)
    H, G, D, sink, window = 8, 4, 128, 4, 128
    q = torch.randn(1, H * G, 1, D, device=dev, dtype=torch.bfloat16)
    length = torch.tensor([ctx], device=dev)
    rows = []
    k = torch.randn(1, H, ctx, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    us = graphed(lambda: decode_attention(q, k, v, length, scale=D ** -0.5), a.reps)
    rows.append(dict(what="full bf16 flash-decoding", splits="", tile="", us=round(us, 1),
                     TBps=round(2 * k.numel() * 2 / us / 1e6, 2)))
    del k, v
    for bits in map(int, a.bits.split(",")):
        group = a.group or (64 if bits == 4 else 16)
        res = a.res and bits == 4
        kq, vq, kf, vf = layer(ctx, bits, group, H, D, sink, window, dev, res=res)
        nq = group * ((ctx - 1 - sink - window) // group)

        def nbytes_of(ntok):   # codes + v stats + k stats (+ residual bits)
            return ntok * H * (2 * D * bits // 8 + 2 * 2 + (D // 8 if res else 0)) + (ntok // group) * H * D * 2 * 2

        nbytes = nbytes_of(nq)
        if a.paged:
            rp = kq["planes"][0].shape[2] // group
            k = max(1, round(a.paged * (nq // group)))
            gen = torch.Generator(device="cpu").manual_seed(0)
            ids = torch.stack([torch.randperm(nq // group, generator=gen)[:k].sort().values + h * rp for h in range(H)])
            table, nsel = ids.to(dev, torch.int32).contiguous(), torch.tensor([k], device=dev, dtype=torch.int32)
            pkw = dict(row_pages=rp, bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5)
            pb = nbytes_of(k * group)
            splits = None   # the loads alone run the kernel's own programs (their fewer registers would fit more)
            for lo in [False] + [True] * a.load_only:
                attn, merge, _, splits = qc.paged_attention(q, kq, vq, kf, vf, length, table, nsel, parts=True,
                                                            load_only=lo, splits=splits, **pkw)
                us_a, us_m = graphed(attn, a.reps), graphed(merge, a.reps)
                rows.append(dict(what=f"{bits}-bit paged {a.paged:g}{' res' if res else ''}: "
                                      + ("loads alone" if lo else "splits kernel | merge"),
                                 splits=splits, tile=qc.TILE, us=f"{us_a:.1f}" + ("" if lo else f" | {us_m:.1f}"),
                                 TBps=round(pb / us_a / 1e6, 2)))
        kw = dict(bits=bits, group=group, vgroup=D, sink=sink, window=window, scale=D ** -0.5,
                  inv_freq=1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D)), prerope=False)
        if not res:   # (the Triton kernel does not read residual bits)
            us = graphed(lambda: qk.quant_decode_attention(q, kq, vq, kf, vf, length, impl="triton", **kw), a.reps)
            rows.append(dict(what=f"{bits}-bit Triton (whole call)", splits="", tile="", us=round(us, 1),
                             TBps=round(nbytes / us / 1e6, 2)))
        for S in map(int, a.splits.split(",")):
            for tile in map(int, a.tile.split(",")):
                for gpf in (None if x == "auto" else int(x) for x in a.gpf.split(",")):
                    kdqs = [None if x == "auto" else int(x) for x in a.kdq.split(",")]
                    bulks = [(None if b == "auto" else int(b), st or None, n or None)
                             for b in a.bulk.split(",") for st in map(int, a.stok.split(","))
                             for n in map(int, a.nst.split(","))]
                    bulks = list(dict.fromkeys((b, st, n) if b != 0 else (0, None, None) for b, st, n in bulks))
                    for minb, cw, kdq, (bulk, stok, nst) in [(m, c, d, b) for m in map(int, a.minb.split(","))
                                                             for c in map(int, a.cw.split(",")) for d in kdqs
                                                             for b in bulks]:
                        kw2 = dict(bits=bits, group=group, sink=sink, window=window, scale=D ** -0.5, splits=S or None,
                                   tile=tile, gpf=gpf, minb=minb, cw=cw, kdq=kdq, bulk=bulk, stok=stok, nst=nst)
                        attn, merge, _, splits = qc.decode_attention(q, kq, vq, kf, vf, length, parts=True, **kw2)
                        us_a, us_m = graphed(attn, a.reps), graphed(merge, a.reps)
                        us = graphed(lambda: qc.decode_attention(q, kq, vq, kf, vf, length, **kw2), a.reps)
                        # (KDQ as compiled: "auto" resolves per layout)
                        lay = qc.config(D=D, bits=bits, group=group, G=G, sink=sink, ring=window + 2 * group,
                                        bf16=True, tile=tile, kdq=kdq, res=res, cw=cw, bulk=bulk, stok=stok, nst=nst)
                        kdq_on = lay["KDQ"]
                        blk = f"{lay['STOK']}x{lay['NST']}" if lay["BULK"] and qc._bulk_ok(q, kq, vq) else "0"
                        rows.append(dict(what=f"{bits}-bit CUDA: splits kernel | merge | whole call",
                                         splits=splits, tile=tile, gpf=gpf, minb=minb, cw=cw, kdq=kdq_on, bulk=blk,
                                         us=f"{us_a:.1f} | {us_m:.1f} | {us:.1f}", TBps=round(nbytes / us / 1e6, 2)))
                        if a.load_only:
                            # the same programs (splits) as the row above, though its fewer registers would fit more
                            attn, _, _, _ = qc.decode_attention(q, kq, vq, kf, vf, length, parts=True, load_only=True,
                                                                **dict(kw2, splits=splits))
                            us_l = graphed(attn, a.reps)
                            rows.append(dict(what=f"{bits}-bit CUDA: the splits kernel's loads alone", splits=splits,
                                             tile=tile, gpf=gpf, minb=minb, cw=cw, bulk=blk, us=f"{us_l:.1f}",
                                             TBps=round(nbytes / us_l / 1e6, 2)))
    print_table(rows, ["what", "splits", "tile", "gpf", "minb", "cw", "kdq", "bulk", "us", "TBps"])
    emit_json({"bench": "quant_cuda_probe", "device": torch.cuda.get_device_name(), "context": ctx, "rows": rows})


if __name__ == "__main__":
    main()
