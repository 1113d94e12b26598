// Counter-based dropout kernels (csrc/dropout_cpu.cpp). Plain data, pointers as
// integers: nothing here depends on torch or pybind11.
//
// An element is kept iff (bits >> 8) >= threshold24, with bits from csrc/rng.h:
//   hidden    (flat element i of a contiguous buffer):
//             bits = mix32(mix32(key ^ (i >> 16)) ^ colmix(i & 0xFFFF))
//             i.e. _rng.bits(key, row, col) over the buffer seen as rows of 65536
//   attention (probs (n, H, L, L) contiguous, document d = doc_ids[n], head h, query i, key j):
//             bits = mix32(mix32(mix32(key ^ (d * H + h)) ^ colmix(i)) ^ colmix(j))   (colmix: rng.h)
//   rows      (probs (B, H, S, S) over whole rows, position i of row b in document doc[b, i]
//             (-1: none) at local position local[b, i]): the attention bits of
//             (doc[b, i], h, local[b, i], local[b, j]) where doc[b, j] == doc[b, i] >= 0;
//             every other entry is dropped (exactly 0)
// out = kept ? x * scale : 0, computed in fp32 (fp64 for float64) and rounded to
// nearest even for float16 / bfloat16. Dropped elements are exactly 0, even where
// x is inf or NaN. The backward is the same call on the incoming gradient.
#pragma once
#include <cstdint>

namespace fastpt {

// x, out: n elements of `dtype` (kFloat32, kFloat64, kFloat16, kBFloat16), distinct buffers.
void dropout_cpu(uintptr_t x, uintptr_t out, int64_t n, int dtype, uint32_t key, uint32_t threshold24,
                 double scale, int num_threads);

// probs, out: (n, heads, length, length) of `dtype`; doc_ids: (n,) int64, each in
// [0, 2^32 / heads) so that d * H + h fits the 32-bit hash input.
void attention_dropout_cpu(uintptr_t probs, uintptr_t out, uintptr_t doc_ids, int64_t n, int64_t heads,
                           int64_t length, int dtype, uint32_t key, uint32_t threshold24, double scale,
                           int num_threads);

// probs, out: (batch, heads, length, length) of `dtype`; doc, local: (batch, length) int64, each
// doc in [-1, 2^32 / heads), each local of a position with doc >= 0 in [0, length).
void attention_dropout_rows_cpu(uintptr_t probs, uintptr_t out, uintptr_t doc, uintptr_t local, int64_t batch,
                                int64_t heads, int64_t length, int dtype, uint32_t key, uint32_t threshold24,
                                double scale, int num_threads);

}  // namespace fastpt
