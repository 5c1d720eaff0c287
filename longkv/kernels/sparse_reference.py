"""Plain-torch references for the sparse kernels (`kernels/quest.py`): Quest page scoring and
attention through a page table. The ground truth the Triton kernels are tested against.

Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
arXiv 2406.10774): a page of P keys keeps its element-wise min and max; for a query q the largest
logit any key of the page can reach is bounded by sum_d max(q_d·min_d, q_d·max_d)
= q·c + |q|·r with c = (max + min)/2, r = (max − min)/2 (two dot products).

A Quest decode step is: `append_token` (RoPE the new key, write it and its value at `pos`, widen
the page's min/max), `page_scores`, `select_pages` (the top pages as a page table), then
`paged_attention` over them. The selection's order is irrelevant to attention (an online softmax
does not depend on the order of its keys) except that the final entry is the only partial page, so
pages are listed ascending: the page holding `pos`, when selected, is then last. Ties between equal
scores go to the lower page index, so the selection is a function of the scores alone.

Shapes: q (B, Hq, 1, D); page metadata (B, Hkv, MP, D); a page pool (NP, P, D) with a page table
(B·Hkv, MAXP) of pool page ids, `nsel` (B·Hkv,) entries used per row and `last` (B·Hkv,) tokens in
the final entry (every other entry is a full page). `pos` is the position of the newest token (a
device tensor (1,) or 0-dim, or an int): pages [0, pos // P] hold tokens.
"""
from __future__ import annotations

import torch

__all__ = ["all_page_code_scores", "append_token", "fold_chunk_bounds", "fold_token_bounds", "forced_bound",
           "page_codes", "page_keys", "page_mass", "page_minmax", "page_scores", "paged_attention",
           "ragged_attention_lse", "rerank_code_scores", "rerank_scores", "select_pages"]


