"""The real default model through the whole harness (slow on CPU: run with `make test-slow`)."""
import pytest


@pytest.mark.slow
def test_smollm2_finds_a_needle_at_1k(tmp_path):
    import longkv
    from longkv.evals.runner import run_niah

    llm = longkv.load("smollm2-135m", device="cpu", progress=False)
    recs = run_niah(llm, specs=["full"], lengths=[1024], depths=[0.5], samples=1, seed=0, corpus="noise",
                    out=tmp_path, progress=False)
    assert recs[0]["score"] == 1.0 and recs[0]["prompt_tokens"] <= 1024 - 32
