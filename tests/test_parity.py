"""Our forward passes against Hugging Face transformers on the same (tiny random) weights, fp32 CPU."""
import pytest
import torch
import transformers

from longkv.cache.full import FullCache
from longkv.engine.prefill import prefill
from longkv.models.load import load_model

TOL = 1e-4
BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def configs():
    yield "llama", transformers.LlamaConfig(**BASE, tie_word_embeddings=False)
    yield "llama3-scaled", transformers.LlamaConfig(
        **BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32})
    yield "smollm2-like-tied", transformers.LlamaConfig(**BASE, tie_word_embeddings=True, head_dim=32)
    yield "mistral", transformers.MistralConfig(**BASE, sliding_window=None)
    yield "qwen2", transformers.Qwen2Config(**BASE)
    yield "qwen3", transformers.Qwen3Config(**BASE, head_dim=16)
    yield "gemma3", transformers.Gemma3TextConfig(**{**BASE, "num_hidden_layers": 6}, head_dim=16,
                                                  sliding_window=8, query_pre_attn_scalar=24,
                                                  final_logit_softcapping=30.0)


@pytest.fixture(scope="module", params=list(configs()), ids=lambda p: p[0])
def pair(request, tmp_path_factory):
    name, cfg = request.param
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm weights and biases so every parameter matters
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return hf, load_model(path)


def ours(model, ids, chunk):
    cache = FullCache(model.layer_specs(), batch=ids.shape[0], capacity=ids.shape[1], device="cpu",
                      dtype=torch.float32)
    return prefill(model, cache, ids, chunk=chunk, logits="all")


@pytest.mark.parametrize("chunk", [64, 7])
def test_logits_match_transformers(pair, chunk):
    hf, model = pair
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(model, ids, chunk)
    assert (got - ref).abs().max().item() <= TOL


def test_decode_steps_match_transformers(pair):
    """Token-by-token prefill (chunk 1) is the decode path."""
    hf, model = pair
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours(model, ids, 1) - ref).abs().max().item() <= TOL
