"""Quest's optional second stage (`quest:rerank=F`): the bound's candidate pages scored again, from
their exact keys (`_rerank_kernel`) or their page-relative codes (through the page table; straight from
the code buffer when every page is a candidate), ranked by the largest logit (rank=max) or by attention
mass (rank=mass: each kernel writes every query's log-sum-exp over a page, `page_mass` normalizes each
query over the candidates and sums the group).

From codes, two forms of each kernel: `quest_fold.py`'s (the default where `_foldable`) fold each
page's min and step into the query and feed the codes to the tensor cores as exact integers;
`_rerank_code_kernel` / `_all_code_kernel` here rebuild each key in fp32 first and serve what the fold
does not: 8-bit codes, query groups over 16, and keys whose codes are not whole 32-bit words (head_dim
x rbits not a multiple of 32, as in the tests' tiny models).
Used by `kernels/quest.py`'s step (re-exported there); references in `kernels/sparse_reference.py`.
"""
from __future__ import annotations

import torch

from . import sparse_reference as ref
from .decode import _use_triton, triton
from .page_select import _pos
from .quant import _pair_mode

if triton is not None:
    import triton.language as tl

    from .decode import lse_rows
    from .decode import scaled_scores
    from .quest_fold import _all_fold_kernel, _rerank_fold_kernel

    @triton.jit
    def _page_out(s, ok, g, Bound, Out, bh, MP, local, scale, softcap, G: tl.constexpr, MASS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
        """One candidate page's logits s (BLOCK_G, P), valid where ok, into the second stage's output.
        max: Out[bh, local] = the largest logit (a page the bound forced, +inf, stays +inf). mass:
        Out[bh, local, g] = log-sum-exp of query g's scaled logits over the page's tokens (the
        normalization over candidates and the sum over the group follow in `page_mass`)."""
        if MASS:
            x = scaled_scores(s, scale, softcap, HAS_SOFTCAP)
            tl.store(Out + (bh * MP + local) * G + g, lse_rows(tl.where(ok, x, float("-inf")), 1), mask=g < G)
        else:
            best = tl.max(tl.max(tl.where(ok, s, float("-inf")), 1), 0)
            bound = tl.load(Bound + bh * MP + local)
            tl.store(Out + bh * MP + local, tl.where(bound == float("inf"), bound, best))

    @triton.jit
    def _rerank_kernel(Q, K, Bound, Table, Nsel, Last, Out, sqb, sqh, stab, MP, row_pages, scale, softcap,
                       G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_G: tl.constexpr,
                       HKV: tl.constexpr, ROW_STRIDE: tl.constexpr, PER: tl.constexpr,
                       MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """Quest's second stage, PER candidate pages a program: each page's exact logits over its
        tokens and the query group (read through the page table) reduced by `_page_out`."""
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        nsel = tl.load(Nsel + bh).to(tl.int32)
        lastn = tl.load(Last + bh).to(tl.int32)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        t = tl.arange(0, P)
        q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + d[None, :], mask=g[:, None] < G, other=0.0)
        for i in range(PER):
            j = tl.program_id(1) * PER + i
            if j < nsel:
                page = tl.load(Table + bh * stab + j).to(tl.int64)
                k = tl.load(K + (page * P + t[:, None]) * ROW_STRIDE + d[None, :])
                s = tl.dot(q, tl.trans(k)).to(tl.float32)                          # (BLOCK_G, P)
                ok = (g[:, None] < G) & ((j < nsel - 1) | (t[None, :] < lastn))
                _page_out(s, ok, g, Bound, Out, bh, MP, page - bh * row_pages, scale, softcap,
                          G, MASS, HAS_SOFTCAP)

    @triton.jit
    def _rerank_code_kernel(Q, Codes, Mn, Mx, Bound, Table, Nsel, Last, Out, sqb, sqh, stab, MP, row_pages,
                            scale, softcap, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                            BLOCK_G: tl.constexpr, HKV: tl.constexpr, PER: tl.constexpr, BITS: tl.constexpr,
                            MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """`_rerank_kernel` reading each candidate's `BITS`-bit page-relative codes instead of its
        keys, PER pages a program. The codes are planar (`ref.page_codes`): shifting a page's (P, NB)
        byte tile by i·BITS gives channels [i·NB, (i+1)·NB), rebuilt as min + code·(max − min)/L and
        dotted with that slice of the query group; the logits are the sum over the 8/BITS slices.
        Each byte is loaded once; nothing is reshaped. Forced pages (+inf: sink, recent) stay +inf."""
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        VPB: tl.constexpr = 8 // BITS
        NB: tl.constexpr = D // VPB
        L: tl.constexpr = (1 << BITS) - 1
        nsel = tl.load(Nsel + bh).to(tl.int32)
        lastn = tl.load(Last + bh).to(tl.int32)
        g = tl.arange(0, BLOCK_G)
        t = tl.arange(0, P)
        nb = tl.arange(0, NB)
        qrow = Q + b * sqb + (h * G + g[:, None]) * sqh + nb[None, :]
        for i in range(PER):
            j = tl.program_id(1) * PER + i
            if j < nsel:
                page = tl.load(Table + bh * stab + j).to(tl.int64)
                local = page - bh * row_pages
                byte = tl.load(Codes + (page * P + t[:, None]) * NB + nb[None, :]).to(tl.int32)   # (P, NB)
                s = tl.zeros([BLOCK_G, P], tl.float32)
                for c in tl.static_range(VPB):
                    lo = tl.load(Mn + page * D + c * NB + nb).to(tl.float32)
                    st = (tl.load(Mx + page * D + c * NB + nb).to(tl.float32) - lo) / L
                    k = (lo[None, :] + ((byte >> (c * BITS)) & L).to(tl.float32) * st[None, :]).to(Q.dtype.element_ty)
                    q = tl.load(qrow + c * NB, mask=g[:, None] < G, other=0.0)
                    s = tl.dot(q, tl.trans(k), s)
                ok = (g[:, None] < G) & ((j < nsel - 1) | (t[None, :] < lastn))
                _page_out(s, ok, g, Bound, Out, bh, MP, local, scale, softcap, G, MASS, HAS_SOFTCAP)

    @triton.jit
    def _all_code_kernel(Q, Codes, Mn, Mx, Pos, Out, sqb, sqh, scb, sch, smb, smh, MP, sink, recent, scale, softcap,
                         G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_G: tl.constexpr,
                         HKV: tl.constexpr, PAGES: tl.constexpr, BITS: tl.constexpr, MASS: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr):
        """`_rerank_code_kernel` when every page is a candidate (rerank x budget >= the cache): PAGES
        consecutive pages a program, read straight from the row's code buffer (no page table), one
        (BLOCK_G, PAGES·P) product per channel slice instead of one 16 x 16 product a page. No page
        bound is read: the pages Quest forces (the first `sink`, the last `recent`) are known from pos.
        Keys are rebuilt in fp32 and converted to bf16 for the product. Measured on the H200 and not kept
        (BENCHMARKS.md): fp32 keys by the magic number with a tf32 product (30 % slower, and it did not
        change the one gemma3 needle it was meant to test), the product swapped (keys as the left
        operand: fewer registers offline, no quicker), the magic number with bf16 keys (no quicker)."""
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        pos = tl.load(Pos).to(tl.int32)
        npages = pos // P + 1
        p0 = tl.program_id(1) * PAGES
        if p0 < npages:
            VPB: tl.constexpr = 8 // BITS
            NB: tl.constexpr = D // VPB
            L: tl.constexpr = (1 << BITS) - 1
            T: tl.constexpr = PAGES * P
            g = tl.arange(0, BLOCK_G)
            pg = p0 + tl.arange(0, PAGES)
            t = tl.arange(0, P)
            nb = tl.arange(0, NB)
            okp = pg < npages
            row = Codes + b * scb + h * sch
            byte = tl.load(row + ((pg[:, None, None] * P + t[None, :, None]) * NB + nb[None, None, :]),
                           mask=okp[:, None, None], other=0).to(tl.int32)                  # (PAGES, P, NB)
            qrow = Q + b * sqb + (h * G + g[:, None]) * sqh + nb[None, :]
            stat = b * smb + h * smh + pg[:, None] * D + nb[None, :]
            s = tl.zeros([BLOCK_G, T], tl.float32)
            for c in tl.static_range(VPB):
                lo = tl.load(Mn + stat + c * NB, mask=okp[:, None], other=0.0).to(tl.float32)   # (PAGES, NB)
                st = (tl.load(Mx + stat + c * NB, mask=okp[:, None], other=0.0).to(tl.float32) - lo) / L
                code = (byte >> (c * BITS)) & L
                q = tl.load(qrow + c * NB, mask=g[:, None] < G, other=0.0)
                k = lo[:, None, :] + code.to(tl.float32) * st[:, None, :]
                s = tl.dot(q, tl.trans(tl.reshape(k.to(Q.dtype.element_ty), (T, NB))), s)
            s = tl.reshape(s, (BLOCK_G, PAGES, P))
            tok = pg[:, None] * P + t[None, :]
            ok = (g[:, None, None] < G) & (tok <= pos)[None, :, :]
            if MASS:
                x = scaled_scores(s, scale, softcap, HAS_SOFTCAP)
                lse = lse_rows(tl.where(ok, x, float("-inf")), 2)                            # (BLOCK_G, PAGES)
                tl.store(Out + (bh * MP + pg[None, :]) * G + g[:, None], lse, mask=(g[:, None] < G) & okp[None, :])
            else:
                best = tl.max(tl.max(tl.where(ok, s, float("-inf")), 2), 0)                   # (PAGES,)
                forced = (pg < sink) | (pg >= npages - recent)
                tl.store(Out + bh * MP + pg, tl.where(forced, float("inf"), best), mask=okp)

    @triton.jit
    def _mass_part_kernel(Lse, Part, MP, NBLK, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
        """`page_mass`, first pass: each query's log-sum-exp over a block of BLOCK pages."""
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        p = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(Lse + (bh * MP + p[:, None]) * G + g[None, :], mask=(p[:, None] < MP) & (g[None, :] < G),
                    other=float("-inf"))
        tl.store(Part + (bh * NBLK + blk) * BLOCK_G + g, lse_rows(x, 0))

    @triton.jit
    def _mass_kernel(Lse, Part, Bound, Pos, Out, MP, NBLK, PAGE, sink, recent, G: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BY_POS: tl.constexpr):
        """`page_mass`, second pass: Z_g from the row's block partials, then each page of this block:
        log Σ_g exp(lse_g − Z_g) (a query with no candidate adds nothing); forced pages (+inf in
        Bound, or BY_POS: the first `sink` and last `recent` of the pages up to pos) are +inf. (A one-launch form,
        each program reading the whole row for Z_g, measured 0.12 ms a step slower at 512K on an H100, session 35;
        its source is in commit a49964d.)"""
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        kk = tl.arange(0, BLOCK_K)
        part = tl.load(Part + (bh * NBLK + kk[:, None]) * BLOCK_G + g[None, :], mask=kk[:, None] < NBLK,
                       other=float("-inf"))
        z = lse_rows(part, 0)
        z = tl.where(z == float("-inf"), 0.0, z)
        p = blk * BLOCK + tl.arange(0, BLOCK)
        ok = p < MP
        x = tl.load(Lse + (bh * MP + p[:, None]) * G + g[None, :], mask=ok[:, None] & (g[None, :] < G),
                    other=float("-inf"))
        sc = lse_rows(x - z[None, :], 1)
        if BY_POS:
            npages = tl.load(Pos).to(tl.int32) // PAGE + 1
            forced = ((p < sink) | (p >= npages - recent)) & (p < npages)
        else:
            forced = tl.load(Bound + bh * MP + p, mask=ok, other=0.0) == float("inf")
        tl.store(Out + bh * MP + p, tl.where(forced, float("inf"), sc), mask=ok)


def _rerank_out(bound, G: int, rank: str) -> torch.Tensor:
    if rank not in ("max", "mass"):
        raise ValueError(f"rank={rank!r}: max or mass")
    return torch.full(bound.shape + ((G,) if rank == "mass" else ()), float("-inf"), device=bound.device)


def page_mass(lse: torch.Tensor, bound: torch.Tensor | None, *, block: int = 1024, pos=None, page: int = 0,
              sink: int = 0, recent: int = 0) -> torch.Tensor:
    """See `sparse_reference.page_mass` (two kernels: block partials of Z, then every page); bound None: the
    forced pages from pos, page, sink, recent (as `page_scores` forces them)."""
    if not _use_triton(lse):
        if bound is None:
            bound = ref.forced_bound(lse.shape[:3], pos, page=page, sink=sink, recent=recent, device=lse.device)
        return ref.page_mass(lse, bound)
    B, Hkv, MP, G = lse.shape
    by_pos = bound is None
    bound = lse if by_pos else bound   # (not read when by_pos)
    assert lse.is_contiguous() and bound.is_contiguous()
    BG, nblk = triton.next_power_of_2(G), triton.cdiv(MP, block)
    part = torch.empty(B * Hkv, nblk, BG, device=lse.device, dtype=torch.float32)
    out = torch.empty(B, Hkv, MP, device=lse.device, dtype=torch.float32)
    _mass_part_kernel[(B * Hkv, nblk)](lse, part, MP, nblk, G=G, BLOCK_G=BG, BLOCK=block)
    _mass_kernel[(B * Hkv, nblk)](lse, part, bound, _pos(pos, lse.device) if by_pos else bound, out, MP, nblk,
                                  page, sink, recent, G=G, BLOCK_G=BG, BLOCK=block,
                                  BLOCK_K=triton.next_power_of_2(nblk), BY_POS=by_pos)
    return out


def rerank_scores(q, k_pool, bound, table, nsel, last, *, row_pages: int, rank: str = "max", scale: float = 1.0,
                  softcap: float | None = None) -> torch.Tensor:
    """See `sparse_reference.rerank_scores` (one kernel and a memset; rank=mass adds `page_mass`)."""
    if not _use_triton(q):
        return ref.rerank_scores(q, k_pool, bound, table, nsel, last, row_pages=row_pages, rank=rank, scale=scale,
                                 softcap=softcap)
    B, Hq, _, D = q.shape
    BH, MP = table.shape[0], bound.shape[2]
    Hkv = BH // B
    P = k_pool.shape[1]
    out = _rerank_out(bound, Hq // Hkv, rank)
    PER = 4
    _rerank_kernel[(BH, triton.cdiv(table.shape[1], PER))](
        q, k_pool, bound, table, nsel, last, out, q.stride(0), q.stride(1), table.stride(0), MP, row_pages,
        scale, softcap or 0.0, G=Hq // Hkv, D=D, P=P, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hkv)), HKV=Hkv,
        ROW_STRIDE=k_pool.stride(1), PER=PER, MASS=rank == "mass", HAS_SOFTCAP=bool(softcap))
    return page_mass(out, bound) if rank == "mass" else out


FOLD, FOLD_GROUPS, FOLD_WARPS = True, 1, 1   # the `_fold_logits` kernels (`_foldable`); H200 sweep in BENCHMARKS
RERANK_PER, RERANK_WARPS = 4, 1   # H200, 512K, 16K candidates a row: 1 warp 206 µs, 2 warps 300, 4 warps 543


def _foldable(fold: bool | None, bits: int, block_g: int, codes: torch.Tensor) -> bool:
    """Whether the `_fold_logits` kernels serve this call: codes exact in bf16 from 128 (bits <= 4), the
    query group within 16 rows, whole aligned 32-bit words a key (fold=None: `FOLD`)."""
    return ((FOLD if fold is None else fold) and bits <= 4 and block_g <= 16 and codes.shape[-1] % 4 == 0
            and all(st % 4 == 0 for st in codes.stride()[:-1]) and codes.data_ptr() % 4 == 0)


def rerank_code_scores(q, codes_pool, mn_pool, mx_pool, bound, table, nsel, last, *, row_pages: int,
                       bits: int, rank: str = "max", scale: float = 1.0, softcap: float | None = None,
                       fold: bool | None = None, groups: int | None = None) -> torch.Tensor:
    """See `sparse_reference.rerank_code_scores` (one kernel and a memset; rank=mass adds `page_mass`):
    `_rerank_fold_kernel` (`groups` of 16/G candidates a program) where it applies (`_foldable`), else
    `_rerank_code_kernel`."""
    if not _use_triton(q):
        return ref.rerank_code_scores(q, codes_pool, mn_pool, mx_pool, bound, table, nsel, last,
                                      row_pages=row_pages, bits=bits, rank=rank, scale=scale, softcap=softcap)
    B, Hq, _, D = q.shape
    BH, MP = table.shape[0], bound.shape[2]
    Hkv = BH // B
    P = codes_pool.shape[1]
    assert codes_pool.is_contiguous() and mn_pool.is_contiguous() and mx_pool.is_contiguous()
    out = _rerank_out(bound, Hq // Hkv, rank)
    G = Hq // Hkv
    BG = triton.next_power_of_2(G)
    if _foldable(fold, bits, BG, codes_pool):
        groups = groups or FOLD_GROUPS
        _rerank_fold_kernel[(BH, triton.cdiv(table.shape[1], groups * (16 // BG)))](
            q, codes_pool, mn_pool, mx_pool, bound, table, nsel, last, out, q.stride(0), q.stride(1),
            table.stride(0), MP, row_pages, scale, softcap or 0.0, G=G, D=D, P=P, BLOCK_G=BG, HKV=Hkv,
            GROUPS=groups, BITS=bits, MASS=rank == "mass", HAS_SOFTCAP=bool(softcap), PAIR=_pair_mode(q),
            num_warps=FOLD_WARPS)
    else:
        PER = RERANK_PER
        _rerank_code_kernel[(BH, triton.cdiv(table.shape[1], PER))](
            q, codes_pool, mn_pool, mx_pool, bound, table, nsel, last, out, q.stride(0), q.stride(1), table.stride(0),
            MP, row_pages, scale, softcap or 0.0, G=G, D=D, P=P, BLOCK_G=max(16, BG), HKV=Hkv, PER=PER, BITS=bits,
            MASS=rank == "mass", HAS_SOFTCAP=bool(softcap), num_warps=RERANK_WARPS)
    return page_mass(out, bound) if rank == "mass" else out


# H200, 128K / 512K, max rank: 4 pages and 1 warp a program 73 / 275 µs; 8 and 4 106 / 394; 16 and 4
# 141 / 534; 8 and 2 129 / 485
ALL_PAGES, ALL_WARPS = 4, 1


def all_page_code_scores(q, codes, pmin, pmax, pos, *, bits: int, sink: int, recent: int, rank: str = "max",
                         scale: float = 1.0, softcap: float | None = None, pages: int | None = None,
                         warps: int | None = None, groups: int | None = None, fold: bool | None = None) -> torch.Tensor:
    """Quest's second stage when every page up to pos is a candidate, read from the cache's own
    buffers: codes (B, Hkv, MP, P, D·bits/8), pmin/pmax (B, Hkv, MP, D), each (b, h) block contiguous.
    The first `sink` and last `recent` pages are forced (+inf) as `page_scores` forces them, so the
    bound itself is not needed. One kernel (two more for rank=mass), no candidate select, no table:
    `_all_fold_kernel` (groups of 16/G pages, `groups` a program) where it applies (bits <= 4, G <= 16,
    fold not False), else `_all_code_kernel` (`pages` a program)."""
    if not _use_triton(q):
        return ref.all_page_code_scores(q, codes, pmin, pmax, pos, bits=bits, sink=sink, recent=recent, rank=rank,
                                        scale=scale, softcap=softcap)
    B, Hq, _, D = q.shape
    Hkv, MP, P = codes.shape[1], codes.shape[2], codes.shape[3]
    assert codes[0, 0].is_contiguous() and pmin[0, 0].is_contiguous() and pmin.stride() == pmax.stride()
    G = Hq // Hkv
    out = torch.full((B, Hkv, MP) + ((G,) if rank == "mass" else ()), float("-inf"), device=q.device)
    pos_t = _pos(pos, q.device)
    BG = triton.next_power_of_2(G)
    if _foldable(fold, bits, BG, codes):
        groups = groups or FOLD_GROUPS
        _all_fold_kernel[(B * Hkv, triton.cdiv(MP, groups * (16 // BG)))](
            q, codes, pmin, pmax, pos_t, out, q.stride(0), q.stride(1), codes.stride(0), codes.stride(1),
            pmin.stride(0), pmin.stride(1), MP, sink, recent, scale, softcap or 0.0, G=G, D=D, P=P, BLOCK_G=BG,
            HKV=Hkv, GROUPS=groups, BITS=bits, MASS=rank == "mass", HAS_SOFTCAP=bool(softcap),
            PAIR=_pair_mode(q), num_warps=warps or FOLD_WARPS)
    else:
        pages = pages or ALL_PAGES
        _all_code_kernel[(B * Hkv, triton.cdiv(MP, pages))](
            q, codes, pmin, pmax, pos_t, out, q.stride(0), q.stride(1), codes.stride(0), codes.stride(1),
            pmin.stride(0), pmin.stride(1), MP, sink, recent, scale, softcap or 0.0, G=G, D=D, P=P,
            BLOCK_G=max(16, BG), HKV=Hkv, PAGES=pages, BITS=bits, MASS=rank == "mass",
            HAS_SOFTCAP=bool(softcap), num_warps=warps or ALL_WARPS)
    if rank == "mass":
        return page_mass(out, None, pos=pos_t, page=P, sink=sink, recent=recent)
    return out