def page_minmax(k: torch.Tensor, P: int, valid: int | None = None):
    """k (B, H, S, D) with S a multiple of P → (min, max) each (B, H, S/P, D); slots ≥ valid ignored."""
    B, H, S, D = k.shape
    x = k.reshape(B, H, S // P, P, D)
    if valid is not None:
        ok = (torch.arange(S, device=k.device) < valid).reshape(1, 1, S // P, P, 1)
        return x.masked_fill(~ok, float("inf")).amin(3), x.masked_fill(~ok, float("-inf")).amax(3)
    return x.amin(3), x.amax(3)


def page_codes(k: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int) -> torch.Tensor:
    """Page-relative key codes for Quest's second stage: k (B, H, n·P, D) with its pages' min/max
    (B, H, n, D) → (B, H, n, P, D·bits/8) uint8. Each element becomes a `bits`-bit code of its
    channel's [min, max] within its page (round to nearest; a channel constant over the page → 0).
    Planar packing: with NB = D·bits/8 bytes a key, byte b holds channels b, b + NB, b + 2·NB, ... from
    the low bits up, so shifting a key's bytes gives a contiguous slice of channels. In fp32 from the
    stored dtype."""
    B, H, S, D = k.shape
    n = mn.shape[2]
    L, per = (1 << bits) - 1, 8 // bits
    x = k.float().reshape(B, H, n, S // n, D)
    lo, rng = mn.float()[:, :, :, None], (mx.float() - mn.float())[:, :, :, None]
    inv = torch.where(rng > 0, L / torch.where(rng > 0, rng, 1.0), 0.0)
    c = torch.floor((x - lo) * inv + 0.5).clamp(0, L).to(torch.int32)
    c = c.reshape(B, H, n, S // n, per, D // per) << (torch.arange(per, device=k.device) * bits)[:, None]
    return c.sum(-2).to(torch.uint8)


def page_keys(codes: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int) -> torch.Tensor:
    """`page_codes` back to keys: codes (..., P, D·bits/8) with min/max (..., D) → (..., P, D) fp32,
    min + code · (max − min) / (2^bits − 1)."""
    sh = torch.arange(8 // bits, device=codes.device) * bits
    c = (codes.to(torch.int32)[..., None, :] >> sh[:, None]) & ((1 << bits) - 1)
    c = c.flatten(-2).float()
    lo = mn.float()[..., None, :]
    return lo + c * ((mx.float() - mn.float())[..., None, :] / ((1 << bits) - 1))


def _last(pos, device) -> torch.Tensor:
    return torch.as_tensor(pos, device=device).reshape(-1)[-1]


def append_token(k, v, cos, sin, pos, kc, vc, pmin, pmax, *, page: int, codes=None, bits: int = 0) -> None:
    """One decode token, in place: k, v (B, Hkv, 1, D) (k before RoPE); cos, sin (1, D); the caches
    kc, vc (B, Hkv, cap, D) get RoPE(k), v at `pos`; pmin/pmax (B, Hkv, MP, D) of page pos // page
    become the new key's (first slot of the page) or widen to include it. RoPE in fp32, rounded once.
    With `codes` (B, Hkv, MP, P, D·bits/8): when the token completes its page, the page's codes
    (`page_codes`) are written from its final min/max (a page's codes are valid once it is full).
    kc = vc = None: only the bounds (the key rounded to their dtype)."""
    pos = _last(pos, k.device).reshape(1)
    x = k.float()
    x1, x2 = x.chunk(2, dim=-1)
    kr = (x * cos.float() + torch.cat((-x2, x1), dim=-1) * sin.float()).to(pmin.dtype if kc is None else kc.dtype)
    if kc is not None:      # None: the bounds only (quant+quest keeps the keys and values elsewhere)
        kc.index_copy_(2, pos, kr)
        vc.index_copy_(2, pos, v.to(vc.dtype))
    fold_token_bounds(kr, pos, pmin, pmax, page=page)
    pg = pos // page
    if codes is not None and int(pos) % page == page - 1:
        p = int(pg)
        codes[:, :, p] = page_codes(kc[:, :, p * page:(p + 1) * page], pmin[:, :, p:p + 1], pmax[:, :, p:p + 1],
                                    bits)[:, :, 0]


def fold_token_bounds(kr, pos, pmin, pmax, *, page: int) -> None:
    """The page min/max part of `append_token`, graph-safe: kr (B, Hkv, 1, D) after RoPE at `pos`
    (device tensor (1,)) → page pos // page becomes kr (its first slot) or widens to include it."""
    pos = _last(pos, kr.device).reshape(1)
    pg = pos // page
    first = (pos % page == 0).reshape(1, 1, 1, 1)
    kr = kr.to(pmin.dtype)
    pmin.index_copy_(2, pg, torch.where(first, kr, torch.minimum(pmin.index_select(2, pg), kr)))
    pmax.index_copy_(2, pg, torch.where(first, kr, torch.maximum(pmax.index_select(2, pg), kr)))


def fold_chunk_bounds(kr, start: int, pmin, pmax, *, page: int) -> None:
    """kr (B, Hkv, T, D) after RoPE at positions [start, start + T) folded into the min/max of the
    pages they touch (a page partly filled before keeps its earlier tokens)."""
    B, H, T, D = kr.shape
    end = start + T
    p0, p1 = start // page, -(-end // page)
    off = start - p0 * page
    pad = torch.nn.functional.pad(kr.float(), (0, 0, off, (p1 - p0) * page - off - T))
    ok = torch.zeros((p1 - p0) * page, dtype=torch.bool, device=kr.device)
    ok[off:off + T] = True
    x = pad.reshape(B, H, p1 - p0, page, D)
    ok = ok.reshape(1, 1, p1 - p0, page, 1)
    mn = x.masked_fill(~ok, float("inf")).amin(3)
    mx = x.masked_fill(~ok, float("-inf")).amax(3)
    if off:
        mn[:, :, 0] = torch.minimum(mn[:, :, 0], pmin[:, :, p0].float())
        mx[:, :, 0] = torch.maximum(mx[:, :, 0], pmax[:, :, p0].float())
    pmin[:, :, p0:p1], pmax[:, :, p0:p1] = mn.to(pmin.dtype), mx.to(pmax.dtype)


def page_scores(q, pmin, pmax, pos, *, page: int, sink: int, recent: int) -> torch.Tensor:
    """Upper bound of each page's logit, max over the KV head's query group → (B, Hkv, MP) fp32.
    npages = pos // page + 1 pages hold tokens; later pages get -inf, the first `sink` and the last
    `recent` of the npages +inf (always read)."""
    B, Hq, _, D = q.shape
    Hkv, MP = pmin.shape[1], pmin.shape[2]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)
    c, r = (pmax.float() + pmin.float()) / 2, (pmax.float() - pmin.float()) / 2
    s = (qf @ c.transpose(-1, -2) + qf.abs() @ r.transpose(-1, -2)).amax(2)   # (B, Hkv, MP)
    p = torch.arange(MP, device=q.device)
    npages = _last(pos, q.device) // page + 1
    s = s.masked_fill((p < sink) | ((p >= npages - recent) & (p < npages)), float("inf"))
    return s.masked_fill(p >= npages, float("-inf"))


def select_pages(scores: torch.Tensor, k: int, pos, *, page: int, row_pages: int):
    """The page table of the top-k pages of each (b, kv head) row: scores (B, Hkv, MP) (pages
    ≥ npages = pos // page + 1 are never taken) → table (B·Hkv, k) int32 of pool page ids
    row·row_pages + page, ascending, the first nsel entries valid; nsel (B·Hkv,) int32 = min(k, npages);
    last (B·Hkv,) int32 tokens in the final entry (pos % page + 1 if it is the page holding pos, else
    page). Equal scores: the lower page wins (a stable descending sort)."""
    B, Hkv, MP = scores.shape
    BH = B * Hkv
    pos = _last(pos, scores.device)
    npages = torch.clamp(pos // page + 1, max=MP)
    valid = torch.arange(MP, device=scores.device) < npages
    s = scores.reshape(BH, MP).masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    n = torch.clamp(npages, max=k)
    ids = order.masked_fill(torch.arange(order.shape[1], device=s.device) >= n, MP).sort(dim=-1).values
    top = ids.gather(1, (n - 1).reshape(1, 1).expand(BH, 1)).reshape(BH)
    ids = ids.masked_fill(ids >= MP, 0)
    table = (ids + torch.arange(BH, device=s.device).reshape(BH, 1) * row_pages).to(torch.int32)
    last = torch.where(top == npages - 1, pos % page + 1, page).to(torch.int32)
    return table, n.to(torch.int32).expand(BH).contiguous(), last


def page_groups(table: torch.Tensor, nsel: torch.Tensor, length, *, sub: int, row_pages: int, row_groups: int,
                group: int, sink: int, window: int):
    """Pages of `sub` consecutive key groups (quest over a packed storage, page > group) → the groups to read:
    table (B·Hkv, K) of global page ids bh·row_pages + page, the first nsel[bh] of them taken, ascending →
    ids (B·Hkv, K·sub) int32 global group ids bh·row_groups + page·sub + j, in the same order, and count
    (B·Hkv,) int32: how many of the first ones are groups of taken pages already quantized, n_q = (length − 1
    − sink − window) // group of the row (a taken page may be the one still filling, the last taken: its
    later groups are in the full-precision window)."""
    dev = table.device
    row = torch.arange(table.shape[0], device=dev)[:, None] * row_groups
    local = (table.long() % row_pages)[:, :, None] * sub + torch.arange(sub, device=dev)
    ids = row + local.flatten(1)
    nq = torch.clamp((_last(length, dev) - 1 - sink - window) // group, min=0)
    taken = (torch.arange(ids.shape[1], device=dev) // sub)[None, :] < nsel.reshape(-1, 1)
    count = ((local.flatten(1) < nq) & taken).sum(-1)
    return ids.to(torch.int32), count.to(torch.int32)


def rerank_scores(q, k_pool, bound, table, nsel, last, *, row_pages: int, rank: str = "max", scale: float = 1.0,
                  softcap: float | None = None) -> torch.Tensor:
    """Page scores for Quest's second stage: bound (B, Hkv, MP) from `page_scores`; table, nsel, last:
    candidate pages from `select_pages`. → (B, Hkv, MP) fp32, -inf for every page not a candidate,
    +inf kept where the bound forced the page (sink and recent), and for each candidate:
    rank=max: its largest logit q·k over its tokens and the KV head's query group;
    rank=mass: its share of the attention (`page_mass` of each query's log-sum-exp over the page's
    tokens of the scaled, soft-capped logits)."""
    if rank not in ("max", "mass"):
        raise ValueError(f"rank={rank!r}: max or mass")
    B, Hq, _, D = q.shape
    Hkv, MP = bound.shape[1], bound.shape[2]
    G, P = Hq // Hkv, k_pool.shape[1]
    out = torch.full((B * Hkv, MP, G), float("-inf"), device=q.device)
    qg = q.float().reshape(B * Hkv, G, D)
    for r in range(B * Hkv):
        n = int(nsel.reshape(-1)[r])
        ids = table[r, :n].long()
        lg = torch.einsum("gd,npd->npg", qg[r], k_pool[ids].float())   # (n, P, G)
        tok = torch.arange(P, device=q.device).expand(n, P)
        final = torch.arange(n, device=q.device)[:, None] == n - 1
        drop = (final & (tok >= int(last.reshape(-1)[r])))[..., None]
        if rank == "mass":
            lg = lg * scale
            if softcap:
                lg = softcap * torch.tanh(lg / softcap)
            out[r, ids - r * row_pages] = lg.masked_fill(drop, float("-inf")).logsumexp(1)
        else:
            out[r, ids - r * row_pages] = lg.masked_fill(drop, float("-inf")).amax(1)
    out = out.reshape(B, Hkv, MP, G)
    if rank == "mass":
        return page_mass(out, bound)
    out = out.amax(-1)
    return torch.where(bound == float("inf"), bound, out)


def page_mass(lse: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """lse (B, Hkv, MP, G): each query's log-sum-exp over a candidate page's tokens, -inf for a page
    not a candidate → (B, Hkv, MP) the log of the page's attention mass over the candidates, summed over
    the query group: log Σ_g exp(lse_g − Z_g), Z_g = logsumexp over the candidate pages. Ranking by it
    ranks by the mass the page would carry if the candidates were all that was read (the max logit
    misses pages of many moderately-scoring tokens: BENCHMARKS.md, Quest's depth-0 diagnostic).
    Forced pages stay +inf."""
    z = lse.logsumexp(2, keepdim=True)
    score = (lse - z.masked_fill(z == float("-inf"), 0.0)).logsumexp(-1)   # a query with no candidate adds nothing
    return torch.where(bound == float("inf"), bound, score)


def rerank_code_scores(q, codes_pool, mn_pool, mx_pool, bound, table, nsel, last, *, row_pages: int,
                       bits: int, rank: str = "max", scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """`rerank_scores` with each candidate page's keys read back from its `bits`-bit page-relative
    codes (`page_keys`): codes_pool (NP, P, D·bits/8), mn_pool/mx_pool (NP, D), the same pool page ids."""
    return rerank_scores(q, page_keys(codes_pool, mn_pool, mx_pool, bits), bound, table, nsel, last,
                         row_pages=row_pages, rank=rank, scale=scale, softcap=softcap)


def forced_bound(shape, pos, *, page: int, sink: int, recent: int, device=None) -> torch.Tensor:
    """A bound of shape (B, Hkv, MP) that only forces: +inf on the pages `page_scores` forces (the
    first `sink` and last `recent` of the npages = pos // page + 1), 0 on the other pages up to pos,
    -inf past it."""
    MP = shape[-1]
    p = torch.arange(MP, device=device)
    npages = _last(pos, device) // page + 1
    s = torch.zeros(shape, device=device).masked_fill((p < sink) | ((p >= npages - recent) & (p < npages)),
                                                      float("inf"))
    return s.masked_fill(p >= npages, float("-inf"))


def all_page_code_scores(q, codes, pmin, pmax, pos, *, bits: int, sink: int, recent: int, rank: str = "max",
                         scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """`rerank_code_scores` with every page up to the one holding pos a candidate and the first `sink`
    and last `recent` of them forced (+inf): codes (B, Hkv, MP, P, D·bits/8), pmin/pmax (B, Hkv, MP, D)
    the cache's buffers."""
    B, Hkv, MP, P = codes.shape[:4]
    D = pmin.shape[-1]
    bound = forced_bound((B, Hkv, MP), pos, page=P, sink=sink, recent=recent, device=q.device)
    cand = select_pages(bound, MP, pos, page=P, row_pages=MP)
    return rerank_code_scores(q, codes.reshape(-1, P, codes.shape[-1]), pmin.reshape(-1, D), pmax.reshape(-1, D),
                              bound, *cand, row_pages=MP, bits=bits, rank=rank, scale=scale, softcap=softcap)


def paged_attention(q, k_pool, v_pool, table, nsel, last, *, scale: float, softcap: float | None = None):
    """q (B, Hq, 1, D) against the tokens listed by the page table → (B, Hq, 1, D) in q's dtype."""
    out, _ = paged_attention_lse(q, k_pool, v_pool, table, nsel, last, scale=scale, softcap=softcap)
    return out.to(q.dtype)


def paged_attention_lse(q, k_pool, v_pool, table, nsel, last, *, scale, softcap=None):
    B, _, _, D = q.shape
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

