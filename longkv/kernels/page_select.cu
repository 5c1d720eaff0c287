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

/* exclusive prefix count of `flag` over the block's NT threads (index order), and the block's total */
__device__ __forceinline__ int block_scan(bool flag, int* wsum, int& total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const u32 bal = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) wsum[w] = __popc(bal);
  __syncthreads();
  int before = 0;
  total = 0;
  for (int i = 0; i < NW; i++) { const int c = wsum[i]; before += i < w ? c : 0; total += c; }
  __syncthreads();
  return before + __popc(bal & ((1u << lane) - 1u));
}

#define RK 16                    /* keys a thread keeps in registers: rows up to RK·NT pages stay there */

/* hist[d] += 1 for this lane's digit, one shared-memory atomic a distinct digit of the warp (the keys of a
   row share their top bits: plain atomics would queue on a few bins) */
__device__ __forceinline__ void count(u32* hist, u32 d, bool on) {
  const u32 act = __ballot_sync(0xffffffffu, on);
  if (!on) return;
  const u32 same = __match_any_sync(act, d);
  if ((threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&hist[d], __popc(same));
}

/* Row bh of S (rows of MP scores): pages [0, npages), npages = min(pos / PAGE + 1, MP) (C division, as
   the Triton select); need = min(npages, K) of them: every page whose key is above the need-th largest
   key T and the lowest-index pages equal to it, written ascending as bh·row_pages + page. T comes from
   a radix select, 8 bits a pass from the top, each pass one shared-memory histogram of the keys that
   still match the digits chosen so far (keys past RK·NT are re-read from L2 each pass). */
extern "C" __global__ void __launch_bounds__(NT) page_select(const float* __restrict__ S, const i64* __restrict__ Pos,
                                                             int* __restrict__ Table, int* __restrict__ Nsel,
                                                             int* __restrict__ Last, int MP, int K, int PAGE,
                                                             int row_pages, int stab) {
  __shared__ u32 hist[256];
  __shared__ u32 chosen[2];
  __shared__ int wsum[NW];
  __shared__ int topmax;
  const int bh = blockIdx.x, tid = threadIdx.x;
  const float* row = S + (i64)bh * MP;
  const i64 pos = Pos[0];
  const int npages = (int)min(pos / PAGE + 1, (i64)MP);
  const int need = min(npages, K);
  u32 key[RK];
#pragma unroll
  for (int r = 0; r < RK; r++) { const int i = tid + r * NT; key[r] = i < npages ? ukey(row[i]) : 0u; }
  u32 prefix = 0;
  int want = need;
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 24 - 8 * pass;
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RK; r++) {
      if (r * NT >= npages) break;                                  /* uniform over the block */
      const u32 u = key[r];
      count(hist, (u >> shift) & 255, tid + r * NT < npages && (pass == 0 || (u >> (shift + 8)) == prefix));
    }
    for (int base = RK * NT; base < npages; base += NT) {
      const int i = base + tid;
      const u32 u = i < npages ? ukey(row[i]) : 0u;
      count(hist, (u >> shift) & 255, i < npages && (pass == 0 || (u >> (shift + 8)) == prefix));
    }
    __syncthreads();
    if (tid < 32) {   /* one warp: suffix sums of the 256 bins (8 a lane), the largest digit b with
                         count(digit >= b) >= want, and count(digit > b) */
      u32 c[8], run = 0;
#pragma unroll
      for (int j = 7; j >= 0; j--) { run += hist[8 * tid + j]; c[j] = run; }   /* within the lane, from its top */
      const u32 own = run;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {                                      /* suffix sums over the lanes */
        const u32 x = __shfl_down_sync(0xffffffffu, run, o);
        if (tid + o < 32) run += x;
      }
      const u32 above = run - own;                                            /* lanes above this one */
      /* c[j] + above = count(digit >= 8·tid + j) */
      int b = -1;
      u32 gt = 0;
#pragma unroll
      for (int j = 0; j < 8; j++)
        if (c[j] + above >= (u32)want) { b = 8 * tid + j; gt = (j < 7 ? c[j + 1] : 0u) + above; }
      /* the largest b over the lanes */
      int best = b;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
      if (b == best && b >= 0) { chosen[0] = (u32)b; chosen[1] = gt; }
      if (best < 0 && tid == 0) { chosen[0] = 0; chosen[1] = 0; }   /* want = 0 never reaches here */
    }
    __syncthreads();
    prefix = (prefix << 8) | chosen[0];
    want -= (int)chosen[1];
    __syncthreads();
  }
  /* prefix = T; take keys > T and the first `want` keys == T, ascending */
  if (tid == 0) topmax = -1;
  int taken = 0, eqs = 0;
  for (int base = 0; base < npages; base += NT) {
    const int i = base + tid, r = base / NT;
    u32 u = 0u;
#pragma unroll
    for (int j = 0; j < RK; j++) u = j == r ? key[j] : u;                /* registers, without local memory */
    if (r >= RK) u = i < npages ? ukey(row[i]) : 0u;
    const bool ok = i < npages;
    int n_eq, n_take;
    const int eq_rank = eqs + block_scan(ok && u == prefix, wsum, n_eq);
    const bool take = ok && (u > prefix || (u == prefix && eq_rank < want));
    const int slot = taken + block_scan(take, wsum, n_take);
    if (take) {
      Table[(i64)bh * stab + slot] = i + bh * row_pages;
      atomicMax(&topmax, i);
    }
    taken += n_take;
    eqs += n_eq;
  }
  __syncthreads();
  if (tid == 0) {
    Nsel[bh] = need;
    Last[bh] = topmax == npages - 1 ? (int)(pos % PAGE) + 1 : PAGE;
  }
}
