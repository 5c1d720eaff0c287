"""Compile the CUDA decode kernel (`longkv/kernels/quant_cuda.py`) offline, without a GPU, and count
what it costs: registers, spills, and SASS instructions a code in the main loop (`quant_sass.cubin_stats`).

Needs NVRTC (the `nvidia-cuda-nvrtc-cu12` wheel: `pip download --no-deps nvidia-cuda-nvrtc-cu12` and
unzip it; pass the folder holding libnvrtc.so.12 with --nvrtc) and the cuobjdump/nvdisasm that ship in
the triton wheel. Example:

    python benchmarks/quant_cuda_sass.py --nvrtc /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib --bits 4,2 --d 128
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import emit_json, print_table  # noqa: E402
from quant_sass import cubin_stats  # noqa: E402

from longkv.kernels import quant_cuda as qc  # noqa: E402


def nvrtc_cubin(lib: ctypes.CDLL, src: str, arch: str) -> bytes:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"-default-device"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    res = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if res != 0:
        raise SystemExit(f"NVRTC failed:\n{log.value.decode()}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvrtc", required=True, help="folder holding libnvrtc.so.12")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--d", default="128")
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--tile", default=str(qc.TILE))
    ap.add_argument("--arch", default="90")
    ap.add_argument("--gpf", type=int, default=None, help="default: the kernel's own choice for the group")
    ap.add_argument("--minb", type=int, default=0)
    ap.add_argument("--cw", type=int, default=1)
    ap.add_argument("--paged", action="store_true", help="the Quest-over-key-groups variant (reads via a table)")
    ap.add_argument("--res", default="0", help="0, 1 or 0,1: the keys' residual bits (kres=1; 4 bits, D >= 128)")
    ap.add_argument("--dump", action="store_true", help="print each row's statistics as it is made")
    a = ap.parse_args()
    lib = ctypes.CDLL(os.path.join(a.nvrtc, "libnvrtc.so.12"))
    rows = []
    for bits in map(int, a.bits.split(",")):
        for D in map(int, a.d.split(",")):
            if D * bits < 256:      # not a layout the kernel takes (`quant_cuda.supported`)
                continue
            for tile in map(int, a.tile.split(",")):
                for res in map(int, a.res.split(",")):
                    if res and (bits != 4 or D < 128):
                        continue
                    group = 64 if bits == 4 else 16
                    src = qc.defines(D=D, bits=bits, group=group, G=a.g, sink=4, ring=128 + 2 * group, bf16=True,
                                     tile=tile, gpf=a.gpf, minb=a.minb, cw=a.cw, paged=a.paged,
                                     res=bool(res)) + qc.source()
                    r = cubin_stats(nvrtc_cubin(lib, src, a.arch), func="kivi_attn")
                    if a.dump:
                        print(r)
                    # the main loop holds two 16-token steps (the double buffer's A and B tiles) of K and V codes
                    codes = 2 * tile * D * 2 // 32
                    rows.append(dict(bits=bits, D=D, tile=tile, res=res, **r,
                                     instr_per_code=round(r["loop"] / codes, 2)))
    print_table(rows, list(rows[0]))
    emit_json({"bench": "quant_cuda_sass", "arch": a.arch, "rows": rows})


if __name__ == "__main__":
    main()
