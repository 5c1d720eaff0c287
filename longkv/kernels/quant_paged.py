"""Paged decode attention straight from packed codes: Quest's selected pages over a quantized layer.

`quant+quest` / `kv4+quest` (`cache/select/quest_storage.py`) keep K/V in `cache/quant_storage.py`'s
packed layout (keys after RoPE, per channel over groups of slots; values per token; sink + recent
window in full precision; slot = position) and select pages per KV head each step. This kernel reads
the selected pages through the page table, as `kernels/quest.py`'s `_paged_kernel` reads a bf16 pool,
but from the packed planes: a step reads the page bounds and the selected pages' packed bytes, with
no dequantized copy (before: the selected rows were gathered and dequantized in torch into a scratch,
~350 small kernels a layer).

Grid (batch·KV heads, splits): a program takes a run of the row's selected pages, one page (P rows)
per iteration, and writes a partial output + log-sum-exp (`decode._merge_kernel` merges them).
Two tile paths:
- fast (a page wholly inside one quantized key group, 2- or 4-bit uniform codes, one value range per
  token, no outliers: `kv4`, `kivi4`): the page's codes come as bf16/fp16 tiles in pair order
  (`packed.pair_codes`), the group's key scale folds into q and the value scale/zero into the
  probabilities (`kernels/quant.py`'s tricks: no per-element dequantization);
- general (every other page: the sink page, the pages at the full-precision ring, pages that cross a
  key group, 3/8-bit codes, value groups, outliers): per-element codes and statistics of each row,
  full-precision rows from the sink/ring buffer, merged row by row.
Both produce tiles in the same column order (pair order when the fast path is possible at all), so
one accumulator serves both; the store puts the columns back.

Measured (H200, Llama-3-8B shape, 128K / 512K, kv4+quest 1/8, BENCHMARKS.md): the kernel 40 / 137 µs a
layer; the whole step 8.6 / 13.7 ms against full bf16's 9.3 / 21.0 (1.08x / 1.53x faster, at 0.34x of
its memory). Tried and not kept: the middle and the edges in one launch (the general path's registers
for every program: 82 µs), the edges in one program a row (serial: 1/32 got slower than before), the
fast loop double-buffered as kernels/quant.py's `_fast_loop` (fewer registers offline, but 50 / 162 µs).

Reference: `quant_reference.quant_paged_attention`. Without a GPU the wrapper uses it unless
`TRITON_INTERPRET=1` (the tests) forces the Triton path.
"""
from __future__ import annotations

import torch

from . import quant_reference as ref
from .decode import _use_triton
from .quant import _pair_mode
from .quant_append import outs, planes

try:
    import triton
    import triton.language as tl
    from .decode import _merge_kernel
    from . import packed as pk
    from .quant import _pv, _qk, _softmax
except ImportError:  # CPU installs without triton use the reference
    triton = None


