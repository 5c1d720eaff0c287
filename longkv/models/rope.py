"""Rotary position embeddings (RoPE) and their frequency scalings for training-free context extension.

Keys reach the cache *before* RoPE (KVQuant quantizes pre-RoPE keys), so rotation is a pure function
of (vectors, logical positions) that any cache or kernel can apply at any time. Tables are never
materialised for the whole window: `Rope.cos_sin(pos)` computes the few rows a step needs, which
also works inside a CUDA graph (positions are a device tensor).

`rope_type`s (L0 = the trained window, s = `factor`, d = head dim, base_i = theta^(-2i/d)):
- `default`: base_i.
- `linear`: base_i / s (Position Interpolation, Chen et al. 2023, arXiv:2306.15595).
- `ntk`: theta' = theta * s^(d/(d-2)) ("NTK-aware" scaling, bloc97 2023; high frequencies kept,
  the lowest one interpolated by s).
- `dynamic`: `ntk` with s' = s*L/L0 - (s-1) for a run of L > L0 tokens (dynamic NTK, emozilla 2023;
  as transformers' `dynamic`). L is fixed per run, see `Rope.fit`.
- `yarn`: per-dimension ramp between interpolation (wavelengths longer than L0/beta_slow) and
  extrapolation (shorter than L0/beta_fast), plus the attention temperature sqrt(1/t) = 0.1 ln s + 1
  multiplied into cos and sin (Peng et al. 2023, YaRN, arXiv:2309.00071, Eq. 17-23).
- `llama3`: band-wise scaling of Llama 3.1 (low/high frequency factors, smooth in between).
Formulas match transformers' `modeling_rope_utils` (tests compare them); `rotate_half` convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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

    def trained_at(self, n: int) -> "RopeParams":
        """These params with `original_max_position_embeddings` set to `n` unless already given (the
        window `yarn`, `dynamic` and `llama3` stretch; transformers fills it the same way)."""
        if self.type not in ("yarn", "dynamic", "llama3") or self.get("original_max_position_embeddings"):
            return self
        extra = dict(self.extra, original_max_position_embeddings=int(n))
        return replace(self, extra=tuple(sorted(extra.items())))


SCALED = ("linear", "ntk", "dynamic", "yarn", "llama3")  # types that stretch the window by `factor`


def trained_window(p: RopeParams, max_position_embeddings: int) -> int:
    """L0: the window the model was trained at (the config's `original_max_position_embeddings` when a
    scaling declares one, else `max_position_embeddings`)."""
    return int(p.get("original_max_position_embeddings") or max_position_embeddings)


def extended_window(p: RopeParams, max_position_embeddings: int) -> int:
    """Tokens a model with these params may attend over: factor * L0 for the scalings that know L0 (at
    least the config's own `max_position_embeddings`: Qwen2.5 declares YaRN over an unchanged 32K);
    a `linear` without L0 (Gemma 3 4B+) already counts the factor in `max_position_embeddings`."""
    if p.type not in SCALED or not p.get("original_max_position_embeddings"):
        return max_position_embeddings
    return max(max_position_embeddings, int(p.factor * trained_window(p, max_position_embeddings)))


def _yarn(p: RopeParams, base: torch.Tensor, d: int) -> tuple[torch.Tensor, float]:
    s, L0 = p.factor, float(p.get("original_max_position_embeddings"))
    fast, slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def dim_of(rotations):  # the dimension whose wavelength fits `rotations` times into L0 (Eq. 21)
        return d * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(p.theta))

    lo, hi = dim_of(fast), dim_of(slow)
    if p.get("truncate", True) not in (False, "false", 0):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)  # 0: keep, 1: interpolate
    freqs = base * (1 - ramp) + base / s * ramp

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = p.get("attention_factor")
    if att is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        att = mscale(s, m) / mscale(s, m_all) if m and m_all else mscale(s)
    return freqs, float(att)


def _llama3(p: RopeParams, base: torch.Tensor) -> torch.Tensor:
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / p.factor, base)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq(p: RopeParams, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in fp32 and the attention scaling (multiplies cos and sin)
    for `p`. `seq_len` is the run's length, read only by `dynamic` (default: L0, i.e. no scaling)."""
    d = head_dim
    exps = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    base = 1.0 / (p.theta ** exps)
    if p.type == "default":
        return base, 1.0
    if p.factor <= 0:
        raise UserError(f"RoPE {p.type}: factor must be > 0, got {p.factor}")
    if p.type == "linear":
        return base / p.factor, 1.0
    if p.type in ("ntk", "dynamic"):
        alpha = p.factor
        if p.type == "dynamic":
            L0 = int(p.get("original_max_position_embeddings"))
            L = max(seq_len or L0, L0)
            alpha = p.factor * L / L0 - (p.factor - 1)
        return 1.0 / ((p.theta * alpha ** (d / (d - 2))) ** exps), 1.0
    if p.type == "yarn":
        return _yarn(p, base, d)
    if p.type == "llama3":
        return _llama3(p, base), 1.0
    raise UserError(f"RoPE type {p.type!r} is not supported (supported: default, {', '.join(SCALED)})")


class Rope:
    """RoPE for one layer kind: `cos_sin(pos)` → (T, D) tables, `rotation(delta)` pure rotations.

    `dynamic` NTK depends on the run's length; `fit(n)` sets it once per run (the engine calls it with
    the cache's capacity, prompt + max_new_tokens), so every chunk of the prefill and every decode step
    (CUDA graph included) uses the same frequencies and keys cached early stay consistent with later
    queries. transformers instead grows the base as the sequence grows, so keys already cached were
    rotated with older frequencies; a full forward over the same tokens agrees with ours exactly.
    """

    def __init__(self, params: RopeParams, head_dim: int, device=None):
        self.params = params
        self.head_dim = head_dim
        f, self.scaling = inv_freq(params, head_dim)
        self.inv_freq = f.to(device)
        self.length = None

    def to(self, device) -> "Rope":
        self.inv_freq = self.inv_freq.to(device)
        return self

    def fit(self, length: int) -> None:
        """Plan for a run of `length` tokens (only `dynamic` changes; the buffer is updated in place)."""
        if self.params.type == "dynamic" and length != self.length:
            f, self.scaling = inv_freq(self.params, self.head_dim, seq_len=length)
            self.inv_freq.copy_(f)
            self.length = length

    def cos_sin(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: (T,) int64 logical positions → cos, sin: (T, D) in `dtype` (fp32 math, as HF does)."""
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def rotation(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure rotation by `delta` (T,) positions (no attention scaling), fp32 (T, D): turns a vector
        rotated at p into the same vector rotated at p + delta (Self-Extend moves queries so)."""
        freqs = delta.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


@on_cuda
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D) → x rotated, same shape and dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
