"""`full`: the uncompressed cache, one preallocated (B, Hkv, capacity, D) buffer per layer for keys
(stored after RoPE) and one for values. The baseline every other method is measured against.

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


@register("full", help="every key and value kept in the run's dtype (the baseline)")
class FullCache(Cache):
    graph_safe = True

    def __init__(self, specs, *, batch, capacity, device, dtype):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.k = [torch.zeros(batch, s.num_kv_heads, capacity, s.head_dim, device=device, dtype=dtype) for s in specs]
        self.v = [torch.zeros_like(x) for x in self.k]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def past_attention(self, layer, q, step: Step):
        n = step.start
        if n == 0:
            return None
        s = self.specs[layer]
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
        self.k[layer][:, :, step.start:end] = apply_rope(k, cos, sin)
        self.v[layer][:, :, step.start:end] = v

    def decode(self, layer, q, k, v, step: Step):
        from ..kernels.decode import decode_attention

        s = self.specs[layer]
        cos, sin = step.rope[s.rope_index]
        self.k[layer].index_copy_(2, step.pos, apply_rope(k, cos, sin))
        self.v[layer].index_copy_(2, step.pos, v)
        return decode_attention(q, self.k[layer], self.v[layer], step.pos[-1] + 1, scale=s.scale,
                                window=s.window, softcap=s.softcap)
