"""Plain-torch references for the quantized KV cache: quantize, pack, dequantize, decode attention.

The ground truth for `kernels/quant.py` (Triton) and the CPU path of `cache/quant.py`.

Schemes (one vocabulary: a *group* shares one scale and one zero point):
- keys per channel, statistics over `group` consecutive tokens (KIVI, Liu et al. 2024; KVQuant,
  Hooper et al. 2024 §3.1): key outliers live in fixed channels, so a per-channel range absorbs them;
- values per token, statistics over `vgroup` consecutive channels (KIVI §3.3);
- asymmetric min/max: x ≈ zero + level(code) · scale, level(code) = code for uniform levels, or a
  per-layer codebook value in [0, 1] for non-uniform levels (KVQuant's nuq, §3.3);
- dense-and-sparse (KVQuant §3.4): the `n_out` elements of each token that most stretch their
  group's range are kept exactly (fp16 value + uint8 channel index) and left out of min/max;
- optional Hadamard rotation of keys (QuaRot, Ashkboos et al. 2024) before quantizing.

Packing: codes of `bits` bits are stored in uint8 *planes*, consecutive channels sharing a byte
(channel c of a `pb`-bit plane lives in byte c // (8/pb) at bit (c % (8/pb)) · pb). 3-bit codes are a
2-bit plane of the low bits plus a 1-bit plane of the high bit, so 3 bits cost exactly 3 bits.
"""
from __future__ import annotations

import math

import torch

from .reference import attention_lse

__all__ = ["PLANES", "hadamard", "pack", "unpack", "pack_res", "unpack_res", "quantize_keys", "quantize_tokens",
           "dequantize_keys", "key_stats", "stats8",
           "dequantize_tokens", "rope_at", "fp_slots", "quant_decode_attention", "normalized", "gather_rows",
           "quant_paged_attention"]

PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}   # 1: the keys' residual bits (`kres`)


