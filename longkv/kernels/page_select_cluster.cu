// The page select over a cluster of CL thread blocks a row (sm_90+: distributed shared memory): the "cluster"
// method of `page_select.py`. Appended to page_select.cu (ukey, count, choose, load_keys) by NVRTC. Why: the
// single-block select (page_select.cu) runs a row on one SM, so 8 rows busy 8 of 132 SMs (10.9 us a layer at
// 512K under ncu, session 19). Here each block holds a slice of CT·CRK pages of the row and builds its own
// histogram each radix pass; after one cluster barrier every block sums the CL histograms (ld.shared::cluster,
// a thread a bin, the CL loads in flight together) and makes the same digit choice, so a pass costs one
// cluster barrier and no global memory. Measured (H100, 8 rows of 8K pages): 8.66 us against the block
// select's 8.85, so not the default. The select is a chain of dependent steps, and a cluster barrier (a
// MEMBAR.ALL.GPU each) costs what a block's barriers do. Session 20's first form (one warp gathering all 8·256
// bins, its remote loads a few at a time) took 22 us.
#ifndef CL
#define CL 8                     /* blocks a row (a cluster; 8 is the portable maximum) */
#endif
#ifndef CT
#define CT 256                   /* threads a block */
#endif
#ifndef CRK
#define CRK 4                    /* keys a thread: rows up to CL·CT·CRK pages */
#endif
#if CT < 256
#error "CT >= 256: a thread a histogram bin"
#endif
#define CW (CT / 32)

/* (release / acquire at cluster scope: ptxas makes the arrive a MEMBAR.ALL.GPU on sm_90) */
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

/* *p in the shared memory of the cluster's block `rank` */
__device__ __forceinline__ u32 cluster_ld(const u32* p, u32 rank) {
  u32 a = (u32)__cvta_generic_to_shared(p), r, v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(r) : "memory");
  return v;
}

/* exclusive prefix sum of each thread's x over the block (thread order), and the block's total: block_scan
   over CW warps, the warp sums added up by every thread (no second warp scan) */
__device__ __forceinline__ int cscan(int x, int* wsum, int& total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int inc = warp_scan(x);
  if (lane == 31) wsum[w] = inc;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int q = 0; q < CW; q++) { const int s = wsum[q]; before += q < w ? s : 0; total += s; }
  return before + inc - x;
}

#ifdef MASSQ
/* rank=mass folded into the select (MASSQ = G, the query group; quest's rank=mass without `page_mass`'s two
   launches). A row holds each page's G per-query values (the query's log-sum-exp over the page's tokens,
   quest_sparq.cu's PERQ), and a page's key is its attention mass summed over the queries: log Σ_g exp(s_pg − Z_g),
   Z_g = logsumexp over the row's MP pages (0 where a query has no finite value: it adds nothing), as
   `sparse_reference.page_mass` with no forced page. Z is reduced over the whole cluster (two cluster barriers), so
   the exponentials are spread over CL·(rows) SMs; session 34's form inside the one-block select (MASSG) read the row
   uncoalesced on 8 SMs and cost 45 us a layer. */
#define NEG_INF (__int_as_float(0xff800000))

/* v[g] combined over the row's CL·CT threads (max, or sum): the warp, the block's warps, the cluster's blocks */
template <bool MAX>
__device__ __forceinline__ void row_reduce(float (&v)[MASSQ], float (*wred)[MASSQ], float* part, float* gat) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tid = threadIdx.x;
#pragma unroll
  for (int g = 0; g < MASSQ; g++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float x = __shfl_xor_sync(0xffffffffu, v[g], o);
      v[g] = MAX ? fmaxf(v[g], x) : v[g] + x;
    }
    if (lane == 0) wred[w][g] = v[g];
  }
  __syncthreads();
  if (tid < MASSQ) {
    float a = wred[0][tid];
    for (int q = 1; q < CW; q++) a = MAX ? fmaxf(a, wred[q][tid]) : a + wred[q][tid];
    part[tid] = a;
  }
  cluster_arrive();
  cluster_wait();
  if (tid < CL * MASSQ) gat[tid] = __uint_as_float(cluster_ld((const u32*)&part[tid % MASSQ], tid / MASSQ));
  __syncthreads();
