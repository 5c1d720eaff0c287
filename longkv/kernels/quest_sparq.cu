// SparQ group scores (rank=max, or each query's for mass / peak: PERQ) from the channel-major 4-bit key copy:
// the CUDA source of `quest_sparq.py`'s "cuda" score (see there). Compiled by NVRTC through
// torch.cuda._compile_kernel with a block of #defines in front (D, G, R, GROUP, SINK, WINDOW, QBF16, NT, WPT,
// MINB, VEC, CHOOSE, WEIGH, PIPE, EVERY, PERQ, HEXP), then ptx.cuh.
//
// WPG / WPT threads a key group (WPT 32-bit words each: 8 codes of one channel, 8 tokens, a word), the R
// chosen channels in a loop. A word's nibbles become four fp16 pairs by one LOP3 each (0x6400 | c is the
// fp16 1024 + c) and a subtraction; each query's q∘s (the group's scale folded in, fp16) multiplies them
// in packed fp16 FMAs (fp16 sums over the R channels: ~1e-3 of their size), q·z is added in fp32 after
// the max over the group's tokens. No layout conversion and no padding of a small query group (G = 4).
// MINB: the blocks an SM the registers must allow (__launch_bounds__). VEC: a thread's WPT words of a channel
// by 8- or 16-byte loads instead of 4-byte ones. PIPE: a block loops over tiles of its row, the next tile's
// loads in flight while it computes (software pipelining; grid (blocks a row, rows)).

#define WPG (GROUP / 8)            /* 32-bit words of one channel of one group */
#define TPG (WPG / WPT)            /* threads a group */
#define GPB (NT / TPG)             /* groups a block */
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 r; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
__device__ __forceinline__ float ex2(float x) {
  float r; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r;
}
__device__ __forceinline__ u32 hadd2(u32 a, u32 b) {
  u32 r; asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ u32 hex2(u32 a) {
  u32 r; asm("ex2.approx.f16x2 %0, %1;" : "=r"(r) : "r"(a)); return r;
}
__device__ __forceinline__ u32 hmax2(u32 a, u32 b) {
  u32 r; asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}

/* A thread's WPT words of group pc for each of the R chosen channels, and each channel's (scale, zero). */
__device__ __forceinline__ void load_group(const unsigned char* __restrict__ SK, const u32* __restrict__ SZ,
                                           const int* ch, i64 bh, int pc, int lane, int CAPH, int MG,
                                           u32 (&wv)[R][WPT], u32 (&zv)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const i64 row = bh * D + ch[r];
    const u32* wp = reinterpret_cast<const u32*>(SK + row * CAPH + (i64)pc * (GROUP / 2)) + lane * WPT;
    zv[r] = SZ[row * MG + pc];
#if VEC && WPT % 4 == 0                        /* 16-byte loads (the launcher checks the alignment) */
#pragma unroll
    for (int j = 0; j < WPT; j += 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(wp + j));
      wv[r][j] = v.x; wv[r][j + 1] = v.y; wv[r][j + 2] = v.z; wv[r][j + 3] = v.w;
    }
#elif VEC && WPT == 2
    { const uint2 v = __ldg(reinterpret_cast<const uint2*>(wp)); wv[r][0] = v.x; wv[r][1] = v.y; }
#else
#pragma unroll
    for (int j = 0; j < WPT; ++j) wv[r][j] = wp[j];
#endif
  }
}

/* The group's largest estimated logit (over its tokens, this thread's share then the group's TPG threads,
   and the queries), times tau and scale; and each query's own in vq: with PERQ 1 its log-sum-exp over the group's
   tokens (rank=mass), with PERQ 2 its largest logit (rank=peak). */
__device__ __forceinline__ float score_group(const u32 (&wv)[R][WPT], const u32 (&zv)[R], const u32 (*qh)[G],
                                             const float (*qf)[G], const float* tau, float scale, float (&vq)[G]) {
  u32 acc[G][4 * WPT];
  float qz[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    qz[g] = 0.f;
#pragma unroll
    for (int k = 0; k < 4 * WPT; ++k) acc[g][k] = 0u;
  }
  const u32 bias = 0x64006400u;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const u32 s2 = prmt(zv[r], zv[r], 0x1010);      /* (s, s) */
    const float z = h2f((u16)(zv[r] >> 16));
    u32 c[4 * WPT];                            /* nibbles (k, k + 4) of each word (the max ignores token order) */
#pragma unroll
    for (int j = 0; j < WPT; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) c[4 * j + k] = hsub2(lop_or(wv[r][j] >> (4 * k), 0x000F000Fu, bias), bias);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const u32 qs = hmul2(qh[r][g], s2);
      qz[g] += qf[r][g] * z;
#pragma unroll
      for (int k = 0; k < 4 * WPT; ++k) acc[g][k] = hfma2(qs, c[k], acc[g][k]);
    }
  }
  float best = NEG_INF;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    u32 m2 = acc[g][0];
