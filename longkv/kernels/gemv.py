"""One-token projections (batch-1 decode) as a Triton GEMV, with the small ops around them folded in.

At batch 1 a decode step is a chain of matrix-vector products that read the weights once: bound by
bytes, not arithmetic. cuBLAS's kernels for them read the Llama-3-8B shapes at 2.40-2.85 TB/s on an
H100 (BENCHMARKS.md, issue 4, session 41) against ~3.0 TB/s for a plain copy, and every projection
sits between small kernels (RMSNorm, SiLU·mul, residual adds, split-K reduces) that each cost a
launch. This kernel is one program per `BN` output rows streaming `BN x BK` weight tiles, and it
takes over those neighbours:

- `norm=g`: the input is RMSNorm(x) * g, computed by each program from x (x is a few KB and sits in
  L2; its sum of squares accumulates beside the dot), so the norm kernel before qkv, gate/up and the
  head goes;
- `act="silu"|...`: the weight holds gate rows then up rows (`MLP.fuse`); each program reads row n of
  both and writes act(g_n) * u_n, so gate/up's output and the SiLU·mul kernel go;
- `res=r`: writes r + W x (the residual add after o_proj and down).

Rounding follows the unfused GPU path (torch.compile'd elementwise kernels): the projection's output
is rounded to the activation dtype before the activation or the residual add, which run in fp32 and
round once. One difference: the normed input is not rounded to bf16 before the dot (the unfused
path's norm kernel writes it in bf16), so the fused form is the more exact by that rounding. The
plain-torch `reference` is the specification; the tests compare the two on CPU under
TRITON_INTERPRET=1 and on the GPU.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU installs without Triton: `enabled()` is then False
    triton = None

ACTS = {None: 0, "silu": 1, "gelu_pytorch_tanh": 2, "gelu": 3}
# the gated weight's rows interleaved at load (`interleave`, `MLP.fuse`), so each gated program reads one contiguous
# run of 2·BN rows rather than two runs 117 MB apart (8B shape). Built in session 43, timed by `gpu_batch.sh ilv`;
# LONGKV_GEMV_ILV=1 turns it on.
ILV = os.environ.get("LONGKV_GEMV_ILV", "0") == "1"


def _act(g: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if kind == "gelu_pytorch_tanh" else "none")


def reference(x, w, b=None, *, norm=None, eps: float = 1e-6, act=None, res=None, out_dtype=None):
    """Plain torch: y = [r +] W·[RMSNorm(x)·g] [+ b], or act(W_g·x) * (W_u·x) when `act` is set."""
    xf = x.float()
    if norm is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    xin = xf.to(x.dtype)
    y = F.linear(xin, w, b)
    if act is not None:
        g, u = y.chunk(2, dim=-1)
        y = (_act(g.float(), act) * u.float()).to(x.dtype)
    if res is not None:
        y = (res.float() + y.float()).to(res.dtype)
    return y.to(out_dtype) if out_dtype is not None else y


def enabled(x: torch.Tensor) -> bool:
    """The model's decode takes this path for one row on CUDA. LONGKV_GEMV=0 turns it off; =cpu also takes
    it on CPU under TRITON_INTERPRET=1 (the tests' tiny models)."""
    mode = os.environ.get("LONGKV_GEMV", "1")
    if triton is None or mode == "0" or x.numel() != x.shape[-1]:
        return False
    return x.is_cuda or (mode == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=4)
def _table(path: str) -> dict:
    """LONGKV_GEMV_TABLE's file, read once (eager decode asks `config` at every projection of every step)."""
    with open(path) as f:
        return json.load(f)


def config(n: int, k: int, gated: bool = False) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) for n outputs of a K-long row (`gated`: two weight rows an output). LONGKV_GEMV_TABLE
    names a JSON file of {"n,k": [BN, BK, warps, stages]} (what benchmarks/gemv_probe.py's sweep writes) that
    overrides it."""
    table = os.environ.get("LONGKV_GEMV_TABLE")
    got = _table(table).get(f"{n},{k}") if table else None
    if got:
        return tuple(got)
    # gemv_probe.py's sweeps (H100, session 42; the fused forms at 5 tiles after 23 plain ones): 2 rows x 1,024 columns
    # a tile for qkv, o_proj and down (21.5, 13.5, 41.6 µs against cuBLAS's 20.2, 15.6, 42.6 without the ops around
    # it), 4 x 512 for the gated gate/up and the head; 4 warps; one stage (Triton pipelines only loads that feed
    # tl.dot: no cp.async in the PTX at 3). In the decode step these took full at 128K from 11.75 to 11.57 ms where
    # 4 x 1,024 everywhere (the plain sweep's near-best) had been 1.5 % slower.
    if gated or n >= 65536:
        return 4, 512, 4, 1
    return 2, 1024, 4, 1


def interleave(w: torch.Tensor, block: int) -> torch.Tensor:
    """A gated weight's rows [gate; up] (2n, K) reordered as blocks of `block` gate rows, each followed by the same
    outputs' up rows, so a gated GEMV program reads one contiguous run of 2·block rows (`gemv(..., ilv=block)`).
    n must be a multiple of `block`. `deinterleave` undoes it on a matmul's output."""
    n2, k = w.shape
    return w.view(2, n2 // 2 // block, block, k).transpose(0, 1).reshape(n2, k)


def deinterleave(y: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) from y = x @ interleave(w, block).T, each (..., n)."""
    v = y.unflatten(-1, (-1, 2, block))
    return v[..., 0, :].flatten(-2), v[..., 1, :].flatten(-2)


def gemv(x, w, b=None, *, norm=None, eps: float = 1e-6, act=None, res=None, out_dtype=None, cfg=None, ilv: int = 0):
    """x (..., K) holding one row; w (N, K) contiguous in its rows (N = 2 * outputs with `act`).
    Returns (..., outputs) in `out_dtype` (default x's dtype). `cfg` (BN, BK, warps, stages) overrides `config`.
    ilv: w is `interleave(w, ilv)` (gated only; BN is then ilv); b, if given, stays [gate; up]."""
    K = x.shape[-1]
    rows = w.shape[0]
    n = rows // 2 if act is not None else rows
    assert w.shape[1] == K and w.stride(1) == 1, "weight must be (N, K) with contiguous rows"
    y = torch.empty(*x.shape[:-1], n, device=x.device, dtype=out_dtype or x.dtype)
    xc = x.reshape(K).contiguous()
    bn, bk, warps, stages = cfg or config(n, K, act is not None)
    if ilv:
        assert act is not None and n % ilv == 0, "interleaved rows: gated weights, n a multiple of the block"
        bn = ilv
    bk = min(bk, triton.next_power_of_2(K))
    dummy = xc
    _gemv_kernel[(triton.cdiv(n, bn),)](
        xc, w, y, b if b is not None else dummy, res.reshape(n) if res is not None else dummy,
        norm if norm is not None else dummy, n, K, w.stride(0), bn if ilv else n, n, eps,
        BN=bn, BK=bk, NORM=norm is not None, ACT=ACTS[act],
        BIAS=b is not None, RES=res is not None, ILV=bool(ilv), num_warps=warps, num_stages=stages)
    return y


if triton is not None:
    @triton.jit
    def _act_fn(g, ACT: tl.constexpr):
        if ACT == 1:
            return g / (1.0 + tl.exp(-g))
        elif ACT == 2:
            t = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(t))                  # tanh(|t|) without overflow
            th = (1.0 - e) / (1.0 + e)
            th = tl.where(t < 0, -th, th)
            return 0.5 * g * (1.0 + th)
        else:
            return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))

    @triton.jit
    def _gemv_kernel(X, W, Y, B, R, G, N, K, stride_w, up_off, b_off, eps,
                     BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                     ACT: tl.constexpr, BIAS: tl.constexpr, RES: tl.constexpr, ILV: tl.constexpr = False):
        """Program p: outputs [p*BN, p*BN + BN). Weight tiles BN x BK, accumulated elementwise in fp32 and
        reduced once at the end; with ACT also the up rows (n + up_off), a second tile a step. NORM: the tiles meet
        x * g and x's sum of squares accumulates alongside, so the row's 1 / rms scales the sums at the end
        (W (x g) / rms = W (x g / rms)): no pass over x before the first weight load (as a prologue it cost ~1 µs a
        program at qkv). ILV: the weight's rows interleaved (`interleave`): this program's gate rows start at
        2·BN·p and its up rows follow them (up_off = BN), one contiguous run."""
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        nmask = rn < N
        g0 = pid * 2 * BN if ILV else pid * BN
        wrow = W + (g0 + tl.arange(0, BN)).to(tl.int64)[:, None] * stride_w
        rk = tl.arange(0, BK)
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
        ss = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            xv = tl.load(X + kk, mask=kmask, other=0.0).to(tl.float32)
            if NORM:
                ss += xv * xv
                xv = xv * tl.load(G + kk, mask=kmask, other=0.0).to(tl.float32)
            xf = xv[None, :]
            m2 = nmask[:, None] & kmask[None, :]
            acc += tl.load(wrow + kk[None, :], mask=m2, other=0.0).to(tl.float32) * xf
            if ACT != 0:
                acc2 += tl.load(wrow + up_off * stride_w + kk[None, :], mask=m2, other=0.0).to(tl.float32) * xf
        rstd = 1.0
        if NORM:
            rstd = tl.rsqrt(tl.sum(ss, 0) / K + eps)
        y = tl.sum(acc, 1)
        u = tl.sum(acc2, 1) * rstd
        y = y * rstd
        if BIAS:
            y += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)
        if ACT != 0:
            if BIAS:
                u += tl.load(B + b_off + rn, mask=nmask, other=0.0).to(tl.float32)
            g = y.to(X.dtype.element_ty).to(tl.float32)
            y = _act_fn(g, ACT) * u.to(X.dtype.element_ty).to(tl.float32)
        if RES:
            y = tl.load(R + rn, mask=nmask, other=0.0).to(tl.float32) + y.to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=nmask)
