"""Quest's pages scored in the keys' principal subspace: `kv4+quest:groups=1,pca=F` (cache/select/quest_storage.py).

SparQ's estimate (`quest_sparq.py`: the channels where the query is largest) loses needles on gemma3-270m,
whose q/k RMSNorm spreads a query over many channels, and on smollm2-135m's multi-key tasks at an eighth
of the channels (BENCHMARKS.md, issue 5). Loki (Singhania et al., "Loki: Low-rank Keys for Efficient
Sparse Attention", NeurIPS 2024, arXiv 2406.02542) observes that keys live in a low-dimensional subspace
and estimates q·k as (qV)·(kV) from the top R principal directions V of the keys. Here V is fitted on the
prompt's own first keys (`quant_reference.pca_basis`, one D×D eigendecomposition per layer and KV head
at prefill, so no calibration file), every flushed key group is kept projected and 4-bit coded
per component (`sketch` (B, H, R, cap/2), `sz` (B, H, R, MG, 2): the layout `quest_sparq`'s score kernel
reads), and the groups are ranked by `_sparq_score_kernel` over all R components of the projected query.
The copy is R/D of the channel-major copy `channels=F` keeps: at R = D/8, 1/64 of bf16 keys' bytes.

A sparse layer's decode step: `_pca_prep_kernel` (one program a row) projects the query group and
rewrites the copy's newest flushed group (idempotent, as `quest_sparq._prep_kernel`); then the score,
the select and the paged attention as for `channels`.

References: `quant_reference.pca_basis`, `pca_project`, `pca_sketch_groups`.
"""
from __future__ import annotations

import torch

