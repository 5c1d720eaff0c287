"""Shared pieces of the GPU benchmarks: model shapes with random weights, the bandwidth floor,
timing with CUDA events. Benchmarks print a table and end with one JSON line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longkv.models.config import ModelConfig  # noqa: E402
from longkv.models.load import build  # noqa: E402

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=1 << 20, rms_norm_eps=1e-5, rope_theta=500000.0,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


# Gemma 3: five sliding-window layers (local RoPE) to one global layer. 270m: the real model's text config;
# 4b: the 4B model's published text config (the KV of 34 layers, 4 KV heads of 256, a 1024-token window).
_GEMMA3 = dict(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, head_dim=256,
               query_pre_attn_scalar=256, max_position_embeddings=1 << 20, tie_word_embeddings=True,
               bos_token_id=2, eos_token_id=1, pad_token_id=0,
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
GEMMA3_270M = dict(_GEMMA3, vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, sliding_window=512,
                   layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)
GEMMA3_4B = dict(_GEMMA3, vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
                 layer_types=[("full_attention" if i % 6 == 5 else "sliding_attention") for i in range(34)])
SHAPES = {"llama3-8b": LLAMA3_8B, "gemma3-270m": GEMMA3_270M, "gemma3-4b": GEMMA3_4B}


def parse_tokens(s: str) -> int:
    """'32k' -> 32768, '1m' -> 1048576, '300' -> 300."""
    s = s.strip().lower()
    mult = {"k": 1024, "m": 1 << 20}.get(s[-1])
    return int(float(s[:-1]) * mult) if mult else int(s)


def random_model(hf_config: dict, *, device="cuda", dtype=torch.bfloat16, seed=0, weight_sets=None):
    """Our model at a real shape with random weights (N(0, 0.02) matrices, unit norms).

    `weight_sets=N` (< the layers): only layers 0..N-1 own weights; layer i reads layer i % N's tensors, so
    the model holds N layers' weights, not all of them. A decode step still reads every layer's weights
    from memory: layer i's reappear N layers later, after N layers' weights and KV have passed through a
    50 MB L2. This is how the full 32-layer 8B shape with a 512K bf16 cache (64 GiB) fits an 80 GB card."""
    cfg = ModelConfig.from_hf(hf_config)
    model = build(cfg, device=device, dtype=dtype)
    layers = model.model.layers
    n = len(layers) if weight_sets is None else weight_sets
    if not 0 < n <= len(layers):
        raise ValueError(f"weight_sets={weight_sets}: must be in 1..{len(layers)} (the layers)")
    for i in range(n, len(layers)):
        _share(layers[i], layers[i % n])
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():   # (shared tensors are listed once)
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def _share(dst: torch.nn.Module, src: torch.nn.Module):
    """`dst` (a decoder layer) reads `src`'s weight tensors: parameters and the fused q/k/v, gate/up tensors
    (plain tensor attributes); its own are dropped."""
    for name, m in dst.named_modules():
        s = src.get_submodule(name)
        for k in list(m._parameters):
            m._parameters[k] = s._parameters[k]
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor):
                setattr(m, k, getattr(s, k))


def weight_bytes_read(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table."""
    emb = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.lm_head.weight.data_ptr() == emb.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (the decode floor's speed)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ms = time_cuda(lambda: b.copy_(a), reps)
    del a, b
    return 2 * nbytes / (ms / 1e3)


def time_cuda(fn, reps: int) -> float:
    """Mean milliseconds per call, measured with CUDA events over `reps` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def timed(fn, reps: int, dev) -> float:
    """Mean ms per call (CUDA events on a GPU, wall clock on the CPU)."""
    if dev.type == "cuda":
        return time_cuda(fn, reps)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def graph_time(fn, reps: int, dev) -> float:
    """ms per call of `fn`, captured in a CUDA graph on CUDA (after two warm-up calls; the kernels' time,
    not Python's launch overhead), eager on CPU."""
    fn()
    fn()
    if dev.type == "cuda":
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return timed(fn, reps, dev)


def kernel_profile(fn, reps: int = 5, top: int | None = 16) -> tuple[float, list[tuple[str, float, float]]]:
    """What the GPU runs in one call of `fn` (a graph replay or eager code), from torch.profiler:
    (kernel µs a call in all, [(kernel name, µs a call, launches a call)] for the `top` costliest, or
    all of them for top=None).
    Step time minus the kernel sum is what the launches' gaps cost."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            t = by.setdefault(e.name[:90], [0.0, 0])
            t[0] += e.device_time / reps
            t[1] += 1 / reps
    rows = sorted(((n, round(t, 2), round(c, 2)) for n, (t, c) in by.items()), key=lambda r: -r[1])
    return round(sum(r[1] for r in rows), 1), rows[:top]


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def emit_json(obj) -> None:
    print(json.dumps(obj))
