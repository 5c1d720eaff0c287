"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
arXiv:2401.01325) as a wrapper around any cache.

A query at position p reads a key at position j (d = p - j) with
- exact positions when d < window (neighbour attention): score q_p . k_j as usual;
- grouped positions otherwise: the key sits at j // G and the query at p // G + window - window // G,
  so distances stay within the trained range and meet the neighbour ones at d = window.
The paper mixes the two score matrices before one softmax; here the key set is split instead and the
parts merged by log-sum-exp, which is the same softmax.

How it composes with any cache: the wrapper keeps the last `window` tokens' pre-RoPE keys and values
itself (the band every query may need at exact positions) and hands a token to the wrapped cache only
once it is `window` tokens old, i.e. distant for every later query. It hands over key j pre-rotated
by the pure rotation R(j // G - j) (`Rope.rotation`): whatever the cache does with a pre-RoPE key
(rotate it at append through `step.rope`, or at read from `inv_freq` and j, in a kernel or not), R(j)
then lands the key at R(j // G), its grouped position, because rotations compose by adding angles.
The query is moved the same way, from p to its grouped position. So the wrapped cache's own
`past_attention` *is* the grouped attention over the distant tokens: no cache needs to know, none
needs a pre-RoPE read hook, and no key is ever un-rotated. The cost: a pre-RoPE quantizer (KVQuant)
sees keys twisted within each rotary pair, so its per-channel statistics are a little less clean.
The wrapped cache sees tokens `window` late: its `length` and positions trail the run's by `window`.

Costs: the band (window + chunk keys) is attended with the plain-torch reference (masks), twice;
the distant part goes through the wrapped cache's own (fused) path. `nbytes()` counts the band.
Sliding-window layers (Gemma 3's local ones) never reach past the band and use exact positions only.
Not graph-safe (the band's bookkeeping is host-side): decode runs eagerly. The wrapped cache is driven
through `past_attention`, `append` and `advance` only, so a cache that does its own work in an
overridden `attend` (the eviction caches compact and remember queries there) is refused: it would
need `attend` to return its log-sum-exp as well.
"""
from __future__ import annotations

import torch

from ..cache.base import Cache, LayerSpec, Step
from ..errors import UserError
from ..kernels.reference import attention_lse, merge_lse, visible
from ..models.rope import apply_rope as _apply_rope

# The band is plain torch (a reference path): the eager RoPE, not the compiled one, whose shape
# specializations (1 KV head, band lengths, fp32 rotations) ran past torch.compile's recompile limit
# on gemma3-270m (H200, 2026-12-03).
apply_rope = _apply_rope.reference


class SelfExtendCache(Cache):
    """Self-Extend around the cache `build_inner(specs)` returns (`specs` unchanged)."""

    name = "self-extend"
    graph_safe = False

    def __init__(self, specs: list[LayerSpec], build_inner, *, group: int, window: int, batch: int,
                 capacity: int, device, dtype):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.group, self.window = group, window
        self.inner = build_inner(specs)
        if type(self.inner).attend is not Cache.attend:
            # its bookkeeping (compaction, query windows) lives in attend(), which returns no lse to merge
            raise UserError(f"--rope self-extend does not compose with the {self.inner.name} cache yet: that "
                            f"cache does its own work in attend(); use a RoPE scaling (e.g. yarn) with it")
        self.buf_k: list[torch.Tensor | None] = [None] * len(specs)   # pre-RoPE, the last <= window tokens
        self.buf_v: list[torch.Tensor | None] = [None] * len(specs)
        self.pushed = 0          # tokens handed to the wrapped cache (all older than the band)
        self._planned = None

    # -- positions ------------------------------------------------------------------------------------
    def grouped_query_pos(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.div(pos, self.group, rounding_mode="floor") + self.window - self.window // self.group

    def _rot(self, x: torch.Tensor, rope, delta: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) rotated by the pure rotation of `delta` (T,) positions, in fp32 math."""
        return apply_rope(x.float(), *rope.rotation(delta)).to(x.dtype)

    def _tables(self, pos: torch.Tensor):
        ropes = {s.rope_index: s.rope for s in self.specs}
        return [ropes[i].cos_sin(pos, self.dtype) if i in ropes else None for i in range(max(ropes) + 1)]

    def _plan(self, step: Step) -> None:
        """Once per forward: how many tokens leave the band, and the wrapped cache's two steps."""
        if self._planned is step:
            return
        dev = step.pos.device
        self._nb = self.length - self.pushed
        self._n_push = max(0, self._nb + step.n - self.window)
        self._q_delta = self.grouped_query_pos(step.pos) - step.pos
        # the wrapped cache's view: its queries come right after what it holds
        past_pos = torch.arange(self.pushed, self.pushed + step.n, device=dev)
        self._past_step = Step(pos=past_pos, start=self.pushed, rope=self._tables(past_pos))
        push_pos = torch.arange(self.pushed, self.pushed + self._n_push, device=dev)
        self._push_step = Step(pos=push_pos, start=self.pushed, rope=self._tables(push_pos))
        self._push_delta = torch.div(push_pos, self.group, rounding_mode="floor") - push_pos
        self._planned = step

    # -- the cache contract ------------------------------------------------------------------------------
    def attend(self, layer: int, q, k, v, *, step: Step) -> torch.Tensor:
        """q (B, Hq, T, D) post-RoPE at step.pos, k/v (B, Hkv, T, D) pre-RoPE → (B, Hq, T, D)."""
        if step.start is None:
            raise NotImplementedError("self-extend decodes eagerly (not inside a CUDA graph)")
        self._plan(step)
        s, nb = self.specs[layer], self._nb
        band_k = k if nb == 0 else torch.cat([self.buf_k[layer], k], dim=2)
        band_v = v if nb == 0 else torch.cat([self.buf_v[layer], v], dim=2)
        band_pos = torch.arange(step.start - nb, step.start + step.n, device=q.device)
        near = visible(step.pos, band_pos, s.window if s.window is not None else self.window)
        k_exact = apply_rope(band_k, *s.rope.cos_sin(band_pos, band_k.dtype))
        out, lse = attention_lse(q, k_exact, band_v, scale=s.scale, mask=near, softcap=s.softcap)
        if s.window is None and (nb + step.n > self.window or self.pushed):
            qg = self._rot(q, s.rope, self._q_delta)
            if nb + step.n > self.window:   # some band keys are distant for some queries
                far = (step.pos[:, None] - band_pos[None, :]) >= self.window
                k_far = apply_rope(band_k, *s.rope.cos_sin(torch.div(band_pos, self.group, rounding_mode="floor"),
                                                            band_k.dtype))
                out, lse = merge_lse(out, lse, *attention_lse(qg, k_far, band_v, scale=s.scale, mask=far,
                                                              softcap=s.softcap))
            if self.pushed:
                past = self.inner.past_attention(layer, qg, self._past_step)
                if past is not None:
                    out, lse = merge_lse(out, lse, *past)
        n = self._n_push
        if n:
            k_old = band_k[:, :, :n] if s.window is not None else self._rot(band_k[:, :, :n], s.rope, self._push_delta)
            self.inner.append(layer, k_old, band_v[:, :, :n], self._push_step)
        self.buf_k[layer] = band_k[:, :, n:].contiguous()
        self.buf_v[layer] = band_v[:, :, n:].contiguous()
        return out.to(q.dtype)

    def advance(self, n: int) -> None:
        self.length += n
        if self._planned is not None:
            self.inner.advance(self._n_push)
            self.pushed += self._n_push
            self._planned = None

    def past_attention(self, layer, q, step):  # the wrapper answers through `attend` only
        raise NotImplementedError

    def append(self, layer, k, v, step):
        raise NotImplementedError

    def nbytes(self) -> int:
        band = sum(t.numel() * t.element_size() for t in self.buf_k + self.buf_v if t is not None)
        return self.inner.nbytes() + band

    def stats(self) -> dict:
        return {**super().stats(), "cache": f"{self.inner.name} (self-extend group={self.group}, window={self.window})"}
