// Top-k pages of a score row into an ascending page table, one thread block a row: the CUDA source of
// `page_select.py`'s "block" method (see there). Compiled by NVRTC through torch.cuda._compile_kernel.
typedef unsigned int u32;
typedef long long i64;
#define NT 1024                  /* threads a block */
#define NW (NT / 32)

/* scores -> unsigned keys ordered as the floats are (-0.0 as +0.0), as page_select.py's _ukey */
__device__ __forceinline__ u32 ukey(float s) {
  int b = __float_as_int(s == 0.f ? 0.f : s);
  b ^= (b >> 31) & 0x7FFFFFFF;
  return (u32)b ^ 0x80000000u;
}

/* inclusive prefix sum of x over the warp's lanes */
__device__ __forceinline__ int warp_scan(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) { const int y = __shfl_up_sync(0xffffffffu, x, o); if (lane >= o) x += y; }
  return x;
}

/* exclusive prefix sum of each thread's x over the block (thread order), and the block's total */
__device__ __forceinline__ int block_scan(int x, int* wsum, int& total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int inc = warp_scan(x);
  if (lane == 31) wsum[w] = inc;
  __syncthreads();
  if (w == 0) wsum[lane] = warp_scan(wsum[lane]);     /* inclusive over the warps */
  __syncthreads();
  total = wsum[NW - 1];
  const int before = (w ? wsum[w - 1] : 0) + inc - x;
  __syncthreads();
  return before;
}

#ifndef RK
#define RK 16                    /* keys a thread holds (pages tid·RK .. tid·RK + RK - 1): rows up to RK·NT pages */
#endif

/* hist[d] += 1 for this lane's digit, one shared-memory atomic a distinct digit of the warp (the keys of a
   row share their top bits: plain atomics would queue on a few bins) */
#ifndef AGG
#define AGG 2       /* H200, 8 rows of 8192 (select_probe.py): 0: 19.6 µs, 1: 15.3, 2: 12.6 (graph-replayed) */
#endif
__device__ __forceinline__ void count(u32* hist, u32 d, bool on) {
  const u32 act = __ballot_sync(0xffffffffu, on);
  if (!on) return;
#if AGG == 0          /* one atomic a distinct digit of the warp */
  const u32 same = __match_any_sync(act, d);
  if ((threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&hist[d], __popc(same));
#elif AGG == 1        /* one atomic when the warp's digits agree (the top passes), else one a lane */
  const u32 lo = __reduce_min_sync(act, d), hi = __reduce_max_sync(act, d);
  if (lo == hi) { if ((threadIdx.x & 31) == __ffs(act) - 1) atomicAdd(&hist[d], __popc(act)); }
  else atomicAdd(&hist[d], 1u);
#else                 /* one a lane */
  atomicAdd(&hist[d], 1u);
#endif
}

/* One warp (lane = threadIdx.x < 32), from a pass's 256 bins in shared memory: suffix sums (8 bins a lane),
   the largest digit b with count(digit >= b) >= want (b >= 0 exists: count(digit >= 0) >= want), and
   out = {b, count(digit > b), count(digit == b)}. */
__device__ __forceinline__ void choose(const u32* bins, int want, u32* out) {
  const int lane = threadIdx.x;
  u32 c[8], run = 0;
#pragma unroll
  for (int j = 7; j >= 0; j--) { run += bins[8 * lane + j]; c[j] = run; }   /* within the lane, from its top */
  const u32 own = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {                                        /* suffix sums over the lanes */
    const u32 x = __shfl_down_sync(0xffffffffu, run, o);
    if (lane + o < 32) run += x;
  }
  const u32 above = run - own;                                              /* lanes above this one */
  /* c[j] + above = count(digit >= 8·lane + j) */
  int b = -1;
  u32 gt = 0, eq = 0;
#pragma unroll
  for (int j = 0; j < 8; j++)
    if (c[j] + above >= (u32)want) { b = 8 * lane + j; gt = (j < 7 ? c[j + 1] : 0u) + above; eq = bins[8 * lane + j]; }
  int best = b;                                                             /* the largest b over the lanes */
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
  if (b == best) { out[0] = (u32)b; out[1] = gt; out[2] = eq; }
}

/* key[0 .. N) = the keys of pages base .. base + N - 1 of a row (npages valid; float4 loads where aligned) */
template <int N>
__device__ __forceinline__ void load_keys(const float* row, int base, int npages, int MP, u32* key) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int r = 0; r < N; r += 4) {
      const int i = base + r;
      float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i + 3 < npages && (MP & 3) == 0) f = *(const float4*)(row + i);
      else { if (i < npages) f.x = row[i]; if (i + 1 < npages) f.y = row[i + 1]; if (i + 2 < npages) f.z = row[i + 2];
             if (i + 3 < npages) f.w = row[i + 3]; }
      key[r] = ukey(f.x); key[r + 1] = ukey(f.y); key[r + 2] = ukey(f.z); key[r + 3] = ukey(f.w);
    }
  } else {
#pragma unroll
    for (int r = 0; r < N; r++) key[r] = ukey(base + r < npages ? row[base + r] : 0.f);
  }
}

