"""Perplexity fed in chunks through the cache equals a direct full-sequence computation (transformers)."""
import math

import pytest
import torch

from longkv.errors import UserError
from longkv.evals import perplexity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longkv.models.load import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(d)
    return hf, load_model(d)


def _cache(model, n):
    from longkv.cache.spec import parse

    return parse("full").build(model.layer_specs(), batch=1, capacity=n, device=torch.device("cpu"),
                               dtype=torch.float32)


@pytest.mark.parametrize("chunk", [1, 7, 40, 64])
def test_chunked_nll_equals_direct(tiny, chunk):
    hf, model = tiny
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    nll = perplexity.window_nll(model, _cache(model, 40), ids, chunk=chunk)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * 39      # mean over 39 targets
    assert nll == pytest.approx(ref, rel=1e-4)


def test_windows_and_summary():
    ids = list(range(100))
    w = perplexity.windows(ids, 10, bos=None, limit=None)
    assert len(w) == 10 and w[3] == (3, list(range(30, 40)))
    wb = perplexity.windows(ids, 10, bos=-1, limit=None)
    assert wb[0][1] == [-1] + list(range(9)) and len(wb) == 11
    spread = perplexity.windows(ids, 10, bos=None, limit=3)
    assert [i for i, _ in spread] == [0, 4, 9]                   # spread over the corpus, not the first 3
    with pytest.raises(UserError):
        perplexity.windows(ids[:5], 10, bos=None, limit=None)
    s = perplexity.summarize([(2.0, 10), (4.0, 10)])
    assert s["ppl"] == pytest.approx(math.exp(0.3)) == s["ppl_token_weighted"]
    assert s["windows"] == 2 and s["tokens"] == 20


def test_run_ppl_records_and_resume(tiny, tmp_path):
    from evals_fakes import CharTokenizer
    from longkv.evals import runner
    from longkv.evals.results import RESULTS
    from longkv.llm import LLM

    _, model = tiny
    tok = CharTokenizer()
    tok.encode = lambda text, add_special_tokens=True: ([1] if add_special_tokens else []) + [ord(c) % 97 for c in text]
    llm = LLM(model, tok, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    recs = runner.run_ppl(llm, specs=["full"], length=64, corpus="noise", windows=2, chunk=16, out=tmp_path,
                          progress=False)
    assert len(recs) == 2 and recs[0]["config"]["bos"] == 1 and recs[0]["tokens"] == 63
    assert recs[0]["ppl_window"] == pytest.approx(math.exp(recs[0]["nll"] / 63))
    assert recs[0]["kv_bytes"] == recs[0]["kv_bytes_full"] > 0
    again = runner.run_ppl(llm, specs=["full"], length=64, corpus="noise", windows=2, chunk=16, out=tmp_path,
                           progress=False)
    assert [r["key"] for r in again] == [r["key"] for r in recs]
    assert len((tmp_path / RESULTS).read_text().splitlines()) == 2
