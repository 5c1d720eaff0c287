"""Triton kernels for sparse decoding: a Quest decode step, and attention through a page table.

A Quest layer's decode step runs everything on the device (one CUDA graph): `_append_kernel` (RoPE
the new key, write it and its value, widen its page's min/max), `_score_kernel` (every page's bound;
sink and recent pages forced to +inf, so selection is one top-k), the select (`page_select.py`: the
top-k pages straight into an int32 page table; no sort, no torch.topk), `_paged_kernel` + decode.py's
`_merge_kernel`: 5 launches, 11 with the multi-program select. Before, the same step was ~30 small
torch kernels around two Triton ones (topk, sort, index arithmetic, the page min/max update), which
cost as much as the dense read at 128K. The optional second stage (`rerank`, `quest_rerank.py`)
re-scores candidate pages from their exact keys or their page-relative codes (written by
`_append_kernel` when a page fills).

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
from .page_select import SELECT_CHUNK, SELECT_SEG, _pos, page_groups, select_pages  # noqa: F401  (the step's select)
from .quest_rerank import all_page_code_scores, page_mass, rerank_code_scores, rerank_scores  # noqa: F401

if triton is not None:
    import triton.language as tl

    from .decode import _merge_kernel, online_step

    @triton.jit
    def _append_kernel(K, V, Cos, Sin, Pos, KC, VC, Mn, Mx, Codes, skb, skh, svb, svh, scb, sch, sct, svcb, svch,
                       svct, smb, smh, smp, sxb, sxh, sxp, PAGE: tl.constexpr, D: tl.constexpr, HKV: tl.constexpr,
                       BITS: tl.constexpr, WRITE: tl.constexpr):
        """One program per (b, kv head): RoPE the new key (fp32, rounded once), write key and value at
        pos, and fold the key into its page's min/max (reset on the page's first slot). BITS > 0: the
        token that completes its page also writes the page's codes (`ref.page_codes`). WRITE=False: the
        bounds only (the keys and values live elsewhere: `quant+quest`); KC only gives the rounding dtype."""
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        pos = tl.load(Pos).to(tl.int64)
        d = tl.arange(0, D)
        x = tl.load(K + b * skb + h * skh + d).to(tl.float32)
        xr = tl.load(K + b * skb + h * skh + (d + D // 2) % D).to(tl.float32)
        xr = tl.where(d < D // 2, -xr, xr)                                   # cat(-x2, x1)
        kr = (x * tl.load(Cos + d).to(tl.float32) + xr * tl.load(Sin + d).to(tl.float32)).to(KC.dtype.element_ty)
        if WRITE:
            tl.store(KC + b * scb + h * sch + pos * sct + d, kr)
            tl.store(VC + b * svcb + h * svch + pos * svct + d, tl.load(V + b * svb + h * svh + d).to(VC.dtype.element_ty))
        m = b * smb + h * smh + (pos // PAGE) * smp + d
        first = pos % PAGE == 0
        kr = kr.to(Mn.dtype.element_ty)
        lo = tl.where(first, kr, tl.minimum(tl.load(Mn + m), kr))
        hi = tl.where(first, kr, tl.maximum(tl.load(Mx + m), kr))
        tl.store(Mn + m, lo)
        tl.store(Mx + m, hi)
        if BITS > 0:
            if pos % PAGE == PAGE - 1:       # the page is full: its codes from its final min/max
                PER: tl.constexpr = 8 // BITS
                L: tl.constexpr = (1 << BITS) - 1
                t = tl.arange(0, PAGE)
                rows = pos - (PAGE - 1) + t
                kp = tl.load(KC + b * scb + h * sch + rows[:, None] * sct + d[None, :],
                             mask=t[:, None] < PAGE - 1, other=0.0).to(tl.float32)
                kp = tl.where(t[:, None] == PAGE - 1, kr.to(tl.float32)[None, :], kp)
                lo = lo.to(tl.float32)
                rng = hi.to(tl.float32) - lo
                inv = tl.where(rng > 0, L / tl.where(rng > 0, rng, 1.0), 0.0)
                c = tl.floor((kp - lo[None, :]) * inv[None, :] + 0.5)
                c = tl.minimum(tl.maximum(c, 0.0), L * 1.0).to(tl.int32)
                c = tl.reshape(c, (PAGE, PER, D // PER))                    # planar: byte b, channels b + i·NB
                byte = tl.sum(c << (tl.arange(0, PER) * BITS)[None, :, None], axis=1)
                col = tl.arange(0, D // PER)
                tl.store(Codes + b * sxb + h * sxh + (pos // PAGE) * sxp + t[:, None] * (D // PER) + col[None, :],
                         byte.to(tl.uint8))

    @triton.jit
    def _score_kernel(Q, Mn, Mx, Pos, S, sqb, sqh, smb, smh, smp, MP, PAGE, sink, recent,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                      HKV: tl.constexpr):
        bh = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        b = bh // HKV
        h = bh % HKV
        npages = tl.minimum(tl.load(Pos).to(tl.int32) // PAGE + 1, MP)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
        base = b * smb + h * smh + p[:, None] * smp + d[None, :]
        ok = p < npages                      # pages past the last token are not read
        mn = tl.load(Mn + base, mask=ok[:, None], other=0.0).to(tl.float32)
        mx = tl.load(Mx + base, mask=ok[:, None], other=0.0).to(tl.float32)
        c = (mx + mn) * 0.5
        r = (mx - mn) * 0.5
        s = tl.dot(q, tl.trans(c)) + tl.dot(tl.abs(q), tl.trans(r))          # (BLOCK_G, BLOCK_P)
        s = tl.where(g[:, None] < G, s, float("-inf"))
        s = tl.max(s, 0)
        s = tl.where((p < sink) | (p >= npages - recent), float("inf"), s)
        s = tl.where(ok, s, float("-inf"))
        tl.store(S + bh * MP + p, s, mask=p < MP)

    @triton.jit
    def _group_score_kernel(Q, KS, KZ, Len, S, NPos, MG, HALF, SINK: tl.constexpr, WINDOW: tl.constexpr,
                            GROUP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_P: tl.constexpr, LOWP: tl.constexpr):
        """Pages = a packed layer's key groups, bounds from their statistics: a group's keys lie in
        [z, z + 2·HALF·s] per channel, so c = z + HALF·s, r = HALF·|s| (the `_score_kernel` bound)."""
        bh = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        nqg = tl.maximum((tl.load(Len) - 1 - SINK - WINDOW) // GROUP, 0).to(tl.int32)
        if (bh == 0) & (tl.program_id(1) == 0):
            tl.store(NPos, nqg.to(tl.int64) * GROUP - 1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + (bh * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
        ok = p < nqg
        base = (bh * MG + p[:, None]) * D + d[None, :]
        sc = tl.load(KS + base, mask=ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(KZ + base, mask=ok[:, None], other=0.0).to(tl.float32)
        c, r = z + HALF * sc, HALF * tl.abs(sc)
        if LOWP:   # fp16 operands (the products still add in fp32)
            s = tl.dot(q.to(tl.float16), tl.trans(c.to(tl.float16))) + tl.dot(tl.abs(q).to(tl.float16),
                                                                          tl.trans(r.to(tl.float16)))
        else:
            s = tl.dot(q, tl.trans(c)) + tl.dot(tl.abs(q), tl.trans(r))
        s = tl.max(tl.where(g[:, None] < G, s, float("-inf")), 0)
        tl.store(S + bh * MG + p, tl.where(ok, s, float("-inf")), mask=p < MG)

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


def append_token(k, v, cos, sin, pos, kc, vc, pmin, pmax, *, page: int, codes=None, bits: int = 0) -> None:
    """See `sparse_reference.append_token` (one kernel); kc = vc = None: fold the key into the page
    bounds only."""
    if not _use_triton(k):
        return ref.append_token(k, v, cos, sin, pos, kc, vc, pmin, pmax, page=page, codes=codes, bits=bits)
    B, Hkv, _, D = k.shape
    assert D % 2 == 0 and D & (D - 1) == 0, "head dim must be a power of two"
    assert pmin.stride() == pmax.stride()
    k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v, cos, sin))
    cos, sin = cos.reshape(-1, D)[-1], sin.reshape(-1, D)[-1]
    write = kc is not None
    kc, vc = (kc, vc) if write else (pmin, pmin)
    for t in (kc, vc, pmin):
        assert t.stride(-1) == 1
    if codes is None:
        bits, codes, cs = 0, pmin, (0, 0, 0)
    else:
        assert write and codes.shape[-2:] == (page, D * bits // 8) and codes[0, 0].is_contiguous()
        cs = codes.stride()[:3]
    _append_kernel[(B * Hkv,)](
        k, v, cos, sin, _pos(pos, k.device), kc, vc, pmin, pmax, codes, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        pmin.stride(0), pmin.stride(1), pmin.stride(2), *cs, PAGE=page, D=D, HKV=Hkv, BITS=bits, WRITE=write)


def page_scores(q, pmin, pmax, pos, *, page: int, sink: int, recent: int, block_p: int = 128,
                warps: int = 4) -> torch.Tensor:
    """See `sparse_reference.page_scores`; pos a device tensor (1,) or 0-dim, or an int. Tiles of
    128 pages: 47.7 µs at 512K on the H200 (2.8 TB/s of page bounds) vs 55.8 µs with 64."""
    if not _use_triton(q):
        return ref.page_scores(q, pmin, pmax, pos, page=page, sink=sink, recent=recent)
    B, Hq, _, D = q.shape
    Hkv, MP = pmin.shape[1], pmin.shape[2]
    assert pmin.stride() == pmax.stride() and pmin.stride(-1) == 1
    out = torch.empty(B, Hkv, MP, device=q.device, dtype=torch.float32)
    G = Hq // Hkv
    BLOCK_P = block_p
    _score_kernel[(B * Hkv, triton.cdiv(MP, BLOCK_P))](
        q, pmin, pmax, _pos(pos, q.device), out, q.stride(0), q.stride(1), pmin.stride(0), pmin.stride(1),
        pmin.stride(2), MP, page, sink, recent, G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_P=BLOCK_P, HKV=Hkv, num_warps=warps)
    return out


def group_scores(q, ks, kz, length, *, bits: int, group: int, sink: int, window: int, block_p: int = 128,
                 warps: int = 4, lowp: bool = True):
    """See `quant_reference.group_scores` (Quest's bound with pages = a packed layer's key groups, from
    their scale and zero): → (scores (B, Hkv, MG) fp32, npos (1,) int64 for `select_pages`). length:
    (1,) int64 device tensor. lowp: the two dot products on fp16 operands (bounds rounded to fp16; sums in
    fp32). H200, 512K, 8B shape (sparse_decode.py's breakdown, graph-replayed): 128 groups a program 11.9 µs
    with lowp, 18.6 without (64 groups: 17.4)."""
    if not _use_triton(q):
        from .quant_reference import group_scores as reference
        return reference(q, ks, kz, length, bits=bits, group=group, sink=sink, window=window)
    B, Hq, _, D = q.shape
    Hkv, MG = ks.shape[1], ks.shape[2]
    assert ks.is_contiguous() and kz.is_contiguous()
    out = torch.empty(B, Hkv, MG, device=q.device, dtype=torch.float32)
    npos = torch.empty(1, device=q.device, dtype=torch.int64)
    G = Hq // Hkv
    _group_score_kernel[(B * Hkv, triton.cdiv(MG, block_p))](
        q.contiguous(), ks, kz, _pos(length, q.device), out, npos, MG, (2 ** bits - 1) / 2, SINK=sink, WINDOW=window,
        GROUP=group, G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_P=block_p, LOWP=lowp,
        num_warps=warps)
    return out, npos


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
    # ~256 selected tokens a split, ~1K programs: a split is a few tiles of gathered pages, and
    # enough programs are in flight to hide the gather latency (the dense kernel reads ~1K keys a
    # split, but from contiguous memory and with many more of them)
    S = splits or max(1, min(128, triton.cdiv(table.shape[1] * P, 256), max(1, 1024 // BH)))
    part = torch.empty(BH * S * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(BH * S * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    _paged_kernel[(BH, S)](
        q, k_pool, v_pool, table, nsel, last, part, lse, q.stride(0), q.stride(1), table.stride(0),
        scale, softcap or 0.0, G=G, SPLITS=S, D=D, P=P, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=64 if D <= 128 else 32, HAS_SOFTCAP=bool(softcap), HKV=Hkv, ROW_STRIDE=k_pool.stride(1))
    _merge_kernel[(BH * G,)](part, lse, out, G=G, SPLITS=S, D=D, BLOCK_S=triton.next_power_of_2(S))
    return out
