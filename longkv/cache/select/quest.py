"""`quest`: Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024, arXiv 2406.10774). Nothing is evicted: every key and value stays (this saves bandwidth, not
memory; `nbytes()` is the full cache plus page metadata). Keys are split into pages of `page` tokens,
each with its element-wise min and max key; at every decode step the pages are scored against the
query (upper bound of their logits, one choice per KV head shared by its query group) and attention
reads only the top pages, always including the first (sink) and the last `recent` pages, through a
page table into the unchanged buffer (no copy). A decode step is five kernel launches per layer
(`kernels/quest.py`: append, score, select, paged attention, merge). Prefill is dense, and the first
`dense_layers` layers stay dense (Quest skips 2).

`rerank=F` (ours, not in the paper): a second stage re-scores the bound's top F·k pages and reads the
top k of them. On smollm2-135m at 8× the bound alone loses every needle;
F = 4 finds 3/4 at 2K and 4/4 at 4K (benchmarks/quest_oracle.py). The logits come from `rbits`-bit
codes of each key relative to its page's min/max (the bounds Quest keeps anyway), written when a page
fills: at 2 bits +1/16 of the KV memory and 1/8 of the candidate keys' bytes read, with the same
selections as exact keys on every grid measured (BENCHMARKS.md); `rbits=0` reads the exact keys.
`rank=mass` (the default; `rank=max` = the largest logit, as before 2026-12-03) ranks the candidates
by their share of the attention (each query's softmax over the candidates' tokens, summed over the
query group): a page of many moderate logits can carry more mass than one with a single high logit
(gemma3-270m's 16K depth-0 needles: BENCHMARKS.md). When every page is a candidate (rerank x budget
>= the cache) the second stage is one kernel over the code buffer (`kernels/quest_rerank.py:
all_page_code_scores`), with no bound kernel and no candidate select. Both second-stage kernels fold
each page's min and step into the query (`_fold_logits`), so the codes go to the tensor cores as exact
integers (H200, 8B shape, 512K: 1.32x full's decode speed at ratio=0.875,rerank=8; 1.38x with
budget=N/8,rerank=4; plain Quest 2.03x).

`budget` = tokens read per decode step; `ratio` = fraction of the cache *not* read per step, sized on
the cache's capacity (prompt + new tokens). Either way the number of pages is fixed when the cache is
built, so a step is one CUDA graph.

Over packed storage (`quant:bits=4+quest:budget=2048`, `kv4+quest`): `select/quest_storage.py`; there
`groups=1` makes the storage's key groups the pages (bounds from their scale/zero, the CUDA kernel):
3.05x full's decode speed at 1/8 and 512K on the 8B shape, with a coarser bound (fewer needles found);
`channels=F` scores those groups from F of the channels instead (SparQ), which finds them again on
smollm2, and with `weigh=1` (channels chosen by |q| times the keys' rms) on gemma3 too.
"""
from __future__ import annotations

import math

import torch

from ...errors import UserError
from ...kernels import quest as kq
from ...kernels.sparse_reference import fold_chunk_bounds, page_codes
from ..evict.base import Budget
from ..full import FullCache
from ..registry import register


