// Decode attention over KIVI-layout packed KV, one layer: the CUDA source of `quant_cuda.py` (see its
// docstring for the design and the figures). Compiled by NVRTC with a block of #defines in front
// (`quant_cuda.defines`): D, BITS, GROUP, G, SINK, RING, WINDOW, QBF16, TILE, GPF, MINB, CW, PAGED, RES,
// LOADONLY, KDQ, BULK, NST, STOK; then ptx.cuh (the shared typedefs and PTX helpers), then this file.
// BULK (sm_90, dense splits, one warp a program, no residual bits): the split's codes and statistics come into shared
// memory by bulk copies (`cp.async.bulk`, the TMA's one-dimensional form), STOK tokens a stage and NST stages in
// flight on an mbarrier each, issued by lane 0; the lanes then read their fragment words from shared memory. Bytes in
// flight no longer cost registers (the register double buffer holds one 16-token step a warp).
// KDQ (not with RES): the key codes dequantized in registers (c·s + z in fp16, two HFMA2 a register pair) against
// the plain query, instead of the scale folded into the query and the zero term from MMAs at each group start.
// RES (`kres=1`, 4-bit codes, D >= 128): a residual bit a key element (`quant_reference.pack_res`, 32 channels a
// word, each code pair's bits 16 apart) read with the codes; a key is z + s·(c + r/2 - 1/4).
#if KDQ && RES
#error "KDQ does not read residual bits"
#endif
#if BULK && (PAGED || RES || CW > 1 || GPF)
#error "BULK reads dense splits of one warp a program, without residual bits or the L1 prefetch"
#endif
/* KS8 (`kstat=8`): the key statistics as 8-bit codes, KS / KZ bytes (B, H, groups, D) and a grid KG (B, H, groups, 8)
   fp16 [zlo, zstep, smax, 0...]: scale = smax·2^(-e/16), zero = zlo + zc·zstep (`quant_reference.stats8`). Each
   stage's bytes are rebuilt in shared memory once, by all lanes, as fp16 pairs in the order KDQ's registers take
   them (`convert8`), so the per-step reading is 8 vector loads and no PRMTs. */
#ifndef KS8
#define KS8 0
#endif
/* TLINE (a diagnostic, `benchmarks/quant_timeline.py`): each program writes 8 u64 at Table[(bh·S1 + split)·8]: its
   SM, then %globaltimer at its start, after its prologue, when its first and its last stage had arrived (BULK), after
   its loop and at its end, then 0 (packed) / 1 (full precision) */
#ifndef TLINE
#define TLINE 0
#endif
#if TLINE && PAGED
#error "TLINE times the dense splits"
#endif
#if TLINE
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
/* one program's record (lane 0): tl = start, prologue, first and last stage in, loop's end (0 where not stamped) */
__device__ __forceinline__ void tl_put(const int* table, i64 prog, const unsigned long long* tl, int fp) {
  unsigned long long* T = (unsigned long long*)table + prog * 8;
  u32 sm; asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  T[0] = sm;
  for (int i = 0; i < 5; i++) T[1 + i] = tl[i];
  T[6] = gtime(); T[7] = fp;
}
#endif
#if KS8 && !(BULK && KDQ && !LOADONLY)
#error "KS8 reads its statistics through BULK stages into KDQ's dequantization"
#endif
typedef unsigned char u8;
struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) U2 { u32 x, y; };
struct alignas(8) F2 { float x, y; };

#define W (D * BITS / 32)          /* 32-bit words a token row */
#define KW (W / 4)                 /* key words a thread a token */
#define VW (W / 8)                 /* value words a thread a token */
#define KSTEPS (D / 16)
#define PPW (16 / BITS)            /* code pairs in a 32-bit word; a pair is codes (j, j + PPW) */
#define CPW (32 / BITS)            /* codes in a word */
#define CMASK (BITS == 4 ? 0x000F000Fu : 0x00030003u)
#define MB (D / 16)
#define SUB (TILE / 16)
#define STEP (TILE > GROUP ? TILE : GROUP)
#define NEG_INF (__int_as_float(0xff800000))
#define KRW (D / 128)              /* residual words a thread a token (RES) */

__device__ __forceinline__ u32 trans(u32 x) {
  u32 r; asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x)); return r;
}
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <int N> __device__ __forceinline__ void ldw(u32* dst, const u32* src) {   /* N words, vector loads */
  if (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) { U4 v = *(const U4*)(src + i); dst[i] = v.x; dst[i+1] = v.y; dst[i+2] = v.z; dst[i+3] = v.w; }
  } else if (N == 2) { U2 v = *(const U2*)src; dst[0] = v.x; dst[1] = v.y; }
  else { dst[0] = src[0]; }
}

struct Buf {
  u32 k[SUB][2][KW]; u32 v[SUB][4][VW]; u16 vs[SUB][2]; u16 vz[SUB][2];
#if RES
  u32 kr[SUB][2][KRW];
#endif
};

/* tile t0: the thread's words (16-token steps past the end are not loaded; `tile` skips them) */
__device__ __forceinline__ void load(Buf& b, const u32* kp, const u32* vp, const u16* vs, const u16* vz,
                                     const u16* ks, const u16* kz, int t0, int end, int g, int t, const u32* krp) {
#if GPF
  /* the key group starting GPF tiles after this one: its scale and zero rows (this thread's part) into
     L1, so that the query rebuild at its first tile does not wait a DRAM latency */
  {
    const int tg = t0 + GPF * TILE;
    if (tg % GROUP == 0 && tg < end) {
      asm volatile("prefetch.global.L1 [%0];" :: "l"(ks + (i64)(tg / GROUP) * D));
      asm volatile("prefetch.global.L1 [%0];" :: "l"(kz + (i64)(tg / GROUP) * D));
    }
  }
#endif
#pragma unroll
  for (int u = 0; u < SUB; u++) {
    int tok = t0 + 16 * u;
    if (tok < end) {
#pragma unroll
      for (int r = 0; r < 2; r++) {
        int row = tok + g + 8 * r;
        ldw<KW>(b.k[u][r], kp + (i64)row * W + t * KW);
#if RES
        ldw<KRW>(b.kr[u][r], krp + (i64)row * (D / 32) + t * KRW);
#endif
        b.vs[u][r] = vs[row];
        b.vz[u][r] = vz[row];
      }
#pragma unroll
      for (int e = 0; e < 4; e++) ldw<VW>(b.v[u][e], vp + (i64)(tok + 2 * t + (e & 1) + 8 * (e >> 1)) * W + g * VW);
    }
  }
}