#pragma unroll
    for (int k = 1; k < 4 * WPT; ++k) m2 = hmax2(m2, acc[g][k]);
    float m = fmaxf(h2f((u16)m2), h2f((u16)(m2 >> 16)));
#pragma unroll
    for (int o = TPG / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o, TPG));
    const float t = tau[g] * scale;
    vq[g] = (m + qz[g]) * t;
#if PERQ == 1          /* Σ exp((x - m)·t) over the group's tokens: this thread's, then the group's TPG threads */
    const float tl2 = t * 1.4426950408889634f;
#if HEXP               /* on fp16 pairs: packed (x - m)·t, ex2.approx.f16x2, packed sums (each pair's terms <= 1) */
    const u32 mh = pack2(m, m), th = pack2(tl2, tl2);
    u32 eh = 0u;
#pragma unroll
    for (int k = 0; k < 4 * WPT; ++k) eh = hadd2(eh, hex2(hmul2(hsub2(acc[g][k], mh), th)));
    float e = h2f((u16)eh) + h2f((u16)(eh >> 16));
#else
    float e = 0.f;
#pragma unroll
    for (int k = 0; k < 4 * WPT; ++k)
      e += ex2((h2f((u16)acc[g][k]) - m) * tl2) + ex2((h2f((u16)(acc[g][k] >> 16)) - m) * tl2);
#endif
#pragma unroll
    for (int o = TPG / 2; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o, TPG);
    vq[g] += __logf(e);
#endif
    best = fmaxf(best, vq[g]);
  }
  return best;
}

/* Group p's score: S (B·Hkv, MG) its best, or with PERQ (B·Hkv, MG, G) each query's; -inf past the nqg groups */
__device__ __forceinline__ void store(float* __restrict__ S, int bh, int p, int MG, int nqg, float best,
                                      const float (&vq)[G]) {
#if PERQ
#pragma unroll
  for (int g = 0; g < G; ++g) S[((i64)bh * MG + p) * G + g] = p < nqg ? vq[g] : NEG_INF;
#else
  S[(i64)bh * MG + p] = p < nqg ? best : NEG_INF;
#endif
}

/* Q (B·Hkv·G, D) the step's queries; SK (B·Hkv, D, CAPH) bytes (byte m of a group's channel: tokens 2m, 2m + 1);
   SZ (B·Hkv, D, MG) fp16 pairs (scale, zero); IDX (B·Hkv, D) channels by rank and TAU (B·Hkv, TS)
   1 / sqrt(share), from `prepare`, or, with CHOOSE, the channel choice made here by every block (no launch
   of its own): |q| summed over the query group (times W (B·Hkv, D), the channels' weights, with WEIGH),
   ranked by counting (ties: the lower channel), as `sparq_reference.sparq_channels`. S (B·Hkv, MG): each
   quantized group's largest estimated logit over its tokens and the row's queries, times scale and tau (with
   PERQ, (B·Hkv, MG, G): each query's, `store`); -inf past the npos groups held; NPos = nqg · GROUP - 1. */
#if defined(EVERY) && EVERY > 1   /* quest's every=K: P0, the first decode step's position; the score runs on that
                                    step and every K-th after it (as the select, page_select.cu), else returns */
