"""`longkv bench` on the real default model (CPU, short prompts): full is the baseline of every length,
the rows hold what the caches really hold, exactly --new-tokens are decoded, bad input is one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import longkv
from longkv import bench

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "longkv", "bench", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def llm():
    return longkv.load("smollm2-135m", device="cpu", progress=False)


def test_rows_against_the_full_cache(llm):
    ids = bench.prompt_ids(llm, "It was a dark and stormy night. " * 400, 600)
    assert len(ids) == 600
    rows = bench.run(llm, ["full", "kv4", "snapkv:ratio=0.5"], [300, 600], ids, new_tokens=5, chunk=256)
    assert [(r["length"], r["cache"].split(":")[0]) for r in rows] == \
        [(300, "full"), (300, "kv4"), (300, "snapkv"), (600, "full"), (600, "kv4"), (600, "snapkv")]
    full600, kv4600, snap600 = rows[3:]
    # what each cache holds, from the caches themselves (capacity = prompt + new tokens)
    want = {s: llm.new_cache(s, capacity=605) for s in ("full", "kv4")}
    assert full600["kv_MiB"] == round(want["full"].nbytes() / 2**20, 2)
    assert kv4600["kv_MiB"] == round(want["kv4"].nbytes() / 2**20, 2) < full600["kv_MiB"]
    assert full600["kv_vs_full"] == 1.0
    assert kv4600["kv_vs_full"] == round(want["kv4"].nbytes() / want["full"].nbytes(), 3)
    assert snap600["kv_vs_full"] < 0.75 and kv4600["kv_vs_full"] < 0.65   # kv4: 132 fp tokens of 605
    for r in rows:
        assert r["decode_ms"] > 0 and r["prefill_s"] > 0
        if r["cache"] != "full":
            assert r["decode_x_full"] == round(r["decode_ms"] / rows[0 if r["length"] == 300 else 3]["decode_ms"], 3)
            assert 0 <= r["same_tokens"] <= 5


def test_exactly_new_tokens_are_decoded(llm):
    """A prompt whose greedy answer stops at once still decodes every requested token when asked to."""
    short = llm.generate("Say OK.", max_new_tokens=40)
    assert short.finish_reason == "stop" and short.generated_tokens < 40
    full = llm.generate("Say OK.", max_new_tokens=40, ignore_stop=True)
    assert full.generated_tokens == 40 and full.finish_reason == "length"
    assert full.token_ids[:short.generated_tokens - 1] == short.token_ids


def test_cli_json_and_out_file(tmp_path):
    out = tmp_path / "b.json"
    r = cli("--lengths", "256", "--new-tokens", "4", "--cache", "kv4", "--device", "cpu", "--json", "-q",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d == json.loads(out.read_text())
    assert [x["cache"] for x in d["rows"]] == ["full", "kv4"] and d["model"] == "smollm2-135m"
    assert not list(tmp_path.glob(".*.tmp"))
    t = cli("--lengths", "256", "--new-tokens", "2", "--device", "cpu", "-q")
    assert t.returncode == 0 and "| 256 | full |" in t.stdout


@pytest.mark.parametrize("args,word", [(["--cache", "nope"], "nope"), (["--lengths", "10"], "lengths"),
                                       (["--new-tokens", "0"], "new-tokens"),
                                       (["--out", "/nonexistent/dir/b.json"], "out"),
                                       (["--lengths", "64k"], "window")])
def test_bad_input_is_one_line(args, word):
    r = cli("--device", "cpu", "-q", *args)
    assert r.returncode == 2, r.stderr
    assert word in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
