// Counter-based random bits shared by the CPU (C++) and CUDA masking kernels.
// The same formula lives in python/fastpt/ops/_rng.py (reference, and its
// docstring is the specification) and in the Triton kernels: every backend
// produces bit-identical masks for a seed.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPT_HD __host__ __device__ __forceinline__
#else
#define FASTPT_HD inline
#endif

namespace fastpt {

// Chris Wellons' "lowbias32": a bijection on 32-bit words with low bias.
FASTPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

FASTPT_HD uint32_t row_key(uint32_t key, uint32_t row) { return mix32(key ^ row); }

// The column counter is spread over all 32 bits first (x 0x61C88647 = 2^32 - golden ratio): a bare
// rkey ^ col correlated columns a fixed distance apart and repeated rows whose keys differ by < n_cols
// in XOR-permuted columns (python/fastpt/ops/_rng.py docstring).
FASTPT_HD uint32_t colmix(uint32_t col) { return col * 0x61C88647u; }

FASTPT_HD uint32_t rand_bits(uint32_t rkey, uint32_t col) { return mix32(rkey ^ colmix(col)); }

// Uniform integer in [0, n) from 32 random bits (Lemire's multiply-shift).
FASTPT_HD uint32_t uniform_int(uint32_t b, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(b) * n) >> 32);
}

// True with probability threshold24 / 2^24.
FASTPT_HD bool bernoulli24(uint32_t b, uint32_t threshold24) { return (b >> 8) < threshold24; }

}  // namespace fastpt
