"""Where an eval cell's time goes: chunked prefill, the decode graph's capture, and the decode loop.

One RULER-style cell on the GPU is a fresh cache, a chunked prefill of the prompt, a CUDA-graph capture
and ~20-30 decode steps (`LLM.stream`). This times each part on a model of the given shape with random
weights (the work does not depend on the weights), for each cache spec and prefill chunk, and reports
the GPU's kernel time beside the wall clock and the host syncs a prefill makes: a prefill whose wall
time is far above its kernel time is waiting on the host.

    python benchmarks/cell_profile.py --shape gemma3-270m --ctx 16k --chunk 1024,4096 \
        --cache full --cache 'kv4+quest:ratio=0.875,groups=1,channels=0.125,rank=max,weigh=1'

`--banded 0,1` times the prefill with sliding windows inside a chunk computed as one masked T x T product
(the way before `kernels.attention.banded_lse`) and in bands, side by side. On a machine without CUDA
only the prefill is timed (fp32).
"""
from __future__ import annotations

import argparse
import time

import torch

from common import SHAPES, emit_json, parse_tokens, print_table, random_model

from longkv.engine.decode import decode_tokens
from longkv.engine.graph import GraphStep
from longkv.engine.prefill import prefill
from longkv.engine.sampling import Sampling
from longkv.models.rope_spec import build_cache


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall(fn) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return (time.perf_counter() - t) * 1e3, out


def _profile(fn, top: int):
    """(kernel ms, host syncs, [(host op, self ms)] costliest, [(kernel, ms)] costliest) of one call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kern, host, syncs, under = {}, {}, 0, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            kern[e.name[:80]] = kern.get(e.name[:80], 0.0) + e.device_time / 1e3
        elif e.device_type == torch.autograd.DeviceType.CPU:
            host[e.name[:80]] = host.get(e.name[:80], 0.0) + e.self_cpu_time_total / 1e3
            if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense"):
                syncs += 1
                chain, p = [], e.cpu_parent     # the ops it ran under (torch's sync debug mode sees torch ops only)
                while p is not None and len(chain) < 3:
                    chain.append(p.name[:40])
                    p = p.cpu_parent
                key = f"{e.name} < {' < '.join(chain) or '(top level)'}"
                under[key] = under.get(key, 0) + 1
    best = lambda d: sorted(((n, round(t, 2)) for n, t in d.items()), key=lambda r: -r[1])[:top]  # noqa: E731
    return round(sum(kern.values()), 1), syncs, best(host), best(kern), best(under)


def _sync_sites(fn, top: int) -> list[tuple[str, int]]:
    """Where one call of `fn` makes the host wait on the GPU: torch's sync debug mode warns at each
    synchronizing op; the innermost longkv frame of each warning is counted."""
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "longkv" in f.filename or "benchmarks" in f.filename]
        where = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else filename
        sites[where] = sites.get(where, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    return sorted(sites.items(), key=lambda r: -r[1])[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma3-270m", choices=sorted(SHAPES))
    ap.add_argument("--ctx", default="16k")
    ap.add_argument("--chunk", default="1024,4096")
    ap.add_argument("--cache", action="append")
    ap.add_argument("--new", type=int, default=24, help="decode steps a cell")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--banded", default="1", help="1: sliding windows inside a chunk in bands (banded_lse); 0: as "
                    "one masked T x T product (before it); 0,1: both, side by side")
    a = ap.parse_args()
    import longkv.kernels.attention as attn
    from longkv.kernels.reference import attention_lse, visible

    def square(q, k, v, *, scale, window, softcap=None):
        pos = torch.arange(q.shape[2], device=q.device)
        return attention_lse(q, k, v, scale=scale, mask=visible(pos, pos, window), softcap=softcap)
    banded = {"1": attn.banded_lse, "0": square}
    specs = a.cache or ["full"]
    T = parse_tokens(a.ctx)
    gpu = torch.cuda.is_available()
    dev, dt = (torch.device("cuda"), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    model = random_model(SHAPES[a.shape], device=dev, dtype=dt)
    ids = torch.randint(0, 32000, (1, T), device=dev)
    rows, detail = [], []
    for spec, chunk, mode in ((s, int(c), m) for s in specs for c in a.chunk.split(",") for m in a.banded.split(",")):
        attn.banded_lse = banded[mode]

        def fill():
            kv = build_cache(model, spec, None, batch=1, capacity=T + a.new, device=dev, dtype=dt)
            return kv, prefill(model, kv, ids, chunk=chunk)

        _wall(fill)  # compiles / autotunes
        pre = [_wall(fill) for _ in range(a.reps)]
        row = dict(cache=spec[:40], chunk=chunk, banded=mode, prefill_ms=round(min(p[0] for p in pre), 1))
        rows.append(row)
        if not gpu:   # the CPU times the prefill only (no graphs, no CUDA profile)
            continue
        kv, logits = pre[-1][1]
        g_ms, graph = _wall(lambda: GraphStep(model, kv, batch=1))

        def run():
            for _ in decode_tokens(model, kv, logits, max_new_tokens=a.new, sampling=Sampling(0.0, 1.0, 0),
                                   stop_ids=set(), graph=graph):
                pass
        d_ms, _ = _wall(run)
        k_ms, syncs, host, kern, under = _profile(fill, a.top)
        sites = _sync_sites(fill, a.top)
        row.update(prefill_kernel_ms=k_ms, host_syncs=syncs, capture_ms=round(g_ms, 1), decode_ms=round(d_ms, 1),
                   ms_a_step=round(d_ms / a.new, 2))
        detail.append(dict(row, host=host, kernels=kern, sites=sites, under=under))
        kv = graph = logits = None
        torch.cuda.empty_cache()
    attn.banded_lse = banded["1"]
    for d in detail:
        print(f"\n== {d['cache']} chunk {d['chunk']}: prefill {d['prefill_ms']} ms wall, {d['prefill_kernel_ms']} ms "
              f"of kernels, {d['host_syncs']} host syncs")
        print("host ops (self ms):", ", ".join(f"{n} {t}" for n, t in d["host"]))
        print("kernels (ms):", ", ".join(f"{n} {t}" for n, t in d["kernels"]))
        print("host syncs at:", "; ".join(f"{n} x{c}" for n, c in d["sites"]))
        print("host syncs under:", "; ".join(f"{n} x{c}" for n, c in d["under"]))
    print()
    print_table(rows, list(rows[-1]))
    emit_json(dict(bench="cell_profile", shape=a.shape, ctx=T, device=torch.cuda.get_device_name() if gpu else "cpu",
                   rows=rows))


if __name__ == "__main__":
    main()