#ifndef EARLY
#define EARLY 1     /* end the radix passes once every key still matching the chosen digits is taken (H100, 8 rows
                       of 8192, select_probe.py: 8.91 us against 9.59 without) */
#endif

/* Row bh of S (rows of MP scores): pages [0, npages), npages = min(pos / PAGE + 1, MP) (C division, as
   the Triton select); need = min(npages, K) of them: every page whose key is above the need-th largest
   key T and the lowest-index pages equal to it, written ascending as bh·row_pages + page. T comes from
   a radix select, 8 bits a pass from the top, each pass one shared-memory histogram of the keys that
   still match the digits chosen so far; the keys stay in registers (thread t holds pages t·RK ..), so
   the table is written with two block-wide prefix sums. Rows up to RK·NT pages (`page_select.py`). */
/* EVERY > 1 (quest's every=K): two more arguments, Len (tokens held, this one included) and P0 (the first decode
   step's position); the kernel returns at once, leaving Table and Nsel as they are, unless this step is P0's or
   the K-th after one (page_select.py: refresh) */
#if defined(EVERY) && EVERY > 1
#define GATE_ARGS , const i64* __restrict__ Len, const i64* __restrict__ P0
#define KEEP_TABLE ((Len[0] - 1 - P0[0]) % EVERY != 0)
#else
#define GATE_ARGS
#define KEEP_TABLE false
#endif

extern "C" __global__ void __launch_bounds__(NT) page_select(const float* __restrict__ S, const i64* __restrict__ Pos,
                                                             int* __restrict__ Table, int* __restrict__ Nsel,
                                                             int* __restrict__ Last, int MP, int K, int PAGE,
                                                             int row_pages, int stab GATE_ARGS) {
  if (KEEP_TABLE) return;
  __shared__ u32 hist[256];
  __shared__ u32 chosen[3];
  __shared__ int wsum[NW];
  __shared__ int topmax;
  const int bh = blockIdx.x, tid = threadIdx.x;
  const float* row = S + (i64)bh * MP;
  const i64 pos = Pos[0];
  const int npages = (int)min(pos / PAGE + 1, (i64)MP);
  const int need = min(npages, K);
  u32 key[RK];
  load_keys<RK>(row, tid * RK, npages, MP, key);
  u32 prefix = 0;
  int want = need, level = 0;
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 24 - 8 * pass;
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RK; r++) {
      const u32 u = key[r];
      count(hist, (u >> shift) & 255, tid * RK + r < npages && (pass == 0 || (u >> (shift + 8)) == prefix));
    }
    __syncthreads();
    if (tid < 32) choose(hist, want, chosen);
    __syncthreads();
    prefix = (prefix << 8) | chosen[0];
    want -= (int)chosen[1];
    level = shift;
    const bool done = EARLY && (int)chosen[2] == want;    /* every key left is taken: T need not be resolved further */
    __syncthreads();
    if (done) break;
  }
  /* prefix = T's top 32 - level bits; take keys above it and the first `want` keys equal to it (index order),
     written ascending */
  if (tid == 0) topmax = -1;
  int n_eq = 0;
#pragma unroll
  for (int r = 0; r < RK; r++) n_eq += tid * RK + r < npages && key[r] >> level == prefix;
  int tot;
  int eq_rank = block_scan(n_eq, wsum, tot);           /* equal keys before this thread's */
  int mine = 0;                                        /* keys this thread takes */
  {
    int e = eq_rank;
#pragma unroll
    for (int r = 0; r < RK; r++) {
      const bool ok = tid * RK + r < npages;
      const bool eq = ok && key[r] >> level == prefix;
      mine += (ok && key[r] >> level > prefix) || (eq && e < want);
      e += eq;
    }
  }
  int slot = block_scan(mine, wsum, tot);
  int top = -1;
#pragma unroll
  for (int r = 0; r < RK; r++) {
    const int i = tid * RK + r;
    const bool ok = i < npages;
    const bool eq = ok && key[r] >> level == prefix;
    if ((ok && key[r] >> level > prefix) || (eq && eq_rank < want)) {
      Table[(i64)bh * stab + slot] = i + bh * row_pages;
      slot++;
      top = i;
    }
    eq_rank += eq;
  }
  if (top >= 0) atomicMax(&topmax, top);
  __syncthreads();
  if (tid == 0) {
    Nsel[bh] = need;
    Last[bh] = topmax == npages - 1 ? (int)(pos % PAGE) + 1 : PAGE;
  }
}
