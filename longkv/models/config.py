"""Model configuration: one validated dataclass read from a Hugging Face `config.json`.

The Llama family (llama, mistral, qwen2, qwen3) and Gemma 3 text differ in a handful of switches
(norm style, q/k norms, biases, sliding layers, RoPE per layer kind); they are spelled out here so
the forward code reads the same for all of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .rope import RopeParams

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GEMMA3 = ("gemma3_text", "gemma3")


@dataclass
class ModelConfig:
    arch: str                      # "llama" (whole family) or "gemma3"
    model_type: str                # as in config.json
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    attn_scale: float = 0.0        # softmax scale; 0 means head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_rope: list[int] = field(default_factory=list)        # per layer: index into `ropes`
    ropes: list[RopeParams] = field(default_factory=list)
    layer_window: list[int | None] = field(default_factory=list)  # per layer: sliding window or None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        return cls.from_hf(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type", "")
        if mt == "gemma3" and "text_config" in d:
            d = {**d["text_config"], "model_type": "gemma3_text"}
            mt = "gemma3_text"
        if mt not in LLAMA_FAMILY + GEMMA3:
            raise UserError(f"model type {mt!r} is not supported (supported: {', '.join(LLAMA_FAMILY + GEMMA3[:1])})")
        n_layers = d["num_hidden_layers"]
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        common = dict(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", mt in GEMMA3),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        types = d.get("layer_types") or []
        if mt in GEMMA3:
            return cls._gemma3(d, common, types)
        return cls._llama(d, common, types)

    @classmethod
    def _llama(cls, d: dict, common: dict, types: list[str]) -> "ModelConfig":
        mt = common["model_type"]
        n = common["num_layers"]
        rp = d.get("rope_parameters") or {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 10000.0)}
        window = d.get("sliding_window")
        if types:
            windows = [window if t == "sliding_attention" else None for t in types]
        elif mt == "mistral" and window:
            windows = [window] * n
        elif mt in ("qwen2", "qwen3") and d.get("use_sliding_window") and window:
            start = d.get("max_window_layers", n)
            windows = [window if i >= start else None for i in range(n)]
        else:
            windows = [None] * n
        bias = bool(d.get("attention_bias", mt == "qwen2"))
        return cls(
            arch="llama", **common,
            qkv_bias=bias,
            o_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            hidden_act=d.get("hidden_act", "silu"),
            ropes=[RopeParams.from_hf(rp).trained_at(_trained(d))],
            layer_rope=[0] * n,
            layer_window=windows,
        )

    @classmethod
    def _gemma3(cls, d: dict, common: dict, types: list[str]) -> "ModelConfig":
        n = common["num_layers"]
        if not types:
            pattern = d.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        rp = d.get("rope_parameters")
        if rp and "full_attention" in rp:
            full, local = RopeParams.from_hf(rp["full_attention"], 1e6), RopeParams.from_hf(rp["sliding_attention"], 1e4)
        else:  # transformers 4.x layout
            full = RopeParams.from_hf({**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 1e6)})
            local = RopeParams(theta=float(d.get("rope_local_base_freq", 1e4)))
        full, local = full.trained_at(_trained(d)), local.trained_at(_trained(d))
        sliding = [t == "sliding_attention" for t in types]
        return cls(
            arch="gemma3", **common,
            qkv_bias=bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            qk_norm=True,
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
            attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
            attn_softcap=d.get("attn_logit_softcapping"),
            final_softcap=d.get("final_logit_softcapping"),
            ropes=[full, local],
            layer_rope=[1 if s else 0 for s in sliding],
            layer_window=[d.get("sliding_window") if s else None for s in sliding],
        )


def _trained(d: dict) -> int:
    """The trained window a declared RoPE scaling stretches (Phi-3 keeps it outside rope_parameters)."""
    return int(d.get("original_max_position_embeddings") or d.get("max_position_embeddings", 4096))
