"""Chunked prefill: feed a prompt through the model `chunk` tokens at a time.

Each chunk attends to the cached past (in whatever form the cache keeps it) and, causally, to
itself; the two are merged by log-sum-exp inside the cache. Peak activation memory is set by the
chunk, not by the prompt.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache.base import Cache


@torch.inference_mode()
def prefill(model, cache: Cache, ids: torch.Tensor, *, chunk: int = 2048, logits: str = "last",
            on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """ids (B, T) on the model's device → fp32 logits: (B, V) of the last token when logits="last",
    (B, T, V) for every position when logits="all". Positions continue from `cache.length`."""
    T = ids.shape[1]
    outs = []
    for s in range(0, T, chunk):
        n = min(chunk, T - s)
        start = cache.length
        pos = torch.arange(start, start + n, device=ids.device)
        out = model(ids[:, s:s + n], model.make_step(pos, start), cache, logits=logits)
        if logits == "all":
            outs.append(out)
        if on_chunk:
            on_chunk(n)
    return torch.cat(outs, dim=1) if logits == "all" else out[:, -1]
