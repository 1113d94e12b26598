// The per-chunk step of the fused linear cross-entropy on the CPU
// (csrc/cross_entropy_cpu.cpp; the op is python/fastpt/ops/linear_cross_entropy.py,
// whose Triton kernel _ce_chunk_kernel computes the same on the GPU).
//
// For each row r of a chunk of logits z (rows x cols, row stride ld, float32 /
// float16 / bfloat16), with target y[r], label smoothing e and z-loss coefficient c:
//   lse[r]  = log sum_j exp(z[r, j])
//   loss[r] = lse - (1 - e) z[r, y] - e mean_j z[r, j] + c lse^2
// and, when grad_scale is given, z[r, :] is overwritten (rounded to its dtype) with
//   grad_scale[r] * d loss[r] / d z[r, :]
//     = grad_scale[r] * ((1 + 2 c lse) softmax(z[r]) - e / cols - (1 - e) onehot(y))
// All math in float32; one read of the row to compute the statistics and, for the
// gradient, one more read (from cache) and one write. Plain data, pointers as integers.
#pragma once
#include <cstdint>

namespace fastpt {

struct CEChunkParams {
  uintptr_t z = 0;           // rows x cols logits, overwritten by the gradient when grad_scale != 0
  int64_t rows = 0, cols = 0, ld = 0;
  int dtype = 0;             // kFloat32, kFloat16 or kBFloat16
  uintptr_t target = 0;      // (rows,) int64 class ids in [0, cols)
  uintptr_t grad_scale = 0;  // (rows,) float32, or 0: statistics only, z untouched
  uintptr_t loss = 0;        // (rows,) float32 out
  uintptr_t lse = 0;         // (rows,) float32 out
  float smoothing = 0.0f, z_coef = 0.0f;
  int isa = 0;               // 0: the widest this CPU runs; 1 baseline, 2 AVX2, 3 AVX-512 (tests)
};

void ce_chunk_cpu(const CEChunkParams& p, int num_threads);

}  // namespace fastpt
