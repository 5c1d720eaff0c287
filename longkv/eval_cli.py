"""`longkv eval niah|ruler|ppl|corpora` and `longkv report`: the evaluation harness's command line.

`add_subcommands(subparsers)` registers both verbs on the main parser; every handler returns an exit
code and raises `UserError` for bad input (the main CLI prints it on one line and exits 2). Inputs are
checked before the model loads, so a typo costs no model load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL = "smollm2-135m"


def _common(p: argparse.ArgumentParser, *, chunk: int) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, .gguf or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--cache", action="append", default=None, metavar="SPEC",
                   help="cache spec, repeatable: --cache full --cache kv4 (default: full)")
    p.add_argument("--rope", action="append", default=None, metavar="SPEC",
                   help="context extension past the model's window, repeatable (every cache runs with each): "
                        "yarn:factor=4, ntk:factor=4, dynamic:factor=4, linear:factor=4, llama3:factor=8, "
                        "self-extend:group=8,window=1024; none = the model's own RoPE (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=chunk, help=f"prefill chunk in tokens (default {chunk})")
    p.add_argument("--out", default=None, help="results folder (JSON lines; rerun to resume; "
                   "default longkv-results/KIND-MODEL)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _gen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="4k", help="target lengths incl. template and answer (1k = 1024)")
    p.add_argument("--samples", type=int, default=1, help="samples per cell (default 1)")
    p.add_argument("--corpus", default="auto", help="haystack text (`longkv eval corpora`; default auto)")
    p.add_argument("--no-chat", action="store_true", help="completion prompt even for a chat model")


def add_subcommands(sub) -> None:
    e = sub.add_parser("eval", help="offline long-context evaluation: niah, ruler, ppl, corpora")
    e.add_argument("--corpus", dest="list_corpora", action="store_true", help="list the corpora present")
    e.set_defaults(fn=cmd_eval_root)
    ev = e.add_subparsers(dest="eval_cmd")
    n = ev.add_parser("niah", help="needle-in-a-haystack heatmap (depth × length)")
    _common(n, chunk=2048)
    _gen_flags(n)
    n.add_argument("--depths", default="0:1:11", help="START:STOP:COUNT or a list of fractions (default 0:1:11)")
    n.add_argument("--max-new-tokens", type=int, default=32)
    n.set_defaults(fn=cmd_niah, lengths="1k,2k,4k,8k")
    r = ev.add_parser("ruler", help="RULER-style synthetic tasks (niah_*, vt, cwe, fwe)")
    _common(r, chunk=2048)
    _gen_flags(r)
    r.add_argument("--tasks", default="all", help="all or a comma list of: niah_single_1/2/3, niah_multikey_1/2/3, "
                   "niah_multivalue, niah_multiquery, vt, cwe, fwe (qa_1/qa_2 need data not available offline)")
    r.set_defaults(fn=cmd_ruler)
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows fed through the cache")
    _common(p, chunk=512)
    p.add_argument("--length", default="8k", help="window length in tokens (default 8k)")
    p.add_argument("--corpus", default="auto")
    p.add_argument("--baseline", default=None, metavar="SPEC", help="also run this spec (e.g. full) as the baseline")
    p.add_argument("--windows", default="8", help="how many windows, spread over the corpus, or `all` (default 8)")
    p.set_defaults(fn=cmd_ppl)
    c = ev.add_parser("corpora", help="list the corpora and whether each is installed")
    c.set_defaults(fn=cmd_corpora)
    rp = sub.add_parser("report", help="tables (each cache against full on the same prompts: points ± 95 %%, "
                                       "cells won/lost), plots and an HTML page from result folders")
    rp.add_argument("dirs", nargs="+", metavar="DIR")
    rp.add_argument("--html", default=None, help="HTML file to write (default PLOTS/report.html)")
    rp.add_argument("--plots", default=None, help="folder for PNGs and report.md (default DIR/report)")
    rp.set_defaults(fn=cmd_report)


def cmd_eval_root(a) -> int:
    if a.list_corpora:
        return cmd_corpora(a)
    raise UserError("usage: longkv eval {niah,ruler,ppl,corpora} ... (`longkv eval --help`)")


def cmd_corpora(a) -> int:
    from .evals import corpora

    print(f"{'name':<8} {'present':<8} description")
    for row in corpora.listing():
        extra = "" if row["present"] else f"  [{row['install']}]"
        print(f"{row['name']:<8} {'yes' if row['present'] else 'no':<8} {row['description']}{extra}")
    print(f"\n`--corpus auto` uses: {corpora.get('auto').name}")
    return 0


def _window_of(name: str) -> int | None:
    """A registry model's window without loading it (None for other sources: checked after loading)."""
    try:
        from .models.registry import MODELS
    except ImportError:
        return None
    m = MODELS.get(name)
    return m.context if m else None


def _ropes(a) -> list:
    """The --rope specs in order, parsed, without repeats; None = the model's own RoPE (`none` too)."""
    from .models.rope_spec import parse

    out = []
    for text in a.rope or [None]:
        spec = parse(text)
        spec = None if spec is not None and spec.method == "none" else spec
        if spec not in out:
            out.append(spec)
    return out


