"""Decode and prefill speed at long context against the bandwidth floor and Hugging Face.

Llama-3-8B shape, random bf16 weights, batch 1. For each context: our chunked prefill, our decode
(static cache + CUDA graph + flash-decoding kernel), bytes one decode step must read (weights
without the embedding table, plus the KV cache), the achieved bandwidth and its ratio to the floor
(a large device-to-device copy measured in the same run); then, on the same weights, transformers'
SDPA prefill and its eager decode loop with DynamicCache. Last line: JSON.

    python benchmarks/decode.py --contexts 8k,32k,128k
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (LLAMA3_8B, copy_bandwidth, emit_json, parse_tokens, print_table, random_model, time_cuda,
                    weight_bytes_read)

from longkv.cache.full import FullCache
from longkv.engine.graph import GraphStep
from longkv.engine.prefill import prefill


def warm_up(model, chunk: int):
    """Compile and load every kernel once (torch.compile, cuDNN, Triton) outside the timings."""
    kv = FullCache(model.layer_specs(), batch=1, capacity=2 * chunk + 16, device="cuda", dtype=torch.bfloat16)
    prefill(model, kv, torch.zeros(1, 2 * chunk, dtype=torch.long, device="cuda"), chunk=chunk)
    GraphStep(model, kv, batch=1)
    torch.cuda.synchronize()


def ours(model, ctx: int, new: int, chunk: int, ids, profile=False):
    kv = FullCache(model.layer_specs(), batch=1, capacity=ctx + new + 8, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    logits = prefill(model, kv, ids, chunk=chunk)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    prefill_extra = torch.cuda.max_memory_allocated() - base  # activations beyond weights + cache
    last_logits = logits.float().clone()
    graph = GraphStep(model, kv, batch=1)
    tok = logits.argmax(-1)
    first = graph(tok, kv.length).clone()
    kv.advance(1)
    for _ in range(3):  # warm-up
        graph(tok, kv.length)
        kv.advance(1)
    steps = new - 4
    if profile:
        profile_steps(model, kv, tok)

    def step():
        graph(tok, kv.length)
        kv.advance(1)
    ms = time_cuda(step, steps)
    return dict(prefill_s=prefill_s, ms=ms, kv_bytes=kv.nbytes(), tokens=kv.length,
                prefill_extra=prefill_extra, first_logits=first, tok=tok, prefill_logits=last_logits, peak=torch.cuda.max_memory_allocated())


def profile_steps(model, kv, tok):
    """Kernel time of a few eager decode steps, by kernel (what the CUDA graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            pos = torch.tensor([kv.length], device="cuda")
            model(tok.view(1, 1), model.make_step(pos, None), kv)
            kv.advance(1)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))


def hf_run(model, cfg_dict: dict, new: int, ids, tok):
    """transformers on our weights; decode starts from *our* first token so the logits compare."""
    import transformers
    from transformers import DynamicCache

    cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(model.state_dict(), assign=True)  # shares our tensors: no second copy
    hf = hf.to(torch.bfloat16).eval()
    hf.model.rotary_emb.inv_freq = model.ropes[0].inv_freq.clone()
    hf.model.rotary_emb.original_inv_freq = hf.model.rotary_emb.inv_freq
    with torch.inference_mode():
        hf(ids[:, :1024], use_cache=True, logits_to_keep=1)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        cache = DynamicCache(config=cfg)
        out = hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        extra = torch.cuda.max_memory_allocated() - base - 2 * ids.shape[1] * cfg.num_key_value_heads * 128 * 2 * cfg.num_hidden_layers  # minus its KV
        prefill_logits = out.logits[:, -1].float().clone()
        tok = tok.view(1, 1)
        out = hf(tok, past_key_values=cache, use_cache=True)
        first = out.logits[:, -1].float().clone()
        for _ in range(3):
            hf(tok, past_key_values=cache, use_cache=True)
        ms = time_cuda(lambda: hf(tok, past_key_values=cache, use_cache=True), max(4, new // 4))
    del cache, out, hf
    return dict(prefill_s=prefill_s, ms=ms, first_logits=first, prefill_logits=prefill_logits, prefill_extra=extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8k,32k,128k")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel table of eager decode steps")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke test)")
    a = ap.parse_args()
    cfg = dict(LLAMA3_8B)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    model = random_model(cfg)
    bw = copy_bandwidth()
    wbytes = weight_bytes_read(model)
    dev = torch.cuda.get_device_name()
    print(f"# {dev}; copy bandwidth {bw / 1e12:.2f} TB/s; weights read per token {wbytes / 1e9:.2f} GB")
    warm_up(model, a.chunk)
    rows = []
    for ctx in [parse_tokens(c) for c in a.contexts.split(",")]:
        ids = torch.randint(0, cfg["vocab_size"], (1, ctx), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(ctx))
        r = ours(model, ctx, a.new_tokens, a.chunk, ids, profile=a.profile)
        kv_read = r["kv_bytes"] * (ctx / (ctx + a.new_tokens + 8))  # the slots actually read
        moved = wbytes + kv_read
        floor_ms = moved / bw * 1e3
        row = dict(context=ctx, prefill_s=round(r["prefill_s"], 2), decode_ms=round(r["ms"], 2),
                   bytes_per_token_GB=round(moved / 1e9, 2), achieved_TBps=round(moved / (r["ms"] / 1e3) / 1e12, 2),
                   floor_ms=round(floor_ms, 2), x_floor=round(r["ms"] / floor_ms, 2),
                   prefill_extra_GiB=round(r["prefill_extra"] / 2**30, 2), peak_GiB=round(r["peak"] / 2**30, 1))
        first = r.pop("first_logits")
        gc.collect()
        torch.cuda.empty_cache()
        if not a.no_hf:
            try:
                h = hf_run(model, cfg, a.new_tokens, ids, r["tok"])
                row.update(hf_prefill_s=round(h["prefill_s"], 2), hf_decode_ms=round(h["ms"], 2),
                           speedup=round(h["ms"] / r["ms"], 1),
                           hf_prefill_extra_GiB=round(h["prefill_extra"] / 2**30, 2),
                           prefill_vs_hf=round(r["prefill_s"] / h["prefill_s"], 2),
                           prefill_logits_maxdiff=round((h["prefill_logits"] - r["prefill_logits"]).abs().max().item(), 3),
                           decode_logits_maxdiff=round((h["first_logits"] - first).abs().max().item(), 3),
                           same_argmax=bool((h["first_logits"].argmax(-1) == first.argmax(-1)).all()))
            except torch.OutOfMemoryError:
                row.update(hf_decode_ms="OOM")
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print_table(rows[-1:], list(row))
    print()
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    emit_json({"bench": "decode", "device": dev, "copy_TBps": round(bw / 1e12, 3), "rows": rows})


if __name__ == "__main__":
    main()
