"""`duo`: DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", ICLR 2025, arXiv 2410.10819; head scores in the spirit of Wu et al., "Retrieval
Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574). Per KV head (GQA: a whole
query group follows its KV head): retrieval heads keep every token, streaming heads keep `sink` +
`window` tokens. The two groups are two real caches over head subsets (the storage cache, e.g.
`full`, for retrieval heads; `streaming` for the rest), so streaming heads really hold only their
ring, and both halves decode inside a CUDA graph.

The head map comes from `longkv calibrate duo` (`longkv/calibrate_duo.py`): one score per (layer, KV
head), saved as `duo_heads.json` next to the model; `map=` takes that file, its folder or a model
name. `ratio` is the fraction of (layer, KV head) pairs made streaming, i.e. the fraction of the
cache removed as the context grows (at T tokens it is ratio · (1 − (sink + window)/T); `stats()`
reports the real figure).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ...errors import UserError
from ..base import Cache
from ..evict.streaming import StreamingCache
from ..registry import REGISTRY, register

MAP_FILE = "duo_heads.json"


def find_map(where: str) -> Path:
    p = Path(where).expanduser()
    if p.is_dir():
        p = p / MAP_FILE
    if not p.is_file():
        from ...models.fetch import resolve
        try:
            p = resolve(where, download=False, progress=False) / MAP_FILE
        except Exception:
            pass
    if not p.is_file():
        raise UserError(f"duo: no head map at {where!r}; make one with `longkv calibrate duo --model MODEL` "
                        f"and pass duo:map=PATH (a {MAP_FILE} file, its folder, or the model name)")
    return p


def streaming_heads(scores: list[list[float]], ratio: float) -> list[list[bool]]:
    """The `ratio` fraction of (layer, head) pairs with the lowest scores → True (streaming)."""
    flat = sorted((s, i, h) for i, row in enumerate(scores) for h, s in enumerate(row))
    n = round(ratio * len(flat))
    out = [[False] * len(row) for row in scores]
    for _, i, h in flat[:n]:
        out[i][h] = True
    return out


@register("duo", help="DuoAttention: retrieval KV heads keep everything, streaming heads keep sink + window; "
          "ratio = fraction of KV heads made streaming (≈ fraction of the cache removed at long context); "
          "needs a head map from `longkv calibrate duo`",
          params={"ratio": (float, 0.5, "fraction of (layer, KV head) pairs made streaming, in [0, 1)"),
                  "map": (str, "", "duo_heads.json, its folder, or a model name"),
                  "sink": (int, 64, "streaming heads: first tokens kept"),
                  "window": (int, 256, "streaming heads: most recent tokens kept")},
          composes=("full", "quant"))
class DuoCache(Cache):
    role = "heads"

    def __init__(self, specs, *, batch, capacity, device, dtype, ratio=0.5, map="", sink=64, window=256,
                 storage=None):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        if not 0 <= ratio < 1:
            raise UserError(f"duo: ratio is the fraction of KV heads made streaming, in [0, 1); got {ratio}")
        if window < 1 or sink < 0:
            raise UserError("duo: window must be >= 1 and sink >= 0")
        self.ratio, self.sink, self.window = ratio, sink, window
        if ratio == 0:
            stream = [[False] * s.num_kv_heads for s in specs]
        else:
            data = json.loads(find_map(map).read_text())
            scores = data["scores"]
            if [len(r) for r in scores] != [s.num_kv_heads for s in specs]:
                raise UserError(f"duo: the head map {map} was made for another model ({data.get('model', '?')})")
            stream = streaming_heads(scores, ratio)
        self.stream = stream
        kw = dict(batch=batch, capacity=capacity, device=device, dtype=dtype)
        name, params = storage or ("full", {})
        self.parts = []   # (cache, {layer: (sub layer, q index, kv index)})
        for want, make in ((False, lambda sp: REGISTRY[name].cls(sp, **kw, **params)),
                           (True, lambda sp: StreamingCache(sp, **kw, budget=sink + window, sink=sink,
                                                            storage=(name, params)))):
            sub_specs, where = [], {}
            for i, s in enumerate(specs):
                heads = [h for h in range(s.num_kv_heads) if stream[i][h] == want]
                if not heads:
                    continue
                G = s.num_heads // s.num_kv_heads
                qi = torch.tensor([h * G + g for h in heads for g in range(G)], device=device)
                where[i] = (len(sub_specs), qi, torch.tensor(heads, device=device))
                sub_specs.append(replace(s, num_heads=G * len(heads), num_kv_heads=len(heads)))
            if sub_specs:
                self.parts.append((make(sub_specs), where))
        self.graph_safe = all(c.graph_safe for c, _ in self.parts)

    def attend(self, layer, q, k, v, *, step):
        out = torch.empty_like(q)
        for cache, where in self.parts:
            if layer in where:
                j, qi, ki = where[layer]
                o = cache.attend(j, q.index_select(1, qi), k.index_select(1, ki), v.index_select(1, ki), step=step)
                out.index_copy_(1, qi, o)
        return out

    def past_attention(self, layer, q, step):  # attend() delegates to the two halves
        raise NotImplementedError

    def append(self, layer, k, v, step):
        raise NotImplementedError

    def decode(self, layer, q, k, v, step):
        return self.attend(layer, q, k, v, step=step)

    def advance(self, n: int) -> None:
        super().advance(n)
        for cache, _ in self.parts:
            cache.advance(n)

    def nbytes(self) -> int:  # the halves plus the head-index tensors used to split q/k/v
        idx = sum(t.numel() * t.element_size() for _, w in self.parts for _, qi, ki in w.values() for t in (qi, ki))
        return sum(c.nbytes() for c, _ in self.parts) + idx

    def stats(self) -> dict:
        st = super().stats()
        n_stream = sum(map(sum, self.stream))
        n_all = sum(map(len, self.stream))
        kept = (n_all - n_stream) * self.length + n_stream * min(self.length, self.sink + self.window)
        st.update(streaming_heads=f"{n_stream}/{n_all}", sink=self.sink, window=self.window,
                  removed_fraction=round(1 - kept / max(1, n_all * self.length), 4))
        if n_stream == 0 or self.length <= self.sink + self.window:
            st["note"] = "every head keeps every token so far: same as the full cache"
        return st

