"""Sparse and evicted caches at long context: decode speed, bytes held, peak memory while filling.

Llama-3-8B shape, random bf16 weights, batch 1. The cache is **not** filled by a real prefill (512K
tokens of O(n²) attention); it is filled through each cache's own append path with random keys,
values and (for scorers) window queries, chunk by chunk, and eviction methods compact after every
chunk exactly as they do during a chunked prefill. So decode timings and memory are real; which
tokens survive is not meaningful (random data).

For each context and method:
- `layer_us`: one sparse layer's decode attention (write + score/select + attention), CUDA graph;
  `layer_kernels`: the GPU kernels that step launches (CUDA only; from the profiler);
- quest rows only, the same layer's kernels each timed alone (CUDA graph): `append_us` (RoPE, write,
  page min/max), `score_us` (every page's bound), `select_us` (top pages → int32 page table),
  `attend_us` (paged flash-decoding + merge), and `topk_us`: the torch.topk + sort selection the
  select kernel replaced, on the same scores (for comparison; not part of the step); `select_eq_ref`,
  `attend_err`: the select and attention kernels against the plain-torch references on this cache;
  with a second stage: `rerank_us` (its kernels as the step runs them), `rerank_nofold_us` (the same
  from codes with the per-page kernels, `quest_rerank._foldable`), `fold_g{groups}w{warps}_us` (the
  every-page kernel's launch sweep), `rerank_err` (vs the reference), `fold_vs_nofold`;
- kv4+quest rows, likewise: `write_us`, `bounds_us`, `score_us`, `select_us`, `attend_us` (the paged
  packed kernel) and its launch variants, `attend_err` against its reference;
- `decode_ms`: a whole one-token decode step of the model (CUDA graph), and its ratio to `full`;
- `kv_GiB`: bytes the cache holds (nbytes) once decoding (after the last compaction), `kv_vs_full`
  its ratio to a full bf16 cache of the same tokens; `fill_peak_GiB`: peak allocated while
  filling, above the weights (what a chunked prefill's cache would need at its worst).
Methods: full, quest at budgets 1/8 and 1/32 (tokens read per step), snapkv / streaming / adakv+snapkv
/ tova keeping 1/8 (and snapkv 1/32) after compaction.

    python benchmarks/sparse_decode.py --contexts 128k --layers 32        # H100 80GB
    python benchmarks/sparse_decode.py --contexts 512k --layers 16        # full bf16 KV of 32 layers at
                                                                          # 512K (64 GiB) + 16 GB of weights
                                                                          # does not fit an 80 GB card ...
    python benchmarks/sparse_decode.py --contexts 512k --weight-sets 16   # ... with 16 layers' weights, read
                                                                          # twice a step, it does
    python benchmarks/sparse_decode.py --smoke                            # CPU, tiny shapes: runs or not
    python benchmarks/sparse_decode.py --contexts 128k --only "full,quest 1/8"   # just those rows
Last line: JSON.
"""
from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time

import torch
from common import LLAMA3_8B, emit_json, graph_time, kernel_profile, parse_tokens, print_table, random_model, timed

from longkv.cache import spec as cache_spec


