"""Writing the quantized KV cache on the GPU: one launch per decode step quantizes and packs.

`_append_flush_kernel` (one program per (batch, KV head)) writes the new token to the full-precision
ring and, when that token completes a group, quantizes + packs the group from the ring (keys per
channel, values per token; KIVI, Liu et al. 2024; KVQuant's dense-and-sparse outliers and
non-uniform codebooks, Hooper et al. 2024). The test is on the device, so the launch is the same at
every step (CUDA graph) and needs no host-side "is a group full" check; the other steps only write
the token (a group re-derived at every step cost 6.8 µs a layer, 0.2 ms a token on the 8B shape). For
layouts that keep keys after RoPE (kivi4/kivi2, Quest's packed storage) the key is rotated in the same
launch (`rope=`), and the caller's device count of tokens can be set here too (`count_out=`). Reading
the packed bytes back is `kernels/quant.py`; the torch reference is `kernels/quant_reference.py`.
"""
from __future__ import annotations

import os

import torch

from . import quant_reference as ref
from . import sparq_reference as sref
from .decode import _use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the references
    triton = None


if triton is not None:

    @triton.jit
    def _pack_store(code, P, rows, D: tl.constexpr, PB: tl.constexpr, SHIFT: tl.constexpr, NR: tl.constexpr,
                    C: tl.constexpr, c0):
        """code (NR, C) int32, channels c0..c0+C-1 of D: store its bits [SHIFT, SHIFT+PB) into a packed plane at
        `rows` (c0 a multiple of the codes a byte)."""
        VPW: tl.constexpr = 8 // PB
        part = (code >> SHIFT) & ((1 << PB) - 1)
        part = tl.reshape(part, (NR, C // VPW, VPW))
        sh = (tl.arange(0, VPW) * PB)[None, None, :]
        byte = tl.sum(part << sh, axis=2)
        col = c0 // VPW + tl.arange(0, C // VPW)
        tl.store(P + rows[:, None] * (D * PB // 8) + col[None, :], byte.to(tl.uint8))

    @triton.jit
    def _clip_search(x, BITS: tl.constexpr, IA: tl.constexpr):
        """x (tokens, C) fp32 → (lo, hi) (C,): `ref.clip_range` along the tokens, each end of a channel's [min, max]
        pulled in by 0, 0.05, ..., 0.5 of the range, the pair of least squared error (fp16 statistics as `_encode`
        stores them; ties keep the first, lo's fraction outer). Cheaper than 121 `_encode`s: x - zero once a lo,
        and a reciprocal of the scale a channel instead of a division an element. IA lower ends at a time (a power of
        two: 1 walks the 11 one by one; 16 takes them all as a tensor axis, five of them padding)."""
        top: tl.constexpr = (1 << BITS) - 1
        mn, mx = tl.min(x, 0), tl.max(x, 0)
        r = mx - mn
        best = tl.full(mn.shape, float("inf"), tl.float32)
        blo, bhi = mn, mx
        for ia0 in range(0, 11, IA):
            ia = ia0 + tl.arange(0, IA)
            lo = mn[None, :] + (ia.to(tl.float32)[:, None] * 0.05) * r[None, :]      # (IA, C)
            zero = lo.to(tl.float16).to(tl.float32)
            d = x[None, :, :] - zero[:, None, :]                                       # (IA, tokens, C)
            cbest = tl.full(lo.shape, float("inf"), tl.float32)
            chi = tl.zeros(lo.shape, tl.float32)
            for ib in range(11):
                hi = mx - (ib * 1.0 * 0.05) * r
                sc = (tl.maximum(hi[None, :] - zero, 1e-6) / top).to(tl.float16).to(tl.float32)
                inv = 1.0 / tl.maximum(sc, 1e-8)
                code = tl.minimum(tl.maximum(tl.floor(d * inv[:, None, :] + 0.5), 0.0), top * 1.0)
                e = code * sc[:, None, :] - d
                err = tl.sum(e * e, 1)
                m = err < cbest
                cbest = tl.where(m, err, cbest)
                chi = tl.where(m, hi[None, :], chi)
            cbest = tl.where((ia < 11)[:, None], cbest, float("inf"))
            k = tl.argmin(cbest, 0, tie_break_left=True)                               # the first of a tie
            sel = tl.arange(0, IA)[:, None] == k[None, :]
            kbest = tl.min(cbest, 0)
            m = kbest < best
            best = tl.where(m, kbest, best)
            blo = tl.where(m, tl.sum(tl.where(sel, lo, 0.0), 0), blo)
            bhi = tl.where(m, tl.sum(tl.where(sel, chi, 0.0), 0), bhi)
        return blo, bhi

    @triton.jit
    def _clip_kernel(X, LO, HI, GROUP: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                     IA: tl.constexpr):
        """Prefill: one (group, C channels) a program of X (N, GROUP, D) fp32 → LO, HI (N, D)."""
        n, j = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cs = j * C + tl.arange(0, C)
        x = tl.load(X + n * GROUP * D + tl.arange(0, GROUP)[:, None] * D + cs[None, :])
        lo, hi = _clip_search(x, BITS, IA)
        tl.store(LO + n * D + cs, lo)
        tl.store(HI + n * D + cs, hi)

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
                             MidK, MidV, Cnt, Cos, Sin, SK, SZ, CAPH, MG, KR, KG, RES: tl.constexpr,
                             FROM_SLOT: tl.constexpr,
                             HAS_CNT: tl.constexpr, ROPE: tl.constexpr, SKETCH: tl.constexpr,
                             D: tl.constexpr, GROUP: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr,
                             PB0: tl.constexpr, PB1: tl.constexpr, N_OUT: tl.constexpr, SINK: tl.constexpr,
                             WINDOW: tl.constexpr, RING: tl.constexpr, NQ_CAP: tl.constexpr,
                             NUQ_K: tl.constexpr, NUQ_V: tl.constexpr, CLIP: tl.constexpr = False,
                             NC: tl.constexpr = 1, IA: tl.constexpr = 1, KS8: tl.constexpr = False):
        bh, j = tl.program_id(0), tl.program_id(1)
        c = tl.arange(0, D)
        # NC > 1 (clipped ranges): program j quantizes key channels cs of the flushed group, program 0 also the values;
        # the token is written by program 0 alone unless the group may hold it (WINDOW 0)
        tl.static_assert(NC == 1 or (N_OUT == 0 and not RES and not SKETCH))
        CS: tl.constexpr = D // NC
        cs = j * CS + tl.arange(0, CS)
        length = tl.load(Len).to(tl.int32) + (1 if FROM_SLOT else 0)
        if HAS_CNT:                  # the caller's device count of tokens held, written here (no own launch)
            if (bh == 0) & (j == 0):
                tl.store(Cnt, length.to(tl.int64))
        p = length - 1
        slot = tl.where(p < SINK, p, SINK + (p - SINK) % RING)
        fb = bh.to(tl.int64) * (SINK + RING) * D
        kk = tl.load(K + bh * D + c)
        if ROPE:   # k arrives before RoPE: rotated here (x·cos + rotate_half(x)·sin, as models/rope.py)
            other = tl.load(K + bh * D + (c + D // 2) % D).to(tl.float32)
            rot = tl.where(c < D // 2, -other, other)
            kk = (kk.to(tl.float32) * tl.load(Cos + c).to(tl.float32)
                  + rot * tl.load(Sin + c).to(tl.float32)).to(KF.dtype.element_ty)
        if (j == 0) | (WINDOW == 0):
            tl.store(KF + fb + slot * D + c, kk)
            tl.store(VF + fb + slot * D + c, tl.load(V + bh * D + c))
        tl.debug_barrier()  # the group below may include the token just written (window = 0)
        ng = (length - SINK - WINDOW) // GROUP
        if (ng > 0) & (SINK + WINDOW + ng * GROUP == length):   # the group completed by this token
            gi = ng - 1
            t = tl.arange(0, GROUP)
            pos = SINK + gi * GROUP + t
            gsrc = fb + (SINK + (pos - SINK) % RING)[:, None] * D       # the group's rows in the fp ring
            rows = bh.to(tl.int64) * NQ_CAP + gi * GROUP + t
            # keys: per channel over the group's tokens (this program's channels cs)
            x = tl.load(KF + gsrc + cs[None, :]).to(tl.float32)
            if N_OUT > 0:
                mu = tl.sum(x, 0) / GROUP
                sd = tl.maximum(tl.sqrt(tl.sum((x - mu[None, :]) * (x - mu[None, :]), 0) / GROUP), 1e-6)
                score = tl.abs(x - mu[None, :]) / sd[None, :]
                for o in tl.static_range(N_OUT):
                    oi = tl.argmax(score, 1)
                    hit = c[None, :] == oi[:, None]
                    tl.store(KOI + rows * N_OUT + o, oi.to(tl.uint8))
                    tl.store(KOV + rows * N_OUT + o, tl.sum(tl.where(hit, x, 0.0), 1).to(tl.float16))
                    x = tl.where(hit, mu[None, :], x)
                    score = tl.where(hit, -1.0, score)
            klo, khi = tl.min(x, 0), tl.max(x, 0)
            if CLIP:     # MSE-clipped ranges (`ref.clip_range`)
                klo, khi = _clip_search(x, BITS, IA)
            srow = (bh.to(tl.int64) * (NQ_CAP // GROUP) + gi) * D
            if KS8:      # 8-bit statistics on the group's grid (`ref.stats8`; NC == 1: every channel here)
                top: tl.constexpr = (1 << BITS) - 1
                zlo = tl.min(klo, 0).to(tl.float16).to(tl.float32)
                zstep = tl.maximum((tl.max(klo, 0) - zlo) / 255, 6e-8).to(tl.float16).to(tl.float32)
                zc = tl.minimum(tl.maximum(tl.floor((klo - zlo) / zstep + 0.5), 0.0), 255.0)
                need = tl.maximum((khi - klo) / top, 1e-6)
                smax = tl.max(need, 0).to(tl.float16).to(tl.float32)
                e = tl.minimum(tl.maximum(tl.floor(-16.0 * tl.log2(need / smax) + 0.5), 0.0), 255.0)
                sc1 = (smax * tl.exp2(e * -0.0625)).to(tl.float16).to(tl.float32)
                zero1 = (zlo + zc * zstep).to(tl.float16).to(tl.float32)
                t8 = (x - zero1[None, :]) / tl.maximum(sc1, 1e-8)[None, :]
                code = tl.minimum(tl.maximum(tl.floor(t8 + 0.5), 0.0), top * 1.0).to(tl.int32)
                sc, zero = tl.broadcast_to(sc1[None, :], x.shape), tl.broadcast_to(zero1[None, :], x.shape)
                tl.store(KS + srow + cs, e.to(tl.uint8))
                tl.store(KZ + srow + cs, zc.to(tl.uint8))
                gw = tl.arange(0, 8)
                gv = tl.where(gw == 0, zlo, tl.where(gw == 1, zstep, tl.where(gw == 2, smax, 0.0)))
                tl.store(KG + (bh.to(tl.int64) * (NQ_CAP // GROUP) + gi) * 8 + gw, gv.to(tl.float16))
            else:
                code, sc, zero = _encode(x, klo[None, :], khi[None, :], MidK, BITS, NUQ_K)
                tl.store(KS + srow + cs, tl.max(sc, 0).to(tl.float16))
                tl.store(KZ + srow + cs, tl.max(zero, 0).to(tl.float16))
            _pack_store(code, KP0, rows, D, PB0, 0, GROUP, CS, j * CS)
            if PB1 > 0:
                _pack_store(code, KP1, rows, D, PB1, PB0, GROUP, CS, j * CS)
            if RES:      # the keys' residual bits (`ref.quantize_keys(res=True)`): at or above the level, each
                r = (x >= code.to(tl.float32) * sc + zero).to(tl.int32)    # 32 channels in `ref.pack_res`'s order
                r = tl.reshape(tl.permute(tl.reshape(r, (GROUP, D // 32, 4, 2, 4)), (0, 1, 3, 2, 4)), (GROUP, D))
                _pack_store(r, KR, rows, D, 1, 0, GROUP, D, 0)
            if SKETCH:   # the channel-major copy (`sref.sketch_groups`): byte m of channel c = tokens 2m | 2m + 1
                pair = tl.reshape(code, (GROUP // 2, 2, D))
                byte = tl.sum(pair << (tl.arange(0, 2) * 4)[None, :, None], axis=1)          # (GROUP/2, D)
                m = tl.arange(0, GROUP // 2)
                tl.store(SK + (bh.to(tl.int64) * D + c[None, :]) * CAPH + gi * (GROUP // 2) + m[:, None],
                         byte.to(tl.uint8))
                o = ((bh.to(tl.int64) * D + c) * MG + gi) * 2
                tl.store(SZ + o, tl.max(sc, 0).to(tl.float16))
                tl.store(SZ + o + 1, tl.max(zero, 0).to(tl.float16))
            if j == 0:   # values: per token over VG-channel groups
                vx = tl.load(VF + gsrc + c[None, :]).to(tl.float32)
                NVG: tl.constexpr = D // VG
                if N_OUT > 0:
                    vx3 = tl.reshape(vx, (GROUP, NVG, VG))
                    vmu3 = tl.sum(vx3, 2) / VG
                    vd3 = vx3 - vmu3[:, :, None]
                    vsd3 = tl.maximum(tl.sqrt(tl.sum(vd3 * vd3, 2) / VG), 1e-6)
                    vmu = tl.reshape(tl.broadcast_to(vmu3[:, :, None], (GROUP, NVG, VG)), (GROUP, D))
                    vsd = tl.reshape(tl.broadcast_to(vsd3[:, :, None], (GROUP, NVG, VG)), (GROUP, D))
                    vscore = tl.abs(vx - vmu) / vsd
                    for o in tl.static_range(N_OUT):
                        voi = tl.argmax(vscore, 1)
                        vhit = c[None, :] == voi[:, None]
                        tl.store(VOI + rows * N_OUT + o, voi.to(tl.uint8))
                        tl.store(VOV + rows * N_OUT + o, tl.sum(tl.where(vhit, vx, 0.0), 1).to(tl.float16))
                        vx = tl.where(vhit, vmu, vx)
                        vscore = tl.where(vhit, -1.0, vscore)
                vx3 = tl.reshape(vx, (GROUP, NVG, VG))
                vlo = tl.broadcast_to(tl.min(vx3, 2)[:, :, None], (GROUP, NVG, VG))
                vhi = tl.broadcast_to(tl.max(vx3, 2)[:, :, None], (GROUP, NVG, VG))
                vcode3, vsc3, vzero3 = _encode(vx3, vlo, vhi, MidV, BITS, NUQ_V)
                vrow = rows[:, None] * NVG + tl.arange(0, NVG)[None, :]
                tl.store(VS + vrow, tl.max(vsc3, 2).to(tl.float16))
                tl.store(VZ + vrow, tl.max(vzero3, 2).to(tl.float16))
                vcode = tl.reshape(vcode3, (GROUP, D))
                _pack_store(vcode, VP0, rows, D, PB0, 0, GROUP, D, 0)
                if PB1 > 0:
                    _pack_store(vcode, VP1, rows, D, PB1, PB0, GROUP, D, 0)


CLIP_C = 16     # clipped key ranges: channels a program searches (the decode flush's D / CLIP_C programs a head)
# lower ends searched at a time (`_clip_search`): 1 (one warp a program) is what session 41 measured (kv2:clip=1 at
# 128K 0.642x of full where kv2 is 0.634x: ~46 us a layer at each flush, one step in 16); 16 (four warps) takes all 11
# as a tensor axis, 11 dependent rounds instead of 121: built, not yet timed on a GPU. LONGKV_CLIP_IA sets it; groups
# longer than 64 tokens always walk them one by one (IA x group x CLIP_C values would not fit a program's registers).
CLIP_IA = int(os.environ.get("LONGKV_CLIP_IA", 1))


def _ia(group: int) -> int:
    return CLIP_IA if group <= 64 else 1


def clip_range(x: torch.Tensor, bits: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ref.clip_range` (x's groups along `axis`, keepdim), by `_clip_kernel` on a GPU: the prefill's key groups
    searched a (group, CLIP_C channels) a program, where the torch loop is 121 rounds of launches over the chunk."""
    if not (_use_triton(x) and x.is_cuda and axis == x.dim() - 2 and x.shape[-1] % CLIP_C == 0):
        return ref.clip_range(x, bits, axis)
    return _clip_triton(x, bits)


def _clip_triton(x: torch.Tensor, bits: int, ia: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip_range` along x's last-but-one axis by `_clip_kernel` (also on CPU in Triton's interpreter: tests); ia:
    lower ends at a time (None: CLIP_IA)."""
    G, D = x.shape[-2], x.shape[-1]
    ia = ia or _ia(G)
    xs = x.float().reshape(-1, G, D).contiguous()
    lo, hi = torch.empty(xs.shape[0], D, device=x.device), torch.empty(xs.shape[0], D, device=x.device)
    if xs.shape[0]:
        _clip_kernel[(xs.shape[0], D // CLIP_C)](xs, lo, hi, GROUP=G, D=D, C=CLIP_C, BITS=bits, IA=ia,
                                                 num_warps=1 if ia == 1 else 4)
    shape = x.shape[:-2] + (1, D)
    return lo.reshape(shape), hi.reshape(shape)


def planes(d: dict, words: bool = False):
    """The two code-plane arguments of a packed kernel (the second repeats the first when there is one
    plane); words=True: viewed as int32 words, as the decode kernel reads them."""
    p = [x.view(torch.int32) for x in d["planes"]] if words else d["planes"]
    return p[0], p[1] if len(p) > 1 else p[0]


def outs(d: dict):
    """The outlier index/value arguments of a packed kernel (placeholders when there are none)."""
    return (d["out_idx"], d["out_val"]) if "out_idx" in d else (d["scale"], d["scale"])


def append_flush(k, v, length, kf, vf, kq: dict, vq: dict, *, bits: int, group: int, vgroup: int,
                 sink: int, window: int, lut_k=None, lut_v=None, from_slot: bool = False,
                 count_out: torch.Tensor | None = None, rope=None, sketch=None, clip: bool = False) -> None:
    """Decode-time write + flush. k, v (B, Hkv, 1, D) pre-RoPE; length: (1,) int64 device tensor
    (tokens held after this one; with from_slot, the token's slot = length - 1). Writes the token to its
    fp slot and quantizes the group this token completes, if any; count_out (1,) int64, if given, is
    set to the length; rope (cos, sin), each (1, D), if given: k is rotated first, in the same launch
    (keys stored after RoPE); sketch (sk, sz), if given (4-bit keys without outliers): the flushed group is
    also written to that channel-major copy (`sref.sketch_groups`, SparQ scoring in `quest_sparq.py`). A key dict
    with `res` (`kres=1`) gets the flushed group's residual bits too; clip: the keys' group ranges MSE-clipped
    (`ref.clip_range`).
    Reference: the same steps with `ref.quantize_keys` / `ref.quantize_tokens`."""
    B, H, _, D = k.shape
    ring = kf.shape[2] - sink
    if clip and ("out_idx" in kq or lut_k is not None or "res" in kq):
        raise ValueError("clipped key ranges are for uniform codes without outliers or residual bits")
    if sketch is not None and (bits != 4 or "out_idx" in kq or lut_k is not None):
        raise ValueError("the channel-major key copy (sketch) needs 4-bit uniform keys without outliers")
    res = "res" in kq              # the keys' residual bits (`kres`)
    ks8 = "grid" in kq             # 8-bit key statistics (`kstat=8`)
    if ks8 and (clip or res or "out_idx" in kq or lut_k is not None or sketch is not None):
        raise ValueError("8-bit key statistics are for uniform codes without outliers, residual bits, clipping "
                         "or a channel-major copy")
    if rope is not None and not _use_triton(k):
        from ..models.rope import apply_rope
        k, rope = apply_rope(k, *rope).to(k.dtype), None
    if not _use_triton(k):
        n = int(length) + int(from_slot)
        if count_out is not None:
            count_out.fill_(n)
        p = n - 1
        slot = p if p < sink else sink + (p - sink) % ring
        kf[:, :, slot], vf[:, :, slot] = k[:, :, 0], v[:, :, 0]
        ng = max(0, (n - sink - window) // group)
        if ng and sink + window + ng * group == n:
            pos = torch.arange(sink + (ng - 1) * group, sink + ng * group)
            sl = sink + (pos - sink) % ring
            n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
            a = ref.quantize_keys(kf[:, :, sl], bits=bits, group=group, n_out=n_out, lut=lut_k, res=res, clip=clip,
                                  kstat=8 if ks8 else 16)
            b = ref.quantize_tokens(vf[:, :, sl], bits=bits, vgroup=vgroup, n_out=n_out, lut=lut_v)
            lo = (ng - 1) * group
            for dst, src, rows in ((kq, a, slice(ng - 1, ng)), (vq, b, slice(lo, lo + group))):
                for x, y in zip(dst["planes"], src["planes"]):
                    x[:, :, lo:lo + group] = y
                dst["scale"][:, :, rows], dst["zero"][:, :, rows] = src["scale"], src["zero"]
                if "grid" in src:
                    dst["grid"][:, :, rows] = src["grid"]
                for key in ("out_idx", "out_val", "res"):
                    if key in src:
                        dst[key][:, :, lo:lo + group] = src[key]
            if sketch is not None:
                sref.sketch_groups(kq["planes"], kq["scale"], kq["zero"], *sketch, ng - 1, ng, group=group)
        return
    pb = ref.PLANES[bits]
    n_out = kq["out_idx"].shape[-1] if "out_idx" in kq else 0
    dummy = kf
    mid_k = None if lut_k is None else (lut_k[1:] + lut_k[:-1]) / 2   # nearest level = count of midpoints below
    mid_v = None if lut_v is None else (lut_v[1:] + lut_v[:-1]) / 2
    nc, ia = (D // CLIP_C, _ia(group)) if clip else (1, 1)
    _append_flush_kernel[(B * H, nc)](
        k.contiguous(), v.contiguous(), length.reshape(-1)[-1:], kf, vf, *planes(kq), kq["scale"], kq["zero"],
        *outs(kq), *planes(vq), vq["scale"], vq["zero"], *outs(vq),
        dummy if mid_k is None else mid_k, dummy if mid_v is None else mid_v,
        length if count_out is None else count_out, *((kf, kf) if rope is None else (r.reshape(-1) for r in rope)),
        *((kf, kf, 0, 0) if sketch is None else (sketch[0], sketch[1], sketch[0].shape[-1], sketch[1].shape[3])),
        kq["res"] if res else dummy, kq["grid"] if ks8 else dummy, RES=res, FROM_SLOT=from_slot,
        HAS_CNT=count_out is not None, ROPE=rope is not None, SKETCH=sketch is not None,
        D=D, GROUP=group, VG=vgroup, BITS=bits, PB0=pb[0], PB1=pb[1] if len(pb) > 1 else 0, N_OUT=n_out,
        SINK=sink, WINDOW=window, RING=ring, NQ_CAP=kq["planes"][0].shape[2], NUQ_K=mid_k is not None,
        NUQ_V=mid_v is not None, CLIP=bool(clip), NC=nc, IA=ia, KS8=ks8,
        **({"num_warps": 1 if ia == 1 else 4} if nc > 1 else {}))
