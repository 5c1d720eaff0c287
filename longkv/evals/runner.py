"""Run NIAH, RULER-style tasks and perplexity over several cache specs, writing a results folder.

Every prompt is generated once and run with every cache spec, so each table has its baseline beside
it, measured on the same prompts. Each (sample, cache) or (window, cache) becomes one JSON line with
the whole configuration (results.py); a rerun into the same folder skips the lines already there.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterable

from ..cache.spec import parse
from ..errors import UserError
from . import corpora, niah, perplexity, ruler
from .results import Results, environment, record_key


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)


def _prompt_sha(ids: list[int]) -> str:
    # Lets a peer runner (benchmarks/peers/) prove it scored the very same prompts.
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def _rope(llm) -> str | None:
    """The run's `--rope` spec text (None: the model's own RoPE; peers and fakes have no `rope`)."""
    r = getattr(llm, "rope", None)
    return None if r is None or str(r) == "none" else str(r)


def _rope_key(llm) -> dict:
    # Only set when a rope is: keys of runs without one stay as before, so old folders resume.
    r = _rope(llm)
    return {"rope": r} if r else {}


def _common(llm, cfg: dict) -> dict:
    """Fields every record carries. With a --rope, `model` names it too (`smollm2-135m rope=yarn:factor=4`)
    so that reports, which group by model and cache, keep runs with different ropes apart."""
    r = _rope(llm)
    return {"model": llm.name + (f" rope={r}" if r else ""), "rope": r, "config": {**cfg, "rope": r},
            "env": environment(str(llm.device), str(llm.dtype).split(".")[-1])}


def check_specs(specs: Iterable[str]) -> list[str]:
    """Parse every spec before any work starts; the canonical text is what results record."""
    out = [str(parse(s)) for s in specs]
    if not out:
        raise UserError("give at least one --cache spec")
    return list(dict.fromkeys(out))


def _generation_loop(llm, cells: list[dict], make: Callable[[dict], object], score: Callable, specs: list[str],
                     res: Results, *, kind: str, chunk: int, base: dict, progress: bool) -> list[dict]:
    """For each cell (the key fields of one sample) build the prompt once, run it with every spec
    not yet done, score and write one line per (cell, spec). Returns this run's records."""
    out = []
    bar = _bar(len(cells) * len(specs), f"{kind} {llm.name}", progress)
    try:
        for cell in cells:
            keys = {s: record_key(kind=kind, model=llm.name, cache=s, chunk=chunk, dtype=base["env"]["dtype"],
                                  **_rope_key(llm), **cell)
                    for s in specs}
            todo = [s for s in specs if keys[s] not in res.done]
            out += [res.done[keys[s]] for s in specs if keys[s] in res.done]
            bar.update(len(specs) - len(todo))
            if not todo:
                continue
            sample = make(cell)
            for s in todo:
                r = llm.generate(ids=sample.ids, max_new_tokens=sample.gen_tokens, cache=s, chunk=chunk)
                seen = max(1, r.prompt_tokens + r.generated_tokens - 1)   # tokens the cache was given
                rec = {"key": keys[s], "kind": kind, "cache": s, **cell, "score": score(r.text, sample),
                       "prediction": r.text, "answers": sample.answers, "meta": sample.meta,
                       "prompt_tokens": r.prompt_tokens, "prompt_sha": _prompt_sha(sample.ids),
                       "generated_tokens": r.generated_tokens, "finish_reason": r.finish_reason,
                       "kv_bytes": r.kv_bytes, "kv_bytes_full": r.kv_bytes_full,
                       "kv_bytes_per_token": r.kv_bytes / seen, "prefill_s": r.prefill_s,
                       "decode_tokens_per_s": r.decode_tokens_per_s,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **base}
                res.write(rec)
                out.append(rec)
                bar.set_postfix_str(f"{cell.get('task', kind)} {cell['length']} {s}: {rec['score']:.2f}")
                bar.update(1)
    finally:
        bar.close()
    return out


