"""`quant` (and `kv4`, `kv3`, `kv2`) as a *storage* under eviction: `quant:bits=4+snapkv:ratio=0.5`.

The eviction policy decides which tokens stay (compose.py's `Storage` protocol); this module holds them
in packed 2/3/4/8-bit codes. After a compaction the kept tokens of one (batch, KV head) are no longer
position-contiguous, so, unlike `cache/quant.py` with `prerope=1` (KVQuant's pre-RoPE keys: `kv3` and
`quant`'s default), keys are stored **after RoPE** (as `kv4` and `kv2` store them on their own), and all
statistics run over *slots*, not positions (KIVI, Liu et al. 2024, which quantizes post-RoPE keys):

- keys per channel, statistics over groups of `group` consecutive slots; values per token, over
  `vgroup` channels; optional dense-and-sparse outliers (KVQuant §3.4), as `quant`;
- the first `sink` slots and at least the `window` most recent slots in full precision (KIVI's
  residual); how many slots are quantized is a pure function of the slot count n:
  n_q(n) = group · max(0, (n - sink - window) // group) — exactly `cache/quant.py`'s layout with the
  slot index in the role of the position, so `kernels.quant.quant_decode_attention` reads it
  unchanged (with an all-zero `inv_freq`: cos = 1, sin = 0, no rotation of post-RoPE keys; attention
  does not depend on slot order);
- the full-precision buffer (B, Hkv, sink + ring, D): sink slots, then a ring where slot j ≥ sink
  lives at sink + (j - sink) % ring, ring = min(window + group, slots - sink). It *mirrors* the slots
  the decode kernel reads from it, [sink + n_q(n - 1), n) (the kernel counts the groups flushed
  before the current token, so the group the newest slot completed is still read in full precision,
  as chunked prefill sees it); that group is re-derived exactly from the mirror while it is there;
- an int32 position per slot (for `positions()` and sliding-window masks), an int64 device slot count
  per layer (the layout at decode time comes from it, never from the host) and one all-zero
  `inv_freq` per head dim: `nbytes()` counts every one of these tensors.

Writes. Prefill (host slot) appends like `quant`: whole groups that complete are quantized from the
ring or the chunk. One decode token (device slot, CUDA-graph-safe, static shapes) may land anywhere:
after the end (`snapkv`, `knorm`, `pyramidkv` grow; `streaming` until its ring is full) or over an
evicted slot (`streaming`'s ring, `tova`'s argmin). Each step, in plain torch with static shapes:
write the fp mirror if the slot is in it; if the slot is in a quantized group outside the mirror,
dequantize that group, replace the row, re-quantize it; re-derive the group the mirror still holds
from it (idempotent, so no host-side "is a group full" test); writes that do not apply are masked,
never branched on. A dozen small ops per layer: the write does not use the `append_flush` kernel,
whose ring layout assumes positions only grow (and would not re-quantize an overwritten group).

Lossy twice. `keep()` (compaction) and `reserve()` dequantize the kept slots and quantize them again
in their new groups: a token that was already quantized is quantized a second time with new group
statistics (per-channel key ranges change when the group's members change). SnapKV and friends
compact once per chunk after prefill (once with `chunked=false`), so a token is re-quantized a few
times at most; `streaming` and `tova` overwriting a slot of an older group re-quantize that group's
keys (values are per token: unchanged). A group whose statistics do not change re-quantizes exactly.

Decode attention: the Triton kernel when the layer fits it (head dim a power of two ≥ 32, no logit
softcap); otherwise a graph-safe dequantize-then-attend in torch, and `stats()` says "decode
dequantizes: no speed gain" for those layers. `tova` computes its own attention from `read()` (to
score tokens), so with `tova` every decode step dequantizes the layer: smaller, not faster.

Not supported here (errors): pre-RoPE keys (`prerope`), rotation, per-token keys, nuq codebooks
(their lookup is not in the slot kernels).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..errors import UserError
from ..kernels import quant_append as qa
from ..kernels import quant_reference as ref
from ..kernels.attention import past_attention
from ..kernels.reference import attention_lse, visible
from ..models.rope import apply_rope
from .compose import register_storage
from .quant import PARAMS, QuantCache, _check, _check_clip
from .registry import REGISTRY


def _alloc(B, H, n, D, *, bits, group, vgroup, n_out, per_channel, device, res=False) -> dict:
    z = {"device": device}
    d = {"planes": [torch.zeros(B, H, n, D * pb // 8, dtype=torch.uint8, **z) for pb in ref.PLANES[bits]]}
    rows, cols = (n // group, D) if per_channel else (n, D // vgroup)
    d["scale"] = torch.zeros(B, H, rows, cols, dtype=torch.float16, **z)
    d["zero"] = torch.zeros(B, H, rows, cols, dtype=torch.float16, **z)
    if n_out:
        d["out_idx"] = torch.zeros(B, H, n, n_out, dtype=torch.uint8, **z)
        d["out_val"] = torch.zeros(B, H, n, n_out, dtype=torch.float16, **z)
    if res and per_channel:    # the keys' residual bits (`kres`), one a element
        d["res"] = torch.zeros(B, H, n, D // 8, dtype=torch.uint8, **z)
    return d


def _rows(d: dict, rows: torch.Tensor, group: int, per_channel: bool) -> dict:
    """Gather quantized rows (B, r) (one group per batch row when per_channel) → a packed dict."""
    out = {}
    for k, t in d.items():
        if k == "planes":
            out[k] = [p.gather(2, rows[:, None, :, None].expand(-1, p.shape[1], -1, p.shape[3])) for p in t]
        else:
            r = rows[:, :1] // group if (per_channel and k in ("scale", "zero")) else rows
            out[k] = t.gather(2, r[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
    return out


def _slice(d: dict, a: int, b: int, group: int, per_channel: bool) -> dict:
    """Quantized rows [a, b) of a packed dict (a, b whole groups when per_channel), as views."""
    return {k: ([p[:, :, a:b] for p in t] if k == "planes" else
                t[:, :, a // group:b // group] if per_channel and k in ("scale", "zero") else t[:, :, a:b])
            for k, t in d.items()}


def _put_rows(d: dict, src: dict, rows: torch.Tensor, group: int, per_channel: bool) -> None:
    """Scatter a packed dict over rows (B, r) (whole groups when per_channel: statistics per group)."""
    for k, t in d.items():
        if k == "planes":
            for p, s in zip(t, src[k]):
                p.scatter_(2, rows[:, None, :, None].expand(-1, p.shape[1], -1, p.shape[3]), s)
        else:
            r = rows[:, ::group] // group if (per_channel and k in ("scale", "zero")) else rows
            t.scatter_(2, r[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]), src[k].to(t.dtype))


@register_storage("quant")
class QuantStorage:
    """Packed K/V slots under an eviction policy (see the module docstring). Parameters: those of
    `quant` (`cache/quant.py: PARAMS`), of which bits, group, vgroup, sink, window, outliers apply."""

    family = "quant"          # compose.build checks `composes` against this (kv4 is a quant)
    DEFAULTS: ClassVar[dict] = {}

    def __init__(self, specs, *, batch: int, device, dtype, positions: bool = True, **kw):
        p = {k: v[1] for k, v in PARAMS.items()} | self.DEFAULTS
        for key, bad, why in (("prerope", True, "keys are stored after RoPE here (slots are not positions)"),
                              ("rotate", True, "rotation is not supported under eviction"),
                              ("keys", "token", "keys are quantized per channel under eviction"),
                              ("nuq", None, "nuq codebooks are not read by the slot kernels"),
                              ("kstat", 8, "8-bit key statistics are not written by the slot kernels")):
            if key in kw and (kw[key] == bad or (bad is None and kw[key])):
                raise UserError(f"quant storage (quant+<eviction>): {key}={kw[key]} is not supported: {why}")
        p |= kw
        for s in specs:
            _check(s.head_dim, p | {"prerope": False, "rotate": False, "keys": "channel"})
        self.specs, self.batch, self.device, self.dtype = specs, batch, torch.device(device), dtype
        self.append_only = False   # set before reserve() by a policy whose decode writes only at the end
                                   # (quest): the write is then cache/quant.py's append + flush kernel
        self.bits, self.g, self.S, self.W = p["bits"], p["group"], p["sink"], p["window"]
        self.kres = bool(p["kres"])
        _check_clip(p, "quant storage (quant+<eviction>)")
        self.clip = bool(p["clip"])
        self.vgroup = p["vgroup"]
        self.n_out = [math.ceil(p["outliers"] * s.head_dim) if p["outliers"] > 0 else 0 for s in specs]
        L = len(specs)
        self.kf: list = [None] * L
        self.vf: list = [None] * L
        self.kq: list = [None] * L
        self.vq: list = [None] * L
        self.pos: list = [None] * L
        self.cnt = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in specs]  # slots held (device)
        self.count = [0] * L                                                               # host mirror
        self.ring = [1] * L
        self.no_rope = {D: torch.zeros(D // 2, dtype=torch.float32, device=self.device)
                        for D in sorted({s.head_dim for s in specs})}
        # as QuantCache.graph_safe: whole 32-bit words per half row of codes (64 channels at 3 bits); kres: only
        # where the CUDA kernel reads the residual bits, elsewhere the decode dequantizes in torch
        from ..kernels import quant_cuda as qc
        self.kernel = [s.head_dim >= 32 and not s.head_dim & (s.head_dim - 1) and not s.softcap
                       and s.head_dim % (64 if self.bits == 3 else 32) == 0
                       and (not self.kres or qc.reads_res(self.bits, s.head_dim, self.device)) for s in specs]

    # -- layout ---------------------------------------------------------------------------------------
    def _vg(self, layer):
        return self.vgroup or self.specs[layer].head_dim

    def nq(self, n):
        """Quantized slots for n held (int or device tensor)."""
        if isinstance(n, int):
            return self.g * max(0, (n - self.S - self.W) // self.g)
        return self.g * torch.clamp((n - self.S - self.W) // self.g, min=0)

    def _ring_slot(self, layer, j):
        S, R = self.S, self.ring[layer]
        if isinstance(j, int):
            return j if j < S else S + (j - S) % R
        return torch.where(j < S, j, S + (j - S) % R)

    def nq_read(self, n):
        """Quantized slots the decode kernel reads when n are held (groups flushed before the last
        token arrived): n_q(n - 1), so the group the last token completed is still read from the ring."""
        return self.nq(n - 1)

    def _mirror(self, layer, n: int) -> list[int]:
        """Slots with a valid full-precision copy when n are held: sinks and [sink + n_q(n - 1), n);
        append-only, from the last completed group on (it was flushed from the ring; the decode kernel
        reads it from there until the next token arrives)."""
        lo = max(0, self.nq(n) - self.g) if self.append_only else self.nq_read(n)
        return list(range(min(self.S, n))) + list(range(self.S + lo, n)) if n else []

    def slots(self, layer: int) -> int:
        return 0 if self.pos[layer] is None else self.pos[layer].shape[2]

    def _kw(self, layer):
        return {"bits": self.bits, "n_out": self.n_out[layer]}

    # -- Storage ------------------------------------------------------------------------------------------
    def reserve(self, layer, slots, used):
        if slots == self.slots(layer):
            return
        s, B = self.specs[layer], self.batch
        H, D = s.num_kv_heads, s.head_dim
        # append-only: cache/quant.py's layout (ring = window + 2·group), which the append + flush kernel
        # and the CUDA decode kernel read; the last completed group stays mirrored (`_mirror`)
        R = max(1, min(self.W + (2 if self.append_only else 1) * self.g, slots - self.S))
        cap = max(self.g, self.nq(slots))        # at least one group: the kernel needs real buffers
        kf = torch.zeros(B, H, self.S + R, D, device=self.device, dtype=self.dtype)
        vf = torch.zeros_like(kf)
        a = {"bits": self.bits, "group": self.g, "vgroup": self._vg(layer), "n_out": self.n_out[layer],
             "device": self.device, "res": self.kres}
        kq, vq = _alloc(B, H, cap, D, per_channel=True, **a), _alloc(B, H, cap, D, per_channel=False, **a)
        pos = torch.zeros(B, H, slots, device=self.device, dtype=torch.int32)
        if self.append_only:      # slot = position, written once here instead of at every decode step
            pos.copy_(torch.arange(slots, device=self.device, dtype=torch.int32).expand(B, H, -1))
        if used:
            old = torch.tensor([self._ring_slot(layer, j) for j in self._mirror(layer, used)], device=self.device)
            R0, self.ring[layer] = self.ring[layer], R
            new = torch.tensor([self._ring_slot(layer, j) for j in self._mirror(layer, used)], device=self.device)
            self.ring[layer] = R0
            kf[:, :, new], vf[:, :, new] = self.kf[layer][:, :, old], self.vf[layer][:, :, old]
            nq = self.nq(used)
            for dst, src, pc in ((kq, self.kq[layer], True), (vq, self.vq[layer], False)):
                for k, t in dst.items():
                    if k == "planes":
                        for x, y in zip(t, src[k]):
                            x[:, :, :nq] = y[:, :, :nq]
                    else:
                        r = nq // self.g if (pc and k in ("scale", "zero")) else nq
                        t[:, :, :r] = src[k][:, :, :r]
            pos[:, :, :used] = self.pos[layer][:, :, :used]
        self.kf[layer], self.vf[layer], self.kq[layer], self.vq[layer], self.pos[layer] = kf, vf, kq, vq, pos
        self.ring[layer] = R
        self._set_count(layer, used)

    def _set_count(self, layer, n: int):
        self.count[layer] = n
        self.cnt[layer].fill_(n)

    def _quant(self, layer, k, v):
        return (ref.quantize_keys(k, group=self.g, res=self.kres, clip=self.clip and qa.clip_range, **self._kw(layer)),
                ref.quantize_tokens(v, vgroup=self._vg(layer), **self._kw(layer)))

    def _put(self, layer, kr, v, c0: int) -> None:
        """Host-side append of post-RoPE keys kr and values v (B, H, T, D) at slots [c0, c0 + T)."""
        T = kr.shape[2]
        c1 = c0 + T
        nq0, nq1 = self.nq(c0), self.nq(c1)
        if nq1 > nq0:  # groups completed: members from the mirror (older slots) or this chunk
            js = torch.arange(self.S + nq0, self.S + nq1, device=self.device)
            old = js < c0
            rs = self._ring_slot(layer, js[old])
            kk = torch.cat([self.kf[layer][:, :, rs].float(), kr[:, :, js[~old] - c0].float()], 2)
            vv = torch.cat([self.vf[layer][:, :, rs].float(), v[:, :, js[~old] - c0].float()], 2)
            rows = torch.arange(nq0, nq1, device=self.device)[None].expand(self.batch, -1)
            self._requant(layer, kk, vv, rows)
        js = [j for j in self._mirror(layer, c1) if j >= c0]
        if js:
            src = torch.tensor(js, device=self.device) - c0
            dst = torch.tensor([self._ring_slot(layer, j) for j in js], device=self.device)
            self.kf[layer][:, :, dst] = kr[:, :, src].to(self.dtype)
            self.vf[layer][:, :, dst] = v[:, :, src].to(self.dtype)
        self._set_count(layer, c1)

    def write(self, layer, k, v, *, pos, cos, sin, slot, sketch=None):
        """sketch (sk, sz): a decode write (append_only) also puts a flushed key group into that
        channel-major copy, in the same launch (`quant_append.append_flush`)."""
        if self.append_only and not isinstance(slot, int):   # one launch: RoPE, write, flush, count
            from ..kernels.quant_append import append_flush
            append_flush(k.to(self.dtype), v.to(self.dtype), slot.reshape(-1)[:1], self.kf[layer], self.vf[layer],
                         self.kq[layer], self.vq[layer], bits=self.bits, group=self.g, vgroup=self._vg(layer),
                         sink=self.S, window=self.W, from_slot=True, count_out=self.cnt[layer], rope=(cos, sin),
                         sketch=sketch, clip=self.clip)
            return       # `pos` already holds slot j = j (reserve)
        assert sketch is None, "the channel-major copy is written by the append-only decode path"
        kr = apply_rope(k, cos, sin)
        if isinstance(slot, int):
            self._put(layer, kr, v, slot)
            self.pos[layer][:, :, slot:slot + k.shape[2]] = pos.to(torch.int32)
            return
        self._write_one(layer, kr, v, pos, slot)

    def _write_one(self, layer, kr, v, pos, slot):
        """One token at a device slot (1,) or (B,), graph-safe (see the module docstring)."""
        B, g, S = self.batch, self.g, self.S
        b = torch.arange(B, device=self.device)
        s = slot.reshape(-1).expand(B).long()
        c1 = torch.maximum(self.cnt[layer], s.max().reshape(1) + 1)          # (1,) slots held after
        nq1, nqk = self.nq(c1), self.nq_read(c1)
        # 1. the full-precision mirror
        rs = self._ring_slot(layer, s)
        in_fp = ((s < S) | (s >= S + nqk))[:, None, None]
        kf, vf = self.kf[layer], self.vf[layer]
        kf[b, :, rs] = torch.where(in_fp, kr[:, :, 0].to(self.dtype), kf[b, :, rs])
        vf[b, :, rs] = torch.where(in_fp, v[:, :, 0].to(self.dtype), vf[b, :, rs])
        self.pos[layer][b, :, s] = pos.reshape(-1)[-1:].to(torch.int32).expand(B, 1)
        # 2. a slot inside a quantized group that is not mirrored: dequantize, replace, re-quantize
        self._overwrite_packed(layer, kr, v, s, nqk)
        # 3. the last completed group while it is still mirrored: re-derived from the mirror (idempotent)
        last = torch.clamp(nq1 // g - 1, min=0)
        js = S + last * g + torch.arange(g, device=self.device)
        rs = self._ring_slot(layer, js)
        self._requant(layer, kf[:, :, rs].float(), vf[:, :, rs].float(), (js - S)[None].expand(B, -1),
                      (nq1 > nqk).expand(B))
        self.cnt[layer].copy_(c1)

    def _overwrite_packed(self, layer, kr, v, s, nqk):
        """Step 2 of `_write_one`: slots s (B,) inside packed groups no longer mirrored get their group
        dequantized, the row replaced and re-quantized (masked per batch row: static shapes)."""
        g, S = self.g, self.S
        older = (s >= S) & (s < S + nqk)
        gs = torch.where(older, (s - S) // g, 0)
        rows = gs[:, None] * g + torch.arange(g, device=self.device)         # (B, g)
        D = self.specs[layer].head_dim
        kd = ref.dequantize_keys(_rows(self.kq[layer], rows, g, True), bits=self.bits, group=g, d=D)
        vd = ref.dequantize_tokens(_rows(self.vq[layer], rows, g, False), bits=self.bits,
                                   vgroup=self._vg(layer), d=D)
        hit = (rows == (s - S)[:, None])[:, None, :, None]                   # (B, 1, g, 1)
        self._requant(layer, torch.where(hit, kr.float(), kd), torch.where(hit, v.float(), vd), rows, older)

    def _requant(self, layer, k, v, rows, where=None):
        """k, v (B, H, r, D) fp32 of whole groups → packed into quantized rows (B, r); only the batch
        rows where `where` (B,) bool holds change (static shapes: the others are written back as they were)."""
        kq, vq = self._quant(layer, k, v)
        if where is not None:
            w = where[:, None, None, None]
            pick = lambda new, old: torch.where(w, new.to(old.dtype), old)
            blend = lambda new, old: {key: ([pick(a, c) for a, c in zip(t, old[key])] if key == "planes"
                                            else pick(t, old[key])) for key, t in new.items()}
            kq = blend(kq, _rows(self.kq[layer], rows, self.g, True))
            vq = blend(vq, _rows(self.vq[layer], rows, self.g, False))
        _put_rows(self.kq[layer], kq, rows, self.g, True)
        _put_rows(self.vq[layer], vq, rows, self.g, False)

    def read(self, layer, n, start: int = 0):
        """Dequantized view of slots [start, n) (graph-safe: the layout comes from the device count; only
        the quantized rows that can hold those slots are unpacked, not the reserved capacity)."""
        D = self.specs[layer].head_dim
        j = torch.arange(start, n, device=self.device)
        nq = self.nq(self.cnt[layer])
        use_q = ((j >= self.S) & (j < self.S + nq))[:, None]                 # (n - start, 1)
        cap = self.kq[layer]["planes"][0].shape[2]
        a = min(max(start - self.S, 0), cap - 1) // self.g * self.g          # whole key groups [a, b)
        b = max(a + self.g, min(cap, -(-max(n - self.S, 0) // self.g) * self.g))
        qi = torch.clamp(j - self.S - a, 0, b - a - 1)
        kd = ref.dequantize_keys(_slice(self.kq[layer], a, b, self.g, True), bits=self.bits, group=self.g,
                                 d=D)[:, :, qi]
        vd = ref.dequantize_tokens(_slice(self.vq[layer], a, b, self.g, False), bits=self.bits,
                                   vgroup=self._vg(layer), d=D)[:, :, qi]
        rs = self._ring_slot(layer, j)
        k = torch.where(use_q, kd, self.kf[layer][:, :, rs].float()).to(self.dtype)
        v = torch.where(use_q, vd, self.vf[layer][:, :, rs].float()).to(self.dtype)
        return k, v

    def positions(self, layer, n):
        return self.pos[layer][:, :, :n].long()

    def keep(self, layer, idx):
        k, v = self.read(layer, self.count[layer])
        D = k.shape[-1]
        gi = idx[..., None].expand(-1, -1, -1, D)
        k, v = k.gather(2, gi), v.gather(2, gi)
        m = idx.shape[2]
        self.pos[layer][:, :, :m] = self.pos[layer].gather(2, idx.to(torch.int64)).clone()
        self._set_count(layer, 0)
        self._put(layer, k, v, 0)   # lossy twice for slots that were quantized (module docstring)
        assert self.count[layer] == m

    def past_attention(self, layer, q, n, *, q_pos):
        """The chunk's queries (positions q_pos) over slots [0, n) (prefill: not graph-safe). A
        sliding-window layer unpacks only from the first slot its window can see (one host sync)."""
        s = self.specs[layer]
        lo, k_pos = 0, None
        if s.window is not None:
            k_pos = self.pos[layer][0, 0, :n].long()
            seen = visible(q_pos, k_pos, s.window).any(0).nonzero()
            if not len(seen):
                return None
            lo = int(seen[0])
            k_pos = k_pos[lo:]
        k, v = self.read(layer, n, lo)
        return past_attention(q, k, v, scale=s.scale, q_pos=q_pos, k_pos=k_pos, window=s.window,
                              softcap=s.softcap)

    def decode_attention(self, layer, q, length):
        s = self.specs[layer]
        if self.kernel[layer]:
            from ..kernels.quant import quant_decode_attention

            return quant_decode_attention(
                q, self.kq[layer], self.vq[layer], self.kf[layer], self.vf[layer], length.reshape(-1)[-1:],
                bits=self.bits, group=self.g, vgroup=self._vg(layer), sink=self.S, window=self.W,
                scale=s.scale, inv_freq=self.no_rope[s.head_dim], prerope=False)   # keys stored after RoPE
        n = self.slots(layer)   # loud in stats(): dequantizes everything, no speed gain
        k, v = self.read(layer, n)
        mask = (torch.arange(n, device=self.device) < length.reshape(-1)[-1:])[None]
        out, _ = attention_lse(q, k, v, scale=s.scale, mask=mask, softcap=s.softcap)
        return out.to(q.dtype)

    # -- reporting ----------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in self.kf + self.vf + self.pos + self.cnt if t is not None]
        out += list(self.no_rope.values())
        for d in filter(None, self.kq + self.vq):
            out += d["planes"] + [t for k, t in d.items() if k != "planes"]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def stats(self) -> dict:
        slow = [i for i, ok in enumerate(self.kernel) if not ok]
        why = ("the keys' residual bits (kres: the CUDA reading needs 4 bits, head dim >= 128, a GPU, and "
               "LONGKV_KRES_CUDA not 0)" if self.kres else "head dim not fit for the packed kernel, or softcap")
        return {"storage_bits": self.bits, "storage_group": self.g, "key_residual_bits": int(self.kres),
                "quantized_slots_per_layer": [self.nq(c) for c in self.count],
                "decode": "packed kernel" if not slow else f"decode dequantizes: no speed gain (layers {slow}: {why})"}


def _preset_storage(name: str):
    # under eviction a preset's key statistics stay fp16 (kstat=8 is not written by the slot kernels)
    defaults = {k: v for k, v in REGISTRY[name].cls.DEFAULTS.items() if k != "kstat"}
    cls = type(f"QuantStorage_{name}", (QuantStorage,), {"DEFAULTS": defaults})
    register_storage(name)(cls)


for _name in ("kv4", "kv3", "kv2", "kivi4", "kivi2"):
    assert issubclass(REGISTRY[_name].cls, QuantCache)
    _preset_storage(_name)
