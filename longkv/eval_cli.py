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
    rp = sub.add_parser("report", help="tables, plots and an HTML page from result folders")
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


def _load(a):
    from . import load

    return load(a.model, device=a.device, dtype=a.dtype, progress=not a.quiet)


def _lengths(a, llm=None):
    from .evals.prompts import parse_lengths

    win = llm.window if llm is not None else _window_of(a.model)
    return parse_lengths(a.lengths, window_tokens=win, model=a.model)


def _done(out: Path, what: str) -> None:
    print(f"\nresults: {out}/results.jsonl{what}; all runs in it: longkv report {out}", file=sys.stderr)


def cmd_niah(a) -> int:
    from .evals import report
    from .evals.prompts import parse_depths
    from .evals.runner import run_niah

    depths = parse_depths(a.depths)
    if a.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    _lengths(a)
    specs, out = _prepare(a, "niah")
    llm = _load(a)
    recs = run_niah(llm, specs=specs, lengths=_lengths(a, llm), depths=depths, samples=a.samples, seed=a.seed,
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
    _lengths(a)
    specs, out = _prepare(a, "ruler")
    llm = _load(a)
    recs = run_ruler(llm, specs=specs, lengths=_lengths(a, llm), tasks=tasks, samples=a.samples, seed=a.seed,
                     corpus=a.corpus, chunk=a.chunk, chat=False if a.no_chat else None, out=out,
                     progress=not a.quiet, argv=sys.argv[1:])
    print(report.markdown(report.ruler_tables(recs)))
    _done(out, "")
    return 0


def cmd_ppl(a) -> int:
    from .evals import report
    from .evals.prompts import parse_lengths
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
    parse_lengths(a.length, window_tokens=_window_of(a.model), model=a.model)
    specs, out = _prepare(a, "ppl")
    llm = _load(a)
    (length,) = parse_lengths(a.length, window_tokens=llm.window, model=a.model)
    recs = run_ppl(llm, specs=specs, length=length, corpus=a.corpus, windows=windows, chunk=a.chunk, out=out,
                   progress=not a.quiet, argv=sys.argv[1:])
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
