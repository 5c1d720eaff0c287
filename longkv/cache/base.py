"""The cache contract: a KV cache owns attention.

A layer hands its cache the new queries (after RoPE), keys (*before* RoPE) and values; the cache
stores what it keeps and returns the attention output. Prefill goes in chunks: attention of the
chunk to the cached past (however the method stores it) is merged by log-sum-exp with causal
attention inside the chunk, so a chunk sees the compressed past exactly as decoding will.

Logical vs physical length: positions come from `Step.pos` (logical token indices), never from
what a cache physically holds. Every cache reports `nbytes()`, the bytes it really holds.
"""
from __future__ import annotations

import functools

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..kernels.attention import chunk_attention
from ..kernels.reference import merge_lse
from ..models.rope import Rope, apply_rope


@dataclass(frozen=True)
class LayerSpec:
    """What a cache needs to know about one attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rope: Rope
    rope_index: int                 # which of `Step.rope` this layer uses
    window: int | None = None       # sliding-window layers (Gemma 3, Mistral)
    softcap: float | None = None


@dataclass
class Step:
    """Per-forward metadata, built once by the model and passed to every layer.

    pos: (T,) int64 logical positions of the new tokens, on the device.
    start: pos[0] as a Python int when the host knows it (prefill, eager decode); None inside a
        CUDA graph, where only `pos` (a static device tensor) is valid.
    rope: per rope kind, (cos, sin) each (T, D) for the new positions.
    """

    pos: torch.Tensor
    start: int | None
    rope: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def n(self) -> int:
        return self.pos.shape[0]

    @functools.cached_property
    def length(self) -> torch.Tensor:
        """(1,) int64 on the device: tokens held once this step's are in (pos[-1] + 1); computed once a
        step rather than once a layer (inside a CUDA graph each is a kernel)."""
        return self.pos[-1:] + 1


class Cache(ABC):
    """Base of every KV cache. Subclasses implement `past_attention`, `append`, `nbytes`; the base
    does the chunk merge. `decode` (one token, positions only on the device) is optional: a cache
    that implements it can be captured in a CUDA graph."""

    name = "?"
    graph_safe = False

    def __init__(self, specs: list[LayerSpec], *, batch: int, capacity: int, device, dtype):
        self.specs, self.batch, self.capacity = specs, batch, capacity
        self.device, self.dtype = torch.device(device), dtype
        self.length = 0  # logical tokens appended so far (host-side; graph decode updates it via `advance`)

    # -- the contract ------------------------------------------------------------------------------
    @abstractmethod
    def past_attention(self, layer: int, q: torch.Tensor, step: Step):
        """q (B, Hq, T, D) post-RoPE against everything stored for `layer` before this step.
        Returns (out fp32 (B, Hq, T, D), lse fp32 (B, Hq, T)) or None when nothing is stored."""

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Store k (pre-RoPE) and v, each (B, Hkv, T, D), at logical positions step.pos."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes really held on the device (data, scales, indices, windows, metadata)."""

    def decode(self, layer: int, q, k, v, step: Step) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} cannot decode inside a CUDA graph")

    # -- shared machinery ----------------------------------------------------------------------------
    def attend(self, layer: int, q, k, v, *, step: Step) -> torch.Tensor:
        """q (B, Hq, T, D) post-RoPE, k (B, Hkv, T, D) pre-RoPE, v (B, Hkv, T, D) → (B, Hq, T, D)."""
        if step.start is None:
            return self.decode(layer, q, k, v, step)
        spec = self.specs[layer]
        cos, sin = step.rope[spec.rope_index]
        past = self.past_attention(layer, q, step)
        own = chunk_attention(q, apply_rope(k, cos, sin), v, scale=spec.scale, window=spec.window,
                              softcap=spec.softcap)
        self.append(layer, k, v, step)
        out = own[0] if past is None else merge_lse(*past, *own)[0]
        return out.to(q.dtype)

    def advance(self, n: int) -> None:
        """Called once per forward by the model, after every layer has appended."""
        self.length += n

    def full_nbytes(self, tokens: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes a full cache in `dtype` (default: the run's) would hold for `tokens` (default: seen);
        sliding-window layers hold their window (`full`'s ring)."""
        tokens = self.length if tokens is None else tokens
        item = torch.empty((), dtype=dtype or self.dtype).element_size()
        return sum(2 * self.batch * s.num_kv_heads * s.head_dim * item * (tokens if s.window is None else
                                                                         min(tokens, s.window)) for s in self.specs)

    def stats(self) -> dict:
        return {"cache": self.name, "tokens": self.length, "kv_bytes": self.nbytes(),
                "kv_bytes_full": self.full_nbytes()}