#if BULK
/* One stage of a split in shared memory: STOK tokens' key and value codes and value ranges, and the key groups'
   scale and zero rows they lie in (SGR rows; a stage lies inside one group where groups are longer than a stage).
   Every member is a whole number of 16-byte units (STOK % 8 == 0), as the bulk copies need. */
#define SGR (STOK >= GROUP ? STOK / GROUP : 1)
#if KS8
struct alignas(128) Stage { u32 k[STOK * W]; u32 v[STOK * W]; u16 vs[STOK]; u16 vz[STOK];
                            u8 ks[SGR * D]; u8 kz[SGR * D]; u16 kg[SGR * 8]; };
typedef u8 kstat_t;
#define KCW (4 * KSTEPS + 4)         /* KS8: a thread-column's rebuilt words a group (scale pairs, zero pairs, 4 padding
                                        words so that the four columns' 16-byte reads fall in different banks) */
#else
struct alignas(128) Stage { u32 k[STOK * W]; u32 v[STOK * W]; u16 vs[STOK]; u16 vz[STOK]; u16 ks[SGR * D]; u16 kz[SGR * D]; };
typedef u16 kstat_t;
#endif
typedef unsigned long long u64;
__device__ __forceinline__ u32 sptr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void bar_init(u64* b) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sptr(b)) : "memory");
}
__device__ __forceinline__ void bulk(void* dst, const void* src, u32 bytes, u64* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(sptr(dst)), "l"(src), "r"(bytes), "r"(sptr(b)) : "memory");
}
__device__ __forceinline__ void bar_wait(u64* b, u32 parity) {
  u32 ok;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok) : "r"(sptr(b)), "r"(parity) : "memory");
  } while (!ok);
}
/* A split's stages: n tokens in STOK-token stages (the last one shorter), or with TAILT (an opt-in, not yet timed:
   session 46) its last TAILT tokens in TILE-token stages and the rest in STOK-token stages (the first one shorter),
   so that what is left to compute once a program's last bytes are in is one tile, not a whole stage: every program of
   the one wave reaches that point together, and the DRAM is idle while they compute it. Offset and length of stage i
   (whole tiles, whole key groups or inside one). */
#ifndef TAILT
#define TAILT 0
#endif
#if TAILT
__device__ __forceinline__ int nstages(int n) {
  const int head = n > TAILT ? n - TAILT : 0;
  return (head + STOK - 1) / STOK + (n - head + TILE - 1) / TILE;
}
__device__ __forceinline__ int soff(int i, int n) {
  const int head = n > TAILT ? n - TAILT : 0, big = (head + STOK - 1) / STOK;
  return i < big ? (i == 0 ? 0 : head - (big - i) * STOK) : head + (i - big) * TILE;
}
__device__ __forceinline__ int slen(int i, int n) {
  const int head = n > TAILT ? n - TAILT : 0, big = (head + STOK - 1) / STOK;
  return i < big ? (i == 0 ? head - (big - 1) * STOK : STOK) : min(TILE, n - soff(i, n));
}
#endif
/* lane 0: tokens [s0, s0 + n) of the head's rows (kp, vp, vs, vz at token 0; ks, kz at group 0) into stage sg */
__device__ __forceinline__ void issue(Stage& sg, u64* b, const u32* kp, const u32* vp, const u16* vs, const u16* vz,
                                      const kstat_t* ks, const kstat_t* kz, int s0, int n, const u16* kg) {
  const u32 cb = n * W * 4, sb = n * 2, gb = ((n + GROUP - 1) / GROUP) * D * sizeof(kstat_t);
  const u32 gg = KS8 ? ((n + GROUP - 1) / GROUP) * 16 : 0;    /* KS8: the groups' grids */
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sptr(b)), "r"(2 * (cb + sb + gb) + gg)
               : "memory");
#if KS8
  bulk(sg.kg, kg + (i64)(s0 / GROUP) * 8, gg, b);
#endif
  bulk(sg.k, kp + (i64)s0 * W, cb, b);
  bulk(sg.v, vp + (i64)s0 * W, cb, b);
  bulk(sg.vs, vs + s0, sb, b);
  bulk(sg.vz, vz + s0, sb, b);
  bulk(sg.ks, ks + (i64)(s0 / GROUP) * D, gb, b);
  bulk(sg.kz, kz + (i64)(s0 / GROUP) * D, gb, b);
}
#endif

struct State {
  float m0, m1, l0, l1, z0, z1, p0, p1, cq0, cq1;   /* queries 2t, 2t+1 (p: Σ of the fp16 value weights) */
  float acc[MB][4];
  u32 qf[KSTEPS][2];
#if KDQ
  u32 sk[KSTEPS][2], zk[KSTEPS][2];                /* the group's scale and zero pairs, in the codes' pair order */
#endif
};


/* The query in the score MMA's B-operand order (thread t holds channels t·D/4 + a, a + PPW, ... of query
   g; see group_stats), fp16, once a split into shared memory: qb with each pair's 2^-sub folded in (the
   codes come as 1024 + c·2^sub, `raw`), qn without. Layout [word / 4][lane][word % 4]: 128-bit loads,
   no bank conflicts. */
#define QW (2 * KSTEPS)                               /* words a lane an array */
#define QOFF (QW * 32)                                /* qn's offset */
#define QSMW (2 * QW * 32)
__device__ __forceinline__ void query_frags(u32* qsm, const u32* qw, float qok, int lane) {
  float qv[D / 4];
#pragma unroll
  for (int i = 0; i < D / 4; i++) qv[i] = q2f((u16)(qw[i / 2] >> (16 * (i & 1)))) * qok;
#pragma unroll
  for (int s = 0; s < KSTEPS; s++) {
    const int w = s / (PPW / 2), j = 2 * (s % (PPW / 2)), a = w * CPW + j;
    const float h = RES ? 0.5f : 1.f;                /* RES: the key codes come doubled (res5) */
    const float f0 = h / (1 << (BITS * j % 8)), f1 = h / (1 << (BITS * (j + 1) % 8));
    const u32 v[4] = {pack2(qv[a] * f0, qv[a + PPW] * f0), pack2(qv[a + 1] * f1, qv[a + 1 + PPW] * f1),
                      pack2(qv[a], qv[a + PPW]), pack2(qv[a + 1], qv[a + 1 + PPW])};
#pragma unroll
    for (int r = 0; r < 2; r++) {
      const int k = 2 * s + r;
      qsm[((k / 4) * 32 + lane) * 4 + k % 4] = v[r];
      qsm[QOFF + ((k / 4) * 32 + lane) * 4 + k % 4] = v[2 + r];
    }
  }
  __syncwarp();
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}

