"""Small elementwise pieces fused by torch.compile on CUDA (one kernel instead of four or five).

At decode every layer runs ~40 tiny kernels; inside a CUDA graph each still costs a microsecond or
two, which at 32 layers is a measurable share of a 10 ms step. Compilation happens once, lazily, on
the first CUDA call (dynamic shapes, so prefill chunks and decode share one kernel). CPU calls and
`LONGKV_COMPILE=0` use the plain function, which is also the reference.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


def _compiles(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("LONGKV_COMPILE", "1") != "0"


def on_cuda(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not _compiles(args[0]):
            return fn(*args)
        if compiled is None:
            # dynamic=True still specializes sizes 0 and 1 (one KV head, one decode token): a model
            # meets several such variants per function, more than the default limit of 8 with some
            import torch._dynamo
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # a shape mix we did not foresee: run this function eagerly from now on rather than fail
            warnings.warn(f"longkv: torch.compile of {fn.__name__} hit its recompile limit; running it eagerly",
                          stacklevel=2)
            compiled = fn
            return fn(*args)

    wrapper.reference = fn
    return wrapper
