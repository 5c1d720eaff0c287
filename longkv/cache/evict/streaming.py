"""`streaming`: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): keep the first `sink` tokens (attention sinks) and the most recent ones, drop the
middle. The kept tokens keep their original positions (as kvpress's StreamingLLMPress without key
re-rotation). Decoding writes into a ring, so the cache stays at its budget however long it runs.
"""
from __future__ import annotations

import torch

from ...errors import UserError
from ..registry import register
from .base import BUDGET_PARAMS, EvictionCache, Scorer, ScoreInput


class Recency(Scorer):
    def __init__(self, sink: int = 4):
        self.sink = sink

    def score(self, x: ScoreInput) -> torch.Tensor:
        s = x.pos.float()
        return s.masked_fill(x.pos < self.sink, float("inf"))


@register("streaming", help="StreamingLLM: `sink` first tokens + the most recent; the rest is dropped "
          "(budget = sink + recent, ratio = fraction removed); decode keeps the budget as a ring",
          params={**BUDGET_PARAMS, "sink": (int, 4, "attention-sink tokens always kept")},
          composes=("full", "quant"))
class StreamingCache(EvictionCache):
    scorer_cls = Recency
    policy = "ring"

    def __init__(self, specs, *, sink: int = 4, **kw):
        if sink < 0:
            raise UserError(f"streaming: sink must be >= 0, got {sink}")
        if kw.get("budget") is not None and kw["budget"] <= sink:
            raise UserError(f"streaming: budget ({kw['budget']}) must exceed sink ({sink}) to leave a recent window")
        super().__init__(specs, sink=sink, **kw)
        self.sink = sink
