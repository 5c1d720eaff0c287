"""Building blocks shared by the Llama family and Gemma 3: norms, MLP, attention, the decoder stack.

Module and parameter names follow Hugging Face transformers (`model.layers.3.self_attn.q_proj`), so
a safetensors file loads with no renaming. Attention hands keys to the cache *before* RoPE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.base import Cache, LayerSpec, Step
from ..kernels import gemv as gv
from ..kernels.fused import on_cuda
from .config import ModelConfig
from .rope import Rope, apply_rope


@on_cuda
def silu_mul(g, u):
    return F.silu(g) * u


@on_cuda
def gelu_tanh_mul(g, u):
    return F.gelu(g, approximate="tanh") * u


@on_cuda
def gelu_mul(g, u):
    return F.gelu(g) * u


GATED = {"silu": silu_mul, "gelu_pytorch_tanh": gelu_tanh_mul, "gelu": gelu_mul}


@on_cuda
def rms_norm(x, w, eps: float):
    # F.rms_norm computes in fp32 and rounds once to x's dtype: HF's order (weight * normalized)
    return w * F.rms_norm(x, (x.shape[-1],), eps=eps)


@on_cuda
def add_rms_norm(x, r, w, eps: float):
    """(x + r, rms_norm(x + r)): a residual add and the next norm in one kernel at decode."""
    x = x + r
    return x, w * F.rms_norm(x, (x.shape[-1],), eps=eps)


@on_cuda
def gemma_rms_norm(x, w, eps: float):
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (xf * (1.0 + w.float())).to(x.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in fp32, cast back, then scale (weight * x). On CUDA the norm and
    the scale are one compiled kernel (two eager ones cost 4.5 µs a call at decode, 0.3 ms a token on
    the 8B shape)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scale by (1 + weight), all in fp32, then cast back."""

    def forward(self, x):
        return gemma_rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.act_mul = GATED[cfg.hidden_act]
        self.act = cfg.hidden_act
        self.gate_up = None
        self.ilv = 0

    def fuse(self, interleave: bool = False):
        """One GEMM for gate and up (half the launches at decode); the HF-named parameters become
        views of the fused weight, so state_dict() is unchanged and nothing is stored twice. `interleave` (the
        models whose decode takes `kernels.gemv`, with `gemv.ILV`): the fused rows in blocks of the gated GEMV's BN
        (`gemv.interleave`: each program reads one contiguous run); gate_proj / up_proj's weights are then
        (n / BN, BN, K) views of it."""
        self.gate_up, (self.gate_proj.weight, self.up_proj.weight) = _fuse(self.gate_proj, self.up_proj)
        self.gate_up_b = _fuse_bias(self.gate_proj, self.up_proj)
        n, k = self.gate_proj.weight.shape
        bn = gv.config(n, k, True)[0] if interleave and gv.ILV else 0
        if bn and n % bn == 0:
            self.ilv, self.gate_up = bn, gv.interleave(self.gate_up, bn)
            v = self.gate_up.view(n // bn, 2, bn, k)
            self.gate_proj.weight = nn.Parameter(v[:, 0], requires_grad=False)
            self.up_proj.weight = nn.Parameter(v[:, 1], requires_grad=False)

    def forward(self, x):
        if self.gate_up is None:
            return self.down_proj(self.act_mul(self.gate_proj(x), self.up_proj(x)))
        if self.ilv:
            g, u = gv.deinterleave(F.linear(x, self.gate_up), self.ilv)
            if self.gate_up_b is not None:
                g, u = g + self.gate_proj.bias, u + self.up_proj.bias
        else:
            g, u = F.linear(x, self.gate_up, self.gate_up_b).chunk(2, dim=-1)
        return self.down_proj(self.act_mul(g, u))

    def forward_gemv(self, x, norm: RMSNorm):
        """x + down(act(gate(n)) * up(n)), n = norm(x), in two GEMV launches (one token, fused weights)."""
        h = gv.gemv(x, self.gate_up, self.gate_up_b, norm=norm.weight, eps=norm.eps, act=self.act, ilv=self.ilv)
        return gv.gemv(h, self.down_proj.weight, self.down_proj.bias, res=x)


def _fuse(*linears):
    w = torch.cat([m.weight.detach() for m in linears])
    views, o = [], 0
    for m in linears:
        views.append(nn.Parameter(w[o:o + m.weight.shape[0]], requires_grad=False))
        o += m.weight.shape[0]
    return w, views


def _fuse_bias(*linears):
    if linears[0].bias is None:
        return None
    b = torch.cat([m.bias.detach() for m in linears])
    o = 0
    for m in linears:
        n = m.bias.shape[0]
        m.bias = nn.Parameter(b[o:o + n], requires_grad=False)
        o += n
    return b


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, norm_cls=RMSNorm):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_index = cfg.layer_rope[layer]
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.hq * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = norm_cls(self.d, cfg.rms_norm_eps)
            self.k_norm = norm_cls(self.d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.qkv = None

    def fuse(self):
        self.qkv, (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight) = _fuse(
            self.q_proj, self.k_proj, self.v_proj)
        self.qkv_b = _fuse_bias(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, step: Step, cache: Cache, norm: RMSNorm | None = None):
        """Attention of x's tokens; with `norm` (one token, fused weights: `gemv.enabled`) x is the residual
        stream, normed inside the qkv GEMV, and the result is x + o_proj(...), the residual add inside o_proj's."""
        B, T, _ = x.shape
        sizes = [self.hq * self.d, self.hkv * self.d, self.hkv * self.d]
        if norm is not None:
            q, k, v = gv.gemv(x, self.qkv, self.qkv_b, norm=norm.weight, eps=norm.eps).split(sizes, -1)
        elif self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = F.linear(x, self.qkv, self.qkv_b).split(sizes, -1)
        q = q.view(B, T, self.hq, self.d)
        k = k.view(B, T, self.hkv, self.d)
        v = v.reshape(B, T, self.hkv, self.d).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = step.rope[self.rope_index]
        out = cache.attend(self.layer, apply_rope(q, cos, sin), k, v, step=step)
        out = out.transpose(1, 2).reshape(B, T, self.hq * self.d)
        if norm is not None:
            return gv.gemv(out, self.o_proj.weight, self.o_proj.bias, res=x)
        return self.o_proj(out)


class Backbone(nn.Module):
    """`model.*` in Hugging Face naming: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, block_cls, norm_cls):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([block_cls(cfg, i) for i in range(cfg.num_layers)])
        self.norm = norm_cls(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only LM whose attention goes through a `Cache`.

    forward(ids (B, T), step, cache, logits="last"|"all") → fp32 logits (B, 1 or T, V).
    """

    block_cls: type
    norm_cls: type = RMSNorm

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, self.block_cls, self.norm_cls)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ropes = [Rope(p, cfg.head_dim) for p in cfg.ropes]

    def fuse(self):
        """Fuse q/k/v and gate/up weights (after the weights are on their device; see MLP.fuse)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse(interleave=self.norm_cls is RMSNorm)   # (Gemma's MLP keeps the torch path: no GEMV)
        return self

    def tie(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def layer_specs(self) -> list[LayerSpec]:
        c = self.config
        return [LayerSpec(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                          scale=c.scale, rope=self.ropes[c.layer_rope[i]], rope_index=c.layer_rope[i],
                          window=c.layer_window[i], softcap=c.attn_softcap)
                for i in range(c.num_layers)]

    def make_step(self, pos: torch.Tensor, start: int | None) -> Step:
        dtype = self.lm_head.weight.dtype
        return Step(pos=pos, start=start, rope=[r.cos_sin(pos, dtype) for r in self.ropes])

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def head(self, h):
        return self.lm_head(h).float()

    def forward(self, ids: torch.Tensor, step: Step, cache: Cache, logits: str = "last"):
        h = self.embed(ids)
        for layer in self.model.layers:
            h = layer(h, step, cache)
        if step.start is not None:
            cache.advance(step.n)
        if logits == "last":
            h = h[:, -1:]
        if self.gemv_ok(h):
            n = self.model.norm
            return gv.gemv(h, self.lm_head.weight, norm=n.weight, eps=n.eps, out_dtype=torch.float32)
        return self.head(self.model.norm(h))

    def gemv_ok(self, x) -> bool:
        """Decode of one token through `kernels.gemv` with its norm / activation / residual fusions: Llama-form
        norms (weight * x) and fused weights only (Gemma's (1 + w) norms and head softcap keep the torch path)."""
        return self.norm_cls is RMSNorm and self.model.layers[0].self_attn.qkv is not None and gv.enabled(x)

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        dev = self.lm_head.weight.device
        for r in self.ropes:
            r.to(dev)
        return out
