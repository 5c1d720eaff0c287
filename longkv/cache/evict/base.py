"""Shared machinery of every eviction method: budgets, scoring inputs, top-k, compaction, decode.

A method is a `Scorer` (one hook: `score` → (B, Hkv, N), higher is kept) bound to `EvictionCache`,
which owns the rest:

- **Budgets, one meaning each.** `ratio` is the fraction of the cache *removed* (kvpress's
  compression_ratio): a layer keeps int(N · (1 − ratio)) of the N tokens seen; `budget` is the number
  of tokens *kept* per KV head. Give one (default ratio 0.5). A budget ≥ the context keeps everything
  and `stats()` says so; a ratio outside [0, 1) is an error.
- **Chunk by chunk.** After a prefill chunk is stored, compaction is *pending*; it runs before the next
  chunk attends (or before the first decode step), so at most budget + one chunk is ever held, not the
  whole prompt. The last compaction of a prompt therefore sees the prompt's last queries (SnapKV's
  observation window = the end of the prompt, where a question sits). `chunked=false` keeps
  everything until the prompt ends and evicts once, as the papers do (peak = the full cache).
- **GQA.** One cache per KV head: scores are pooled over each KV head's query group, so kept K/V are
  never repeated per query head (SnapKV's reference code loses the GQA saving; we do not).
- **Decode.** After compaction the storage is resized to what is kept plus room for the remaining
  tokens (`grow`), or to a fixed size (`ring`: sink + recent window, `argmin`: TOVA): the budget, or
  with a ratio (1 − ratio) × the cache's capacity (prompt + new tokens). The physical slot
  of a new token is derived on the device from its logical position, so the step can be captured in a
  CUDA graph. Sliding-window layers (Gemma 3) keep exactly their window as a ring, whatever the method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UserError
from ...kernels.attention import chunk_attention
from ...kernels.reference import merge_lse
from ...models.rope import apply_rope
from ..base import Cache, LayerSpec, Step
from ..compose import make_storage

BUDGET_PARAMS = {
    "ratio": (float, 0.5, "fraction of the cache removed, in [0, 1) (default when no budget is given)"),
    "budget": (int, 0, "tokens kept per KV head and layer (instead of ratio)"),
    "chunked": (bool, True, "evict after every prefill chunk (peak memory ~ budget + chunk); false: once, "
                            "after the whole prompt (peak = full cache)"),
}


@dataclass(frozen=True)
class Budget:
    ratio: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, ratio, budget, what: str) -> "Budget":
        if ratio is not None and budget is not None:
            raise UserError(f"{what}: give ratio (fraction removed) or budget (tokens kept), not both")
        if budget is not None:
            if budget < 1:
                raise UserError(f"{what}: budget is the number of tokens kept and must be >= 1, got {budget}")
            return cls(tokens=int(budget))
        ratio = 0.5 if ratio is None else float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise UserError(f"{what}: ratio is the fraction of the cache removed and must be in [0, 1), got {ratio}")
        return cls(ratio=ratio)

    def keep(self, n: int) -> int:
        if self.tokens is not None:
            return min(n, self.tokens)
        return n if self.ratio == 0 else max(1, int(n * (1.0 - self.ratio)))

    def __str__(self) -> str:
        return f"budget {self.tokens} tokens" if self.tokens is not None else f"ratio {self.ratio}"


@dataclass
class ScoreInput:
    """What a scorer sees for one layer: every stored token plus the chunk just appended.

    k (B, Hkv, N, D) keys after RoPE, v (B, Hkv, N, D), pos (B, Hkv, N) int64 logical positions,
    valid (B, Hkv, N) bool or None (ragged storage pads), q (B, Hq, w, D) the last w queries seen
    (after RoPE) at q_pos (w,), or None for scorers that need no queries.
    """

    layer: int
    spec: LayerSpec
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor | None = None
    q: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None

    def window_probs(self) -> torch.Tensor:
        """Softmax attention of the window queries over the visible keys → (B, Hkv, G, w, N) fp32."""
        B, Hkv, N, D = self.k.shape
        G = self.spec.num_heads // Hkv
        w = self.q.shape[2]
        q = self.q.float().reshape(B, Hkv, G * w, D)
        s = (q @ self.k.float().transpose(-1, -2)) * self.spec.scale            # (B, Hkv, G*w, N)
        if self.spec.softcap:
            s = self.spec.softcap * torch.tanh(s / self.spec.softcap)
        s = s.reshape(B, Hkv, G, w, N)
        ok = self.pos[:, :, None, None, :] <= self.q_pos[None, None, None, :, None]
        if self.valid is not None:
            ok = ok & self.valid[:, :, None, None, :]
        return torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)

    def protect_recent(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        """Scores of the `n` most recent positions set to +inf (always kept)."""
        if n <= 0:
            return scores
        last = self.q_pos[-1] if self.q_pos is not None else self.pos.max()
        return scores.masked_fill(self.pos > last - n, float("inf"))


class Scorer:
    """One hook: `score(x) → (B, Hkv, N)`, higher is kept. `window` = how many of the latest queries
    it needs (0: none). Parameters arrive as keyword arguments from the cache spec."""

    window = 0

    def score(self, x: ScoreInput) -> torch.Tensor:
        raise NotImplementedError


def top_keep(scores: torch.Tensor, pos: torch.Tensor, m: int) -> torch.Tensor:
    """(B, Hkv, N) scores → (B, Hkv, m) indices of the m best, each row sorted by position."""
    idx = scores.topk(m, dim=-1, sorted=False).indices
    order = pos.gather(-1, idx).argsort(dim=-1)
    return idx.gather(-1, order)


class EvictionCache(Cache):
    """A cache that really drops tokens: `scorer_cls` decides which, a `Storage` holds the rest."""

    role = "evict"
    graph_safe = True
    scorer_cls: type = Scorer
    policy = "grow"            # decode: "grow" (append), "ring" (sink + recent), "argmin" (TOVA)
    sink = 0                   # ring: slots [0, sink) are never overwritten

    def __init__(self, specs, *, batch, capacity, device, dtype, ratio=None, budget=None, chunked=True,
                 storage=None, **params):
        super().__init__(specs, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.budget = Budget.parse(ratio, budget, self.name)
        self.chunked = bool(chunked)
        self.scorer = self.scorer_cls(**params)
        self.store = make_storage(storage, specs, batch=batch, device=device, dtype=dtype)
        L = len(specs)
        self.n = [0] * L                    # physical tokens per KV head (host)
        self.seen = [0] * L                 # logical tokens appended (host)
        self.fixed: list[int | None] = [None] * L
        self.pending = [False] * L
        self.decoding = [False] * L
        self.qwin: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * L
        self.off = torch.zeros(L, 1, dtype=torch.long, device=self.device)  # logical - physical
        self.compactions = 0
        self.last_window: tuple[int, int] | None = None
        self.question_at: int | None = None  # callers may set: first position of the question

    # -- per-layer budget and decode policy (PyramidKV overrides keep) -------------------------------
    def keep(self, layer: int, n: int) -> int:
        return self.budget.keep(n)

    def layer_policy(self, layer: int) -> str:
        return "ring" if self.specs[layer].window is not None else self.policy

    def layer_sink(self, layer: int) -> int:
        return 0 if self.specs[layer].window is not None else self.sink

    def _keep_for(self, layer: int) -> int:
        w = self.specs[layer].window
        return min(self.n[layer], w) if w is not None else min(self.n[layer], self.keep(layer, self.seen[layer]))

    def storage(self, layer: int):
        """The storage that holds `layer` (one for every layer; AdaKV keeps sliding-window layers apart)."""
        return self.store

    # -- the contract ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        extra = sum(q.numel() * q.element_size() + p.numel() * p.element_size()
                    for q, p in filter(None, self.qwin))
        return self.store.nbytes() + self.off.numel() * self.off.element_size() + extra

    def past_attention(self, layer, q, step: Step):
        n = self.n[layer]
        return None if n == 0 else self.storage(layer).past_attention(layer, q, n, q_pos=step.pos)

    def append(self, layer, k, v, step: Step):
        n, T, st = self.n[layer], step.n, self.storage(layer)
        if n + T > st.slots(layer):
            st.reserve(layer, n + T + (n + T) // 4, n)
        cos, sin = step.rope[self.specs[layer].rope_index]
        st.write(layer, k, v, pos=step.pos, cos=cos, sin=sin, slot=n)
        self.n[layer] += T
        self.seen[layer] += T
        self.pending[layer] = True

    def attend(self, layer, q, k, v, *, step: Step):
        if step.start is None or step.n == 1:
            return self.decode(layer, q, k, v, step)
        self.decoding[layer] = False
        if self.chunked:
            self._compact(layer)
        self._remember(layer, q, step.pos)
        s = self.specs[layer]
        cos, sin = step.rope[s.rope_index]
        past = self.past_attention(layer, q, step)
        own = chunk_attention(q, apply_rope(k, cos, sin), v, scale=s.scale, window=s.window, softcap=s.softcap)
        self.append(layer, k, v, step)
        out = own[0] if past is None else merge_lse(*past, *own)[0]
        return out.to(q.dtype)

    def decode(self, layer, q, k, v, step: Step):
        if step.start is not None and step.start >= self.capacity:
            raise UserError(f"the cache holds {self.capacity} tokens and this step needs {step.start + 1}")
        if not self.decoding[layer]:
            self._enter_decode(layer)
        s = self.specs[layer]
        cos, sin = step.rope[s.rope_index]
        return self.decode_step(layer, q, k, v, step.pos.reshape(1), cos, sin)

    def advance(self, n: int) -> None:
        super().advance(n)
        if n == 1 and all(self.decoding):     # decode steps update the host mirrors here (graph replays too)
            for i in range(len(self.specs)):
                f = self.fixed[i]
                self.n[i] = self.n[i] + 1 if f is None else min(self.n[i] + 1, f)
                self.seen[i] += 1

    # -- decode ----------------------------------------------------------------------------------------
    def decode_step(self, layer, q, k, v, pos, cos, sin):
        """One token: write it where the policy says, attend over what is stored (graph-safe)."""
        phys = pos - self.off[layer]
        if self.layer_policy(layer) == "ring":
            f, s0 = self.fixed[layer], self.layer_sink(layer)
            slot = torch.where(phys < f, phys, s0 + (phys - s0) % (f - s0))
            length = torch.clamp(phys + 1, max=f)
        else:
            slot, length = phys, phys + 1
        st = self.storage(layer)
        st.write(layer, k, v, pos=pos, cos=cos, sin=sin, slot=slot)
        return st.decode_attention(layer, q, length)

    def _enter_decode(self, layer: int) -> None:
        """Host-side, before the first decode step (and before any CUDA-graph capture)."""
        self._compact(layer)
        self.qwin[layer] = None
        n, pol = self.n[layer], self.layer_policy(layer)
        if pol in ("ring", "argmin"):
            w = self.specs[layer].window
            f = w if w is not None else max(self.keep(layer, self.capacity), n, self.layer_sink(layer) + 1)
            self.fixed[layer] = f
            slots = f + (pol == "argmin")          # argmin: one more slot for a token dropped at once
        else:
            slots = n + max(1, self.capacity - self.seen[layer])
        self.storage(layer).reserve(layer, slots, n)
        self.off[layer] = self.seen[layer] - n
        self.decoding[layer] = True

    # -- compaction ------------------------------------------------------------------------------------
    def _remember(self, layer, q, pos):
        """Keep the latest `scorer.window` queries (they may span chunks)."""
        w = self.scorer.window
        if not w:
            return
        if self.qwin[layer] is not None and q.shape[2] < w:
            pq, pp = self.qwin[layer]
            q, pos = torch.cat([pq, q], dim=2), torch.cat([pp, pos])
        self.qwin[layer] = (q[:, :, -w:].detach().clone(), pos[-w:].clone())

    def score_input(self, layer: int) -> ScoreInput:
        n = self.n[layer]
        st = self.storage(layer)
        k, v = st.read(layer, n)
        qw = self.qwin[layer]
        return ScoreInput(layer, self.specs[layer], k, v, st.positions(layer, n),
                          q=None if qw is None else qw[0], q_pos=None if qw is None else qw[1])

    def _compact(self, layer: int) -> None:
        if not self.pending[layer]:
            return
        self.pending[layer] = False
        m, n = self._keep_for(layer), self.n[layer]
        if m >= n:
            return
        x = self.score_input(layer)
        if self.specs[layer].window is not None:
            scores = x.pos.float()
        else:
            scores = self.scorer.score(x)
        self.storage(layer).keep(layer, top_keep(scores, x.pos, m))
        self.n[layer] = m
        self.compactions += 1
        if x.q_pos is not None:
            self.last_window = (int(x.q_pos[0]), int(x.q_pos[-1]) + 1)

    # -- reporting -------------------------------------------------------------------------------------
    def kept_tokens(self) -> int:
        return sum(self.n) * self.batch  # summed over layers (each is per KV head)

    def stats(self) -> dict:
        st = super().stats()
        full_keep = all(self.keep(i, self.length) >= self.length for i in range(len(self.specs)))
        st.update(budget=str(self.budget), chunked=self.chunked, compactions=self.compactions,
                  kept_per_layer=round(sum(self.n) / max(1, len(self.n)), 1), storage=type(self.store).__name__)
        st.update(getattr(self.store, "stats", dict)())   # e.g. quant storage: bits, decode path
        if full_keep and self.length:
            st["note"] = f"{self.budget} keeps all {self.length} tokens: degraded to the full cache"
        return st
