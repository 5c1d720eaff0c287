"""transformers' own quantized KV cache (QuantizedCache, optimum-quanto backend) next to its DynamicCache,
decode ms/token on a Llama-3-8B-shaped model with random bf16 weights: the "every quantized cache people
use unpacks before attention" comparison of issue 4, measured rather than asserted.

    python benchmarks/peers/hf_quantized_cache.py --contexts 32k --caches dynamic,quanto4,quanto2

The cache is filled by a chunked prefill of random token ids through the cache's own update path (the
quantized cache quantizes as it goes, keeping its 128-token residual in bf16, transformers' defaults:
per-channel keys and values in 64-element groups, MaxOptimizer), then `--new-tokens` greedy steps are
timed one by one with CUDA synchronisation (the eager Hugging Face loop, as users run it). Prints a
table and ends with one JSON line. Needs `optimum-quanto` (>= 0.2.5; a carried wheel on the GPU
machine). On CUDA its bit unpacking runs quanto's own pure-torch kernel by default (`--unpack ext`
JIT-compiles its CUDA extension instead, which needs nvcc); `--smoke` runs a tiny config on CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import LLAMA3_8B, parse_tokens, print_table  # noqa: E402


def make_cache(kind: str, cfg):
    from transformers import DynamicCache, QuantizedCache

    if kind == "dynamic":
        return DynamicCache(config=cfg)
    if kind.startswith("quanto"):
        return QuantizedCache("quanto", cfg, nbits=int(kind[len("quanto"):]))
    raise SystemExit(f"unknown cache {kind!r}: dynamic, quanto4 or quanto2")


def _unpack_py(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's pure-torch `unpack` (optimum/quanto/library/unpack.py), restated: on torch 2.11 its
    `torch.library.impl` decorator returns None, so the function cannot be imported and called."""
    per = 8 // bits
    return torch.cat([(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(per)]).to(torch.uint8)


def use_python_unpack() -> None:
    """Route quanto's CUDA `unpack` to the pure-torch kernel: the CUDA one is a JIT-compiled
    extension (marlin, AWQ, ...) that needs nvcc and minutes of build."""
    from types import SimpleNamespace

    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if is_extension_available("quanto_cuda"):
        get_extension("quanto_cuda")._lib = SimpleNamespace(unpack=_unpack_py)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run(model, cfg, kind: str, ctx: int, a, dev) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = make_cache(kind, cfg)
    t0 = time.perf_counter()
    for s in range(0, ctx, a.chunk):
        out = model(input_ids=ids[:, s:s + a.chunk], past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(s, min(ctx, s + a.chunk), device=dev), logits_to_keep=1)
    sync(dev)
    prefill_s = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(a.new_tokens):
        sync(dev)
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                    cache_position=torch.tensor([ctx + i], device=dev))
        tok = out.logits[:, -1:].argmax(-1)
        sync(dev)
        times.append(time.perf_counter() - t)
    steady = times[2:] if len(times) > 4 else times
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return {"cache": kind, "context": ctx, "prefill_s": round(prefill_s, 2),
            "ms_per_token": round(1e3 * statistics.median(steady), 2), "peak_GiB": round(peak, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32k")
    ap.add_argument("--caches", default="dynamic,quanto4,quanto2")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--unpack", choices=("py", "ext"), default="py",
                    help="quanto's unpack on CUDA: its pure-torch kernel (default) or its compiled extension")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (plumbing check)")
    a = ap.parse_args()
    import transformers

    shape = dict(LLAMA3_8B)
    if a.smoke:
        a.device, a.contexts, a.new_tokens, a.chunk = "cpu", "300", 4, 128
        shape.update(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    dev = torch.device(a.device)
    if dev.type == "cuda" and a.unpack == "py" and any(c.startswith("quanto") for c in a.caches.split(",")):
        use_python_unpack()
    cfg = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    rows = []
    for ctx in [parse_tokens(x) for x in a.contexts.split(",")]:
        for kind in a.caches.split(","):
            try:
                rows.append(run(model, cfg, kind, ctx, a, dev))
            except Exception as e:  # noqa: BLE001 (a peer's failure is a result: report it, go on)
                rows.append({"cache": kind, "context": ctx, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    base = {r["context"]: r["ms_per_token"] for r in rows if r["cache"] == "dynamic" and "ms_per_token" in r}
    for r in rows:
        if "ms_per_token" in r and r["context"] in base:
            r["vs_dynamic"] = round(r["ms_per_token"] / base[r["context"]], 2)
    print(f"\ntransformers {transformers.__version__} on "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, Llama-3-8B shape, batch 1")
    print_table(rows, ["cache", "context", "prefill_s", "ms_per_token", "vs_dynamic", "peak_GiB", "error"])
    print(json.dumps({"benchmark": "hf_quantized_cache", "transformers": transformers.__version__,
                      "unpack": a.unpack,
                      "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "rows": rows}))


if __name__ == "__main__":
    main()
