// Portable SIMD helpers of the CPU kernels (contrastive_cpu.cpp, cross_entropy_cpu.cpp):
// GCC/clang vector extensions in three widths, compiled per instruction set
// (FASTPT_TARGET_* function attributes) and chosen at run time by best_isa().
#pragma once
#include <cstdint>
#include <cstring>

namespace fastpt {
namespace simd {

// The vector helpers below take and return AVX / AVX-512 vectors from functions
// compiled for the baseline ISA; they are always inlined into the per-ISA entry
// points, so the ABI note GCC prints for them concerns calls that never happen.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#if defined(__GNUC__)
#define FASTPT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTPT_ALWAYS_INLINE inline
#endif

// --------------------------------------------------------------------------- ISA descriptions

// W floats per vector, micro-tile of MR rows x NV vectors (NR = W * NV columns).
// MR * NV accumulators + NV loads + 1 broadcast fit the register file of each ISA.
template <int W_, int MR_, int NV_>
struct Isa {
  static constexpr int W = W_, MR = MR_, NV = NV_, NR = W_ * NV_;
  typedef float V __attribute__((vector_size(W_ * sizeof(float))));
  typedef int32_t VI __attribute__((vector_size(W_ * sizeof(int32_t))));
};
using IsaBase = Isa<4, 4, 2>;     // SSE2 / NEON: 8 accumulators of 16 registers
using IsaAvx2 = Isa<8, 6, 2>;     // 12 of 16 ymm
using IsaAvx512 = Isa<16, 8, 2>;  // 16 of 32 zmm

template <class V>
FASTPT_ALWAYS_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
FASTPT_ALWAYS_INLINE void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class V>
FASTPT_ALWAYS_INLINE V splat(float x) {
  return V{} + x;
}
template <class I>
FASTPT_ALWAYS_INLINE typename I::V vselect(typename I::VI mask, typename I::V a, typename I::V b) {
  using VI = typename I::VI;
  using V = typename I::V;
  return (V)(((VI)a & mask) | ((VI)b & ~mask));
}

// exp(x) in float32 (Cephes polynomial, ~1 ulp). x < -87.34 (including -inf)
// flushes to 0, NaN stays NaN; callers only pass x <= 0 (or NaN).
template <class I>
FASTPT_ALWAYS_INLINE typename I::V vexp(typename I::V x) {
  using V = typename I::V;
  using VI = typename I::VI;
  const VI is_nan = x != x;
  const VI under = x < splat<V>(-87.33654f);
  V xc = vselect<I>(x > splat<V>(-87.33654f), x, splat<V>(-87.33654f));  // NaN -> bound: no UB below
  xc = vselect<I>(xc < splat<V>(88.0f), xc, splat<V>(88.0f));
  const V fx = xc * 1.44269504088896341f + 0.5f;
  V t = __builtin_convertvector(__builtin_convertvector(fx, VI), V);
  t = t + __builtin_convertvector((VI)(t > fx), V);  // truncation -> floor (true is -1)
  const VI n = __builtin_convertvector(t, VI);
  xc = xc - t * 0.693359375f;
  xc = xc + t * 2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * xc + 1.3981999507e-3f;
  y = y * xc + 8.3334519073e-3f;
  y = y * xc + 4.1665795894e-2f;
  y = y * xc + 1.6666665459e-1f;
  y = y * xc + 5.0000001201e-1f;
  y = y * (xc * xc) + xc + 1.0f;
  y = y * (V)((n + 127) << 23);
  y = vselect<I>(under, V{}, y);
  return vselect<I>(is_nan, x, y);
}

template <class I>
FASTPT_ALWAYS_INLINE float hmax(typename I::V v) {
  float m = v[0];
  for (int l = 1; l < I::W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
template <class I>
FASTPT_ALWAYS_INLINE float hsum(typename I::V v) {
  float s = 0.0f;
  for (int l = 0; l < I::W; ++l) s += v[l];
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTPT_X86_ISAS 1
#define FASTPT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FASTPT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#endif

// 3: AVX-512 (F, VL, BW, DQ), 2: AVX2 + FMA, 1: the baseline: the widest of the ISAs above this CPU runs.
inline int best_isa() {
#if defined(FASTPT_X86_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    return 3;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
#endif
  return 1;
}

}  // namespace simd
}  // namespace fastpt
