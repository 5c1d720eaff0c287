"""Triton kernels for the quantized KV cache (`cache/quant.py`): decode straight from packed bytes.

Why: every quantized cache people use (transformers' QuantizedCache, KIVI's code) unpacks to fp16
before attention, so it is smaller but slower. Decode is bound by the bytes read per token; these
kernels read 2/3/4/8-bit codes and fp16 scales only, dequantize in registers, rotate the pre-RoPE
keys on the fly (KVQuant, Hooper et al. 2024, App. R) and never write a dequantized copy.

- `_append_flush_kernel` (one program per (batch, KV head)): writes the new token to the
  full-precision ring, then re-derives the most recently completed group from the ring and
  quantizes + packs it (keys per channel, values per token; KIVI, Liu et al. 2024), outliers and
  non-uniform codebooks included. Re-deriving the same group every step is idempotent, so the
  launch is the same at every step (CUDA graph) and needs no host-side "is a group full" test.
- `_attn_kernel` (flash-decoding, grid (batch·KV heads, splits + 1)): splits 0..S-1 cover the
  quantized region, split S the full-precision sink + ring; each program reads one KV head once for
  its whole query group (GQA) and writes a partial output + log-sum-exp; `decode._merge_kernel`
  merges them. The length comes from a device tensor.

RoPE inside a tile uses angle addition: cos/sin of (n0 + i)·f from cos/sin(n0·f) (h per tile) and a
per-program table of i·f (BLOCK_N × h once), so the SFU does O(h) work per tile instead of O(BLOCK_N·h).

References: `kernels/quant_reference.py`. Without a GPU the wrappers use the references unless
`TRITON_INTERPRET=1` (the tests) forces the Triton path.
"""
from __future__ import annotations

import torch

from . import quant_reference as ref
from .decode import _use_triton, num_splits

try:
    import triton
    import triton.language as tl
    from .decode import _merge_kernel
except ImportError:  # CPU installs without triton use the references
    triton = None


