"""Rotary position embeddings (RoPE) and their frequency scalings.

Keys reach the cache *before* RoPE (KVQuant quantizes pre-RoPE keys), so rotation is a pure function
of (vectors, logical positions) that any cache or kernel can apply at any time. Tables are never
materialised for the whole window: `Rope.cos_sin(pos)` computes the few rows a step needs, which
also works inside a CUDA graph (positions are a device tensor).

Supported `rope_type`s: `default`, `linear` (Position Interpolation, Chen et al. 2023), `llama3`
(Meta's Llama 3.1 band-wise scaling). Matches Hugging Face transformers' `rotate_half` convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..kernels.fused import on_cuda


@dataclass(frozen=True)
class RopeParams:
    """What one attention layer's RoPE needs. `type` is transformers' `rope_type`; `extra` keeps the
    type-specific fields (factor, low_freq_factor, ...) as given in the model's config."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    extra: tuple = ()

    @classmethod
    def from_hf(cls, d: dict | None, default_theta: float = 10000.0) -> "RopeParams":
        d = dict(d or {})
        kind = d.pop("rope_type", d.pop("type", "default"))
        theta = float(d.pop("rope_theta", default_theta))
        factor = float(d.pop("factor", 1.0) or 1.0)
        return cls(theta=theta, type=kind, factor=factor, extra=tuple(sorted(d.items())))

    def get(self, key, default=None):
        return dict(self.extra).get(key, default)


def inv_freq(p: RopeParams, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in fp32 and the attention scaling for `p`."""
    base = 1.0 / (p.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if p.type == "default":
        return base, 1.0
    if p.type == "linear":
        return base / p.factor, 1.0
    if p.type == "llama3":
        low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
        old = float(p.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > low_wavelen, base / p.factor, base)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise UserError(f"RoPE type {p.type!r} is not supported yet (supported: default, linear, llama3)")


class Rope:
    """RoPE for one layer kind: `cos_sin(pos)` → (T, D) tables, `rotate(x, cos, sin)`."""

    def __init__(self, params: RopeParams, head_dim: int, device=None):
        self.params = params
        self.head_dim = head_dim
        f, self.scaling = inv_freq(params, head_dim)
        self.inv_freq = f.to(device)

    def to(self, device) -> "Rope":
        self.inv_freq = self.inv_freq.to(device)
        return self

    def cos_sin(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: (T,) int64 logical positions → cos, sin: (T, D) in `dtype` (fp32 math, as HF does)."""
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


@on_cuda
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D) → x rotated, same shape and dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
