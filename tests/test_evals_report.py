"""`longkv report` on a small fixture folder: Markdown tables, PNG plots, one self-contained HTML page."""
import base64
import re

import pytest

from longkv.errors import UserError
from longkv.evals import report
from longkv.evals.results import Results, record_key


def _write_fixture(folder):
    """Two caches × NIAH grid, two RULER tasks, perplexity with its full baseline (hand-made numbers)."""
    res = Results(folder)
    base = {"model": "m", "config": {}, "env": {"device": "cpu"}}
    for cache, bpt, miss in (("full", 1000.0, set()), ("kv4", 280.0, {(2048, 0.0)})):
        for L in (1024, 2048):
            for d in (0.0, 0.5, 1.0):
                for i in range(2):
                    score = 0.0 if (L, d) in miss else 1.0
                    res.write({"key": record_key(kind="niah", cache=cache, length=L, depth=d, index=i), "kind": "niah",
                               "cache": cache, "task": "niah", "length": L, "depth": d, "index": i, "corpus": "noise",
                               "score": score, "kv_bytes_per_token": bpt, **base})
        for task, score in (("niah_single_1", 1.0), ("vt", 0.4)):
            res.write({"key": record_key(kind="ruler", cache=cache, task=task), "kind": "ruler", "cache": cache,
                       "task": task, "length": 4096, "index": 0, "corpus": "noise", "score": score,
                       "kv_bytes_per_token": bpt, **base})
        for w, nll in ((0, 2.0), (5, 2.2)):
            res.write({"key": record_key(kind="ppl", cache=cache, window=w), "kind": "ppl", "cache": cache,
                       "corpus": "words", "length": 8192, "window": w, "nll": nll * 8191 * (1.02 if cache == "kv4" else 1),
                       "tokens": 8191, "kv_bytes_per_token": bpt, **base})
    res.close()


def test_report_tables_plots_html(tmp_path):
    _write_fixture(tmp_path / "run")
    md, files = report.build([tmp_path / "run"], plots=tmp_path / "plots", html_out=tmp_path / "r.html")
    assert "### NIAH — m, cache `full`, corpus noise" in md and "### NIAH — m, cache `kv4`, corpus noise" in md
    assert "| 0% | 100 | 100 |" in md and "| 0% | 100 | 0 |" in md          # kv4 misses (2K, depth 0)
    assert "| m | `full` | 4K | 1 | 100.0 | 40.0 | **70.0** | 1,000 | — | — |" in md
    # one pair a task, equal: each task's variance is the pseudo-pairs' alone, 100² / 3², over 2 tasks
    assert f"| m | `kv4` | 4K | 1 | 100.0 | 40.0 | **70.0** | 280 | +0.0 ± {1.96 * (2 * 100 ** 2 / 9) ** 0.5 / 2:.1f} " \
           "| 0/0 of 2 |" in md
    # NIAH: kv4 misses both samples at (2K, depth 0): 2 of 12 paired cells, -16.7 points
    assert "Against `full` on the same prompts: -16.7 ± " in md and "cells won/lost 0/2 of 12." in md
    assert "qa_1" in md and "SQuAD" in md                                  # says what is left out and why
    ppl_full = f"{__import__('math').exp(2.1):.3f}"
    assert f"| m | words | 8K | `full` | 2 | {ppl_full} | 1.0000 | 1,000 |" in md
    assert re.search(r"\| m \| words \| 8K \| `kv4` \| 2 \| [\d.]+ \| 1\.0\d+ \| 280 \|", md)
    pngs = [f for f in files if f.suffix == ".png"]
    assert {p.name for p in pngs} == {"niah_m_full_noise.png", "niah_m_kv4_noise.png", "frontier_accuracy.png",
                                      "frontier_ppl.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    assert not re.search(r"src=['\"](?!data:)", page)                       # nothing to fetch: self-contained
    first = re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    assert (tmp_path / "plots" / "report.md").exists()


def test_versus_full_pairs_cells_and_stratifies_by_task():
    def rec(task, i, score, **kw):
        return {"task": task, "length": 4096, "index": i, "score": score, **kw}
    full = [rec("a", i, s) for i, s in enumerate((1, 1, 0, 1))] + [rec("b", i, s) for i, s in enumerate((1, 0))]
    # task a: one cell lost, one won (of 4); task b: one lost; an unpaired cell (index 9) is left out
    mine = ([rec("a", i, s) for i, s in enumerate((0, 1, 1, 1))] + [rec("b", i, s) for i, s in enumerate((0, 0))]
            + [rec("b", 9, 1)])
    v = report.versus_full(mine, full)
    assert (v["won"], v["lost"], v["cells"]) == (1, 2, 6)
    assert v["delta"] == pytest.approx((0 + -50) / 2)                 # task means 0 and -50, then over tasks
    # Agresti-Min per task: + half a pair won, half lost, one tied; n' = n + 2, variance of the mean
    # (Σd² + 100²)/n'² - (Σd)²/n'³ (task a: diffs -100, 0, 100, 0; task b: -100, 0)
    var_a = (2 * 100 ** 2 + 100 ** 2) / 6 ** 2 - 0 ** 2 / 6 ** 3
    var_b = (100 ** 2 + 100 ** 2) / 4 ** 2 - 100 ** 2 / 4 ** 3
    assert v["ci"] == pytest.approx(1.96 * (var_a + var_b) ** 0.5 / 2)
    none_differ = report.versus_full(full, full)                       # a grid with no differing cell: not ±0
    assert none_differ["delta"] == 0 and none_differ["ci"] > 10
    assert report.versus_full(mine, [rec("c", 0, 1)]) is None         # nothing pairs up
    other = [dict(r, prompt_sha="x") for r in full]                   # another prompt: not the same cell
    assert report.versus_full(mine, other) is None


def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="no results folder"):
        report.load([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results"):
        report.load([tmp_path / "empty"])
