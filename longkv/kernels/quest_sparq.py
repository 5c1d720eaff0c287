"""Quest's pages scored SparQ's way: `kv4+quest:groups=1,channels=F` (cache/select/quest_storage.py).

Quest's min/max bound over a 64-token key group is too loose to find needles on small models
(BENCHMARKS.md, issue 5). SparQ (Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference",
ICML 2024, arXiv 2312.04985) estimates every token's logit from the few channels where the query is
largest: q_R · k_R, scaled by 1/sqrt(share of |q|_1 those channels hold). Here that estimate ranks the
storage's key groups (each group scored by its largest estimated logit, or each query's log-sum-exp over
it for `page_mass`), and the selected groups go to the paged CUDA kernel as before.

Reading R of D channels is only cheaper if a channel's codes are contiguous, and the storage keeps a
token's D codes together. So the layer keeps a channel-major copy of its 4-bit key codes: `sketch`
(B, H, D, cap/2) uint8 (byte m of a channel: the group's tokens 2m and 2m + 1) and `sz` (B, H, D, MG, 2)
fp16 (the group's scale and zero of that channel). The append + flush kernel writes a group into the copy
when it completes (`quant_append.append_flush(..., sketch=)`; prefill writes whole ranges in torch). A
sparse layer's step then picks the channels (Σ_g |q_g|, optionally weighed, ranked; tau = 1 / sqrt(share))
and scores every group from R channels' codes (R = 16 of 128 on the 8B shape: 1/8 of the key codes) plus
their statistics.

The score: on a GPU with 16-bit queries, `quest_sparq.cu` (CUDA through NVRTC: a thread
takes WPT words of a group's channel, nibble pairs to fp16 pairs by LOP3, packed fp16 FMAs, no tensor
cores; rank=peak and mass write each query's value, G floats a group, mass with one exponential a token and
query), which also picks the channels itself in every block (no launch of its own); otherwise `prepare`
(`_prep_kernel`, one program a row, one `tl.sort` of D keys) picks them and `_sparq_score_kernel`
(Triton: a batched tensor-core dot, 16/G groups stacked in one dot so a small query group fills its rows)
scores. H200, 8B shape, 512K, one layer read from HBM (benchmarks/sparq_probe.py, BENCHMARKS.md issue 5,
session 17): the CUDA score 18.6 µs at its default launch (WPT 4, two 256-thread blocks an SM, 16-byte
loads), +2.6 with the channel choice; `prepare` 5.1-5.7; the Triton score 18.5, rank=mass 39.6; the loads
alone 12.7 (37.7 MB). PIPE (a block loops over its row's tiles, loading the next while scoring this one)
is written and off by default: not yet run on a GPU. Tried on the way: the channel choice in every Triton
score program (28-107 µs by itself), one 2-D tile with a scale/zero load per code (~200 µs), a loop of one
group a step (88 µs), Triton CUDA-core FMAs in a 3-D layout (41 µs), the codes to fp16 by 0x6400|c (CVT,
~2 µs).

References: `sparq_reference.sketch_groups`, `sparq_group_scores`.
"""
from __future__ import annotations

import os

import torch