def run_niah(llm, *, specs, lengths, depths, samples, seed, corpus="auto", max_new_tokens=32, chunk=2048,
             chat=None, out=None, progress=True, argv=None) -> list[dict]:
    specs, corpus_name = check_specs(specs), corpora.get(corpus).name
    if samples < 1:
        raise UserError("--samples must be at least 1")
    cfg = {"command": "eval niah", "argv": argv, "caches": specs, "lengths": lengths, "depths": depths,
           "samples": samples, "seed": seed, "corpus": corpus_name, "max_new_tokens": max_new_tokens,
           "chunk": chunk, "chat": chat}
    cells = [{"task": "niah", "length": L, "depth": d, "index": i, "seed": seed, "corpus": corpus_name,
              "gen_tokens": max_new_tokens, "chat": chat}
             for L in lengths for i in range(samples) for d in depths]

    def make(c):
        return niah.make_sample(llm.tokenizer, length=c["length"], depth=c["depth"], index=c["index"], seed=seed,
                                corpus=corpus_name, gen_tokens=max_new_tokens, chat=chat)

    res = Results(out)
    try:
        return _generation_loop(llm, cells, make, niah.score, specs, res, kind="niah", chunk=chunk,
                                base=_common(llm, cfg), progress=progress)
    finally:
        res.close()


def run_ruler(llm, *, specs, lengths, tasks, samples, seed, corpus="auto", chunk=2048, chat=None, out=None,
              progress=True, argv=None) -> list[dict]:
    specs, corpus_name = check_specs(specs), corpora.get(corpus).name
    if samples < 1:
        raise UserError("--samples must be at least 1")
    cfg = {"command": "eval ruler", "argv": argv, "caches": specs, "lengths": lengths, "tasks": tasks,
           "samples": samples, "seed": seed, "corpus": corpus_name, "chunk": chunk, "chat": chat,
           "left_out": ruler.LEFT_OUT}
    cells = [{"task": t, "length": L, "index": i, "seed": seed, "corpus": corpus_name, "chat": chat}
             for L in lengths for i in range(samples) for t in tasks]    # a cut run still covers every task

    def make(c):
        return ruler.make_sample(llm.tokenizer, c["task"], length=c["length"], index=c["index"], seed=seed,
                                 corpus=corpus_name, chat=chat)

    res = Results(out)
    try:
        return _generation_loop(llm, cells, make, ruler.score, specs, res, kind="ruler", chunk=chunk,
                                base=_common(llm, cfg), progress=progress)
    finally:
        res.close()


def _starts_with_bos(tok) -> int | None:
    """The BOS id when the tokenizer itself starts a text with it (so windows start like texts do)."""
    bos = getattr(tok, "bos_id", None)
    if bos is None:
        return None
    ids = tok.encode("Hello", add_special_tokens=True)
    return bos if ids and ids[0] == bos else None


def run_ppl(llm, *, specs, length, corpus="auto", windows=8, chunk=512, out=None, progress=True,
            argv=None) -> list[dict]:
    specs = check_specs(specs)
    c = corpora.get(corpus)
    if windows is not None and windows < 1:
        raise UserError("--windows must be at least 1 (or `all`)")
    bos = _starts_with_bos(llm.tokenizer)
    cfg = {"command": "eval ppl", "argv": argv, "caches": specs, "length": length, "corpus": c.name,
           "windows": windows, "chunk": chunk, "bos": bos}
    base = _common(llm, cfg)
    if progress:
        print(f"longkv: tokenizing corpus {c.name} ...", file=sys.stderr, flush=True)
    ids = llm.tokenizer.encode(c.text(), add_special_tokens=False)
    wins = perplexity.windows(ids, length, bos=bos, limit=windows)
    res = Results(out)
    outs = []
    bar = _bar(len(wins) * len(specs), f"ppl {llm.name} {c.name}", progress)
    try:
        for w, w_ids in wins:
            for s in specs:
                key = record_key(kind="ppl", model=llm.name, cache=s, corpus=c.name, length=length, window=w,
                                 chunk=chunk, bos=bos, dtype=base["env"]["dtype"], **_rope_key(llm))
                if key in res.done:
                    outs.append(res.done[key])
                    bar.update(1)
                    continue
                cache = llm.new_cache(s, capacity=len(w_ids))
                t0 = time.perf_counter()
                nll = perplexity.window_nll(llm.model, cache, w_ids, chunk=chunk)
                n = len(w_ids) - 1
                rec = {"key": key, "kind": "ppl", "cache": s, "corpus": c.name, "length": length, "window": w,
                       "nll": nll, "tokens": n, "ppl_window": math.exp(nll / n),
                       "kv_bytes": cache.nbytes(), "kv_bytes_full": cache.full_nbytes(),
                       "kv_bytes_per_token": cache.nbytes() / len(w_ids), "seconds": time.perf_counter() - t0,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **base}
                res.write(rec)
                outs.append(rec)
                bar.set_postfix_str(f"{s}: {rec['ppl_window']:.2f}")
                bar.update(1)
    finally:
        bar.close()
        res.close()
    return outs