/* A new key group: the B operand q∘s (qb times the scales, paired as the codes are) and the zero term
   Σ q·z − 1024·Σ B, both sums on the tensor cores, where the score MMA's lanes want them: Σ B as
   ones × B, Σ q·z as z (every row) × qn; so the scores need no per-code subtraction and the group costs
   ~90 instructions a thread (it was ~350 in fp32 with shuffles: 27 % of the 4-bit kernel's). */
__device__ __forceinline__ void group_stats(State& st, const u32* qsm, const u16* sp, const u16* zp, int lane) {
  u32 sw[D / 8], zw[D / 8], qb[QW], qn[QW];
  ldw<D / 8>(sw, (const u32*)sp);
  ldw<D / 8>(zw, (const u32*)zp);
#pragma unroll
  for (int c = 0; c < QW / 4; c++) {
    const U4 x = ((const U4*)qsm)[c * 32 + lane], y = ((const U4*)(qsm + QW * 32))[c * 32 + lane];
    qb[4 * c] = x.x; qb[4 * c + 1] = x.y; qb[4 * c + 2] = x.z; qb[4 * c + 3] = x.w;
    qn[4 * c] = y.x; qn[4 * c + 1] = y.y; qn[4 * c + 2] = y.z; qn[4 * c + 3] = y.w;
  }
  const u32 ONES = 0x3C003C00u;
  float sb[4] = {0.f, 0.f, 0.f, 0.f}, qz[4] = {0.f, 0.f, 0.f, 0.f};
#if RES
  float qs[4] = {0.f, 0.f, 0.f, 0.f};
#endif
#pragma unroll
  for (int s = 0; s < KSTEPS; s++) {
    const int w = s / (PPW / 2), j = 2 * (s % (PPW / 2)), a = w * CPW + j;   /* a, a + PPW: words a/2, (a+PPW)/2 */
    const u32 s0 = prmt(sw[a / 2], sw[(a + PPW) / 2], 0x5410u), s1 = prmt(sw[a / 2], sw[(a + PPW) / 2], 0x7632u);
    const u32 z0 = prmt(zw[a / 2], zw[(a + PPW) / 2], 0x5410u), z1 = prmt(zw[a / 2], zw[(a + PPW) / 2], 0x7632u);
    st.qf[s][0] = hmul2(qb[2 * s], s0);
    st.qf[s][1] = hmul2(qb[2 * s + 1], s1);
    mma(sb, ONES, ONES, ONES, ONES, st.qf[s][0], st.qf[s][1]);
    mma(qz, z0, z0, z1, z1, qn[2 * s], qn[2 * s + 1]);
#if RES
    mma(qs, ONES, ONES, ONES, ONES, hmul2(qn[2 * s], s0), hmul2(qn[2 * s + 1], s1));
#endif
  }
  st.cq0 = qz[0] - 1024.f * sb[0];                  /* query 2t (row g; every row holds the same) */
  st.cq1 = qz[1] - 1024.f * sb[1];                  /* query 2t + 1 */
#if RES
  st.cq0 += 0.25f * qs[0];                          /* the codes below come as 2c + r - 1: z + s·(c + r/2 - 1/4) */
  st.cq1 += 0.25f * qs[1];
#endif
}

#if KDQ
/* KDQ: a new key group's scale and zero, paired as the code registers pair channels (a, a + PPW), (a + 1,
   a + 1 + PPW) */
__device__ __forceinline__ void key_pairs(State& st, const u16* sp, const u16* zp) {
  u32 sw[D / 8], zw[D / 8];
  ldw<D / 8>(sw, (const u32*)sp);
  ldw<D / 8>(zw, (const u32*)zp);
#pragma unroll
  for (int s = 0; s < KSTEPS; s++) {
    const int w = s / (PPW / 2), j = 2 * (s % (PPW / 2)), a = w * CPW + j;
    st.sk[s][0] = prmt(sw[a / 2], sw[(a + PPW) / 2], 0x5410u);
    st.sk[s][1] = prmt(sw[a / 2], sw[(a + PPW) / 2], 0x7632u);
    st.zk[s][0] = prmt(zw[a / 2], zw[(a + PPW) / 2], 0x5410u);
    st.zk[s][1] = prmt(zw[a / 2], zw[(a + PPW) / 2], 0x7632u);
  }
}

/* KDQ: a code pair from `raw` (1024 + c·2^sub) → c·s + z in fp16: c = raw·2^-sub - 1024·2^-sub (exact), then
   one HFMA2 (one rounding) */
__device__ __forceinline__ u32 kdq(u32 r, u32 sc, u32 z, int sub) {
  const u32 m = (u32)(15 - sub) << 10, b = 0x8000u | ((u32)(25 - sub) << 10);   /* 2^-sub, -2^(10-sub) */
  return hfma2(hfma2(r, m | m << 16, b | b << 16), sc, z);
}
#endif

