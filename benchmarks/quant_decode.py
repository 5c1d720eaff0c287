"""Decode speed and memory of quantized KV caches (kv4, kv2) against our bf16 full cache, same run.

(`kv4` and `kv2` are KIVI's post-RoPE layout since 2026-12-06; KVQuant's pre-RoPE 4-bit cache is quant:bits=4.)

Llama-3-8B shape, random bf16 weights, batch 1. For every context and cache the cache is filled
through its own `append` path with random keys and values (a real prefill of 512K-1M tokens takes
longer than one device call; the decode step reads the same bytes either way), then the one-token
decode step (CUDA graph: projections, cache write + group flush, packed attention, head) is timed.
Also timed alone: layer 0's attention kernel, reported in TB/s of the bytes it must read (packed codes,
scales, zeros, outliers and the fp sink/window for the quantized caches; K and V for bf16).
A check compares the packed kernel with the plain-torch reference on the GPU first.

    python benchmarks/quant_decode.py --contexts 32k,128k,512k --caches full,kivi4,kivi2 --million
    python benchmarks/quant_decode.py --shape gemma3-4b --contexts 32k,128k --caches "full;kv4;quant:bits=4"
    python benchmarks/quant_decode.py --contexts 128k --caches "full;kivi4" --profile   # + each step's kernels
    python benchmarks/quant_decode.py --device cpu --smoke          # tiny shapes, checks it runs

Last line: JSON.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (LLAMA3_8B, SHAPES, copy_bandwidth, emit_json, graph_time, kernel_profile, parse_tokens, print_table,
                    random_model, timed, weight_bytes_read)

from longkv.cache import spec as cache_spec
from longkv.kernels import quant as qk
from longkv.kernels import quant_reference as ref
from longkv.kernels.decode import decode_attention

SMOKE = dict(LLAMA3_8B, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def fill(model, kv, ctx: int, chunk: int, dev, seed: int = 0):
    """Append `ctx` random pre-RoPE keys/values to every layer through the cache's own append path."""
    g = torch.Generator(device=dev).manual_seed(seed)
    specs = model.layer_specs()
    for s in range(0, ctx, chunk):
        n = min(chunk, ctx - s)
        step = model.make_step(torch.arange(s, s + n, device=dev), s)
        for i, sp in enumerate(specs):
            shape = (kv.batch, sp.num_kv_heads, n, sp.head_dim)
            k = torch.randn(shape, generator=g, device=dev, dtype=kv.dtype)
            v = torch.randn(shape, generator=g, device=dev, dtype=kv.dtype)
            kv.append(i, k, v, step)
        kv.advance(n)


def global_layer(kv) -> int:
    """The first layer without a sliding window (the one whose whole context is read)."""
    return next(i for i, s in enumerate(kv.specs) if s.window is None)


def attention_bytes(kv, ctx: int) -> int:
    """Bytes the first global layer's decode attention must read at `ctx` tokens."""
    i = global_layer(kv)
    if not hasattr(kv, "kq"):
        return 2 * kv.k[i][:, :, :ctx].numel() * kv.k[i].element_size()
    n = kv.n_quantized(ctx)
    tot = kv.kf[i].numel() * kv.kf[i].element_size() * 2   # fp sink + ring (read in full)
    for d in (kv.kq[i], kv.vq[i]):
        for key, t in d.items():
            for x in (t if key == "planes" else [t]):
                per = x.numel() * x.element_size() / x.shape[2]
                rows = n // kv.group if (key in ("scale", "zero", "grid") and d is kv.kq[i] and kv.per_channel) else n
                tot += per * rows
    return int(tot)