#define GATE_ARGS , const i64* __restrict__ P0
#define KEEP_TABLE ((Len[0] - 1 - P0[0]) % EVERY != 0)
#else
#define GATE_ARGS
#define KEEP_TABLE false
#endif
extern "C" __global__ void __launch_bounds__(NT, MINB) sparq_score(
    const u16* __restrict__ Q, const unsigned char* __restrict__ SK, const u32* __restrict__ SZ,
    const i64* __restrict__ Len, const int* __restrict__ IDX, const float* __restrict__ TAU, float* __restrict__ S,
    i64* __restrict__ NPos, int CAPH, int MG, double scale_d, int TS, const float* __restrict__ W GATE_ARGS) {
  if (KEEP_TABLE) return;
  const float scale = (float)scale_d;   /* torch passes a Python float as a double */
  const int bh = blockIdx.y;
  const int lane = threadIdx.x % TPG;
  const i64 len = Len[0] - 1 - SINK - WINDOW;
  const int nqg = len > 0 ? (int)(len / GROUP) : 0;
  if (bh == 0 && blockIdx.x == 0 && threadIdx.x == 0) NPos[0] = (i64)nqg * GROUP - 1;
  __shared__ u32 qh[R][G];          /* q of the chosen channels, as fp16 pairs (q, q) */
  __shared__ float qf[R][G];
  __shared__ int ch[R];
  __shared__ float tau[G];
#if CHOOSE
  __shared__ float qa[G][D];                /* |q| (times the channel weight) */
  __shared__ float qv[G][D];                /* q */
  __shared__ __align__(16) float sum[D];
  for (int d = threadIdx.x; d < D; d += NT) {   /* a thread a channel: its G queries' |q| summed */
#if WEIGH
    const float w = W[bh * D + d];
#else
    const float w = 1.f;
#endif
    float a = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float v = q2f(Q[((i64)bh * G + g) * D + d]);
      qv[g][d] = v;
      qa[g][d] = fabsf(v) * w;
      a += qa[g][d];
    }
    sum[d] = a;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += NT) {   /* rank by counting (ties: the lower channel first) */
    const float a = sum[d];
    int rank = 0;
#pragma unroll 8
    for (int e = 0; e < D; e += 4) {
      const float4 s4 = *reinterpret_cast<const float4*>(&sum[e]);
      rank += (s4.x > a) | ((s4.x == a) & (e < d));
      rank += (s4.y > a) | ((s4.y == a) & (e + 1 < d));
      rank += (s4.z > a) | ((s4.z == a) & (e + 2 < d));
      rank += (s4.w > a) | ((s4.w == a) & (e + 3 < d));
    }
    if (rank < R) ch[rank] = d;
  }
  __syncthreads();
  for (int g = threadIdx.x / 32; g < G; g += NT / 32) {   /* a warp a query: the share its R channels hold */
    float all = 0.f, kept = 0.f;
    for (int d = threadIdx.x % 32; d < D; d += 32) all += qa[g][d];
    for (int r = threadIdx.x % 32; r < R; r += 32) kept += qa[g][ch[r]];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      all += __shfl_xor_sync(0xffffffffu, all, o);
      kept += __shfl_xor_sync(0xffffffffu, kept, o);
    }
    if (threadIdx.x % 32 == 0) tau[g] = rsqrtf(fmaxf(kept / fmaxf(all, 1e-30f), 1e-30f));
  }
  for (int i = threadIdx.x; i < R * G; i += NT) {
    const int r = i / G, g = i % G;
    const float v = qv[g][ch[r]];
    qf[r][g] = v;
    qh[r][g] = pack2(v, v);
  }
#else
  for (int i = threadIdx.x; i < R; i += NT) ch[i] = IDX[bh * D + i];
  for (int i = threadIdx.x; i < G; i += NT) tau[i] = TAU[bh * TS + i];
  __syncthreads();
  for (int i = threadIdx.x; i < R * G; i += NT) {
    const int r = i / G, g = i % G;
    const float v = q2f(Q[((i64)bh * G + g) * D + ch[r]]);
    qf[r][g] = v;
    qh[r][g] = pack2(v, v);
  }
#endif
  __syncthreads();
  u32 wv[R][WPT], zv[R];
#if PIPE   /* grid (blocks a row, rows): block b takes tiles b, b + gridDim.x, ... of GPB groups, loading the next
              tile's codes while it scores this one */
  const int gi = threadIdx.x / TPG, ntile = (MG + GPB - 1) / GPB;
  load_group(SK, SZ, ch, bh, min((int)blockIdx.x * GPB + gi, MG - 1), lane, CAPH, MG, wv, zv);
#pragma unroll 1
  for (int t = blockIdx.x; t < ntile; t += gridDim.x) {
    u32 wn[R][WPT], zn[R];
    load_group(SK, SZ, ch, bh, min((t + (int)gridDim.x) * GPB + gi, MG - 1), lane, CAPH, MG, wn, zn);
    const int pt = t * GPB + gi;
    float vq[G];
    const float best = score_group(wv, zv, qh, qf, tau, scale, vq);
    if (lane == 0 && pt < MG) store(S, bh, pt, MG, nqg, best, vq);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      zv[r] = zn[r];
#pragma unroll
      for (int j = 0; j < WPT; ++j) wv[r][j] = wn[r][j];
    }
  }
#else
  const int p = blockIdx.x * GPB + threadIdx.x / TPG;
  load_group(SK, SZ, ch, bh, p < MG ? p : MG - 1, lane, CAPH, MG, wv, zv);
  float vq[G];
  const float best = score_group(wv, zv, qh, qf, tau, scale, vq);
  if (lane == 0 && p < MG) store(S, bh, p, MG, nqg, best, vq);
#endif
}