if triton is not None:

    @triton.jit
    def _codes(P0, P1, rows, c, RB0: tl.constexpr, RB1: tl.constexpr, PB0: tl.constexpr,
               PB1: tl.constexpr):
        """Codes (len(rows), len(c)) int32 from one or two packed uint8 planes (see `ref.pack`)."""
        b0 = tl.load(P0 + rows[:, None] * RB0 + (c // (8 // PB0))[None, :]).to(tl.int32)
        code = (b0 >> ((c % (8 // PB0)) * PB0)[None, :]) & ((1 << PB0) - 1)
        if PB1 > 0:
            b1 = tl.load(P1 + rows[:, None] * RB1 + (c // (8 // PB1))[None, :]).to(tl.int32)
            code = code | (((b1 >> ((c % (8 // PB1)) * PB1)[None, :]) & ((1 << PB1) - 1)) << PB0)
        return code

    @triton.jit
    def _level(code, Lut, NUQ: tl.constexpr):
        if NUQ:
            return tl.load(Lut + code)
        return code.to(tl.float32)

    @triton.jit
    def _outl(x, OI, OV, rows, c, N_OUT: tl.constexpr):
        for j in tl.static_range(N_OUT):
            oi = tl.load(OI + rows * N_OUT + j).to(tl.int32)
            ov = tl.load(OV + rows * N_OUT + j).to(tl.float32)
            x = tl.where(c[None, :] == oi[:, None], ov[:, None], x)
        return x

    @triton.jit
    def _update(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, ok, m, l, acc_lo, acc_hi, scale):
        """Online-softmax step over one tile of post-RoPE keys / values (fp32 tiles)."""
        dt = q_lo.dtype
        s = tl.dot(q_lo, tl.trans(k_lo.to(dt))).to(tl.float32) + tl.dot(q_hi, tl.trans(k_hi.to(dt))).to(tl.float32)
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc_lo = acc_lo * alpha[:, None] + tl.dot(p.to(dt), v_lo.to(dt)).to(tl.float32)
        acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(dt), v_hi.to(dt)).to(tl.float32)
        return m_new, l, acc_lo, acc_hi

    @triton.jit
    def _attn_kernel(Q, Len, KP0, KP1, KS, KZ, KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV, KF, VF, Freq,
                     LutK, LutV, Out, Lse, scale, rope_scaling,
                     HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                     SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, VG: tl.constexpr,
                     PB0: tl.constexpr, PB1: tl.constexpr, N_OUT: tl.constexpr, SINK: tl.constexpr,
                     WINDOW: tl.constexpr, RING: tl.constexpr, NQ_CAP: tl.constexpr,
                     NUQ_K: tl.constexpr, NUQ_V: tl.constexpr, BLOCK_F: tl.constexpr,
                     DIRECT_ROPE: tl.constexpr = False):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        h: tl.constexpr = D // 2
        RB0: tl.constexpr = D * PB0 // 8
        RB1: tl.constexpr = D * PB1 // 8
        NVG: tl.constexpr = D // VG
        length = tl.load(Len).to(tl.int32)
        # groups flushed *before* this token arrived: the group this step flushes is still read from
        # the ring, exactly as chunked prefill sees it (flush after attention)
        nq = GROUP * tl.maximum((length - 1 - SINK - WINDOW) // GROUP, 0)
        g = tl.arange(0, BLOCK_G)
        c_lo = tl.arange(0, h)
        c_hi = h + c_lo
        gm = g[:, None] < G
        qrow = Q + (bh * G + g[:, None]) * D
        q_lo = tl.load(qrow + c_lo[None, :], mask=gm, other=0.0)
        q_hi = tl.load(qrow + c_hi[None, :], mask=gm, other=0.0)
        f = tl.load(Freq + c_lo)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc_lo = tl.zeros([BLOCK_G, h], tl.float32)
        acc_hi = tl.zeros([BLOCK_G, h], tl.float32)
        if split < SPLITS:  # the packed region: buffer index i <-> position SINK + i
            i = tl.arange(0, BLOCK_N)
            ang = i.to(tl.float32)[:, None] * f[None, :]
            ci, si = tl.cos(ang), tl.sin(ang)
            per = tl.cdiv(tl.cdiv(nq, SPLITS), BLOCK_N) * BLOCK_N
            start = split * per
            end = tl.minimum(start + per, nq)
            hq = bh.to(tl.int64) * NQ_CAP
            for n0 in range(start, end, BLOCK_N):
                rows = hq + n0 + i
                ok = n0 + i < end
                rows = tl.where(ok, rows, hq)
                srow = (bh.to(tl.int64) * (NQ_CAP // GROUP) + n0 // GROUP) * D
                k_lo = _level(_codes(KP0, KP1, rows, c_lo, RB0, RB1, PB0, PB1), LutK, NUQ_K)
                k_hi = _level(_codes(KP0, KP1, rows, c_hi, RB0, RB1, PB0, PB1), LutK, NUQ_K)
                k_lo = k_lo * tl.load(KS + srow + c_lo).to(tl.float32)[None, :] + tl.load(KZ + srow + c_lo).to(tl.float32)[None, :]
                k_hi = k_hi * tl.load(KS + srow + c_hi).to(tl.float32)[None, :] + tl.load(KZ + srow + c_hi).to(tl.float32)[None, :]
                k_lo = _outl(k_lo, KOI, KOV, rows, c_lo, N_OUT)
                k_hi = _outl(k_hi, KOI, KOV, rows, c_hi, N_OUT)
                if DIRECT_ROPE:  # fewer live registers, more SFU work
                    angd = (SINK + n0 + i).to(tl.float32)[:, None] * f[None, :]
                    cos = tl.cos(angd) * rope_scaling
                    sin = tl.sin(angd) * rope_scaling
                else:
                    a0 = ((SINK + n0) * 1.0) * f
                    c0, s0 = tl.cos(a0)[None, :], tl.sin(a0)[None, :]
                    cos = (c0 * ci - s0 * si) * rope_scaling
                    sin = (s0 * ci + c0 * si) * rope_scaling
                r_lo = k_lo * cos - k_hi * sin
                r_hi = k_hi * cos + k_lo * sin
                vrow = rows[:, None] * NVG
                v_lo = _level(_codes(VP0, VP1, rows, c_lo, RB0, RB1, PB0, PB1), LutV, NUQ_V)
                v_hi = _level(_codes(VP0, VP1, rows, c_hi, RB0, RB1, PB0, PB1), LutV, NUQ_V)
                v_lo = v_lo * tl.load(VS + vrow + (c_lo // VG)[None, :]).to(tl.float32) + tl.load(VZ + vrow + (c_lo // VG)[None, :]).to(tl.float32)
                v_hi = v_hi * tl.load(VS + vrow + (c_hi // VG)[None, :]).to(tl.float32) + tl.load(VZ + vrow + (c_hi // VG)[None, :]).to(tl.float32)
                v_lo = _outl(v_lo, VOI, VOV, rows, c_lo, N_OUT)
                v_hi = _outl(v_hi, VOI, VOV, rows, c_hi, N_OUT)
                m, l, acc_lo, acc_hi = _update(q_lo, q_hi, r_lo, r_hi, v_lo, v_hi, ok, m, l, acc_lo, acc_hi, scale)
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
                k_lo = tl.load(KF + ptr + c_lo[None, :]).to(tl.float32)
                k_hi = tl.load(KF + ptr + c_hi[None, :]).to(tl.float32)
                ang = pos.to(tl.float32)[:, None] * f[None, :]
                cos, sin = tl.cos(ang) * rope_scaling, tl.sin(ang) * rope_scaling
                r_lo = k_lo * cos - k_hi * sin
                r_hi = k_hi * cos + k_lo * sin
                v_lo = tl.load(VF + ptr + c_lo[None, :]).to(tl.float32)
                v_hi = tl.load(VF + ptr + c_hi[None, :]).to(tl.float32)
                m, l, acc_lo, acc_hi = _update(q_lo, q_hi, r_lo, r_hi, v_lo, v_hi, ok, m, l, acc_lo, acc_hi, scale)
        row = (bh * (SPLITS + 1) + split) * G + g
        tl.store(Lse + row, tl.where(l > 0, m + tl.log(l), float("-inf")), mask=g < G)
        den = tl.where(l > 0, l, 1.0)[:, None]
        tl.store(Out + row[:, None] * D + c_lo[None, :], acc_lo / den, mask=gm)
        tl.store(Out + row[:, None] * D + c_hi[None, :], acc_hi / den, mask=gm)

    @triton.jit
    def _pack_store(code, P, rows, D: tl.constexpr, PB: tl.constexpr, SHIFT: tl.constexpr, NR: tl.constexpr):
        """code (NR, D) int32: store its bits [SHIFT, SHIFT+PB) as a packed plane at `rows`."""
        VPW: tl.constexpr = 8 // PB
        part = (code >> SHIFT) & ((1 << PB) - 1)
        part = tl.reshape(part, (NR, D // VPW, VPW))
        sh = (tl.arange(0, VPW) * PB)[None, None, :]
        byte = tl.sum(part << sh, axis=2)
        col = tl.arange(0, D // VPW)
        tl.store(P + rows[:, None] * (D * PB // 8) + col[None, :], byte.to(tl.uint8))

    @triton.jit
    def _encode(x, lo, hi, Mid, BITS: tl.constexpr, NUQ: tl.constexpr):
        """Codes for x with per-element range [lo, hi] (fp32, broadcast); fp16-rounded stats as in
        `ref._encode`. Returns (codes int32, scale fp32, zero fp32)."""
        top: tl.constexpr = (1 << BITS) - 1
        zero = lo.to(tl.float16).to(tl.float32)
        rng = tl.maximum(hi - zero, 1e-6)
        if NUQ:
            sc = rng.to(tl.float16).to(tl.float32)
        else:
            sc = (rng / top).to(tl.float16).to(tl.float32)
        t = (x - zero) / tl.maximum(sc, 1e-8)
        if NUQ:
            code = tl.zeros(x.shape, tl.int32)
            for j in tl.static_range(top):
                code += (t > tl.load(Mid + j)).to(tl.int32)
        else:
            code = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), top * 1.0).to(tl.int32)
        return code, sc, zero

    @triton.jit
    def _append_flush_kernel(K, V, Len, KF, VF, KP0, KP1, KS, KZ, KOI, KOV, VP0, VP1, VS, VZ, VOI, VOV,
                             MidK, MidV,
                             D: tl.constexpr, GROUP: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr,
                             PB0: tl.constexpr, PB1: tl.constexpr, N_OUT: tl.constexpr, SINK: tl.constexpr,
                             WINDOW: tl.constexpr, RING: tl.constexpr, NQ_CAP: tl.constexpr,
                             NUQ_K: tl.constexpr, NUQ_V: tl.constexpr):
        bh = tl.program_id(0)
        c = tl.arange(0, D)
        length = tl.load(Len).to(tl.int32)
        p = length - 1
        slot = tl.where(p < SINK, p, SINK + (p - SINK) % RING)
        fb = bh.to(tl.int64) * (SINK + RING) * D
        tl.store(KF + fb + slot * D + c, tl.load(K + bh * D + c))
        tl.store(VF + fb + slot * D + c, tl.load(V + bh * D + c))
        tl.debug_barrier()  # the group below may include the token just written (window = 0)
        ng = (length - SINK - WINDOW) // GROUP
        if ng > 0:
            gi = ng - 1
            t = tl.arange(0, GROUP)
            pos = SINK + gi * GROUP + t
            src = fb + (SINK + (pos - SINK) % RING)[:, None] * D + c[None, :]
            rows = bh.to(tl.int64) * NQ_CAP + gi * GROUP + t
            # keys: per channel over the group's tokens
            x = tl.load(KF + src).to(tl.float32)
            if N_OUT > 0:
                mu = tl.sum(x, 0) / GROUP
                sd = tl.maximum(tl.sqrt(tl.sum((x - mu[None, :]) * (x - mu[None, :]), 0) / GROUP), 1e-6)
                score = tl.abs(x - mu[None, :]) / sd[None, :]
                for j in tl.static_range(N_OUT):
                    oi = tl.argmax(score, 1)
                    hit = c[None, :] == oi[:, None]
                    tl.store(KOI + rows * N_OUT + j, oi.to(tl.uint8))
                    tl.store(KOV + rows * N_OUT + j, tl.sum(tl.where(hit, x, 0.0), 1).to(tl.float16))
                    x = tl.where(hit, mu[None, :], x)
                    score = tl.where(hit, -1.0, score)
            code, sc, zero = _encode(x, tl.min(x, 0)[None, :], tl.max(x, 0)[None, :], MidK, BITS, NUQ_K)
            srow = (bh.to(tl.int64) * (NQ_CAP // GROUP) + gi) * D
            tl.store(KS + srow + c, tl.max(sc, 0).to(tl.float16))
            tl.store(KZ + srow + c, tl.max(zero, 0).to(tl.float16))
            _pack_store(code, KP0, rows, D, PB0, 0, GROUP)
            if PB1 > 0:
                _pack_store(code, KP1, rows, D, PB1, PB0, GROUP)
            # values: per token over VG-channel groups
            x = tl.load(VF + src).to(tl.float32)
            NVG: tl.constexpr = D // VG
            if N_OUT > 0:
                x3 = tl.reshape(x, (GROUP, NVG, VG))
                mu3 = tl.sum(x3, 2) / VG
                d3 = x3 - mu3[:, :, None]
                sd3 = tl.maximum(tl.sqrt(tl.sum(d3 * d3, 2) / VG), 1e-6)
                mu = tl.reshape(tl.broadcast_to(mu3[:, :, None], (GROUP, NVG, VG)), (GROUP, D))
                sd = tl.reshape(tl.broadcast_to(sd3[:, :, None], (GROUP, NVG, VG)), (GROUP, D))
                score = tl.abs(x - mu) / sd
                for j in tl.static_range(N_OUT):
                    oi = tl.argmax(score, 1)
                    hit = c[None, :] == oi[:, None]
                    tl.store(VOI + rows * N_OUT + j, oi.to(tl.uint8))
                    tl.store(VOV + rows * N_OUT + j, tl.sum(tl.where(hit, x, 0.0), 1).to(tl.float16))
                    x = tl.where(hit, mu, x)
                    score = tl.where(hit, -1.0, score)
            x3 = tl.reshape(x, (GROUP, NVG, VG))
            lo = tl.broadcast_to(tl.min(x3, 2)[:, :, None], (GROUP, NVG, VG))
            hi = tl.broadcast_to(tl.max(x3, 2)[:, :, None], (GROUP, NVG, VG))
            code3, sc3, zero3 = _encode(x3, lo, hi, MidV, BITS, NUQ_V)
            vrow = rows[:, None] * NVG + tl.arange(0, NVG)[None, :]
            tl.store(VS + vrow, tl.max(sc3, 2).to(tl.float16))
            tl.store(VZ + vrow, tl.max(zero3, 2).to(tl.float16))
            code = tl.reshape(code3, (GROUP, D))
            _pack_store(code, VP0, rows, D, PB0, 0, GROUP)
            if PB1 > 0:
                _pack_store(code, VP1, rows, D, PB1, PB0, GROUP)


def _planes(d: dict):
    p = d["planes"]
    return p[0], p[1] if len(p) > 1 else p[0]


def _outs(d: dict):
    return (d["out_idx"], d["out_val"]) if "out_idx" in d else (d["scale"], d["scale"])


def append_flush(k, v, length, kf, vf, kq: dict, vq: dict, *, bits: int, group: int, vgroup: int,
                 sink: int, window: int, lut_k=None, lut_v=None) -> None:
    """Decode-time write + flush. k, v (B, Hkv, 1, D) pre-RoPE; length: (1,) int64 device tensor
    (tokens held after this one). Writes the token to its fp slot and (re)quantizes the last
    completed group. Reference: the same steps with `ref.quantize_keys` / `ref.quantize_tokens`."""
    B, H, _, D = k.shape
    ring = kf.shape[2] - sink
    if not _use_triton(k):
        n = int(length)
        p = n - 1
        slot = p if p < sink else sink + (p - sink) % ring
        kf[:, :, slot], vf[:, :, slot] = k[:, :, 0], v[:, :, 0]
        ng = max(0, (n - sink - window) // group)
        if ng:
            pos = torch.arange(sink + (ng - 1) * group, sink + ng * group)
            sl = sink + (pos - sink) % ring
            n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
            a = ref.quantize_keys(kf[:, :, sl], bits=bits, group=group, n_out=n_out, lut=lut_k)
            b = ref.quantize_tokens(vf[:, :, sl], bits=bits, vgroup=vgroup, n_out=n_out, lut=lut_v)
            lo = (ng - 1) * group
            for dst, src, rows in ((kq, a, slice(ng - 1, ng)), (vq, b, slice(lo, lo + group))):
                for x, y in zip(dst["planes"], src["planes"]):
                    x[:, :, lo:lo + group] = y
                dst["scale"][:, :, rows], dst["zero"][:, :, rows] = src["scale"], src["zero"]
                for key in ("out_idx", "out_val"):
                    if key in src:
                        dst[key][:, :, lo:lo + group] = src[key]
        return
    pb = ref.PLANES[bits]
    n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
    dummy = kf
    mid_k = None if lut_k is None else (lut_k[1:] + lut_k[:-1]) / 2   # nearest level = count of midpoints below
    mid_v = None if lut_v is None else (lut_v[1:] + lut_v[:-1]) / 2
    _append_flush_kernel[(B * H,)](
        k.contiguous(), v.contiguous(), length.reshape(-1)[-1:], kf, vf, *_planes(kq), kq["scale"], kq["zero"],
        *_outs(kq), *_planes(vq), vq["scale"], vq["zero"], *_outs(vq),
        dummy if mid_k is None else mid_k, dummy if mid_v is None else mid_v,
        D=D, GROUP=group, VG=vgroup, BITS=bits, PB0=pb[0], PB1=pb[1] if len(pb) > 1 else 0, N_OUT=n_out,
        SINK=sink, WINDOW=window, RING=ring, NQ_CAP=kq["planes"][0].shape[2], NUQ_K=mid_k is not None,
        NUQ_V=mid_v is not None)


def quant_decode_attention(q, kq: dict, vq: dict, kf, vf, length, *, bits: int, group: int, vgroup: int,
                           sink: int, window: int, scale: float, inv_freq, rope_scaling: float = 1.0,
                           lut_k=None, lut_v=None, splits: int | None = None, block_n: int | None = None,
                           num_warps: int = 2, num_stages: int | None = None,
                           direct_rope: bool = False) -> torch.Tensor:
    """q (B, Hq, 1, D) post-RoPE; the packed cache of one layer (see `ref.quant_decode_attention`);
    length: (1,) int64 device tensor. Returns (B, Hq, 1, D) in q's dtype."""
    if not _use_triton(q):
        return ref.quant_decode_attention(q, kq, vq, kf, vf, int(length.reshape(-1)[-1]), bits=bits, group=group,
                                          vgroup=vgroup, sink=sink, window=window, scale=scale,
                                          inv_freq=inv_freq, rope_scaling=rope_scaling, lut_k=lut_k, lut_v=lut_v)
    B, Hq, _, D = q.shape
    H = kf.shape[1]
    G = Hq // H
    cap = kq["planes"][0].shape[2]
    S = splits or num_splits(cap, B * H)
    part = torch.empty(B * H * (S + 1) * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * H * (S + 1) * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    pb = ref.PLANES[bits]
    n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
    ring = kf.shape[2] - sink
    _attn_kernel[(B * H, S + 1)](
        q.contiguous(), length.reshape(-1)[-1:], *_planes(kq), kq["scale"], kq["zero"], *_outs(kq),
        *_planes(vq), vq["scale"], vq["zero"], *_outs(vq), kf, vf, inv_freq.to(q.device, torch.float32),
        kf if lut_k is None else lut_k, kf if lut_v is None else lut_v, part, lse, scale, rope_scaling,
        HKV=H, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, SPLITS=S, BLOCK_N=block_n or min(group, 16),
        GROUP=group, VG=vgroup, PB0=pb[0], PB1=pb[1] if len(pb) > 1 else 0, N_OUT=n_out, SINK=sink,
        WINDOW=window, RING=ring, NQ_CAP=cap, NUQ_K=lut_k is not None, NUQ_V=lut_v is not None,
        BLOCK_F=32, DIRECT_ROPE=direct_rope, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    _merge_kernel[(B * H * G,)](part, lse, out, G=G, SPLITS=S + 1, D=D, BLOCK_S=triton.next_power_of_2(S + 1))
    return out
