"""Plain-torch references: the ground truth every fused path and Triton kernel is tested against.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, S, D) with Hq a multiple of Hkv (GQA: query head h reads KV
head h // (Hq // Hkv)). Attention returns the output in fp32 together with its log-sum-exp, so
partial attentions over disjoint key sets can be merged exactly (flash-decoding, chunked prefill).
"""
from __future__ import annotations

import torch


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T, S) bool: query at q_pos[t] may read key at k_pos[s] (causal, optional sliding window)."""
    m = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        m &= (q_pos[:, None] - k_pos[None, :]) < window
    return m


def attention_lse(q, k, v, *, scale: float, mask: torch.Tensor | None = None,
                  softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp.

    q (B, Hq, T, D), k/v (B, Hkv, S, D), mask (T, S) bool or None (all visible).
    Returns out (B, Hq, T, D) fp32 and lse (B, Hq, T) fp32; a row that sees no key has out 0, lse -inf.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G * T, D)
    s = (qf @ k.float().transpose(-1, -2)) * scale           # (B, Hkv, G*T, S)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask.repeat(G, 1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                          # (B, Hkv, G*T)
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    p = torch.nan_to_num(p, nan=0.0)
    out = p @ v.float()                                       # (B, Hkv, G*T, Dv)
    return out.reshape(B, Hq, T, v.shape[-1]), lse.reshape(B, Hq, T)


def merge_lse(o1, l1, o2, l2) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint keys: o (B, H, T, D) fp32, l (B, H, T) fp32."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    tot = w1 + w2
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / tot.clamp_min(1e-30)[..., None]
    return out, m + torch.log(tot)


def decode_attention(q, k, v, length, *, scale: float, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """One decode step over a preallocated buffer: q (B, Hq, 1, D), k/v (B, Hkv, cap, D); the query
    sits at position length - 1 and reads keys [max(0, length - window), length). Returns (B, Hq, 1, D)
    in q's dtype. Reference for `kernels.decode.decode_attention`."""
    n = int(length)
    lo = 0 if window is None else max(0, n - window)
    out, _ = attention_lse(q, k[:, :, lo:n], v[:, :, lo:n], scale=scale, softcap=softcap)
    return out.to(q.dtype)
from .quant_reference import *  # noqa
from .sparse_reference import *  # noqa
