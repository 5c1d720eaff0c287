"""Plain-torch references for the sparse kernels (`kernels/quest.py`): Quest page scoring and
attention through a page table. The ground truth the Triton kernels are tested against.

Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
arXiv 2406.10774): a page of P keys keeps its element-wise min and max; for a query q the largest
logit any key of the page can reach is bounded by sum_d max(q_d·min_d, q_d·max_d)
= q·c + |q|·r with c = (max + min)/2, r = (max − min)/2 (two dot products).

Shapes: q (B, Hq, 1, D); page metadata (B, Hkv, MP, D); a page pool (NP, P, D) with a page table
(B·Hkv, MAXP) of pool page ids, `nsel` (B·Hkv,) entries used per row and `last` (B·Hkv,) tokens in
the final entry (every other entry is a full page).
"""
from __future__ import annotations

import torch

__all__ = ["page_minmax", "page_scores", "select_pages", "paged_attention", "ragged_attention_lse"]


def page_minmax(k: torch.Tensor, P: int, valid: int | None = None):
    """k (B, H, S, D) with S a multiple of P → (min, max) each (B, H, S/P, D); slots ≥ valid ignored."""
    B, H, S, D = k.shape
    x = k.reshape(B, H, S // P, P, D)
    if valid is not None:
        ok = (torch.arange(S, device=k.device) < valid).reshape(1, 1, S // P, P, 1)
        return x.masked_fill(~ok, float("inf")).amin(3), x.masked_fill(~ok, float("-inf")).amax(3)
    return x.amin(3), x.amax(3)


def page_scores(q, pmin, pmax, npages, *, sink: int, recent: int) -> torch.Tensor:
    """Upper bound of each page's logit, max over the KV head's query group → (B, Hkv, MP) fp32.
    Pages ≥ npages (int or device tensor) get -inf; the first `sink` and last `recent` valid pages +inf."""
    B, Hq, _, D = q.shape
    Hkv, MP = pmin.shape[1], pmin.shape[2]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)
    c, r = (pmax.float() + pmin.float()) / 2, (pmax.float() - pmin.float()) / 2
    s = (qf @ c.transpose(-1, -2) + qf.abs() @ r.transpose(-1, -2)).amax(2)   # (B, Hkv, MP)
    p = torch.arange(MP, device=q.device)
    npages = torch.as_tensor(npages, device=q.device).reshape(-1)[-1]
    s = s.masked_fill((p < sink) | ((p >= npages - recent) & (p < npages)), float("inf"))
    return s.masked_fill(p >= npages, float("-inf"))


def select_pages(scores: torch.Tensor, k: int, npages):
    """Top-k pages per (b, kv head), ascending → (ids (B, Hkv, k) int64, nsel (1,) int64)."""
    ids = scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    nsel = torch.clamp(torch.as_tensor(npages, device=scores.device).reshape(-1)[-1:], max=k)
    return ids, nsel


def paged_attention(q, k_pool, v_pool, table, nsel, last, *, scale: float, softcap: float | None = None):
    """q (B, Hq, 1, D) against the tokens listed by the page table → (B, Hq, 1, D) in q's dtype."""
    out, _ = paged_attention_lse(q, k_pool, v_pool, table, nsel, last, scale=scale, softcap=softcap)
    return out.to(q.dtype)


def paged_attention_lse(q, k_pool, v_pool, table, nsel, last, *, scale, softcap=None):
    B, Hq, _, D = q.shape
    BH, MAXP = table.shape
    Hkv = BH // B
    P = k_pool.shape[1]
    k = k_pool[table.long()].reshape(B, Hkv, MAXP * P, D)
    v = v_pool[table.long()].reshape(B, Hkv, MAXP * P, v_pool.shape[-1])
    t = torch.arange(MAXP * P, device=q.device)
    n_tok = ((nsel.reshape(-1).expand(BH) - 1) * P + last.reshape(-1).expand(BH)).reshape(B, Hkv, 1)
    return ragged_attention_lse(q, k, v, t.reshape(1, 1, -1) < n_tok, scale=scale, softcap=softcap)


def ragged_attention_lse(q, k, v, valid, *, scale: float, softcap: float | None = None):
    """Like `attention_lse` but each (b, kv head) sees only its `valid` (B, Hkv, S) keys."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = (q.float().reshape(B, Hkv, G * T, D) @ k.float().transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float32).min)).nan_to_num(0.0)
    return (p @ v.float()).reshape(B, Hq, T, -1), lse.reshape(B, Hq, T)

