"""Quest's optional second stage (`quest:rerank=F`): the bound's candidate pages scored again, from
their exact keys (`_rerank_kernel`) or their page-relative codes (through the page table; straight from
the code buffer when every page is a candidate), ranked by the largest logit (rank=max) or by attention
mass (rank=mass: each kernel writes every query's log-sum-exp over a page, `page_mass` normalizes each
query over the candidates and sums the group).

From codes, two forms of each kernel: `_rerank_fold_kernel` / `_all_fold_kernel` (the default where
`_foldable`: bits <= 4, query group <= 16) fold each page's min and step into the query and feed the
codes to the tensor cores as exact integers, 16/G pages sharing one product (`_fold_logits`; offline
sm_90: 5.6 SASS instructions a code against 11.0; H200, 512K: 229 vs 323 µs a layer every page,
161 vs 255 µs for 1/2 of the pages through the table); `_rerank_code_kernel` / `_all_code_kernel`
rebuild each key in fp32 first and serve what the fold does not: 8-bit codes (the magic number cannot
hold them), query groups over 16, and keys whose codes are not whole 32-bit words (head_dim x rbits
not a multiple of 32, as in the tests' tiny models).
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

    from . import packed as pk
    from .decode import scaled_scores

    @triton.jit
    def _page_out(s, ok, g, Bound, Out, bh, MP, local, scale, softcap, G: tl.constexpr, MASS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
        """One candidate page's logits s (BLOCK_G, P), valid where ok, into the second stage's output.
        max: Out[bh, local] = the largest logit (a page the bound forced, +inf, stays +inf). mass:
        Out[bh, local, g] = log-sum-exp of query g's scaled logits over the page's tokens (the
        normalization over candidates and the sum over the group follow in `page_mass`)."""
        if MASS:
            x = scaled_scores(s, scale, softcap, HAS_SOFTCAP)
            tl.store(Out + (bh * MP + local) * G + g, _lse_rows(tl.where(ok, x, float("-inf")), 1), mask=g < G)
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
                lse = _lse_rows(tl.where(ok, x, float("-inf")), 2)                            # (BLOCK_G, PAGES)
                tl.store(Out + (bh * MP + pg[None, :]) * G + g[:, None], lse, mask=(g[:, None] < G) & okp[None, :])
            else:
                best = tl.max(tl.max(tl.where(ok, s, float("-inf")), 2), 0)                   # (PAGES,)
                forced = (pg < sink) | (pg >= npages - recent)
                tl.store(Out + bh * MP + pg, tl.where(forced, float("inf"), best), mask=okp)

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
                ok = ((r % BLOCK_G < G) & (rp < npages))[:, None] & ((rp * P)[:, None] + tp[None, :] <= pos)
                if MASS:
                    xs = scaled_scores(s, scale, softcap, HAS_SOFTCAP)
                    lse = _lse_rows(tl.where(ok, xs, float("-inf")), 1)                                # (16,)
                    tl.store(Out + (bh * MP + rp) * G + r % BLOCK_G, lse, mask=(r % BLOCK_G < G) & (rp < npages))
                else:
                    best = tl.max(tl.reshape(tl.where(ok, s, float("-inf")), (R, BLOCK_G * P)), 1)   # (R,)
                    forced = (pg < sink) | (pg >= npages - recent)
                    tl.store(Out + bh * MP + pg, tl.where(forced, float("inf"), best), mask=okp)

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
                ok = ((r % BLOCK_G < G) & (jr < nsel))[:, None] & (tp[None, :] < n_r[:, None])
                local = pg - bh * row_pages                                                          # (R,)
                if MASS:
                    xs = scaled_scores(s, scale, softcap, HAS_SOFTCAP)
                    lse = _lse_rows(tl.where(ok, xs, float("-inf")), 1)                                # (16,)
                    loc_r = tl.sum(tl.where(tl.arange(0, R)[None, :] == (r // BLOCK_G)[:, None], local[None, :], 0), 1)
                    tl.store(Out + (bh * MP + loc_r) * G + r % BLOCK_G, lse, mask=(r % BLOCK_G < G) & (jr < nsel))
                else:
                    best = tl.max(tl.reshape(tl.where(ok, s, float("-inf")), (R, BLOCK_G * P)), 1)   # (R,)
                    bound = tl.load(Bound + bh * MP + local, mask=okp, other=0.0)
                    tl.store(Out + bh * MP + local, tl.where(bound == float("inf"), bound, best), mask=okp)

    @triton.jit
    def _lse_rows(x, axis: tl.constexpr):
        """Log-sum-exp along axis of a tile holding -inf where empty (an empty line gives -inf)."""
        m = tl.max(x, axis)
        safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.sum(tl.exp(x - tl.expand_dims(safe, axis)), axis)
        return tl.where(e > 0, safe + tl.log(tl.maximum(e, 1e-30)), float("-inf"))

    @triton.jit
    def _mass_part_kernel(Lse, Part, MP, NBLK, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
        """`page_mass`, first pass: each query's log-sum-exp over a block of BLOCK pages."""
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        p = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(Lse + (bh * MP + p[:, None]) * G + g[None, :], mask=(p[:, None] < MP) & (g[None, :] < G),
                    other=float("-inf"))
        tl.store(Part + (bh * NBLK + blk) * BLOCK_G + g, _lse_rows(x, 0))

    @triton.jit
    def _mass_kernel(Lse, Part, Bound, Pos, Out, MP, NBLK, PAGE, sink, recent, G: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BY_POS: tl.constexpr):
        """`page_mass`, second pass: Z_g from the row's block partials, then each page of this block:
        log Σ_g exp(lse_g − Z_g) (a query with no candidate adds nothing); forced pages (+inf in
        Bound, or BY_POS: the first `sink` and last `recent` of the pages up to pos) are +inf."""
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        kk = tl.arange(0, BLOCK_K)
        part = tl.load(Part + (bh * NBLK + kk[:, None]) * BLOCK_G + g[None, :], mask=kk[:, None] < NBLK,
                       other=float("-inf"))
        z = _lse_rows(part, 0)
        z = tl.where(z == float("-inf"), 0.0, z)
        p = blk * BLOCK + tl.arange(0, BLOCK)
        ok = p < MP
        x = tl.load(Lse + (bh * MP + p[:, None]) * G + g[None, :], mask=ok[:, None] & (g[None, :] < G),
                    other=float("-inf"))
        sc = _lse_rows(x - z[None, :], 1)
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
    """See `sparse_reference.page_mass` (two kernels: block partials of Z, then every page); bound
    None: the forced pages from pos, page, sink, recent (as `page_scores` forces them)."""
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
