"""`quant` (and presets `kv4`, `kv3`, `kv2`, `kivi4`, `kivi2`): a KV cache stored in 2/3/4/8-bit codes.

KVQuant (Hooper et al. 2024) + KIVI (Liu et al. 2024): keys are quantized *before RoPE* and per
channel, statistics over groups of `group` consecutive tokens (pre-RoPE key outliers sit in fixed
channels; RoPE would smear them across channel pairs, KVQuant §3.2); values per token, statistics
over `vgroup` channels. The first `sink` tokens (attention sinks, Xiao et al. 2023; KVQuant §3.5) and
at least the `window` most recent tokens (KIVI's residual) stay in full precision; when more than
`window` recent tokens are held, the oldest whole group is quantized ("flushed"). Options:
dense-and-sparse outliers (KVQuant §3.4), non-uniform per-layer codebooks fitted by
`longkv calibrate` (KVQuant's nuq, §3.3), Hadamard rotation of keys (QuaRot, Ashkboos et al. 2024),
keys quantized after RoPE (`prerope=0`, KIVI's layout; presets `kv4` = `kivi4`, `kv2` = `kivi2`), which lets the
decode kernel fold the key scale into the query instead of dequantizing and rotating every key.

Why `kv4` and `kv2` are KIVI's layout and `quant:bits=4` KVQuant's: on smollm2-135m, where the keys are
rotated barely matters at 4 bits (perplexity +0.08 % against +0.04 %, the same needles found), but pre-RoPE
keys must be dequantized and rotated one by one in the kernel, which decodes slower than bf16 (1.45x
of full at 128K on the 8B shape), while post-RoPE codes go straight to the tensor cores (0.69x). A
4-bit cache that is slower than bf16 is not what anyone asks for by `kv4`. Composed with an eviction
or selection method (`kv4+quest`, ...) the storage holds post-RoPE keys anyway (`quant_storage.py`),
so `kv4` now means one layout everywhere. At 2 bits the same holds with more to gain: KVQuant's layout
(pre-RoPE keys, 32-token groups, 1 % outliers) is +4.8 % perplexity against +6.2 %, but it holds more
bytes (3.38 bits against 3.25), finds fewer needles (4 of 15 against 7 at 2K-7K on smollm2) and decodes
slower than bf16. `kv3` keeps KVQuant's layout: there is no fast 3-bit kernel.

Layout per layer, all preallocated for `capacity` tokens (so decode can run in a CUDA graph):
- kf, vf (B, Hkv, sink + ring, D) in the run's dtype, keys as they are quantized (pre- or post-RoPE):
  sink slots, then a ring where position p ≥ sink lives in slot sink + (p - sink) % ring,
  ring = window + 2·group (the group being flushed must still be in the ring when decode re-derives
  it from device-side positions);
- packed codes, fp16 scales/zero points, outliers (fp16 value + uint8 channel) for buffer index
  i ↔ position sink + i. How many tokens are quantized is a pure function of the length:
  n_q = group · max(0, (length - sink - window) // group), identical in every layer.

Sliding-window layers (Gemma 3's local ones) are not quantized: they keep their window in full
precision as `full` does (a ring, `full.py`), which at long context is smaller than packing every token.

`kres=1` adds one residual bit a key element (`res`, (B, Hkv, n, D/8) uint8): whether the key lies at or above
its level, decoded as a quarter step up or down, so keys are half a step finer (at 4 bits 1/3.7 of the squared
error, `benchmarks/key_error.py`) for one bit more an element, while the codes and statistics stay those of
`bits`: a 4-bit sketch of the keys (Quest's SparQ score, `channels=F`) reads them unchanged and only the attention
would read the extra bit. The append + flush kernel writes it. The CUDA attention kernels read it (`quant_cuda.cu`,
RES: one LOP3 and one HFMA2 a code pair more; the kernels' and the caches' GPU tests passed on an H100, sessions
31-32) at 4 bits, head dim >= 128, on a GPU (`quant_cuda.reads_res`; LONGKV_KRES_CUDA=0 turns it off). Elsewhere
`kv4:kres=1` alone decodes eagerly through the torch reference, and under Quest (`kv4:kres=1+quest:groups=1,...`)
the selected groups are gathered and attended in torch (graph-safe): for measuring quality, not speed. Quest's
bound over such groups (`groups=1` without `channels`) bounds the 4-bit levels, which the keys miss by at most a
quarter step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..kernels import quant_append as qa
from ..kernels import quant_reference as ref
from ..kernels.attention import past_attention
from ..models.rope import apply_rope
from .base import Cache, Step
from .full import window_rings
from .registry import register

PARAMS = {
    "bits": (int, 4, "bits per code: 2, 3, 4 or 8"),
    "group": (int, 64, "keys: tokens sharing a per-channel scale/zero (power of two, 16..1024)"),
    "vgroup": (int, 0, "values: channels sharing a per-token scale/zero (0 = the head dim; must divide it)"),
    "sink": (int, 4, "first tokens kept in full precision (attention sinks)"),
    "window": (int, 128, "at least this many most recent tokens kept in full precision"),
    "outliers": (float, 0.0, "fraction of each token's channels kept exactly (dense-and-sparse), e.g. 0.01"),
    "keys": (str, "channel", "key statistics: channel (KVQuant/KIVI) or token (ablation)"),
    "prerope": (bool, True, "quantize keys before RoPE (KVQuant); 0 = after RoPE (KIVI: the kv4 and kv2 presets)"),
    "rotate": (bool, False, "Hadamard-rotate keys before quantizing (QuaRot-style)"),
    "nuq": (str, "", "codebook file from `longkv calibrate` (non-uniform levels per layer)"),
    "clip": (bool, False, "keys: each group's [min, max] MSE-clipped before quantizing (each end pulled in by "
                          "0-50 % of the range, the least squared error a group and channel; uniform per-channel codes "
                          "without outliers, nuq or kres; the ranges are searched when a group is written, the bytes "
                          "read are the same, the search costs ~1 % of a decode step: kv2:clip=1 0.642x of bf16 full's "
                          "ms/token at 128K where kv2 is 0.634x, H100, 8B shape). On smollm2: kv2:clip=1 +3.4 % "
                          "perplexity at 8K and 30 of 45 needles at 2K-7K, against kv2's +6.6 % and 19 (full 39); "
                          "quant:bits=2,group=64,prerope=0,clip=1 +4.8 % at 2.375 bits but 3 of the first 15 needles "
                          "where kv2 finds 7 (a needle's keys are extremes that longer groups clip)"),
    "kstat": (int, 16, "bits of each key group's per-channel statistics: 16 (fp16 scale and zero) or 8 (one byte each "
                       "on a per-group grid, `quant_reference.stats8`; uniform per-channel keys without outliers, nuq, "
                       "kres or clip; not under eviction). kv2:kstat=8 holds 2.66 bits an element against kv2's 3.125 "
                       "(8B shape at 128K: 2.68 GiB against 3.15) and decodes in the same time (H200, H100); on smollm2-135m "
                       "ppl +4.7 % / +7.0 % at 2K / 8K (kv2 +4.8 / +6.6) and 6 of 15 needles at 2K-7K (kv2 7)"),
    "kres": (bool, False, "a residual bit per key element after its code (above or below its level, decoded as "
                          "±a quarter step): keys half a step finer for one bit more an element (4-bit: 1/3.7 of the "
                          "squared error), the codes themselves unchanged; the CUDA kernels read it at 4 bits and head "
                          "dim >= 128 on a GPU, elsewhere it decodes in torch (with Quest, "
                          "kv4:kres=1+quest:...,channels=0.25,dense_layers=0 is -1.8 points on smollm2 8K, "
                          "-2.5 / -2.6 on gemma3 16K / 32K, at 3.02-3.03x of full at 512K)"),
}


def _check(spec_head_dim: int, p: dict) -> None:
    if p["bits"] not in ref.PLANES:
        raise UserError(f"quant: bits={p['bits']} is not supported (use 2, 3, 4 or 8)")
    g = p["group"]
    if g < 16 or g > 1024 or g & (g - 1):
        raise UserError(f"quant: group={g} must be a power of two between 16 and 1024")
    vg = p["vgroup"] or spec_head_dim
    if vg <= 0 or spec_head_dim % vg or vg % 8:
        raise UserError(f"quant: vgroup={p['vgroup']} must divide the head dim {spec_head_dim} "
                        f"and be a multiple of 8")
    if p["sink"] < 0 or p["window"] < 0:
        raise UserError("quant: sink and window must be >= 0")
    if not 0 <= p["outliers"] < 0.5:
        raise UserError(f"quant: outliers={p['outliers']} must be a fraction in [0, 0.5)")
    if p["keys"] not in ("channel", "token"):
        raise UserError(f"quant: keys={p['keys']!r} must be channel or token")
    if p["rotate"] and spec_head_dim & (spec_head_dim - 1):
        raise UserError(f"quant: rotate needs a power-of-two head dim, not {spec_head_dim}")
    if p.get("kres") and (p["keys"] != "channel" or p["nuq"] or p["rotate"] or spec_head_dim % 32):
        raise UserError("quant: kres=1 refines per-channel keys on uniform levels; it does not go with keys=token, "
                        f"nuq or rotate, and needs a head dim that is a multiple of 32 (not {spec_head_dim})")


def _check_kstat(p: dict, where: str = "quant") -> None:
    if p["kstat"] not in (8, 16):
        raise UserError(f"{where}: kstat={p['kstat']} is not supported (use 16 or 8)")
    if p["kstat"] == 8 and (p["keys"] != "channel" or p["nuq"] or p["kres"] or p["outliers"] > 0 or p["clip"]):
        raise UserError(f"{where}: kstat=8 stores per-channel key statistics of uniform codes; it does not go with "
                        "keys=token, nuq, kres, clip or outliers")


def _check_clip(p: dict, where: str = "quant") -> None:
    if p.get("clip") and (p["keys"] != "channel" or p["nuq"] or p.get("kres") or p["outliers"] > 0):
        raise UserError(f"{where}: clip=1 clips per-channel key groups on uniform levels; it does not go with "
                        "keys=token, nuq, kres or outliers")


def load_codebook(path: str, specs, bits: int, prerope: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer key and value levels (2**bits,) in [0, 1], checked against this model's shape."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise UserError(f"quant: nuq={path}: no such codebook file (make one with `longkv calibrate`)")
    try:
        book = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"quant: nuq={path} is not a codebook file ({e})") from None
    shape = [len(specs), specs[0].num_kv_heads, specs[0].head_dim]
    if book.get("shape") != shape:
        raise UserError(f"quant: nuq={path} was fitted for another model ({book.get('model', '?')}, "
                        f"layers×kv heads×head dim {book.get('shape')}); this model is {shape}")
    if book.get("bits") != bits:
        raise UserError(f"quant: nuq={path} holds {book.get('bits')}-bit levels but bits={bits}")
    if book.get("prerope", True) != prerope:   # files written before the field held pre-RoPE keys
        fitted, asked = ("after", "before") if prerope else ("before", "after")
        raise UserError(f"quant: nuq={path} was fitted to keys {fitted} RoPE but this cache quantizes them "
                        f"{asked} (prerope={int(prerope)}); calibrate for this spec (`longkv calibrate --cache ...`)")
    k = [torch.tensor(x, dtype=torch.float32) for x in book["k"]]
    v = [torch.tensor(x, dtype=torch.float32) for x in book["v"]]
    return k, v


@register("quant", help="quantized KV (KVQuant/KIVI): pre-RoPE per-channel keys, per-token values, "
                        "fp sink + recent window; options for outliers, nuq codebooks, rotation, post-RoPE keys",
          params=PARAMS)
class QuantCache(Cache):
    DEFAULTS: dict = {}

    def __init__(self, specs, *, batch, capacity, device, dtype, **kw):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        p = {k: v[1] for k, v in PARAMS.items()} | self.DEFAULTS | kw
        s0 = specs[0]
        if any((s.num_kv_heads, s.head_dim) != (s0.num_kv_heads, s0.head_dim) for s in specs):
            raise UserError("quant: layers with different KV shapes are not supported yet")
        _check(s0.head_dim, p)
        _check_clip(p)
        _check_kstat(p)
        self.p = p
        self.kstat = p["kstat"]
        self.clip = bool(p["clip"])
        self.bits, self.group, self.sink, self.window = p["bits"], p["group"], p["sink"], p["window"]
        D, H = s0.head_dim, s0.num_kv_heads
        self.D, self.vgroup = D, p["vgroup"] or D
        self.n_out = math.ceil(p["outliers"] * D) if p["outliers"] > 0 else 0
        self.per_channel, self.prerope, self.kres = p["keys"] == "channel", p["prerope"], bool(p["kres"])
        self.ring = self.window + 2 * self.group
        self.nq_cap = self.group * math.ceil(max(0, capacity - self.sink) / self.group)
        self.H = ref.hadamard(D, device) if p["rotate"] else None
        self.lut_k = self.lut_v = [None] * len(specs)
        if p["nuq"]:
            k, v = load_codebook(p["nuq"], specs, self.bits, prerope=bool(p["prerope"]))
            self.lut_k, self.lut_v = [x.to(device) for x in k], [x.to(device) for x in v]
        z = dict(device=device)
        shape = (batch, H, self.sink + self.ring, D)
        # sliding-window layers: `full`'s ring, layer i as local layer self.win[i]
        self.win, self.local = window_rings(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        packed = [i not in self.win for i in range(len(specs))]
        self.kf = [torch.zeros(shape, dtype=dtype, **z) if x else None for x in packed]
        self.vf = [torch.zeros(shape, dtype=dtype, **z) if x else None for x in packed]
        self.kq = [self._alloc(batch, H, self.per_channel, z) if x else None for x in packed]
        # the decode kernel's RoPE angles at every 16th position, one table per distinct RoPE
        from ..kernels.quant import rope_table, table_positions
        npos = table_positions(self.nq_cap, self.sink, self.ring)
        tabs: dict[int, torch.Tensor] = {}
        self.rope_tab = [tabs.setdefault(s.rope_index, rope_table(s.rope.inv_freq, npos, device)) for s in specs]
        self.vq = [self._alloc(batch, H, False, z) if x else None for x in packed]
        # The Triton path covers the main scheme; ablations run the torch reference (not in graphs).
        # Sliding-window layers decode through `full`'s ring (graph-safe), so only the packed layers count.
        self.graph_safe = (self.per_channel and self.H is None and (not self.kres or self._res_cuda(device))
                           and D % (64 if self.bits == 3 else 32) == 0   # whole 32-bit words per half row
                           and all(not s.softcap for i, s in enumerate(specs) if i not in self.win))

    def _res_cuda(self, device) -> bool:
        """kres: a graph-safe decode only where the CUDA kernel reads the residual bits (`quant_cuda.reads_res`, KIVI's
        layout at 4 bits, head dim >= 128, on a GPU); elsewhere they decode through the torch reference, eagerly."""
        from ..kernels import quant_cuda as qc
        return (qc.reads_res(self.bits, self.D, device)
                and not self.prerope and not self.n_out and self.vgroup == self.D and not self.p["nuq"])

    def _alloc(self, B, H, per_channel, z) -> dict:
        n, D = self.nq_cap, self.D
        d = {"planes": [torch.zeros(B, H, n, D * pb // 8, dtype=torch.uint8, **z) for pb in ref.PLANES[self.bits]]}
        rows, cols = (n // self.group, D) if per_channel else (n, D // self.vgroup)
        st = torch.uint8 if per_channel and self.kstat == 8 else torch.float16
        d["scale"] = torch.zeros(B, H, rows, cols, dtype=st, **z)
        d["zero"] = torch.zeros(B, H, rows, cols, dtype=st, **z)
        if st == torch.uint8:    # 8-bit key statistics: each group's grid (`quant_reference.stats8`)
            d["grid"] = torch.zeros(B, H, rows, ref.GRID, dtype=torch.float16, **z)
        if self.n_out:
            d["out_idx"] = torch.zeros(B, H, n, self.n_out, dtype=torch.uint8, **z)
            d["out_val"] = torch.zeros(B, H, n, self.n_out, dtype=torch.float16, **z)
        if self.kres and per_channel:
            d["res"] = torch.zeros(B, H, n, D // 8, dtype=torch.uint8, **z)
        return d

    # -- bookkeeping ------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in self.kf + self.vf + [self.H] if t is not None]
        out += list({id(t): t for t in self.rope_tab}.values())
        out += [x for x in self.lut_k + self.lut_v if x is not None]
        for d in self._packed():
            out += d["planes"] + [v for k, v in d.items() if k != "planes"]
        return out + ([] if self.local is None else self.local.k + self.local.v)

    def _packed(self) -> list[dict]:
        return [d for d in self.kq + self.vq if d is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def n_quantized(self, length: int) -> int:
        return self.group * max(0, (length - self.sink - self.window) // self.group)

    def stats(self) -> dict:
        elems = 2 * self.batch * sum(s.num_kv_heads * s.head_dim for s in self.specs)
        qelems = 2 * self.batch * sum(s.num_kv_heads * s.head_dim for i, s in enumerate(self.specs)
                                      if i not in self.win)
        packed = sum(t.numel() * t.element_size() for d in self._packed()
                     for t in d["planes"] + [v for k, v in d.items() if k != "planes"])
        # bits_per_element: everything held / capacity; quantized_bits: the packed region alone
        # (codes + scales + zeros + outliers), what a long context costs per element.
        return super().stats() | {"bits_per_element": round(8 * self.nbytes() / (elems * max(self.capacity, 1)), 3),
                                  "quantized_bits": round(8 * packed / (max(qelems, 1) * max(self.nq_cap, 1)), 3),
                                  "capacity": self.capacity, "quantized_tokens": self.n_quantized(self.length)}

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.ring)

    # -- quantize / dequantize (torch reference path) -----------------------------------------------------
    def _quant(self, layer: int, k, v) -> tuple[dict, dict]:
        """k (B, H, n·group, D) keys as stored (pre- or post-RoPE), v values → packed dicts."""
        if self.H is not None:
            k = k.float() @ self.H
        kw = dict(bits=self.bits, n_out=self.n_out)
        kq = (ref.quantize_keys(k, group=self.group, lut=self.lut_k[layer], res=self.kres,
                                clip=self.clip and qa.clip_range, kstat=self.kstat, **kw)
              if self.per_channel
              else ref.quantize_tokens(k, vgroup=self.vgroup, lut=self.lut_k[layer], **kw))
        return kq, ref.quantize_tokens(v, vgroup=self.vgroup, lut=self.lut_v[layer], **kw)

    def _store(self, layer: int, lo: int, kq: dict, vq: dict) -> None:
        for dst, src, per_channel in ((self.kq[layer], kq, self.per_channel), (self.vq[layer], vq, False)):
            n = src["planes"][0].shape[2]
            for a, b in zip(dst["planes"], src["planes"]):
                a[:, :, lo:lo + n] = b
            r = slice(lo // self.group, (lo + n) // self.group) if per_channel else slice(lo, lo + n)
            dst["scale"][:, :, r], dst["zero"][:, :, r] = src["scale"], src["zero"]
            if "grid" in src:
                dst["grid"][:, :, r] = src["grid"]
            for key in ("out_idx", "out_val", "res"):
                if key in src:
                    dst[key][:, :, lo:lo + n] = src[key]

    def _dequant(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized tokens 0..n-1 → keys (as stored, un-rotated), values; fp32 (B, H, n, D)."""
        def cut(d, r1):
            return {k: ([p[:, :, :n] for p in t] if k == "planes" else
                        t[:, :, :r1] if k in ("scale", "zero", "grid") else t[:, :, :n]) for k, t in d.items()}
        kw = dict(bits=self.bits, d=self.D)
        if self.per_channel:
            k = ref.dequantize_keys(cut(self.kq[layer], n // self.group), group=self.group,
                                    lut=self.lut_k[layer], **kw)
        else:
            k = ref.dequantize_tokens(cut(self.kq[layer], n), vgroup=self.vgroup, lut=self.lut_k[layer], **kw)
        if self.H is not None:
            k = k @ self.H
        v = ref.dequantize_tokens(cut(self.vq[layer], n), vgroup=self.vgroup, lut=self.lut_v[layer], **kw)
        return k, v

    def _rope(self, layer: int, k, pos):
        s = self.specs[layer]
        return ref.rope_at(k, pos, s.rope.inv_freq.to(k.device), s.rope.scaling) if self.prerope else k.float()

    # -- the contract -------------------------------------------------------------------------------------
    def append(self, layer, k, v, step: Step):
        if layer in self.win:
            return self.local.append(self.win[layer], k, v, step)
        start, end = step.start, step.start + step.n
        if end > self.capacity:
            raise UserError(f"the cache holds {self.capacity} tokens and this step needs {end}")
        if not self.prerope:
            k = apply_rope(k, *step.rope[self.specs[layer].rope_index])
        old, new = self.n_quantized(start), self.n_quantized(end)
        if new > old:  # flush whole groups: pending tokens come from the ring (older) or this chunk
            pos = torch.arange(self.sink + old, self.sink + new, device=k.device)
            from_ring = pos < start
            sl = self._slot(pos[from_ring])
            kk = torch.cat([self.kf[layer][:, :, sl], k[:, :, pos[~from_ring] - start]], 2)
            vv = torch.cat([self.vf[layer][:, :, sl], v[:, :, pos[~from_ring] - start]], 2)
            self._store(layer, old, *self._quant(layer, kk, vv))
        keep = max(start, end - self.ring)        # older positions of a long chunk would be overwritten
        pos = torch.arange(keep, end, device=k.device)
        pos = torch.cat([torch.arange(start, max(start, min(end, self.sink)), device=k.device), pos[pos >= self.sink]])
        sl = self._slot(pos)
        self.kf[layer][:, :, sl] = k[:, :, pos - start].to(self.dtype)
        self.vf[layer][:, :, sl] = v[:, :, pos - start].to(self.dtype)

    def past_attention(self, layer, q, step: Step):
        if layer in self.win:
            return self.local.past_attention(self.win[layer], q, step)
        n = step.start
        if n == 0:
            return None
        s = self.specs[layer]
        nq = self.n_quantized(n)
        slots, pos = ref.fp_slots(n, self.sink, self.ring, self.sink + nq)
        slots, pos = slots.to(q.device), pos.to(q.device)
        ks, vs, kpos = [self.kf[layer][:, :, slots].float()], [self.vf[layer][:, :, slots].float()], [pos]
        if nq:
            kd, vd = self._dequant(layer, nq)
            ks.append(kd)
            vs.append(vd)
            kpos.append(torch.arange(self.sink, self.sink + nq, device=q.device))
        kpos = torch.cat(kpos)
        k = self._rope(layer, torch.cat(ks, 2), kpos).to(q.dtype)
        v = torch.cat(vs, 2).to(q.dtype)
        return past_attention(q, k, v, scale=s.scale, q_pos=step.pos, k_pos=kpos, window=s.window,
                              softcap=s.softcap)

    def decode(self, layer, q, k, v, step: Step):
        """One token, positions only on the device (CUDA graph): write it to the fp ring, re-derive
        the most recently completed group from the ring (idempotent, so no host-side condition), then
        attend straight from the packed bytes."""
        from ..kernels import quant as qk

        if not self.graph_safe:
            raise NotImplementedError("this quant configuration has no graph-safe decode path")
        if layer in self.win:
            return self.local.decode(self.win[layer], q, k, v, step)
        s = self.specs[layer]
        length = step.length
        kw = self.kernel_kwargs(layer)
        qk.append_flush(k.to(self.dtype), v.to(self.dtype), length, self.kf[layer], self.vf[layer],
                        self.kq[layer], self.vq[layer], **{x: kw[x] for x in self._FLUSH_ARGS},
                        rope=None if self.prerope else step.rope[s.rope_index],   # kivi: rotated in the kernel
                        clip=self.clip)
        return qk.quant_decode_attention(q, self.kq[layer], self.vq[layer], self.kf[layer], self.vf[layer], length,
                                         rope_tab=self.rope_tab[layer], **kw)

    _FLUSH_ARGS = ("bits", "group", "vgroup", "sink", "window", "lut_k", "lut_v")

    def kernel_kwargs(self, layer: int) -> dict:
        """The layout arguments of `kernels.quant.quant_decode_attention` (and its reference) for a layer."""
        s = self.specs[layer]
        return dict(bits=self.bits, group=self.group, vgroup=self.vgroup, sink=self.sink, window=self.window,
                    lut_k=self.lut_k[layer], lut_v=self.lut_v[layer], scale=s.scale, inv_freq=s.rope.inv_freq,
                    rope_scaling=s.rope.scaling, prerope=self.prerope)


def _preset(name: str, help: str, **defaults):
    params = {k: (t, defaults.get(k, d), h) for k, (t, d, h) in PARAMS.items()}
    cls = type(f"QuantCache_{name}", (QuantCache,), {"DEFAULTS": defaults, "__doc__": help})
    register(name, help=help, params=params)(cls)


_preset("kv4", "4-bit KV = quant:bits=4,group=64,prerope=0 (KIVI's layout, Liu et al. 2024): keys per "
               "channel *after* RoPE in 64-token groups, values per token (one range a head), 4 sink + >=128 "
               "recent tokens in full precision; 4.5 bits/element at head dim 64 (4.38 at 128) beyond the fp "
               "window. The decode kernel folds the key scale into q and feeds the codes to the tensor cores "
               "(CUDA; H200, Llama-3-8B shape: 0.69x of bf16 full's ms/token at 128K, 0.50x at 512K); ppl "
               "+0.08 % at 2K and +0.06 % at 8K on smollm2-135m; the same needles as full, but -2.0 ± 1.8 "
               "points on its RULER-style tasks at 8K (633 cells; 4 bits itself, mostly in the keys): "
               "kv4:group=16 (16-token key groups) is -1.0 ± 1.5 there, at 0.73x of full at 128K. "
               "KVQuant's pre-RoPE "
               "keys are quant:bits=4 (+0.04 % / +0.09 %, but every key rotated in the kernel: 1.45x of full at "
               "128K)",
        bits=4, prerope=False)
_preset("kv3", "3-bit KV = quant:bits=3,group=64: KVQuant's layout, keys per channel *before* RoPE in "
               "64-token groups (no fast 3-bit kernel, so the layout that quantizes best), values per token; "
               "3.5 bits/element at head dim 64 (3.38 at 128) beyond the fp window",
        bits=3)
_preset("kv2", "2-bit KV = quant:bits=2,group=16,prerope=0 (KIVI's layout, as kv4): 16-token key groups "
               "after RoPE, one value range per token, no outliers (the CUDA kernel's layout); 3.25 "
               "bits/element beyond the fp window; ppl +6.2 % at 2K, +6.5 % at 8K on smollm2-135m; 0.71x of "
               "bf16 full's ms/token at 128K (0.73x before the keys were dequantized in registers), 0.56x at "
               "512K (H200, 8B shape; 0.66x at 128K on an H100); 32-token groups "
               "(quant:bits=2,group=32,prerope=0): 0.71x / 0.51x on the H200, 2.75 bits, ppl +8.8 % at 2K but "
               "+13.9 % at 8K (past the 10 % target); finds 7 of the 14 needles full finds on "
               "smollm2-135m at 2K-7K (kv4: all 14). KVQuant's 2-bit layout, "
               "quant:bits=2,group=32,vgroup=32,outliers=0.01 (pre-RoPE keys, 1 % outliers): ppl +4.8 % / "
               "+8.5 %, 3.38 bits, 4 needles of the 15 where this finds 7, and the Triton kernel, slower than full. "
               "kv2:clip=1 (MSE-clipped key groups, the same bytes): +2.4 % / +3.4 % at 2K / 8K and 30 of 45 needles "
               "against 19, "
               "at 0.642x of full where kv2 is 0.634x (the search when a group is written)",
        bits=2, group=16, prerope=False)
_preset("kivi4", "= kv4 (quant:bits=4,group=64,prerope=0) under the paper's name (KIVI, Liu et al. 2024): keys "
                 "per channel after RoPE, values per token",
        bits=4, prerope=False)
_preset("kivi2", "= kv2 (quant:bits=2,group=16,prerope=0) under the paper's name (KIVI, Liu et al. 2024)",
        bits=2, group=16, prerope=False)