def methods(ctx: int) -> list[tuple[str, str]]:
    b8, b32 = ctx // 8, ctx // 32
    return [("full", "full"),
            ("quest 1/8", f"quest:budget={b8}"), ("quest 1/32", f"quest:budget={b32}"),
            ("quest 1/8 p32", f"quest:budget={b8},page=32"),   # half the page-bound bytes
            ("quest 1/8 r4", f"quest:budget={b8},rerank=4,rank=max"),   # + re-scoring 4x the pages from 2-bit codes
            ("quest 1/8 r4 exact", f"quest:budget={b8},rerank=4,rbits=0,rank=max"),   # ... from the exact keys
            # every page from its 2-bit codes (ratio, not budget: 8 x the pages read then covers the
            # decode room too, so the cache takes its every-page path)
            ("quest 1/8 r8", "quest:ratio=0.875,rerank=8,rank=max"),
            ("quest 1/8 r8 mass", "quest:ratio=0.875,rerank=8,rank=mass"),   # ... ranked by attention mass
            ("quest 1/8 r4 mass", f"quest:budget={b8},rerank=4,rank=mass"),
            ("kv4", "kv4"), ("kv4+quest 1/8", f"kv4+quest:budget={b8}"),   # Quest over packed storage
            ("kv4+quest 1/32", f"kv4+quest:budget={b32}"), ("kivi4", "kivi4"),
            # pages = the 64-token key groups, bounds from their scale/zero, the CUDA kernel through a table
            ("kv4+quest 1/8 groups", f"kv4+quest:budget={b8},groups=1"),
            ("kv4+quest 1/32 groups", f"kv4+quest:budget={b32},groups=1"),
            # ... scored SparQ's way from an eighth of the channels (a channel-major copy of the key codes)
            ("kv4+quest 1/8 sparq", f"kv4+quest:budget={b8},groups=1,channels=0.125,rank=max"),
            ("kv4+quest 1/8 sparq mass", f"kv4+quest:budget={b8},groups=1,channels=0.125,rank=mass"),
            ("kv4+quest 1/32 sparq", f"kv4+quest:budget={b32},groups=1,channels=0.125,rank=max"),
            ("kv4+quest 1/8 sparq 0.25", f"kv4+quest:budget={b8},groups=1,channels=0.25,rank=max"),
            # ... the channels chosen by |q| times the keys' rms (weigh=1)
            ("kv4+quest 1/8 sparq weigh", f"kv4+quest:budget={b8},groups=1,channels=0.125,rank=max,weigh=1"),
            ("kv4+quest 1/32 sparq weigh", f"kv4+quest:budget={b32},groups=1,channels=0.125,rank=max,weigh=1"),
            # ... with the 4-bit storage's full-precision window at 1,024 tokens instead of 128 (gemma3 32K quality)
            ("kv4+quest 1/8 sparq weigh w1024",
             f"quant:bits=4,window=1024+quest:budget={b8},groups=1,channels=0.125,rank=max,weigh=1"),
            # ... scored from a quarter of the channels (gemma3 32K multivalue: 32 of 256 miss a needle's group)
            ("kv4+quest 1/8 sparq 0.25 weigh", f"kv4+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1"),
            # ... choosing the groups every 2 / 4 decode steps and reading the same ones in between (every=K,
            # LServe's reusable page selector): decode_ms is the mean over K consecutive positions
            ("kv4+quest 1/8 sparq 0.25 weigh every2",
             f"kv4+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,every=2"),
            ("kv4+quest 1/8 sparq 0.25 weigh every4",
             f"kv4+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,every=4"),
            ("kv4+quest 1/8 sparq weigh every4",
             f"kv4+quest:budget={b8},groups=1,channels=0.125,rank=max,weigh=1,every=4"),
            ("kv4+quest 1/8 sparq 0.25 weigh w1024",
             f"quant:bits=4,window=1024+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1"),
            # ... over 32-token key groups (they keep needles 64-token groups lose from the exact logits, but
            # score -2.7 ± 2.5 against -1.5 ± 2.9 on gemma3 16K's 264 cells: BENCHMARKS.md, session 24)
            ("kv4 g32+quest 1/8 sparq 0.25 weigh",
             f"kv4:group=32+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1"),
            # ... with no dense layers (dense_layers=0: every layer selects; gemma3's first layers are sliding ones, so
            # there it changes nothing)
            ("kv4+quest 1/8 sparq 0.25 weigh d0",
             f"kv4+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,dense_layers=0"),
            # ... with one dense layer (dense_layers=1: half d0's saving, if smollm2's loss without them is layer 0's)
            ("kv4+quest 1/8 sparq 0.25 weigh d1",
             f"kv4+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,dense_layers=1"),
            ("kv4 g16+quest 1/8 sparq 0.25 weigh d0",
             f"kv4:group=16+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,dense_layers=0"),
            # ... over 16-token key groups read in pages of 64 tokens (4 groups: the select, score pool and page size
            # of 64-token groups, the storage's precision of 16; session 29)
            ("kv4 g16 p64+quest 1/8 sparq 0.25 weigh",
             f"kv4:group=16+quest:budget={b8},groups=1,page=64,channels=0.25,rank=max,weigh=1"),
            ("kv4 g16 p64+quest 1/8 sparq 0.25 weigh d0",
             f"kv4:group=16+quest:budget={b8},groups=1,page=64,channels=0.25,rank=max,weigh=1,dense_layers=0"),
            # ... over 16-token key groups (smollm2 8K: kv4 alone -1.0 ± 1.5 with them, -2.0 ± 1.8 with 64; session 29)
            ("kv4 g16+quest 1/8 sparq 0.25 weigh",
             f"kv4:group=16+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1"),
            # ... over kv4 with the keys' residual bits (kres=1: keys half a step finer, the score's sketch unchanged;
            # session 30). LONGKV_KRES_CUDA=0 sends the attention and the dense layers to torch
            ("kv4 kres+quest 1/8 sparq 0.25 weigh",
             f"kv4:kres=1+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1"),
            ("kv4 kres+quest 1/8 sparq 0.25 weigh d0",
             f"kv4:kres=1+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,dense_layers=0"),
            ("kv4 kres+quest 1/8 sparq 0.25 weigh d1",
             f"kv4:kres=1+quest:budget={b8},groups=1,channels=0.25,rank=max,weigh=1,dense_layers=1"),
            # ... the groups ranked by attention mass (each query's share, summed over the query group: on CPU it finds
            # gemma3 16K cells the largest logit loses, session 32), or by each query's peak (rank=peak); the CUDA score
            # writes each query's value (session 33), page_mass normalises them
            ("kv4 kres+quest 1/8 sparq 0.25 weigh mass d0",
             f"kv4:kres=1+quest:budget={b8},groups=1,channels=0.25,rank=mass,weigh=1,dense_layers=0"),
            ("kv4 kres+quest 1/8 sparq 0.25 weigh peak d0",
             f"kv4:kres=1+quest:budget={b8},groups=1,channels=0.25,rank=peak,weigh=1,dense_layers=0"),
            ("kv4 g32+quest 1/8 sparq weigh",
             f"kv4:group=32+quest:budget={b8},groups=1,channels=0.125,rank=max,weigh=1"),
            ("snapkv 1/8", f"snapkv:budget={b8}"), ("snapkv 1/32", f"snapkv:budget={b32}"),
            ("streaming 1/8", f"streaming:budget={b8}"), ("adakv+snapkv 1/8", f"adakv+snapkv:budget={b8}"),
            ("tova 1/8", f"tova:budget={b8}")]


