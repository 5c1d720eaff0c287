"""Composition: a *storage* decides HOW kept tokens are held, a *policy* decides WHICH are kept or read.

A spec such as `quant:bits=4+snapkv:ratio=0.5` names at most one part of each role:

    storage  full (default), quant (kv4, kv3, kv2, kivi4, kivi2)   how K/V bytes are held
    evict    streaming, snapkv, pyramidkv, tova, knorm      which tokens survive (really removed)
    wrap     adakv                        per-head budgets on top of an `evict` scorer
    select   quest                        keeps everything, chooses the pages each decode step reads
    heads    duo                          retrieval heads keep everything, the others sink + window

Allowed: `storage`, `[storage+]evict[+wrap]`, `[storage+]select`, `[storage+]heads`, in any order.

The interface between a policy and its storage is `Storage` below (`DenseStorage` is the full-precision
one; `quant_storage.QuantStorage` packs keys after RoPE per channel over slot groups, KIVI-style, and
decodes with the packed Triton kernel, so `quant:bits=4+snapkv:ratio=0.5`, `kv4+streaming:ratio=0.5`,
`quant:bits=2+tova:budget=512` compose; `longkv caches` lists every combination). An eviction cache
scores tokens, then calls `Storage.keep(layer, idx)` to compact; the storage never decides what to
drop. A storage module makes itself composable with one decorator:

    @register_storage("quant")
    class QuantStorage: ...   # the methods of `Storage`, same shapes; `family = "quant"` lets the
                              # presets (kv4, ...) combine wherever quant does (`composes`)

Tokens live per (batch, KV head) in slots [0, n) of a layer; `n` is the caller's (host) count, and
all KV heads of a layer hold the same number of slots (ragged per-head budgets use
`evict.paged.PagedStorage`, full precision only). Positions are the logical token indices (RoPE).
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import UserError
from ..kernels.attention import past_attention
from ..kernels.reference import attention_lse, visible
from ..models.rope import apply_rope
from .registry import REGISTRY


class Storage(Protocol):
    """What an eviction/selection policy needs from the bytes underneath (all per layer).

    k (pre-RoPE) and v arrive as (B, Hkv, T, D); `cos, sin` (T, D) are the rotary tables of `pos` (T,).
    `slot` is a host int (T tokens go to slots [slot, slot+T)) or, for one decode token inside a CUDA
    graph, a device int64 tensor of shape (1,) or (B,).
    """

    def reserve(self, layer: int, slots: int, used: int) -> None:
        """Hold exactly `slots` slots per head, keeping the first `used` (may reallocate; never in a graph)."""

    def write(self, layer: int, k, v, *, pos, cos, sin, slot) -> None: ...

    def read(self, layer: int, n: int):
        """→ (k after RoPE, v), each (B, Hkv, n, D) in the run's dtype (dequantized if packed)."""

    def positions(self, layer: int, n: int):
        """→ (B, Hkv, n) int64 logical positions of the slots."""

    def keep(self, layer: int, idx) -> None:
        """idx (B, Hkv, m) int64 slot indices, each row sorted by position → slots [0, m) hold them."""

    def past_attention(self, layer: int, q, n: int, *, q_pos):
        """q (B, Hq, T, D) after RoPE against slots [0, n) → (out fp32, lse fp32) as `Cache.past_attention`."""

    def decode_attention(self, layer: int, q, length):
        """One token, graph-safe: q (B, Hq, 1, D) against slots [0, length) (device tensor) → (B, Hq, 1, D)."""

    def nbytes(self) -> int: ...


STORAGES: dict[str, type] = {}


