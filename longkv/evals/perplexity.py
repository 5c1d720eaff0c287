"""Long-document perplexity with the context fed through the cache in chunks.

Protocol: KVQuant's (SqueezeAILab/KVQuant `quant/kvquant/datautils.py`, GPTQ lineage): the corpus is
tokenised once and cut into non-overlapping windows of the target length; each window starts from an
empty cache and is scored on all its next-token predictions; perplexity = exp(mean of the windows'
mean losses). Like YaRN's and Hugging Face's evaluation (and unlike KVQuant, which relies on one BOS at
the start of the stream), each window begins with the tokenizer's BOS when it has one: Gemma-family
models are far off their training distribution without it.

Each window goes through `prefill` one chunk at a time into a cache built from the spec, and the
chunk's logits are scored before the next chunk runs: a compressed cache is measured the way decoding
would see it (every chunk attends to what the cache kept of the past), and only one chunk of logits
(chunk × vocab) is ever held.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..engine.prefill import prefill
from ..errors import UserError


@torch.inference_mode()
def window_nll(model, cache, ids: list[int], *, chunk: int) -> float:
    """Summed negative log-likelihood (nats) of ids[1:] given the prefix, ids fed `chunk` at a time.

    ids: one window, len T >= 2; cache: empty, capacity >= T. Returns the sum over T - 1 targets."""
    if chunk < 1:
        raise UserError("--chunk must be at least 1")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    prev = None                                   # (1, V) logits of the previous chunk's last token
    for s in range(0, x.shape[1], chunk):
        part = x[:, s:s + chunk]
        logits = prefill(model, cache, part, chunk=chunk, logits="all")[0].float()     # (n, V)
        if prev is not None:                      # the chunk's first token, predicted across the seam
            total += F.cross_entropy(prev, part[0, :1], reduction="sum").double()
        if part.shape[1] > 1:
            total += F.cross_entropy(logits[:-1], part[0, 1:], reduction="sum").double()
        prev = logits[-1:]
    return float(total)


def windows(ids: list[int], length: int, *, bos: int | None, limit: int | None) -> list[tuple[int, list[int]]]:
    """Non-overlapping windows of `length` tokens (BOS first when given), as (window number, ids).

    With `limit`, that many windows evenly spread over the corpus (so a capped run still sees its
    whole range, not only the first book)."""
    body = length - (1 if bos is not None else 0)
    n = len(ids) // body
    if n == 0:
        raise UserError(f"the corpus has {len(ids)} tokens, fewer than one {length}-token window")
    pick = range(n)
    if limit is not None and limit < n:
        pick = sorted({round(j * (n - 1) / max(1, limit - 1)) for j in range(limit)}) if limit > 1 else [0]
    out = []
    for w in pick:
        chunk = ids[w * body:(w + 1) * body]
        out.append((w, ([bos] if bos is not None else []) + chunk))
    return out


def summarize(nll_and_tokens: list[tuple[float, int]]) -> dict:
    """KVQuant's ppl (exp of the mean per-window loss) and the token-weighted one (equal when every
    window has the same length, as here); both, because implementations differ."""
    if not nll_and_tokens:
        return {"ppl": float("nan"), "ppl_token_weighted": float("nan"), "windows": 0, "tokens": 0}
    means = [nll / n for nll, n in nll_and_tokens]
    tokens = sum(n for _, n in nll_and_tokens)
    return {"ppl": math.exp(sum(means) / len(means)),
            "ppl_token_weighted": math.exp(sum(nll for nll, _ in nll_and_tokens) / tokens),
            "windows": len(means), "tokens": tokens}
