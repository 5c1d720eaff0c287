"""`pyramidkv`: PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069): SnapKV's scores, but the budget is a pyramid over layers,
largest at the bottom. As in KVCache-Factory, the top layer keeps 1/beta of the average budget and the
bottom layer 2 - 1/beta times it, linearly in between, so the mean over layers is the requested
ratio or budget.
"""
from __future__ import annotations

from ..registry import register
from .base import EvictionCache
from .snapkv import SNAP_PARAMS, SnapKVCache


@register("pyramidkv", help="PyramidKV: SnapKV scores with per-layer budgets (more in lower layers, "
          "same mean); ratio = fraction removed, budget = mean tokens kept per layer",
          params={**SNAP_PARAMS, "beta": (float, 20.0, "top layer keeps mean/beta")},
          composes=("full", "quant"))
class PyramidKVCache(SnapKVCache):
    def __init__(self, specs, *, beta: float = 20.0, **kw):
        super().__init__(specs, **kw)
        L = len(specs)
        lo = 1.0 / max(beta, 1.0)
        hi = 2.0 - lo
        self.weights = [hi - (hi - lo) * i / max(1, L - 1) for i in range(L)]

    def keep(self, layer: int, n: int) -> int:
        mean = EvictionCache.keep(self, layer, n)
        if mean >= n:
            return n
        return max(1, min(n, round(mean * self.weights[layer])))