def register_storage(name: str):
    """Make the registry method `name` usable underneath eviction/selection (see module docstring)."""
    def deco(cls):
        STORAGES[name] = cls
        return cls
    return deco


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@register_storage("full")
class DenseStorage:
    """Full precision: keys after RoPE and values (B, Hkv, S, D) per layer, plus per-slot positions
    (B, Hkv, S) int32 when the policy evicts (kept tokens of different heads differ)."""

    def __init__(self, specs, *, batch: int, device, dtype, positions: bool = True):
        self.specs, self.batch, self.device, self.dtype = specs, batch, torch.device(device), dtype
        self.track_pos = positions
        L = len(specs)
        self.k: list[torch.Tensor | None] = [None] * L
        self.v: list[torch.Tensor | None] = [None] * L
        self.pos: list[torch.Tensor | None] = [None] * L

    def slots(self, layer: int) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def reserve(self, layer, slots, used):
        if slots == self.slots(layer):
            return
        s = self.specs[layer]
        shape = (self.batch, s.num_kv_heads, slots, s.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros_like(k)
        p = torch.zeros(shape[:3], device=self.device, dtype=torch.int32) if self.track_pos else None
        if used:
            k[:, :, :used] = self.k[layer][:, :, :used]
            v[:, :, :used] = self.v[layer][:, :, :used]
            if p is not None:
                p[:, :, :used] = self.pos[layer][:, :, :used]
        self.k[layer], self.v[layer], self.pos[layer] = k, v, p

    def write(self, layer, k, v, *, pos, cos, sin, slot):
        kr = apply_rope(k, cos, sin)
        if isinstance(slot, int):
            T = k.shape[2]
            self.k[layer][:, :, slot:slot + T] = kr
            self.v[layer][:, :, slot:slot + T] = v
            if self.track_pos:
                self.pos[layer][:, :, slot:slot + T] = pos.to(torch.int32)
            return
        b = torch.arange(self.batch, device=self.device)
        idx = slot.reshape(-1).expand(self.batch)
        self.k[layer][b, :, idx] = kr[:, :, 0]
        self.v[layer][b, :, idx] = v[:, :, 0]
        if self.track_pos:
            self.pos[layer][b, :, idx] = pos.reshape(-1)[-1:].to(torch.int32).expand(self.batch, 1)

    def read(self, layer, n):
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def positions(self, layer, n):
        return self.pos[layer][:, :, :n].long()

    def keep(self, layer, idx):
        m = idx.shape[2]
        D = self.k[layer].shape[-1]
        gi = idx[..., None].expand(-1, -1, -1, D)
        for buf in (self.k[layer], self.v[layer]):
            buf[:, :, :m] = buf.gather(2, gi)
        if self.track_pos:
            self.pos[layer][:, :, :m] = self.pos[layer].gather(2, idx.to(torch.int64)).clone()

    def past_attention(self, layer, q, n, *, q_pos):
        s = self.specs[layer]
        k, v = self.read(layer, n)
        if s.window is None:
            return past_attention(q, k, v, scale=s.scale, softcap=s.softcap)
        # sliding layers hold the same positions in every head (a ring, see evict.base)
        mask = visible(q_pos, self.pos[layer][0, 0, :n].long(), s.window)
        return attention_lse(q, k, v, scale=s.scale, mask=mask, softcap=s.softcap)

    def decode_attention(self, layer, q, length):
        from ..kernels.decode import decode_attention

        s = self.specs[layer]
        return decode_attention(q, self.k[layer], self.v[layer], length, scale=s.scale, softcap=s.softcap)

    def nbytes(self) -> int:
        return _tensor_bytes(*self.k, *self.v, *self.pos)


# -- building a cache from a parsed spec ---------------------------------------------------------------
ROLES = ("storage", "evict", "wrap", "select", "heads")


def role(name: str) -> str:
    return getattr(REGISTRY[name].cls, "role", "storage")


def combinations() -> list[str]:
    """Human-readable list of what composes with what (for `longkv caches` and the docs), from the
    registry's `composes` and the registered storages (presets such as kv4 count as their family)."""
    by = {r: [n for n in REGISTRY if role(n) == r] for r in ROLES}

    def st(name: str, allowed=None) -> str:
        allowed = REGISTRY[name].composes if allowed is None else allowed
        ok = [s for s in STORAGES if getattr(STORAGES[s], "family", s) in allowed] or ["full"]
        return f"[{'|'.join(ok)}+]"

    out = [f"{st(e)}{e}" for e in by["evict"]]
    out += [f"{st(w, ('full',))}{w}+<{'|'.join(REGISTRY[w].composes)}>" for w in by["wrap"]]
    out += [f"{st(n)}{n}" for n in by["select"] + by["heads"]]
    return out


def build(parts, specs, *, batch: int, capacity: int, device, dtype):
    """parts: ((name, ((key, value), ...)), ...) as parsed by `spec.parse` → a `Cache`."""
    text = "+".join(n for n, _ in parts)
    got: dict[str, tuple[str, dict]] = {}
    for name, params in parts:
        r = role(name)
        if r in got:
            raise UserError(f"cache spec {text!r}: {got[r][0]} and {name} are both {r} methods; pick one")
        got[r] = (name, dict(params))
    policies = [r for r in ("evict", "select", "heads") if r in got]
    if len(policies) > 1:
        a, b = (got[r][0] for r in policies[:2])
        raise UserError(f"cache spec {text!r}: {a} and {b} cannot be combined (one eviction, selection "
                        f"or head-split method at a time; see `longkv caches`)")
    kw = dict(batch=batch, capacity=capacity, device=device, dtype=dtype)
    sname, sparams = got.get("storage", ("full", {}))
    if not policies:
        if "wrap" in got:
            raise UserError(f"cache spec {text!r}: {got['wrap'][0]} wraps a scorer; add one of "
                            f"{', '.join(REGISTRY[got['wrap'][0]].composes)} (e.g. adakv+snapkv:ratio=0.5)")
        return REGISTRY[sname].cls(specs, **kw, **sparams)
    pname, pparams = got[policies[0]]
    if "wrap" in got:
        wname, wparams = got["wrap"]
        if pname not in REGISTRY[wname].composes:
            raise UserError(f"cache spec {text!r}: {wname} cannot wrap {pname} "
                            f"(it wraps {', '.join(REGISTRY[wname].composes)})")
        if sname != "full":
            raise UserError(f"cache spec {text!r}: {wname} stores heads of different lengths in "
                            f"full-precision pages only; drop {sname} or {wname}")
        return REGISTRY[wname].cls.wrap(REGISTRY[pname].cls)(specs, **kw, **pparams, **wparams)
    pcls = REGISTRY[pname].cls
    family = getattr(STORAGES.get(sname), "family", sname)   # presets (kv4, ...) combine as their family
    if "storage" in got and family not in REGISTRY[pname].composes:
        raise UserError(f"cache spec {text!r}: {pname} cannot be combined with {sname} "
                        f"(it combines with {', '.join(REGISTRY[pname].composes) or 'nothing'})")
    if sname not in STORAGES:
        raise UserError(f"cache spec {text!r}: {sname} does not provide the storage interface "
                        f"(longkv/cache/compose.py: Storage) that {pname} needs; storages: {', '.join(STORAGES)}")
    return pcls(specs, **kw, storage=(sname, sparams), **pparams)


def make_storage(storage, specs, *, batch, device, dtype, positions: bool = True):
    """storage: (name, params) from `build`, or None for full precision."""
    name, params = storage or ("full", {})
    return STORAGES[name](specs, batch=batch, device=device, dtype=dtype, positions=positions, **params)
