"""Quest's page select alone (`kernels/page_select.py`), graph-replayed on the GPU: the CUDA block select
with each way of combining its histogram atomics (`AGG` in page_select.cu), the cluster select
(`page_select_cluster.cu`) at several block sizes, next to the Triton selects,
on rows shaped like a decode step's (8 KV heads, one row of page or key-group scores each), every
variant checked against the reference.

    python benchmarks/select_probe.py --pages 8192,2048 --rows 8
"""
from __future__ import annotations

import argparse

import torch
from common import emit_json, graph_time, print_table

from longkv.kernels import page_select as ps
from longkv.kernels import sparse_reference as ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default="8192,2048", help="pages (or key groups) a row")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--frac", type=float, default=1 / 8, help="share of the pages taken")
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for MP in map(int, a.pages.split(",")):
        g = torch.Generator(device=dev).manual_seed(MP)
        s = (torch.randn(1, a.rows, MP, device=dev, generator=g) * 3 + 40).contiguous()   # bounds: similar magnitudes
        k = max(1, int(MP * a.frac))
        pos = torch.tensor([MP * 16 - 1], device=dev)
        want = ref.select_pages(s, k, pos, page=16, row_pages=MP)
        variants = {f"block agg={agg} rk={rk} early={early}":
                    (lambda agg=agg, rk=rk, early=early: _block(s, k, pos, MP, agg, rk, early))
                    for agg, early in ((1, 0), (2, 0), (2, 1)) for rk in (8, 16) if MP <= 1024 * rk}
        for ct in (256, 512):
            for agg in ((1, 2) if ct == 256 else (2,)):
                crk = ps._cluster_keys(MP, ct)
                if crk and ps.cluster_kernel(ct, crk, agg) is not None:
                    variants[f"cluster ct={ct} rk={crk} agg={agg}"] = (
                        lambda ct=ct, crk=crk, agg=agg: _cluster(s, k, pos, MP, ct, crk, agg))
        variants["triton multi"] = lambda: ps.select_pages(s, k, pos, page=16, row_pages=MP, method="multi")
        if MP <= ps.SELECT_CHUNK:
            variants["triton bisect"] = lambda: ps.select_pages(s, k, pos, page=16, row_pages=MP, method="bisect")
        for name, fn in variants.items():
            got = fn()
            ok = all(torch.equal(x.cpu(), y.cpu()) for x, y in zip((got[0][:, :k], got[1], got[2]),
                                                                   (want[0][:, :k], want[1], want[2])))
            rows.append(dict(pages=MP, k=k, variant=name, us=round(graph_time(fn, a.reps, dev) * 1e3, 2), equal=ok))
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    emit_json({"bench": "select_probe", "device": torch.cuda.get_device_name(), "rows": rows})


def _block(s, k, pos, MP, agg, rk, early):
    B, H, _ = s.shape
    table = torch.empty(B * H, k, device=s.device, dtype=torch.int32)
    nsel = torch.empty(B * H, device=s.device, dtype=torch.int32)
    last = torch.empty(B * H, device=s.device, dtype=torch.int32)
    ps.block_kernel(agg, rk, early)(grid=(B * H, 1, 1), block=(1024, 1, 1),
                         args=[s, pos, table, nsel, last, MP, k, 16, MP, table.stride(0)])
    return table, nsel, last


def _cluster(s, k, pos, MP, ct, crk, agg):
    B, H, _ = s.shape
    table = torch.empty(B * H, k, device=s.device, dtype=torch.int32)
    nsel = torch.empty(B * H, device=s.device, dtype=torch.int32)
    last = torch.empty(B * H, device=s.device, dtype=torch.int32)
    ps.cluster_kernel(ct, crk, agg)(grid=(B * H * ps.CLUSTER, 1, 1), block=(ct, 1, 1),
                                    args=[s, pos, table, nsel, last, MP, k, 16, MP, table.stride(0)])
    return table, nsel, last


if __name__ == "__main__":
    main()
