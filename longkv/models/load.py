"""Build a model from a folder with `config.json` and `*.safetensors` (Hugging Face layout)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .config import ModelConfig
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM


def model_class(cfg: ModelConfig):
    return Gemma3ForCausalLM if cfg.arch == "gemma3" else LlamaForCausalLM


def build(cfg: ModelConfig, *, device="cpu", dtype=torch.float32):
    """A model with uninitialised weights (random-weight benchmarks fill them)."""
    with torch.device("meta"):
        m = model_class(cfg)(cfg)
    m = m.to_empty(device=device).to(dtype)
    m.tie()
    return m.fuse().eval()


def load_model(folder: Path, *, device="cpu", dtype=torch.float32):
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = ModelConfig.from_file(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {folder}")
    with torch.device("meta"):
        m = model_class(cfg)(cfg)
    state = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    state = {(k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
             for k, v in state.items()}
    state = {("model." + k[len("language_model.model."):] if k.startswith("language_model.model.") else k): v
             for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = m.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"weights in {folder} do not match a {cfg.model_type} model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    m.tie()
    return m.to(device).fuse().eval()