#if KS8
__device__ __forceinline__ u32 hadd2(u32 a, u32 b) {
  u32 r; asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ u32 ex2h2(u32 x) { u32 r; asm("ex2.approx.f16x2 %0, %1;" : "=r"(r) : "r"(x)); return r; }
#define UPG (D / CPW)                /* KS8: conversion units a group (4 thread columns x D/4/CPW code words) */
/* KS8: a stage's 8-bit statistics → fp16 pairs in shared memory, by every lane (one unit: a thread column t's CPW
   channels of one group, two 16-byte reads), laid out [group][t][scale pairs KSTEPS x 2, zero pairs, padding] as
   `key_pairs` would build them: e and zc as 1024 + x (one PRMT, one LOP3 a pair), -e/16 by one exact HFMA2, then
   EX2 and the group's smax; zc exactly by one HADD2, then zlo + zc·zstep */
__device__ __forceinline__ void convert8(const Stage& sg, u32* kc, int lane) {
  for (int u = lane; u < SGR * UPG; u += 32) {
    const int r = u / UPG, t = (u % UPG) / (UPG / 4), w = u % (UPG / 4);
    const int c0 = r * D + t * (D / 4) + w * CPW;
    u32 sw[CPW / 4], zw[CPW / 4];
    ldw<CPW / 4>(sw, (const u32*)(sg.ks + c0));
    ldw<CPW / 4>(zw, (const u32*)(sg.kz + c0));
    const u32 g01 = *(const u32*)(sg.kg + r * 8), g2 = sg.kg[r * 8 + 2];
    const u32 zlo = prmt(g01, 0u, 0x1010u), zst = prmt(g01, 0u, 0x3232u), smx = g2 | g2 << 16;
    u32* dst = kc + (r * 4 + t) * KCW;
#pragma unroll
    for (int jj = 0; jj < PPW / 2; jj++) {
      const int sx = w * (PPW / 2) + jj;
#pragma unroll
      for (int rr = 0; rr < 2; rr++) {
        const int a = 2 * jj + rr, b = a + PPW;                     /* the pair (a, a + PPW) of the unit's channels */
        const u32 sel = (u32)(a % 4) | (u32)(4 + b % 4) << 8;
        const u32 es = lop_or(prmt(sw[a / 4], sw[b / 4], sel), 0x00FF00FFu, 0x64006400u);
        const u32 ez = lop_or(prmt(zw[a / 4], zw[b / 4], sel), 0x00FF00FFu, 0x64006400u);
        dst[2 * sx + rr] = hmul2(ex2h2(hfma2(es, 0xAC00AC00u, 0x54005400u)), smx);   /* (1024 + e)·-1/16 + 64 */
        dst[2 * KSTEPS + 2 * sx + rr] = hfma2(hadd2(ez, 0xE400E400u), zst, zlo);
      }
    }
  }
  __syncwarp();
}

/* KS8: a new key group's pairs, as `convert8` laid them out for this thread column */
__device__ __forceinline__ void key_pairs8(State& st, const u32* kc) {
  u32 w[4 * KSTEPS];
  ldw<4 * KSTEPS>(w, kc);
#pragma unroll
  for (int s = 0; s < KSTEPS; s++) {
    st.sk[s][0] = w[2 * s]; st.sk[s][1] = w[2 * s + 1];
    st.zk[s][0] = w[2 * KSTEPS + 2 * s]; st.zk[s][1] = w[2 * KSTEPS + 2 * s + 1];
  }
}
#endif

/* codes at bits (bit, 16 + bit) of w as fp16x2 (1024 + c·2^sub, 1024 + c'·2^sub), sub = bit % 8: masked in
   place and ORed into the exponent of 1024, one LOP3 (whole-byte shifts are shared by a word's pairs) */
__device__ __forceinline__ u32 raw(u32 w, int bit) {
  const int sh = bit / 8 * 8, sub = bit % 8;
  return lop_or(sh ? w >> sh : w, CMASK << sub, 0x64006400u);
}
#define VSUB(li) (BITS * (((li) % CPW) % PPW) % 8)    /* value channel li's 2^sub */

/* RES: a code pair a = 1024 + c·2^sub (`raw`) and its residual bits r, at bits (p, 16 + p) of rw, →
   1024 + (2c + r - 1)·2^sub = 2a - (1024 + (1 - r)·2^sub): the complemented bits ORed into -1024 (one LOP3),
   one HFMA2; exact in fp16 (the query carries the 1/2, the group constant the -1/4) */
__device__ __forceinline__ u32 res5(u32 a, u32 rw, int p, int sub) {
  const u32 x = p >= sub ? rw >> (p - sub) : rw << (sub - p);
  u32 nr, d;
  /* (~x & m) | c */
  asm("lop3.b32 %0, %1, %2, %3, 0xAE;" : "=r"(nr) : "r"(x), "r"(0x00010001u << sub), "r"(0xE400E400u));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x40004000u), "r"(nr));
  return d;
}
#define TH 8.f                                         /* lazy rescaling: weights up to 2^TH */

__device__ __forceinline__ void tile(State& st, const Buf& cur, int t0, int end, const u32* qsm, int lane,
                                     const u16* ks, const u16* kz, int t, float sl2) {
#if LOADONLY
  /* a diagnostic (benchmarks/quant_cuda_probe.py --load-only): the same loads, in the same order and from the same
     warps, with no arithmetic but an XOR that keeps them alive; its time is what the access pattern alone costs */
  u32 x = 0;
#pragma unroll
  for (int u = 0; u < SUB; u++) {
    const int tok = t0 + 16 * u;
    if (tok >= end) break;
    if (tok % GROUP == 0) {
      u32 sw[D / 8], zw[D / 8];
      ldw<D / 8>(sw, (const u32*)(ks + (i64)(tok / GROUP) * D));
      ldw<D / 8>(zw, (const u32*)(kz + (i64)(tok / GROUP) * D));
#pragma unroll
      for (int i = 0; i < D / 8; i++) x ^= sw[i] ^ zw[i];
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
#pragma unroll
      for (int w = 0; w < KW; w++) x ^= cur.k[u][r][w];
#if RES
#pragma unroll
      for (int w = 0; w < KRW; w++) x ^= cur.kr[u][r][w];
#endif
      x ^= cur.vs[u][r] ^ ((u32)cur.vz[u][r] << 16);
    }
#pragma unroll
    for (int e = 0; e < 4; e++)
#pragma unroll
      for (int w = 0; w < VW; w++) x ^= cur.v[u][e][w];
  }
  x ^= qsm[lane];                                    /* (keeps the split's query loads, as the attention reads them) */
  st.l0 += (float)(x & 1u);
  return;
#endif
  /* a tile's 16-token steps (SUB): every step's scores first (independent MMA chains where the steps share a key
     group's statistics, or with KDQ), then one softmax update, then each step's values */
  float xs[SUB][4];
  int nu = 0;
#pragma unroll
  for (int u = 0; u < SUB; u++) {
    const int tok = t0 + 16 * u;
    if (tok >= end) break;
    nu = u + 1;
#if KS8
    if (tok % GROUP == 0) key_pairs8(st, (const u32*)ks + (tok / GROUP) * 4 * KCW);
#elif KDQ
    if (tok % GROUP == 0) key_pairs(st, ks + (i64)(tok / GROUP) * D, kz + (i64)(tok / GROUP) * D);
#else
    if (tok % GROUP == 0) group_stats(st, qsm, ks + (i64)(tok / GROUP) * D, kz + (i64)(tok / GROUP) * D, lane);
#endif
    /* scores: rows = tokens g, g + 8; columns = queries 2t, 2t + 1; two chains of MMAs */
    float s4[4] = {0.f, 0.f, 0.f, 0.f}, r4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < KSTEPS; s++) {
      const int w = s / (PPW / 2), j = 2 * (s % (PPW / 2));
#if RES   /* the pair (j, j + 4) of code word w: residual word w / 4, bits 4·(w % 4) + j and 16 more */
      const int p = 4 * (w % 4) + j;
      mma(s & 1 ? r4 : s4, res5(raw(cur.k[u][0][w], BITS * j), cur.kr[u][0][w / 4], p, BITS * j % 8),
          res5(raw(cur.k[u][1][w], BITS * j), cur.kr[u][1][w / 4], p, BITS * j % 8),
          res5(raw(cur.k[u][0][w], BITS * (j + 1)), cur.kr[u][0][w / 4], p + 1, BITS * (j + 1) % 8),
          res5(raw(cur.k[u][1][w], BITS * (j + 1)), cur.kr[u][1][w / 4], p + 1, BITS * (j + 1) % 8),
          st.qf[s][0], st.qf[s][1]);
#elif KDQ
      const int b0 = BITS * j % 8, b1 = BITS * (j + 1) % 8;
      mma(s & 1 ? r4 : s4, kdq(raw(cur.k[u][0][w], BITS * j), st.sk[s][0], st.zk[s][0], b0),
          kdq(raw(cur.k[u][1][w], BITS * j), st.sk[s][0], st.zk[s][0], b0),
          kdq(raw(cur.k[u][0][w], BITS * (j + 1)), st.sk[s][1], st.zk[s][1], b1),
          kdq(raw(cur.k[u][1][w], BITS * (j + 1)), st.sk[s][1], st.zk[s][1], b1), st.qf[s][0], st.qf[s][1]);
#else
      mma(s & 1 ? r4 : s4, raw(cur.k[u][0][w], BITS * j), raw(cur.k[u][1][w], BITS * j),
          raw(cur.k[u][0][w], BITS * (j + 1)), raw(cur.k[u][1][w], BITS * (j + 1)), st.qf[s][0], st.qf[s][1]);
#endif
    }
    xs[u][0] = s4[0] + r4[0]; xs[u][1] = s4[1] + r4[1]; xs[u][2] = s4[2] + r4[2]; xs[u][3] = s4[3] + r4[3];
    if (!KDQ) { xs[u][0] += st.cq0; xs[u][1] += st.cq1; xs[u][2] += st.cq0; xs[u][3] += st.cq1; }   /* (KDQ: none) */
    xs[u][0] *= sl2; xs[u][1] *= sl2; xs[u][2] *= sl2; xs[u][3] *= sl2;
  }
  float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
  for (int u = 0; u < SUB; u++)
    if (u < nu) { mx0 = fmaxf(mx0, fmaxf(xs[u][0], xs[u][2])); mx1 = fmaxf(mx1, fmaxf(xs[u][1], xs[u][3])); }
  /* FlashAttention-4's lazy rescaling: the running maximum moves (and everything is rescaled) only when
     a score passes it by more than TH; otherwise weights up to 2^TH enter as they are */
  if (__any_sync(0xffffffffu, mx0 > st.m0 + TH || mx1 > st.m1 + TH)) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
    }
    const float n0 = fmaxf(st.m0, mx0), n1 = fmaxf(st.m1, mx1);
    const float al0 = exp2f(st.m0 - n0), al1 = exp2f(st.m1 - n1);
    st.m0 = n0; st.m1 = n1;
    st.l0 *= al0; st.z0 *= al0; st.p0 *= al0;
    st.l1 *= al1; st.z1 *= al1; st.p1 *= al1;
