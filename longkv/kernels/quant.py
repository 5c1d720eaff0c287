"""Triton kernels for the quantized KV cache (`cache/quant.py`): decode straight from packed bytes.

Why: every quantized cache people use (transformers' QuantizedCache, KIVI's code) unpacks to fp16
before attention, so it is smaller but slower. Decode is bound by the bytes read per token; these
kernels read 2/3/4/8-bit codes and fp16 scales only, dequantize in registers, rotate the pre-RoPE
keys on the fly (KVQuant, Hooper et al. 2024, App. R) and never write a dequantized copy.

- The write (quantize + pack on append, one launch per step) is `kernels/quant_append.py`.
- `_attn_kernel` (flash-decoding, grid (batch·KV heads, splits + 1)): splits 0..S-1 cover the
  quantized region, split S the full-precision sink + ring; each program reads one KV head once for
  its whole query group (GQA) and writes a partial output + log-sum-exp; `decode._merge_kernel`
  merges them. The length comes from a device tensor.

How the packed tile is read (tile readers in `kernels/packed.py`): codes load as 32-bit words, one
vector load per row, and unpack with shifts (1.75x faster than byte gathers, H100, 128K kv4); uniform
levels become floats by the 2^23 bit trick; with one value range per token the value scale/zero fold
into the probabilities (sum_n p_n (c_n s_n + z_n) = (p*s)·c + p·z), so values are never dequantized
element by element; RoPE uses angle addition, q·R(a+i)k = (R(-a)q)·(R(i)k), with R(i) built once per
program and R(a) read from a per-cache table of every 16th position (`rope_table`) instead of
tl.cos/tl.sin of large arguments.

Keys stored after RoPE (`prerope=False`, KIVI's layout): a tile of keys shares one scale and zero
per channel, so q·(c∘s + z) = (q∘s)·c + q·z: the scale folds into q once per tile and the key tile is
the integer levels themselves — no per-element dequantization and no rotation. For 2- and 4-bit
uniform codes those tiles (and the folded value tiles) come as bf16/fp16 straight from the words,
two codes per 32-bit op, in *pair order* (`packed.pair_codes`; q, the key statistics and the output
columns are permuted to match): 8.7 instead of 11.4 SASS instructions per code in the loop (sm_90,
compiled offline). Hopper's bulk L2 prefetch runs `PREFETCH` tiles ahead.

On that path the loop is double-buffered (`_fast_loop`, `PIPE`): the next tile's words and statistics
are loaded into registers before this tile is converted, so HBM's latency overlaps a tile of work
(and, offline, 254 → 213 registers at 4 warps).

On a GPU the KIVI layout at 2 and 4 bits (post-RoPE keys, one value range a token, no outliers or
codebooks: `kivi4`, `kivi2`) does not run here but in `kernels/quant_cuda.py`, which loads the codes
in MMA fragment order (H200, 8B shape, 128K: 59 µs a layer against this kernel's 183; kivi4 decodes
at 0.69x of bf16 full). Everything else (pre-RoPE keys: `kv4`, `kv3`, `kv2`; outliers, codebooks,
3 and 8 bits) runs here, and the tests run this kernel on the KIVI layout too (interpreter).

Where this kernel stands (H200, BENCHMARKS.md issue 4): kv4 decodes at 1.45x of bf16 full at 128K;
on the KIVI layout it reached 1.12x at 128K and 1.16x at 512K (1.24x / 1.40x before the double
buffering) — slower than bf16. ncu (before it): DRAM
12 % busy, 251 registers a thread → 2 warps a scheduler, stalls spread over shared-memory,
fixed-latency and global-load dependencies: latency-bound with too few warps. Capping registers
(`MAX_REGS`) trades that for spills (kv4 -2 %, kivi4 +28 %). A CUDA-core variant (`use_dot=False`) is
kept for comparison; it is ~3x slower in Triton.

References: `kernels/quant_reference.py`. Without a GPU the wrappers use the references unless
`TRITON_INTERPRET=1` (the tests) forces the Triton path.
"""
from __future__ import annotations

import warnings

import torch

from . import quant_cuda as qc
from . import quant_reference as ref
from .decode import _use_triton, num_splits
from .quant_append import append_flush, outs, planes  # noqa: F401  (append_flush: the cache's writer)