def hadamard(d: int, device=None) -> torch.Tensor:
    """(d, d) orthonormal Sylvester-Hadamard matrix (symmetric, so H @ H = I); d a power of 2."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


# -- packing -------------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """codes (..., D) uint8 in [0, 2**bits) → planes, each (..., D * pb // 8) uint8."""
    planes, shift = [], 0
    for pb in PLANES[bits]:
        part = ((codes.to(torch.int32) >> shift) & ((1 << pb) - 1))
        per = 8 // pb
        part = part.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
        sh = torch.arange(per, device=codes.device, dtype=torch.int32) * pb
        planes.append((part << sh).sum(-1).to(torch.uint8))
        shift += pb
    return planes


def unpack(planes: list[torch.Tensor], bits: int, d: int) -> torch.Tensor:
    """Inverse of `pack`: planes → codes (..., d) uint8."""
    codes, shift = None, 0
    for pb, p in zip(PLANES[bits], planes):
        per = 8 // pb
        sh = torch.arange(per, device=p.device, dtype=torch.int32) * pb
        part = ((p.to(torch.int32)[..., None] >> sh) & ((1 << pb) - 1)).reshape(*p.shape[:-1], d)
        codes = part << shift if codes is None else codes | (part << shift)
        shift += pb
    return codes.to(torch.uint8)


def pack_res(bits01: torch.Tensor) -> torch.Tensor:
    """The keys' residual bits (..., D) uint8 0/1 → (..., D/8) uint8, D a multiple of 32. Each 32-bit word (4 bytes,
    little-endian) holds 32 channels in the order the CUDA kernel pairs its codes: channel 8w + 4h + j (w, j < 4,
    h < 2) at bit 16h + 4w + j, so the two channels of a code pair (j, j + 4 of a code word) sit 16 bits apart."""
    *lead, D = bits01.shape
    x = bits01.reshape(*lead, D // 32, 4, 2, 4).transpose(-3, -2).reshape(*lead, D)
    return pack(x, 1)[0]


def unpack_res(res: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `pack_res` → (..., d) uint8 0/1."""
    *lead, _ = res.shape
    x = unpack([res], 1, d).reshape(*lead, d // 32, 2, 4, 4)
    return x.transpose(-3, -2).reshape(*lead, d)


# -- quantize / dequantize -----------------------------------------------------------------------------
def _levels(bits: int, lut: torch.Tensor | None, device) -> torch.Tensor:
    return torch.arange(2 ** bits, device=device, dtype=torch.float32) if lut is None else lut.float().to(device)


def _encode(x, lo, hi, bits, lut):
    """x, lo, hi broadcastable fp32 → (codes uint8, scale fp16, zero fp16). Statistics are rounded to
    fp16 first so that dequantizing the stored values reproduces exactly what was encoded."""
    top = 2 ** bits - 1
    zero = lo.half()
    rng = (hi - zero.float()).clamp_min(1e-6)
    scale = (rng / top if lut is None else rng).half()
    t = (x - zero.float()) / scale.float().clamp_min(1e-8)
    if lut is None:
        codes = t.round().clamp(0, top)
    else:  # nearest codebook level (levels sorted): count the midpoints below t
        lv = lut.float().to(x.device)
        codes = torch.bucketize(t, (lv[1:] + lv[:-1]) / 2)
    return codes.to(torch.uint8), scale, zero


def _outliers(x, center, spread, n_out):
    """Per token (last-but-one axis) the n_out channels with the largest |x - center| / spread.
    Returns idx (..., n_out) int64 and their exact values (..., n_out)."""
    score = (x - center).abs() / spread
    idx = score.topk(n_out, dim=-1).indices
    return idx, x.gather(-1, idx)


CLIP_STEPS = 11    # each end of a clipped range is pulled in by one of 0, 0.05, ..., 0.5 of the min/max range


def clip_range(x: torch.Tensor, bits: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) for uniform `bits`-bit codes of x's groups along `axis` (keepdim), MSE-clipped: each end of the
    group's [min, max] pulled in by one of CLIP_STEPS fractions of the range (0 to a half), the pair whose
    reconstruction (fp16 statistics, as `_encode` stores them; values past an end saturate) has the least squared
    error, searched on the group's own values; ties keep the first pair (lo's fraction outer, hi's inner), as the
    append kernel searches. At 2 bits a group's min/max spends levels on its extremes: on smollm2-135m at 8K, 64-token
    key groups clipped so lose +4.8 % perplexity, 16-token groups by min/max (kv2) +6.6 %; but the clipped groups find
    3 of 15 needles where kv2 finds 7, since a needle's keys are such extremes (BENCHMARKS.md, issue 4, session 40).
    The idea is weight quantizers' MSE clipping (e.g. Banner et al. 2019, ACIQ)."""
    mn, mx = x.amin(axis, keepdim=True), x.amax(axis, keepdim=True)
    r = mx - mn
    best = blo = bhi = None
    for ia in range(CLIP_STEPS):
        lo = mn + (torch.tensor(ia, dtype=torch.float32) * 0.05).item() * r
        for ib in range(CLIP_STEPS):
            hi = mx - (torch.tensor(ib, dtype=torch.float32) * 0.05).item() * r
            codes, scale, zero = _encode(x, lo, hi, bits, None)
            err = ((codes.float() * scale.float() + zero.float() - x) ** 2).sum(axis, keepdim=True)
            if best is None:
                best, blo, bhi = err, lo.expand_as(err), hi.expand_as(err)
            else:
                m = err < best
                best, blo, bhi = torch.where(m, err, best), torch.where(m, lo, blo), torch.where(m, hi, bhi)
    return blo, bhi


GRID = 8   # fp16 numbers a key group and head holds with 8-bit statistics (zero grid start, step, largest scale;
           # padded to 16 bytes, the unit of the CUDA kernel's bulk copies)


def stats8(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit key statistics (`kstat=8`) of groups whose channels (last axis) span [lo, hi] (fp32, (..., D)) →
    (scale codes e, zero codes zc) uint8 (..., D) and the grid (..., GRID) fp16 [zlo, zstep, smax, 0...]:
    zero = zlo + zc·zstep, a 256-point linear grid over the channels' lower ends; scale = smax·2^(-e/16), a log
    grid (4.4 % a step, 16 octaves) below the largest. Both rounded to the nearest point (a key past either end of
    its range saturates): on smollm2-135m kv2:kstat=8's perplexity +4.72 % / +7.02 % at 2K / 8K against kv2's +4.84 %
    / +6.61 %, 6 of 15 needles against 7 (BENCHMARKS.md, issue 4, session 44). `stats8_decode` rebuilds the fp16
    scale and zero that the codes are encoded against."""
    top = 2 ** bits - 1
    zmin, zmax = lo.amin(-1, keepdim=True), lo.amax(-1, keepdim=True)
    zlo = zmin.half().float()
    zstep = ((zmax - zlo) / 255).clamp_min(6e-8).half().float()
    zc = torch.round((lo - zlo) / zstep).clamp(0, 255)
    need = ((hi - lo) / top).clamp_min(1e-6)
    smax = need.amax(-1, keepdim=True).half().float()
    e = torch.round(-16 * torch.log2(need / smax)).clamp(0, 255)
    grid = torch.cat([zlo, zstep, smax, torch.zeros_like(zlo).expand(*zlo.shape[:-1], GRID - 3)], -1).half()
    return e.to(torch.uint8), zc.to(torch.uint8), grid


def stats8_decode(e: torch.Tensor, zc: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 (scale, zero) that 8-bit statistics stand for (`stats8`)."""
    g = grid.float()
    scale = (g[..., 2:3] * torch.exp2(e.float() * -0.0625)).half()
    zero = (g[..., 0:1] + zc.float() * g[..., 1:2]).half()
    return scale, zero


def key_stats(q: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed key dict's per-group (scale, zero) in fp16, whether stored as fp16 rows or as 8-bit codes with a
    grid (`kstat=8`: `grid` present)."""
    if "grid" in q:
        return stats8_decode(q["scale"], q["zero"], q["grid"])
    return q["scale"], q["zero"]


def quantize_keys(k: torch.Tensor, *, bits: int, group: int, n_out: int = 0, lut=None, res: bool = False,
                  clip: bool = False, kstat: int = 16) -> dict:
    """Per-channel keys. k (B, H, T, D) with T a multiple of `group` →
    {planes, scale (B, H, T/group, D) fp16, zero (same), out_idx (B, H, T, n_out) uint8, out_val fp16}.
    res: also `res` (B, H, T, D/8) uint8, one residual bit an element: whether the key lies at or above its
    level, so that it decodes half a step finer with the codes themselves unchanged. clip: each group's range
    MSE-clipped (`clip_range`, or a function of its signature: `quant_append.clip_range` searches on the GPU; uniform
    codes, no outliers or residual bits). kstat=8: the statistics as 8-bit codes (`stats8`): scale and zero
    (B, H, T/group, D) uint8 and grid (B, H, T/group, GRID) fp16 (uniform codes, no outliers, residual bits or
    clipping)."""
    if clip and (n_out or lut is not None or res):
        raise ValueError("clipped key ranges are for uniform codes without outliers or residual bits")
    B, H, T, D = k.shape
    x = k.float().reshape(B, H, T // group, group, D)
    if kstat == 8:
        if n_out or lut is not None or res or clip:
            raise ValueError("8-bit key statistics are for uniform codes without outliers, residual bits or clipping")
        e, zc, grid = stats8(x.amin(3), x.amax(3), bits)
        scale, zero = stats8_decode(e, zc, grid)
        t = (x - zero.float()[:, :, :, None]) / scale.float()[:, :, :, None]
        codes = t.round().clamp(0, 2 ** bits - 1).to(torch.uint8)
        return {"planes": pack(codes.reshape(B, H, T, D), bits), "scale": e, "zero": zc, "grid": grid}
    out = {}
    if n_out:
        mu = x.mean(3, keepdim=True)
        sd = x.std(3, keepdim=True, correction=0).clamp_min(1e-6)
        idx, val = _outliers(x, mu, sd, n_out)
        x = x.scatter(-1, idx, mu.expand_as(x).gather(-1, idx))   # drop them from min/max
        out = {"out_idx": idx.reshape(B, H, T, n_out).to(torch.uint8),
               "out_val": val.reshape(B, H, T, n_out).half()}
    search = clip if callable(clip) else clip_range
    lo, hi = search(x, bits, 3) if clip else (x.amin(3, keepdim=True), x.amax(3, keepdim=True))
    codes, scale, zero = _encode(x, lo, hi, bits, lut)
    if res:
        level = _levels(bits, lut, x.device)[codes.long()] * scale.float() + zero.float()
        out["res"] = pack_res((x >= level).to(torch.uint8).reshape(B, H, T, D))
    return {"planes": pack(codes.reshape(B, H, T, D), bits), "scale": scale.squeeze(3),
            "zero": zero.squeeze(3), **out}


def quantize_tokens(v: torch.Tensor, *, bits: int, vgroup: int, n_out: int = 0, lut=None) -> dict:
    """Per-token vectors (values; keys in the per-token ablation). v (B, H, T, D) →
    {planes, scale (B, H, T, D/vgroup) fp16, zero (same), out_idx, out_val}."""
    B, H, T, D = v.shape
    x = v.float().reshape(B, H, T, D // vgroup, vgroup)
    out = {}
    if n_out:
        mu = x.mean(-1, keepdim=True)
        sd = x.std(-1, keepdim=True, correction=0).clamp_min(1e-6)
        flat = x.reshape(B, H, T, D)
        idx, val = _outliers(flat, mu.expand_as(x).reshape(B, H, T, D), sd.expand_as(x).reshape(B, H, T, D), n_out)
        flat = flat.scatter(-1, idx, mu.expand_as(x).reshape(B, H, T, D).gather(-1, idx))
        x = flat.reshape(B, H, T, D // vgroup, vgroup)
        out = {"out_idx": idx.to(torch.uint8), "out_val": val.half()}
    codes, scale, zero = _encode(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, lut)
    return {"planes": pack(codes.reshape(B, H, T, D), bits), "scale": scale.squeeze(-1),
            "zero": zero.squeeze(-1), **out}


def normalized(x: torch.Tensor, *, per_channel: bool, group: int, n_out: int = 0) -> torch.Tensor:
    """Where each element of x (B, H, T, D) falls inside its group's [min, max] range, in [0, 1], with
    the outliers left out (flat fp32). What non-uniform codebooks are fitted to (KVQuant §3.3)."""
    B, H, T, D = x.shape
    xf = x.float()
    if per_channel:
        g = xf.reshape(B, H, T // group, group, D)
        mu, sd = g.mean(3, keepdim=True), g.std(3, keepdim=True, correction=0).clamp_min(1e-6)
        mu, sd = mu.expand_as(g).reshape(B, H, T, D), sd.expand_as(g).reshape(B, H, T, D)
    else:
        g = xf.reshape(B, H, T, D // group, group)
        mu, sd = g.mean(-1, keepdim=True), g.std(-1, keepdim=True, correction=0).clamp_min(1e-6)
        mu, sd = mu.expand_as(g).reshape(B, H, T, D), sd.expand_as(g).reshape(B, H, T, D)
    keep = torch.ones_like(xf, dtype=torch.bool)
    if n_out:
        idx, _ = _outliers(xf, mu, sd, n_out)
        keep = keep.scatter(-1, idx, False)
        xf = torch.where(keep, xf, mu)
    if per_channel:
        g = xf.reshape(B, H, T // group, group, D)
        lo, hi = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    else:
        g = xf.reshape(B, H, T, D // group, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    t = ((g - lo) / (hi - lo).clamp_min(1e-6)).reshape(B, H, T, D)
    return t[keep]


def _restore(x, q):
    if "out_idx" in q:
        x = x.scatter(-1, q["out_idx"].long(), q["out_val"].float())
    return x


def dequantize_keys(q: dict, *, bits: int, group: int, d: int, lut=None) -> torch.Tensor:
    """Inverse of `quantize_keys` → (B, H, T, D) fp32."""
    lv = _levels(bits, lut, q["scale"].device)
    codes = unpack(q["planes"], bits, d)
    B, H, T, D = codes.shape
    x = lv[codes.long()].reshape(B, H, T // group, group, D)
    if "res" in q:      # the residual bit: a quarter step up or down from the level
        x = x + unpack_res(q["res"], d).reshape(B, H, T // group, group, D).float() * 0.5 - 0.25
    scale, zero = key_stats(q)
    x = x * scale.float()[:, :, :, None] + zero.float()[:, :, :, None]
    return _restore(x.reshape(B, H, T, D), q)


def dequantize_tokens(q: dict, *, bits: int, vgroup: int, d: int, lut=None) -> torch.Tensor:
    """Inverse of `quantize_tokens` → (B, H, T, D) fp32."""
    lv = _levels(bits, lut, q["scale"].device)
    codes = unpack(q["planes"], bits, d)
    B, H, T, D = codes.shape
    x = lv[codes.long()].reshape(B, H, T, D // vgroup, vgroup)
    x = x * q["scale"].float()[..., None] + q["zero"].float()[..., None]
    return _restore(x.reshape(B, H, T, D), q)


# -- decode attention over the packed layout --------------------------------------------------------------
def rope_at(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """RoPE (rotate_half convention) of x (B, H, T, D) at positions pos (T,), in fp32."""
    f = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((f, f), -1)
    c, s = emb.cos() * scaling, emb.sin() * scaling
    x1, x2 = x.float().chunk(2, -1)
    return x.float() * c + torch.cat((-x2, x1), -1) * s


def fp_slots(length: int, sink: int, ring: int, first_recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision buffer (sink slots then a ring of `ring` slots): which slots hold visible tokens
    when `length` tokens are stored and quantized groups end at `first_recent`. → (slots, positions)."""
    slots, pos = list(range(min(sink, length))), list(range(min(sink, length)))
    for p in range(max(first_recent, sink), length):
        slots.append(sink + (p - sink) % ring)
        pos.append(p)
    return torch.tensor(slots, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


def quant_decode_attention(q, kq: dict, vq: dict, kf, vf, length: int, *, bits: int, group: int,
                           vgroup: int, sink: int, window: int, scale: float, inv_freq,
                           rope_scaling: float = 1.0, lut_k=None, lut_v=None, prerope: bool = True) -> torch.Tensor:
    """One decode step, reference for `kernels.quant.quant_decode_attention`.

    q (B, Hq, 1, D) post-RoPE at position length-1; kq/vq: the packed dicts of `quantize_keys` /
    `quantize_tokens` over the quantized region (buffer index i ↔ position sink + i), pre-RoPE keys;
    kf, vf (B, Hkv, sink + ring, D): full-precision sink slots then a ring (position p ≥ sink lives in
    slot sink + (p - sink) % ring), pre-RoPE keys. Groups are flushed when `window` recent tokens
    remain; attention sees the groups flushed before the current token arrived,
    n_q = group · max(0, (length - 1 - sink - window) // group), as chunked prefill does.
    Returns (B, Hq, 1, D) in q's dtype. prerope=False: every key is stored already rotated (KIVI's
    layout), so none is rotated here.
    """
    D = q.shape[-1]
    ring = kf.shape[2] - sink
    nq = group * max(0, (length - 1 - sink - window) // group)
    slots, pos = fp_slots(length, sink, ring, sink + nq)
    ks, vs = [kf[:, :, slots.to(kf.device)]], [vf[:, :, slots.to(kf.device)]]
    kpos = [pos]
    if nq:
        sl = lambda d, n: {k: ([p[:, :, :n] for p in t] if k == "planes" else t[:, :, :n]) for k, t in d.items()}
        kd = dequantize_keys({**sl(kq, nq), **{k: kq[k][:, :, :nq // group] for k in ("scale", "zero", "grid")
                                               if k in kq}}, bits=bits, group=group, d=D, lut=lut_k)
        ks.append(kd)
        vs.append(dequantize_tokens(sl(vq, nq), bits=bits, vgroup=vgroup, d=D, lut=lut_v))
        kpos.append(torch.arange(sink, sink + nq))
    kpos = torch.cat(kpos).to(q.device)
    k = torch.cat([x.float() for x in ks], 2)
    if prerope:
        k = rope_at(k, kpos, inv_freq.to(q.device), rope_scaling)
    v = torch.cat([x.float() for x in vs], 2)
    out, _ = attention_lse(q, k, v, scale=scale)
    return out.to(q.dtype)


# -- sparse reads of a packed layer (`cache/select/quest_storage.py`) --------------------------------------
def gather_rows(kq: dict, vq: dict, kf, vf, rows: torch.Tensor, nq, *, bits: int, group: int, vgroup: int,
                sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values of the slots `rows` (B, H, R) int64 of a packed layer whose slot j is
    quantized row j - sink when sink <= j < sink + nq (nq: int or device tensor) and otherwise lives in
    the full-precision buffer kf/vf (sink slots, then a ring of kf.shape[2] - sink slots). Only those
    rows' codes, statistics and outliers are gathered → each (B, H, R, D) fp32."""
    D = kf.shape[-1]
    ring = kf.shape[2] - sink
    cap = kq["planes"][0].shape[2]
    rows = rows.clamp(min=0)
    use_q = ((rows >= sink) & (rows < sink + nq))[..., None]
    qi = torch.clamp(rows - sink, 0, cap - 1)

    def take(t, idx):
        return t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[3]))

    kd = {"planes": [take(t, qi) for t in kq["planes"]],
          **{k: take(kq[k], qi // group) for k in ("scale", "zero", "grid") if k in kq}}
    vd = {"planes": [take(t, qi) for t in vq["planes"]], "scale": take(vq["scale"], qi), "zero": take(vq["zero"], qi)}
    for d, src in ((kd, kq), (vd, vq)):
        d.update({key: take(src[key], qi) for key in ("out_idx", "out_val", "res") if key in src})
    k = dequantize_keys(kd, bits=bits, group=1, d=D)        # statistics gathered per row
    v = dequantize_tokens(vd, bits=bits, vgroup=vgroup, d=D)
    rs = torch.where(rows < sink, rows, sink + (rows - sink) % ring)
    k = torch.where(use_q, k, take(kf, rs).float())
    v = torch.where(use_q, v, take(vf, rs).float())
    return k, v


def quant_paged_attention(q, kq: dict, vq: dict, kf, vf, length, table, nsel, last, *, row_pages: int, page: int,
                          bits: int, group: int, vgroup: int, sink: int, window: int, scale: float,
                          softcap: float | None = None) -> torch.Tensor:
    """Reference for `kernels.quant_paged.quant_paged_attention`: q (B, Hq, 1, D) against the pages a
    page table lists, read from a packed layer with keys stored after RoPE (`cache/quant_storage.py`,
    slot = position). table (B·Hkv, MAXP) int32 holds global page ids (bh·row_pages + page); row bh
    reads its first nsel[bh] pages, the last of them up to last[bh] tokens. length: (1,) int64 (or
    int) tokens held; the quantized region is what the dense packed kernel reads, n_q(length - 1).
    Returns (B, Hq, 1, D) in q's dtype."""
    from .sparse_reference import ragged_attention_lse

    B, Hq, _, D = q.shape
    H = kf.shape[1]
    BH, K = table.shape
    n = length if isinstance(length, int) else length.reshape(-1)[-1]
    nq = group * torch.clamp(torch.as_tensor(n - 1 - sink - window, device=q.device) // group, min=0)
    local = table.long() - torch.arange(BH, device=q.device)[:, None] * row_pages
    rows = (local[:, :, None] * page + torch.arange(page, device=q.device)).reshape(B, H, K * page)
    k, v = gather_rows(kq, vq, kf, vf, rows, nq, bits=bits, group=group, vgroup=vgroup, sink=sink)
    n_tok = ((nsel.reshape(-1).expand(BH) - 1) * page + last.reshape(-1).expand(BH)).reshape(B, H, 1)
    valid = torch.arange(K * page, device=q.device).reshape(1, 1, -1) < n_tok
    out, _ = ragged_attention_lse(q, k, v, valid, scale=scale, softcap=softcap)
    return out.to(q.dtype)


# -- Quest over key groups (`cache/select/quest_storage.py`, page = the storage's key group) -------------
def group_scores(q, ks, kz, length, *, bits: int, group: int, sink: int, window: int):
    """Quest's page bound with pages = the quantized key groups, from the statistics they already hold: a
    group's keys lie in [z, z + L·s] per channel (L = 2^bits - 1; KIVI's per-channel keys after RoPE), so
    this is `sparse_reference.page_scores` with pmin = z, pmax = z + L·s (max over the KV head's query
    group). q (B, Hq, 1, D); ks, kz (B, Hkv, MG, D) fp16; length: int or (1,) device int64 (tokens held).
    Groups the decode kernel reads, n_q(length - 1) / group, score; the rest -inf.
    → (scores (B, Hkv, MG) fp32, npos (1,) int64 = n_q - 1: `select_pages(..., pos=npos, page=group)`
    then takes only scored groups)."""
    from .sparse_reference import page_scores

    n = torch.as_tensor(length, device=q.device).reshape(-1)[-1:]
    npos = torch.clamp((n - 1 - sink - window) // group, min=0) * group - 1
    z = kz.float()
    return page_scores(q, z, z + (2 ** bits - 1) * ks.float(), npos, page=group, sink=0, recent=0), npos


def quant_group_attention(q, kq: dict, vq: dict, kf, vf, length, table, nsel, *, row_pages: int, bits: int,
                          group: int, vgroup: int, sink: int, window: int, scale: float) -> torch.Tensor:
    """Reference for `kernels.quant_cuda.paged_attention`: q (B, Hq, 1, D) against a packed layer's
    full-precision slots (the sink, and the ring's positions past the quantized region) and, of the
    quantized region n_q(length - 1), the key groups of the first nsel[bh] entries of table row bh
    (global ids bh·row_pages + group index; groups past the region are skipped). Keys after RoPE
    (`cache/quant_storage.py`, slot = position). Returns (B, Hq, 1, D) in q's dtype."""
    from .sparse_reference import ragged_attention_lse

    B, Hq, _, D = q.shape
    H = kf.shape[1]
    BH, K = table.shape
    ring = kf.shape[2] - sink
    n = torch.as_tensor(length, device=q.device).reshape(-1)[-1]
    nq = group * torch.clamp((n - 1 - sink - window) // group, min=0)
    g = table.long() - torch.arange(BH, device=q.device)[:, None] * row_pages                   # (BH, K)
    ok_g = (torch.arange(K, device=q.device) < nsel.reshape(-1).expand(BH)[:, None]) & (g * group < nq)
    rows_q = (sink + g[:, :, None] * group + torch.arange(group, device=q.device)).reshape(BH, K * group)
    ok_q = ok_g[:, :, None].expand(-1, -1, group).reshape(BH, K * group)
    f = torch.arange(sink + ring, device=q.device)
    rows_f = (sink + nq + f - sink).clamp(min=0)              # the ring's candidates: positions sink + nq + i
    rows_f = torch.where(f < sink, f, rows_f)
    ok_f = (f < torch.clamp(n, max=sink)) | ((f >= sink) & (rows_f < n))
    rows = torch.cat([rows_f.expand(BH, -1), rows_q], 1).reshape(B, H, -1)
    valid = torch.cat([ok_f.expand(BH, -1), ok_q], 1).reshape(B, H, -1)
    k, v = gather_rows(kq, vq, kf, vf, rows, nq, bits=bits, group=group, vgroup=vgroup, sink=sink)
    out, _ = ragged_attention_lse(q, k, v, valid, scale=scale)
    return out.to(q.dtype)
