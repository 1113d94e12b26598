// Element conversions of the CPU kernels (dropout_cpu.cpp, cross_entropy_cpu.cpp):
// storage type S, math type F and torch's rounding (exact widening, narrowing to
// nearest even, NaN stays NaN), written without branches so element loops vectorise.
#pragma once
#include <cstdint>
#include <cstring>

#include "dtypes.h"

namespace fastpt {

inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// c ? a : b with masks: GCC keeps a float op that feeds a ?: inside a branch
// (it may trap), and a branch stops the loop from vectorising.
inline uint32_t pick(bool c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c))); }

// Storage type S, math type F, and the conversions (torch's: exact widening,
// narrowing rounds to nearest even, NaN stays NaN). Written without branches so
// that the element loop vectorises.
template <int D>
struct Elem;

template <>
struct Elem<kFloat32> {
  using S = float;
  using F = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

template <>
struct Elem<kFloat64> {
  using S = double;
  using F = double;
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};

template <>
struct Elem<kBFloat16> {
  using S = uint16_t;
  using F = float;
  static float load(uint16_t v) { return as_float(static_cast<uint32_t>(v) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = as_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(pick(f != f, 0x7FC0u, rounded));
  }
};

template <>
struct Elem<kFloat16> {
  using S = uint16_t;
  using F = float;
  // F. Giesen's half_to_float: exponent rebias, then the two special cases selected.
  static float load(uint16_t h) {
    const uint32_t o = static_cast<uint32_t>(h & 0x7FFFu) << 13, exp = o & (0x7C00u << 13);
    const uint32_t normal = o + ((127u - 15u) << 23);
    const uint32_t special = normal + ((128u - 16u) << 23);                  // inf / NaN
    const uint32_t tiny = as_bits(as_float(normal + (1u << 23)) - as_float(113u << 23));  // zero / subnormal
    const uint32_t v = pick(exp == (0x7C00u << 13), special, pick(exp == 0, tiny, normal));
    return as_float(v | (static_cast<uint32_t>(h & 0x8000u) << 16));
  }
  // F. Giesen's float_to_half_fast3_rtne: subnormal results through a magic add
  // (the FPU rounds to nearest even), normal ones by integer rounding.
  static uint16_t store(float f) {
    const uint32_t u = as_bits(f), sign = u & 0x80000000u, a = u ^ sign;
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    const uint32_t sub = as_bits(as_float(a) + as_float(magic)) - magic;
    const uint32_t norm = (a + ((15u - 127u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    const uint32_t big = pick(a > (255u << 23), 0x7E00u, 0x7C00u);  // NaN : overflow to inf
    const uint32_t v = pick(a >= ((127u + 16u) << 23), big, pick(a < (113u << 23), sub, norm));
    return static_cast<uint16_t>(v | (sign >> 16));
  }
};

// dst[j] = src[j] widened (or narrowed, rounding to nearest even) for j < n; inlined into
// each caller's instruction set, where the loop vectorises.
template <int D>
inline void widen(const typename Elem<D>::S* __restrict__ src, typename Elem<D>::F* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = Elem<D>::load(src[j]);
}

template <int D>
inline void narrow(const typename Elem<D>::F* __restrict__ src, typename Elem<D>::S* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = Elem<D>::store(src[j]);
}

}  // namespace fastpt