#pragma unroll
    for (int mb = 0; mb < MB; mb++) { st.acc[mb][0] *= al0; st.acc[mb][1] *= al1; st.acc[mb][2] *= al0; st.acc[mb][3] *= al1; }
  }
#pragma unroll
  for (int u = 0; u < SUB; u++) {
    if (u >= nu) break;
    const float p0 = exp2f(xs[u][0] - st.m0), p1 = exp2f(xs[u][1] - st.m1), p2 = exp2f(xs[u][2] - st.m0),
                p3 = exp2f(xs[u][3] - st.m1);
    const float s0 = h2f(cur.vs[u][0]), s1 = h2f(cur.vs[u][1]);
    const float zz0 = h2f(cur.vz[u][0]), zz1 = h2f(cur.vz[u][1]);
    st.l0 += p0 + p2;
    st.l1 += p1 + p3;
    st.z0 += p0 * zz0 + p2 * zz1;
    st.z1 += p1 * zz0 + p3 * zz1;
    const u32 w0 = pack2(p0 * s0, p1 * s0), w1 = pack2(p2 * s1, p3 * s1);   /* value weights p∘s, fp16 */
    st.p0 += h2f((u16)w0) + h2f((u16)w1);
    st.p1 += h2f((u16)(w0 >> 16)) + h2f((u16)(w1 >> 16));
    /* (token, query) -> (query, token): the value MMA's B operand */
    const u32 b0 = trans(w0), b1 = trans(w1);
    /* values: rows = channels, columns = queries; A pairs tokens (2t, 2t+1) and (2t+8, 2t+9) */
#pragma unroll
    for (int mb = 0; mb < MB; mb++) {
      u32 a[4];
#pragma unroll
      for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
          const int li = 2 * mb + r, w = li / CPW, e = li % CPW;
          const u32 x = cur.v[u][2 * h][w], y = cur.v[u][2 * h + 1][w];
          const u32 z = e < PPW ? prmt(x, y, 0x5410u) : prmt(x, y, 0x7632u);
          a[2 * h + r] = raw(z, BITS * (e % PPW));
        }
      }
      mma(st.acc[mb], a[0], a[1], a[2], a[3], b0, b1);
    }
  }
}

#if BULK
/* BULK: a stage's e tokens (whole tiles; token 0 at the stage's start), then every lane has read it (it may be refilled) */
__device__ __forceinline__ void stage(State& st, const Stage& sg, int e, const u32* qsm, int lane, int g, int t,
                                      float sl2, u32* kc) {
#if KS8
  convert8(sg, kc, lane);            /* (kc's previous stage was read before the last stage's closing sync) */
  const u16* ks = (const u16*)(kc + t * KCW);
  const u16* kz = nullptr;
#else
  const u16* ks = sg.ks + t * (D / 4);
  const u16* kz = sg.kz + t * (D / 4);
#endif
#pragma unroll
  for (int u = 0; u < STOK / TILE; u++) {
    if (u * TILE >= e) break;
    Buf A;
    load(A, sg.k, sg.v, sg.vs, sg.vz, ks, kz, u * TILE, e, g, t, nullptr);
    tile(st, A, u * TILE, e, qsm, lane, ks, kz, t, sl2);
  }
  __syncwarp();
}
#endif

/* The full-precision sink + ring (keys stored after RoPE): FPS programs of 32 slots, one slot a lane.
   Position of a ring slot: the newest p <= last with p = slot (mod RING), as the cache writes them; a slot
   counts when that position is past the packed region (the group being flushed is still read here). */
