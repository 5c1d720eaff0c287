import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when kernels are decorated, so it must be set before longkv.kernels imports it:
# the kernel tests then run the Triton code on the CPU through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _tiny_gemma(tmp_path_factory, head_dim: int):
    import torch
    import transformers

    from longkv.models.load import load_model

    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                        sliding_window=8, query_pre_attn_scalar=16)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp(f"tiny_gemma{head_dim}")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return load_model(path)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny random Gemma 3: 5 sliding-window layers (window 8) and 1 global layer, GQA 4/2, head dim 16."""
    return _tiny_gemma(tmp_path_factory, 16)


@pytest.fixture(scope="module")
def tiny_gemma32(tmp_path_factory):
    """The same with head dim 32 (the packed decode kernel wants whole 32-bit words a half row)."""
    return _tiny_gemma(tmp_path_factory, 32)


def save_tiny_llama(tmp_path_factory, name: str, **cfg):
    """A random Llama (vocab 97, intermediate 64, 2 layers, seed 0; `cfg` overrides) saved as a Hugging Face
    folder; returns the folder."""
    import torch
    import transformers

    cfg = dict(vocab_size=97, intermediate_size=64, num_hidden_layers=2) | cfg
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama32(tmp_path_factory):
    """A tiny random Llama: 2 layers, GQA 4/2, head dim 32 (the packed Triton decode kernel runs, through the
    interpreter on the CPU)."""
    from longkv.models.load import load_model

    return load_model(save_tiny_llama(tmp_path_factory, "tiny_llama32", hidden_size=128, num_attention_heads=4,
                                      num_key_value_heads=2))
