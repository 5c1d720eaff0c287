"""`longkv bench`: what each cache costs and saves on a real model, next to the full cache, in one run.

For every length and cache spec the same prompt (the first N tokens of an offline corpus, no chat
template) is prefilled in chunks and then exactly `--new-tokens` tokens are decoded greedily (stop
tokens ignored, so every cache decodes the same number of steps; CUDA graphs where the cache allows),
and the table reports prefill seconds, decode ms a token, KV bytes held, the ratios to `full` at that
length, the peak memory (CUDA), and how many of the first generated tokens equal full's (a quick
quality hint, not an evaluation: `longkv eval` is that). Each cache is run once short first (Triton
compilation and graph capture are not timed). On the CPU the times are wall clock on a shared machine:
compare the ratios, not the absolute figures.

    longkv bench --model gemma3-270m --cache kv4 --cache quest:ratio=0.875,rerank=8 --lengths 4k,16k
    longkv bench --cache kv4 --lengths 2k --json        # one JSON object on stdout

`full` always runs first at each length (the baseline); `--out FILE` also writes the JSON there
(written to a temporary file, then renamed).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from .errors import UserError


def add_subcommand(sub) -> None:
    p = sub.add_parser("bench", help="decode speed and KV memory of cache specs next to the full cache",
                       description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="registry name, .gguf file or HF folder (default: smollm2-135m)")
    p.add_argument("--cache", action="append", default=None, metavar="SPEC",
                   help="cache spec, repeatable (full is always run as the baseline)")
    p.add_argument("--lengths", default="2k", help="prompt lengths in tokens (1k = 1024; default 2k)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (default 32)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens")
    p.add_argument("--corpus", default="auto", help="prompt text (`longkv eval corpora`; default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_bench)


def cmd_bench(a) -> int:
    from . import load
    from .cache.spec import parse
    from .evals import corpora
    from .evals.prompts import parse_lengths

    specs = ["full"] + [s for s in (a.cache or []) if str(parse(s)) != "full"]   # bad specs fail here
    lengths = parse_lengths(a.lengths)
    if a.new_tokens < 1:
        raise UserError("--new-tokens must be at least 1")
    if a.chunk < 1:
        raise UserError("--chunk must be at least 1")
    if a.out and not Path(a.out).parent.is_dir():
        raise UserError(f"--out: no such folder: {Path(a.out).parent}")
    corpus = corpora.get(a.corpus)
    llm = load(a.model, device=a.device, dtype=a.dtype, progress=not a.quiet)
    for n in lengths:
        llm.check_fits(n + a.new_tokens, f"--lengths {n} plus --new-tokens {a.new_tokens}")
    ids = prompt_ids(llm, corpus.text(), max(lengths))
    rows = run(llm, specs, lengths, ids, new_tokens=a.new_tokens, chunk=a.chunk, progress=not a.quiet)
    out = {"bench": "longkv bench", "model": llm.name, "device": device_name(llm.device),
           "dtype": str(llm.dtype).replace("torch.", ""), "corpus": corpus.name, "new_tokens": a.new_tokens,
           "rows": rows}
    if a.out:
        write_json(Path(a.out), out)
    if a.json:
        print(json.dumps(out))
    else:
        print(table(rows, out))
    return 0


def prompt_ids(llm, text: str, n: int) -> list[int]:
    """The first n tokens of text (no chat template); UserError when the corpus is shorter."""
    take = 6 * n
    while True:
        ids = llm.tokenizer.encode(text[:take])
        if len(ids) >= n or take >= len(text):
            break
        take *= 2
    if len(ids) < n:
        raise UserError(f"the corpus has {len(ids)} tokens, fewer than --lengths {n}: pick shorter lengths "
                        f"or another --corpus")
    return ids[:n]


def run(llm, specs: list[str], lengths: list[int], ids: list[int], *, new_tokens: int, chunk: int,
        progress: bool = False) -> list[dict]:
    """One row per (length, spec), `specs[0]` the baseline the ratios refer to."""
    cuda = llm.device.type == "cuda"
    kw = dict(max_new_tokens=new_tokens, chunk=chunk, ignore_stop=True)
    from tqdm import tqdm
    bar = tqdm(total=len(specs) * (len(lengths) + 1), unit="run", desc="bench", file=sys.stderr, leave=False,
               disable=not progress)
    for spec in specs:   # warm-up: Triton compilation, first graph capture
        llm.generate(ids=ids[:min(256, len(ids))], cache=spec, **dict(kw, max_new_tokens=4))
        bar.update()
    rows = []
    for n in lengths:
        base = None
        for spec in specs:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(llm.device)
            r = llm.generate(ids=ids[:n], cache=spec, **kw)
            row = {"length": n, "cache": r.cache, "prefill_s": round(r.prefill_s, 3),
                   "decode_ms": round(1e3 / r.decode_tokens_per_s, 3) if r.decode_tokens_per_s else None,
                   "kv_MiB": round(r.kv_bytes / 2**20, 2)}
            if cuda:
                row["peak_GiB"] = round(torch.cuda.max_memory_allocated(llm.device) / 2**30, 2)
            if base is None:
                base = (row, r.token_ids, r.kv_bytes)
                row["kv_vs_full"] = 1.0
            else:
                row["kv_vs_full"] = round(r.kv_bytes / base[2], 3)   # against full's buffers in this run
                if row["decode_ms"] and base[0]["decode_ms"]:
                    row["decode_x_full"] = round(row["decode_ms"] / base[0]["decode_ms"], 3)
                row["prefill_x_full"] = round(row["prefill_s"] / max(base[0]["prefill_s"], 1e-9), 3)
                row["same_tokens"] = _common_prefix(r.token_ids, base[1])
            rows.append(row)
            bar.update()
    bar.close()
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def table(rows: list[dict], head: dict) -> str:
    cols = ["length", "cache", "prefill_s", "prefill_x_full", "decode_ms", "decode_x_full", "kv_MiB",
            "kv_vs_full", "peak_GiB", "same_tokens"]
    cols = [c for c in cols if any(c in r for r in rows)]
    note = ("\n# CPU: quantized and sparse caches run their plain-torch references here (the Triton kernels "
            "are for the GPU), so these times rank nothing; the bytes and same_tokens hold anywhere"
            if head["device"] == "cpu" else "")
    lines = [f"# {head['model']} on {head['device']} ({head['dtype']}), prompt from {head['corpus']}, "
             f"{head['new_tokens']} tokens decoded a run; same_tokens: leading tokens equal to full's{note}",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
