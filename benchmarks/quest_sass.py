"""Quest's every-page second-stage kernel (`kernels/quest_rerank.py: _all_code_kernel`) compiled for a
GPU *without* one: registers, spills, SASS instructions per code, the most frequent opcodes. Last
line: JSON.

    python benchmarks/quest_sass.py --pages 4,8 --warps 1,2,4 --rank max,mass --kernel code,fold

The same method as `quant_sass.py` (triton compiles for sm_90 on a CPU machine; ptxas, nvdisasm and
cuobjdump come with its wheel). `instr/code` = the whole kernel's instructions divided by the 2-bit
codes one thread handles (no loop: the channel slices are unrolled; the fold kernel's groups are a
loop, so count it with --pages 1). It counts work, not time.
Shapes: Llama-3-8B (32 query / 8 KV heads, D 128), 16-token pages.
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
from quant_sass import _tool

from longkv.kernels import quest_fold as kf
from longkv.kernels import quest_rerank as kr

TYPES = dict(Q="*bf16", Codes="*u8", Mn="*bf16", Mx="*bf16", Pos="*i64", Out="*fp32", sqb="i32", sqh="i32",
             scb="i64", sch="i64", smb="i64", smh="i64", MP="i32", sink="i32", recent="i32", scale="fp32",
             softcap="fp32")


def inspect(pages: int, warps: int, mass: bool, bits: int, arch: int, fold: bool) -> dict:
    """fold: `_all_fold_kernel` with `pages` groups of 4 pages a program (else `_all_code_kernel`)."""
    fn = kf._all_fold_kernel if fold else kr._all_code_kernel
    consts = dict(G=4, D=128, P=16, BLOCK_G=4 if fold else 16, HKV=8, BITS=bits, MASS=mass, HAS_SOFTCAP=False)
    consts.update(dict(GROUPS=pages, PAIR=1) if fold else dict(PAGES=pages))
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else TYPES[n] for n in names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    d = tempfile.mkdtemp()
    cubin = os.path.join(d, "k.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([_tool("nvdisasm"), cubin], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if m:
            ops[re.sub(r"^@!?U?P\w+\s+", "", m.group(1)).split()[0].split(".")[0]] += 1
    codes = pages * (4 if fold else 1) * 16 * 128 / (32 * warps)
    total = sum(ops.values())
    return dict(kernel="fold" if fold else "code", pages=pages * (4 if fold else 1), warps=warps, rank="mass" if mass else "max",
                regs=int(re.search(r"REG:(\d+)", res).group(1)), spills=ops["STL"] + ops["LDL"],
                instr=total, instr_per_code=round(total / codes, 2),
                per_code=", ".join(f"{k} {v / codes:.2f}" for k, v in ops.most_common(8)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", default="4,8")
    ap.add_argument("--warps", default="1,4")
    ap.add_argument("--rank", default="max,mass")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--kernel", default="code,fold", help="code: _all_code_kernel; fold: _all_fold_kernel "
                    "(--pages counts its groups of 4 pages)")
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]
    rows = [inspect(p, w, r == "mass", a.bits, a.arch, k == "fold") for k, p, w, r in
            itertools.product(a.kernel.split(","), ints(a.pages), ints(a.warps), a.rank.split(","))]
    print_table(rows, ["kernel", "pages", "warps", "rank", "regs", "spills", "instr", "instr_per_code", "per_code"])
    emit_json({"bench": "quest_sass", "arch": f"sm_{a.arch}", "bits": a.bits, "rows": rows})


if __name__ == "__main__":
    main()