@torch.inference_mode()
def fill(model, cache, ctx: int, chunk: int, dev, gen):
    """Append `ctx` random tokens through the cache's own path, chunk by chunk (see module docstring)."""
    specs = model.layer_specs()
    s0 = specs[0]
    for start in range(0, ctx, chunk):
        n = min(chunk, ctx - start)
        pos = torch.arange(start, start + n, device=dev)
        step = model.make_step(pos, start)
        for layer in range(len(specs)):
            k = torch.randn(1, s0.num_kv_heads, n, s0.head_dim, device=dev, generator=gen, dtype=cache.dtype)
            v = torch.randn_like(k)
            if hasattr(cache, "_remember"):          # eviction: window queries, then compaction as in prefill
                if cache.chunked:
                    cache._compact(layer)
                q = torch.randn(1, s0.num_heads, min(n, 64), s0.head_dim, device=dev, generator=gen, dtype=cache.dtype)
                cache._remember(layer, q, pos[-q.shape[2]:])
            cache.append(layer, k, v, step)
        cache.advance(n)


def count_kernels(fn, dev):
    """GPU kernels one eager call of `fn` launches (what its CUDA graph replays), or None."""
    if dev.type != "cuda":
        return None
    try:
        return round(sum(c for *_, c in kernel_profile(fn, reps=1, top=None)[1]))
    except (RuntimeError, AttributeError, ValueError):   # a nicety: never lose the run for it
        return None


def layer_inputs(model, cache, layer: int, dev):
    s = model.layer_specs()[layer]
    pos = torch.full((1,), cache.length, device=dev)
    q = torch.randn(1, s.num_heads, 1, s.head_dim, device=dev, dtype=cache.dtype)
    k = torch.randn(1, s.num_kv_heads, 1, s.head_dim, device=dev, dtype=cache.dtype)
    return s, pos, model.make_step(pos, None), q, k, torch.randn_like(k)


@torch.inference_mode()
def layer_time(model, cache, layer: int, dev, reps: int) -> tuple[float, int | None]:
    """µs of one layer's decode attention at position cache.length (graph-captured on CUDA), and the
    kernels it launches."""
    _, _, step, q, k, v = layer_inputs(model, cache, layer, dev)
    fn = lambda: cache.attend(layer, q, k, v, step=step)
    return graph_time(fn, reps, dev) * 1e3, count_kernels(fn, dev)


