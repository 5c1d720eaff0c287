"""Decode attention over KIVI-layout packed KV in hand-written CUDA: codes go to the tensor cores
in the MMA fragment order they are loaded in.

Why not Triton here: the Triton kernel (`kernels/quant.py`) converts a tile of codes to bf16 in one
register layout and `tl.dot` then moves it through shared memory into the MMA operand layout, and it
keeps the padded 16-row query block in registers; offline that was 7.6 SASS instructions a code at
213-254 registers (2 warps a scheduler), and it read 0.6 TB/s. Here each thread loads exactly the
32-bit words whose codes its own MMA fragment registers hold, so nothing goes through shared memory
(offline sm_90: 160 registers; ~220 instructions a 16-token step on the common path by a hand count
of the SASS, 1.7 a code; `benchmarks/quant_cuda_sass.py` counts the loop's static size, 6.4 a code, which
also holds the once-a-group query rebuild and the rare rescale; ncu's per-instruction counts on the
H200 agree: 203 a 16-token step):

- scores, tokens on the MMA's M side: S (16 tokens x 8 queries) = codes (A, 16 x 16 channels) ·
  (q∘s)ᵀ (B). Keys are quantized per channel after RoPE (KIVI, Liu et al. 2024), so a token group
  shares one scale s and zero z per channel: q·(c∘s + z) = (q∘s)·c + q·z. The scale folds into the B
  operand once per group; the codes enter as fp16 straight from the word: `(w & mask<<sub) | 0x6400..`
  (one LOP3) is two fp16 numbers 1024 + c·2^sub, exactly. 2^-sub goes into the B operand and
  1024·Σ(B operand) into the zero term, so no per-code subtraction is left. The group's rebuild is
  ~90 instructions a thread: the query sits in shared memory in B order (fp16, once a split), q∘s is one
  HMUL2 a register pair, and Σ B and q·z come from two MMAs (ones × B, z × q) in the lanes that use
  them (in fp32 with shuffles it was ~350, 27 % of the 4-bit kernel's instructions by ncu). Thread (g, t) (g = lane/4,
  t = lane%4) reads its two tokens' channels [t·D/4, (t+1)·D/4) as one vector load each; which channel
  is which MMA column is a permutation, and q∘s is built in the same one. Where every 16-token step starts
  a group (2 bits, 16-token groups) the rebuild would run every step, so there the keys are dequantized
  in registers instead (`KDQ`: c·s + z, two HFMA2 a register pair) and scored against the plain query.
- values, per token (one range a token): out = Σ_n p_n (c_n s_n + z_n) = (p∘s)·c + p·z. Oᵀ (16
  channels x 8 queries) = codes (A, 16 channels x 16 tokens) · (p∘s)ᵀ (B). The A operand pairs two
  *tokens* of one channel; one `prmt` of two token words interleaves them, then the same LOP3. The
  1024 offset comes off at the end with a running Σ of the fp16 weights (the same rounded numbers the
  MMA saw), the 2^sub per channel too. The probabilities come out of the score MMA as (token row,
  query column) and the value MMA wants (query row, token column): one `movmatrix.trans` per 8 x 8
  block, no shared memory.
- softmax: FlashAttention-4's lazy rescaling — the running maximum moves (and the accumulators are
  rescaled) only when a score passes it by more than 2^8 (`TH`), a warp vote decides.
- GQA: the query group (G <= 8) is the MMA's N side (8 columns), every KV byte is read once.
- flash-decoding: one warp a program, grid (batch·KV heads, splits); the full-precision sink + ring
  are the last splits of the same launch (32 slots a program); each split writes a partial output +
  log-sum-exp and `kivi_merge` combines them (one program a query and 32 channels, one pass: each warp
  loads its rows at once and keeps a running maximum). The split count fills the GPU in one wave (occupancy
  API). The next 16 tokens' words load into registers while these are computed; with 16-token key
  groups (kivi2) the next group's scale and zero rows are prefetched into L1 (`GPF`).
- bulk copies (`BULK`, sm_90; the default at 2 bits): lane 0 copies each 64-token stage of the split's
  codes, value ranges and key statistics into shared memory with `cp.async.bulk` (the TMA's one-dimensional
  form) on an mbarrier, two stages in flight, and the lanes read their fragment words from there. The bytes in
  flight then cost no registers and the arithmetic overlaps them: kivi2 at 128K 59.8 -> 48.5 µs a layer, decode
  0.660x -> 0.635x of full (H100, session 40). The query's words are loaded before lane 0 issues the first copies:
  issued after them, the answer waited behind the SM's twelve programs' two stages (prologue 6.4 -> 1.7 µs at 128K,
  one layer 49.2 -> 46.8 µs, decode 0.623x -> 0.616x; H100, session 46, `benchmarks/quant_timeline.py`).

- 8-bit statistics (`KS8`, `kstat=8`: bytes on a grid a group, `quant_reference.stats8`; BULK and KDQ): the stage
  carries their bytes and 16-byte grids and a pass of every lane decodes them into KDQ's pairs once a stage. 16 % fewer
  bytes, the same time (H200, session 44; H100, session 45: 52.7 against kv2's 53.1 µs a layer).
- paged (`paged_attention`, PAGED=1): Quest over key groups (`cache/select/quest_storage.py`, groups=1):
  a table lists each KV head's selected groups; a warp takes a run of whole tiles along them (a run
  may start inside a group; the run's table entries sit one a lane and a shuffle finds a tile's group),
  and the fp sink + ring splits are the same. At 4 bits and D <= 128 it is capped at 128 registers
  (`PAGED_MINB`: four warps a scheduler instead of three; 0.5-0.7 % of the 512K step, session 19).

Measured (H200, Llama-3-8B shape, BENCHMARKS.md issue 4, sessions 11-13): one layer at 128K 56.1 µs
(2.63 TB/s on every byte it reads) against the Triton kernel's 183 µs and bf16 flash-decoding's 133 µs;
decode kivi4 0.68x of bf16 full at 128K, 0.50x at 512K; kivi2 0.73x / 0.56x (0.707x at 128K with KDQ,
session 37: its loads alone take 41 of its 58 µs a layer; the codes stored tile-contiguous, one 16-byte load a lane
for a step's keys and one for its values, read no faster: session 38, H100, source in 1d9212d).
Paged, 1/8 of the groups at 512K: ~34 µs a layer inside the decode step (issue 5). Tried and measured no
faster for 4 bits: prefetching the codes into L1 1-2 tiles ahead or into L2 2-8 tiles ahead (both
removed again), several
warps a program combined in shared memory (`cw`; 5 % faster for 2 bits), register caps (`minb`),
32-token tiles; they stay as options of `defines` for `benchmarks/quant_cuda_probe.py`. Tried for 2 bits and removed
(session 42, H100, 880c52f): the layer's o_proj weight prefetched into L2 by the packed programs
(`cp.async.bulk.prefetch.L2`) while their reads leave bandwidth idle, the bulk copies marked evict-first: decode kivi2
at 128K 0.625x without, 0.637x with the prefetch, 0.631x with both (the attention 3.8 µs a layer slower, o_proj no
faster). Tried and removed (session 43, H100, b1f981f): `kivi_merge` folded into the splits kernel, each KV head's
last program (an atomic counter a head) merging the head's ~190 partial rows in one warp: kv2's attention 53.3 ->
129 µs a layer, decode 0.626x -> 0.831x (one warp's serial walk through the rows at L2 latency, after the wave has
finished, against the merge kernel's 3 µs spread over the GPU). Tried and removed (session 45, H100, source in
dc791d3): `LEAN`, 17 % fewer instructions a 64-token stage for kivi2 (1,563 -> 1,300 SASS, 142 -> 120 registers:
the softmax scale folded into the query fragments, ex2.approx for the weights, each stage's key statistics paired
once into shared memory with the codes' offsets folded in, one HFMA2 a key pair): 53.1 -> 54.1 µs a layer, decode
0.623x -> 0.624x, so the kernel is not bound by its instruction count at 128K; its folded statistics also failed the
GPU tests (0.12-0.19 off the reference; the rest of LEAN passed). Tried twice and removed: BULK's chunks handed out
from an atomic counter a KV head (DYN) so that the programs end together (session 41, source in aad010d: 0.633x ->
0.646x; session 46, source in 8112adc: the first NST chunks fixed, indices asked two ahead: 0.616x -> 0.619x, the
programs' ends 10 -> 5 µs apart but each SM's last end no earlier). A 3-6 stage
cp.async pipeline in shared memory was 8 % slower and was removed (BENCHMARKS.md).

The CUDA source is `quant_cuda.cu` beside this file. Compiled at first use with NVRTC through
`torch.cuda._compile_kernel` (PyTorch's own wrapper; the
library ships with CUDA builds of torch), one module per layout. Used by `quant.quant_decode_attention`
when `supported(...)` says so; `LONGKV_QUANT_KERNEL=triton` (or impl="triton") keeps the Triton kernel.
Reference: `quant_reference.quant_decode_attention`; GPU test: tests/test_quant_cuda.py (skipped
without a GPU: CI has none, so this file's CUDA runs only on the GPU machine).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

TILE = 16          # tokens a loop step (and a double-buffered load); 32 measured slower (more registers; with
                   # KDQ at 2 bits no faster: session 37)
GPF = None         # L1 prefetch of a key group's scale/zero rows, this many tiles ahead (0 = off; None: 1 when
                   # every tile starts a group, e.g. kivi2's 16-token groups: 72 -> 61 µs at 128K; 4-bit's
                   # 64-token groups measured 1.6 µs slower with it)
CW = 1             # warps a program (each its own stretch of tokens, combined in shared memory)
MINB = 0           # __launch_bounds__ minimum programs an SM (0 = the compiler's register choice)
# the paged kernel (Quest over key groups): warps a program, and its splits as a share of one wave's; where a
# split holds ~20 tiles (1/8 of 512K), fewer, longer splits or several warps a program leave the merge fewer
# rows (benchmarks/sparse_decode.py --paged-launches sweeps them: no gain on the H100, session 19). Its minimum
# programs an SM (MINB): at D 128 and 4 bits, 132 registers fit 3 warps a scheduler and MINB 16's 128 fit 4
# (no spills, ptxas 12.9): 512K at 1/8, H200, 7.014 -> 6.966 ms a step (3 calls: 0.5-0.7 %). Applied only to
# 4 bits at D <= 128: D 256 (252 registers) and 2 bits (136) spill under the cap.
PAGED_CW, PAGED_FRAC, PAGED_MINB = 1, 1.0, 16
# KDQ: the key codes dequantized in registers (c·s + z, two HFMA2 a register pair) against the plain query, in place
# of the group's rebuild (q∘s and the zero term from two MMA chains) at each group start. None: on for 2 bits where
# every tile starts a key group (kivi2's 16-token groups: one layer at 128K 61.5 -> 57.8 µs, decode 0.720x -> 0.707x
# of full, H200, session 37); off for 4 bits' 64-token groups (51.4 -> 53.4 µs: the rebuild is once in four tiles
# there). LONGKV_KDQ=0 / 1 forces it.
KDQ = int(os.environ["LONGKV_KDQ"]) if os.environ.get("LONGKV_KDQ") else None
# BULK (sm_90): the dense kernel's codes and statistics come into shared memory by bulk copies (the TMA's 1-D form),
# BULK_STOK tokens a stage and BULK_NST stages in flight a warp, instead of the register double buffer. None: on for
# 2 bits (16-token key groups, KDQ: one layer at 128K 59.8 -> 48.5 us, decode kivi2 0.660x -> 0.635x of full; 64-token
# groups: 51.3 -> 46.5 us a layer in the decode step, 0.627x -> 0.616x; H100, session 40); off for 4 bits (60.2 -> 59.0
# us at 32-token stages, slower at 64: the stages' shared memory costs programs an SM). LONGKV_BULK=0 / 1 forces it.
BULK = int(os.environ["LONGKV_BULK"]) if os.environ.get("LONGKV_BULK") else None
BULK_STOK = int(os.environ.get("LONGKV_BULK_STOK", 64))
BULK_NST = int(os.environ.get("LONGKV_BULK_NST", 2))
# BULK_TAIL: a split's last this many tokens in TILE-token stages (TAILT in the source), so that the compute left once
# the last bytes are in is one tile: an opt-in built in session 46 and not yet timed (0 = off).
BULK_TAIL = int(os.environ.get("LONGKV_BULK_TAIL", 0))
_MODULES: dict = {}


def source() -> str:
    """The kernels' CUDA source (read when first compiled, not at import): the shared PTX helpers
    (`ptx.cuh`) and `quant_cuda.cu`; `defines` go in front."""
    return "".join(Path(__file__).with_name(f).read_text() for f in ("ptx.cuh", "quant_cuda.cu"))


def defines(**layout) -> str:
    """The #define lines of one compiled layout (`config`'s), as NVRTC gets them in front of `source()`."""
    return lines(config(**layout))


