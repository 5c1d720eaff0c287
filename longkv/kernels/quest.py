"""Triton kernels for sparse decoding: Quest page scoring, and attention through a page table.

Quest (Tang et al., arXiv 2406.10774) scores every 16-token page of keys against the decode query by
the upper bound sum_d max(q_d·min_d, q_d·max_d) = q·c + |q|·r (c, r: page centre and half-range), so
`_score_kernel` is two small dot products per page, pooled (max) over the KV head's query group: one
page choice per KV head (pages shared by a GQA group; per-query-head choices would read K/V several
times). In plain torch this scoring costs as much as dense attention (research/sparse.md §12.5).

`_paged_kernel` is flash-decoding (kernels/decode.py) whose keys come through a page table: token t of
a row is slot t % P of pool page table[t // P]; Quest passes the selected pages of a dense buffer,
AdaKV each KV head's own pages of a shared pool. Parts are merged by decode.py's LSE merge kernel.
Everything a step needs is on the device, so both run inside a CUDA graph.
References: `kernels/sparse_reference.py`.
"""
from __future__ import annotations

import torch

from . import sparse_reference as ref
from .decode import _use_triton, triton

if triton is not None:
    import triton.language as tl

    from .decode import _merge_kernel, online_step

    @triton.jit
    def _score_kernel(Q, Mn, Mx, Npages, S, sqb, sqh, smb, smh, smp, MP, sink, recent,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                      HKV: tl.constexpr):
        bh = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        b = bh // HKV
        h = bh % HKV
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
        base = b * smb + h * smh + p[:, None] * smp + d[None, :]
        ok = p < MP
        mn = tl.load(Mn + base, mask=ok[:, None], other=0.0).to(tl.float32)
        mx = tl.load(Mx + base, mask=ok[:, None], other=0.0).to(tl.float32)
        c = (mx + mn) * 0.5
        r = (mx - mn) * 0.5
        s = tl.dot(q, tl.trans(c)) + tl.dot(tl.abs(q), tl.trans(r))          # (BLOCK_G, BLOCK_P)
        s = tl.where(g[:, None] < G, s, float("-inf"))
        s = tl.max(s, 0)
        npages = tl.load(Npages).to(tl.int32)
        s = tl.where((p < sink) | ((p >= npages - recent) & (p < npages)), float("inf"), s)
        s = tl.where(p < npages, s, float("-inf"))
        tl.store(S + bh * MP + p, s, mask=ok)

    @triton.jit
    def _paged_kernel(Q, K, V, Table, Nsel, Last, Out, Lse, sqb, sqh, stab, scale, softcap,
                      G: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HKV: tl.constexpr, ROW_STRIDE: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        nsel = tl.load(Nsel + bh).to(tl.int32)
        length = (nsel - 1) * P + tl.load(Last + bh).to(tl.int32)
        per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            ok = t < end
            page = tl.load(Table + bh * stab + t // P, mask=ok, other=0).to(tl.int64)
            row = page * P + t % P
            k = tl.load(K + row[:, None] * ROW_STRIDE + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + row[:, None] * ROW_STRIDE + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = online_step(q, k, v, ok, m, l, acc, scale, softcap, HAS_SOFTCAP)
        out_row = (bh * SPLITS + split) * G + g
        lse = tl.where(l > 0, m + tl.log(l), float("-inf"))
        tl.store(Lse + out_row, lse, mask=g < G)
        tl.store(Out + out_row[:, None] * D + d[None, :], acc / tl.where(l > 0, l, 1.0)[:, None],
                 mask=g[:, None] < G)


def page_scores(q, pmin, pmax, npages, *, sink: int, recent: int) -> torch.Tensor:
    """See `sparse_reference.page_scores`; npages a device tensor (1,) or 0-dim."""
    if not _use_triton(q):
        return ref.page_scores(q, pmin, pmax, npages, sink=sink, recent=recent)
    B, Hq, _, D = q.shape
    Hkv, MP = pmin.shape[1], pmin.shape[2]
    assert pmin.stride() == pmax.stride() and pmin.stride(-1) == 1
    out = torch.empty(B, Hkv, MP, device=q.device, dtype=torch.float32)
    G = Hq // Hkv
    BLOCK_P = 64
    npages = torch.as_tensor(npages, device=q.device).reshape(-1)[-1:]
    _score_kernel[(B * Hkv, triton.cdiv(MP, BLOCK_P))](
        q, pmin, pmax, npages, out, q.stride(0), q.stride(1), pmin.stride(0), pmin.stride(1), pmin.stride(2),
        MP, sink, recent, G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_P=BLOCK_P, HKV=Hkv)
    return out


def paged_attention(q, k_pool, v_pool, table, nsel, last, *, scale: float, softcap: float | None = None,
                    splits: int | None = None) -> torch.Tensor:
    """q (B, Hq, 1, D); pools (NP, P, D) contiguous; table (B·Hkv, MAXP) int32; nsel, last (B·Hkv,)
    (or (1,), broadcast) → (B, Hq, 1, D) in q's dtype."""
    B, Hq, _, D = q.shape
    BH = table.shape[0]
    nsel = nsel.reshape(-1).expand(BH).contiguous()
    last = last.reshape(-1).expand(BH).contiguous()
    if not _use_triton(q):
        return ref.paged_attention(q, k_pool, v_pool, table, nsel, last, scale=scale, softcap=softcap)
    Hkv = BH // B
    G = Hq // Hkv
    P = k_pool.shape[1]
    S = splits or max(1, min(64, triton.cdiv(table.shape[1] * P, 1024), max(1, 1024 // BH)))
    part = torch.empty(BH * S * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(BH * S * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    _paged_kernel[(BH, S)](
        q, k_pool, v_pool, table, nsel, last, part, lse, q.stride(0), q.stride(1), table.stride(0),
        scale, softcap or 0.0, G=G, SPLITS=S, D=D, P=P, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=64 if D <= 128 else 32, HAS_SOFTCAP=bool(softcap), HKV=Hkv, ROW_STRIDE=k_pool.stride(1))
    _merge_kernel[(BH * G,)](part, lse, out, G=G, SPLITS=S, D=D, BLOCK_S=triton.next_power_of_2(S))
    return out
