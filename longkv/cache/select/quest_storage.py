"""`quant+quest` (and `kv4+quest`, ...): Quest's page selection over a packed storage.

The keys and values live in `cache/quant_storage.py`'s `QuantStorage` (post-RoPE keys per channel over
slot groups, values per token, sink and recent window in full precision; Quest evicts nothing, so a
slot is a position). Quest's page bounds (min/max per 16-token page) are taken from the full-precision
keys as they arrive, before they are quantized, so the selection sees what plain `quest` sees.

A decode step of a sparse layer: the storage writes the token (positions only grow, so it is
`cache/quant.py`'s append + flush kernel: `QuantStorage.append_only`), the bounds fold it in,
`kernels/quest.py` scores every page and selects the top pages into a page table, and
`kernels/quant_paged.py` attends to the selected pages straight from the packed planes (codes and
statistics of those pages only, dequantized in registers; the sink page and the pages at the
full-precision ring from the fp buffer). So the step reads the bounds and the selected pages' packed
bytes, not the whole layer, and writes no dequantized copy. (Before that kernel, the selected rows
were gathered and dequantized in torch into a scratch: ~350 small kernels a layer, 7.6x slower than
full at 128K.)
Dense layers (the first `dense_layers`) decode with the storage's packed kernel. Sliding-window layers
(Gemma 3's local ones) are not in the storage: they keep their window in full precision, `full`'s ring,
as `quant` keeps them. gemma3-270m, 32K, bf16 (15 of its 18 layers): `kv4+quest:groups=1,channels=0.125`
held 1.69x full's bytes when those layers were packed whole, 0.46x now; and a prompt chunk no longer
dequantizes their whole past (CPU, 8K NIAH: 76 s → 32 s, full 29 s).

`groups=1` (`kv4+quest:groups=1`): the pages are the storage's key groups (64 tokens for kv4). A group's
keys already carry a per-channel scale s and zero z, so its keys lie in [z, z + (2^bits - 1)·s] and
Quest's bound needs no page min/max at all (`kernels/quest.py: group_scores`, 4 bytes a channel a group
read, an eighth of the group's key codes). The selected groups go to the KIVI-layout CUDA kernel's paged
variant (`kernels/quant_cuda.py: paged_attention`, a table of groups instead of every group; the sink
and the full-precision window are always read, so they count toward the budget), the select is one
CUDA block a row (`kernels/page_select.py`). A sparse layer is 5 launches: the append + flush (RoPE
included), score, select, attention, merge. H200, Llama-3-8B shape, 512K (BENCHMARKS.md, issue 5,
session 13): 3.05x full's decode speed at budget 1/8, 3.36x at 1/32, 0.28x its memory. The price is a
coarser bound: 64-token groups with per-channel ranges bound loosely, and on smollm2-135m's NIAH at
8x it finds fewer needles than 16-token Quest pages (BENCHMARKS.md). 2/4-bit codes with one value
range a token and no outliers (the CUDA kernel's layout); elsewhere the same steps run in torch.

`page=P` larger than the key group (with groups=1; e.g. `kv4:group=16+quest:groups=1,page=64`): a page is P/g
consecutive key groups. The groups are scored as before, a page takes the largest of its groups' scores (the
log-sum-exp for rank=mass), the select ranks pages, and `page_select.page_groups` lists the selected pages'
flushed groups for the paged kernel (one small launch more a layer). So the select and the selection's grain are
those of P-token groups, and the storage keeps its finer statistics: 16-token key groups recover smollm2's
RULER-style loss (session 29), but as pages they make the select rank 4x the groups.

`channels=F` (with groups=1 over 4-bit storage): the groups are scored SparQ's way instead of by the
bound (Ribar et al., arXiv 2312.04985; `kernels/quest_sparq.py`): every token's logit is estimated from
the F·D channels where the query group's |q| is largest (at least 16, or all D: the score's dot reads 16
anyway), read from a channel-major copy of the key codes (+1/8 of bf16 keys' bytes, written as groups
flush), and a group ranks by its largest estimate (`rank=max`), its attention mass (`rank=mass`), or its share
of each query's softmax over the groups' largest estimates, summed over the query group (`rank=peak`: mass
with each query's peak in place of its log-sum-exp; no exponential a token).
A sparse layer is 5 launches, as with the bound: the append + flush also writes a flushed group into the
copy (`sketch=`), and the CUDA score picks the channels in each of its blocks; elsewhere
`prepare` picks them first (6). rank=mass / peak: 5 on sm_90+ too (the cluster select normalises each query's
values and ranks by mass itself, `page_select._cluster`), else 7 (`page_mass`'s two launches first).

`weigh=1` (with channels=F): the channels are chosen by Σ_g |q_g| times the keys' root mean square along
each channel (Σ k² of the prompt's first `fit` post-RoPE keys, summed as prefill chunks arrive), so a
channel counts for what it can add to q·k rather than for the query alone (the same copy and score; the
choice and SparQ's share change). gemma3-270m's q/k RMSNorm leaves |q| spread over its 256 channels, and
|q| alone misses needles there that the weighted choice finds.

`every=K` (with groups=1): the groups are scored and selected on the first decode step after a prompt and
every K-th step after it, and the steps between read the same table (LServe's reusable page selector: Yang
et al., "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention", MLSys 2025, arXiv
2502.14866, which refreshes every 4 steps). The table and its count are kept per layer, and the step's
decision is made on the device (the CUDA score and block select read the step's position and return at once
on the steps between: `page_select.refresh`), so a CUDA graph replays one step for both kinds. Elsewhere (CPU,
Triton) the fresh table is computed every step and taken only on the refresh steps. A group that completes
between two refreshes is not read until the next one (its tokens have left the full-precision window).
On gemma3-270m at 16K, 8x, a quarter of the channels, consecutive steps' tables share ~45 % of their groups
(Jaccard, 6 cells, CPU). Measured (sessions 26, 28): every 2 takes the quarter from 2.92x to 3.13x of full at
512K (H100, 16 layers) and from 2.80x to 3.05x (H200, 32 layers) but costs cells: -3.2 ± 1.7 points against
full over 528 gemma3 16K cells, against -1.8 ± 1.8 every step, mostly digits lost mid-number (the stale step
needs a group the refresh did not rank).

The storage's full-precision window (`quant:window`, 128 in kv4) holds the prompt's last tokens (the
question and the answer template among them) and counts toward the budget: at 16K and 8x a 1,024-token
window leaves half the groups to select. So a larger window is for prompts of 32K and more.

Where it stands (BENCHMARKS.md, issue 5, "Where Quest stands" and sessions 13-28): on the 8B shape at
512K and 1/8, `kv4+quest:ratio=0.875,groups=1,channels=0.125,rank=max,weigh=1` decodes at 2.96-3.08x of
full (H200, side by side) and `channels=0.25` at 2.77-2.80x (2.92-3.05x on four H100s at 16 layers; 3.05x
with every=2 on the H200); on gemma3-270m (head dim 256) at 16K and 8x, over 528 paired cells,
`channels=0.25` is -1.8 ± 1.8 points against full (every=2: -3.2 ± 1.7), `channels=0.125` -6.7 ± 3.8 (264
cells), and plain `quest:ratio=0.875,rerank=8` -0.6 ± 1.2 (+0.2 ± 1.3 at 32K, 446 cells). So on head dim 256
use a quarter. On smollm2-135m at 8K (633 cells) the quarter is -2.6 ± 2.2, of which its 4-bit storage alone
(`kv4`) is -2.0 ± 1.8, mostly its keys (BENCHMARKS.md, issue 4, session 28). Over 16-token key groups
(`kv4:group=16+quest:...`) it is -1.0 ± 1.8 (604 cells, session 29), but 2.57x of full at 512K (H100, 16 layers):
the score reads their scale/zero rows, the select ranks 4x the groups and the attention rebuilds its query every
tile. Scoring the query group's sum instead of each query (1/G of the score's work) cost 10 points on smollm2 and
was dropped. Over `kv4:kres=1` (a residual bit a key element, read only by the attention over the selected groups)
with `dense_layers=0` the quarter is -1.8 ± 2.4 on smollm2 8K (505 cells; the same over `kv4` -4.1) at 3.02x of full
(H100, 16 layers, session 31); on gemma3-270m it is -2.5 ± 2.1 at 16K and -2.6 ± 2.0 at 32K (session 32: the bit is
neutral there, and ranking the groups by their largest logit is what loses cells; `rank=mass` finds half of them on
CPU). With `rank=mass` (M, sessions 33-39) it is -0.8 ± 2.1 on smollm2 8K (633 cells), -1.7 ± 2.2 / -1.8 ± 1.9 on
gemma3 16K / 32K, and 3.04x of full at 512K on the 32-layer 8B shape (H100; 2.92x at 16 layers on the same card).

`nbytes()` is the storage's bytes plus the page bounds (none with groups=1) and the channel-major copy
(and with weigh=1 the per-channel sums and weights).
Not here: `rerank` (the second stage's codes are written when a page fills, from full-precision keys
this storage no longer keeps).
"""
from __future__ import annotations