def attention_alone(model, kv, ctx: int, dev, reps: int) -> float:
    i = global_layer(kv)
    sp = model.layer_specs()[i]
    q = torch.randn(kv.batch, sp.num_heads, 1, sp.head_dim, device=dev, dtype=kv.dtype)
    length = torch.tensor([ctx], device=dev)
    if hasattr(kv, "kq"):
        kw = kv.kernel_kwargs(i)
        fn = lambda: qk.quant_decode_attention(q, kv.kq[i], kv.vq[i], kv.kf[i], kv.vf[i], length, **kw)
    else:
        fn = lambda: decode_attention(q, kv.k[i], kv.v[i], length, scale=sp.scale)
    return graph_time(fn, reps, dev)


def check(model, dev) -> dict:
    """Packed kernel vs the torch reference on this device at an odd length: max abs difference per
    path (pre-RoPE keys with outliers, pre-RoPE keys with pair-order values, the post-RoPE fast path at
    4 and 2 bits, and the fp16 form of the fast path)."""
    half = dev.type == "cuda"
    out = {}
    for spec, dtype in (("quant:bits=4,outliers=0.01", torch.bfloat16), ("quant:bits=4", torch.bfloat16),
                        ("kv4", torch.bfloat16),
                        ("kivi2", torch.bfloat16), ("kivi4", torch.float16), ("kv2:kstat=8", torch.bfloat16)):
        dtype = dtype if half else torch.float32
        kv = cache_spec.parse(spec).build(model.layer_specs(), batch=1, capacity=5000, device=dev, dtype=dtype)
        fill(model, kv, 4321, 1024, dev, seed=1)
        i = global_layer(kv)
        sp = model.layer_specs()[i]
        q = torch.randn(1, sp.num_heads, 1, sp.head_dim, device=dev, dtype=kv.dtype)
        kw = kv.kernel_kwargs(i)
        got = qk.quant_decode_attention(q, kv.kq[i], kv.vq[i], kv.kf[i], kv.vf[i], torch.tensor([4321], device=dev),
                                        **kw)
        want = ref.quant_decode_attention(q, kv.kq[i], kv.vq[i], kv.kf[i], kv.vf[i], 4321, **kw)
        out[f"{spec}/{str(dtype)[6:]}"] = round((got.float() - want.float()).abs().max().item(), 5)
    return out


