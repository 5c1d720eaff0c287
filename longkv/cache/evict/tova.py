"""`tova`: TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104): the cache is a
fixed-size state; at each step the token with the lowest attention from the *current* query, averaged
over all heads of the layer, is dropped. Prefill chunks are scored by their last query; during decode
the state keeps its size: the new token replaces the weakest stored one (or is dropped itself), inside
the step, so the step stays graph-safe.
"""
from __future__ import annotations

import torch

from ...models.rope import apply_rope
from ..registry import register
from .base import BUDGET_PARAMS, EvictionCache, Scorer, ScoreInput


class LastQuery(Scorer):
    window = 1

    def score(self, x: ScoreInput) -> torch.Tensor:
        p = x.window_probs()[:, :, :, -1]                                   # (B, Hkv, G, N)
        return p.mean(dim=(1, 2))[:, None].expand(-1, x.k.shape[1], -1)


@register("tova", help="TOVA: drop the token the current query attends to least (mean over heads); "
          "ratio = fraction of the prompt removed, budget = tokens kept; decode keeps the size fixed",
          params=dict(BUDGET_PARAMS), composes=("full", "quant"))
class TOVACache(EvictionCache):
    scorer_cls = LastQuery
    policy = "argmin"

    def decode_step(self, layer, q, k, v, pos, cos, sin):
        if self.layer_policy(layer) != "argmin":
            return super().decode_step(layer, q, k, v, pos, cos, sin)
        s = self.specs[layer]
        f = self.fixed[layer]
        B, Hq, _, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        kr = apply_rope(k, cos, sin)
        K, V = self.store.read(layer, f)                                   # (B, Hkv, f, D), static
        count = torch.clamp(pos - self.off[layer], max=f)                   # stored before this token
        qg = q.reshape(B, Hkv, G, D)
        logits = torch.cat([(qg @ K.transpose(-1, -2)).float(), (qg.float() * kr.float()).sum(-1, keepdim=True)], -1)
        logits = logits * s.scale                                          # (B, Hkv, G, f+1) fp32
        if s.softcap:
            logits = s.softcap * torch.tanh(logits / s.softcap)
        slot_ids = torch.arange(f + 1, device=q.device)
        ok = (slot_ids < count) | (slot_ids == f)
        p = torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1)   # (B, Hkv, G, f+1)
        out = (p[..., :f].to(V.dtype) @ V).float() + p[..., f:] * v.float().reshape(B, Hkv, 1, D)
        votes = p.mean(dim=(1, 2)).masked_fill(~ok, float("inf"))          # (B, f+1)
        weakest = votes[:, :f].argmin(-1)                                   # (B,)
        drop_new = votes[:, f] <= votes.gather(1, weakest[:, None])[:, 0]
        slot = torch.where(count < f, count.expand(B), torch.where(drop_new, torch.full_like(weakest, f), weakest))
        self.store.write(layer, k, v, pos=pos, cos=cos, sin=sin, slot=slot)
        return out.reshape(B, Hq, 1, D).to(q.dtype)
