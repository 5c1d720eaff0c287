"""Context extension beyond the trained window: needle-in-a-haystack (and optionally perplexity) per
`--rope` method and cache spec, every method on the very same prompts, no scaling as the baseline.

Methods: Position Interpolation (Chen et al. 2023), NTK-aware (bloc97 2023), dynamic NTK (emozilla
2023), YaRN (Peng et al. 2023), Self-Extend (Jin et al. 2024). Needle prompts come from
`longkv.evals.niah` (RULER's niah_single_2 needle, sized with the model's own tokenizer; offline
corpus); the answer is greedy and scored by substring match. The baseline (`none`) runs past the
window on purpose (the engine, not `LLM.generate`, so the window check does not stop it).

    python benchmarks/extension.py --model smollm2-135m --device cpu --lengths 12288,16384 \
        --depths 0.1,0.5,0.9 --ropes "none;linear:factor=2;ntk:factor=2;dynamic:factor=2;yarn:factor=2;self-extend:group=4,window=1024"

Lists are `;`-separated (specs contain commas). Prints one line per run as it goes, then a table
(correct / runs per method and length), and last one JSON object (config included).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import longkv  # noqa: E402
from longkv.engine.decode import decode_tokens  # noqa: E402
from longkv.engine.prefill import prefill  # noqa: E402
from longkv.engine.sampling import Sampling  # noqa: E402
from longkv.evals import corpora, niah, perplexity  # noqa: E402
from longkv.models import rope_spec  # noqa: E402


def answer(llm, ids: list[int], *, cache: str, max_new_tokens: int, chunk: int) -> tuple[str, float]:
    """Greedy answer for `ids` with the LLM's current RoPE and `cache`; (text, prefill seconds)."""
    kv = llm.new_cache(cache, capacity=len(ids) + max_new_tokens)
    t0 = time.perf_counter()
    logits = prefill(llm.model, kv, torch.tensor([ids], device=llm.device), chunk=chunk)
    dt = time.perf_counter() - t0
    out = sum(decode_tokens(llm.model, kv, logits, max_new_tokens=max_new_tokens, sampling=Sampling(),
                            stop_ids=llm.tokenizer.stop_ids), [])
    out = [t for t in out if t not in llm.tokenizer.stop_ids]
    return llm.tokenizer.decode(out), dt


def ppl(llm, length: int, *, cache: str, windows: int, chunk: int, corpus: str) -> float:
    ids = llm.tokenizer.encode(corpora.get(corpus).text())
    bos = llm.tokenizer.bos_id if getattr(llm.tokenizer, "bos_id", None) is not None else None
    res = []
    for _, w in perplexity.windows(ids, length, bos=bos, limit=windows):
        kv = llm.new_cache(cache, capacity=len(w))
        res.append((perplexity.window_nll(llm.model, kv, w, chunk=chunk), len(w) - 1))
    return perplexity.summarize(res)["ppl"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--lengths", default="12288,16384", help="total tokens (prompt + answer budget)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths 0..1, or N for N evenly spaced")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--ropes", default="none;yarn:factor=2")
    ap.add_argument("--caches", default="full")
    ap.add_argument("--corpus", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=0, help="also perplexity over this many windows per length")
    ap.add_argument("--out", default=None, help="append one JSON line per run to this file")
    a = ap.parse_args(argv)

    lengths = [int(x) for x in a.lengths.split(",")]
    depths = ([round(i / (int(a.depths) - 1), 3) for i in range(int(a.depths))] if a.depths.isdigit()
              else [float(x) for x in a.depths.split(",")])
    ropes = [x.strip() for x in a.ropes.split(";") if x.strip()]
    caches = [x.strip() for x in a.caches.split(";") if x.strip()]
    for r in ropes:
        rope_spec.parse(r)
    llm = longkv.load(a.model, device=a.device, dtype=a.dtype, progress=False)
    corpus = corpora.get(a.corpus).name
    cfg = {**vars(a), "lengths": lengths, "depths": depths, "ropes": ropes, "caches": caches, "corpus": corpus,
           "device_name": torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu",
           "torch": torch.__version__, "window": llm.window}
    log = open(a.out, "a") if a.out else None
    runs = []
    for L in lengths:
        for i in range(a.samples):
            for d in depths:
                s = niah.make_sample(llm.tokenizer, length=L, depth=d, index=i, seed=a.seed, corpus=corpus,
                                     gen_tokens=a.max_new_tokens)
                for r in ropes:
                    llm.set_rope(None if r == "none" else r)
                    for c in caches:
                        text, dt = answer(llm, s.ids, cache=c, max_new_tokens=a.max_new_tokens, chunk=a.chunk)
                        ok = niah.score(text, s)
                        row = {"length": L, "prompt_tokens": len(s.ids), "depth": d, "sample": i, "rope": r,
                               "cache": c, "window": llm.window, "correct": ok, "prefill_s": round(dt, 2),
                               "answer": text.strip()[:80], "expected": s.answers[0]}
                        runs.append(row)
                        print(json.dumps(row), flush=True)
                        if log:
                            log.write(json.dumps(row) + "\n")
                            log.flush()
    ppls = {}
    if a.ppl_windows:
        for L in lengths:
            for r in ropes:
                llm.set_rope(None if r == "none" else r)
                for c in caches:
                    ppls[f"{r}|{c}|{L}"] = round(ppl(llm, L, cache=c, windows=a.ppl_windows, chunk=a.chunk,
                                                     corpus=corpus), 3)
                    print(json.dumps({"ppl": ppls[f"{r}|{c}|{L}"], "rope": r, "cache": c, "length": L}), flush=True)

    # table: rows method x cache, columns lengths, cells correct/runs (and ppl when measured)
    print(f"\nNIAH, {a.model} on {cfg['device_name']}, {len(depths)} depths x {a.samples} samples per cell")
    head = f"{'rope':<34} {'cache':<10} " + " ".join(f"{L:>12}" for L in lengths)
    print(head)
    summary = {}
    for r in ropes:
        for c in caches:
            cells = []
            for L in lengths:
                got = [x["correct"] for x in runs if x["rope"] == r and x["cache"] == c and x["length"] == L]
                summary[f"{r}|{c}|{L}"] = {"correct": sum(got), "runs": len(got)}
                p = ppls.get(f"{r}|{c}|{L}")
                cells.append(f"{sum(got):g}/{len(got)}" + (f" ppl {p:.1f}" if p and math.isfinite(p) else ""))
            print(f"{r:<34} {c:<10} " + " ".join(f"{x:>12}" for x in cells))
    result = {"config": cfg, "niah": summary, "ppl": ppls}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