def topk_table(scores, k: int, pos, P: int, row_pages: int):
    """The selection as it was before the select kernel (torch.topk + sort + table arithmetic), timed
    next to it for comparison."""
    ids = scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    B, Hkv = ids.shape[:2]
    base = torch.arange(B * Hkv, device=ids.device).reshape(B, Hkv, 1) * row_pages
    table = (ids + base).reshape(B * Hkv, -1).to(torch.int32)
    return table, torch.clamp(pos // P + 1, max=k), pos % P + 1


@torch.inference_mode()
def quest_breakdown(model, cache, layer: int, dev, reps: int) -> dict:
    """µs of each kernel of one quest layer's decode step, each in its own CUDA graph: append (RoPE,
    write, page min/max), score (every page), select (page table), attend (paged flash-decoding +
    merge); topk_us: the old torch.topk + sort selection on the same scores."""
    from longkv.kernels import quest as kq

    s, pos, step, q, k, v = layer_inputs(model, cache, layer, dev)
    P, D = cache.P, s.head_dim
    cos, sin = step.rope[s.rope_index]
    kc, vc, mn, mx = cache.k[layer], cache.v[layer], cache.pmin[layer], cache.pmax[layer]
    rows = kc.shape[2] // P
    codes, bits = cache.codes[layer], cache.rbits
    scores = kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=cache.recent)
    table, nsel, last = kq.select_pages(scores, cache.k_pages, pos, page=P, row_pages=rows)
    pieces = {
        "append_us": lambda: kq.append_token(k, v, cos, sin, pos, kc, vc, mn, mx, page=P, codes=codes, bits=bits),
        "score_us": lambda: kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=cache.recent),
        "select_us": lambda: kq.select_pages(scores, cache.k_pages, pos, page=P, row_pages=rows),
        "attend_us": lambda: kq.paged_attention(q, kc.view(-1, P, D), vc.view(-1, P, D), table, nsel, last,
                                                scale=s.scale, softcap=s.softcap),
        "topk_us": lambda: topk_table(scores, cache.k_pages, pos, P, rows),
    }
    # the select variants and score tilings side by side (the step uses the defaults above)
    methods = ["multi"] + (["bisect"] if scores.shape[-1] <= kq.SELECT_CHUNK else [])
    for m in methods:
        pieces[f"select_{m}_us"] = functools.partial(kq.select_pages, scores, cache.k_pages, pos, page=P,
                                                     row_pages=rows, method=m)
    for bp, w in ((64, 4), (256, 8)):
        pieces[f"score_p{bp}w{w}_us"] = functools.partial(kq.page_scores, q, mn, mx, pos, page=P, sink=1,
                                                          recent=cache.recent, block_p=bp, warps=w)
    # the second stage: candidates' scores from exact keys or page codes (candidate select included)
    pools = () if codes is None else (codes.view(-1, P, codes.shape[-1]), mn.view(-1, D), mx.view(-1, D))

    how = dict(row_pages=rows, rank=getattr(cache, "rank", "max"), scale=s.scale, softcap=s.softcap)

    def rerank(mod, **fold):
        if pools and cache.k_cand >= cache.max_pages:   # every page a candidate: the cache's one-kernel path
            return mod.all_page_code_scores(q, codes, mn, mx, pos, bits=bits, sink=1, recent=cache.recent,
                                            rank=how["rank"], scale=s.scale, softcap=s.softcap, **fold)
        cand = mod.select_pages(scores, cache.k_cand, pos, page=P, row_pages=rows)
        if pools:
            return mod.rerank_code_scores(q, *pools, scores, *cand, bits=bits, **how, **fold)
        return mod.rerank_scores(q, kc.view(-1, P, D), scores, *cand, **how)
    if getattr(cache, "rerank", 0) and cache.k_cand > cache.k_pages:
        pieces["rerank_us"] = functools.partial(rerank, kq)
        if pools:   # the kernels before the fold (`quest_rerank._foldable`), same inputs
            pieces["rerank_nofold_us"] = functools.partial(rerank, kq, fold=False)
        if pools and cache.k_cand >= cache.max_pages:   # the one-kernel path's tiling, swept
            every = dict(bits=bits, sink=1, recent=cache.recent, rank=how["rank"], scale=s.scale, softcap=s.softcap)
            for gr, w in ((1, 1), (2, 1), (4, 1)):
                pieces[f"fold_g{gr}w{w}_us"] = functools.partial(kq.all_page_code_scores, q, codes, mn, mx, pos,
                                                                 groups=gr, warps=w, fold=True, **every)
    out = {name: round(graph_time(fn, reps, dev) * 1e3, 1) for name, fn in pieces.items()}
    # the kernels against their plain-torch references on this very cache (compiled, at full size)
    from longkv.kernels import sparse_reference as ref

    rt, rn, rl = ref.select_pages(scores, cache.k_pages, pos, page=P, row_pages=rows)
    n = int(rn[0])

    def same(sel):
        t, ns, la = sel
        return bool(torch.equal(t[:, :n], rt[:, :n]) and torch.equal(ns, rn) and torch.equal(la, rl))

    out["select_eq_ref"] = same((table, nsel, last))
    for m in methods:
        out[f"select_{m}_eq_ref"] = same(pieces[f"select_{m}_us"]())
    if "rerank_us" in pieces:
        want_r = rerank(ref)
        out["rerank_err"] = float(f"{(pieces['rerank_us']() - want_r).abs().nan_to_num().max().item():.2e}")
        if "rerank_nofold_us" in pieces:   # the folded kernel against the one before it, on this cache
            diff = (pieces["rerank_us"]() - pieces["rerank_nofold_us"]()).abs().nan_to_num().max().item()
            out["fold_vs_nofold"] = float(f"{diff:.2e}")
    out["score_tilings_eq"] = all(torch.allclose(pieces[f"score_p{bp}w{w}_us"](), scores, rtol=1e-5, atol=1e-5)
                                  for bp, w in ((64, 4), (256, 8)))
    want = ref.paged_attention(q, kc.view(-1, P, D), vc.view(-1, P, D), rt, rn, rl, scale=s.scale, softcap=s.softcap)
    got = pieces["attend_us"]()
    out["attend_err"] = float(f"{(got.float() - want.float()).abs().max().item():.2e}")
    return out


