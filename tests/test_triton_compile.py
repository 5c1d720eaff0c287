"""The quantized cache's Triton append kernels compile for sm_90 with no GPU (`triton.compile` to a GPUTarget): the
interpreter runs a kernel's Python, so it passes code that Triton's compiler refuses (session 41: the values' block
nested under a program test redefined the keys' names at other shapes, caught only on the GPU). The configurations are
`test_append_flush_kernel_matches_reference`'s and the presets' (kv2 with clip=1: D / 16 one-warp programs a head), and
`kernels/gemv.py`'s fused forms.
The compiler runs in a child process: the test session's TRITON_INTERPRET=1 makes every @triton.jit an interpreted
function, which cannot be compiled."""
import os
import subprocess
import sys

import pytest

PTRS = dict(K="*bf16", V="*bf16", Len="*i64", KF="*bf16", VF="*bf16", KP0="*u8", KP1="*u8", KS="*fp16", KZ="*fp16",
            KOI="*u8", KOV="*fp16", VP0="*u8", VP1="*u8", VS="*fp16", VZ="*fp16", VOI="*u8", VOV="*fp16",
            MidK="*fp32", MidV="*fp32", Cnt="*i64", Cos="*bf16", Sin="*bf16", SK="*u8", SZ="*fp16", CAPH="i32",
            MG="i32", KR="*u8", KG="*fp16")
BASE = dict(RES=False, FROM_SLOT=False, HAS_CNT=True, ROPE=False, SKETCH=False, D=64, GROUP=16, VG=16, BITS=4,
            PB0=4, PB1=0, N_OUT=0, SINK=2, WINDOW=3, RING=35, NQ_CAP=64, NUQ_K=False, NUQ_V=False, CLIP=False, NC=1,
            IA=1, KS8=False)
APPEND = [dict(), dict(BITS=3, PB0=2, PB1=1, NUQ_K=True, NUQ_V=True, N_OUT=1), dict(BITS=2, PB0=2, N_OUT=2),
          dict(ROPE=True), dict(ROPE=True, RES=True), dict(BITS=2, PB0=2, N_OUT=1, RES=True),
          dict(BITS=2, PB0=2, ROPE=True, CLIP=True, NC=4), dict(CLIP=True, NC=4), dict(SKETCH=True),
          dict(D=128, VG=128, BITS=2, PB0=2, ROPE=True, WINDOW=128, RING=160, NQ_CAP=4096, CLIP=True, NC=8),
          dict(D=128, VG=128, BITS=2, PB0=2, ROPE=True, WINDOW=128, RING=160, NQ_CAP=4096, CLIP=True, NC=8, IA=16)]


def main() -> int:
    """Compile every configuration; print each failure; the number of failures is the exit status."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longkv.kernels import quant_append as qa

    def compile_(fn, sig, const, warps):
        src = ASTSource(fn, {**sig, **{k: "constexpr" for k in const}}, dict(const))
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))

    cases = [(qa._append_flush_kernel, PTRS, BASE | c, 4 if c.get("NC", 1) == 1 or c.get("IA", 1) > 1 else 1)
             for c in APPEND]
    # 8-bit key statistics (kstat=8): the statistics' bytes and the group's grid (kv2:kstat=8 and the test's layout)
    cases += [(qa._append_flush_kernel, PTRS | dict(KS="*u8", KZ="*u8"), BASE | c | dict(KS8=True), 4)
              for c in (dict(D=128, VG=128, BITS=2, PB0=2, ROPE=True, WINDOW=128, RING=160, NQ_CAP=4096),
                        dict(BITS=2, PB0=2, VG=64, ROPE=True))]
    cases += [(qa._clip_kernel, dict(X="*fp32", LO="*fp32", HI="*fp32"),
               dict(GROUP=16, D=128, C=qa.CLIP_C, BITS=2, IA=ia), 1 if ia == 1 else 4) for ia in (1, 16)]
    from longkv.kernels import gemv as gv   # the batch-1 projections (every fusion the decode step uses)
    gsig = dict(X="*bf16", W="*bf16", Y="*bf16", B="*bf16", R="*bf16", G="*bf16", N="i32", K="i32", stride_w="i32",
                up_off="i32", b_off="i32", eps="fp32")
    for bn, bk, norm, act, res, bias in [(2, 1024, True, 0, False, False), (2, 1024, False, 0, True, False),
                                         (4, 512, True, 1, False, False), (4, 512, True, 2, False, True),
                                         (4, 512, False, 3, False, True), (4, 512, True, 0, False, False)]:
        for ilv in (False, True) if act else (False,):   # ILV: the gated rows interleaved (gemv.interleave)
            cases.append((gv._gemv_kernel, gsig, dict(BN=bn, BK=bk, NORM=norm, ACT=act, BIAS=bias, RES=res, ILV=ilv),
                          4))
    bad = 0
    for fn, sig, const, warps in cases:
        try:
            compile_(fn, sig, const, warps)
        except Exception as e:   # noqa: BLE001 (every compiler error is a finding)
            bad += 1
            print(f"{fn.__name__} {const}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    return bad


def test_append_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(main())
