"""CUDA kernels built at run time by NVRTC (torch.cuda._compile_kernel, which CUDA builds of torch ship):
the page select (`page_select.cu`) and the SparQ score (`quest_sparq.cu`) go through `build`; the KIVI
decode kernel (`quant_cuda.py`) has its own, as it also asks the driver for occupancy. All are launched by
`launch`.

PDL (programmatic dependent launch, sm_90+; `pdl.cuh`): where on, each kernel is built with `#define PDL 1`, its
first statement PDL_ENTER(), and launched with the driver's programmatic stream serialization, so its launch and
its blocks' start overlap the end of the kernel before it (a CUDA graph keeps that as a programmatic edge).
LONGKV_PDL=0 turns it off."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

PDL = os.environ.get("LONGKV_PDL", "1") != "0"


def pdl_here() -> bool:
    """Whether kernels built now are launched with PDL: PDL on and the current GPU sm_90 or later."""
    import torch
    return PDL and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def build(defines: dict, files: tuple, name: str, what: str, fallback: str):
    """`name` compiled from `#define K V` lines and the kernels folder's `files`, in that order (`pdl.cuh` first,
    and PDL defined where `pdl_here`); None where it cannot be built (no NVRTC, or it refused the source), with a
    warning naming `what` and the `fallback` used instead. Launch it with `launch`."""
    pdl = pdl_here()
    src = source({"PDL": 1 if pdl else None, **defines}, ("pdl.cuh",) + files)
    try:
        from torch.cuda import _compile_kernel
        kern = _compile_kernel(src, name)
    except (ImportError, OSError, RuntimeError) as e:   # no NVRTC, or it refused the source
        import warnings
        warnings.warn(f"{what} not built ({str(e).splitlines()[0] if str(e) else e!r}); using {fallback}")
        return None
    kern.pdl = pdl
    return kern


def source(defines: dict, files: tuple) -> str:
    """The text `build` hands NVRTC: `#define K V` lines (None values left out), then the kernels folder's
    `files` in order."""
    src = "".join(f"#define {k} {v}\n" for k, v in defines.items() if v is not None)
    return src + "".join(Path(__file__).with_name(f).read_text() for f in files)


class _Attr(ctypes.Structure):      # CUlaunchAttribute: id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _Config(ctypes.Structure):    # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("nattrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def launch(kern, grid: tuple, block: tuple, args: list, shared_mem: int = 0):
    """kern(grid, block, args) on the current stream: as torch's kernel call (tensors as pointers, ints as C ints,
    floats as doubles), through cuLaunchKernelEx with programmatic stream serialization where kern was built with
    PDL (`build`, or `.pdl` set by its builder)."""
    if not getattr(kern, "pdl", False):
        return kern(grid=grid, block=block, args=args, shared_mem=shared_mem)
    import torch
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library
    keep = []
    for a in args:
        if isinstance(a, torch.Tensor):
            keep.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, int):
            keep.append(ctypes.c_int(a))
        elif isinstance(a, float):
            keep.append(ctypes.c_double(a))
        else:
            raise TypeError(f"kernel argument of type {type(a).__name__}")
    params = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(k), ctypes.c_void_p) for k in keep])
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    cfg = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                  torch.cuda.current_stream()._as_parameter_, ctypes.pointer(attr), 1)
    lib = _get_gpu_runtime_library()
    _check_cuda(lib.cuLaunchKernelEx(ctypes.byref(cfg), kern.func, params, None))