#define FPS ((SINK + RING + 31) / 32)
__device__ __forceinline__ void fp_split(const u16* __restrict__ Q, const u16* __restrict__ KF, const u16* __restrict__ VF,
                                         float* __restrict__ Part, float* __restrict__ Lse, i64 last, int nq, int bh,
                                         int f, i64 row0, float sl2) {
  const int lane = threadIdx.x & 31, slot = 32 * f + lane;
  i64 pos = slot;
  if (slot >= SINK) pos = last - ((last - slot) % RING + RING) % RING;
  const bool ok = slot < SINK + RING && pos >= 0 && pos <= last && (slot < SINK || pos >= SINK + nq);
  const u16* kr = KF + ((i64)bh * (SINK + RING) + min(slot, SINK + RING - 1)) * D;
  const u16* qg = Q + (i64)bh * G * D;
  float sc[G];
#pragma unroll
  for (int q = 0; q < G; q++) sc[q] = 0.f;
#pragma unroll 4
  for (int d = 0; d < D; d += 8) {
    const U4 kw = *(const U4*)(kr + d);
    const u32 k4[4] = {kw.x, kw.y, kw.z, kw.w};
#pragma unroll
    for (int q = 0; q < G; q++) {
      const U4 qw = *(const U4*)(qg + q * D + d);
      const u32 q4[4] = {qw.x, qw.y, qw.z, qw.w};
#pragma unroll
      for (int i = 0; i < 4; i++)
        sc[q] += q2f((u16)q4[i]) * q2f((u16)k4[i]) + q2f((u16)(q4[i] >> 16)) * q2f((u16)(k4[i] >> 16));
    }
  }
  float m[G], p[G], l[G];
#pragma unroll
  for (int q = 0; q < G; q++) {
    const float x = ok ? sc[q] * sl2 : NEG_INF;
    m[q] = x;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m[q] = fmaxf(m[q], __shfl_xor_sync(0xffffffffu, m[q], o));
    p[q] = ok ? exp2f(x - m[q]) : 0.f;
    l[q] = p[q];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l[q] += __shfl_xor_sync(0xffffffffu, l[q], o);
  }
  const int n = min(32, SINK + RING - 32 * f);      /* slots this program holds */
  for (int d0 = 0; d0 < D; d0 += 64) {              /* two channels a lane a pass */
    float acc[G][2];
#pragma unroll
    for (int q = 0; q < G; q++) acc[q][0] = acc[q][1] = 0.f;
#pragma unroll
    for (int h = 0; h < 32; h += 16) {
      u32 vw[16];                                   /* 16 slots' words first: 16 loads in flight, not one
                                                       latency a slot (~15 µs a program at D 128 that way) */
#pragma unroll
      for (int j = 0; j < 16; j++)
        vw[j] = h + j < n ? *(const u32*)(VF + ((i64)bh * (SINK + RING) + 32 * f + h + j) * D + d0 + 2 * lane) : 0u;
#pragma unroll
      for (int j = 0; j < 16; j++) {
        const float v0 = q2f((u16)vw[j]), v1 = q2f((u16)(vw[j] >> 16));
#pragma unroll
        for (int q = 0; q < G; q++) {
          const float pj = __shfl_sync(0xffffffffu, p[q], h + j);   /* 0 past the program's slots */
          acc[q][0] += pj * v0;
          acc[q][1] += pj * v1;
        }
      }
    }
#pragma unroll
    for (int q = 0; q < G; q++) {
      const float inv = l[q] > 0.f ? 1.f / l[q] : 0.f;
      *(F2*)(Part + (row0 + q) * D + d0 + 2 * lane) = F2{acc[q][0] * inv, acc[q][1] * inv};
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < G; q++) Lse[row0 + q] = l[q] > 0.f ? (m[q] + log2f(l[q])) * 0.6931471805599453f : NEG_INF;
  }
}

/* CW warps a program: each warp its own stretch of tokens (a virtual split), combined in shared memory
   into one partial result, so the merge reads CW times fewer rows */
#define FPC ((FPS + CW - 1) / CW)                     /* programs for the full-precision splits */
#if MINB
#define BOUNDS __launch_bounds__(32 * CW, MINB)
#else
#define BOUNDS __launch_bounds__(32 * CW)
#endif
extern "C" __global__ void BOUNDS kivi_attn(
    const u16* __restrict__ Q, const i64* __restrict__ Len, const u32* __restrict__ KP, const u16* __restrict__ KS,
    const u16* __restrict__ KZ, const u32* __restrict__ VP, const u16* __restrict__ VS, const u16* __restrict__ VZ,
    const u16* __restrict__ KF, const u16* __restrict__ VF, float* __restrict__ Part, float* __restrict__ Lse,
    double scale_log2_d, int S, int NQ_CAP, const int* __restrict__ Table, const int* __restrict__ Nsel, int stab,
    int row_pages, const u32* __restrict__ KR, const u16* __restrict__ KG) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wq = threadIdx.x >> 5;
  const int bh = blockIdx.x, split = blockIdx.y;
#if TLINE
  unsigned long long tl[5] = {gtime(), 0, 0, 0, 0};   /* start, prologue, first and last stage in, loop's end */
#endif
  const float sl2 = (float)scale_log2_d;
  const i64 avail = Len[0] - 1 - SINK - WINDOW;      /* groups flushed before this token arrived */
  const int nq = avail > 0 ? (int)(avail / GROUP) * GROUP : 0;
  const int S1 = S + FPC;                            /* programs 0..S-1 packed, then FPC full-precision ones */
#if CW > 1
  __shared__ float so[CW][G][D], sls[CW][G];
  float* OutP = &so[wq][0][0];
  float* OutL = &sls[wq][0];
  const i64 orow = 0;                                /* rows of this warp's own partial result */
#else
  float* OutP = Part;
  float* OutL = Lse;
  const i64 orow = ((i64)bh * S1 + split) * G;
#endif
  if (split >= S) {
    fp_split(Q, KF, VF, OutP, OutL, Len[0] - 1, nq, bh, (split - S) * CW + wq, orow, sl2);
#if TLINE
    if (lane == 0) tl_put(Table, (i64)bh * S1 + split, tl, 1);
#endif
  } else {
  const int vsp = split * CW + wq;                   /* this warp's stretch */
#if PAGED
  /* Quest over key groups: the row's table lists the selected groups (ascending global ids bh·row_pages +
     group). v counts tokens along the selected groups, TOK(v) is the quantized row it stands for; this
     warp takes a run of whole tiles (not whole groups: 1021 groups over 255 warps would be 5 for some and
     0 for others), so a run may start inside a group, whose statistics are then built before the loop.
     Every tile lies inside one group (GROUP % TILE == 0): loads and tiles run to the buffer's end (LIM),
     and a group's statistics are rebuilt at its first tile. */
  const int* tab = Table + (i64)bh * stab;
  const int tb = bh * row_pages;
  const int nsel = min(Nsel[bh], nq / GROUP);
  const int pert = (nsel * (GROUP / TILE) + S * CW - 1) / (S * CW);         /* tiles a warp */
  const int start = min(vsp * pert * TILE, nsel * GROUP), end = min(start + pert * TILE, nsel * GROUP);
  /* the run's entries, up to 32, one a lane (a shuffle, not a dependent load, finds a tile's group) */
  const int g0 = start / GROUP, nrun = start < end ? (end - 1) / GROUP - g0 + 1 : 0;
  const int tabv = nrun <= 32 && lane < nrun ? tab[g0 + lane] - tb : 0;
#define TOK(v) ((nrun <= 32 ? __shfl_sync(0xffffffffu, tabv, (v) / GROUP - g0) : tab[(v) / GROUP] - tb) \
                * GROUP + (v) % GROUP)