@torch.inference_mode()
def quest_storage_breakdown(model, cache, layer: int, dev, reps: int, splits=(32, 64, 128, 256),
                            warps=(1, 2)) -> dict:
    """`kv4+quest`'s sparse layer piece by piece (each in its own CUDA graph): write (append + flush
    into the packed storage), bounds (RoPE + page min/max fold, one kernel), score, select, attend (the
    paged packed kernel + merge) and its launch variants (`attend_s{splits}w{warps}_us`: splits a row,
    warps of the fast launch); `floor_us`: a graph of one 4-byte fill, what replaying a graph costs by itself
    (the host's replay rate when the GPU work is shorter). A piece shorter than that floor reads the floor: the
    write read 14.2 µs on an H200 (session 24) where the step's --profile has its kernel at 1.5 µs (BENCHMARKS.md,
    issue 5, session 27); the step's profile gives the kernels' own times.
    `attend_err`: the kernel against `quant_reference.quant_paged_attention` on this very cache."""
    from longkv.kernels import quant_paged as qp
    from longkv.kernels import quant_reference as qref
    from longkv.kernels import quest as kq
    s, pos, step, q, k, v = layer_inputs(model, cache, layer, dev)
    P, st = cache.P, cache.store
    cos, sin = step.rope[s.rope_index]
    if cache.groups:   # groups=1: score the key groups from their statistics, the CUDA kernel via the table
        from longkv.kernels import quant_cuda as qc
        kd, vd = st.kq[layer], st.vq[layer]
        MG = kd["scale"].shape[2]
        gk = dict(bits=st.bits, group=P, sink=st.S, window=st.W)
        scores, npos = kq.group_scores(q, kd["scale"], kd["zero"], pos + 1, **gk)
        table, nsel, _ = kq.select_pages(scores, cache.k_pages, npos, page=P, row_pages=MG)
        args = (q, kd, vd, st.kf[layer], st.vf[layer], pos + 1, table, nsel)
        one = torch.zeros(1, device=dev)
        pieces = {
            "floor_us": lambda: one.fill_(1.0),
            "write_us": lambda: st.write(layer, k, v, pos=pos, cos=cos, sin=sin, slot=pos),
            "score_us": lambda: kq.group_scores(q, kd["scale"], kd["zero"], pos + 1, **gk),
            "select_us": lambda: kq.select_pages(scores, cache.k_pages, npos, page=P, row_pages=MG),
            "attend_us": lambda: qp.quant_group_attention(*args, row_pages=MG, vgroup=st._vg(layer), scale=s.scale,
                                                          **gk),
        }
        for bp, w, lp in ((64, 4, 0), (128, 4, 0), (128, 4, 1), (256, 8, 1)) if cache.sketch[layer] is None else ():
            pieces[f"score_p{bp}w{w}{'h' if lp else ''}_us"] = functools.partial(
                kq.group_scores, q, kd["scale"], kd["zero"], pos + 1, block_p=bp, warps=w, lowp=bool(lp), **gk)
        if cache.sketch[layer] is not None:   # channels=F: the channel choice and the SparQ score instead
            from longkv.kernels import quest_sparq as qs
            sk, sz, R = cache.sketch[layer], cache.sz[layer], cache.channels[layer]
            sp = dict(group=P, sink=st.S, window=st.W, channels=R)
            wt = cache.wch[layer]    # weigh=1: the channel weights (None: |q| alone)
            sel = qs.prepare(q, sk.shape[1], R, weight=wt)
            pieces["prepare_us"] = lambda: qs.prepare(q, sk.shape[1], R, weight=wt)
            pieces["score_us"] = lambda: qs.sparq_group_scores(q, sk, sz, pos + 1, sel, rank=cache.rank, scale=s.scale,
                                                               **sp)
            for bp, w in ((4, 4), (8, 4), (16, 2), (16, 4)):
                pieces[f"score_p{bp}w{w}_us"] = functools.partial(
                    qs.sparq_group_scores, q, sk, sz, pos + 1, sel, rank=cache.rank, scale=s.scale, block_p=bp,
                    warps=w, **sp)
            if cache.rank == "mass":
                lse, npos = qs.sparq_group_scores(q, sk, sz, pos + 1, sel, rank="mass", scale=s.scale, **sp)
                pieces["mass_us"] = lambda: kq.page_mass(lse, None, pos=npos, page=P, sink=0, recent=0)
        for n in (4,) if dev.type == "cuda" else ():
            pieces[f"attend_cw{n}_us"] = functools.partial(qc.paged_attention, *args, row_pages=MG, cw=n,
                                                           scale=s.scale, **gk)
        for n in (12, 16) if dev.type == "cuda" else ():   # programs an SM the registers must allow
            pieces[f"attend_minb{n}_us"] = functools.partial(qc.paged_attention, *args, row_pages=MG, minb=n,
                                                             scale=s.scale, **gk)
        if dev.type == "cuda":   # the full-precision splits alone (no group listed)
            pieces["attend_fp_only_us"] = functools.partial(qc.paged_attention, *args[:7], torch.zeros_like(nsel),
                                                            row_pages=MG, scale=s.scale, **gk)
        for n in (128, 192) if dev.type == "cuda" else ():
            pieces[f"attend_s{n}_us"] = functools.partial(qc.paged_attention, *args, row_pages=MG, splits=n,
                                                          scale=s.scale, **gk)
        out = {name: round(graph_time(fn, reps, dev) * 1e3, 1) for name, fn in pieces.items()}
        want = qref.quant_group_attention(*args, row_pages=MG, vgroup=st._vg(layer), scale=s.scale, **gk)
        out["attend_err"] = float(f"{(pieces['attend_us']().float() - want.float()).abs().max().item():.2e}")
        out["groups_read"] = cache.k_pages
        return out
    mn, mx = cache.pmin[layer], cache.pmax[layer]
    scores = kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=cache.recent)
    table, nsel, last = kq.select_pages(scores, cache.k_pages, pos, page=P, row_pages=cache.max_pages)
    args = (q, st.kq[layer], st.vq[layer], st.kf[layer], st.vf[layer], pos + 1, table, nsel, last)
    kw = dict(row_pages=cache.max_pages, page=P, bits=st.bits, group=st.g, vgroup=st._vg(layer), sink=st.S,
              window=st.W, scale=s.scale)
    one = torch.zeros(1, device=dev)
    pieces = {
        "floor_us": lambda: one.fill_(1.0),
        "write_us": lambda: st.write(layer, k, v, pos=pos, cos=cos, sin=sin, slot=pos),
        "bounds_us": lambda: kq.append_token(k, v, cos, sin, pos, None, None, mn, mx, page=P),
        "score_us": lambda: kq.page_scores(q, mn, mx, pos, page=P, sink=1, recent=cache.recent),
        "select_us": lambda: kq.select_pages(scores, cache.k_pages, pos, page=P, row_pages=cache.max_pages),
        "attend_us": lambda: qp.quant_paged_attention(*args, **kw),
    }
    for n in splits:
        for w in warps:
            pieces[f"attend_s{n}w{w}_us"] = functools.partial(qp.quant_paged_attention, *args, splits=n,
                                                              num_warps=w, **kw)
    out = {name: round(graph_time(fn, reps, dev) * 1e3, 1) for name, fn in pieces.items()}
    want = qref.quant_paged_attention(*args, **kw)
    out["attend_err"] = float(f"{(pieces['attend_us']().float() - want.float()).abs().max().item():.2e}")
    return out


