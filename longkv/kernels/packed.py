"""Reading packed KV tiles in Triton: the pieces `kernels/quant.py`'s decode kernel is built from.

- `codes` / `words`: the integer codes of a tile of rows (tokens) × channels from one or two bit
  planes (`quant_reference.pack`), one 32-bit vector load per row, unpacked with shifts; `codes_at`:
  the same for channels in any order (element by element).
- `pair_codes` (= `pair_tile` of `pair_words`) / `pair_perm`: a whole row's codes as a bf16/fp16 tile
  in *pair order*, two codes per 32-bit op (the magic-number trick of fast int4 GEMM kernels; see its
  docstring); the load and the conversion apart, so a loop can load a tile ahead.
- `levels`: code → level (2^23 float trick for uniform levels, a lookup for a codebook).
- `outliers`: put the full-precision outliers back into a dequantized tile.
- `prefetch` / `prefetch_tile`: Hopper's bulk L2 prefetch of a tile's code planes and statistics.
"""
import triton
import triton.language as tl


@triton.jit
def words(P, base, n, ok, w0, RW: tl.constexpr, NW: tl.constexpr, PB: tl.constexpr, N: tl.constexpr):
    """Codes (N, NW·32/PB) int32 of rows `base + n` from NW 32-bit words starting at word w0:
    one vector load per row, then shifts (channel w·CPW + j sits at bits j·PB of word w)."""
    CPW: tl.constexpr = 32 // PB
    w = tl.load(P + base + n[:, None] * RW + w0 + tl.arange(0, NW)[None, :], mask=ok[:, None], other=0)
    sh = tl.arange(0, CPW) * PB
    c = (w[:, :, None] >> sh[None, None, :]) & ((1 << PB) - 1)
    return tl.reshape(c, (N, NW * CPW))


