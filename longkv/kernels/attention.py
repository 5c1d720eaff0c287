"""Attention with log-sum-exp through PyTorch's fused kernels where they apply, else the reference.

Chunked prefill needs, for a chunk of queries, (a) attention to the cached past with its lse and
(b) causal attention inside the chunk with its lse. PyTorch's flash kernels return the lse
(`_scaled_dot_product_flash_attention[_for_cpu]`), so both run fused without materialising scores:
(a) folds the query group into the sequence axis (all past keys are visible to every query, so GQA
needs no copy of K/V), (b) expands the chunk's own K/V to the query heads (the chunk is small).
Logit softcaps fall back to the math reference. A sliding window inside a long chunk runs the math
in bands (`banded_lse`): each block of `window` queries against the 2 * window keys it can reach, so a
Gemma 3 chunk of 16K costs 2 * window keys a query instead of 16K (a one-chunk 16K prefill of gemma3-270m:
740 ms of kernels on an H200 before, 70 ms on an H100 after; BENCHMARKS.md, session 23). Its fp32 scores
take T * 2W * Hq * 4 bytes (0.5 GiB for gemma3-270m at 32K), where the math path took T * T * Hq * 4 (and a
masked copy and an exp copy of it besides).
"""
from __future__ import annotations

import torch

from .reference import attention_lse, visible


_CUDNN_OK = [True]  # flips to False on the first failure (a build or GPU without cuDNN attention)


def _flash(q, k, v, *, scale: float, causal: bool):
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            if _CUDNN_OK[0]:  # ~1.8x the flash kernel on an H100 (benchmarks/attn_prefill.py)
                try:
                    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                        q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
                    return o.float(), lse.reshape(*q.shape[:2], -1)[..., : q.shape[2]].float()
                except RuntimeError:
                    _CUDNN_OK[0] = False
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        else:
            o, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return o.float(), lse[..., : q.shape[2]].float()
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o.float(), lse.float()


CPU_FUSED_MIN = 1 << 22  # score elements below which the CPU uses the math path


def _small_on_cpu(q, k) -> bool:
    # PyTorch's CPU flash kernel has a large fixed cost per call (measured ~15 ms on a busy 2-core
    # machine); the math path wins when the score matrix is small (decode steps, short prompts)
    return q.device.type == "cpu" and q.shape[1] * q.shape[2] * k.shape[2] < CPU_FUSED_MIN


def past_attention(q, k, v, *, scale: float, q_pos=None, k_pos=None, window: int | None = None,
                   softcap: float | None = None):
    """q (B, Hq, T, D) attends to every key of k/v (B, Hkv, S, D), all earlier than every query
    (unless a window hides some: then q_pos (T,), k_pos (S,) are needed). → out fp32, lse fp32."""
    if window is not None or softcap or _small_on_cpu(q, k):
        mask = None if window is None else visible(q_pos, k_pos, window)
        return attention_lse(q, k, v, scale=scale, mask=mask, softcap=softcap)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    o, lse = _flash(q.reshape(B, Hkv, G * T, D), k, v, scale=scale, causal=False)
    return o.reshape(B, Hq, T, -1), lse.reshape(B, Hq, T)


def banded_lse(q, k, v, *, scale: float, window: int, softcap: float | None = None):
    """Causal sliding-window attention inside a chunk, computed band by band: the math of
    `attention_lse` with `visible(pos, pos, window)`, but queries in blocks of `window`, each against
    the 2 * window keys from the block before to its own end (every key it may read), so the work is
    T * 2W instead of T * T. q (B, Hq, T, D), k/v (B, Hkv, T, D) → out fp32, lse fp32."""
    B, Hq, T, D = q.shape
    Hkv, Dv, W = k.shape[1], v.shape[-1], window
    G, nb = Hq // Hkv, -(-T // W)
    pad = nb * W - T
    qb = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).reshape(B, Hkv, G, nb, W, D)
    qb = qb.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, nb, G * W, D)
    kp = torch.nn.functional.pad(k.float(), (0, 0, W, pad))          # W zero keys before position 0
    vp = torch.nn.functional.pad(v.float(), (0, 0, W, pad))
    kb = kp.unfold(2, 2 * W, W).transpose(-1, -2)                    # (B, Hkv, nb, 2W, D): block i's keys
    vb = vp.unfold(2, 2 * W, W).transpose(-1, -2)                    # start at position (i - 1) * W
    s = (qb @ kb.transpose(-1, -2)) * scale                          # (B, Hkv, nb, G*W, 2W)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    t = torch.arange(W, device=q.device)
    j = torch.arange(2 * W, device=q.device)
    band = (j[None, :] > t[:, None]) & (j[None, :] <= t[:, None] + W)  # key (i-1)W+j seen by query iW+t
    mask = band.expand(nb, W, 2 * W).clone()
    mask[0, :, :W] = False                                           # the padding before position 0
    s.masked_fill_(~mask.repeat(1, G, 1), float("-inf"))               # in place: one score tensor at a time
    lse = torch.logsumexp(s, dim=-1)
    out = s.sub_(lse[..., None]).exp_() @ vb                          # every real query sees itself
    out = out.reshape(B, Hkv, nb, G, W, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, nb * W, Dv)
    lse = lse.reshape(B, Hkv, nb, G, W).permute(0, 1, 3, 2, 4).reshape(B, Hq, nb * W)
    return out[:, :, :T], lse[:, :, :T]


def chunk_attention(q, k, v, *, scale: float, window: int | None = None, softcap: float | None = None):
    """Causal attention inside a chunk: q (B, Hq, T, D), k/v (B, Hkv, T, D) at the same positions."""
    T = q.shape[2]
    if window is not None and 2 * window < T:
        return banded_lse(q, k, v, scale=scale, window=window, softcap=softcap)
    if (window is not None and window < T) or softcap or _small_on_cpu(q, k):
        pos = torch.arange(T, device=q.device)
        return attention_lse(q, k, v, scale=scale, mask=visible(pos, pos, window), softcap=softcap)
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return _flash(q, k, v, scale=scale, causal=True)
