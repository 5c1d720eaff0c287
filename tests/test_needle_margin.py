"""benchmarks/needle_margin.py on the real default model (CPU, 1K): one prefill serves every budget, so with
nothing packed (a full-precision window longer than the prompt) every budget's margins are full's."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the CPU's torch paths, as a user runs it


def test_margins_equal_full_when_nothing_is_packed():
    r = subprocess.run([sys.executable, "needle_margin.py", "--model", "smollm2-135m", "--length", "1k",
                        "--depth", "0.5", "--spec", "kv4:window=2048+quest:groups=1", "--ratios", "0.5,0.875"],
                       cwd=ROOT / "benchmarks", env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bench"] == "needle_margin" and set(out["budgets"]) == {"2x", "8x", "all"}
    assert out["budgets"]["8x"] <= out["budgets"]["2x"] <= out["budgets"]["all"]
    assert len(out["rows"]) >= 9                                   # ':', '\n' and 7 digits
    for row in out["rows"]:
        assert row["2x"] == row["8x"] == row["all"] == row["full"], row
