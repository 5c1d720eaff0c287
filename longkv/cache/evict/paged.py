"""Ragged per-KV-head storage in pages: what makes per-head budgets (AdaKV) really smaller.

Each (batch, KV head) row of a layer owns a list of pages of `page` tokens in one shared pool (keys
after RoPE, values, int32 positions); rows hold different numbers of tokens and a row's memory is
its own pages only (AdaKV's flattened varlen cache, FFY0/AdaKV, in paged form). Prefill appends and
compacts on the host's page lists; before decoding, the pool is repacked to exactly the pages each
row needs for its kept tokens plus the tokens still to come, and a device page table (B·Hkv, MAXP)
lets one decode step write and attend (`kernels/quest.py:paged_attention`) inside a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from ...kernels import quest as kq
from ...kernels.sparse_reference import ragged_attention_lse


class PagedStorage:
    def __init__(self, specs, *, batch: int, device, dtype, page: int = 16):
        self.specs, self.batch, self.device, self.dtype, self.P = specs, batch, torch.device(device), dtype, page
        L = len(specs)
        self.kp: list = [None] * L
        self.vp: list = [None] * L
        self.pp: list = [None] * L
        self.pages = [[[] for _ in range(batch * s.num_kv_heads)] for s in specs]
        self.lens = [[0] * (batch * s.num_kv_heads) for s in specs]
        self.free: list[list[int]] = [[] for _ in specs]
        self.table: list = [None] * L

    # -- pool management (host side, never inside a graph) --------------------------------------------
    def _pool(self, layer: int, n_pages: int, copy_from=None):
        D = self.specs[layer].head_dim
        k = torch.zeros(n_pages, self.P, D, device=self.device, dtype=self.dtype)
        v, p = torch.zeros_like(k), torch.zeros(n_pages, self.P, device=self.device, dtype=torch.int32)
        if copy_from is not None and self.kp[layer] is not None:
            n = self.kp[layer].shape[0]
            k[:n], v[:n], p[:n] = self.kp[layer], self.vp[layer], self.pp[layer]
        self.kp[layer], self.vp[layer], self.pp[layer] = k, v, p

    def _ensure(self, layer: int, need: list[int]) -> None:
        """Row h owns at least ceil(need[h] / P) pages."""
        want = [max(0, math.ceil(n / self.P) - len(pg)) for n, pg in zip(need, self.pages[layer])]
        short = sum(want) - len(self.free[layer])
        if short > 0:
            old = 0 if self.kp[layer] is None else self.kp[layer].shape[0]
            grow = short + old // 4
            self._pool(layer, old + grow, copy_from=True)
            self.free[layer] += list(range(old, old + grow))
        for h, w in enumerate(want):
            self.pages[layer][h] += [self.free[layer].pop() for _ in range(w)]

    def _rows(self, layer: int, h: int, slots: torch.Tensor) -> torch.Tensor:
        pg = torch.tensor(self.pages[layer][h], device=self.device, dtype=torch.long)
        return pg[slots // self.P] * self.P + slots % self.P

    def _flat(self, layer: int):
        D = self.specs[layer].head_dim
        return self.kp[layer].view(-1, D), self.vp[layer].view(-1, D), self.pp[layer].view(-1)

    # -- prefill ------------------------------------------------------------------------------------------
    def append(self, layer: int, kr: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """kr (after RoPE), v: (B, Hkv, T, D) appended to every row."""
        B, H, T, D = kr.shape
        lens = self.lens[layer]
        self._ensure(layer, [n + T for n in lens])
        t = torch.arange(T, device=self.device)
        rows = torch.cat([self._rows(layer, h, lens[h] + t) for h in range(B * H)])
        K, V, Pp = self._flat(layer)
        K.index_copy_(0, rows, kr.reshape(B * H * T, D))
        V.index_copy_(0, rows, v.reshape(B * H * T, D))
        Pp.index_copy_(0, rows, pos.to(torch.int32).repeat(B * H))
        self.lens[layer] = [n + T for n in lens]

    def padded(self, layer: int):
        """→ k, v (B, Hkv, N, D), pos (B, Hkv, N) int64, valid (B, Hkv, N) with N = the longest row."""
        s = self.specs[layer]
        lens = self.lens[layer]
        N = max(lens)
        t = torch.arange(N, device=self.device)
        valid = torch.stack([t < n for n in lens])
        rows = torch.stack([self._rows(layer, h, torch.clamp(t, max=max(n - 1, 0))) if n else
                            torch.zeros(N, dtype=torch.long, device=self.device) for h, n in enumerate(lens)])
        K, V, Pp = self._flat(layer)
        shape = (self.batch, s.num_kv_heads, N)
        return (K[rows].reshape(*shape, -1), V[rows].reshape(*shape, -1), Pp[rows].long().reshape(shape),
                valid.reshape(shape))

    def keep(self, layer: int, keep: list[torch.Tensor]) -> None:
        """keep[h]: slot indices of row h to keep, ascending (slot order is position order)."""
        src = torch.cat([self._rows(layer, h, idx) for h, idx in enumerate(keep)])
        dst = torch.cat([self._rows(layer, h, torch.arange(len(idx), device=self.device)) for h, idx in enumerate(keep)])
        for buf in self._flat(layer):
            buf.index_copy_(0, dst, buf[src])
        for h, idx in enumerate(keep):
            n_pages = math.ceil(len(idx) / self.P)
            self.free[layer] += self.pages[layer][h][n_pages:]
            self.pages[layer][h] = self.pages[layer][h][:n_pages]
            self.lens[layer][h] = len(idx)

    def past_attention(self, layer: int, q: torch.Tensor):
        if max(self.lens[layer]) == 0:
            return None
        s = self.specs[layer]
        k, v, _, valid = self.padded(layer)
        return ragged_attention_lse(q, k, v, valid, scale=s.scale, softcap=s.softcap)

    # -- decode ---------------------------------------------------------------------------------------------
    def prepare_decode(self, layer: int, room: int) -> None:
        """Repack into exactly the pages each row needs for its tokens + `room`; build the page table."""
        lens = self.lens[layer]
        need = [math.ceil((n + room) / self.P) for n in lens]
        old = self._flat(layer) if self.kp[layer] is not None else None
        src = [self._rows(layer, h, torch.arange(n, device=self.device)) for h, n in enumerate(lens)]
        kp, vp, pp = self.kp[layer], self.vp[layer], self.pp[layer]
        self.kp[layer] = None
        self._pool(layer, sum(need))
        K, V, Pp = self._flat(layer)
        starts = [sum(need[:h]) for h in range(len(need))]
        self.pages[layer] = [list(range(a, a + n)) for a, n in zip(starts, need)]
        self.free[layer] = []
        if old is not None:
            D = self.specs[layer].head_dim
            ok, ov, opp = kp.view(-1, D), vp.view(-1, D), pp.view(-1)
            for h, n in enumerate(lens):
                dst = self._rows(layer, h, torch.arange(n, device=self.device))
                K[dst], V[dst], Pp[dst] = ok[src[h]], ov[src[h]], opp[src[h]]
        table = torch.zeros(len(lens), max(need), dtype=torch.int32, device=self.device)
        for h, pg in enumerate(self.pages[layer]):
            table[h, :len(pg)] = torch.tensor(pg, dtype=torch.int32)
        self.table[layer] = table

    def decode_write(self, layer: int, kr, v, pos, phys) -> None:
        """One token per row at slot phys (B·Hkv,) (device), graph-safe."""
        B, H, _, D = kr.shape
        rows = self.table[layer].gather(1, (phys // self.P)[:, None]).long()[:, 0] * self.P + phys % self.P
        K, V, Pp = self._flat(layer)
        K.index_copy_(0, rows, kr.reshape(B * H, D))
        V.index_copy_(0, rows, v.reshape(B * H, D))
        Pp.index_copy_(0, rows, pos.to(torch.int32).expand(B * H))

    def decode_attention(self, layer: int, q, phys):
        s = self.specs[layer]
        return kq.paged_attention(q, self.kp[layer], self.vp[layer], self.table[layer], phys // self.P + 1,
                                  phys % self.P + 1, scale=s.scale, softcap=s.softcap)

    def bump(self, layer: int) -> None:
        self.lens[layer] = [n + 1 for n in self.lens[layer]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kp + self.vp + self.pp + self.table if t is not None)
