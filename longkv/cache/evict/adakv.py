"""`adakv`: head-adaptive budgets (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", arXiv 2407.11550), wrapping a scorer: `adakv+snapkv:ratio=0.5`.

A layer's budget is H·m tokens (m = what each KV head would keep uniformly); every KV head first gets
its `alpha`·m best tokens (kvpress's alpha_safeguard), the rest go to the best scores of the layer
across heads. Scores are pooled over each KV head's query group (GQA: one cache per KV head). Unlike
kvpress's AdaKVPress, which masks tokens in a full-size cache, heads are **stored** with different
lengths in pages (`paged.py`): memory is what the heads keep, rounded up to a page per head.
Sliding-window layers (Gemma 3) keep exactly their window as a ring, as under every eviction method
(`base.py`): there is no budget to share across heads there.
"""
from __future__ import annotations

import functools

import torch

from ...errors import UserError
from ...models.rope import apply_rope
from ..registry import register
from .base import ScoreInput
from .paged import PagedStorage


def adaptive_keep(scores: torch.Tensor, valid: torch.Tensor, m: int, alpha: float) -> list[torch.Tensor]:
    """scores, valid (B, H, N); H·m tokens per batch element → per (b, h) row, kept indices ascending."""
    B, H, N = scores.shape
    scores = scores.float().masked_fill(~valid, float("-inf"))
    floor = min(int(alpha * m), int(valid.sum(-1).min()))
    sel = torch.zeros(B, H, N, dtype=torch.bool, device=scores.device)
    if floor:
        sel.scatter_(2, scores.topk(floor, dim=-1).indices, True)
    rest = H * m - H * floor
    if rest:
        flat = scores.masked_fill(sel, float("-inf")).reshape(B, H * N)
        sel.view(B, H * N).scatter_(1, flat.topk(rest, dim=-1).indices, True)
    sel &= valid
    return [row.nonzero()[:, 0] for row in sel.reshape(B * H, N)]


def _heads_only(method):
    """AdaKV's version of a per-layer method for global layers; sliding-window layers (their ring)
    run the eviction method's own."""
    @functools.wraps(method)
    def run(self, layer, *args, **kw):
        if self._windowed(layer):
            return getattr(super(_AdaKV, self), method.__name__)(layer, *args, **kw)
        return method(self, layer, *args, **kw)
    return run


class _AdaKV:
    """Mixed in before an eviction method's class (see `AdaKVCache.wrap`)."""

    def __init__(self, specs, *, alpha: float = 0.2, page: int = 16, **kw):
        super().__init__(specs, **kw)
        if not 0 <= alpha <= 1:
            raise UserError(f"adakv: alpha is the share of a head's uniform budget it always keeps, in [0, 1]; got {alpha}")
        self.alpha = alpha
        self.ring = self.store    # the method's own storage: sliding-window layers' rings live there
        self.store = PagedStorage(specs, batch=self.batch, device=self.device, dtype=self.dtype, page=page)
        self.offh: list = [None] * len(specs)

    def _windowed(self, layer: int) -> bool:
        return self.specs[layer].window is not None

    def storage(self, layer: int):
        return self.ring if self._windowed(layer) else self.store

    def nbytes(self) -> int:
        return (super().nbytes() + self.ring.nbytes()
                + sum(t.numel() * t.element_size() for t in self.offh if t is not None))

    @_heads_only
    def past_attention(self, layer, q, step):
        return self.store.past_attention(layer, q)

    @_heads_only
    def append(self, layer, k, v, step):
        cos, sin = step.rope[self.specs[layer].rope_index]
        self.store.append(layer, apply_rope(k, cos, sin), v, step.pos)
        self.n[layer] = max(self.store.lens[layer])
        self.seen[layer] += step.n
        self.pending[layer] = True

    @_heads_only
    def score_input(self, layer):
        k, v, pos, valid = self.store.padded(layer)
        qw = self.qwin[layer]
        return ScoreInput(layer, self.specs[layer], k, v, pos, valid=valid,
                          q=None if qw is None else qw[0], q_pos=None if qw is None else qw[1])

    @_heads_only
    def _compact(self, layer):
        if not self.pending[layer]:
            return
        self.pending[layer] = False
        m, lens = self.keep(layer, self.seen[layer]), self.store.lens[layer]
        H = self.specs[layer].num_kv_heads
        if all(sum(lens[b * H:(b + 1) * H]) <= H * m for b in range(self.batch)):
            return
        x = self.score_input(layer)
        self.store.keep(layer, adaptive_keep(self.scorer.score(x), x.valid, m, self.alpha))
        self.n[layer] = max(self.store.lens[layer])
        self.compactions += 1
        if x.q_pos is not None:
            self.last_window = (int(x.q_pos[0]), int(x.q_pos[-1]) + 1)

    @_heads_only
    def _enter_decode(self, layer):
        self._compact(layer)
        self.qwin[layer] = None
        self.store.prepare_decode(layer, max(1, self.capacity - self.seen[layer]))
        self.offh[layer] = self.seen[layer] - torch.tensor(self.store.lens[layer], device=self.device)
        self.decoding[layer] = True

    @_heads_only
    def decode_step(self, layer, q, k, v, pos, cos, sin):
        phys = pos - self.offh[layer]
        self.store.decode_write(layer, apply_rope(k, cos, sin), v, pos, phys)
        return self.store.decode_attention(layer, q, phys)

    def advance(self, n):
        dec = n == 1 and all(self.decoding)
        super().advance(n)
        if dec:
            for i in range(len(self.specs)):
                if not self._windowed(i):
                    self.store.bump(i)

    def kept_tokens(self) -> int:
        return sum(self.n[i] * self.batch * s.num_kv_heads if self._windowed(i) else sum(self.store.lens[i])
                   for i, s in enumerate(self.specs))

    def stats(self) -> dict:
        st = super().stats()
        per_head = [n for i, lens in enumerate(self.store.lens) if not self._windowed(i) for n in lens]
        st.update(adakv_alpha=self.alpha)
        if per_head:   # none when every layer has a sliding window
            st.update(head_tokens_min=min(per_head), head_tokens_max=max(per_head),
                      kept_per_head=round(sum(per_head) / len(per_head), 1))
        return st



@register("adakv", help="AdaKV wrapper: per-KV-head budgets chosen across heads (each head keeps >= alpha "
          "of its share), heads stored with different lengths in pages; wraps a scorer: adakv+snapkv:ratio=0.5",
          params={"alpha": (float, 0.2, "share of a head's uniform budget it always keeps"),
                  "page": (int, 16, "tokens per page of the ragged per-head storage")},
          composes=("snapkv", "pyramidkv", "knorm"))
class AdaKVCache:
    role = "wrap"

    @classmethod
    def wrap(cls, method: type) -> type:
        return type(f"AdaKV{method.__name__}", (_AdaKV, method), {"name": f"adakv+{method.name}", "__module__": __name__})
