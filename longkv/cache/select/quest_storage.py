"""`quant+quest` (and `kv4+quest`, ...): Quest's page selection over a packed storage.

The keys and values live in `cache/quant_storage.py`'s `QuantStorage` (post-RoPE keys per channel over
slot groups, values per token, sink and recent window in full precision; Quest evicts nothing, so a
slot is a position). Quest's page bounds (min/max per 16-token page) are taken from the full-precision
keys as they arrive, before they are quantized, so the selection sees what plain `quest` sees.

A decode step of a sparse layer: the storage writes the token (positions only grow, so it is
`cache/quant.py`'s append + flush kernel: `QuantStorage.append_only`), the bounds fold it in,
`kernels/quest.py` scores every page and selects the top pages into a page table, then only the
selected pages' rows are gathered from the packed planes and dequantized (`QuantStorage.read_rows`:
codes, statistics and outliers of those rows only) into a budget-sized scratch, which the paged
flash-decoding kernel attends to. So the step reads the bounds and the selected pages' packed bytes,
not the whole layer; the gather and dequantization are plain torch (a few dozen small kernels a
layer, inside the CUDA graph), not yet one fused kernel: smaller and sparse, slower than full
(BENCHMARKS.md).
Dense layers (the first `dense_layers`) decode with the storage's packed kernel; sliding-window layers
read their window's rows the same way.

`nbytes()` is the storage's bytes plus the page bounds. Not here: `rerank` (the second stage's codes
are written when a page fills, from full-precision keys this storage no longer keeps).
"""
from __future__ import annotations

import torch

from ...errors import UserError
from ...kernels import quest as kq
from ...kernels import sparse_reference as ref
from ...kernels.reference import ragged_attention_lse
from ...models.rope import apply_rope
from ..base import Cache
from ..compose import make_storage
from .quest import QuestCache


class QuestStorageCache(QuestCache):
    def __init__(self, specs, *, batch, capacity, device, dtype, storage, ratio=None, budget=None, page=16,
                 recent=2, dense_layers=2, rerank=0, rbits=2):
        if rerank:
            raise UserError(f"quest: rerank={rerank} needs the full-precision storage (its page codes are "
                            f"written from full-precision keys); drop rerank or {storage[0]}")
        P = self._check_page(page)
        Cache.__init__(self, specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self._pages(specs, batch, device, dtype, ratio, budget, P, recent, dense_layers, 0, 0)
        self.store = make_storage(storage, specs, batch=batch, device=device, dtype=dtype)
        self.storage_name = storage[0]
        self.store.append_only = True     # positions only grow: the write is one append + flush kernel
        for i in range(len(specs)):
            self.store.reserve(i, P * self.max_pages, 0)

    def nbytes(self) -> int:
        return self.store.nbytes() + sum(t.numel() * t.element_size() for t in self.pmin + self.pmax if t is not None)

    def past_attention(self, layer, q, step):
        n = step.start
        return None if n == 0 else self.store.past_attention(layer, q, n, q_pos=step.pos)

    def append(self, layer, k, v, step):
        end = step.start + step.n
        if end > self.capacity:
            raise UserError(f"the cache holds {self.capacity} tokens and this step needs {end}")
        cos, sin = step.rope[self.specs[layer].rope_index]
        self.store.write(layer, k, v, pos=step.pos, cos=cos, sin=sin, slot=step.start)
        if self.pmin[layer] is not None:
            ref.fold_chunk_bounds(apply_rope(k, cos, sin), step.start, self.pmin[layer], self.pmax[layer], page=self.P)

    def decode(self, layer, q, k, v, step):
        """One token, graph-safe: write, then (sparse layers) fold the bounds, score, select, gather and
        dequantize the selected pages' rows, paged attention over them."""
        s, P = self.specs[layer], self.P
        pos = step.pos.reshape(-1)[-1:]
        cos, sin = step.rope[s.rope_index]
        self.store.write(layer, k, v, pos=pos, cos=cos, sin=sin, slot=pos)
        if s.window is not None:           # its window's rows, dequantized
            rows = pos - s.window + 1 + torch.arange(s.window, device=pos.device)
            kk, vv = self.store.read_rows(layer, rows.clamp(min=0).expand(q.shape[0], s.num_kv_heads, -1))
            valid = (rows >= 0).expand(q.shape[0], s.num_kv_heads, -1)
            out, _ = ragged_attention_lse(q, kk, vv, valid, scale=s.scale, softcap=s.softcap)
            return out.to(q.dtype)
        if not self._sparse(layer):
            return self.store.decode_attention(layer, q, pos + 1)
        mn, mx = self.pmin[layer], self.pmax[layer]
        ref.fold_token_bounds(apply_rope(k, cos, sin), pos, mn, mx, page=P)
        scores = kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=self.recent)
        table, nsel, last = kq.select_pages(scores, self.k_pages, pos, page=P, row_pages=self.max_pages)
        B, H, K, D = q.shape[0], s.num_kv_heads, self.k_pages, s.head_dim
        local = table.long() - torch.arange(B * H, device=q.device)[:, None] * self.max_pages
        rows = (local[:, :, None] * P + torch.arange(P, device=q.device)).reshape(B, H, K * P)
        kk, vv = self.store.read_rows(layer, rows)     # entries past nsel are clamped, then masked
        scratch = torch.arange(B * H * K, device=q.device, dtype=torch.int32).reshape(B * H, K)
        return kq.paged_attention(q, kk.reshape(-1, P, D), vv.reshape(-1, P, D), scratch, nsel, last,
                                  scale=s.scale, softcap=s.softcap)

    def stats(self) -> dict:
        st = super().stats()
        st.update(self.store.stats())
        st["note"] = (f"{self.storage_name}+quest: packed storage; a decode step reads at most "
                      f"{self.k_pages * self.P} tokens' packed rows in layers >= {self.dense_layers}, dequantized "
                      "in torch (no fused kernel yet)")
        if self.k_pages >= self.max_pages:
            st["note"] = f"{self.budget} reads every page: degraded to {self.storage_name}"
        return st