def lines(cfg: dict) -> str:
    return "".join(f"#define {k} {v}\n" for k, v in cfg.items())


def config(*, D: int, bits: int, group: int, G: int, sink: int, ring: int, bf16: bool, tile: int | None = None,
           gpf: int | None = None, minb: int | None = None, cw: int | None = None, paged: bool = False,
           res: bool = False, load_only: bool = False, kdq: int | None = None, bulk: int | None = None,
           stok: int | None = None, nst: int | None = None, ks8: bool = False, tline: bool = False,
           tail: int | None = None) -> dict:
    """The #defines of one compiled layout, name to value (window = ring - 2·group, as the cache sizes its
    ring); tile: tokens a loop step; gpf: the key group statistics into L1 this many tiles ahead (0 = off; always
    off when paged: the next listed group's rows prefetched 1-2 tiles ahead measured no faster); minb: programs an
    SM the compiler must fit (caps registers; 0 = its own choice); cw: warps a program; paged: read the key groups a
    page table lists (Quest over key groups, `paged_attention`) instead of every quantized group; res: the keys
    carry residual bits (`kres=1`); load_only: the loads alone, no attention (a diagnostic: its output is
    meaningless); kdq: the keys dequantized in registers (None: KDQ, else on for 2 bits where every tile starts a
    key group; never with residual bits); bulk: the dense splits' bytes come by bulk copies into shared memory, stok
    tokens a stage and nst stages in flight (None: BULK, BULK_STOK, BULK_NST; never paged, with residual bits or with
    several warps a program); ks8: the key statistics as 8-bit codes on a grid (`kstat=8`), read through bulk stages
    into KDQ (KS8 is 0 in a layout without both: the caller then hands the kernel fp16 statistics); tline: each program
    writes when it started and ended (the diagnostic TLINE, `benchmarks/quant_timeline.py`); tail: with bulk, a split's
    last this many tokens in one-tile stages (None: BULK_TAIL)."""
    cfg = dict(D=D, BITS=bits, GROUP=group, G=G, SINK=sink, RING=ring, WINDOW=ring - 2 * group, QBF16=int(bf16),
               TILE=tile or TILE,
               GPF=0 if paged else gpf if gpf is not None else GPF if GPF is not None else int(group <= (tile or TILE)),
               MINB=MINB if minb is None else minb, CW=CW if cw is None else cw, PAGED=int(paged), RES=int(res),
               LOADONLY=int(load_only))
    kdq = kdq if kdq is not None else KDQ if KDQ is not None else int(bits == 2 and group <= cfg["TILE"])
    cfg["KDQ"] = 0 if res else int(kdq)
    bulk = bulk if bulk is not None else BULK if BULK is not None else bits == 2 and not gpf   # (gpf asks for registers)
    bulk = int(bulk) and not (paged or res or cfg["CW"] > 1)
    cfg.update(BULK=int(bulk), NST=nst or BULK_NST, STOK=stok or BULK_STOK)
    cfg["KS8"] = int(bool(ks8) and bool(bulk) and bool(cfg["KDQ"]) and not load_only)
    if tline:
        cfg["TLINE"] = 1
    if bulk:
        cfg["GPF"] = 0
        if cfg["STOK"] % cfg["TILE"] or (cfg["STOK"] % group and group % cfg["STOK"]):
            raise ValueError(f"bulk stages of {cfg['STOK']} tokens must be whole {cfg['TILE']}-token tiles and whole "
                             f"key groups of {group} (or a whole fraction of one)")
        tail = BULK_TAIL if tail is None else tail
        if tail:
            if tail % max(cfg["TILE"], group) or cfg["TILE"] % group and group % cfg["TILE"]:
                raise ValueError(f"tail={tail}: whole key groups of {group} tokens in {cfg['TILE']}-token stages")
            cfg["TAILT"] = tail
    return cfg


