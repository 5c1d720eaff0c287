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
    (["eval", "niah", "--rope", "yarn:factr=4"], "yarn has no parameter 'factr'"),
    (["eval", "ruler", "--rope", "bogus"], "unknown --rope method 'bogus'"),
    (["eval", "ppl", "--rope", "self-extend:group=4"], "self-extend needs window="),
    (["eval", "niah", "--rope", "yarn:factor=2", "--lengths", "8k,32k"],
     "32768 tokens is longer than smollm2-135m's window with --rope yarn:factor=2, 16384 tokens"),
    (["eval", "ruler", "--rope", "none", "--rope", "yarn:factor=4", "--lengths", "16k"],
     "window with its own RoPE (--rope none), 8192 tokens: use lengths up to 8192 or --rope yarn:factor=2"),
])
def test_bad_input_exits_2_with_one_line(run, argv, needle):
    rc, _, err = run(*argv)
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
    rc, out, _ = run("report", str(tmp_path / "run"), "--html", str(tmp_path / "page.html"))
    assert rc == 0 and "### RULER-style tasks" in out and (tmp_path / "page.html").exists()
    assert (tmp_path / "run" / "report" / "frontier_accuracy.png").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama trained (nominally) to 512 positions, loaded by longkv."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longkv.models.load import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    model = load_model(d)
    return model, model.config       # LLM.set_rope replaces model.config: each load restores the model's own


@pytest.fixture
def tiny(tiny_model, monkeypatch, capsys):
    """`longkv eval ... --model tiny` runs the tiny model with a character tokenizer."""
    import torch
    from evals_fakes import CharTokenizer

    import longkv
    from longkv.llm import LLM

    class Tok(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return super().decode(ids)

    model, config = tiny_model

    def load(name, *, rope=None, **kw):
        assert name == "tiny"
        model.config = config
        return LLM(model, Tok(), name="tiny", device=torch.device("cpu"), dtype=torch.float32,
                   rope=rope)

    monkeypatch.setattr(longkv, "load", load)

    def go(*argv):
        rc = _main()(["eval", *argv, "--model", "tiny", "--device", "cpu", "-q"])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return go


def _lines(folder):
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


def test_rope_runs_are_recorded_apart_and_resume(tiny, tmp_path):
    ropes = ["--rope", "none", "--rope", "yarn:factor=4", "--rope", "self-extend:group=4,window=64"]
    argv = ["niah", *ropes, "--cache", "full", "--cache", "kv4", "--lengths", "480", "--depths", "0.5",
            "--max-new-tokens", "3", "--corpus", "noise", "--out", str(tmp_path / "n")]
    rc, out, err = tiny(*argv)
    assert rc == 0, err
    recs = _lines(tmp_path / "n")
    assert len(recs) == 6 and len({r["key"] for r in recs}) == 6
    assert [r["rope"] for r in recs] == [None, None, "yarn:factor=4", "yarn:factor=4",
                                         "self-extend:group=4,window=64", "self-extend:group=4,window=64"]
    assert {r["config"]["rope"] for r in recs} == {None, "yarn:factor=4", "self-extend:group=4,window=64"}
    assert {r["model"] for r in recs} == {"tiny", "tiny rope=yarn:factor=4", "tiny rope=self-extend:group=4,window=64"}
    assert "tiny rope=yarn:factor=4, cache `kv4`" in out        # the printed tables keep the ropes apart
    assert tiny(*argv)[0] == 0 and len(_lines(tmp_path / "n")) == 6          # resumed: nothing run again
    # a rope stretches the window: 1000 tokens do not fit the tiny model's 512 without one
    rc, _, err = tiny("ruler", "--rope", "yarn:factor=4", "--tasks", "niah_single_1", "--lengths", "1000",
                      "--corpus", "noise", "--out", str(tmp_path / "r"))
    assert rc == 0, err
    (rec,) = _lines(tmp_path / "r")
    assert rec["rope"] == "yarn:factor=4" and rec["prompt_tokens"] > 512
    rc, _, err = tiny("ruler", "--tasks", "niah_single_1", "--lengths", "1000", "--out", str(tmp_path / "r2"))
    assert rc == 2 and "trained window of 512" in err


def test_rope_ppl_and_errors_after_loading(tiny, tmp_path):
    rc, out, err = tiny("ppl", "--rope", "yarn:factor=2", "--rope", "dynamic:factor=2", "--baseline", "full",
                        "--cache", "kv4", "--length", "600", "--windows", "1", "--chunk", "64", "--corpus", "noise",
                        "--out", str(tmp_path / "p"))
    assert rc == 0, err
    recs = _lines(tmp_path / "p")
    assert sorted((r["rope"], r["cache"]) for r in recs) == [
        ("dynamic:factor=2", "full"), ("dynamic:factor=2", "kv4"), ("yarn:factor=2", "full"), ("yarn:factor=2", "kv4")]
    assert out.count("vs full") == 1 and "1.0000" in out          # each rope's kv4 against its own full
    for argv, needle in (
            (["niah", "--rope", "self-extend:group=4,window=64", "--cache", "snapkv:ratio=0.5"],
             "does not compose with the snapkv cache"),
            (["niah", "--rope", "self-extend:group=4,window=512"], "window must be below the model's window"),
            (["niah", "--rope", "yarn:factor=2", "--lengths", "480,2000"],
             "2000 tokens is longer than tiny's window with --rope yarn:factor=2, 1024 tokens")):
        if "--lengths" not in argv:
            argv = argv + ["--lengths", "480"]
        rc, _, err = tiny(*argv, "--corpus", "noise", "--out", str(tmp_path / "e"))
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], err