if triton is not None:

    @triton.jit
    def _rows_tile(KP0, KP1, KS, KZ, KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV, KF, VF, slot, ok, nq, cols, hq, kb0, kb1,
                   sbase, fb, D: tl.constexpr, GROUP: tl.constexpr, VG: tl.constexpr, PB0: tl.constexpr,
                   PB1: tl.constexpr, N_OUT: tl.constexpr, SINK: tl.constexpr, RING: tl.constexpr):
        """The general path: keys and values (N, C) fp32 of slots `slot` at channels `cols`, row by row —
        quantized rows dequantized per element with their own group's statistics (and outliers), the
        others from the full-precision sink/ring buffer; rows not ok are zero."""
        NVG: tl.constexpr = D // VG
        qi = slot - SINK
        isq = ok & (slot >= SINK) & (qi < nq)
        qr = tl.where(isq, qi, 0)
        rows = hq + qr
        kl = pk.levels(pk.codes_at(KP0, KP1, kb0, kb1, qr, isq, cols, D, PB0, PB1), KS, False)
        krow = (sbase + qr // GROUP)[:, None] * D + cols[None, :]
        k = kl * tl.load(KS + krow).to(tl.float32) + tl.load(KZ + krow).to(tl.float32)
        vl = pk.levels(pk.codes_at(VP0, VP1, kb0, kb1, qr, isq, cols, D, PB0, PB1), VS, False)
        vrow = rows[:, None] * NVG + (cols // VG)[None, :]
        v = vl * tl.load(VS + vrow).to(tl.float32) + tl.load(VZ + vrow).to(tl.float32)
        if N_OUT > 0:
            k = pk.outliers(k, KOI, KOV, rows, cols, N_OUT)
            v = pk.outliers(v, VOI, VOV, rows, cols, N_OUT)
        isf = ok & ~isq
        fs = tl.where(slot < SINK, slot, SINK + ((slot - SINK) % RING + RING) % RING)
        fptr = fb + tl.where(isf, fs, 0)[:, None] * D + cols[None, :]
        k = tl.where(isq[:, None], k, tl.load(KF + fptr, mask=isf[:, None], other=0.0).to(tl.float32))
        v = tl.where(isq[:, None], v, tl.load(VF + fptr, mask=isf[:, None], other=0.0).to(tl.float32))
        return k, v

    @triton.jit
    def _general_page(j, nsel, lastn, nq, Table, stab, row_pages, q, m, l, acc, KP0, KP1, KS, KZ, KOI, KOV, VP0,
                      VP1, VS, VZ, VOI, VOV, KF, VF, bh, cols, scale, dt, D: tl.constexpr, P: tl.constexpr,
                      GROUP: tl.constexpr, VG: tl.constexpr, PB0: tl.constexpr, PB1: tl.constexpr,
                      N_OUT: tl.constexpr, SINK: tl.constexpr, RING: tl.constexpr, NQ_CAP: tl.constexpr,
                      USE_DOT: tl.constexpr):
        """Entry j of the row's page table, row by row (`_rows_tile`), folded into (m, l, acc)."""
        t = tl.arange(0, P)
        hq = bh.to(tl.int64) * NQ_CAP
        slot = (tl.load(Table + bh * stab + j) - bh * row_pages) * P + t
        ok = t < tl.where(j < nsel - 1, P, lastn)         # the last page up to the newest token
        k, v = _rows_tile(KP0, KP1, KS, KZ, KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV, KF, VF, slot, ok, nq, cols, hq,
                          hq * (D * PB0 // 32), hq * (D * PB1 // 32), bh.to(tl.int64) * (NQ_CAP // GROUP),
                          bh.to(tl.int64) * (SINK + RING) * D, D, GROUP, VG, PB0, PB1, N_OUT, SINK, RING)
        m_new, l, alpha, p = _softmax(_qk(q, k, dt, USE_DOT), ok, m, l, scale)
        return m_new, l, acc * alpha[:, None] + _pv(p, v, dt, USE_DOT)

    @triton.jit
    def _paged_quant_kernel(Q, Len, Table, Nsel, Last, KP0, KP1, KS, KZ, KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV,
                            KF, VF, Out, Lse, stab, row_pages, scale,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                            PARTS: tl.constexpr, MODE: tl.constexpr, P: tl.constexpr, GROUP: tl.constexpr,
                            VG: tl.constexpr, PB0: tl.constexpr, PB1: tl.constexpr, N_OUT: tl.constexpr,
                            SINK: tl.constexpr, WINDOW: tl.constexpr, RING: tl.constexpr, NQ_CAP: tl.constexpr,
                            NPRE: tl.constexpr, NSUF: tl.constexpr, USE_DOT: tl.constexpr, PAIR: tl.constexpr):
        """MODE 0: the middle entries of each row's (ascending) page table — whole pages of quantized
        rows — by the fast path, SPLITS programs a row, partial rows [0, SPLITS). MODE 1: the edge
        entries (pages holding a sink or a full-precision slot: a prefix and a suffix of the table) by
        the general path, one program a row, partial row SPLITS. MODE 2 (layouts without a fast
        path): every entry by the general path, SPLITS programs a row. PARTS partial rows per row."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        FAST: tl.constexpr = MODE != 2
        length = tl.load(Len).to(tl.int32)
        nq = GROUP * tl.maximum((length - 1 - SINK - WINDOW) // GROUP, 0)   # as the dense packed kernel
        nsel = tl.load(Nsel + bh).to(tl.int32)
        lastn = tl.load(Last + bh).to(tl.int32)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        gm = g[:, None] < G
        if FAST:
            cols = pk.pair_perm(D, PB0)     # every tile and the accumulator in pair order
        else:
            cols = d
        q = tl.load(Q + (bh * G + g[:, None]) * D + cols[None, :], mask=gm, other=0.0).to(tl.float32)
        dt = Q.dtype.element_ty
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        # the table is ascending: entries [0, ja) hold a sink slot, [jb, nsel) a full-precision slot
        # (at most NSUF of them: the ring spans < WINDOW + GROUP slots), [ja, jb) only quantized rows
        j = tl.arange(0, NSUF)
        head = tl.load(Table + bh * stab + j, mask=(j < nsel) & (j < NPRE), other=0) - bh * row_pages
        ja = tl.sum(((j < nsel) & (j < NPRE) & (head * P < SINK)).to(tl.int32), 0)
        jt = nsel - NSUF + j
        tail = tl.load(Table + bh * stab + jt, mask=jt >= 0, other=0) - bh * row_pages
        jb = tl.maximum(nsel - tl.sum(((jt >= 0) & (tail >= (SINK + nq) // P)).to(tl.int32), 0), ja)
        if MODE == 0:
            t = tl.arange(0, P)
            hq = bh.to(tl.int64) * NQ_CAP
            kb0 = hq * (D * PB0 // 32)
            sbase = bh.to(tl.int64) * (NQ_CAP // GROUP)
            per = tl.cdiv(jb - ja, SPLITS)
            for jj in range(ja + split * per, tl.minimum(ja + (split + 1) * per, jb)):
                s0 = (tl.load(Table + bh * stab + jj) - bh * row_pages) * P - SINK   # first quantized row
                qi = s0 + t
                ga = s0 // GROUP
                ks = tl.load(KS + (sbase + ga) * D + cols).to(tl.float32)[None, :]
                kz = tl.load(KZ + (sbase + ga) * D + cols).to(tl.float32)[None, :]
                kc = pk.pair_codes(KP0, kb0, qi, t < P, D, PB0, P, dt, PAIR)
                s = _qk(q * ks, kc, dt, USE_DOT) + tl.sum(q * kz, 1)[:, None]
                gb = (s0 + P - 1) // GROUP
                if gb != ga:   # the page crosses into the next key group: its rows score with that group's
                    ks = tl.load(KS + (sbase + gb) * D + cols).to(tl.float32)[None, :]
                    kz = tl.load(KZ + (sbase + gb) * D + cols).to(tl.float32)[None, :]
                    sb = _qk(q * ks, kc, dt, USE_DOT) + tl.sum(q * kz, 1)[:, None]
                    s = tl.where((qi // GROUP == ga)[None, :], s, sb)
                m, l, alpha, p = _softmax(s, t < P, m, l, scale)
                vs = tl.load(VS + hq + qi).to(tl.float32)
                vz = tl.load(VZ + hq + qi).to(tl.float32)
                vc = pk.pair_codes(VP0, kb0, qi, t < P, D, PB0, P, dt, PAIR)
                acc = acc * alpha[:, None] + _pv(p * vs[None, :], vc, dt, USE_DOT) + tl.sum(p * vz[None, :], 1)[:, None]
        elif MODE == 1:   # one edge entry a program: [0, ja) by e < NPRE, [jb, nsel) by the rest
            jj = tl.where(split < NPRE, split, jb + split - NPRE)
            if tl.where(split < NPRE, jj < ja, jj < nsel):
                m, l, acc = _general_page(jj, nsel, lastn, nq, Table, stab, row_pages, q, m, l, acc, KP0, KP1, KS, KZ,
                                          KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV, KF, VF, bh, cols, scale, dt, D, P,
                                          GROUP, VG, PB0, PB1, N_OUT, SINK, RING, NQ_CAP, USE_DOT)
            split = split + SPLITS
        else:
            per = tl.cdiv(nsel, SPLITS)
            for jj in range(split * per, tl.minimum(split * per + per, nsel)):
                m, l, acc = _general_page(jj, nsel, lastn, nq, Table, stab, row_pages, q, m, l, acc, KP0, KP1, KS, KZ,
                                          KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV, KF, VF, bh, cols, scale, dt, D, P,
                                          GROUP, VG, PB0, PB1, N_OUT, SINK, RING, NQ_CAP, USE_DOT)
        row = (bh * PARTS + split) * G + g
        tl.store(Lse + row, tl.where(l > 0, m + tl.log(l), float("-inf")), mask=g < G)
        den = tl.where(l > 0, l, 1.0)[:, None]
        tl.store(Out + row[:, None] * D + cols[None, :], acc / den, mask=gm)


SPLITS = 128                 # programs a row (fewer when the table is shorter) and warps of the fast
NUM_WARPS = 1                # launch: H200, 128K (sparse_decode.py): 1/8 40.5 µs (64 splits: 51.1, 2 warps:
                             # 50.4), 1/32 22.4 µs (32 splits x 2 warps, the earlier default: 28.9)


def quant_paged_attention(q, kq: dict, vq: dict, kf, vf, length, table, nsel, last, *, row_pages: int, page: int,
                          bits: int, group: int, vgroup: int, sink: int, window: int, scale: float,
                          softcap: float | None = None, splits: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q (B, Hq, 1, D) post-RoPE; kq/vq/kf/vf: one layer of a `QuantStorage` (keys after RoPE);
    length: (1,) int64 device tensor (slots held); table (B·Hkv, MAXP) int32 of global page ids
    (bh·row_pages + page), nsel / last (B·Hkv,) or (1,) int: pages read and tokens of the last one
    (see `quant_reference.quant_paged_attention`). The kernel needs a power-of-two head dim >= 32 and
    no logit softcap (`QuantStorage.kernel`); otherwise, and without a GPU, the reference runs.
    Returns (B, Hq, 1, D) in q's dtype."""
    BH = table.shape[0]
    nsel = nsel.reshape(-1).expand(BH).contiguous()
    last = last.reshape(-1).expand(BH).contiguous()
    B, Hq, _, D = q.shape
    if not _use_triton(q) or softcap or D < 32 or D & (D - 1) or "res" in kq:   # res: no kernel reads it yet
        return ref.quant_paged_attention(q, kq, vq, kf, vf, length, table, nsel, last, row_pages=row_pages,
                                         page=page, bits=bits, group=group, vgroup=vgroup, sink=sink,
                                         window=window, scale=scale, softcap=softcap)
    G = Hq // (BH // B)
    S = splits or max(1, min(SPLITS, table.shape[1]))
    pb = ref.PLANES[bits]
    n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
    fast = len(pb) == 1 and pb[0] <= 4 and vgroup == D and n_out == 0 and group >= page
    npre = max(1, triton.cdiv(sink, page))                                   # entries holding a sink slot
    nsuf = triton.next_power_of_2(max(npre, triton.cdiv(window + group, page) + 2))   # ... an fp ring slot
    parts = S + npre + nsuf if fast else S
    part = torch.empty(BH * parts * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(BH * parts * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    args = (q.contiguous(), length.reshape(-1)[-1:], table, nsel, last, *planes(kq, True), kq["scale"], kq["zero"],
            *outs(kq), *planes(vq, True), vq["scale"], vq["zero"], *outs(vq), kf, vf, part, lse, table.stride(0),
            row_pages, scale)
    kw = dict(G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, SPLITS=S, PARTS=parts, P=page, GROUP=group,
              VG=vgroup, PB0=pb[0], PB1=pb[1] if len(pb) > 1 else 0, N_OUT=n_out, SINK=sink, WINDOW=window,
              RING=kf.shape[2] - sink, NQ_CAP=kq["planes"][0].shape[2],
              NPRE=npre, NSUF=nsuf,
              USE_DOT=True, PAIR=_pair_mode(q))
    if fast:   # middle pages by the fast path, the table's edges by the general one (own launch: own registers)
        _paged_quant_kernel[(BH, S)](*args, MODE=0, num_warps=num_warps or NUM_WARPS,
                                     **({} if num_stages is None else {"num_stages": num_stages}), **kw)
        _paged_quant_kernel[(BH, npre + nsuf)](*args, MODE=1, num_warps=4, **kw)
    else:
        _paged_quant_kernel[(BH, S)](*args, MODE=2, num_warps=4, **kw)
    _merge_kernel[(BH * G,)](part, lse, out, G=G, SPLITS=parts, D=D, BLOCK_S=triton.next_power_of_2(parts))
    return out


def quant_group_attention(q, kq: dict, vq: dict, kf, vf, length, table, nsel, *, row_pages: int, bits: int,
                          group: int, vgroup: int, sink: int, window: int, scale: float) -> torch.Tensor:
    """Quest with pages = the key groups (`quant_reference.quant_group_attention`): the full-precision
    sink and ring plus the listed quantized groups. On a GPU `quant_cuda.paged_attention` (the KIVI-layout
    CUDA kernel reading the groups through the table); elsewhere, or where that kernel cannot be built
    (one warning), the reference."""
    from . import quant_cuda as qc

    G = q.shape[1] // kf.shape[1]
    if qc.supported(q, kq, bits=bits, group=group, vgroup=vgroup, prerope=False, G=G):
        try:
            return qc.paged_attention(q, kq, vq, kf, vf, length.reshape(-1)[-1:], table, nsel, row_pages=row_pages,
                                      bits=bits, group=group, sink=sink, window=window, scale=scale)
        except qc.Unavailable as e:
            import warnings
            warnings.warn(f"{e}; Quest over key groups attends in torch (no speed gain)")
    return ref.quant_group_attention(q, kq, vq, kf, vf, length, table, nsel, row_pages=row_pages, bits=bits,
                                     group=group, vgroup=vgroup, sink=sink, window=window, scale=scale)