def smem_bytes(*, D: int, G: int, cw: int, cfg: dict | None = None) -> int:
    """Static shared memory of a program: the query fragments (2 arrays of D/8 words a lane, a warp) and,
    for several warps a program, their partial results; with BULK (`cfg`'s), its stages."""
    q = cw * 2 * (D // 8) * 32 * 4
    n = cw * G * (D + 1) * 4 if cw > 1 else 0
    if cfg and cfg["BULK"]:
        n += cfg["NST"] * (_stage_bytes(cfg) + 8)
    if cfg and cfg.get("KS8"):   # the stage's statistics rebuilt as fp16 pairs (SGR x 4 x KCW words)
        q += max(1, cfg["STOK"] // cfg["GROUP"]) * 4 * (4 * (D // 16) + 4) * 4
    return n + q


def _stage_bytes(cfg: dict) -> int:
    """A BULK stage's shared memory (the source's `Stage`: codes, value ranges, key statistics rows (KS8: bytes and
    16-byte grids); 128-aligned)."""
    st, gr, D = cfg["STOK"], max(1, cfg["STOK"] // cfg["GROUP"]), cfg["D"]
    stats = gr * (2 * D + 16) if cfg.get("KS8") else 4 * gr * D
    return -(-(2 * st * D * cfg["BITS"] // 8 + 4 * st + stats) // 128) * 128


# The keys' residual bits (`kres=1`, RES in the source): built offline (session 30); the kernels passed their GPU test
# on an H100 (session 31), and the caches' graph step reading them matched the torch reading there (session 32), so
# on by default; LONGKV_KRES_CUDA=0 turns it off (such a cache then attends in torch, for comparison).
RES_CUDA = os.environ.get("LONGKV_KRES_CUDA", "1") != "0"


def reads_res(bits: int, head_dim: int, device) -> bool:
    """Whether these kernels read keys' residual bits there (RES_CUDA, 4 bits, head dim >= 128, a GPU): the caches
    that hold them attend through the kernels then, and through the torch reference otherwise."""
    return RES_CUDA and bits == 4 and head_dim >= 128 and torch.device(device).type == "cuda"


def supported(q: torch.Tensor, kq: dict, *, bits: int, group: int, vgroup: int, prerope: bool,
              lut_k=None, lut_v=None, G: int) -> bool:
    """The layouts this kernel reads: KIVI's (keys after RoPE, per channel), one plane of 2- or
    4-bit uniform codes, one value range a token, no outliers; G <= 8 queries a KV head; head dim
    64/128/256 with whole words for each thread; bf16/fp16 on sm_80 or later."""
    D = q.shape[-1]
    if os.environ.get("LONGKV_QUANT_KERNEL", "") == "triton" or not q.is_cuda:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or torch.cuda.get_device_capability(q.device)[0] < 8:
        return False
    if "res" in kq and not reads_res(bits, D, q.device):
        return False
    return (not prerope and bits in (2, 4) and len(kq["planes"]) == 1 and "out_idx" not in kq
            and lut_k is None and lut_v is None and vgroup == D and 1 <= G <= 8 and D in (64, 128, 256)
            and D * bits >= 256 and group >= 16)


class Unavailable(RuntimeError):
    """The kernel could not be built here (no NVRTC, an old driver, an unknown GPU): use the Triton one."""


def _kernels(cfg: str, warps: int):
    """(splits kernel, merge kernel, programs the whole GPU holds at once) for a layout of `warps`-warp
    programs."""
    if cfg not in _MODULES:
        import ctypes
        src = cfg + source()
        try:
            from torch.cuda import _compile_kernel
            from torch.cuda._utils import _get_gpu_runtime_library
            attn, mrg = _compile_kernel(src, "kivi_attn"), _compile_kernel(src, "kivi_merge")
        except (ImportError, OSError, RuntimeError) as e:   # no NVRTC library, or it refused the source
            why = str(e).splitlines()[0] if str(e) else repr(e)
            _MODULES[cfg] = Unavailable(f"CUDA decode kernel not built: {why}")
        else:
            n = ctypes.c_int()
            _get_gpu_runtime_library().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(n), attn.func, 32 * warps, ctypes.c_size_t(0))
            _MODULES[cfg] = (attn, mrg, max(1, n.value) * torch.cuda.get_device_properties().multi_processor_count)
    if isinstance(_MODULES[cfg], Unavailable):
        raise _MODULES[cfg]
    return _MODULES[cfg]


def num_splits(slots: int, heads: int, fp_splits: int) -> int:
    """Packed programs a KV head so that every program of the launch is resident at once (one wave:
    with programs of equal work a second, partial wave costs a whole program's time)."""
    return max(1, slots // max(heads, 1) - fp_splits)


MERGE_WARPS = 16    # MW in the source


def decode_attention(q, kq: dict, vq: dict, kf, vf, length, *, bits: int, group: int, sink: int, window: int,
                     scale: float, splits: int | None = None, tile: int | None = None,
                     gpf: int | None = None, minb: int | None = None, cw: int | None = None, parts: bool = False,
                     load_only: bool = False, kdq: int | None = None, bulk: int | None = None,
                     stok: int | None = None, nst: int | None = None, tline: torch.Tensor | None = None,
                     tail: int | None = None):
    """q (B, Hq, 1, D) post-RoPE; one layer's packed KIVI-layout cache (`cache/quant.py`), kf/vf its
    full-precision sink + ring; length (1,) int64 on the device. Returns (B, Hq, 1, D) in q's dtype.
    parts=True returns (the two launches as closures, out, splits) instead (benchmarks/quant_cuda_probe.py).
    bulk / stok / nst: `config`'s (bulk copies into shared memory; sm_90 and 16-byte aligned storage only, else the
    register double buffer); tail: `config`'s. tline: an int64 tensor of >= 8 entries a program (B·H·(splits + fp
    splits)) that each program fills with its SM and timestamps (the diagnostic TLINE; `quant_timeline.py` reads it)."""
    return _launch(q, kq, vq, kf, vf, length, bits=bits, group=group, sink=sink, window=window, scale=scale,
                   splits=splits, tile=tile, gpf=gpf, minb=minb, cw=cw, parts=parts, load_only=load_only, kdq=kdq,
                   bulk=bulk, stok=stok, nst=nst, tline=tline, tail=tail)


def paged_attention(q, kq: dict, vq: dict, kf, vf, length, table, nsel, *, row_pages: int, bits: int, group: int,
                    sink: int, window: int, scale: float, splits: int | None = None, cw: int | None = None,
                    minb: int | None = None, frac: float | None = None, parts: bool = False,
                    load_only: bool = False, kdq: int | None = None):
    """Quest over key groups (`cache/select/quest_storage.py`): as `decode_attention`, but of the quantized
    region only the key groups listed in `table` (B·Hkv, K) int32 (global ids bh·row_pages + group index,
    ascending and inside the packed region, as `select_pages` over `kernels/quest.py: group_scores` lists
    them; a row's first min(nsel[bh], packed groups) entries are read); the full-precision sink and ring
    are always read. cw / frac / minb: warps a program, the splits' share of one wave and the minimum programs
    an SM (None: PAGED_CW / PAGED_FRAC, and PAGED_MINB for 4 bits at D <= 128 without residual bits, else 0);
    load_only: as `decode_attention`'s (the diagnostic).
    Reference: `quant_reference.quant_group_attention`."""
    if group % TILE:
        raise Unavailable(f"CUDA paged kernel: key groups of {group} tokens are not whole {TILE}-token tiles")
    return _launch(q, kq, vq, kf, vf, length, bits=bits, group=group, sink=sink, window=window, scale=scale,
                   splits=splits, cw=PAGED_CW if cw is None else cw, parts=parts,
                   # (not with the keys' residual bits: at 128 registers the RES loop spills 76 bytes, offline SASS)
                   minb=(PAGED_MINB if bits == 4 and q.shape[-1] <= 128 and "res" not in kq else 0) if minb is None
                   else minb,
                   frac=PAGED_FRAC if frac is None else frac, load_only=load_only, kdq=kdq,
                   paged=(table, nsel.reshape(-1).expand(table.shape[0]).contiguous(), row_pages))


def expand_stats(kq: dict) -> dict:
    """A key dict with 8-bit statistics (`kstat=8`) as one with fp16 scale and zero rows (`ref.key_stats`), for the
    kernels that read only those: graph-safe, but each call writes every group's rows (smaller, not faster)."""
    if "grid" not in kq:
        return kq
    from . import quant_reference as ref
    scale, zero = ref.key_stats(kq)
    return {k: v for k, v in kq.items() if k != "grid"} | {"scale": scale, "zero": zero}


def _bulk_ok(q, kq, vq) -> bool:
    """Bulk copies need sm_90 and 16-byte aligned sources (each tensor's start; rows and stages are whole 16-byte
    units at these layouts)."""
    ts = [kq["planes"][0], vq["planes"][0], kq["scale"], kq["zero"], vq["scale"], vq["zero"]] + (
        [kq["grid"]] if "grid" in kq else [])
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9 and all(t.data_ptr() % 16 == 0 for t in ts)
            and kq["planes"][0].shape[2] % 8 == 0)


def _launch(q, kq, vq, kf, vf, length, *, bits, group, sink, window, scale, splits=None, tile=None, gpf=None,
            minb=None, cw=None, parts=False, paged=None, frac=1.0, load_only=False, kdq=None, bulk=None, stok=None,
            nst=None, tline=None, tail=None):
    B, Hq, _, D = q.shape
    H = kf.shape[1]
    G = Hq // H
    ring = kf.shape[2] - sink
    if ring != window + 2 * group or kf.dtype != q.dtype or vf.dtype != q.dtype or not (kf.is_contiguous()
                                                                                         and vf.is_contiguous()):
        raise Unavailable("CUDA decode kernel: the full-precision ring is not laid out as `cache/quant.py` keeps it")
    length = length if length.dtype == torch.int64 else length.long()
    cap = kq["planes"][0].shape[2]
    bulk = bulk if paged is None and _bulk_ok(q, kq, vq) else 0    # (None: `config` decides)
    layout = config(D=D, bits=bits, group=group, G=G, sink=sink, ring=ring, bf16=q.dtype == torch.bfloat16, tile=tile,
                    gpf=gpf, minb=minb, cw=cw, paged=paged is not None, res="res" in kq, load_only=load_only, kdq=kdq,
                    bulk=bulk, stok=stok, nst=nst, ks8="grid" in kq, tline=tline is not None, tail=tail)
    if "grid" in kq and not layout["KS8"]:   # 8-bit key statistics outside KS8's layout: handed over as fp16 rows
        kq = expand_stats(kq)
    cfg = lines(layout)
    warps = CW if cw is None else cw
    if smem_bytes(D=D, G=G, cw=warps, cfg=layout) > 48 * 1024:
        raise Unavailable(f"CUDA decode kernel: {warps} warps a program need more than 48 KiB of shared memory here")
    attn, mrg, slots = _kernels(cfg, warps)
    fps = -(-((sink + ring + 31) // 32) // warps)    # programs of the full-precision splits (FPC)
    S = splits or max(1, int(num_splits(slots, B * H, fps) * frac))
    if paged is not None:
        table, nsel, row_pages = paged
        S = S if splits else min(S, max(1, table.shape[1]))   # no more programs a row than listed groups
        extra = [table, nsel, int(table.stride(0)), int(row_pages)]
    else:
        extra = [length if tline is None else tline, length, 0, 0]   # unused pointers of the right kind (or TLINE's)
    S1 = S + fps
    if tline is not None and (paged is not None or tline.dtype != torch.int64 or tline.numel() < 8 * B * H * S1):
        raise ValueError(f"tline: {8 * B * H * S1} int64 entries for the dense kernel's {B * H * S1} programs")
    part = torch.empty(B * H * S1 * G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * H * S1 * G, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    q = q.contiguous()
    kp, vp = kq["planes"][0].view(torch.int32), vq["planes"][0].view(torch.int32)

    def run_attn():
        attn(grid=(B * H, S1, 1), block=(32 * warps, 1, 1),
             args=[q, length, kp, kq["scale"], kq["zero"], vp, vq["scale"], vq["zero"], kf, vf, part, lse,
                   float(scale * math.log2(math.e)), int(S), int(cap), *extra,
                   kq["res"].view(torch.int32) if "res" in kq else kp, kq["grid"] if "grid" in kq else kp])

    def run_merge():
        mrg(grid=(B * Hq, D // 32, 1), block=(32 * MERGE_WARPS, 1, 1), args=[part, lse, out, int(S1)])

    if parts:
        return run_attn, run_merge, out, S
    run_attn()
    run_merge()
    return out
