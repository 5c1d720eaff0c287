"""`full`: the uncompressed cache, one preallocated (B, Hkv, capacity, D) buffer per layer for keys
(stored after RoPE) and one for values. The baseline every other method is measured against.

Sliding-window layers (Gemma 3's local ones, Mistral's) keep only what they can still see: a ring
of `window` slots, position p in slot p % window (as transformers' sliding-window cache layers do).
A query at p reads keys in (p - window, p], which is exactly the ring after p is written.

Decode on CUDA runs the Triton flash-decoding kernel, which reads only the first `length` slots
(the length comes from a device tensor, so the step can be replayed in a CUDA graph).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..kernels.attention import past_attention
from ..models.rope import apply_rope
from .base import Cache, Step
from .registry import register


@register("full", help="every key and value kept in the run's dtype (the baseline; sliding-window layers keep "
          "their window)")
class FullCache(Cache):
    graph_safe = True

    def __init__(self, specs, *, batch, capacity, device, dtype, ring: bool = True):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        # ring=False keeps every token of sliding-window layers too (calibrate_duo's probe reads them all)
        self.ring = [s.window if ring and s.window is not None and s.window < capacity else None for s in specs]
        self.k = [torch.zeros(batch, s.num_kv_heads, w or capacity, s.head_dim, device=device, dtype=dtype)
                  for s, w in zip(specs, self.ring)]
        self.v = [torch.zeros_like(x) for x in self.k]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def past_attention(self, layer, q, step: Step):
        n = step.start
        if n == 0:
            return None
        s, w = self.specs[layer], self.ring[layer]
        if w is not None:    # slot j holds the latest position p < n with p % w == j
            m = min(n, w)
            k, v = self.k[layer][:, :, :m], self.v[layer][:, :, :m]
            k_pos = n - m + (torch.arange(m, device=q.device) - n) % m
        else:
            lo = 0 if s.window is None else max(0, n - s.window + 1)
            k, v = self.k[layer][:, :, lo:n], self.v[layer][:, :, lo:n]
            k_pos = torch.arange(lo, n, device=q.device) if s.window is not None else None
        return past_attention(q, k, v, scale=s.scale, q_pos=step.pos, k_pos=k_pos, window=s.window,
                              softcap=s.softcap)

    def append(self, layer, k, v, step: Step):
        end = step.start + step.n
        if end > self.capacity:
            raise UserError(f"the cache holds {self.capacity} tokens and this step needs {end}")
        cos, sin = step.rope[self.specs[layer].rope_index]
        w = self.ring[layer]
        if w is not None:    # only the last w tokens of the chunk can still be seen
            t = min(step.n, w)
            slots = step.pos[-t:] % w
            dt = self.k[layer].dtype      # index_copy_ does not convert (slice assignment below does)
            self.k[layer].index_copy_(2, slots, apply_rope(k[:, :, -t:], cos[-t:], sin[-t:]).to(dt))
            self.v[layer].index_copy_(2, slots, v[:, :, -t:].to(dt))
            return
        self.k[layer][:, :, step.start:end] = apply_rope(k, cos, sin)
        self.v[layer][:, :, step.start:end] = v

    def decode(self, layer, q, k, v, step: Step):
        from ..kernels.decode import decode_attention

        s, w = self.specs[layer], self.ring[layer]
        cos, sin = step.rope[s.rope_index]
        slot = step.pos if w is None else step.pos % w
        self.k[layer].index_copy_(2, slot, apply_rope(k, cos, sin).to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slot, v.to(self.v[layer].dtype))
        if w is not None:    # the ring is the window: every filled slot is visible
            return decode_attention(q, self.k[layer], self.v[layer], torch.clamp(step.length, max=w),
                                    scale=s.scale, window=None, softcap=s.softcap)
        return decode_attention(q, self.k[layer], self.v[layer], step.length, scale=s.scale,
                                window=s.window, softcap=s.softcap)


def window_rings(specs, *, batch, capacity, device, dtype) -> tuple[dict, FullCache | None]:
    """Sliding-window layers kept as `full`'s ring inside another cache (`quant`, `kv4+quest`): → ({layer:
    its index in the local cache}, the local FullCache over those layers, or None where there are none)."""
    windowed = [i for i, s in enumerate(specs) if s.window is not None]
    local = FullCache([specs[i] for i in windowed], batch=batch, capacity=capacity, device=device,
                      dtype=dtype) if windowed else None
    return {i: j for j, i in enumerate(windowed)}, local
