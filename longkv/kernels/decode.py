"""Flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference") in Triton.

One query token per sequence attends to a preallocated KV buffer. The keys are split along the
sequence into `splits` parts; each program reads one part for one KV head and the whole query
group of that head (GQA: every KV byte is read once), and writes a partial output with its
log-sum-exp; a second kernel merges the parts. The current length is read from a device tensor, so
the launch is identical at every step and can be captured in a CUDA graph.

Reference: `kernels.reference.decode_attention`. Without a GPU the dispatcher uses the reference
unless `TRITON_INTERPRET=1` forces the Triton path (the tests do this).
"""
from __future__ import annotations

import os

import torch

from . import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the reference
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def scaled_scores(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
        """Raw logits q·k → scaled, and soft-capped (Gemma 2's softcap·tanh(s/softcap), as a sigmoid)."""
        s = s * scale
        if HAS_SOFTCAP:
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)
        return s

    @triton.jit
    def lse_rows(x, axis: tl.constexpr):
        """Log-sum-exp along axis of a tile holding -inf where empty (an empty line gives -inf)."""
        m = tl.max(x, axis)
        safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.sum(tl.exp(x - tl.expand_dims(safe, axis)), axis)
        return tl.where(e > 0, safe + tl.log(tl.maximum(e, 1e-30)), float("-inf"))

    @triton.jit
    def online_step(q, k, v, ok, m, l, acc, scale, softcap, HAS_SOFTCAP: tl.constexpr):
        """One flash-decoding tile: scores of q (G, D) against k (N, D), masked by ok (N,), folded
        into the running max m, denominator l and output acc (G, D). Shared by every decode kernel
        that reads plain (unpacked) K/V tiles."""
        s = scaled_scores(tl.dot(q, tl.trans(k)).to(tl.float32), scale, softcap, HAS_SOFTCAP)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        return m_new, l, acc

    @triton.jit
    def _split_kernel(Q, K, V, Len, Out, Lse,
                      sqb, sqh, skb, skh, skt, svb, svh, svt,
                      scale, softcap, window,
                      G: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HKV: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        length = tl.load(Len).to(tl.int32)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(length - window, 0)
        per = tl.cdiv(tl.cdiv(length - lo, SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * per
        end = tl.minimum(start + per, length)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        kbase = K + b * skb + h * skh
        vbase = V + b * svb + h * svh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < end
            k = tl.load(kbase + n[:, None] * skt + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(vbase + n[:, None] * svt + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = online_step(q, k, v, ok, m, l, acc, scale, softcap, HAS_SOFTCAP)
        row = (bh * SPLITS + split) * G + g
        lse = tl.where(l > 0, m + tl.log(l), float("-inf"))
        tl.store(Lse + row, lse, mask=g < G)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(Out + row[:, None] * D + d[None, :], out, mask=g[:, None] < G)

    @triton.jit
    def _merge_kernel(Out, Lse, O, G: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)          # one (b, kv head, group member)
        bh = pid // G
        g = pid % G
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        rows = (bh * SPLITS + s) * G + g
        lse = tl.load(Lse + rows, mask=s < SPLITS, other=float("-inf"))
        mx = tl.max(lse, 0)
        w = tl.where(lse > float("-inf"), tl.exp(lse - mx), 0.0)
        o = tl.load(Out + rows[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
        res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + pid * D + d, res.to(O.dtype.element_ty))


def num_splits(capacity: int, heads: int) -> int:
    """Enough programs to fill a large GPU: about 1K keys a split, at most 128 splits."""
    return max(1, min(128, triton.cdiv(capacity, 1024) if triton else 1, max(1, 1024 // max(heads, 1))))


def decode_attention(q, k, v, length, *, scale: float, window: int | None = None,
                     softcap: float | None = None, splits: int | None = None) -> torch.Tensor:
    """q (B, Hq, 1, D); k, v (B, Hkv, cap, D) with unit stride on D; length: int64 0-dim or (1,)
    tensor (keys [max(0, length - window), length) are read). Returns (B, Hq, 1, D) in q's dtype."""
    if not _use_triton(q):
        return reference.decode_attention(q, k, v, length, scale=scale, window=window, softcap=softcap)
    B, Hq, _, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    G = Hq // Hkv
    S = splits or num_splits(cap, B * Hkv)
    part = torch.empty(B * Hkv * S * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * Hkv * S * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    length = length.reshape(-1)[-1:]
    _split_kernel[(B * Hkv, S)](
        q, k, v, length, part, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        scale, softcap or 0.0, window or 0,
        G=G, SPLITS=S, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=64 if D <= 128 else 32,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=bool(softcap), HKV=Hkv)
    _merge_kernel[(B * Hkv * G,)](part, lse, out, G=G, SPLITS=S, D=D, BLOCK_S=triton.next_power_of_2(S))
    return out