#define LIM NQ_CAP

#else
  int per = (nq + S * CW - 1) / (S * CW);
  per = (per + STEP - 1) / STEP * STEP;
  const int start = vsp * per, end = min(start + per, nq);
#define TOK(v) (v)
#define LIM end
#endif

  const i64 hq = (i64)bh * NQ_CAP;
  const u32* kp = KP + hq * W;
  const u32* vp = VP + hq * W;
  const u32* krp = KR + hq * (D / 32);              /* RES: the residual rows (unused otherwise) */
  const u16* vs = VS + hq;
  const u16* vz = VZ + hq;
  const u16* ks0 = KS + (i64)bh * (NQ_CAP / GROUP) * D;    /* the head's key statistics rows */
  const u16* kz0 = KZ + (i64)bh * (NQ_CAP / GROUP) * D;
  const u16* ks = ks0 + t * (D / 4);                        /* this thread's part of them */
  const u16* kz = kz0 + t * (D / 4);
  const u16* qr = Q + ((i64)bh * G + min(g, G - 1)) * D + t * (D / 4);
  const float qok = g < G ? 1.f : 0.f;
  /* the query's words first: under BULK, loaded after the first bulk copies were issued, its answer queued behind
     them (the SM's twelve programs' two stages: the prologue took 6.4 us at 128K, 1.7 this way; kv2's decode 0.623x
     -> 0.616x of full, session 46, H100, `benchmarks/quant_timeline.py`) */
#if BULK
  u32 qw[D / 8];
  ldw<D / 8>(qw, (const u32*)qr);
  /* stages of STOK tokens, NST in flight, the first ones issued before anything else but the query so that the bytes
     are on their way while it is read; a stage's tiles are read with tokens counted from its start (so a key
     group longer than a stage has its statistics taken again at each stage: the same row, copied with it) */
  __shared__ Stage stg[NST];
  __shared__ __align__(8) u64 bars[NST];
#if KS8
  __shared__ __align__(16) u32 kcv[SGR * 4 * KCW];   /* the stage's rebuilt statistics (`convert8`) */
  const u8* kb0 = (const u8*)KS + (i64)bh * (NQ_CAP / GROUP) * D;
  const u8* zb0 = (const u8*)KZ + (i64)bh * (NQ_CAP / GROUP) * D;
  const u16* kg0 = KG + (i64)bh * (NQ_CAP / GROUP) * 8;
#else
  u32* kcv = nullptr;
  const u16 *kb0 = ks0, *zb0 = kz0, *kg0 = nullptr;
#endif
#if TAILT
  const int nt = max(end - start, 0), ns = nstages(nt);
#define SOFF(i) soff(i, nt)
#define SLEN(i) slen(i, nt)
#else
  const int ns = start < end ? (end - start + STOK - 1) / STOK : 0;
#define SOFF(i) ((i) * STOK)
#define SLEN(i) min(STOK, end - start - (i) * STOK)
#endif
  if (lane == 0) {
    for (int i = 0; i < NST; i++) bar_init(&bars[i]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int i = 0; i < NST && i < ns; i++)
      issue(stg[i], &bars[i], kp, vp, vs, vz, kb0, zb0, start + SOFF(i), SLEN(i), kg0);
  }
  __syncwarp();
#endif
  __shared__ __align__(16) u32 qsm_all[CW][QSMW];
  u32* qsm = qsm_all[wq];
#if !BULK   /* (here, where it always was: these builds' SASS stays the one timed) */
  u32 qw[D / 8];
  ldw<D / 8>(qw, (const u32*)qr);
#endif
  query_frags(qsm, qw, qok, lane);

  State st;
  st.m0 = st.m1 = NEG_INF;
  st.l0 = st.l1 = st.z0 = st.z1 = st.p0 = st.p1 = st.cq0 = st.cq1 = 0.f;
#pragma unroll
  for (int i = 0; i < MB; i++) { st.acc[i][0] = st.acc[i][1] = st.acc[i][2] = st.acc[i][3] = 0.f; }
#pragma unroll
  for (int s = 0; s < KSTEPS; s++) { st.qf[s][0] = st.qf[s][1] = 0u; }
#if TLINE
  tl[1] = gtime();
#endif
#if KDQ
  /* the plain query (qn) in B order, fixed for the split: the keys come dequantized */
#pragma unroll
  for (int s = 0; s < KSTEPS; s++)
#pragma unroll
    for (int r = 0; r < 2; r++) st.qf[s][r] = qsm[QOFF + (((2 * s + r) / 4) * 32 + lane) * 4 + (2 * s + r) % 4];
  __syncwarp();
#endif

#if BULK
  for (int i = 0; i < ns; i++) {
#if TAILT
    const int sl = i % NST, e = SLEN(i);
#else   /* (the form timed in session 46: SLEN's arithmetic compiles to other SASS) */
    const int sl = i % NST, s0 = start + i * STOK, e = min(STOK, end - s0);
#endif
    bar_wait(&bars[sl], (u32)(i / NST) & 1u);
#if TLINE
    if (i == 0) tl[2] = gtime();
    if (i == ns - 1) tl[3] = gtime();
#endif
    stage(st, stg[sl], e, qsm, lane, g, t, sl2, kcv);
    if (lane == 0 && i + NST < ns)
      issue(stg[sl], &bars[sl], kp, vp, vs, vz, kb0, zb0, start + SOFF(i + NST), SLEN(i + NST), kg0);
  }
#else
  Buf A, B;     /* double buffer: the next tile's words load while this one is computed */
  if (start < end) load(A, kp, vp, vs, vz, ks, kz, TOK(start), LIM, g, t, krp);
