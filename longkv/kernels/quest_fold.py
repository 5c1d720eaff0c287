"""Quest's second stage from 2-bit (1/2/4-bit) page-relative codes, folded: the kernels behind
`quest_rerank.rerank_code_scores` (`_rerank_fold_kernel`, candidates through the page table) and
`quest_rerank.all_page_code_scores` (`_all_fold_kernel`, every page straight from the code buffer).

A key is rebuilt from its page's min and step as lo + code∘step, so q·k = q·lo + (q∘step)·code: the
page statistics fold into the query once a page and the codes go to the tensor cores as exact integers
(`_fold_logits`), several pages sharing one 16-row product. The per-page kernels in `quest_rerank.py`
rebuild each key in fp32 instead and serve what this cannot (8-bit codes, query groups over 16, codes
that are not whole 32-bit words). Offline sm_90: 5.6 SASS instructions a code against 11.0; H200,
512K, 229 vs 323 µs a layer over every page (BENCHMARKS.md issue 5, session 10).
"""
import triton
import triton.language as tl

from . import packed as pk
from .decode import lse_rows
from .decode import scaled_scores


@triton.jit
def _fold_setup(Q, qoff, sqh, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BITS: tl.constexpr):
    """What `_fold_logits` needs once a program: each column's channel (perm), the query group in that
    order (q, fp32) and in channel order repeated for the 16/BLOCK_G pages (qrep, rows (j, g)), the
    shifts. Column f of a code tile: word w = f // 2K, pair k = (f // 2) % K (byte e = k // VPB, slice
    c = k % VPB), half f % 2; channel c·NB + 4w + e + 2·half (`ref.page_codes`' planar bytes)."""
    R: tl.constexpr = 16 // BLOCK_G
    VPB: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // VPB
    K: tl.constexpr = 2 * VPB
    f = tl.arange(0, D)
    k = (f // 2) % K
    perm = (k % VPB) * NB + 4 * (f // (2 * K)) + k // VPB + 2 * (f % 2)
    g = tl.arange(0, BLOCK_G)
    q = tl.load(Q + qoff + g[:, None] * sqh + perm[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
    qrep = tl.reshape(tl.broadcast_to(q[None, :, :], (R, BLOCK_G, D)), (16, D)).to(Q.dtype.element_ty)
    sh = (tl.arange(0, K) % VPB) * BITS + 8 * (tl.arange(0, K) // VPB)
    return perm, q, qrep, sh


@triton.jit
def _fold_logits(q, qrep, perm, sh, words, Mn, Mx, sbase, pg, first, okp, ntok, dt, D: tl.constexpr, P: tl.constexpr,
                 BLOCK_G: tl.constexpr, BITS: tl.constexpr, PAIR: tl.constexpr, CONSEC: tl.constexpr):
    """Raw logits q·k (16, P) of R = 16/BLOCK_G pages pg (R,) and the query group: row (j, g), column t =
    token t of page pg[j] (its first ntok[j] tokens read; okp: pages that exist). CONSEC: the pages are
    consecutive from `first` and ntok one count of tokens from its first token. A key is lo + c∘st
    (per page and channel), so q·k = q·lo + (q∘st)·c: the product's rows hold q_g∘st of page j and its
    columns the R pages' tokens as their integer codes; only the diagonal blocks (row page = column
    page) are kept. The tensor cores do R times the work they need, but a code costs only its
    extraction (two a 32-bit op, `packed.halves`) instead of a shift, a conversion and an FMA in fp32;
    q∘st is once a page, q·lo one more small product (bf16 inputs: exact products). Codes are read as
    32-bit words: (word >> (c·BITS + 8e)) & mask puts channels c·NB + 4w + e and ... + 2 of a key's
    word w at bits 0 and 16 (`_fold_setup`'s perm: q and the page statistics are read in that order).
    words: the int32 view of the codes; page pg's rows at (pg·P + t)·NW; statistics at sbase + pg·D."""
    R: tl.constexpr = 16 // BLOCK_G
    NW: tl.constexpr = D * BITS // 32
    L: tl.constexpr = (1 << BITS) - 1
    T: tl.constexpr = R * P
    stat = sbase + pg[:, None] * D + perm[None, :]
    lo = tl.load(Mn + stat, mask=okp[:, None], other=0.0).to(tl.float32)                     # (R, D)
    st = (tl.load(Mx + stat, mask=okp[:, None], other=0.0).to(tl.float32) - lo) / L
    a = tl.reshape(st[:, None, :] * q[None, :, :], (16, D)).to(dt)                          # rows (j, g)
    # q·lo: row (j, g) of qrep · lo16ᵀ at column j·BLOCK_G (lo16's rows repeat page j's lo BLOCK_G times)
    r = tl.arange(0, 16)
    lo16 = tl.reshape(tl.broadcast_to(lo[:, None, :], (R, BLOCK_G, D)), (16, D)).to(dt)
    qlo = tl.dot(qrep, tl.trans(lo16)).to(tl.float32)                                        # (16, 16)
    qlo = tl.sum(tl.where(r[:, None] - r[:, None] % BLOCK_G == r[None, :], qlo, 0.0), 1)
    tp = tl.arange(0, P)
    tj = tl.arange(0, T) // P
    if CONSEC:   # pages pg[0], pg[0] + 1, ...: ntok is the count of tokens from pg[0]'s first on
        row = first * P + tl.arange(0, T)
        okt = tl.arange(0, T) < ntok
    else:        # token t of page pg[t // P]
        okt = tl.reshape(tp[None, :] < ntok[:, None], (T,))
        row = tl.reshape(pg[:, None] * P + tp[None, :], (T,))
    wd = tl.load(words + row[:, None] * NW + tl.arange(0, NW)[None, :], mask=okt[:, None], other=0)
    x = wd[:, :, None] >> sh[None, None, :]                                                    # (T, NW, K)
    c_lo, c_hi = pk.halves(x, tl.full(x.shape, L * 65537, tl.int32), dt, PAIR)
    c = tl.reshape(tl.join(c_lo, c_hi), (T, D))
    s = tl.dot(a, tl.trans(c)).to(tl.float32)                                                # (16, T)
    s = tl.where(r[:, None] // BLOCK_G == tj[None, :], s, 0.0)                 # the diagonal blocks
    return tl.sum(tl.reshape(s, (16, R, P)), 1) + qlo[:, None]                  # (16, P): page j's tokens


@triton.jit
def _all_fold_kernel(Q, Codes, Mn, Mx, Pos, Out, sqb, sqh, scb, sch, smb, smh, MP, sink, recent, scale, softcap,
                     G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_G: tl.constexpr,
                     HKV: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr, MASS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, PAIR: tl.constexpr):
    """`_all_code_kernel` by `_fold_logits`: GROUPS groups of R = 16/BLOCK_G consecutive pages a program,
    read straight from the row's buffers. BITS <= 4 (codes exact in bf16 from 128)."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    pos = tl.load(Pos).to(tl.int32)
    npages = pos // P + 1
    R: tl.constexpr = 16 // BLOCK_G
    perm, q, qrep, sh = _fold_setup(Q, b * sqb + h * G * sqh, sqh, G, D, BLOCK_G, BITS)
    words = (Codes + b * scb + h * sch).to(tl.pointer_type(tl.int32))
    r = tl.arange(0, 16)
    tp = tl.arange(0, P)
    for i in range(GROUPS):
        p0 = (tl.program_id(1) * GROUPS + i) * R
        if p0 < npages:
            pg = p0 + tl.arange(0, R)
            okp = pg < npages
            s = _fold_logits(q, qrep, perm, sh, words, Mn, Mx, b * smb + h * smh, pg, p0, okp, pos + 1 - p0 * P,
                             Q.dtype.element_ty, D, P, BLOCK_G, BITS, PAIR, True)
            rp = p0 + r // BLOCK_G
            row_ok = (r % BLOCK_G < G) & (rp < npages)
            ok = row_ok[:, None] & ((rp * P)[:, None] + tp[None, :] <= pos)
            forced = (pg < sink) | (pg >= npages - recent)
            _fold_out(s, ok, rp, row_ok, pg, okp, forced, Out, bh, MP, scale, softcap, G, BLOCK_G, P, MASS,
                      HAS_SOFTCAP)


@triton.jit
def _rerank_fold_kernel(Q, Codes, Mn, Mx, Bound, Table, Nsel, Last, Out, sqb, sqh, stab, MP, row_pages,
                        scale, softcap, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                        BLOCK_G: tl.constexpr, HKV: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                        MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PAIR: tl.constexpr):
    """`_rerank_code_kernel` by `_fold_logits`: GROUPS groups of R = 16/BLOCK_G candidates a program,
    pages through the table (pool ids), the last candidate read up to `last`. Forced pages stay +inf."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    R: tl.constexpr = 16 // BLOCK_G
    nsel = tl.load(Nsel + bh).to(tl.int32)
    lastn = tl.load(Last + bh).to(tl.int32)
    perm, q, qrep, sh = _fold_setup(Q, b * sqb + h * G * sqh, sqh, G, D, BLOCK_G, BITS)
    words = Codes.to(tl.pointer_type(tl.int32))
    r = tl.arange(0, 16)
    tp = tl.arange(0, P)
    for i in range(GROUPS):
        j0 = (tl.program_id(1) * GROUPS + i) * R
        if j0 < nsel:
            j = j0 + tl.arange(0, R)
            okp = j < nsel
            pg = tl.load(Table + bh * stab + j, mask=okp, other=0).to(tl.int64)
            ntok = tl.where(okp, tl.where(j == nsel - 1, lastn, P), 0)
            s = _fold_logits(q, qrep, perm, sh, words, Mn, Mx, 0, pg, 0, okp, ntok, Q.dtype.element_ty, D, P,
                             BLOCK_G, BITS, PAIR, False)
            jr = j0 + r // BLOCK_G
            n_r = tl.where(jr == nsel - 1, lastn, P)
            row_ok = (r % BLOCK_G < G) & (jr < nsel)
            ok = row_ok[:, None] & (tp[None, :] < n_r[:, None])
            local = pg - bh * row_pages                                                          # (R,)
            loc_r = tl.sum(tl.where(tl.arange(0, R)[None, :] == (r // BLOCK_G)[:, None], local[None, :], 0), 1)
            if MASS:
                forced = okp                                                        # (not read for mass)
            else:
                forced = tl.load(Bound + bh * MP + local, mask=okp, other=0.0) == float("inf")
            _fold_out(s, ok, loc_r, row_ok, local, okp, forced, Out, bh, MP, scale, softcap, G, BLOCK_G, P, MASS,
                      HAS_SOFTCAP)


@triton.jit
def _fold_out(s, ok, row_page, row_ok, page, page_ok, forced, Out, bh, MP, scale, softcap, G: tl.constexpr,
              BLOCK_G: tl.constexpr, P: tl.constexpr, MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """A group's result from `_fold_logits`' s (rows (page j, query g), valid where ok): mass: each
    query's log-sum-exp over its page at Out[bh, row_page, g] (rows where row_ok); max: each page's
    largest logit at Out[bh, page] (pages where page_ok), +inf where forced."""
    if MASS:
        lse = lse_rows(tl.where(ok, scaled_scores(s, scale, softcap, HAS_SOFTCAP), float("-inf")), 1)
        g = tl.arange(0, s.shape[0]) % BLOCK_G
        tl.store(Out + (bh * MP + row_page) * G + g, lse, mask=row_ok)
    else:
        best = tl.max(tl.reshape(tl.where(ok, s, float("-inf")), (s.shape[0] // BLOCK_G, BLOCK_G * P)), 1)
        tl.store(Out + bh * MP + page, tl.where(forced, float("inf"), best), mask=page_ok)
