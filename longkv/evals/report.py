"""`longkv report DIR...`: result folders → Markdown tables, PNG plots, one self-contained HTML page.

Tables: NIAH accuracy per (depth, length) as in gkamradt's heatmap; RULER-style per-task scores and
their average (RULER's string_match_all × 100, averaged over the tasks run); perplexity with its ratio
to the full cache of the same model, corpus and length (KVQuant's way of reporting a compressed cache).
Plots: the NIAH heatmaps (gkamradt's red→yellow→green) and the quality/memory frontier: score against
KV bytes per token, one point per cache spec. Plots use matplotlib's object API (no pyplot, no global
backend switch), so building a report changes nothing in the caller's process.
"""
from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from ..errors import UserError
from .results import read_folder
from .ruler import LEFT_OUT, TASKS

Table = tuple[str, str, list[str], list[list[str]]]      # title, note, header, rows


def load(dirs) -> list[dict]:
    """Records of every folder; a unit measured in several folders (same key, e.g. a resumed copy)
    counts once, the last folder's."""
    recs: dict[str, dict] = {}
    for d in dirs:
        for r in read_folder(d):
            recs[r["key"]] = r
    if not recs:
        raise UserError(f"no results in {', '.join(map(str, dirs))}")
    return list(recs.values())


def klen(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _bpt(rs) -> float:
    return mean(r["kv_bytes_per_token"] for r in rs)


def _group(recs, kind, *fields):
    g = defaultdict(list)
    for r in recs:
        if r["kind"] == kind:
            g[tuple(r[f] for f in fields)].append(r)
    return g


def _cell(r) -> tuple:
    """What makes two records the same prompt: a cache's record pairs with `full`'s of the same cell."""
    return (r.get("task"), r["length"], r.get("depth"), r.get("index"), r.get("seed"), r.get("corpus"),
            r.get("prompt_sha"))


def versus_full(rs, full_rs) -> dict | None:
    """A cache's records against `full`'s on the very same prompts (same model run-set), paired cell by cell.

    delta: points (score × 100) the cache gains (+) or loses (-) against full, averaged over the paired
    cells of each task and then over tasks (the tables' `avg`, restricted to cells both caches scored);
    ci: the half-width of its 95 % interval, tasks as strata, each task's variance from Agresti and Min's
    adjusted Wald interval for paired proportions (2005: half a pseudo-pair won and half a pseudo-pair
    lost, one tied, so that a grid with no differing cell still gets an honest width instead of ±0);
    won / lost: cells scored higher / lower than full. None when no cell pairs up. A cell missing from
    either side (a run stopped early) is left out, so the delta compares like with like where the `avg`
    columns may not."""
    full = {_cell(r): r["score"] for r in full_rs}
    diffs = defaultdict(list)
    for r in rs:
        if (f := full.get(_cell(r))) is not None:
            diffs[r.get("task")].append(100 * (r["score"] - f))
    if not diffs:
        return None
    T = len(diffs)
    delta = sum(mean(d) for d in diffs.values()) / T
    var = 0.0
    for d in diffs.values():
        n = len(d) + 2                                   # + the pseudo-pairs at +100, -100 (½ each) and 0 (1)
        var += (sum(x * x for x in d) + 100 ** 2) / n ** 2 - sum(d) ** 2 / n ** 3
    ci = 1.96 * math.sqrt(var) / T
    flat = [x for d in diffs.values() for x in d]
    return {"delta": delta, "ci": ci, "won": sum(x > 0 for x in flat), "lost": sum(x < 0 for x in flat),
            "cells": len(flat)}


def _vs(v: dict | None) -> list[str]:
    if v is None:
        return ["—", "—"]
    d = f"{v['delta']:+.1f} ± {v['ci']:.1f}"
    return [d, f"{v['won']}/{v['lost']} of {v['cells']}"]


def niah_tables(recs) -> list[Table]:
    out = []
    g = _group(recs, "niah", "model", "cache", "corpus")
    for (model, cache, corpus), rs in sorted(g.items()):
        lengths = sorted({r["length"] for r in rs})
        depths = sorted({r["depth"] for r in rs})
        cell = defaultdict(list)
        for r in rs:
            cell[r["length"], r["depth"]].append(r["score"])
        rows = [[f"{100 * d:.0f}%"] + [_pct(cell.get((L, d))) for L in lengths] for d in depths]
        rows.append(["**mean**"] + [_pct([s for d in depths for s in cell.get((L, d), [])]) for L in lengths])
        n = max(len(v) for v in cell.values())
        note = (f"NIAH accuracy (%), needle depth × context length; {n} sample(s) per cell; corpus {corpus}; "
                f"overall {_pct([r['score'] for r in rs])}%, {_bpt(rs):,.0f} KV bytes/token.")
        v = versus_full(rs, g.get((model, "full", corpus), [])) if cache != "full" else None
        if v:
            d, wl = _vs(v)
            note += f" Against `full` on the same prompts: {d} points (95 %), cells won/lost {wl}."
        out.append((f"NIAH — {model}, cache `{cache}`, corpus {corpus}", note, ["depth"] + [klen(L) for L in lengths], rows))
    return out


def ruler_tables(recs) -> list[Table]:
    g = _group(recs, "ruler", "model", "cache", "length")
    if not g:
        return []
    tasks = [t for t in TASKS if any(r["task"] == t for rs in g.values() for r in rs)]
    rows = []
    for (model, cache, length), rs in sorted(g.items()):
        v = versus_full(rs, g.get((model, "full", length), [])) if cache != "full" else None
        by = defaultdict(list)
        for r in rs:
            by[r["task"]].append(r["score"])
        scores = [100 * mean(by[t]) if by[t] else None for t in tasks]
        avg = mean(s for s in scores if s is not None)
        n = min(len(v) for v in by.values())
        rows.append([model, f"`{cache}`", klen(length), str(n)] + [_num(s) for s in scores]
                    + [f"**{avg:.1f}**", f"{_bpt(rs):,.0f}"] + _vs(v))
    left = "; ".join(f"{k} {v}" for k, v in LEFT_OUT.items())
    note = ("RULER-style scores (string_match_all × 100, mean over samples); avg = mean over the tasks "
            "shown, not RULER's 13. vs full = points against `full` of the same model and length on the "
            "same prompts, cell by cell (± its 95 % interval: Agresti-Min's adjusted Wald per task); "
            f"won/lost = cells scored higher/lower than full. Left out: {left}.")
    return [("RULER-style tasks", note, ["model", "cache", "length", "n"] + tasks
             + ["avg", "KV B/tok", "vs full", "won/lost"], rows)]


def ppl_tables(recs) -> list[Table]:
    g = _group(recs, "ppl", "model", "corpus", "length", "cache")
    if not g:
        return []
    summ = {}
    for k, rs in g.items():
        means = [r["nll"] / r["tokens"] for r in rs]
        summ[k] = (math.exp(mean(means)), len(rs), _bpt(rs), {r["window"] for r in rs})
    rows = []
    for (model, corpus, length, cache), (ppl, n, bpt, wins) in sorted(summ.items()):
        full = summ.get((model, corpus, length, "full"))
        ratio = f"{ppl / full[0]:.4f}" if full and full[3] == wins else "—"
        rows.append([model, corpus, klen(length), f"`{cache}`", str(n), f"{ppl:.3f}", ratio, f"{bpt:,.0f}"])
    note = ("Perplexity over non-overlapping windows (KVQuant protocol), each fed in chunks through the "
            "cache; ppl = exp(mean window loss); ratio to `full` on the same windows.")
    return [("Perplexity", note, ["model", "corpus", "length", "cache", "windows", "ppl", "vs full", "KV B/tok"],
             rows)]


def _pct(xs) -> str:
    return f"{100 * mean(xs):.0f}" if xs else "—"


def _num(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def tables(recs) -> list[Table]:
    return niah_tables(recs) + ruler_tables(recs) + ppl_tables(recs)


def markdown(tabs: list[Table]) -> str:
    out = []
    for title, note, header, rows in tabs:
        out += [f"### {title}", "", note, "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


# --- plots --------------------------------------------------------------------------------------
def _figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib (or longkv[eval])") from None
    return Figure(**kw)


def _cmap():
    from matplotlib.colors import LinearSegmentedColormap
    return LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in s)


def heatmaps(recs, folder: Path) -> list[Path]:
    paths = []
    for (model, cache, corpus), rs in sorted(_group(recs, "niah", "model", "cache", "corpus").items()):
        lengths = sorted({r["length"] for r in rs})
        depths = sorted({r["depth"] for r in rs})
        cell = defaultdict(list)
        for r in rs:
            cell[r["length"], r["depth"]].append(r["score"])
        grid = [[mean(cell[L, d]) if cell.get((L, d)) else math.nan for L in lengths] for d in depths]
        fig = _figure(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.38 * len(depths)))
        ax = fig.add_subplot()
        im = ax.imshow(grid, cmap=_cmap(), vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [klen(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths])
        ax.set_xlabel("Token Limit")
        ax.set_ylabel("Depth Percent")
        ax.set_title(f"NIAH {model} · {cache} · {corpus}", fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}".rstrip("0").rstrip("."), ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        p = folder / f"niah_{_safe(model)}_{_safe(cache)}_{_safe(corpus)}.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    return paths


def frontier(recs, folder: Path) -> list[Path]:
    """Score vs KV bytes per token, one point per cache spec; a series per (model, task family, length)."""
    series = defaultdict(dict)       # label -> cache -> (bytes/token, score)
    for (model, cache, corpus), rs in _group(recs, "niah", "model", "cache", "corpus").items():
        series[f"{model} NIAH {corpus}"][cache] = (_bpt(rs), 100 * mean(r["score"] for r in rs))
    for (model, cache, L), rs in _group(recs, "ruler", "model", "cache", "length").items():
        by = defaultdict(list)
        for r in rs:
            by[r["task"]].append(r["score"])
        series[f"{model} RULER {klen(L)}"][cache] = (_bpt(rs), 100 * mean(mean(v) for v in by.values()))
    ppl = defaultdict(dict)
    for (model, corpus, L, cache), rs in _group(recs, "ppl", "model", "corpus", "length", "cache").items():
        ppl[f"{model} {corpus} {klen(L)}"][cache] = (_bpt(rs), math.exp(mean(r["nll"] / r["tokens"] for r in rs)))
    paths = []
    for name, data, ylabel in (("frontier_accuracy", series, "score (%)"), ("frontier_ppl", ppl, "perplexity")):
        if not data:
            continue
        fig = _figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        for label, pts in sorted(data.items()):
            items = sorted(pts.items(), key=lambda kv: kv[1][0])
            # Points, not lines: caches are different methods, not a sweep of one knob.
            ax.plot([v[0] for _, v in items], [v[1] for _, v in items], marker="o", linestyle="none", label=label)
            for cache, (x, y) in items:
                ax.annotate(cache, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        xs = [v[0] for pts in data.values() for v in pts.values()]
        wide = max(xs) / max(1e-9, min(xs)) > 4         # log scale only when the caches differ a lot
        if wide:
            ax.set_xscale("log")
        ax.set_xlabel("KV cache bytes per token (as held" + (", log scale)" if wide else ")"))
        if ylabel != "perplexity":
            ax.set_ylim(-3, 103)
        ax.set_ylabel(ylabel)
        ax.set_title("quality vs KV memory" + (" (lower is better)" if ylabel == "perplexity" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = folder / f"{name}.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    return paths


def html_page(tabs: list[Table], images: list[Path], sources: list[str]) -> str:
    """One page with every table and the images embedded as base64 (opens anywhere, offline)."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>longkv report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}",
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}</style></head><body>",
             "<h1>longkv evaluation report</h1>",
             "<p>Results from: " + ", ".join(f"<code>{html.escape(s)}</code>" for s in sources) + "</p>"]
    for title, note, header, rows in tabs:
        parts.append(f"<h2>{_inline(title)}</h2><p>{_inline(note)}</p><table><tr>"
                     + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    for p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<figure><img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(s: str) -> str:
    """The little Markdown the tables use (`code`, **bold**) as HTML."""
    import re

    s = html.escape(s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def build(dirs, *, plots: Path, html_out: Path | None = None) -> tuple[str, list[Path]]:
    """Markdown text and the files written (PNGs, report.md, the HTML page)."""
    recs = load(dirs)
    try:
        plots.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the plots folder {plots}: {e.strerror}") from None
    tabs = tables(recs)
    images = heatmaps(recs, plots) + frontier(recs, plots)
    md = markdown(tabs) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    (plots / "report.md").write_text(md, encoding="utf-8")
    page = html_out or plots / "report.html"
    try:
        page.write_text(html_page(tabs, images, [str(d) for d in dirs]), encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {page}: {e.strerror}") from None
    return markdown(tabs), images + [plots / "report.md", page]
