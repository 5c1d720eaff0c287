"""Compile the CUDA decode kernel (`longkv/kernels/quant_cuda.py`) offline, without a GPU, and count
what it costs: registers, spills, and SASS instructions a code in the main loop.

Needs NVRTC (the `nvidia-cuda-nvrtc-cu12` wheel: `pip download --no-deps nvidia-cuda-nvrtc-cu12` and
unzip it; pass the folder holding libnvrtc.so.12 with --nvrtc) and the cuobjdump/nvdisasm that ship in
the triton wheel. Example:

    python benchmarks/quant_cuda_sass.py --nvrtc /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib --bits 4,2 --d 128
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def tools() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvrtc", required=True, help="folder holding libnvrtc.so.12")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--d", default="128")
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--tile", default=str(qc.TILE))
    ap.add_argument("--arch", default="90")
    ap.add_argument("--pf", type=int, default=0)
    ap.add_argument("--minb", type=int, default=0)
    ap.add_argument("--cw", type=int, default=1)
    ap.add_argument("--dump", action="store_true", help="print the kernel's SASS")
    a = ap.parse_args()
    lib = ctypes.CDLL(os.path.join(a.nvrtc, "libnvrtc.so.12"))
    rows = []
    for bits in map(int, a.bits.split(",")):
        for D in map(int, a.d.split(",")):
            if D * bits < 256:      # not a layout the kernel takes (`quant_cuda.supported`)
                continue
            for tile in map(int, a.tile.split(",")):
                group = 64 if bits == 4 else 16
                src = qc.defines(D=D, bits=bits, group=group, G=a.g, sink=4, ring=128 + 2 * group, bf16=True, tile=tile,
                                 pf=a.pf, minb=a.minb, cw=a.cw) + qc.source()
                cubin = nvrtc_cubin(lib, src, a.arch)
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(cubin)
                    f.flush()
                    res = subprocess.run([str(tools() / "cuobjdump"), "--dump-resource-usage", f.name],
                                         capture_output=True, text=True).stdout
                    sass = subprocess.run([str(tools() / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
                regs = re.search(r"Function kivi_attn:\s*\n\s*REG:(\d+)\s+STACK:(\d+)", res)
                body = sass[sass.index("kivi_attn"):]
                body = body[:body.index("kivi_merge")] if "kivi_merge" in body else body
                ins = [m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body)]
                if a.dump:
                    print(body)
                c = Counter(ins)
                # the loop: tiles are unrolled twice (A and B buffers); count the whole kernel body and
                # divide by the codes two tiles hold per thread as an upper bound of the loop's cost
                codes = 2 * tile * D * 2 // 32
                rows.append({"bits": bits, "D": D, "tile": tile, "regs": int(regs.group(1)) if regs else None,
                             "stack": int(regs.group(2)) if regs else None, "instructions": len(ins),
                             "per_code_bound": round(len(ins) / codes, 2), "HMMA": c["HMMA"], "LDG": c["LDG"],
                             "PRMT": c["PRMT"], "LOP3": c["LOP3"], "HADD2": c["HADD2"], "SHF": c["SHF"],
                             "MOVM": c["MOVM"], "STL": c["STL"], "LDL": c["LDL"], "SHFL": c["SHFL"]})
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
