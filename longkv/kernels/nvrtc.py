"""CUDA kernels built at run time by NVRTC (torch.cuda._compile_kernel, which CUDA builds of torch ship):
the page select (`page_select.cu`) and the SparQ score (`quest_sparq.cu`) go through `build`; the KIVI
decode kernel (`quant_cuda.py`) has its own, as it also asks the driver for occupancy."""
from __future__ import annotations

from pathlib import Path


def build(defines: dict, files: tuple, name: str, what: str, fallback: str):
    """`name` compiled from `#define K V` lines and the kernels folder's `files`, in that order; None where
    it cannot be built (no NVRTC, or it refused the source), with a warning naming `what` and the
    `fallback` used instead."""
    src = source(defines, files)
    try:
        from torch.cuda import _compile_kernel
        return _compile_kernel(src, name)
    except (ImportError, OSError, RuntimeError) as e:   # no NVRTC, or it refused the source
        import warnings
        warnings.warn(f"{what} not built ({str(e).splitlines()[0] if str(e) else e!r}); using {fallback}")
        return None


def source(defines: dict, files: tuple) -> str:
    """The text `build` hands NVRTC: `#define K V` lines (None values left out), then the kernels folder's
    `files` in order."""
    src = "".join(f"#define {k} {v}\n" for k, v in defines.items() if v is not None)
    return src + "".join(Path(__file__).with_name(f).read_text() for f in files)