@triton.jit
def codes(P0, P1, base0, base1, n, ok, c0: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
          PB0: tl.constexpr, PB1: tl.constexpr, N: tl.constexpr):
    """Codes of channels [c0, c0 + C) of rows n: (N, C) int32, from one or two planes (`ref.pack`)."""
    code = words(P0, base0, n, ok, c0 * PB0 // 32, D * PB0 // 32, C * PB0 // 32, PB0, N)
    if PB1 > 0:
        code = code | (words(P1, base1, n, ok, c0 * PB1 // 32, D * PB1 // 32, C * PB1 // 32, PB1, N) << PB0)
    return code


@triton.jit
def codes_at(P0, P1, base0, base1, rows, ok, ch, D: tl.constexpr, PB0: tl.constexpr, PB1: tl.constexpr):
    """Codes (N, C) int32 of channels ch (C,) of rows (N,), any order: each element from its own word
    (`codes` reads whole rows in channel order; this one serves a tile whose columns are permuted)."""
    CPW0: tl.constexpr = 32 // PB0
    w = tl.load(P0 + base0 + rows[:, None] * (D * PB0 // 32) + (ch // CPW0)[None, :], mask=ok[:, None], other=0)
    c = (w >> ((ch % CPW0) * PB0)[None, :]) & ((1 << PB0) - 1)
    if PB1 > 0:
        CPW1: tl.constexpr = 32 // PB1
        w1 = tl.load(P1 + base1 + rows[:, None] * (D * PB1 // 32) + (ch // CPW1)[None, :], mask=ok[:, None], other=0)
        c = c | (((w1 >> ((ch % CPW1) * PB1)[None, :]) & ((1 << PB1) - 1)) << PB0)
    return c


@triton.jit
def pair_codes(P, base, n, ok, D: tl.constexpr, PB: tl.constexpr, N: tl.constexpr, dt, PAIR: tl.constexpr):
    """All D codes of rows n as an (N, D) tile of dtype dt holding the integer levels, in *pair order*:
    column w·CPW + 2j + k is channel w·CPW + j + k·CPW/2 of word w (`pair_perm`), because one 32-bit
    op makes codes j and j + CPW/2 of a word at once: (word >> PB·j) & mask puts them at bits 0 and 16.
    PAIR 1 / 2 (GPU, bf16 / fp16 tiles): OR-ing the 16-bit halves into 128.0 (0x4300) / 1024.0 (0x6400)
    makes two floats 128 + code (1024 + code in fp16), and one packed subtract leaves the codes,
    exactly (the magic-number conversion of fast int4 GEMM kernels, Kim et al. 2022, "Who Says
    Elephants Can't Run?", FasterTransformer; PB <= 4 fits either mantissa). PAIR 0 (interpreter):
    the same tile through integer → dt conversions. = `pair_tile(pair_words(...))`."""
    return pair_tile(pair_words(P, base, n, ok, D, PB), D, PB, N, dt, PAIR)


@triton.jit
def pair_words(P, base, n, ok, D: tl.constexpr, PB: tl.constexpr):
    """The (N, D·PB/32) 32-bit words of rows n (0 where not ok): the load half of `pair_codes`, so a
    loop can issue the next tile's loads before it converts this one."""
    NW: tl.constexpr = D * PB // 32
    return tl.load(P + base + n[:, None] * NW + tl.arange(0, NW)[None, :], mask=ok[:, None], other=0)


@triton.jit
def pair_tile(w, D: tl.constexpr, PB: tl.constexpr, N: tl.constexpr, dt, PAIR: tl.constexpr):
    """Words (N, D·PB/32) → the (N, D) pair-order tile of `pair_codes`."""
    CPW: tl.constexpr = 32 // PB
    HALF: tl.constexpr = CPW // 2
    MASK: tl.constexpr = ((1 << PB) - 1) * 65537
    x = w[:, :, None] >> (tl.arange(0, HALF) * PB)[None, None, :]
    lo, hi = halves(x, tl.full(x.shape, MASK, tl.int32), dt, PAIR)
    return tl.reshape(tl.join(lo, hi), (N, D))


@triton.jit
def halves(x, mask, dt, PAIR: tl.constexpr):
    """x & mask, int32 words holding two small codes (< 256) at bits 0 and 16 → (lo, hi) floats of
    dtype dt, exactly: the magic-number conversion of `pair_codes` (PAIR 1 bf16, 2 fp16, 0 plain
    conversions). On the GPU the mask and the magic number are one LOP3 ((x & mask) | magic)."""
    if PAIR == 1:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; mov.b32 c, 0x43004300; lop3.b32 t, $2, $3, c, 0xEA; sub.rn.bf16x2 t, t, c; "
            "mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [x, mask], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    elif PAIR == 2:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; mov.b32 c, 0x64006400; lop3.b32 t, $2, $3, c, 0xEA; sub.rn.f16x2 t, t, c; "
            "mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r", [x, mask], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        x = x & mask
        lo = (x & 0xFFFF).to(dt)
        hi = (x >> 16).to(dt)
    return lo, hi


@triton.jit
def pair_perm(D: tl.constexpr, PB: tl.constexpr):
    """Channel of each column of a `pair_codes` tile."""
    CPW: tl.constexpr = 32 // PB
    f = tl.arange(0, D)
    return (f // CPW) * CPW + (f % CPW) // 2 + (f % 2) * (CPW // 2)


@triton.jit
def levels(code, Lut, NUQ: tl.constexpr):
    """Code → level (fp32). Uniform levels: 2^23 + code as float bits minus 2^23 (exact; cheaper
    than an int→float conversion)."""
    if NUQ:
        return tl.load(Lut + code)
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def outliers(x, OI, OV, rows, c, N_OUT: tl.constexpr):
    for j in tl.static_range(N_OUT):
        oi = tl.load(OI + rows * N_OUT + j).to(tl.int32)
        ov = tl.load(OV + rows * N_OUT + j).to(tl.float32)
        x = tl.where(c[None, :] == oi[:, None], ov[:, None], x)
    return x


@triton.jit
def prefetch(ptr, nbytes):
    """Ask for `nbytes` (a multiple of 16, 16-byte aligned) from `ptr` into L2 (Hopper's bulk
    prefetch, one instruction from thread 0): the packed loop issues it PREFETCH tiles ahead, so
    more of HBM's latency is covered than by the one tile each program loads at a time."""
    p = ptr + tl.zeros([1], tl.int32)
    n = tl.zeros([1], tl.int32) + nbytes
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [p, n], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_tile(KP0, KP1, KS, KZ, VP0, VP1, VS, VZ, kb0, kb1, hq, srow, n0, end, D: tl.constexpr,
                   PB0: tl.constexpr, PB1: tl.constexpr, NVG: tl.constexpr, BLOCK_N: tl.constexpr,
                   FOLD_V: tl.constexpr):
    """L2 prefetch of the packed tile at rows [n0, n0 + BLOCK_N) (clipped to `end`): key and value
    code planes whose rows are whole 16-byte units, the tile's key scales, the value scales."""
    if n0 < end:
        rows = tl.minimum(end - n0, BLOCK_N)
        RB0: tl.constexpr = D * PB0 // 8
        if RB0 % 16 == 0:
            prefetch(KP0 + kb0 + n0 * (RB0 // 4), rows * RB0)
            prefetch(VP0 + kb0 + n0 * (RB0 // 4), rows * RB0)
        if PB1 > 0:
            RB1: tl.constexpr = D * PB1 // 8
            if RB1 % 16 == 0:
                prefetch(KP1 + kb1 + n0 * (RB1 // 4), rows * RB1)
                prefetch(VP1 + kb1 + n0 * (RB1 // 4), rows * RB1)
        prefetch(KS + srow, 2 * D)   # the tile's key scales and zeros (one row: BLOCK_N <= GROUP)
        prefetch(KZ + srow, 2 * D)
        if FOLD_V:
            if BLOCK_N % 8 == 0:
                prefetch(VS + hq + n0, 2 * BLOCK_N)
                prefetch(VZ + hq + n0, 2 * BLOCK_N)
        else:
            if (NVG * BLOCK_N) % 8 == 0:
                prefetch(VS + (hq + n0) * NVG, 2 * NVG * BLOCK_N)
                prefetch(VZ + (hq + n0) * NVG, 2 * NVG * BLOCK_N)
