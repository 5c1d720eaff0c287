// PTX helpers shared by the NVRTC-built kernels (quant_cuda.cu, quest_sparq.cu): put in front of each
// source after its #defines (QBF16 chooses how q2f reads a query element).
typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float q2f(u16 h) {
#if QBF16
  return __uint_as_float(((u32)h) << 16);
#else
  return h2f(h);
#endif
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ u32 lop_or(u32 a, u32 b, u32 c) {      /* (a & b) | c, one LOP3 */
  u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r;
}
