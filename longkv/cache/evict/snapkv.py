"""`snapkv`: SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469). The last `window` queries (the observation window) vote: their attention to every
earlier key, averaged over the window and over each KV head's query group (GQA: one cache per KV head,
as KVCache-Factory's `kv_head` granularity), smoothed by 1-D average pooling (`kernel`); the window
itself is always kept.

Question-aware or not: the final compaction of a prompt uses the prompt's last `window` tokens, so
when the prompt ends with the question it is question-aware (as SnapKV's paper); when the context is
compressed before the question arrives (a later chunk), it is question-agnostic (kvpress's default).
`stats()` reports the window's positions and, when the caller set `cache.question_at`, which it was.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register
from .base import BUDGET_PARAMS, EvictionCache, Scorer, ScoreInput

SNAP_PARAMS = {**BUDGET_PARAMS,
               "window": (int, 64, "observation window: the latest queries that vote (always kept)"),
               "kernel": (int, 5, "average-pooling width over neighbouring tokens")}


class WindowVote(Scorer):
    def __init__(self, window: int = 64, kernel: int = 5):
        self.window, self.kernel = max(1, window), max(1, kernel)

    def score(self, x: ScoreInput) -> torch.Tensor:
        p = x.window_probs().mean(dim=(2, 3))                            # (B, Hkv, N)
        if self.kernel > 1:
            B, H, N = p.shape
            p = F.avg_pool1d(p.reshape(B * H, 1, N), self.kernel, stride=1, padding=self.kernel // 2,
                             count_include_pad=False)[..., :N].reshape(B, H, N)
        return x.protect_recent(p, self.window)


class SnapKVCache(EvictionCache):
    scorer_cls = WindowVote

    def stats(self) -> dict:
        st = super().stats()
        if self.last_window:
            a, b = self.last_window
            st["scored_with"] = f"queries at positions [{a}, {b})"
            if self.question_at is not None:
                st["question"] = "question-aware" if b > self.question_at else "question-agnostic"
        return st


register("snapkv", help="SnapKV: the last `window` queries vote (attention pooled over each KV head's "
         "group); ratio = fraction removed, budget = tokens kept; question-aware when the prompt ends "
         "with the question", params=SNAP_PARAMS, composes=("full", "quant"))(SnapKVCache)