#if PAGED
  if (start < end && start % GROUP) {    /* the run starts inside a group */
    const i64 r = (i64)(TOK(start) / GROUP) * D;
#if KDQ
    key_pairs(st, ks + r, kz + r);
#else
    group_stats(st, qsm, ks + r, kz + r, lane);
#endif
  }
#endif
  for (int t0 = start; t0 < end; t0 += 2 * TILE) {
    if (t0 + TILE < end) load(B, kp, vp, vs, vz, ks, kz, TOK(t0 + TILE), LIM, g, t, krp);
    tile(st, A, TOK(t0), LIM, qsm, lane, ks, kz, t, sl2);
    if (t0 + TILE >= end) break;
    if (t0 + 2 * TILE < end) load(A, kp, vp, vs, vz, ks, kz, TOK(t0 + 2 * TILE), LIM, g, t, krp);
    tile(st, B, TOK(t0 + TILE), LIM, qsm, lane, ks, kz, t, sl2);
  }
#endif
#if TLINE
  tl[4] = gtime();
#endif
  float l0 = st.l0, l1 = st.l1, z0 = st.z0, z1 = st.z1, w0 = st.p0, w1 = st.p1;
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    z0 += __shfl_xor_sync(0xffffffffu, z0, o);
    z1 += __shfl_xor_sync(0xffffffffu, z1, o);
    w0 += __shfl_xor_sync(0xffffffffu, w0, o);
    w1 += __shfl_xor_sync(0xffffffffu, w1, o);
  }
  const i64 row = orow + 2 * t;
  const float d0 = l0 > 0.f ? 1.f / l0 : 0.f, d1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
  for (int mb = 0; mb < MB; mb++) {
    /* a channel's MMA sum is Σ w·(1024 + c·2^sub): take off 1024·Σw, scale by 2^-sub, add the zero term */
    const int col = g * (D / 8) + 2 * mb;
    const float f0 = 1.f / (1 << VSUB(2 * mb)), f1 = 1.f / (1 << VSUB(2 * mb + 1));
    if (2 * t < G)
      *(F2*)(OutP + row * D + col) = F2{((st.acc[mb][0] - 1024.f * w0) * f0 + z0) * d0,
                                        ((st.acc[mb][2] - 1024.f * w0) * f1 + z0) * d0};
    if (2 * t + 1 < G)
      *(F2*)(OutP + (row + 1) * D + col) = F2{((st.acc[mb][1] - 1024.f * w1) * f0 + z1) * d1,
                                              ((st.acc[mb][3] - 1024.f * w1) * f1 + z1) * d1};
  }
  if (g == 0) {
    const float LN2 = 0.6931471805599453f;
    if (2 * t < G) OutL[row] = l0 > 0.f ? (st.m0 + log2f(l0)) * LN2 : NEG_INF;
    if (2 * t + 1 < G) OutL[row + 1] = l1 > 0.f ? (st.m1 + log2f(l1)) * LN2 : NEG_INF;
  }
#if TLINE
  if (lane == 0) tl_put(Table, (i64)bh * S1 + split, tl, 0);
#endif
  }
#if CW > 1
  __syncthreads();
  const i64 prow = ((i64)bh * S1 + split) * G;
  for (int i = threadIdx.x; i < G * D; i += 32 * CW) {
    const int q = i / D, d = i % D;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < CW; w++) mx = fmaxf(mx, sls[w][q]);
    float o = 0.f, den = 0.f;
    if (mx != NEG_INF) {
#pragma unroll
      for (int w = 0; w < CW; w++) { const float e = __expf(sls[w][q] - mx); o += e * so[w][q][d]; den += e; }
    }
    Part[(prow + q) * D + d] = den > 0.f ? o / den : 0.f;
    if (d == 0) Lse[prow + q] = den > 0.f ? mx + __logf(den) : NEG_INF;
  }
#endif
}

/* out[b, h·G + q, :] = the splits merged by their log-sum-exp; one program a (KV head, query) and 32
   channels (a lane each; D/32 programs a query: the paged kernel's 1/8 reads leave the merge a tenth of
   the step's attention, and one program a query used only 32 SMs), of MW warps. One pass: each warp loads MU of
   its rows (a stride of MW) at once, log-sum-exps and values together, and keeps a running maximum (online
   softmax); then the warps' sums are combined by their maxima. (Two passes, the maximum first and then the rows
   four at a time, waited on ~5 rounds of loads.) */
#define MW 16
#define MU 16
extern "C" __global__ void __launch_bounds__(32 * MW) kivi_merge(const float* __restrict__ Part,
                                                                 const float* __restrict__ Lse, u16* __restrict__ Out, int S1) {
  __shared__ float red[MW][32];
  __shared__ float dens[MW], mxs[MW];
  const int pid = blockIdx.x, c = blockIdx.y * 32, bh = pid / G, q = pid % G, tid = threadIdx.x, wp = tid >> 5,
            lane = tid & 31;
  const i64 base = (i64)bh * S1 * G + q;                 /* row of split s: base + s·G */
  float m = NEG_INF, acc = 0.f, den = 0.f;
  for (int s0 = wp; s0 < S1; s0 += MW * MU) {
    float lv[MU], pv[MU];
#pragma unroll
    for (int u = 0; u < MU; u++) {
      const int s = s0 + u * MW;
      const i64 row = base + (i64)min(s, S1 - 1) * G;
      lv[u] = s < S1 ? Lse[row] : NEG_INF;
      pv[u] = Part[row * D + c + lane];
    }
    float bm = m;
#pragma unroll
    for (int u = 0; u < MU; u++) bm = fmaxf(bm, lv[u]);
    if (bm != NEG_INF) {                                 /* exp(-inf) = 0: empty splits weigh nothing */
      const float r = __expf(m - bm);
      acc *= r;
      den *= r;
#pragma unroll
      for (int u = 0; u < MU; u++) {
        const float w = __expf(lv[u] - bm);
        den += w;
        acc += w * pv[u];
      }
      m = bm;
    }
  }
  red[wp][lane] = acc;
  if (lane == 0) { dens[wp] = den; mxs[wp] = m; }
  __syncthreads();
  if (tid < 32) {
    float mx = NEG_INF;
#pragma unroll
    for (int i = 0; i < MW; i++) mx = fmaxf(mx, mxs[i]);
    float o = 0.f, dd = 0.f;
    if (mx != NEG_INF) {
#pragma unroll
      for (int i = 0; i < MW; i++) { const float e = __expf(mxs[i] - mx); o += e * red[i][tid]; dd += e * dens[i]; }
    }
    o = dd > 0.f ? o / dd : 0.f;
    u16 h;
#if QBF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(o));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(o));
#endif
    Out[(i64)pid * D + c + tid] = h;
  }
}
