"""The Llama family: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (q/k RMSNorm), SmolLM2.

Pre-norm residual blocks: x + attn(norm(x)), then x + mlp(norm(x)); SiLU-gated MLP. The switches
between family members live in `ModelConfig`.
"""
from __future__ import annotations

from torch import nn

from ..kernels import gemv as gv
from .layers import MLP, Attention, CausalLM, RMSNorm, add_rms_norm


class LlamaBlock(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, step, cache):
        if gv.enabled(x) and self.self_attn.qkv is not None:   # one token: 4 GEMV launches, norms and adds inside
            x = self.self_attn(x, step, cache, norm=self.input_layernorm)
            return self.mlp.forward_gemv(x, self.post_attention_layernorm)
        n = self.post_attention_layernorm    # its residual add and the norm: one kernel on CUDA
        x, h = add_rms_norm(x, self.self_attn(self.input_layernorm(x), step, cache), n.weight, n.eps)
        return x + self.mlp(h)


class LlamaForCausalLM(CausalLM):
    block_cls = LlamaBlock
