"""Token sampling on the device, without host syncs: greedy (temperature 0), temperature and
nucleus (top-p). Sampling uses the exponential-race trick (argmax of p / Exp(1) noise), which
draws from p exactly and needs neither `multinomial` nor a `.item()`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 → (B,) int64 token ids."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > s.top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp.masked_fill(drop, 0.0))
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)