def _check_lengths(a, text: str, ropes: list, llm=None) -> list[int]:
    """Parse `text` (--lengths, or ppl's --length) and check it against the window under every rope:
    before loading only for registry models (their window is known), after loading exactly. A loaded
    `llm` is left with the last rope set (each rope's RoPE and Self-Extend window are checked on it)."""
    from .evals.prompts import parse_lengths
    from .models.rope_spec import suggest

    if ropes == [None]:
        return parse_lengths(text, window_tokens=llm.window if llm is not None else _window_of(a.model),
                             model=a.model)
    lengths = parse_lengths(text, model=a.model)
    trained = llm.base_config.max_position_embeddings if llm is not None else _window_of(a.model)
    for r in ropes:
        if llm is not None:
            llm.set_rope(r)
            win = llm.window
        elif trained is None:
            continue
        else:
            win = trained if r is None else r.window(trained, trained)
        if max(lengths) > win:
            using = f"with --rope {r}" if r is not None else "with its own RoPE (--rope none)"
            raise UserError(f"--lengths: {max(lengths)} tokens is longer than {a.model}'s window {using}, "
                            f"{win} tokens: use lengths up to {win} or {suggest(max(lengths), trained or win)}")
    return lengths


def _check_loaded(a, llm, text: str, ropes: list, specs: list[str]) -> list[int]:
    """The checks that need the model: lengths against each rope's exact window, Self-Extend's window
    against the model, and each cache spec under Self-Extend (eviction caches do not compose yet)."""
    lengths = _check_lengths(a, text, ropes, llm)
    for r in ropes:
        if r is not None and r.self_extend:
            llm.set_rope(r)
            for s in specs:
                llm.new_cache(s, capacity=min(lengths))
    return lengths


def _prepare(a, kind: str):
    """Check what can be checked without the model; returns (specs, out folder)."""
    from .evals import corpora
    from .evals.results import Results
    from .evals.runner import check_specs

    specs = check_specs(a.cache or ["full"])
    if getattr(a, "baseline", None):
        specs = check_specs([a.baseline] + specs)
    if a.chunk < 1:
        raise UserError("--chunk must be at least 1")
    if getattr(a, "samples", 1) < 1:
        raise UserError(f"--samples must be at least 1 (got {a.samples})")
    corpora.get(a.corpus)
    out = Path(a.out) if a.out else Path("longkv-results") / f"{kind}-{a.model.replace('/', '_')}"
    Results(out).close()          # creates it, checks it is writable and of our format
    return specs, out


def _load(a, ropes: list):
    from . import load

    return load(a.model, device=a.device, dtype=a.dtype, progress=not a.quiet, rope=ropes[0])


def _done(out: Path, what: str) -> None:
    print(f"\nresults: {out}/results.jsonl{what}; all runs in it: longkv report {out}", file=sys.stderr)


def cmd_niah(a) -> int:
    from .evals import report
    from .evals.prompts import parse_depths
    from .evals.runner import run_niah

    depths = parse_depths(a.depths)
    if a.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    ropes = _ropes(a)
    _check_lengths(a, a.lengths, ropes)
    specs, out = _prepare(a, "niah")
    llm = _load(a, ropes)
    lengths = _check_loaded(a, llm, a.lengths, ropes, specs)
    recs = []
    for r in ropes:
        llm.set_rope(r)
        recs += run_niah(llm, specs=specs, lengths=lengths, depths=depths, samples=a.samples, seed=a.seed,
                         corpus=a.corpus, max_new_tokens=a.max_new_tokens, chunk=a.chunk,
                         chat=False if a.no_chat else None, out=out, progress=not a.quiet, argv=sys.argv[1:])
    print(report.markdown(report.niah_tables(recs)))
    try:
        pngs = report.heatmaps(recs, out)
    except UserError as e:           # the results are written; only the picture is missing
        print(f"longkv: no heatmap: {e}", file=sys.stderr)
        pngs = []
    _done(out, "; heatmaps: " + (", ".join(str(p) for p in pngs) or "none"))
    return 0


def cmd_ruler(a) -> int:
    from .evals import report, ruler
    from .evals.runner import run_ruler

    tasks = ruler.parse_tasks(a.tasks)
    ropes = _ropes(a)
    _check_lengths(a, a.lengths, ropes)
    specs, out = _prepare(a, "ruler")
    llm = _load(a, ropes)
    lengths = _check_loaded(a, llm, a.lengths, ropes, specs)
    recs = []
    for r in ropes:
        llm.set_rope(r)
        recs += run_ruler(llm, specs=specs, lengths=lengths, tasks=tasks, samples=a.samples, seed=a.seed,
                          corpus=a.corpus, chunk=a.chunk, chat=False if a.no_chat else None, out=out,
                          progress=not a.quiet, argv=sys.argv[1:])
    print(report.markdown(report.ruler_tables(recs)))
    _done(out, "")
    return 0


def cmd_ppl(a) -> int:
    from .evals import report
    from .evals.runner import run_ppl

    if "," in a.length:
        raise UserError("--length takes one length (run again for another)")
    if a.windows == "all":
        windows = None
    else:
        try:
            windows = int(a.windows)
        except ValueError:
            raise UserError(f"--windows must be a number or `all`, got {a.windows!r}") from None
        if windows < 1:
            raise UserError("--windows must be at least 1 (or `all`)")
    ropes = _ropes(a)
    _check_lengths(a, a.length, ropes)
    specs, out = _prepare(a, "ppl")
    llm = _load(a, ropes)
    (length,) = _check_loaded(a, llm, a.length, ropes, specs)
    recs = []
    for r in ropes:
        llm.set_rope(r)
        recs += run_ppl(llm, specs=specs, length=length, corpus=a.corpus, windows=windows, chunk=a.chunk,
                        out=out, progress=not a.quiet, argv=sys.argv[1:])
    print(report.markdown(report.ppl_tables(recs)))
    _done(out, "")
    return 0


def cmd_report(a) -> int:
    from .evals import report

    dirs = [Path(d) for d in a.dirs]
    plots = Path(a.plots) if a.plots else dirs[0] / "report"
    md, files = report.build(dirs, plots=plots, html_out=Path(a.html) if a.html else None)
    print(md)
    print("wrote: " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m longkv.eval_cli eval ...` is `longkv eval ...`."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