@torch.inference_mode()
def decode_time(model, cache, dev, reps: int, profile: str | None = None) -> float:
    """ms per whole-model decode step (CUDA graph on CUDA, eager on CPU); positions do not advance,
    so every replay does the same work (the step rewrites the same slot). A cache that chooses its pages
    every K steps (quest's every=K) is timed at the K positions after the fill, reps replays each, and the mean
    taken: one step that chooses and K - 1 that keep their table. profile: a label to print the
    step's kernels under (torch.profiler over graph replays, by cost; for every=K, the choosing step's)."""
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    every = getattr(cache, "every", 1)
    if dev.type == "cuda":
        from longkv.engine.graph import GraphStep
        graph = GraphStep(model, cache, batch=1)
        ms = sum(timed(lambda j=j: graph(tok, cache.length + j), reps, dev) for j in range(every)) / every
        if profile:
            busy, kernels = kernel_profile(lambda: graph(tok, cache.length), top=30)
            print(f"# {profile}: step {ms * 1e3:.1f} us, kernels {busy} us, gaps {ms * 1e3 - busy:.1f} us")
            print_table([dict(kernel=n, us=t, launches=c) for n, t, c in kernels], ["kernel", "us", "launches"])
        return ms
    step = model.make_step(torch.tensor([cache.length], device=dev), None)
    model(tok.view(1, 1), step, cache)
    return timed(lambda: model(tok.view(1, 1), step, cache), reps, dev)


