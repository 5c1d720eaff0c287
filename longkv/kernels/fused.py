"""Small elementwise pieces fused by torch.compile on CUDA (one kernel instead of four or five).

At decode every layer runs ~40 tiny kernels; inside a CUDA graph each still costs a microsecond or
two, which at 32 layers is a measurable share of a 10 ms step. Compilation happens once, lazily, on
the first CUDA call (dynamic shapes, so prefill chunks and decode share one kernel). CPU calls and
`LONGKV_COMPILE=0` use the plain function, which is also the reference.
"""
from __future__ import annotations

import functools
import os

import torch


def on_cuda(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("LONGKV_COMPILE", "1") == "0":
            return fn(*args)
        if compiled is None:
            # dynamic=True still specializes sizes 0 and 1 (one KV head, one decode token): a model
            # meets several such variants per function, more than the default limit of 8 with some
            import torch._dynamo
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(*args)

    wrapper.reference = fn
    return wrapper
