"""CUDA kernels built at run time by NVRTC (torch.cuda._compile_kernel, which CUDA builds of torch ship):
the page select (`page_select.cu`) and the SparQ score (`quest_sparq.cu`) go through `build`; the KIVI
decode kernel (`quant_cuda.py`) has its own, as it also asks the driver for occupancy."""
from __future__ import annotations

import ctypes
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


class _Attr(ctypes.Structure):       # CUlaunchAttribute: an id, padding, a 64-byte union of values
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):     # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("n_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def launch(kernel, grid, block, args: list, pdl: bool = False) -> None:
    """`kernel(grid=, block=, args=)` (torch's `_compile_kernel` launcher: tensors as pointers, ints as int, floats as
    double), or with pdl by cuLaunchKernelEx as a programmatic dependent launch: the grid may start while the one
    before it in the stream finishes (the kernel's pdl_wait(), `ptx.cuh`, holds it until that grid's writes are
    visible), which hides a launch's latency; kept inside CUDA graphs."""
    if not pdl:
        kernel(grid=grid, block=block, args=args)
        return
    import torch
    from torch.cuda._utils import _get_gpu_runtime_library

    keep = []
    for a in args:
        if isinstance(a, torch.Tensor):
            keep.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"unsupported kernel argument {type(a).__name__}")
        else:
            keep.append(ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a))
    params = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(x), ctypes.c_void_p) for x in keep])
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    cfg = _Config(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block), smem=0,
                  stream=torch.cuda.current_stream().cuda_stream, attrs=ctypes.pointer(attr), n_attrs=1)
    err = _get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(cfg), kernel.func, params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUDA error {err}")