def _retime(row: dict, key: str, module, settings: dict, time) -> None:
    """row[key] = time() in ms with the module's attributes set as `settings`, restored afterwards."""
    old = {k: getattr(module, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(module, k, v)
        row[key] = round(time(), 3)
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="128k")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--weight-sets", type=int, default=None,
                    help="only N layers own weights, layer i reads layer i %% N's (common.random_model): the 32-layer "
                         "8B shape with a 512K bf16 cache fits an 80 GB card with 16")
    ap.add_argument("--chunk", type=int, default=8192, help="fill chunk (eviction compacts after each)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--again", type=int, default=0,
                    help="time each row's step this many more times, each with a fresh CUDA graph: decode_ms is then "
                         "the median and ms_spread the lowest-highest (a re-timing alone moved an unchanged H100 row "
                         "by up to 0.17 ms, session 34)")
    ap.add_argument("--only", default=None, help='comma list of method labels to run, e.g. "full,quest 1/8"')
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager: checks that it runs")
    ap.add_argument("--profile", action="store_true", help="GPU: each row's decode-step kernels, by cost")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-kernel breakdown of one layer")
    ap.add_argument("--paged-launches", default="",
                    help="kv4+quest rows: re-time the step with the paged attention at cw:frac[:minb],... (warps a "
                         "program, splits as a share of one wave, minimum programs an SM: quant_cuda.PAGED_CW / "
                         "PAGED_FRAC / PAGED_MINB, the default where left out), e.g. 2:1,1:0.5,1:1:0")
    ap.add_argument("--selects", default="",
                    help="+quest rows: also time each of these page selects as the default, e.g. block,cluster")
    ap.add_argument("--cuda-launches", default="",
                    help="sparq rows: also time the step with these CUDA score launches, wpt:minb:threads[:vec[:choose"
                         "[:pipe]]],... (quest_sparq.CUDA_*; choose 0: `prepare` picks the channels, one launch more; "
                         "same filled cache, a column each)")
    a = ap.parse_args()
    cfg = dict(LLAMA3_8B, num_hidden_layers=a.layers)
    if a.smoke:
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1024, num_hidden_layers=4)
        a.contexts, a.chunk, a.reps = "2k", 512, 2
    dev = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    model = random_model(cfg, device=dev, dtype=dtype, weight_sets=a.weight_sets)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = "CPU (smoke)" if a.smoke else torch.cuda.get_device_name()
    sets = f" (weights of {a.weight_sets} layers, layer i reading layer i % {a.weight_sets}'s)" if a.weight_sets else ""
    print(f"# {name}; Llama-3-8B shape, {cfg['num_hidden_layers']} layers{sets}, random weights; cache filled "
          f"through its append path with random data (no real prefill)")
    rows = []
    for ctx in [parse_tokens(c) for c in a.contexts.split(",")]:
        base_ms = None
        for label, spec in methods(ctx):
            if a.only and label not in a.only.split(","):
                continue
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            row = {"context": ctx, "method": label, "spec": spec}
            cache = None
            try:
                cache = cache_spec.parse(spec).build(model.layer_specs(), batch=1, capacity=ctx + 64, device=dev, dtype=dtype)
                t0 = time.perf_counter()
                fill(model, cache, ctx, a.chunk, dev, torch.Generator(device=dev).manual_seed(ctx))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    row["fill_peak_GiB"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
                row["fill_s"] = round(time.perf_counter() - t0, 1)
                layer = min(cfg["num_hidden_layers"] - 1, 2)   # a sparse layer for quest (dense_layers=2)
                us, kernels = layer_time(model, cache, layer, dev, a.reps)
                row["layer_us"] = round(us, 1)
                if kernels is not None:
                    row["layer_kernels"] = kernels
                if label.startswith("quest") and cache._sparse(layer) and not a.no_breakdown:
                    row.update(quest_breakdown(model, cache, layer, dev, a.reps))
                if "+quest" in label and cache._sparse(layer) and not a.no_breakdown and cache.sub == 1:
                    # (pages of several key groups: the pieces are timed as one sparse layer only, layer_us)
                    row.update(quest_storage_breakdown(model, cache, layer, dev, a.reps))
                ms = decode_time(model, cache, dev, a.reps, profile=f"{label} {ctx}" if a.profile else None)
                again = functools.partial(decode_time, model, cache, dev, a.reps)   # the step timed again
                if a.again:
                    runs = sorted([ms] + [again() for _ in range(a.again)])
                    ms = statistics.median(runs)
                    row["ms_spread"] = f"{runs[0]:.3f}-{runs[-1]:.3f}"
                row["decode_ms"] = round(ms, 3)
                retime = lambda key, module, **kw: _retime(row, key, module, kw, again)   # noqa: E731
                if "sparq" in label and a.cuda_launches:
                    from longkv.kernels import quest_sparq as qs
                    for launch in a.cuda_launches.split(","):
                        retime(f"ms {launch}", qs, **{f"CUDA_{k.upper()}": x
                                                      for k, x in zip(qs.LAUNCH_FIELDS, qs.parse_launch(launch))})
                if "+quest" in label and a.paged_launches:     # the paged attention's warps, splits, register cap
                    from longkv.kernels import quant_cuda as qc
                    for launch in a.paged_launches.split(","):
                        cw, frac, minb = (launch.split(":") + [str(qc.PAGED_MINB)])[:3]   # no minb: the default's
                        retime(f"ms paged {launch}", qc, PAGED_CW=int(cw), PAGED_FRAC=float(frac),
                               PAGED_MINB=int(minb))
                if "+quest" in label and a.selects:             # the page select's default (page_select.py)
                    from longkv.kernels import page_select as ps
                    for method in a.selects.split(","):
                        retime(f"ms select {method}", ps, SELECT_METHOD=method)
                # after the first decode step: the final compaction and resize have happened
                row["kv_GiB"] = round(cache.nbytes() / 2**30, 3)
                row["kv_vs_full"] = round(cache.nbytes() / cache.full_nbytes(), 3)
                base_ms = ms if label == "full" else base_ms
                if base_ms:
                    row["speedup_vs_full"] = round(base_ms / ms, 2)
            except torch.OutOfMemoryError:
                row["decode_ms"] = "OOM"
            rows.append(row)
            print_table(rows[-1:], list(row))
            del cache
            again = retime = None   # (both hold the cache: a 64 GiB full one would outlive its row)
    print()
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    emit_json({"bench": "sparse_decode", "device": name, "layers": cfg["num_hidden_layers"], "weight_sets": a.weight_sets,
               "weights_GB": round(wbytes / 1e9, 2), "filled": "append path, random data", "rows": rows})


if __name__ == "__main__":
    main()
