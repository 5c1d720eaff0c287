"""Gemma 3 text (Gemma Team 2025): interleaved sliding-window (local) and global layers, each kind
with its own RoPE base; (1 + w) RMSNorms before and after both attention and MLP ("sandwich");
q/k RMSNorm; embeddings scaled by sqrt(hidden); softmax scale query_pre_attn_scalar ** -0.5;
optional tanh softcaps on attention logits and final logits; GELU(tanh)-gated MLP.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import MLP, Attention, CausalLM, GemmaRMSNorm


class Gemma3Block(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        eps, h = cfg.rms_norm_eps, cfg.hidden_size
        self.self_attn = Attention(cfg, layer, norm_cls=GemmaRMSNorm)
        self.mlp = MLP(cfg)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, step, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), step, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(CausalLM):
    block_cls = Gemma3Block
    norm_cls = GemmaRMSNorm

    def embed(self, ids):
        w = self.model.embed_tokens.weight
        # HF multiplies by sqrt(hidden) held as a tensor in the weights' dtype
        return self.model.embed_tokens(ids) * torch.tensor(self.config.hidden_size ** 0.5, dtype=w.dtype)

    def head(self, h):
        logits = self.lm_head(h).float()
        cap = self.config.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap
