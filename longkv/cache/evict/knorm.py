"""`knorm`: keep the keys of smallest L2 norm (Devoto et al., "A Simple and Effective L2 Norm-Based
Strategy for KV Cache Compression", arXiv 2406.11430; kvpress's KnormPress is `-keys.norm(dim=-1)`).
Query-free, so it needs no attention weights; RoPE preserves norms, so stored (rotated) keys serve.
"""
from __future__ import annotations

import torch

from ..registry import register
from .base import BUDGET_PARAMS, EvictionCache, Scorer, ScoreInput


class KeyNorm(Scorer):
    def score(self, x: ScoreInput) -> torch.Tensor:
        return -x.k.float().norm(dim=-1)


@register("knorm", help="keep the keys with the smallest L2 norm (query-free); ratio = fraction removed, "
          "budget = tokens kept", params=dict(BUDGET_PARAMS), composes=("full", "quant"))
class KnormCache(EvictionCache):
    scorer_cls = KeyNorm