from . import quant_reference as ref
from .decode import _use_triton, triton
from .page_select import _pos

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _pca_prep_kernel(Q, VQ, V, KP, KS, KZ, Len, SK, SZ, QP, CAPH, MG, G: tl.constexpr, GROUP: tl.constexpr,
                         SINK: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, SKETCH: tl.constexpr):
        """One program a (batch, KV head) row: QP (G, R) = the query group times VQ (D, R); with SKETCH,
        the newest flushed key group dequantized (even and odd channels apart, as packed), projected,
        coded in 4 bits per component (`ref.pca_project`) and stored channel-major. V projects the
        keys, VQ the queries (the same matrix unless the axes are scaled, `quant_reference.pca_axes`)."""
        bh = tl.program_id(0)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        r = tl.arange(0, BLOCK_R)
        q = tl.load(Q + (bh * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
        vb = V + bh * D * R
        v = tl.load(VQ + bh * D * R + d[:, None] * R + r[None, :], mask=r[None, :] < R, other=0.0)  # (D, BLOCK_R)
        qp = tl.dot(q, v, input_precision="ieee")                                                # (BLOCK_G, BLOCK_R)
        tl.store(QP + (bh * G + g[:, None]) * R + r[None, :], qp, mask=(g[:, None] < G) & (r[None, :] < R))
        if SKETCH:
            gi = (tl.maximum(tl.load(Len) - SINK - WINDOW, 0) // GROUP - 1).to(tl.int32)
            if gi >= 0:
                m = tl.arange(0, GROUP // 2)
                j = tl.arange(0, D // 2)
                rows = bh * (CAPH * 2) + gi * GROUP                 # the group's first token row
                so = (bh * MG + gi) * D + 2 * j
                se, sodd = tl.load(KS + so).to(tl.float32), tl.load(KS + so + 1).to(tl.float32)
                ze, zodd = tl.load(KZ + so).to(tl.float32), tl.load(KZ + so + 1).to(tl.float32)
                ve = tl.load(vb + (2 * j[:, None]) * R + r[None, :], mask=r[None, :] < R, other=0.0)   # (D/2, BLOCK_R)
                vo = tl.load(vb + (2 * j[:, None] + 1) * R + r[None, :], mask=r[None, :] < R, other=0.0)
                ev = tl.load(KP + (rows + 2 * m[:, None]) * (D // 2) + j[None, :]).to(tl.int32)    # tokens 2m
                od = tl.load(KP + (rows + 2 * m[:, None] + 1) * (D // 2) + j[None, :]).to(tl.int32)  # 2m + 1
                pe = tl.dot(ze[None, :] + (ev & 15).to(tl.float32) * se[None, :], ve, input_precision="ieee") + \
                    tl.dot(zodd[None, :] + (ev >> 4).to(tl.float32) * sodd[None, :], vo, input_precision="ieee")
                po = tl.dot(ze[None, :] + (od & 15).to(tl.float32) * se[None, :], ve, input_precision="ieee") + \
                    tl.dot(zodd[None, :] + (od >> 4).to(tl.float32) * sodd[None, :], vo, input_precision="ieee")
                lo = tl.minimum(tl.min(pe, 0), tl.min(po, 0))                                     # (BLOCK_R,)
                hi = tl.maximum(tl.max(pe, 0), tl.max(po, 0))
                st = (hi - lo) / 15
                inv = tl.where(st > 0, 1 / tl.maximum(st, 1e-30), 0.0)
                ce = tl.minimum(tl.maximum(tl.floor((pe - lo[None, :]) * inv[None, :] + 0.5), 0), 15).to(tl.int32)
                co = tl.minimum(tl.maximum(tl.floor((po - lo[None, :]) * inv[None, :] + 0.5), 0), 15).to(tl.int32)
                ok = r < R
                tl.store(SK + (bh * R + r[None, :]) * CAPH + gi * (GROUP // 2) + m[:, None], (ce | (co << 4)).to(tl.uint8),
                         mask=ok[None, :])
                o = ((bh * R + r) * MG + gi) * 2
                tl.store(SZ + o, st.to(tl.float16), mask=ok)
                tl.store(SZ + o + 1, lo.to(tl.float16), mask=ok)


def pca_prepare(q, basis, planes, ks, kz, sk, sz, length, *, group: int, sink: int, window: int,
                sketch: bool = True, qbasis=None, warps: int = 4):
    """A decode step's first launch (graph-safe): with `sketch`, the projected copy of the key group
    flushed last when `length` (a (1,) int64 device tensor) tokens are held; → the projected queries
    qp (B, Hq, 1, R) fp32, what `quest_sparq.sparq_group_scores` reads with channels = R. `basis`
    (B, Hkv, D, R) projects the keys, `qbasis` the queries (default: `basis`)."""
    qbasis = basis if qbasis is None else qbasis
    B, Hq, _, D = q.shape
    H, R = basis.shape[1], basis.shape[-1]
    G = Hq // H
    if not _use_triton(q):
        if sketch:
            n = torch.as_tensor(length, device=ks.device).reshape(-1)[-1]
            g1 = torch.clamp(n - sink - window, min=0) // group
            ref.pca_sketch_groups(planes, ks, kz, basis, sk, sz, g1 - 1, g1, group=group)
        return (q.float().reshape(B, H, G, D) @ qbasis).reshape(B, Hq, 1, R)
    if not sketch:
        planes, ks, kz = [sk], sz, sz     # not read
    assert basis.is_contiguous() and qbasis.is_contiguous() and planes[0].is_contiguous() and ks.is_contiguous() and sk.is_contiguous()
    qp = torch.empty(B, Hq, 1, R, device=q.device, dtype=torch.float32)
    _pca_prep_kernel[(B * H,)](q.contiguous(), qbasis, basis, planes[0], ks, kz, _pos(length, q.device), sk, sz, qp,
                               sk.shape[-1], sz.shape[3], G=G, GROUP=group, SINK=sink, WINDOW=window, D=D, R=R,
                               BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_R=max(16, triton.next_power_of_2(R)),
                               SKETCH=sketch, num_warps=warps)
    return qp


def every_component(rows: int, components: int, query_group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The `sel` that makes `quest_sparq.sparq_group_scores` read every component of the projected copy with
    no temperature: idx (rows, R) = 0..R-1, tau (rows, BLOCK_G) = 1. Built once a layer, outside the graph."""
    bg = max(16, 1 << (query_group - 1).bit_length())
    return (torch.arange(components, device=device, dtype=torch.int32).expand(rows, -1).contiguous(),
            torch.ones(rows, bg, device=device))
