"""Top-k pages straight into a page table, on the device: the select step of a Quest decode step
(`kernels/quest.py`), no sort and no torch.topk.

Scores (B, Hkv, MP) fp32 → an int32 page table of the top-k pages per (b, kv head) row, ascending
(so the page holding the newest token, when chosen, is last), with `nsel` entries used and `last`
tokens in the final entry. On a GPU the default is one CUDA thread block a row (`page_select.cu`: a
radix select, 8 bits a pass, each pass a shared-memory histogram, ending early once every key still in
the running is taken; one launch); on sm_90 a row may instead be spread over a cluster of blocks
(`page_select_cluster.cu`; not the default: 8.66 µs against 8.85 on the H100 at 8K pages, a chain of
dependent steps either way); the Triton selects find
the k-th largest score by bisection in one program a row for short rows (the row in registers), by a
radix select over many programs for long ones (6 launches). Reference: `sparse_reference.select_pages`.
Per-query scores (B, Hkv, MP, G) (quest's rank=mass / peak) rank pages by their attention mass
(`sparse_reference.page_mass`): on sm_90+ the cluster select computes the masses itself (one launch), elsewhere
`page_mass` first, then the select.
"""
from __future__ import annotations

import os

import torch

from . import sparse_reference as ref
from .decode import _use_triton, triton
from .nvrtc import build

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _key(S, row, p, ok):
        """Scores → int32 keys ordered as the floats are (sign-magnitude → two's complement; -0.0
        made +0.0 first, as they compare equal)."""
        s = tl.load(S + row + p, mask=ok, other=0.0)
        bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _row(Pos, MP, K, PAGE):
        """This program's row (one per (b, kv head)): → bh, pos, pages holding tokens, pages to take,
        the row's offset into the scores."""
        bh = tl.program_id(0)
        pos = tl.load(Pos).to(tl.int32)
        npages = tl.minimum(pos // PAGE + 1, MP)
        return bh, pos, npages, tl.minimum(npages, K), bh * MP

    @triton.jit
    def _take(Table, Nsel, Last, bh, j, key, t, above, need, npages, pos, stab, row_pages, PAGE):
        """Given the k-th largest key t and above = count(key > t): write every page above t and the
        lowest-index pages equal to it, ascending (prefix sums), as pool page ids; nsel and last."""
        ok = j < npages
        eq = ok & (key == t)
        take = (ok & (key > t)) | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need - above))
        slot = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(Table + bh * stab + slot, (j + bh * row_pages).to(tl.int32), mask=take)
        top = tl.max(tl.where(take, j, 0), 0)
        tl.store(Nsel + bh, need)
        tl.store(Last + bh, tl.where(top == npages - 1, pos % PAGE + 1, PAGE))

    @triton.jit
    def _select_bisect_kernel(S, Pos, Table, Nsel, Last, MP, K, PAGE, row_pages, stab, CHUNK: tl.constexpr):
        """A row that fits one CHUNK (held in registers): the k-th largest key T by bisection over
        the 2^32 keys, 32 counting passes, each one compare and one reduction a score."""
        bh, pos, npages, need, row = _row(Pos, MP, K, PAGE)
        j = tl.arange(0, CHUNK)
        key0 = _key(S, row, j, j < npages)
        # invariant: count(key >= lo) >= need > count(key > hi) = above
        lo = need.to(tl.int64) * 0 - 2147483648
        hi = lo * 0 + 2147483647
        above = need * 0
        for _ in range(32):
            mid = lo + ((hi - lo + 1) >> 1)
            cnt = tl.sum(((j < npages) & (key0 >= mid.to(tl.int32))).to(tl.int32), 0)
            big = cnt >= need
            lo = tl.where(big, mid, lo)
            hi = tl.where(big, hi, mid - 1)
            above = tl.where(big, above, cnt)
        _take(Table, Nsel, Last, bh, j, key0, lo.to(tl.int32), above, need, npages, pos, stab, row_pages, PAGE)

    @triton.jit
    def _digit(hist, want):
        """One radix pass's choice from its 256-bin histogram of the keys still in the running: the
        largest digit b with count(digit >= b) >= want; → b, count(digit > b)."""
        bins = tl.arange(0, 256)
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist            # count(digit >= b)
        b = tl.max(tl.where(ge >= want, bins, 0), 0)
        return b, tl.sum(tl.where(bins == b, ge - hist, 0), 0)

    @triton.jit
    def _radix_state(H, bh, need, PASSES: tl.constexpr):
        """The radix select's state after PASSES passes, from their histograms H[bh, pass, 256]: T's top
        8·PASSES bits (`prefix`), how many keys matching them must still be taken (`want`), and how
        many keys are known to be above T (`above`)."""
        prefix = need.to(tl.uint32) * 0
        want = need
        above = need * 0
        for i in tl.static_range(PASSES):
            b, gt = _digit(tl.load(H + (bh * 4 + i) * 256 + tl.arange(0, 256)), want)
            above += gt
            want -= gt
            prefix = (prefix << 8) | b.to(tl.uint32)
        return prefix, want, above

    @triton.jit
    def _ukey(S, row, p, ok):
        """_key as unsigned (sign bit flipped: the same order), for the radix digits."""
        return (_key(S, row, p, ok) ^ -2147483648).to(tl.uint32, bitcast=True)

    # Rows too long for one program's registers: a radix select (8 bits a pass, from the top) spread
    # over segments of SEG pages, one program each (grid (rows, segments)). A pass is one launch whose
    # programs add their segment's histogram into H[row, pass] (atomics) and re-derive the earlier
    # passes' digits from H; then one launch counts each segment's keys above / equal to the k-th
    # key T, and one writes the table at offsets from the earlier segments' counts: 6 launches
    # instead of one program walking the row (8 rows left 124 of 132 SMs idle).

    @triton.jit
    def _seg_keys(S, Pos, MP, K, PAGE, SEG: tl.constexpr):
        bh, pos, npages, need, row = _row(Pos, MP, K, PAGE)
        p = tl.program_id(1) * SEG + tl.arange(0, SEG)
        ok = p < npages
        return bh, pos, npages, need, p, ok, _ukey(S, row, p, ok)

    @triton.jit
    def _hist_kernel(S, Pos, H, MP, K, PAGE, SEG: tl.constexpr, PASS: tl.constexpr):
        bh, pos, npages, need, p, ok, u = _seg_keys(S, Pos, MP, K, PAGE, SEG)
        prefix, want, above = _radix_state(H, bh, need, PASS)
        shift = 24 - 8 * PASS
        if PASS > 0:
            ok = ok & ((u >> (shift + 8)) == prefix)
        hist = tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=ok)
        tl.atomic_add(H + (bh * 4 + PASS) * 256 + tl.arange(0, 256), hist, sem="relaxed")

    @triton.jit
    def _count_kernel(S, Pos, H, Cnt, MP, K, PAGE, NSEG, SEG: tl.constexpr):
        bh, pos, npages, need, p, ok, u = _seg_keys(S, Pos, MP, K, PAGE, SEG)
        prefix, want, above = _radix_state(H, bh, need, 4)
        c = (bh * NSEG + tl.program_id(1)) * 2
        tl.store(Cnt + c, tl.sum((ok & (u > prefix)).to(tl.int32), 0))
        tl.store(Cnt + c + 1, tl.sum((ok & (u == prefix)).to(tl.int32), 0))

    @triton.jit
    def _write_kernel(S, Pos, H, Cnt, Table, Nsel, Last, MP, K, PAGE, NSEG, row_pages, stab, SEG: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        """Pages above T and the lowest-index pages equal to T, ascending: this segment's slots start
        after the earlier segments' takes (their counts in Cnt)."""
        bh, pos, npages, need, p, ok, u = _seg_keys(S, Pos, MP, K, PAGE, SEG)
        prefix, want, above = _radix_state(H, bh, need, 4)
        seg = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        before = s < seg
        gt0 = tl.sum(tl.load(Cnt + (bh * NSEG + s) * 2, mask=before, other=0), 0)
        eq0 = tl.sum(tl.load(Cnt + (bh * NSEG + s) * 2 + 1, mask=before, other=0), 0)
        eq = ok & (u == prefix)
        take = (ok & (u > prefix)) | (eq & (eq0 + tl.cumsum(eq.to(tl.int32), 0) <= want))
        slot = gt0 + tl.minimum(eq0, want) + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(Table + bh * stab + slot, (p + bh * row_pages).to(tl.int32), mask=take)
        if seg == (npages - 1) // SEG:       # the segment holding the last page: the row's nsel and last
            top = tl.max(tl.where(take, p, 0), 0)
            tl.store(Nsel + bh, need)
            tl.store(Last + bh, tl.where(top == npages - 1, pos % PAGE + 1, PAGE))


if triton is not None:

    @triton.jit
    def _page_groups_kernel(Table, Nsel, Len, Ids, Count, stab, sout, row_pages, row_groups, group, SINK, WINDOW,
                            K, SUB: tl.constexpr, BLOCK: tl.constexpr):
        """One program a row: `sparse_reference.page_groups`."""
        bh = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        ok = i < K * SUB
        pg = tl.load(Table + bh * stab + i // SUB, mask=ok, other=0)
        local = (pg % row_pages) * SUB + i % SUB
        tl.store(Ids + bh * sout + i, (bh * row_groups + local).to(tl.int32), mask=ok)
        nq = tl.maximum((tl.load(Len) - 1 - SINK - WINDOW) // group, 0)
        taken = ok & (i // SUB < tl.load(Nsel + bh)) & (local < nq)
        tl.store(Count + bh, tl.sum(taken.to(tl.int32), 0))


def page_groups(table, nsel, length, *, sub: int, row_pages: int, row_groups: int, group: int, sink: int,
                window: int):
    """See `sparse_reference.page_groups` (one Triton program a row, graph-safe)."""
    if not _use_triton(table):
        return ref.page_groups(table, nsel, length, sub=sub, row_pages=row_pages, row_groups=row_groups,
                               group=group, sink=sink, window=window)
    BH, K = table.shape
    ids = torch.empty(BH, K * sub, device=table.device, dtype=torch.int32)
    count = torch.empty(BH, device=table.device, dtype=torch.int32)
    _page_groups_kernel[(BH,)](table, nsel.reshape(-1).contiguous(), _pos(length, table.device).long(), ids, count,
                               table.stride(0), ids.stride(0), row_pages, row_groups, group, sink, window, K, SUB=sub,
                               BLOCK=triton.next_power_of_2(K * sub))
    return ids, count


def _pos(pos, device) -> torch.Tensor:
    return torch.as_tensor(pos, device=device).reshape(-1)[-1:]


SELECT_CHUNK = 4096     # the longest row (pages) the bisection select holds in one program's registers
SELECT_SEG = 1024       # pages per program of the multi-program select
BLOCK_ROW = 16384       # the longest row the block select holds (RK·NT in page_select.cu)
CLUSTER = 8             # blocks a row of the cluster select (CL in page_select_cluster.cu)
CLUSTER_CT = 256        # threads a block of the cluster select
CLUSTER_MIN = 2048      # the shortest row (pages) the default sends to the cluster select
BLOCK_EARLY = None      # the block select's EARLY (page_select.cu; None: the source's default)
SELECT_METHOD = "block"  # the GPU default for rows the CUDA selects hold: "block" or "cluster"
# rank=mass (per-query scores): the cluster select computes each page's mass itself (MASSQ in page_select_cluster.cu),
# one launch where `page_mass` + the block select take three; LONGKV_MASS_CLUSTER=0: those three
MASS_CLUSTER = os.environ.get("LONGKV_MASS_CLUSTER", "1") != "0"


_BLOCK: dict = {}


def block_kernel(agg: int | None = None, rk: int = 16, early: int | None = None, every: int = 1):
    """The "block" select (`page_select.cu`: one 1024-thread block a row, a radix select with shared-memory
    histograms, then the table from two block-wide prefix sums), compiled once by NVRTC; None where it
    cannot be built. agg: how the histogram's atomics are combined (the source's AGG; None = its default);
    rk: keys a thread holds (rows up to 1024·rk pages); early: end the radix passes once every key left
    is taken (the source's EARLY; None = its default); every > 1: the kernel takes two more arguments (the
    tokens held and the first decode step's position) and returns at once unless this step chooses afresh."""
    key = (agg, rk, early, every)
    if key not in _BLOCK:
        _BLOCK[key] = build(dict(AGG=agg, RK=rk, EARLY=early, EVERY=every if every > 1 else None),
                            ("page_select.cu",), "page_select", "CUDA page select", "the Triton select")
    return _BLOCK[key]


_CLUSTER: dict = {}


def cluster_kernel(ct: int = CLUSTER_CT, crk: int = 4, agg: int | None = None, mass: int | None = None):
    """The "cluster" select (`page_select_cluster.cu`: a row over a cluster of CLUSTER blocks of `ct` threads,
    `crk` keys a thread, the histograms shared through distributed shared memory), compiled once by NVRTC;
    None where it cannot be built, or on a GPU older than sm_90 (no clusters). mass = G: rows of G per-query
    values a page, ranked by their attention mass (the source's MASSQ; `page_mass` folded in)."""
    key = (ct, crk, agg, mass)
    if key not in _CLUSTER:
        if torch.cuda.get_device_capability()[0] < 9:
            _CLUSTER[key] = None
        else:
            _CLUSTER[key] = build(dict(CL=CLUSTER, CT=ct, CRK=crk, AGG=agg, MASSQ=mass),
                                  ("page_select.cu", "page_select_cluster.cu"), "page_select_cluster",
                                  "CUDA cluster page select", "the block select")
    return _CLUSTER[key]


def _cluster_keys(MP: int, ct: int) -> int:
    """Keys a thread of the cluster select for rows of MP pages: the fewest of 1, 2, 4, 8, 16 that hold it
    (0: none does)."""
    return next((r for r in (1, 2, 4, 8, 16) if CLUSTER * ct * r >= MP), 0)


def _tables(BH: int, k: int, device):
    """(table (BH, k), nsel (BH,), last (BH,)), int32, for a select to fill."""
    return (torch.empty(BH, k, device=device, dtype=torch.int32), torch.empty(BH, device=device, dtype=torch.int32),
            torch.empty(BH, device=device, dtype=torch.int32))


def _cluster(scores, k: int, pos, page: int, row_pages: int, table, nsel, last) -> bool:
    """The cluster select into (table, nsel, last) where it applies (an sm_90+ GPU with NVRTC, rows it holds);
    per-query scores (B, Hkv, MP, G) are ranked by their attention mass inside it (MASSQ: `page_mass` and the select
    in one launch). False: not launched."""
    B, Hkv, MP = scores.shape[:3]
    crk = _cluster_keys(MP, CLUSTER_CT)
    kern = (cluster_kernel(CLUSTER_CT, crk, mass=scores.shape[3] if scores.dim() == 4 else None)
            if scores.is_cuda and crk else None)
    if kern is None:
        return False
    kern(grid=(B * Hkv * CLUSTER, 1, 1), block=(CLUSTER_CT, 1, 1),
         args=[scores, _pos(pos, scores.device).long(), table, nsel, last, MP, k, page, row_pages, table.stride(0)])
    return True


def _block(scores, k: int, pos, page: int, row_pages: int, table, nsel, last, gate=None) -> bool:
    """The block select into (table, nsel, last) where it applies (a CUDA GPU, rows up to BLOCK_ROW pages,
    NVRTC); gate (n, p0, every > 1): the kernel returns at once on the steps that keep their table. False:
    not launched."""
    B, Hkv, MP = scores.shape
    if not (scores.is_cuda and MP <= BLOCK_ROW and scores.is_contiguous() and scores.dtype == torch.float32):
        return False
    every = gate[2] if gate is not None else 1
    kern = block_kernel(rk=8 if MP <= BLOCK_ROW // 2 else 16, early=BLOCK_EARLY, every=every)  # 8 keys a thread
    if kern is None:                                                           # where the row fits: half the work
        return False
    extra = [_pos(gate[0], scores.device).long(), gate[1]] if every > 1 else []
    kern(grid=(B * Hkv, 1, 1), block=(1024, 1, 1),
         args=[scores, _pos(pos, scores.device).long(), table, nsel, last, MP, k, page, row_pages, table.stride(0),
               *extra])
    return True


def refresh(gate) -> torch.Tensor:
    """gate = (n, p0, every): whether this decode step chooses its pages afresh, (1,) bool on n's device: n the
    tokens held (this one included), p0 the first decode step's position; afresh on that step and every
    `every`-th after it."""
    n, p0, every = gate
    return (_pos(n, p0.device) - 1 - p0) % every == 0


def select_pages(scores, k: int, pos, *, page: int, row_pages: int, method: str | None = None,
                 seg: int | None = None, out=None, gate=None):
    """See `sparse_reference.select_pages` (no sort, no top-k): → table (B·Hkv, k) int32, nsel
    (B·Hkv,) int32, last (B·Hkv,) int32. `method`: "block" (CUDA, one thread block a row, one launch;
    the default on a GPU where NVRTC builds it), "cluster" (CUDA on sm_90+, a row over a cluster of
    CLUSTER blocks; the default instead where SELECT_METHOD says so, for rows of at least CLUSTER_MIN
    pages), "bisect" (one program a row, the row in
    registers, 32 counting passes; rows up to SELECT_CHUNK pages = 64K tokens at page 16, the
    default there) or "multi" (a radix select over row segments of `seg` pages, 6 launches; the
    default for longer rows). Measured on the H200, Llama-3-8B shape (8 rows): at 128K multi 24 µs
    vs bisection 42 µs; at 512K multi 27 µs vs 182 µs for the one-program-a-row radix select it
    replaced.
    out = (table, nsel) and gate = (n, p0, every) (quest's every=K; both or neither): write into out only on
    the steps `refresh(gate)` names; on the others out keeps the table it holds (the block select then returns
    at once; elsewhere the fresh table is computed and not taken). Returns out's tensors (with `last`).
    scores (B, Hkv, MP, G): each query's log-sum-exp (or peak) a page, ranked by the page's attention mass over
    the row (`page_mass` with no forced page, then the select; on sm_90+ one cluster select doing both,
    `_cluster`, where out is None)."""
    if scores.dim() == 4:
        if (out is None and method in (None, "cluster") and MASS_CLUSTER and scores.is_cuda and scores.is_contiguous()
                and scores.dtype == torch.float32 and scores.shape[3] <= 8):
            got = _tables(scores.shape[0] * scores.shape[1], k, scores.device)
            if _cluster(scores, k, pos, page, row_pages, *got):
                return got
        from .quest_rerank import page_mass
        scores = page_mass(scores, None, pos=pos, page=page, sink=0, recent=0)
    if out is not None:
        table, nsel = out
        last = torch.empty_like(nsel)
        if method in (None, "block") and _block(scores, k, pos, page, row_pages, table, nsel, last, gate):
            return table, nsel, last
        t, c, last = select_pages(scores, k, pos, page=page, row_pages=row_pages, method=method, seg=seg)
        fresh = refresh(gate)
        table.copy_(torch.where(fresh, t, table)), nsel.copy_(torch.where(fresh, c, nsel))
        return table, nsel, last
    if not _use_triton(scores):
        return ref.select_pages(scores, k, pos, page=page, row_pages=row_pages)
    B, Hkv, MP = scores.shape
    BH = B * Hkv
    assert scores.is_contiguous() and scores.dtype == torch.float32
    dev = scores.device
    table, nsel, last = _tables(BH, k, dev)
    pos = _pos(pos, dev)
    if method == "cluster" or (method is None and SELECT_METHOD == "cluster" and MP >= CLUSTER_MIN):
        if _cluster(scores, k, pos, page, row_pages, table, nsel, last):
            return table, nsel, last
        if method == "cluster":
            raise ValueError(f"the cluster select needs an sm_90+ CUDA GPU with NVRTC and rows of at most "
                             f"{CLUSTER * CLUSTER_CT * 16} pages")
    if method in (None, "block") and _block(scores, k, pos, page, row_pages, table, nsel, last):
        return table, nsel, last
    if method == "block":
        raise ValueError(f"the block select needs a CUDA GPU with NVRTC and rows of at most {BLOCK_ROW} pages")
    method = method or ("bisect" if MP <= SELECT_CHUNK else "multi")
    if method == "bisect":
        if MP > SELECT_CHUNK:
            raise ValueError(f"bisect select holds a row of at most {SELECT_CHUNK} pages; this row has {MP}")
        CHUNK = triton.next_power_of_2(MP)
        _select_bisect_kernel[(BH,)](scores, pos, table, nsel, last, MP, k, page, row_pages, table.stride(0),
                                     CHUNK=CHUNK, num_warps=16 if CHUNK >= 4096 else 4)
        return table, nsel, last
    SEG = min(triton.next_power_of_2(MP), seg or SELECT_SEG)
    NSEG = triton.cdiv(MP, SEG)
    hist = torch.zeros(BH, 4, 256, device=dev, dtype=torch.int32)
    cnt = torch.empty(BH, NSEG, 2, device=dev, dtype=torch.int32)
    grid = (BH, NSEG)
    warps = 4 if SEG >= 512 else 1
    for i in range(4):
        _hist_kernel[grid](scores, pos, hist, MP, k, page, SEG=SEG, PASS=i, num_warps=warps)
    _count_kernel[grid](scores, pos, hist, cnt, MP, k, page, NSEG, SEG=SEG, num_warps=warps)
    _write_kernel[grid](scores, pos, hist, cnt, table, nsel, last, MP, k, page, NSEG, row_pages,
                        table.stride(0), SEG=SEG, BLOCK_S=triton.next_power_of_2(NSEG), num_warps=warps)
    return table, nsel, last