def run(model, spec: str, ctx: int, a, dev, dtype) -> dict:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cap = ctx + a.new_tokens + 8
    try:
        kv = cache_spec.parse(spec).build(model.layer_specs(), batch=1, capacity=cap, device=dev, dtype=dtype)
        t0 = time.perf_counter()
        fill(model, kv, ctx, a.fill_chunk, dev)
        sync(dev)
        fill_s = time.perf_counter() - t0
        tok = torch.zeros(1, dtype=torch.long, device=dev)
        if dev.type == "cuda":
            from longkv.engine.graph import GraphStep
            graph = GraphStep(model, kv, batch=1)

            def step():
                graph(tok, kv.length)
                kv.advance(1)
        else:
            def step():
                with torch.inference_mode():
                    model(tok.view(1, 1), model.make_step(torch.tensor([kv.length]), None), kv)
                kv.advance(1)
        for _ in range(3):
            step()
        ms = timed(step, a.new_tokens - 4, dev)
        prof = None
        if a.profile and dev.type == "cuda":
            busy, kernels = kernel_profile(step, top=None)
            prof = dict(kernel_us=busy, gaps_us=round(ms * 1e3 - busy, 1))
            print(f"# {spec} {ctx}: step {ms * 1e3:.1f} us, kernels {busy} us, gaps {prof['gaps_us']} us")
            print_table([dict(kernel=n, us=t, launches=c) for n, t, c in kernels], ["kernel", "us", "launches"])
        attn_ms = attention_alone(model, kv, kv.length, dev, a.reps)
        abytes = attention_bytes(kv, kv.length)
    except torch.OutOfMemoryError:
        return dict(cache=spec, context=ctx, decode_ms="OOM")
    row = dict(cache=spec, context=ctx, decode_ms=round(ms, 3), attn_layer_us=round(attn_ms * 1e3, 1),
               attn_TBps=round(abytes / (attn_ms / 1e3) / 1e12, 3), kv_GiB=round(kv.nbytes() / 2**30, 2),
               fill_s=round(fill_s, 1))
    if prof:
        row.update(prof)
    st = kv.stats()
    if "bits_per_element" in st:
        row.update(bits=st["bits_per_element"], quantized_bits=st["quantized_bits"])
    if dev.type == "cuda":
        row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del kv
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="32k,128k,512k")
    ap.add_argument("--caches", default="full,kv4,kv2",
                    help="comma-separated specs, or ';'-separated when a spec has parameters")
    ap.add_argument("--million", action="store_true", help="also every cache but full at 1M tokens (2^20)")
    ap.add_argument("--new-tokens", type=int, default=36)
    ap.add_argument("--reps", type=int, default=20, help="attention-alone repetitions")
    ap.add_argument("--fill-chunk", type=int, default=16384)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warps", type=int, help="packed kernel: warps per program (default: its own)")
    ap.add_argument("--maxnreg", type=int, help="packed kernel: register cap per thread")
    ap.add_argument("--prefetch", type=int, help="packed kernel: L2 prefetch distance in tiles")
    ap.add_argument("--pipe", type=int, help="packed kernel: double-buffered fast loop (1) or the plain one (0)")
    ap.add_argument("--block-n", type=int, help="packed kernel: tokens a tile (capped at the key group)")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES),
                    help="model shape (random weights); gemma3-*: 5 of every 6 layers keep a sliding window")
    ap.add_argument("--profile", action="store_true",
                    help="GPU: the kernels of one decode step (torch.profiler over graph replays), by cost")
    ap.add_argument("--smoke", action="store_true", help="tiny model and contexts (CPU check)")
    a = ap.parse_args()
    knobs = {"warps": "NUM_WARPS", "maxnreg": "MAX_REGS", "prefetch": "PREFETCH", "pipe": "PIPE", "block_n": "BLOCK_N"}
    for name, knob in knobs.items():   # launch defaults of the packed kernel, for this run
        if getattr(a, name) is not None:
            setattr(qk, knob, getattr(a, name))
    dev = torch.device(a.device)
    cfg = dict(SHAPES[a.shape])
    if a.smoke:   # the chosen shape, shrunk (Gemma 3: its first 6 layers, a 128-token window)
        cfg = dict(SMOKE) if "layer_types" not in cfg else dict(
            cfg, vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
            head_dim=64, num_hidden_layers=6, layer_types=cfg["layer_types"][:6], sliding_window=128)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.smoke:
        a.contexts, a.new_tokens, a.reps, a.fill_chunk = "300,1k", 8, 2, 256
    model = random_model(cfg, device=dev, dtype=dtype)
    head = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", shape=a.shape)
    if dev.type == "cuda":
        head.update(copy_TBps=round(copy_bandwidth() / 1e12, 3), weights_GB=round(weight_bytes_read(model) / 1e9, 2))
    head["kernel_vs_reference_maxdiff"] = check(model, dev)
    print("#", head, flush=True)
    rows = []
    caches = a.caches.split(";" if ";" in a.caches else ",")
    jobs = [(c, parse_tokens(x)) for x in a.contexts.split(",") for c in caches]
    if a.million:
        jobs += [(c, 1 << 20) for c in caches if c != "full"]
    for spec, ctx in jobs:
        rows.append(run(model, spec, ctx, a, dev, dtype))
        base = next((r for r in rows if r["cache"] == "full" and r["context"] == ctx
                     and isinstance(r["decode_ms"], float)), None)
        if base and isinstance(rows[-1]["decode_ms"], float):
            rows[-1]["x_full"] = round(rows[-1]["decode_ms"] / base["decode_ms"], 3)
        print_table(rows[-1:], list(rows[-1]))
        print(flush=True)
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    emit_json({"bench": "quant_decode", **head, "fill": "random K/V through each cache's append path",
               "rows": rows})


if __name__ == "__main__":
    main()