@register("quest", help="Quest: keep everything; each decode step reads only the top pages by min/max key "
          "bounds (budget = tokens read per step, ratio = fraction of the cache not read); no memory saving",
          params={"ratio": (float, 0.5, "fraction of the cache skipped per decode step, in [0, 1)"),
                  "budget": (int, 0, "tokens read per decode step (instead of ratio)"),
                  "page": (int, 16, "tokens per page (with groups=1 the key group's size, or, if larger, pages of "
                                    "page/group key groups: kv4:group=16+quest:groups=1,page=64)"),
                  "recent": (int, 2, "last pages always read (the current page included)"),
                  "dense_layers": (int, 2, "first layers that always read everything"),
                  "rerank": (int, 0, "two stages: the bound keeps rerank x the pages as candidates, scored "
                                     "again from their codes or keys (`rank`) to pick the pages read (0 = Quest as "
                                     "published; rerank x budget >= the cache scores every page: at "
                                     "ratio=0.875, rerank=8)"),
                  "rbits": (int, 2, "bits of the page-relative key codes the second stage reads "
                                    "(1, 2, 4 or 8; 0 = the exact keys)"),
                  "rank": (str, "mass", "how the second stage ranks its candidates: mass = a page's share "
                                        "of the attention over the candidates' tokens (summed over the query "
                                        "group), max = its largest logit (the ranking before 2026-12-03); "
                                        "with groups=1,channels=F: peak = a group's share of each query's "
                                        "softmax over the groups' largest logits, summed over the query group"),
                  "groups": (bool, False, "over 2/4-bit packed storage without outliers (kv4+quest:groups=1): "
                                          "the pages are the storage's key groups, bounded by their scale and "
                                          "zero (no page min/max kept; `page` is the group size), read by the "
                                          "CUDA kernel; faster (3x full at 1/8, 512K, 8B shape) but a coarser "
                                          "bound than 16-token pages: fewer needles found"),
                  "channels": (float, 0.0, "with groups=1 over 4-bit storage: score the key groups from this "
                                           "fraction of the channels (at least 16, or all), those where the query is "
                                           "largest (SparQ), read from a channel-major copy of the key codes "
                                           "(+1/8 of bf16 keys); ranked by `rank` (rank=max found more needles). "
                                           "0 = Quest's bound"),
                  "fit": (int, 8192, "weigh: the prompt tokens whose keys give the channel weights (the first "
                                     "`fit`)"),
                  "weigh": (bool, False, "channels=F: choose the channels by |q| times the keys' root mean square "
                                         "along each (over the prompt's first `fit` keys) instead of |q| alone"),
                  "every": (int, 1, "with groups=1: score and select the groups every `every` decode steps and "
                                    "read the same ones in between (LServe's reusable page selector, interval 4 "
                                    "there); 1 = every step")},
          composes=("full", "quant"))
