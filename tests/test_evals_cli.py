"""`longkv eval ...` / `longkv report`: bad input exits 2 with one line, before any model loads."""
import json

import pytest


def _main():
    from longkv import cli

    return cli.main


@pytest.fixture
def run(capsys, monkeypatch):
    import longkv

    def boom(*a, **k):                      # bad input must fail before the model is loaded
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(longkv, "load", boom)

    def go(*argv):
        rc = _main()(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err
    return go


@pytest.mark.parametrize("argv, needle", [
    (["eval", "ruler", "--tasks", "niah_single_1,bogus"], "unknown RULER task 'bogus'"),
    (["eval", "ruler", "--tasks", "qa_2"], "HotpotQA"),
    (["eval", "niah", "--lengths", "1k,16k"], "longer than smollm2-135m's trained window of 8192"),
    (["eval", "niah", "--samples", "0"], "--samples must be at least 1"),
    (["eval", "ruler", "--samples", "-1"], "--samples must be at least 1"),
    (["eval", "niah", "--depths", "0:1:0"], "--depths"),
    (["eval", "niah", "--cache", "full", "--cache", "nosuch"], "unknown cache method 'nosuch'"),
    (["eval", "niah", "--corpus", "nosuch"], "unknown corpus 'nosuch'"),
    (["eval", "ppl", "--windows", "0"], "--windows must be at least 1"),
    (["eval", "ppl", "--length", "4k,8k"], "one length"),
    (["eval"], "usage: longkv eval"),
])
def test_bad_input_exits_2_with_one_line(run, argv, needle):
    rc, out, err = run(*argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longkv: error: ") and needle in lines[0], err


def test_unwritable_and_incompatible_out(run, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run("eval", "niah", "--out", str(f / "sub"))
    assert rc == 2 and "cannot create --out folder" in err and len(err.strip().splitlines()) == 1
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format": 999, "longkv": "9.0"}))
    rc, _, err = run("eval", "ruler", "--out", str(old))
    assert rc == 2 and "format 999" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run("report", str(tmp_path / "nothing"))
    assert rc == 2 and "no results folder" in err


def test_corpora_listing(run):
    for argv in (["eval", "corpora"], ["eval", "--corpus"]):
        rc, out, _ = run(*argv)
        assert rc == 0 and "noise" in out and "words" in out and "--corpus auto` uses" in out


def test_report_command(run, tmp_path):
    from test_evals_report import _write_fixture

    _write_fixture(tmp_path / "run")
    rc, out, err = run("report", str(tmp_path / "run"), "--html", str(tmp_path / "page.html"))
    assert rc == 0 and "### RULER-style tasks" in out and (tmp_path / "page.html").exists()
    assert (tmp_path / "run" / "report" / "frontier_accuracy.png").exists()
