"""Result folders: one complete JSON line per (sample, cache), resume, Ctrl-C, torn tails, format."""
import json

import pytest

from evals_fakes import FakeLLM
from longkv.errors import UserError
from longkv.evals import runner
from longkv.evals.results import FORMAT, META, RESULTS, Results, read_folder


@pytest.fixture(autouse=True)
def any_spec(monkeypatch):
    # The fake LLM takes any cache name; the real specs are tested with the cache registry.
    monkeypatch.setattr(runner, "check_specs", lambda specs: list(dict.fromkeys(specs)))


def _niah(llm, out, **kw):
    args = dict(specs=["full", "other"], lengths=[1000, 2000], depths=[0.0, 0.5, 1.0], samples=1, seed=0,
                corpus="noise", max_new_tokens=8, out=out, progress=False)
    args.update(kw)
    return runner.run_niah(llm, **args)


def _lines(out):
    return (out / RESULTS).read_text().splitlines()


def test_records_carry_the_configuration(tmp_path):
    recs = _niah(FakeLLM(), tmp_path / "r")
    assert len(recs) == 12 and len(_lines(tmp_path / "r")) == 12
    r = json.loads(_lines(tmp_path / "r")[0])
    assert r["format"] == FORMAT and r["model"] == "fake" and r["corpus"] == "noise" and r["seed"] == 0
    assert r["config"]["depths"] == [0.0, 0.5, 1.0] and r["env"]["longkv"] and r["env"]["device"] == "cpu"
    assert "git" in r["env"] and r["prompt_tokens"] <= 1000 - 8
    full = [x for x in recs if x["cache"] == "full"]
    assert all(x["score"] == 1.0 for x in full)
    assert all(x["score"] == 0.0 for x in recs if x["cache"] == "other")
    assert full[0]["kv_bytes_per_token"] == pytest.approx(100, rel=0.05)
    assert json.loads((tmp_path / "r" / META).read_text())["format"] == FORMAT


def test_resume_skips_what_is_done(tmp_path):
    _niah(FakeLLM(), tmp_path / "r", lengths=[1000])
    llm = FakeLLM()
    recs = _niah(llm, tmp_path / "r")                  # adds the 2000-token cells only
    assert llm.calls == 6 and len(recs) == 12 and len(_lines(tmp_path / "r")) == 12


def test_ctrl_c_leaves_complete_lines_and_resumes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _niah(FakeLLM(interrupt_after=5), tmp_path / "r")
    lines = _lines(tmp_path / "r")
    assert len(lines) == 5 and all(json.loads(x) for x in lines)
    llm = FakeLLM()
    _niah(llm, tmp_path / "r")
    assert llm.calls == 7 and len(_lines(tmp_path / "r")) == 12


def test_torn_tail_is_cut(tmp_path):
    _niah(FakeLLM(), tmp_path / "r", lengths=[1000])
    with open(tmp_path / "r" / RESULTS, "a") as f:
        f.write('{"format": 1, "key": "half a li')
    assert len(read_folder(tmp_path / "r")) == 6         # the torn line is not a record
    llm = FakeLLM()
    _niah(llm, tmp_path / "r")
    assert llm.calls == 6
    assert all(json.loads(x) for x in _lines(tmp_path / "r"))


def test_incompatible_or_unusable_folders(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / META).write_text(json.dumps({"format": FORMAT + 1, "longkv": "9.9"}))
    with pytest.raises(UserError, match="format"):
        Results(old)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / RESULTS).write_text("{}\n")
    with pytest.raises(UserError, match="no meta.json"):
        Results(odd)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        Results(f)
    with pytest.raises(UserError, match="cannot create"):
        Results(f / "sub")
    with pytest.raises(UserError, match="samples"):
        _niah(FakeLLM(), tmp_path / "z", samples=0)


def test_ruler_runner_cell_order(tmp_path):
    recs = runner.run_ruler(FakeLLM(), specs=["full"], lengths=[4096], tasks=["niah_single_1", "vt"], samples=2,
                            seed=0, corpus="noise", out=tmp_path / "r", progress=False)
    assert [(r["task"], r["index"]) for r in recs] == [("niah_single_1", 0), ("vt", 0), ("niah_single_1", 1), ("vt", 1)]
    assert recs[0]["score"] == 1.0 and recs[0]["config"]["left_out"]