class QuestCache(FullCache):
    role = "select"

    def __new__(cls, *args, storage=None, **kw):
        if cls is QuestCache and storage is not None and storage[0] != "full":   # quant+quest
            from .quest_storage import QuestStorageCache
            return super().__new__(QuestStorageCache)
        return super().__new__(cls)

    def __init__(self, specs, *, batch, capacity, device, dtype, ratio=None, budget=None, page=16, recent=2,
                 dense_layers=2, rerank=0, rbits=2, rank="mass", groups=False, channels=0.0, fit=8192, weigh=False,
                 every=1, storage=None):
        if groups or channels or weigh or every != 1 or rank == "peak":
            raise UserError("quest: groups=1 (and channels, every, rank=peak) read the key groups of a packed "
                            "storage; put one under it (e.g. kv4+quest:groups=1) or drop them")
        P = self._check_page(page)
        super().__init__(specs, batch=batch, capacity=P * math.ceil(capacity / P), device=device, dtype=dtype)
        self.capacity = capacity
        self._pages(specs, batch, device, dtype, ratio, budget, P, recent, dense_layers, rerank, rbits, rank)

    @staticmethod
    def _check_page(page: int) -> int:
        if page < 1 or page & (page - 1) or page < 16:
            raise UserError(f"quest: page={page} must be a power of two >= 16")
        return page

    def _pages(self, specs, batch, device, dtype, ratio, budget, P, recent, dense_layers, rerank, rbits, rank="mass",
               bounds: bool = True):
        """The page machinery shared with `QuestStorageCache`: budget → pages read, bounds (page min/max;
        none when the storage's key groups are the pages), codes."""
        self.P, self.recent, self.dense_layers = P, max(1, recent), max(0, dense_layers)
        self.budget = Budget.parse(ratio, budget, "quest")
        self.max_pages = math.ceil(self.capacity / P)
        self.k_pages = min(self.max_pages, max(1 + self.recent, math.ceil(self.budget.keep(self.capacity) / P)))
        if rerank < 0:
            raise UserError(f"quest: rerank={rerank} must be >= 0 (0 = off)")
        if rbits not in (0, 1, 2, 4, 8):
            raise UserError(f"quest: rbits={rbits} must be 1, 2, 4 or 8 (0 = exact keys)")
        if rank not in ("max", "mass", "peak"):
            raise UserError(f"quest: rank={rank!r} must be max, mass or peak")
        self.rerank, self.rank = rerank, rank
        self.k_cand = min(self.max_pages, rerank * self.k_pages)
        self.rbits = rbits if self.k_cand > self.k_pages else 0
        self.pmin, self.pmax, self.codes = [], [], []
        for i, s in enumerate(specs):
            shape = (batch, s.num_kv_heads, self.max_pages, s.head_dim)
            sparse = bounds and i >= self.dense_layers and s.window is None   # sliding-window layers: full's ring
            self.pmin.append(torch.zeros(shape, device=device, dtype=dtype) if sparse else None)
            self.pmax.append(torch.zeros(shape, device=device, dtype=dtype) if sparse else None)
            code_shape = (*shape[:3], P, s.head_dim * self.rbits // 8)
            self.codes.append(torch.zeros(code_shape, device=device, dtype=torch.uint8)
                              if sparse and self.rbits else None)

    def _sparse(self, layer: int) -> bool:
        return self.pmin[layer] is not None and self.k_pages < self.max_pages and self.specs[layer].window is None

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.pmin + self.pmax + self.codes
                                      if t is not None)

    def append(self, layer, k, v, step):
        super().append(layer, k, v, step)
        if self.pmin[layer] is None:
            return
        P, end = self.P, step.start + step.n
        mn, mx = self.pmin[layer], self.pmax[layer]
        fold_chunk_bounds(self.k[layer][:, :, step.start:end], step.start, mn, mx, page=P)
        if self.codes[layer] is not None:   # a partial last page's codes are rewritten when it fills
            p0, p1 = step.start // P, -(-end // P)
            self.codes[layer][:, :, p0:p1] = page_codes(self.k[layer][:, :, p0 * P:p1 * P], mn[:, :, p0:p1],
                                                        mx[:, :, p0:p1], self.rbits)

    def attend(self, layer, q, k, v, *, step):
        if step.start is not None and step.n == 1 and self._sparse(layer):
            if step.start >= self.capacity:
                raise UserError(f"the cache holds {self.capacity} tokens and this step needs {step.start + 1}")
            return self.decode(layer, q, k, v, step)
        return super().attend(layer, q, k, v, step=step)

    def decode(self, layer, q, k, v, step):
        """One token, four kernels and a merge, all on the device (graph-safe): append (RoPE, write,
        page min/max), score every page, select the top pages straight into an int32 page table
        (ascending, so the current partial page is last), paged flash-decoding + merge. With a second
        stage, its kernels between score and select; when it scores every page, it replaces the score."""
        if not self._sparse(layer):
            return super().decode(layer, q, k, v, step)
        s, P = self.specs[layer], self.P
        pos = step.pos.reshape(-1)[-1:]
        cos, sin = step.rope[s.rope_index]
        kc, vc, mn, mx = self.k[layer], self.v[layer], self.pmin[layer], self.pmax[layer]
        codes = self.codes[layer]
        kq.append_token(k, v, cos, sin, pos, kc, vc, mn, mx, page=P, codes=codes, bits=self.rbits)
        D, rows = s.head_dim, kc.shape[2] // P
        how = dict(rank=self.rank, scale=s.scale, softcap=s.softcap)
        if self.rerank and codes is not None and self.k_cand >= self.max_pages:   # every page from its codes:
            scores = kq.all_page_code_scores(q, codes, mn, mx, pos, bits=self.rbits, sink=1, recent=self.recent,
                                             **how)                         # no bound, no candidate select
        else:
            scores = kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=self.recent)
            if self.rerank and self.k_cand > self.k_pages:   # the bound's top candidates, re-scored
                cand = kq.select_pages(scores, self.k_cand, pos, page=P, row_pages=rows)
                if codes is not None:
                    scores = kq.rerank_code_scores(q, codes.view(-1, P, codes.shape[-1]), mn.view(-1, D),
                                                   mx.view(-1, D), scores, *cand, row_pages=rows, bits=self.rbits,
                                                   **how)
                else:
                    scores = kq.rerank_scores(q, kc.view(-1, P, D), scores, *cand, row_pages=rows, **how)
        table, nsel, last = kq.select_pages(scores, self.k_pages, pos, page=P, row_pages=rows)
        return kq.paged_attention(q, kc.view(-1, P, D), vc.view(-1, P, D), table, nsel, last, scale=s.scale,
                                  softcap=s.softcap)

    def stats(self) -> dict:
        st = super().stats()
        st.update(budget=str(self.budget), pages_read=self.k_pages, page=self.P,
                  candidate_pages=self.k_cand if self.rerank else None,
                  rerank_reads=(f"{self.rbits}-bit page-relative key codes" if self.rbits else "exact keys")
                  if self.k_cand > self.k_pages else None,
                  rerank_rank=self.rank if self.k_cand > self.k_pages else None,
                  note="quest keeps every token (no memory saving); it reads at most "
                       f"{self.k_pages * self.P} tokens per decode step in layers >= {self.dense_layers}")
        if self.k_pages >= self.max_pages:
            st["note"] = f"{self.budget} reads every page: degraded to the full cache"
        return st
