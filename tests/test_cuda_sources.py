"""The NVRTC-built CUDA sources (`nvrtc.build`: the page select, its cluster form, the SparQ score; and
`quant_cuda`'s KIVI kernels) compile, in the configurations the code asks for, with nvcc where this machine has
one: a CPU-only machine then still catches a source that NVRTC would refuse on the GPU (where the code would quietly
fall back to Triton). nvcc's front end is not NVRTC's, but both take the same CUDA C++; nvcc -ptx for sm_90, no GPU
needed."""
import re
import shutil
import subprocess

import pytest

from longkv.kernels import quant_cuda
from longkv.kernels.nvrtc import source

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")

SCORE = dict(D=128, G=4, R=32, GROUP=64, SINK=4, WINDOW=128, QBF16=1, NT=256, WPT=4, MINB=2, VEC=1, CHOOSE=1,
             WEIGH=1, PIPE=0, EVERY=None, PERQ=0, HEXP=0)
KIVI = dict(D=128, G=4, sink=4, bf16=True)
CASES = [
    ("page_select", ("page_select.cu",), dict(AGG=2, RK=8, EARLY=1)),
    ("page_select", ("page_select.cu",), dict(RK=16, EVERY=3)),
    ("page_select", ("page_select.cu",), dict(RK=8, EVERY=2)),
    ("page_select_cluster", ("page_select.cu", "page_select_cluster.cu"), dict(CL=8, CT=256, CRK=4)),
    ("page_select_cluster", ("page_select.cu", "page_select_cluster.cu"), dict(CL=8, CT=256, CRK=4, MASSQ=4)),
    ("page_select_cluster", ("page_select.cu", "page_select_cluster.cu"), dict(CL=8, CT=256, CRK=16, MASSQ=3)),
    ("sparq_score", ("ptx.cuh", "quest_sparq.cu"), SCORE),
    ("sparq_score", ("ptx.cuh", "quest_sparq.cu"), SCORE | dict(PERQ=2, QBF16=0, CHOOSE=0, WEIGH=0)),
    ("sparq_score", ("ptx.cuh", "quest_sparq.cu"), SCORE | dict(PERQ=1)),                 # rank=mass
    ("sparq_score", ("ptx.cuh", "quest_sparq.cu"), SCORE | dict(PERQ=1, HEXP=1, PIPE=1, EVERY=2, D=256, G=8)),
    ("sparq_score", ("ptx.cuh", "quest_sparq.cu"), SCORE | dict(WPT=1, VEC=0, GROUP=16, PERQ=1, G=1, R=16)),
    # `quant_cuda`'s own layouts: kivi2's; the kres quarter's paged one (4 bits, residual bits, 128 registers); the
    # probe's loads alone, dense (kivi2) and paged (the kres quarter)
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=4, group=64, ring=256, paged=True,
                                                                  res=True, minb=16)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, load_only=True)),
    # the keys dequantized in registers (KDQ), dense kivi2 (16- and 32-token tiles) and paged 4-bit
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, kdq=1)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, kdq=1, tile=32)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=4, group=64, ring=256, paged=True,
                                                                  kdq=1)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=4, group=64, ring=256, paged=True,
                                                                  res=True, load_only=True)),
    # bulk copies into shared memory (sm_90; the default at 2 bits): kivi2 without them (the register double buffer), its
    # loads alone, 4 bits (groups longer than a stage)
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, bulk=0)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, bulk=1,
                                                                  load_only=True)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=4, group=64, ring=256, bulk=1, stok=32,
                                                                  nst=3)),
    # 8-bit key statistics (kstat=8) through the bulk stages, 16- and 32-token stages, D 256, 4 bits at D 64 and 128
    # (2 bits at D 64 is not a layout of this kernel: `supported` asks D * bits >= 256)
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, ks8=True)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, ks8=True,
                                                                  stok=32)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**(KIVI | dict(D=64)), bits=4, group=16, ring=160,
                                                                  ks8=True, bulk=1, kdq=1)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**(KIVI | dict(D=256)), bits=2, group=16, ring=160,
                                                                  ks8=True)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=4, group=16, ring=160, ks8=True, bulk=1,
                                                                  kdq=1)),
    # kv2's layout with 64-token groups
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=64, ring=256)),
    # each split's last tokens in one-tile stages (tail): kivi2's (with the timeline's stamps, and with 8-bit statistics),
    # 4 bits in 64-token groups (tile stages inside a group)
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, tail=64,
                                                                  tline=True)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=2, group=16, ring=160, tail=64,
                                                                  ks8=True)),
    ("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, bits=4, group=64, ring=256, bulk=1, tail=128)),
]


def ptx(name, files, defines, tmp_path) -> str:
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source(defines, files))
    out = subprocess.run([NVCC, "-ptx", "-arch=sm_90", "-o", str(tmp_path / "out.ptx"), str(cu)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return (tmp_path / "out.ptx").read_text()


@pytest.mark.parametrize("name,files,defines", CASES)
def test_cuda_source_compiles(name, files, defines, tmp_path):
    assert f".entry {name}" in ptx(name, files, defines, tmp_path)


@pytest.mark.parametrize("layout", [dict(bits=2, group=16, ring=160), dict(bits=4, group=64, ring=256, paged=True,
                                                                           res=True), dict(bits=2, group=16, ring=160,
                                                                                           kdq=1, bulk=0)])
def test_kivi_loads_alone_issue_every_load_of_the_kernel(layout, tmp_path):
    """LOADONLY (`quant_cuda_probe.py --load-only`) is only a measure of the access pattern if the compiler keeps
    every load the attention issues: a loaded word it does not use is dropped (session 35's form lost the residual
    words so). The same global loads and prefetches in the kernel's PTX, with and without it."""
    def counts(**kw):
        text = ptx("kivi_attn", ("ptx.cuh", "quant_cuda.cu"), quant_cuda.config(**KIVI, **layout, **kw), tmp_path)
        body = text[text.index(".entry kivi_attn"):]
        body = body[:body.index(".entry", 1)] if ".entry" in body[1:] else body
        return [len(re.findall(p, body)) for p in (r"\bld\.global\S*", r"\bprefetch\.global\S*")]
    assert counts(load_only=True) == counts()
