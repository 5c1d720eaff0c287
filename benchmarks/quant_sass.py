"""The packed decode kernel compiled for a GPU *without* one: registers, shared memory and SASS
instructions per loop iteration, per launch configuration. Last line: JSON.

    python benchmarks/quant_sass.py --paths kivi4,prerope4 --warps 4,8 --block-n 64

Triton compiles for any target it knows (here sm_90, the H100/H200) and its wheel ships ptxas,
nvdisasm and cuobjdump, so the kernel's cost per tile can be read on a CPU machine before spending
device time: `instr/code` is the loop body's instruction count divided by the codes (keys + values)
each thread handles per iteration. It counts work, not time: a latency-bound kernel can keep its
speed while this falls (BENCHMARKS.md, issue 4). Shapes: Llama-3-8B (32 query / 8 KV heads, D 128).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common import emit_json, print_table

from longkv.kernels import quant as qk
from longkv.kernels import quant_reference as ref

PATHS = {  # name -> (bits, prerope, outliers)
    "prerope4": (4, True, 0), "kivi4": (4, False, 0), "kivi2": (2, False, 0), "prerope4-outliers": (4, True, 1),
}
TYPES = dict(Q="*bf16", Len="*i64", KP0="*i32", KP1="*i32", KS="*fp16", KZ="*fp16", KOI="*u8", KOV="*fp16",
             VP0="*i32", VP1="*i32", VS="*fp16", VZ="*fp16", VOI="*u8", VOV="*fp16", KF="*bf16", VF="*bf16",
             Freq="*fp32", Tab="*fp32", LutK="*fp32", LutV="*fp32", Out="*fp32", Lse="*fp32", scale="fp32",
             rope_scaling="fp32")


def compile_kernel(path: str, *, warps: int, block_n: int, group: int, prefetch: int, arch: int, **opts):
    bits, prerope, n_out = PATHS[path]
    pb = ref.PLANES[bits]
    consts = dict(HKV=8, G=4, BLOCK_G=16, D=128, SPLITS=128, BLOCK_N=block_n, GROUP=group, VG=128, PB0=pb[0],
                  PB1=pb[1] if len(pb) > 1 else 0, N_OUT=n_out, SINK=4, WINDOW=128, RING=160, NQ_CAP=131072,
                  NUQ_K=False, NUQ_V=False, BLOCK_F=32, TS=qk.TS, USE_DOT=True, PREROPE=prerope, PREFETCH=prefetch,
                  PAIR=1, PIPE=opts.pop("pipe", qk.PIPE))
    names = qk._attn_kernel.arg_names
    sig = {n: "constexpr" if n in consts else TYPES[n] for n in names}
    src = ASTSource(fn=qk._attn_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, **opts))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_stats(cubin: bytes, func: str | None = None) -> dict:
    """Registers (cuobjdump), spills, and the opcode counts of the main loop (nvdisasm) of a cubin, or
    of its function `func` only; the main loop is the first loop with tensor-core instructions (0 when
    there is none)."""
    d = tempfile.mkdtemp()
    path = os.path.join(d, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    sass = subprocess.run([_tool("nvdisasm"), "-hex", path], capture_output=True, text=True).stdout
    if func:   # that function's section alone
        sass = sass[sass.index(f".text.{func}:"):]
        sass = sass[:sass.index("\t.section", 1)] if "\t.section" in sass[1:] else sass
        res = res[res.index(f"Function {func}:"):]
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4})\*/\s+(.*?)\s*;", line)
        if m and ".byte" not in line:
            addr = int(m.group(1), 16)
            labels.update({lb: addr for lb in pending})
            pending = []
            ins.append((addr, m.group(2)))
    loops = []   # (start, body) of each loop: a branch back to an earlier label
    for addr, text in ins:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), addr + 1) < addr:
            loops.append((labels[m.group(1)], [t for a, t in ins if labels[m.group(1)] <= a <= addr]))
    # the packed loop: the first loop with tensor-core instructions (the packed branch precedes the
    # full-precision ring's in the kernel; libdevice's sin/cos loops have none)
    best = next((b for _, b in sorted(loops, key=lambda x: x[0]) if any("MMA" in t for t in b)), [])
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in best)
    regs = re.search(r"REG:(\d+)", res)
    spills = sum(1 for _, t in ins if re.search(r"\b(STL|LDL)\b", t))   # local-memory traffic = spills
    return dict(regs=int(regs.group(1)) if regs else None, spills=spills, loop=len(best),
                top=", ".join(f"{k} {v}" for k, v in ops.most_common(6)))


def inspect(kernel) -> dict:
    """`cubin_stats` of a compiled Triton kernel, with its shared memory."""
    r = cubin_stats(kernel.asm["cubin"])
    return dict(regs=r["regs"], spills=r["spills"], smem=kernel.metadata.shared, loop=r["loop"], top=r["top"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", default="kivi4,prerope4", help=",".join(PATHS))
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--block-n", default="64", help="tile sizes (capped at each path's key group: kivi2 16)")
    ap.add_argument("--prefetch", default="4")
    ap.add_argument("--maxnreg", default="0", help="register caps to try; 0 = none")
    ap.add_argument("--pipe", default="1", help="double-buffered fast loop (1) and/or the plain loop (0)")
    ap.add_argument("--arch", type=int, default=90)
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]
    rows = []
    for path in a.paths.split(","):   # key groups as in the presets: kivi2 16 tokens, the rest 64
        group = 16 if path == "kivi2" else 64
        for w in ints(a.warps):
            for bn in sorted({min(b, group) for b in ints(a.block_n)}):
                for pf in ints(a.prefetch):
                    for mr, pipe in itertools.product(ints(a.maxnreg), ints(a.pipe)):
                        k = compile_kernel(path, warps=w, block_n=bn, group=group, prefetch=pf, arch=a.arch,
                                           pipe=bool(pipe), **({"maxnreg": mr} if mr else {}))
                        r = inspect(k)
                        codes_per_thread = 2 * bn * 128 / (32 * w)
                        rows.append(dict(path=path, warps=w, block_n=bn, prefetch=pf, maxnreg=mr or None, pipe=pipe,
                                         **r, instr_per_code=round(r["loop"] / codes_per_thread, 2)))
                        print(rows[-1], flush=True)
    print_table(rows, ["path", "warps", "block_n", "prefetch", "maxnreg", "pipe", "regs", "spills", "smem", "loop",
                       "instr_per_code",
                       "top"])
    emit_json({"bench": "quant_sass", "arch": a.arch, "rows": rows})


if __name__ == "__main__":
    main()