try:
    import triton
    import triton.language as tl
    from .decode import _merge_kernel
    from . import packed as pk
except ImportError:  # CPU installs without triton use the references
    triton = None


if triton is not None:

    @triton.jit
    def _qk(q, k, dt, USE_DOT: tl.constexpr):
        """Scores (G, N) of q (G, C) against k (N, C), fp32 in and out. USE_DOT: tensor cores (operands
        staged through shared memory); else CUDA-core FMAs on registers (G small: GQA decode)."""
        if USE_DOT:
            return tl.dot(q.to(dt), tl.trans(k.to(dt))).to(tl.float32)
        return tl.sum(q[:, None, :] * k[None, :, :], 2)

    @triton.jit
    def _pv(p, v, dt, USE_DOT: tl.constexpr):
        """p (G, N) · v (N, D) → (G, D) fp32, as `_qk`."""
        if USE_DOT:
            return tl.dot(p.to(dt), v.to(dt)).to(tl.float32)
        return tl.sum(p[:, :, None] * v[None, :, :], 1)

    @triton.jit
    def _softmax(s, ok, m, l, scale):
        """Online-softmax bookkeeping for one tile of scores s (G, N): → (m_new, l_new, alpha, p)."""
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        return m_new, l * alpha + tl.sum(p, 1), alpha, p

    @triton.jit
    def _fast_loop(q_pair, perm, m, l, acc, KP0, KS, KZ, VP0, VS, VZ, kb0, hq, sbase, start, end, scale, dt,
                   D: tl.constexpr, PB0: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                   USE_DOT: tl.constexpr, PAIR: tl.constexpr, PREFETCH: tl.constexpr):
        """The packed loop of the pair-order fast path (post-RoPE keys, one value range per token)
        with the next tile's words and statistics loaded into registers before this tile is converted
        and multiplied (double buffering: HBM's latency overlaps a tile of work instead of stalling
        each iteration). Returns (m, l, acc)."""
        i = tl.arange(0, BLOCK_N)
        n = start + i
        ok = n < end
        wk = pk.pair_words(KP0, kb0, n, ok, D, PB0)
        wv = pk.pair_words(VP0, kb0, n, ok, D, PB0)
        srow = (sbase + start // GROUP) * D
        live = start < end
        ks = tl.load(KS + srow + perm, mask=perm < tl.where(live, D, 0), other=0.0)
        kz = tl.load(KZ + srow + perm, mask=perm < tl.where(live, D, 0), other=0.0)
        vs = tl.load(VS + hq + n, mask=ok, other=0.0)
        vz = tl.load(VZ + hq + n, mask=ok, other=0.0)
        for n0 in range(start, end, BLOCK_N):
            if PREFETCH > 0:
                nj = n0 + PREFETCH * BLOCK_N
                pk.prefetch_tile(KP0, KP0, KS, KZ, VP0, VP0, VS, VZ, kb0, kb0, hq, (sbase + nj // GROUP) * D, nj,
                                 end, D, PB0, 0, 1, BLOCK_N, True)
            n1 = n0 + BLOCK_N + i
            ok1 = n1 < end
            wk1 = pk.pair_words(KP0, kb0, n1, ok1, D, PB0)
            wv1 = pk.pair_words(VP0, kb0, n1, ok1, D, PB0)
            srow1 = (sbase + (n0 + BLOCK_N) // GROUP) * D
            live1 = n0 + BLOCK_N < end
            ks1 = tl.load(KS + srow1 + perm, mask=perm < tl.where(live1, D, 0), other=0.0)
            kz1 = tl.load(KZ + srow1 + perm, mask=perm < tl.where(live1, D, 0), other=0.0)
            vs1 = tl.load(VS + hq + n1, mask=ok1, other=0.0)
            vz1 = tl.load(VZ + hq + n1, mask=ok1, other=0.0)
            kc = pk.pair_tile(wk, D, PB0, BLOCK_N, dt, PAIR)
            ksf = ks.to(tl.float32)[None, :]
            s = _qk(q_pair * ksf, kc, dt, USE_DOT) + tl.sum(q_pair * kz.to(tl.float32)[None, :], 1)[:, None]
            m, l, alpha, p = _softmax(s, ok, m, l, scale)
            vc = pk.pair_tile(wv, D, PB0, BLOCK_N, dt, PAIR)
            pv = _pv(p * vs.to(tl.float32)[None, :], vc, dt, USE_DOT)
            acc = acc * alpha[:, None] + pv + tl.sum(p * vz.to(tl.float32)[None, :], 1)[:, None]
            wk, wv, ks, kz, vs, vz, ok = wk1, wv1, ks1, kz1, vs1, vz1, ok1
        return m, l, acc

    @triton.jit
    def _attn_kernel(Q, Len, KP0, KP1, KS, KZ, KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV, KF, VF, Freq, Tab,
                     LutK, LutV, Out, Lse, scale, rope_scaling,
                     HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                     SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, VG: tl.constexpr,
                     PB0: tl.constexpr, PB1: tl.constexpr, N_OUT: tl.constexpr, SINK: tl.constexpr,
                     WINDOW: tl.constexpr, RING: tl.constexpr, NQ_CAP: tl.constexpr,
                     NUQ_K: tl.constexpr, NUQ_V: tl.constexpr, BLOCK_F: tl.constexpr, TS: tl.constexpr,
                     USE_DOT: tl.constexpr, PREROPE: tl.constexpr, PREFETCH: tl.constexpr, PAIR: tl.constexpr,
                     PIPE: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        h: tl.constexpr = D // 2
        NVG: tl.constexpr = D // VG
        # values: uniform levels, one range per token and no outliers -> fold scale/zero into p
        FOLD_V: tl.constexpr = (NVG == 1) and (N_OUT == 0) and (not NUQ_V)
        # tiles of exact levels in pair order (`packed.pair_codes`): one plane of 2 or 4 bits, uniform levels
        PAIR_OK: tl.constexpr = (PB1 == 0) and (PB0 <= 4)
        FAST_K: tl.constexpr = PAIR_OK and (not PREROPE) and (N_OUT == 0) and (not NUQ_K)
        FAST_V: tl.constexpr = PAIR_OK and FOLD_V
        length = tl.load(Len).to(tl.int32)
        # groups flushed *before* this token arrived: the group this step flushes is still read from
        # the ring, exactly as chunked prefill sees it (flush after attention)
        nq = GROUP * tl.maximum((length - 1 - SINK - WINDOW) // GROUP, 0)
        g = tl.arange(0, BLOCK_G)
        c_lo = tl.arange(0, h)
        c_hi = h + c_lo
        d = tl.arange(0, D)
        gm = g[:, None] < G
        qrow = Q + (bh * G + g[:, None]) * D
        q_lo = tl.load(qrow + c_lo[None, :], mask=gm, other=0.0).to(tl.float32)
        q_hi = tl.load(qrow + c_hi[None, :], mask=gm, other=0.0).to(tl.float32)
        q = tl.load(qrow + d[None, :], mask=gm, other=0.0).to(tl.float32)
        perm = pk.pair_perm(D, PB0)
        if FAST_K:
            q_pair = tl.load(qrow + perm[None, :], mask=gm, other=0.0).to(tl.float32)
        dt = Q.dtype.element_ty
        f = tl.load(Freq + c_lo)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        if split < SPLITS:  # the packed region: buffer index i <-> position SINK + i
            # RoPE by angle addition: with SINK + n0 = TS·j + r (r = SINK % TS, the same for every tile),
            # q·R(TS·j + r + i)k = (R(-TS·j)q)·(R(r + i)k): the key-side table R(r + i) (BLOCK_N × h) is
            # built once, and each tile rotates only q (BLOCK_G × h) by the precomputed angle of TS·j
            # (`Tab`; large arguments would send tl.cos/tl.sin down their slow range reduction).
            i = tl.arange(0, BLOCK_N)
            ang = (i + SINK % TS).to(tl.float32)[:, None] * f[None, :]
            ci, si = tl.cos(ang), tl.sin(ang)
            per = tl.cdiv(tl.cdiv(nq, SPLITS), BLOCK_N) * BLOCK_N
            start = split * per
            end = tl.minimum(start + per, nq)
            hq = bh.to(tl.int64) * NQ_CAP
            kb0 = hq * (D * PB0 // 32)
            kb1 = hq * (D * PB1 // 32)
            sbase = bh.to(tl.int64) * (NQ_CAP // GROUP)
            for j in tl.static_range(1, PREFETCH):
                nj = start + j * BLOCK_N
                pk.prefetch_tile(KP0, KP1, KS, KZ, VP0, VP1, VS, VZ, kb0, kb1, hq, (sbase + nj // GROUP) * D, nj,
                                 end, D, PB0, PB1, NVG, BLOCK_N, FOLD_V)
            if PIPE and FAST_K and FAST_V:   # double-buffered loop (`_fast_loop`)
                m, l, acc = _fast_loop(q_pair, perm, m, l, acc, KP0, KS, KZ, VP0, VS, VZ, kb0, hq, sbase, start, end,
                                       scale, dt, D, PB0, BLOCK_N, GROUP, USE_DOT, PAIR, PREFETCH)
            else:
                for n0 in range(start, end, BLOCK_N):
                    if PREFETCH > 0:
                        nj = n0 + PREFETCH * BLOCK_N
                        pk.prefetch_tile(KP0, KP1, KS, KZ, VP0, VP1, VS, VZ, kb0, kb1, hq, (sbase + nj // GROUP) * D, nj,
                                         end, D, PB0, PB1, NVG, BLOCK_N, FOLD_V)
                    n = n0 + i
                    ok = n < end
                    srow = (sbase + n0 // GROUP) * D
                    if PREROPE:
                        k_lo = pk.levels(pk.codes(KP0, KP1, kb0, kb1, n, ok, 0, h, D, PB0, PB1, BLOCK_N), LutK, NUQ_K)
                        k_hi = pk.levels(pk.codes(KP0, KP1, kb0, kb1, n, ok, h, h, D, PB0, PB1, BLOCK_N), LutK, NUQ_K)
                        k_lo = (k_lo * tl.load(KS + srow + c_lo).to(tl.float32)[None, :]
                                + tl.load(KZ + srow + c_lo).to(tl.float32)[None, :])
                        k_hi = (k_hi * tl.load(KS + srow + c_hi).to(tl.float32)[None, :]
                                + tl.load(KZ + srow + c_hi).to(tl.float32)[None, :])
                        if N_OUT > 0:
                            rows = tl.where(ok, hq + n, hq)
                            k_lo = pk.outliers(k_lo, KOI, KOV, rows, c_lo, N_OUT)
                            k_hi = pk.outliers(k_hi, KOI, KOV, rows, c_hi, N_OUT)
                        r_lo = k_lo * ci - k_hi * si
                        r_hi = k_hi * ci + k_lo * si
                        tab = Tab + ((SINK + n0) // TS) * D
                        ca = (tl.load(tab + c_lo) * rope_scaling)[None, :]
                        sa = (tl.load(tab + c_hi) * rope_scaling)[None, :]
                        qa_lo = q_lo * ca + q_hi * sa
                        qa_hi = q_hi * ca - q_lo * sa
                        s = _qk(qa_lo, r_lo, dt, USE_DOT) + _qk(qa_hi, r_hi, dt, USE_DOT)
                    else:  # keys stored rotated (KIVI): a tile shares one scale/zero per channel, so
                        # q·(c∘s + z) = (q∘s)·c + q·z — the key tile is the levels themselves, no per-element
                        # dequantization or rotation (the scale folds into q once per tile)
                        if FAST_K:  # the same on a pair-order tile (`packed.pair_codes`; q, stats permuted)
                            ks = tl.load(KS + srow + perm).to(tl.float32)[None, :]
                            kz = tl.load(KZ + srow + perm).to(tl.float32)[None, :]
                            kc = pk.pair_codes(KP0, kb0, n, ok, D, PB0, BLOCK_N, dt, PAIR)
                            s = _qk(q_pair * ks, kc, dt, USE_DOT) + tl.sum(q_pair * kz, 1)[:, None]
                        else:
                            ks = tl.load(KS + srow + d).to(tl.float32)[None, :]
                            kz = tl.load(KZ + srow + d).to(tl.float32)[None, :]
                            kl = pk.levels(pk.codes(KP0, KP1, kb0, kb1, n, ok, 0, D, D, PB0, PB1, BLOCK_N), LutK, NUQ_K)
                            if N_OUT > 0:
                                rows = tl.where(ok, hq + n, hq)
                                s = _qk(q, pk.outliers(kl * ks + kz, KOI, KOV, rows, d, N_OUT), dt, USE_DOT)
                            else:
                                s = _qk(q * ks, kl, dt, USE_DOT) + tl.sum(q * kz, 1)[:, None]
                    m, l, alpha, p = _softmax(s, ok, m, l, scale)
                    if FOLD_V:  # sum_n p_n (c_n s_n + z_n) = (p∘s)·c + p·z: dequantization costs O(N), not O(N·D)
                        vs = tl.load(VS + hq + n, mask=ok, other=0.0).to(tl.float32)
                        vz = tl.load(VZ + hq + n, mask=ok, other=0.0).to(tl.float32)
                        if FAST_V:  # acc's columns in pair order; the store below puts them back
                            vc = pk.pair_codes(VP0, kb0, n, ok, D, PB0, BLOCK_N, dt, PAIR)
                        else:
                            vc = pk.levels(pk.codes(VP0, VP1, kb0, kb1, n, ok, 0, D, D, PB0, PB1, BLOCK_N), LutV, False)
                        pv = _pv(p * vs[None, :], vc, dt, USE_DOT)
                        acc = acc * alpha[:, None] + pv + tl.sum(p * vz[None, :], 1)[:, None]
                    else:
                        cv = pk.codes(VP0, VP1, kb0, kb1, n, ok, 0, D, D, PB0, PB1, BLOCK_N)
                        rows = tl.where(ok, hq + n, hq)
                        vrow = rows[:, None] * NVG + tl.arange(0, NVG)[None, :]
                        vs = tl.load(VS + vrow).to(tl.float32)
                        vz = tl.load(VZ + vrow).to(tl.float32)
                        v = tl.reshape(pk.levels(cv, LutV, NUQ_V), (BLOCK_N, NVG, VG))
                        v = tl.reshape(v * vs[:, :, None] + vz[:, :, None], (BLOCK_N, D))
                        v = pk.outliers(v, VOI, VOV, rows, d, N_OUT)
                        acc = acc * alpha[:, None] + _pv(p, v, dt, USE_DOT)
        else:  # full precision: sink slots, then the ring (position p >= SINK in slot SINK + (p-SINK) % RING)
            last = length - 1
            fb = bh.to(tl.int64) * (SINK + RING) * D
            for s0 in range(0, SINK + RING, BLOCK_F):
                slot = s0 + tl.arange(0, BLOCK_F)
                back = ((last - SINK - (slot - SINK)) % RING + RING) % RING   # C-style % on negatives
                pos = tl.where(slot < SINK, slot, last - back)
                ok = (slot < SINK + RING) & (pos <= last) & ((slot < SINK) | (pos >= SINK + nq))
                ok = ok & (pos >= 0)
                ptr = fb + tl.where(ok, slot, 0)[:, None] * D
                if PREROPE:
                    k_lo = tl.load(KF + ptr + c_lo[None, :]).to(tl.float32)
                    k_hi = tl.load(KF + ptr + c_hi[None, :]).to(tl.float32)
                    tab = Tab + (pos // TS)[:, None] * D
                    ca, sa = tl.load(tab + c_lo[None, :]), tl.load(tab + c_hi[None, :])
                    ang = (pos % TS).to(tl.float32)[:, None] * f[None, :]
                    cb, sb = tl.cos(ang), tl.sin(ang)
                    cos = (ca * cb - sa * sb) * rope_scaling
                    sin = (sa * cb + ca * sb) * rope_scaling
                    r_lo = k_lo * cos - k_hi * sin
                    r_hi = k_hi * cos + k_lo * sin
                    s = _qk(q_lo, r_lo, dt, USE_DOT) + _qk(q_hi, r_hi, dt, USE_DOT)
                else:
                    s = _qk(q, tl.load(KF + ptr + d[None, :]).to(tl.float32), dt, USE_DOT)
                m, l, alpha, p = _softmax(s, ok, m, l, scale)
                v = tl.load(VF + ptr + d[None, :])
                acc = acc * alpha[:, None] + _pv(p, v.to(tl.float32), dt, USE_DOT)
        row = (bh * (SPLITS + 1) + split) * G + g
        tl.store(Lse + row, tl.where(l > 0, m + tl.log(l), float("-inf")), mask=g < G)
        den = tl.where(l > 0, l, 1.0)[:, None]
        col = d
        if FAST_V:
            col = tl.where(split < SPLITS, perm, d)
        tl.store(Out + row[:, None] * D + col[None, :], acc / den, mask=gm)

BLOCK_N = 64                 # packed-region tile (capped at the key group); benchmarks/quant_sweep.py, H100:
                             # 64 tokens / 8 warps best for kv4, 32 / 2 for 32-token groups
USE_DOT = True               # tensor-core tiles (else CUDA-core FMAs)
TS = 16                      # rope_table step: every TS-th position
PREFETCH = 4                 # L2 bulk prefetch this many tiles ahead (Hopper and later; 0 = off)
NUM_WARPS = None             # None: `_default_warps`
MAX_REGS = None              # register cap per thread (None: the compiler's choice)
PIPE = True                  # double-buffered fast loop (`_fast_loop`); False: the plain loop


def _default_warps(tile: int, fast_k: bool) -> int:
    """Warps per program (benchmarks/quant_sweep.py, H200, 128K): 64-token tiles 8 warps (kv4 339 µs
    vs 370 with 4), but 4 when keys are pair-order tiles (kivi4 292 µs vs 440 with 8); smaller tiles 2."""
    if tile >= 64:
        return 4 if fast_k else 8
    return 2


def _pair_mode(q: torch.Tensor) -> int:
    """How `packed.pair_codes` turns codes into bf16/fp16: by the magic-number trick in inline PTX on the GPU
    (1 bf16, 2 fp16), by conversions in the interpreter and for fp32 (0)."""
    if not q.is_cuda:   # the interpreter runs on CPU tensors
        return 0
    return {torch.bfloat16: 1, torch.float16: 2}.get(q.dtype, 0)


def _prefetch_tiles(q: torch.Tensor, prefetch: int | None) -> int:
    """Tiles to prefetch: off in the interpreter (no inline PTX) and before sm_90 (no bulk prefetch)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return 0
    return PREFETCH if prefetch is None else prefetch


def rope_table(inv_freq: torch.Tensor, positions: int, device) -> torch.Tensor:
    """(positions // TS + 1, D) fp32: cos | sin of (TS·j)·inv_freq, the fp32 product as `ref.rope_at`
    rounds it. The decode kernel rotates by these plus a small in-kernel angle, so it never evaluates
    tl.cos/tl.sin on large arguments (their slow path costs more than the whole tile)."""
    pos = torch.arange(0, positions // TS + 1, device=device, dtype=torch.float32) * TS
    ang = pos[:, None] * inv_freq.to(device, torch.float32)[None, :]
    return torch.cat([ang.cos(), ang.sin()], 1).contiguous()


def table_positions(cap: int, sink: int, ring: int) -> int:
    """Largest position the decode kernel may rotate for a layer of `cap` packed slots."""
    return sink + cap + ring + TS


def quant_decode_attention(q, kq: dict, vq: dict, kf, vf, length, *, bits: int, group: int, vgroup: int,
                           sink: int, window: int, scale: float, inv_freq, rope_scaling: float = 1.0,
                           lut_k=None, lut_v=None, splits: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           rope_tab: torch.Tensor | None = None, use_dot: bool | None = None,
                           prerope: bool = True, prefetch: int | None = None,
                           max_regs: int | None = None, pipe: bool | None = None,
                           impl: str | None = None) -> torch.Tensor:
    """q (B, Hq, 1, D) post-RoPE; the packed cache of one layer (see `ref.quant_decode_attention`);
    length: (1,) int64 device tensor; rope_tab: `rope_table(inv_freq, table_positions(...))`, made
    here when not given (the cache keeps one); prerope=False: keys stored rotated (no RoPE here);
    prefetch: tiles of L2 prefetch ahead (None: `PREFETCH` where the GPU has it); max_regs: a register
    cap per thread for the launch (more programs resident per SM, at the price of spills); impl: "cuda"
    (`quant_cuda.decode_attention`, the default where `quant_cuda.supported`: KIVI's layout at 2/4 bits)
    or "triton". Keys with residual bits (`kres`) take the CUDA kernel where it reads them
    (`quant_cuda.RES_CUDA`), else the reference (the Triton kernel does not). Returns (B, Hq, 1, D) in q's dtype."""
    B, Hq, _, D = q.shape
    H = kf.shape[1]
    G = Hq // H

    def reference():
        return ref.quant_decode_attention(q, kq, vq, kf, vf, int(length.reshape(-1)[-1]), bits=bits, group=group,
                                          vgroup=vgroup, sink=sink, window=window, scale=scale,
                                          inv_freq=inv_freq, rope_scaling=rope_scaling, lut_k=lut_k, lut_v=lut_v,
                                          prerope=prerope)
    cuda = _use_triton(q) and impl != "triton" and qc.supported(q, kq, bits=bits, group=group, vgroup=vgroup,
                                                                 prerope=prerope, lut_k=lut_k, lut_v=lut_v, G=G)
    if not _use_triton(q) or ("res" in kq and not cuda):
        return reference()
    if cuda:
        try:
            return qc.decode_attention(q, kq, vq, kf, vf, length.reshape(-1)[-1:], bits=bits, group=group, sink=sink,
                                       window=window, scale=scale, splits=splits)
        except qc.Unavailable as e:   # the failure is remembered a layout; the warning shows once (same text)
            if impl == "cuda":
                raise
            if "res" in kq:            # the Triton kernel does not read the residual bits
                warnings.warn(f"{e}; the keys' residual bits decode in torch")
                return reference()
            warnings.warn(f"{e}; using the Triton kernel")
    kq = qc.expand_stats(kq)     # 8-bit key statistics: the Triton kernel reads fp16 rows
    cap = kq["planes"][0].shape[2]
    S = splits or num_splits(cap, B * H)
    part = torch.empty(B * H * (S + 1) * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * H * (S + 1) * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    pb = ref.PLANES[bits]
    n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
    ring = kf.shape[2] - sink
    use_dot = USE_DOT if use_dot is None else use_dot
    if rope_tab is None:
        rope_tab = rope_table(inv_freq, table_positions(cap, sink, ring), q.device)
    fast_k = not prerope and len(pb) == 1 and pb[0] <= 4 and n_out == 0 and lut_k is None   # the kernel's FAST_K
    _attn_kernel[(B * H, S + 1)](
        q.contiguous(), length.reshape(-1)[-1:], *planes(kq, True), kq["scale"], kq["zero"], *outs(kq),
        *planes(vq, True), vq["scale"], vq["zero"], *outs(vq), kf, vf, inv_freq.to(q.device, torch.float32),
        rope_tab, kf if lut_k is None else lut_k, kf if lut_v is None else lut_v, part, lse, scale, rope_scaling,
        HKV=H, G=G, BLOCK_G=max(16 if use_dot else 1, triton.next_power_of_2(G)), D=D, SPLITS=S, BLOCK_N=block_n or min(group, BLOCK_N),
        GROUP=group, VG=vgroup, PB0=pb[0], PB1=pb[1] if len(pb) > 1 else 0, N_OUT=n_out, SINK=sink,
        WINDOW=window, RING=ring, NQ_CAP=cap, NUQ_K=lut_k is not None, NUQ_V=lut_v is not None,
        BLOCK_F=32, TS=TS, USE_DOT=use_dot, PREROPE=prerope,
        PREFETCH=_prefetch_tiles(q, prefetch), PAIR=_pair_mode(q), PIPE=PIPE if pipe is None else pipe,
        num_warps=num_warps or NUM_WARPS or _default_warps(min(group, block_n or BLOCK_N), fast_k),
        **({} if num_stages is None else {"num_stages": num_stages}),
        **({} if (max_regs or MAX_REGS) is None or not q.is_cuda else {"maxnreg": max_regs or MAX_REGS}))
    _merge_kernel[(B * H * G,)](part, lse, out, G=G, SPLITS=S + 1, D=D, BLOCK_S=triton.next_power_of_2(S + 1))
    return out
