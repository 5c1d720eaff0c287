"""`longkv calibrate duo`: find a model's retrieval heads offline and save the head map `duo` reads.

DuoAttention (Xiao et al., arXiv 2410.10819) learns one gate per KV head by distillation on synthetic
passkey retrieval; Retrieval Head (Wu et al., arXiv 2404.15574) scores heads by how much they copy
from a needle. We take the measurement both point at, without training: on synthetic passkey prompts
(a pass key hidden at a random depth of filler text, the answer teacher-forced after the question),
for each (layer, KV head) the attention mass that the answer's queries put outside `sink` + the recent
`window` — exactly what that head would lose as a streaming head. Mass is averaged over the query
group (a KV head is kept or streamed as a whole) and over samples. High score = retrieval head.

    from longkv.calibrate_duo import calibrate_duo
    path = calibrate_duo("smollm2-135m", lengths=(2048, 4096), samples=4)   # → <model folder>/duo_heads.json
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from .cache.full import FullCache
from .cache.select.duo import MAP_FILE
from .engine.prefill import prefill
from .errors import UserError

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


class _Probe(FullCache):
    """A full cache that also measures, per (layer, KV head), the attention mass of the queries at
    positions >= `qstart` outside the first `sink` and the latest `window` keys."""

    def __init__(self, specs, *, sink: int, window: int, qstart: int, **kw):
        super().__init__(specs, ring=False, **kw)   # reads every key of every layer
        self.sink, self.window, self.qstart = sink, window, qstart
        self.mass = torch.zeros(len(specs), specs[0].num_kv_heads, dtype=torch.float64)
        self.count = 0

    def attend(self, layer, q, k, v, *, step):
        out = super().attend(layer, q, k, v, step=step)
        sel = step.pos >= self.qstart
        if step.start is None or not bool(sel.any()):
            return out
        s = self.specs[layer]
        end = step.start + step.n
        qq, qp = q[:, :, sel], step.pos[sel]
        B, Hq, T, D = qq.shape
        Hkv = s.num_kv_heads
        logits = (qq.float().reshape(B, Hkv, -1, D) @ self.k[layer][:, :, :end].float().transpose(-1, -2)) * s.scale
        kp = torch.arange(end)
        qpos = qp.repeat(Hq // Hkv)
        logits = logits.masked_fill(kp[None, :] > qpos[:, None], float("-inf"))
        p = torch.softmax(logits, -1)
        far = (kp[None, :] >= self.sink) & (kp[None, :] <= qpos[:, None] - self.window)
        self.mass[layer] += (p * far).sum(-1).mean(-1).sum(0).double().cpu()
        if layer == 0:
            self.count += B
        return out


def _prompt(tok, length: int, rng: random.Random) -> tuple[list[int], int, str]:
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    n_fill = max(1, (length - 64) // max(1, len(tok.encode(FILLER, add_special_tokens=False))))
    depth = rng.uniform(0.1, 0.9)
    cut = int(n_fill * depth)
    text = "There is a pass key hidden in this text. Find it and memorize it.\n" + FILLER * cut + needle \
        + FILLER * (n_fill - cut) + question
    head = tok.encode(text)
    return head + tok.encode(" " + key + ".", add_special_tokens=False), len(head) - 1, key


def calibrate_duo(model: str = "smollm2-135m", *, lengths=(2048, 4096), samples: int = 4, sink: int = 64,
                  window: int = 256, seed: int = 0, out: str | Path | None = None, device: str | None = None,
                  progress: bool = True) -> Path:
    """Score every (layer, KV head), write the head map (default: next to the model) and return its path."""
    from . import load
    from .models.fetch import resolve

    if samples < 1 or not lengths:
        raise UserError("calibrate duo: need at least one length and one sample")
    if min(lengths) <= sink + window + 64:
        raise UserError(f"calibrate duo: lengths must exceed sink + window ({sink + window}) by a margin")
    llm = load(model, device=device, progress=progress)
    rng = random.Random(seed)
    specs = llm.model.layer_specs()
    total = torch.zeros(len(specs), specs[0].num_kv_heads, dtype=torch.float64)
    n, t0 = 0, time.time()
    for length in lengths:
        for _ in range(samples):
            ids, qstart, _ = _prompt(llm.tokenizer, int(length), rng)
            probe = _Probe(specs, sink=sink, window=window, qstart=qstart, batch=1, capacity=len(ids),
                           device=llm.device, dtype=llm.dtype)
            prefill(llm.model, probe, torch.tensor([ids], device=llm.device), chunk=2048)
            total += probe.mass / max(1, probe.count)
            n += 1
            if progress:
                print(f"calibrate duo: {n}/{len(lengths) * samples} prompts ({len(ids)} tokens), "
                      f"{time.time() - t0:.0f} s", flush=True)
    scores = (total / n).tolist()
    path = Path(out) if out else resolve(model, download=False, progress=False) / MAP_FILE
    if path.is_dir():
        path = path / MAP_FILE
    path.write_text(json.dumps({
        "model": model, "sink": sink, "window": window, "lengths": list(map(int, lengths)), "samples": samples,
        "seed": seed, "score": "attention mass of the answer's queries outside sink + window "
                                "(synthetic passkey retrieval), mean over the query group",
        "scores": [[round(x, 6) for x in row] for row in scores]}, indent=1))
    return path