import math

import torch

from ...errors import UserError
from ...kernels import quest as kq
from ...kernels.quant_paged import quant_group_attention, quant_paged_attention
from ...kernels.sparq_reference import sketch_groups, sparq_weights
from ...kernels.quest_sparq import sparq_group_scores
from ...kernels import sparse_reference as ref
from ...models.rope import apply_rope
from ..base import Cache
from ..compose import make_storage
from ..full import window_rings
from .quest import QuestCache

MIN_CHANNELS = 16   # channels=F reads at least this many channels (or all D)


class QuestStorageCache(QuestCache):
    def __init__(self, specs, *, batch, capacity, device, dtype, storage, ratio=None, budget=None, page=16,
                 recent=2, dense_layers=2, rerank=0, rbits=2, rank="mass", groups=False, channels=0.0, fit=8192,
                 weigh=False, every=1):
        if rerank:
            raise UserError(f"quest: rerank={rerank} needs the full-precision storage (its page codes are "
                            f"written from full-precision keys); drop rerank or {storage[0]}")
        Cache.__init__(self, specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.store = make_storage(storage, specs, batch=batch, device=device, dtype=dtype)
        self.storage_name = storage[0]
        st = self.store
        self.groups = bool(groups)               # pages = the storage's key groups (module docstring)
        P = st.g if self.groups else self._check_page(page)
        if self.groups and page > st.g:   # pages of page / g consecutive key groups (both powers of two)
            P = self._check_page(page)
        self.sub = P // st.g if self.groups else 1   # key groups a page
        if self.groups:
            bad = [why for ok, why in ((st.bits in (2, 4), f"bits={st.bits} (2 or 4)"),
                                       (st.vgroup in (0, *{s.head_dim for s in specs}), f"vgroup={st.vgroup} (one "
                                        "value range a token)"), (not any(st.n_out), "outliers"),
                                       (not any(s.softcap for s in specs), "a logit softcap"))
                   if not ok]
            if bad:
                raise UserError(f"quest: groups=1 reads {storage[0]}'s key groups as pages only for 2/4-bit "
                                f"codes, one value range a token, no outliers and no softcap, not "
                                f"{', '.join(bad)}; drop groups")
        if channels and not (self.groups and st.bits == 4):
            raise UserError(f"quest: channels={channels} scores the key groups of 4-bit storage; use it with "
                            f"groups=1 over kv4 or kivi4 (not {storage[0]} with bits={st.bits}"
                            f"{'' if self.groups else ', groups=0'})")
        if not 0 <= channels <= 1:
            raise UserError(f"quest: channels={channels} must be a fraction of the head dim in (0, 1]")
        if rank == "peak" and not channels:
            raise UserError("quest: rank=peak ranks the SparQ estimates of channels=F; add channels or use rank=max "
                            "or mass")
        if weigh and not channels:
            raise UserError("quest: weigh=1 weighs the channel choice of channels=F; add channels or drop weigh")
        if every < 1 or every > 1 and not groups:
            raise UserError(f"quest: every={every} must be >= 1, and above 1 it needs groups=1 (the key groups' "
                            f"select is the one reused)")
        if fit < 1:
            raise UserError(f"quest: fit={fit} (the prompt tokens weigh's channel weights come from) must be >= 1")
        self._pages(specs, batch, device, dtype, ratio, budget, P, recent, dense_layers, 0, 0, rank,
                    bounds=not self.groups)
        st.append_only = True     # positions only grow: the write is one append + flush kernel
        # sliding-window layers (Gemma 3's local ones): `full`'s ring of their window, as `quant` keeps them
        # (local layer self.win[i]); the storage holds the other layers
        self.win, self.local = window_rings(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        for i in range(len(specs)):
            if i not in self.win:
                st.reserve(i, P * self.max_pages, 0)
        if self.groups:   # groups read besides the sink and the fp window, which count toward the budget
            keep = self.budget.keep(self.capacity) - st.S - st.W - P
            self.k_pages = max(1, -(-keep // P))
            self.dense = [i < self.dense_layers or s.window is not None for i, s in enumerate(specs)]
        # channels: SparQ scores from a channel-major copy of the key codes (kernels/quest_sparq.py)
        # (at least MIN_CHANNELS: the score's dot reads 16 channels anyway, and 8 of smollm2's 64 lose needles)
        self.channels = [min(s.head_dim, max(MIN_CHANNELS, math.ceil(channels * s.head_dim))) if channels else 0
                         for s in specs]
        # every=K: the table of groups read is chosen on the first decode step after a prompt and every K-th
        # after it, and kept in between (per layer: table and count; p0 = the first decode step's position)
        self.every = int(every)
        self.p0 = torch.zeros(1, device=device, dtype=torch.long) if self.every > 1 else None
        self.tab = [torch.zeros(batch * s.num_kv_heads, self.k_pages, device=device, dtype=torch.int32)
                    if self.every > 1 and self._sparse(i) else None for i, s in enumerate(specs)]
        self.tabn = [torch.zeros(batch * s.num_kv_heads, device=device, dtype=torch.int32)
                     if t is not None else None for s, t in zip(specs, self.tab)]
        self.fit, self.fitted = int(fit), [0] * len(specs)
        self.sketch, self.sz, self.ksq, self.wch = [], [], [], []
        for i, s in enumerate(specs):
            on = self.channels[i] and self._sparse(i)
            cap = st.kq[i]["planes"][0].shape[2] if on else 0
            H, D = s.num_kv_heads, s.head_dim
            self.sketch.append(torch.zeros(batch, H, D, cap // 2, device=device, dtype=torch.uint8)
                               if on else None)
            self.sz.append(torch.zeros(batch, H, D, cap // st.g, 2, device=device, dtype=torch.float16)
                           if on else None)
            w = weigh and self.channels[i] and self._sparse(i)   # weigh: Σ k² per channel, and the weights
            self.ksq.append(torch.zeros(batch, H, D, device=device) if w else None)
            self.wch.append(torch.ones(batch, H, D, device=device) if w else None)

    def _sparse(self, layer: int) -> bool:
        if not self.groups:
            return super()._sparse(layer)
        return not self.dense[layer] and self.k_pages * self.sub < self.store.kq[layer]["scale"].shape[2]

    def nbytes(self) -> int:
        extra = self.pmin + self.pmax + self.sketch + self.sz + self.ksq + self.wch + self.tab + self.tabn + [self.p0]
        return (self.store.nbytes() + (self.local.nbytes() if self.local else 0)
                + sum(t.numel() * t.element_size() for t in extra if t is not None))

    def past_attention(self, layer, q, step):
        if layer in self.win:
            return self.local.past_attention(self.win[layer], q, step)
        n = step.start
        return None if n == 0 else self.store.past_attention(layer, q, n, q_pos=step.pos)

    def append(self, layer, k, v, step):
        end = step.start + step.n
        if end > self.capacity:
            raise UserError(f"the cache holds {self.capacity} tokens and this step needs {end}")
        if layer in self.win:
            return self.local.append(self.win[layer], k, v, step)
        cos, sin = step.rope[self.specs[layer].rope_index]
        if self.p0 is not None:
            self.p0.fill_(end)      # every=K: the next decode step chooses its groups afresh
        g0 = self.store.nq(step.start) // self.store.g
        self.store.write(layer, k, v, pos=step.pos, cos=cos, sin=sin, slot=step.start)
        if self.groups and self.sketch[layer] is not None:
            kd = self.store.kq[layer]
            g1 = self.store.nq(end) // self.store.g
            sketch_groups(kd["planes"], kd["scale"], kd["zero"], self.sketch[layer], self.sz[layer], g0, g1,
                          group=self.store.g)
            if self.ksq[layer] is not None and self.fitted[layer] < self.fit:   # weigh: the channels' rms
                take = min(self.fit - self.fitted[layer], step.n)
                self.ksq[layer] += apply_rope(k, cos, sin)[:, :, :take].float().square().sum(2)
                self.fitted[layer] += take
                self.wch[layer].copy_(sparq_weights(self.ksq[layer], self.fitted[layer]))
        if self.pmin[layer] is not None:
            ref.fold_chunk_bounds(apply_rope(k, cos, sin), step.start, self.pmin[layer], self.pmax[layer], page=self.P)

    def decode(self, layer, q, k, v, step):
        """One token, graph-safe: write, then (sparse layers) fold the bounds, score, select, gather and
        dequantize the selected pages' rows, paged attention over them."""
        if layer in self.win:
            return self.local.decode(self.win[layer], q, k, v, step)
        s, P = self.specs[layer], self.P
        pos = step.pos.reshape(-1)[-1:]
        cos, sin = step.rope[s.rope_index]
        sketch = (self.sketch[layer], self.sz[layer]) if self.groups and self.sketch[layer] is not None else None
        self.store.write(layer, k, v, pos=pos, cos=cos, sin=sin, slot=pos, sketch=sketch)
        if not self._sparse(layer):
            return self.store.decode_attention(layer, q, step.length)
        st = self.store
        if self.groups:   # score the key groups from their statistics, select, attend to them + the fp slots
            kd, vd = st.kq[layer], st.vq[layer]
            n = st.cnt[layer]                  # tokens held, this one included (the write set it)
            g = st.g                           # tokens a key group (a page is self.sub of them)
            if sketch is not None:   # SparQ estimates from R channels (kernels/quest_sparq.py); the write
                R = self.channels[layer]   # above put a flushed group into the channel-major copy
                scores, npos = sparq_group_scores(q, *sketch, n, None, group=g, sink=st.S, window=st.W, channels=R,
                                                  scale=s.scale, rank=self.rank, weight=self.wch[layer],
                                                  gate=(n, self.p0, self.every) if self.every > 1 else None)
                if self.rank != "max" and self.sub > 1:   # each query's log-sum-exp (mass) or peak over a page;
                    pool = self._pool(scores, 2)          # the select ranks them by mass (`page_mass`)
                    scores = pool.logsumexp(3) if self.rank == "mass" else pool.amax(3)
            else:
                scores, npos = kq.group_scores(q, kd["scale"], kd["zero"], n, bits=st.bits, group=g, sink=st.S,
                                               window=st.W)
            MG = kd["scale"].shape[2]
            if self.sub > 1 and scores.dim() == 3:   # a page's largest estimate (or bound) over its groups
                scores = self._pool(scores, 2).amax(3)      # (mass and peak pooled each query's above)
            RP = scores.shape[2]                   # pages a row
            if self.tab[layer] is None:
                table, nsel, _ = kq.select_pages(scores, self.k_pages, npos, page=P, row_pages=RP)
            else:   # every=K: a fresh table only on the K-th steps (in place; kept in between)
                table, nsel = self.tab[layer], self.tabn[layer]
                kq.select_pages(scores, self.k_pages, npos, page=P, row_pages=RP, out=(table, nsel),
                                gate=(n, self.p0, self.every))
            if self.sub > 1:
                table, nsel = kq.page_groups(table, nsel, n, sub=self.sub, row_pages=RP, row_groups=MG, group=g,
                                             sink=st.S, window=st.W)
            return quant_group_attention(q, kd, vd, st.kf[layer], st.vf[layer], n, table, nsel, row_pages=MG,
                                         bits=st.bits, group=g, vgroup=st._vg(layer), sink=st.S, window=st.W,
                                         scale=s.scale)
        mn, mx = self.pmin[layer], self.pmax[layer]
        kq.append_token(k, v, cos, sin, pos, None, None, mn, mx, page=P)     # RoPE + page bounds, one kernel
        scores = kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=self.recent)
        table, nsel, last = kq.select_pages(scores, self.k_pages, pos, page=P, row_pages=self.max_pages)
        return quant_paged_attention(q, st.kq[layer], st.vq[layer], st.kf[layer], st.vf[layer], pos + 1, table,
                                     nsel, last, row_pages=self.max_pages, page=P, bits=st.bits, group=st.g,
                                     vgroup=st._vg(layer), sink=st.S, window=st.W, scale=s.scale,
                                     softcap=s.softcap)

    def _pool(self, scores, dim: int):
        """Scores of key groups (along `dim`) → their pages: dim split into (pages, sub), the last page padded
        with -inf where the groups do not fill it."""
        pad = -scores.shape[dim] % self.sub
        if pad:
            scores = torch.nn.functional.pad(scores, (0, 0) * (scores.dim() - 1 - dim) + (0, pad), value=float("-inf"))
        return scores.unflatten(dim, (-1, self.sub))

    def stats(self) -> dict:
        st = super().stats()
        st.update(self.store.stats())
        st["note"] = (f"{self.storage_name}+quest: packed storage; a decode step reads at most "
                      f"{self.k_pages * self.P} tokens' packed rows in layers >= {self.dense_layers}")
        if self.groups:
            how = (f"scored from {max(self.channels)} channels of a channel-major copy of the key codes (SparQ)"
                   if any(self.channels) else "bounds from their scale/zero, no page min/max")
            pages = (f"pages = the {self.P}-token key groups" if self.sub == 1 else
                     f"pages of {self.P} tokens = {self.sub} of the {self.store.g}-token key groups")
            st["note"] = (f"{self.storage_name}+quest, {pages} ({how}): a decode "
                          f"step reads the sink, the full-precision window and {self.k_pages} "
                          f"{'groups' if self.sub == 1 else 'pages'} "
                          f"({self.k_pages * self.P} tokens) in layers >= {self.dense_layers}"
                          + (f", chosen every {self.every} decode steps" if self.every > 1 else ""))
            fp, budget = self.store.S + self.store.W, self.budget.keep(self.capacity)
            if fp + self.P >= budget and budget < self.capacity:   # as k_pages' sizing: 1 group, fp part over budget
                # e.g. window=1024 at 4K and 8x: the step reads ~1,100 of 4,096 tokens, not 512
                st["note"] += (f"; the sink and the full-precision window ({fp} tokens) alone exceed the "
                               f"{budget}-token budget, so a step reads about "
                               f"{fp + (self.k_pages + 1) * self.P} of {self.capacity} tokens (a smaller window "
                               f"keeps the budget)")
        last = max((i for i in range(len(self.specs)) if i not in self.win), default=None)   # one the storage holds
        if last is None or self.k_pages * self.sub >= (self.store.kq[last]["scale"].shape[2] if self.groups
                                                       else self.max_pages):
            st["note"] = f"{self.budget} reads every page: degraded to {self.storage_name}"
        if self.win:
            st["note"] += f"; sliding-window layers {sorted(self.win)} keep their window in full precision"
        return st