from . import sparq_reference as sref
from .decode import _use_triton, triton
from .nvrtc import build
from .page_select import _pos

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _prep_kernel(Q, IDX, TAU, W, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK_G: tl.constexpr,
                     WEIGH: tl.constexpr):
        """One program a (batch, KV head) row: the channel choice. Σ_g |q_g| per channel, sorted once (key =
        the sum's bits, then the reversed channel: ties go to the lower channel) → IDX (D,) channels by rank;
        TAU (BLOCK_G,) = 1 / sqrt(share of each query's |q|_1 the first R hold). WEIGH: |q| times W (D,), the
        channels' weights (`sparq_reference.sparq_weights`), for the choice and the share."""
        bh = tl.program_id(0)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        qa = tl.abs(tl.load(Q + (bh * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32))
        if WEIGH:
            qa = qa * tl.load(W + bh * D + d)[None, :]
        a = tl.sum(qa, 0)                                                            # (D,), >= 0
        key = (a.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (D - 1 - d).to(tl.int64)
        srt = tl.sort(key, 0, descending=True)
        tl.store(IDX + bh * D + d, (D - 1 - (srt & 0xFFFFFFFF)).to(tl.int32))
        kth = tl.sum(tl.where(d == R - 1, srt, 0), 0)
        sel = key >= kth
        share = tl.sum(tl.where(sel[None, :], qa, 0.0), 1) / tl.maximum(tl.sum(qa, 1), 1e-30)
        tl.store(TAU + bh * BLOCK_G + g, 1.0 / tl.sqrt(tl.maximum(share, 1e-30)))

    @triton.jit
    def _sparq_score_kernel(Q, SK, SZ, Len, IDX, TAU, S, NPos, CAPH, MG, scale, SINK: tl.constexpr,
                            WINDOW: tl.constexpr, GROUP: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                            R: tl.constexpr, BLOCK_G: tl.constexpr, GP: tl.constexpr, STACK: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, MASS: tl.constexpr, PROBE: tl.constexpr,
                            CVT: tl.constexpr):
        """BLOCK_P key groups of one row: the R channels' codes of each group (BLOCK_P x R x GROUP/2
        bytes, one load), each group's scale folded into the query (q∘s, one fp16 rounding) so the codes
        go to the tensor cores as exact integers, q·z added after. STACK groups share one dot (for each
        nibble): their GP (G padded) scaled queries are the rows of a block-diagonal (STACK·GP) x (STACK·R)
        matrix and their codes are stacked along the reduction, so a small query group (G = 4) fills the
        dot's 16 rows with real logits instead of padding (STACK = 1, GP = 16: one group a dot). CVT: how a
        code becomes fp16: 0 = `cvt` (quarter rate on Hopper); 1 = its bits OR 0x6400 (the fp16 1024 + c)
        minus 1024; 2 = the same with the 1024 · Σ q∘s taken off q·z instead (the max over a group's
        tokens commutes with it). PROBE (benchmarks only): 1 = stop after the loads."""
        bh = tl.program_id(0)
        pid = tl.program_id(1)
        nqg = tl.maximum((tl.load(Len) - 1 - SINK - WINDOW) // GROUP, 0).to(tl.int32)
        if (bh == 0) & (pid == 0):
            tl.store(NPos, nqg.to(tl.int64) * GROUP - 1)
        NB: tl.constexpr = BLOCK_P // STACK
        M: tl.constexpr = STACK * GP
        g = tl.arange(0, GP)
        r = tl.arange(0, BLOCK_R)
        HG: tl.constexpr = GROUP // 2
        idx = tl.load(IDX + bh * D + r, mask=r < R, other=0)                          # (BLOCK_R,)
        qr = tl.load(Q + (bh * G + g[:, None]) * D + idx[None, :], mask=(g[:, None] < G) & (r[None, :] < R),
                     other=0.0).to(tl.float32)                                        # (GP, BLOCK_R)
        p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pc = tl.minimum(p, MG - 1)
        m = tl.arange(0, HG)
        b = tl.load(SK + ((bh * D + idx) * CAPH)[None, :, None] + (pc * HG)[:, None, None] + m[None, None, :],
                    mask=(r < R)[None, :, None], other=0).to(tl.int32)              # (BLOCK_P, BLOCK_R, g/2)
        so = ((bh * D + idx) * MG)[None, :] + pc[:, None]                              # (BLOCK_P, BLOCK_R)
        sc = tl.load(SZ + so * 2, mask=(r < R)[None, :], other=0.0).to(tl.float32)
        z = tl.load(SZ + so * 2 + 1, mask=(r < R)[None, :], other=0.0).to(tl.float32)
        if PROBE == 1:
            t = tl.sum(tl.sum(b, 2).to(tl.float32) + sc + z, 1)
            tl.store(S + bh * MG + p, t, mask=p < MG)
            return
        qs = qr[None, :, :] * sc[:, None, :]                                           # (BLOCK_P, GP, BLOCK_R)
        qz = tl.sum(qr[None, :, :] * z[:, None, :], 2)                                  # (BLOCK_P, GP)
        if CVT == 0:
            c0 = (b & 15).to(tl.float16)
            c1 = (b >> 4).to(tl.float16)
        else:
            c0 = ((b & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)         # 1024 + c, exact
            c1 = ((b >> 4) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            if CVT == 1:
                c0 = c0 - 1024.0
                c1 = c1 - 1024.0
            else:
                qz -= 1024.0 * tl.sum(qs.to(tl.float16).to(tl.float32), 2)
        s = tl.arange(0, STACK)
        eye = s[:, None] == s[None, :]
        a = tl.where(eye[None, :, None, :, None], tl.reshape(qs, (NB, STACK, GP, BLOCK_R))[:, :, :, None, :], 0.0)
        a = tl.reshape(a.to(tl.float16), (NB, M, STACK * BLOCK_R))                   # block-diagonal queries
        l0 = tl.dot(a, tl.reshape(c0, (NB, STACK * BLOCK_R, HG)))                     # (NB, M, g/2)
        l1 = tl.dot(a, tl.reshape(c1, (NB, STACK * BLOCK_R, HG)))
        mx = tl.maximum(tl.max(l0, 2), tl.max(l1, 2))                                 # (NB, M): row = (group, query)
        i = tl.arange(0, M)
        t2 = tl.load(TAU + bh * BLOCK_G + i % GP) * scale                             # (M,)
        pr = pid * BLOCK_P + tl.arange(0, NB)[:, None] * STACK + (i // GP)[None, :]     # (NB, M): the group
        gr = (i % GP)[None, :]
        v = (mx + tl.reshape(qz, (NB, M))) * t2[None, :]
        if MASS > 0:   # each query's own: 1 = its log-sum-exp over the group's tokens, 2 = its largest logit
            if MASS == 1:
                e = tl.sum(tl.exp((l0 - mx[:, :, None]) * t2[None, :, None]), 2) + \
                    tl.sum(tl.exp((l1 - mx[:, :, None]) * t2[None, :, None]), 2)
                v = v + tl.log(e)
            v = tl.where(pr < nqg, v, float("-inf"))
            tl.store(S + (bh * MG + pr) * G + gr, v, mask=(pr < MG) & (gr < G))
        else:
            v = tl.max(tl.reshape(tl.where(gr < G, v, float("-inf")), (BLOCK_P, GP)), 1)
            tl.store(S + bh * MG + p, tl.where(p < nqg, v, float("-inf")), mask=p < MG)


def prepare(q, heads: int, channels: int, *, weight=None, warps: int = 4):
    """The channel choice before a Triton score (graph-safe; the CUDA score makes it itself) of each of the
    `heads` KV heads' query groups (`sparq_reference.sparq_channels`) → (idx (B·Hkv, D) int32 channels by
    rank, tau (B·Hkv, BLOCK_G) fp32 = 1 / sqrt(share)), what `sparq_group_scores` reads. weight: (B, Hkv,
    D) channel weights for the choice (`sparq_channels`)."""
    B, Hq, _, D = q.shape
    H, G = heads, Hq // heads
    BG = max(16, 1 << (G - 1).bit_length())
    if not _use_triton(q):
        idx, share = sref.sparq_channels(q.float().reshape(B, H, G, D), channels, weight)
        rest = torch.ones(B, H, D, dtype=torch.bool, device=q.device).scatter_(-1, idx, False)
        full = torch.cat([idx, rest.nonzero()[:, -1].reshape(B, H, D - channels)], -1)
        tau = torch.ones(B * H, BG, device=q.device)
        tau[:, :G] = share.reshape(B * H, G).rsqrt()
        return full.reshape(B * H, D).to(torch.int32), tau
    idx = torch.empty(B * H, D, device=q.device, dtype=torch.int32)
    tau = torch.empty(B * H, BG, device=q.device, dtype=torch.float32)
    _prep_kernel[(B * H,)](q.contiguous(), idx, tau, tau if weight is None else weight.contiguous(), G=G, D=D,
                           R=channels, BLOCK_G=BG, WEIGH=weight is not None, num_warps=warps)
    return idx, tau


_CUDA: dict = {}
RANKS = ("max", "mass", "peak")   # the scores' ranks; the index is the kernels' MASS (Triton) and PERQ (CUDA)
# the CUDA score's launch: words (8 tokens each) of a channel a thread, blocks an SM the registers must
# allow, threads a block, whether a thread's words come by 8/16-byte loads (where aligned), whether the
# score picks the channels itself when the caller has not (else `prepare` does, one launch more), and
# whether a block loops over tiles with the next one's loads in flight (PIPE), and whether rank=mass's exponentials
# run on fp16 pairs (HEXP: ex2.approx.f16x2; off: on an H100 it passed its tests and was within the
# re-timing noise, session 34);
# LONGKV_SPARQ_CUDA=wpt:minb:threads[:vec[:choose[:pipe[:hexp]]]] overrides them (benchmarks), or "off"
LAUNCH_FIELDS = ("wpt", "minb", "threads", "vec", "choose", "pipe", "hexp")
_DEFAULT_LAUNCH = "4:2:256:1:1:0:0"


def parse_launch(text: str) -> tuple[int, ...]:
    """'wpt:minb:threads[:vec[:choose[:pipe[:hexp]]]]' → the seven fields (vec 0, choose 1, pipe 0, hexp 0 where
    left out)."""
    parts = text.split(":")
    try:
        if not 3 <= len(parts) <= 7:
            raise ValueError
        return tuple(int(x) for x in parts + ["0", "1", "0", "0"][len(parts) - 3:])
    except ValueError:
        raise ValueError(f"CUDA score launch {text!r}: expected wpt:minb:threads[:vec[:choose[:pipe[:hexp]]]], e.g. "
                         f"{_DEFAULT_LAUNCH}") from None


_env = os.environ.get("LONGKV_SPARQ_CUDA") or _DEFAULT_LAUNCH
# "off": the Triton score everywhere (fp32 sums), to tell the CUDA score's fp16 sums from the rest of a GPU run
CUDA_OFF = _env == "off"
try:
    CUDA_WPT, CUDA_MINB, CUDA_THREADS, CUDA_VEC, CUDA_CHOOSE, CUDA_PIPE, CUDA_HEXP = parse_launch(
        _DEFAULT_LAUNCH if CUDA_OFF else _env)
except ValueError as e:
    raise ValueError(f"LONGKV_SPARQ_CUDA: {e} (or off)") from None


def cuda_score_kernel(*, D: int, G: int, R: int, group: int, sink: int, window: int, bf16: bool,
                      threads: int = CUDA_THREADS, wpt: int = CUDA_WPT, minb: int = CUDA_MINB, vec: int = 0,
                      choose: bool = False, weigh: bool = False, pipe: bool = False, every: int = 1,
                      rank: str = "max", hexp: bool = False):
    """The CUDA score (`quest_sparq.cu`; rank=max, or each query's for peak and mass) for one layout, built by
    NVRTC once; None where it cannot be (no NVRTC, or it refused the source: a warning says why, and the Triton
    score is used).
    every > 1: one more argument (the first decode step's position) and the score runs only on the steps
    that choose afresh (`page_select.refresh`)."""
    key = (rank, hexp, D, G, R, group, sink, window, bf16, threads, wpt, minb, vec, choose, weigh, pipe, every)
    if key not in _CUDA:
        _CUDA[key] = build(dict(D=D, G=G, R=R, GROUP=group, SINK=sink, WINDOW=window, QBF16=int(bf16), NT=threads,
                                WPT=wpt, MINB=minb, VEC=vec, CHOOSE=int(choose), WEIGH=int(weigh),
                                PIPE=int(pipe), EVERY=every if every > 1 else None,
                                PERQ=RANKS.index(rank), HEXP=int(hexp)),
                           ("ptx.cuh", "quest_sparq.cu"), "sparq_score",
                           "CUDA SparQ score", "the Triton score")
    return _CUDA[key]


def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cuda_ok(q, sk, sz, group: int, probe: int) -> bool:
    """Where the CUDA score applies: on a GPU, fp16/bf16 queries, groups of 8·2^k tokens."""
    wpg = group // 8
    return (not probe and q.is_cuda and sz.shape[3] > 0 and q.dtype in (torch.float16, torch.bfloat16)
            and group % 8 == 0 and 0 < wpg <= 32 and wpg & (wpg - 1) == 0 and sk.is_contiguous()
            and sk.shape[-1] % 4 == 0 and sk.data_ptr() % 4 == 0 and sz.is_contiguous() and sz.dtype == torch.float16)


def sparq_group_scores(q, sk, sz, length, sel, *, group: int, sink: int, window: int, channels: int, scale: float,
                       rank: str = "max", block_p: int = 8, warps: int = 2, cvt: int = 0, probe: int = 0,
                       weight=None, stack: bool = True, impl: str | None = None, wpt: int | None = None,
                       minb: int | None = None, threads: int | None = None, vec: int | None = None,
                       pipe: int | None = None, hexp: bool | None = None, gate=None):
    """See `sparq_reference.sparq_group_scores` (sel = `prepare`'s (idx, tau), or None: the CUDA score chooses
    the channels itself, in each block, and elsewhere `prepare` is called here; the reference, on the CPU, picks
    them itself): → (scores (B, Hkv, MG) for rank=max, or each query's (B, Hkv, MG, G): its log-sum-exp for
    rank=mass, its largest logit for rank=peak; npos (1,) int64).
    impl: None = the CUDA score (`quest_sparq.cu`) where it applies (`_cuda_ok`; not with
    LONGKV_SPARQ_CUDA=off), else Triton; "cuda" or "triton" to insist. wpt / minb / threads / vec / pipe / hexp:
    the CUDA launch (None = CUDA_WPT, CUDA_MINB, CUDA_THREADS, CUDA_VEC, CUDA_PIPE, CUDA_HEXP; vec only where the
    codes are aligned for it; pipe 1: as many blocks a row as are resident at once, k > 1: k blocks a row). Triton's:
    block_p, warps, cvt (the code-to-fp16 conversion, its CVT), stack (groups stacked into one dot, its STACK).
    weight: the channel weights, read by the channel choice (`prepare`'s, or the CUDA score's with sel=None) and
    the CPU reference. gate = (n, p0, every) (quest's every=K, `page_select.refresh`): the CUDA score returns at
    once on the steps that keep their table (the scores are then not written: the gated select does not read
    them); elsewhere it scores every step."""
    if not _use_triton(q):
        return sref.sparq_group_scores(q, sk, sz, length, group=group, sink=sink, window=window, channels=channels,
                                      scale=scale, rank=rank, weight=weight)
    B, Hq, _, D = q.shape
    H, MG = sk.shape[1], sz.shape[3]
    G = Hq // H
    out = torch.empty((B, H, MG) if rank == "max" else (B, H, MG, G), device=q.device, dtype=torch.float32)
    npos = torch.empty(1, device=q.device, dtype=torch.int64)
    if (impl == "cuda" or impl is None and not CUDA_OFF) and _cuda_ok(q, sk, sz, group, probe):
        if sel is None and not CUDA_CHOOSE:
            sel = prepare(q, H, channels, weight=weight)
        wpt, minb, threads = min(wpt or CUDA_WPT, group // 8), minb or CUDA_MINB, threads or CUDA_THREADS
        align = 4 * min(wpt, 4)     # bytes of one vector load
        vec = int(bool(CUDA_VEC if vec is None else vec) and wpt > 1 and sk.data_ptr() % align == 0
                  and sk.shape[-1] % align == 0)
        pipe = CUDA_PIPE if pipe is None else pipe
        every = gate[2] if gate is not None else 1
        kern = cuda_score_kernel(D=D, G=G, R=channels, group=group, sink=sink, window=window,
                                 bf16=q.dtype == torch.bfloat16, wpt=wpt, minb=minb, threads=threads, vec=vec,
                                 choose=sel is None, weigh=sel is None and weight is not None, pipe=pipe > 0,
                                 every=every, rank=rank, hexp=bool(CUDA_HEXP if hexp is None else hexp))
        if kern is not None:
            gpb = threads // (group // 8 // wpt)
            nb = triton.cdiv(MG, gpb)           # blocks a row (PIPE: as many as are resident at once, looping)
            if pipe:
                nb = max(1, min(nb, pipe if pipe > 1 else _sms(q.device) * minb // (B * H)))
            idx, tau = sel if sel is not None else (npos, out)        # not read: the kernel chooses
            w = weight.float().contiguous() if sel is None and weight is not None else out   # out: not read
            kern(grid=(nb, B * H, 1), block=(threads, 1, 1),
                 args=[q.contiguous(), sk, sz, _pos(length, q.device).long(), idx, tau, out, npos, int(sk.shape[-1]),
                       int(MG), float(scale), int(tau.shape[-1]), w, *([gate[1]] if every > 1 else [])])
            return out, npos
    if impl == "cuda":
        raise ValueError("the CUDA SparQ score needs a CUDA GPU with NVRTC, fp16/bf16 queries and "
                         "groups of 8·2^k tokens")
    idx, tau = sel if sel is not None else prepare(q, H, channels, weight=weight)
    gp = triton.next_power_of_2(G) if stack and G < 16 else tau.shape[1]
    st = max(1, 16 // gp)
    block_p = max(block_p, st)
    _sparq_score_kernel[(B * H, triton.cdiv(MG, block_p))](
        q.contiguous(), sk, sz, _pos(length, q.device), idx, tau, out, npos, sk.shape[-1], MG, scale, SINK=sink,
        WINDOW=window, GROUP=group, G=G, D=D, R=channels, BLOCK_G=tau.shape[1], GP=gp, STACK=st,
        BLOCK_R=max(16, triton.next_power_of_2(channels)), BLOCK_P=block_p, MASS=RANKS.index(rank),
        PROBE=probe, CVT=cvt,
        num_warps=warps)
    return out, npos