#pragma unroll
  for (int g = 0; g < MASSQ; g++) {
    float a = gat[g];
#pragma unroll
    for (int q = 1; q < CL; q++) a = MAX ? fmaxf(a, gat[q * MASSQ + g]) : a + gat[q * MASSQ + g];
    v[g] = a;
  }
}

/* key[0 .. N) = ukey(mass) of pages base .. base + N - 1 of a row of MP·MASSQ values (all MP pages enter Z) */
template <int N>
__device__ __forceinline__ void mass_keys(const float* __restrict__ row, int base, int MP, u32* key) {
  __shared__ float wred[CW][MASSQ], part[2][MASSQ], gat[2][CL * MASSQ];
  float x[N][MASSQ];
#pragma unroll
  for (int r = 0; r < N; r++) {
    const bool ok = base + r < MP;
#if MASSQ % 4 == 0
#pragma unroll
    for (int g = 0; g < MASSQ; g += 4) {
      const float4 f = ok ? *(const float4*)(row + (i64)(base + r) * MASSQ + g) : make_float4(NEG_INF, NEG_INF,
                                                                                             NEG_INF, NEG_INF);
      x[r][g] = f.x; x[r][g + 1] = f.y; x[r][g + 2] = f.z; x[r][g + 3] = f.w;
    }
#else
#pragma unroll
    for (int g = 0; g < MASSQ; g++) x[r][g] = ok ? row[(i64)(base + r) * MASSQ + g] : NEG_INF;
#endif
  }
  float m[MASSQ], z[MASSQ];
#pragma unroll
  for (int g = 0; g < MASSQ; g++) {
    m[g] = NEG_INF;
#pragma unroll
    for (int r = 0; r < N; r++) m[g] = fmaxf(m[g], x[r][g]);
  }
  row_reduce<true>(m, wred, part[0], gat[0]);
#pragma unroll
  for (int g = 0; g < MASSQ; g++) {
    z[g] = 0.f;
    if (m[g] > NEG_INF) {
#pragma unroll
      for (int r = 0; r < N; r++) z[g] += __expf(x[r][g] - m[g]);
    }
  }
  row_reduce<false>(z, wred, part[1], gat[1]);
#pragma unroll
  for (int g = 0; g < MASSQ; g++) z[g] = m[g] > NEG_INF ? m[g] + __logf(z[g]) : 0.f;     /* Z_g */
#pragma unroll
  for (int r = 0; r < N; r++) {
    float top = NEG_INF;
#pragma unroll
    for (int g = 0; g < MASSQ; g++) top = fmaxf(top, x[r][g] - z[g]);
    float e = 0.f;
#pragma unroll
    for (int g = 0; g < MASSQ; g++) e += __expf(x[r][g] - z[g] - top);
    key[r] = ukey(top > NEG_INF ? top + __logf(e) : NEG_INF);
  }
}
#endif

/* As page_select (same arguments, same result), the row bh = blockIdx.x / CL spread over the CL blocks of a
   cluster (grid BH·CL blocks of CT threads). Each radix pass may end the search early: when every key still
   matching the chosen digits is taken, T need not be resolved further (all of them go in the table). With MASSQ,
   S holds MP·MASSQ per-query values a row, ranked by their attention mass (`mass_keys`). */
extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(CT)
page_select_cluster(const float* __restrict__ S, const i64* __restrict__ Pos, int* __restrict__ Table,
                    int* __restrict__ Nsel, int* __restrict__ Last, int MP, int K, int PAGE, int row_pages, int stab) {
  __shared__ u32 hist[4][256];
  __shared__ u32 chosen[4][3];     /* a pass's digit, count above it, count equal to it */
  __shared__ u32 post[2];          /* this block's keys above / equal to T, read by the later blocks */
  __shared__ u32 sum[256];         /* a pass's histogram summed over the cluster */
  __shared__ u32 pre[CL][2];       /* post[] of every block of the row */
  __shared__ int wsum[CW];
  const int bh = blockIdx.x / CL, rank = blockIdx.x % CL, tid = threadIdx.x;
  const int base = (rank * CT + tid) * CRK;           /* the page of key[0] */
  const i64 pos = Pos[0];
  const int npages = (int)min(pos / PAGE + 1, (i64)MP);
  const int need = min(npages, K);
  for (int i = tid; i < 4 * 256; i += CT) (&hist[0][0])[i] = 0;
  u32 key[CRK];
#ifdef MASSQ
  mass_keys<CRK>(S + (i64)bh * MP * MASSQ, base, MP, key);
#else
  load_keys<CRK>(S + (i64)bh * MP, base, npages, MP, key);
#endif
  __syncthreads();
  u32 prefix = 0;                  /* T's top 32 - level bits */
  int want = need, level = 0;
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 24 - 8 * pass;
#pragma unroll
    for (int r = 0; r < CRK; r++) {
      const u32 u = key[r];
      count(hist[pass], (u >> shift) & 255, base + r < npages && (pass == 0 || (u >> (shift + 8)) == prefix));
    }
    cluster_arrive();
    cluster_wait();
    if (tid < 256) {  /* bin tid summed over the cluster: CL remote loads in flight at once */
      u32 v[CL], h = 0;
#pragma unroll
      for (int q = 0; q < CL; q++) v[q] = cluster_ld(&hist[pass][tid], q);
#pragma unroll
      for (int q = 0; q < CL; q++) h += v[q];
      sum[tid] = h;
    }
    __syncthreads();
    if (tid < 32) choose(sum, want, chosen[pass]);      /* in every block alike */
    __syncthreads();
    prefix = (prefix << 8) | chosen[pass][0];
    want -= (int)chosen[pass][1];
    level = shift;
    if ((int)chosen[pass][2] == want) break;          /* every key left is taken (the same in every block) */
  }
  /* keys with (key >> level) > prefix are taken, and the first `want` equal to it in page order */
  int n_gt = 0, n_eq = 0;
#pragma unroll
  for (int r = 0; r < CRK; r++) {
    const bool ok = base + r < npages;
    const u32 v = key[r] >> level;
    n_gt += ok && v > prefix;
    n_eq += ok && v == prefix;
  }
  int tot;
  const int before = cscan((n_eq << 16) | n_gt, wsum, tot);    /* both counts fit 16 bits: CT·CRK < 65536 */
  if (tid == 0) { post[0] = (u32)(tot & 0xffff); post[1] = (u32)(tot >> 16); }
  cluster_arrive();
  cluster_wait();
  if (tid < CL) { pre[tid][0] = cluster_ld(&post[0], tid); pre[tid][1] = cluster_ld(&post[1], tid); }
  cluster_arrive();                                    /* done with the other blocks' memory; wait before exit */
  __syncthreads();
  int gt0 = 0, eq0 = 0;                                /* the row's earlier blocks */
#pragma unroll
  for (int q = 0; q < CL - 1; q++)
    if (q < rank) { gt0 += (int)pre[q][0]; eq0 += (int)pre[q][1]; }
  int e = eq0 + (before >> 16);
  int slot = gt0 + (before & 0xffff) + min(e, want);
#pragma unroll
  for (int r = 0; r < CRK; r++) {
    const int i = base + r;
    const bool ok = i < npages;
    const u32 v = key[r] >> level;
    const bool eq = ok && v == prefix;
    const bool take = (ok && v > prefix) || (eq && e < want);
    if (take) Table[(i64)bh * stab + slot++] = i + bh * row_pages;
    if (i == npages - 1) Last[bh] = take ? (int)(pos % PAGE) + 1 : PAGE;
    e += eq;
  }
  if (rank == 0 && tid == 0) Nsel[bh] = need;
  cluster_wait();
}
