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
// With bias (cols values of z's dtype), the logits are z[r, j] + bias[j], added in
// float32 as each row is read (a bf16 GEMM accumulating into a bias-filled output ran
// 4-5 ms slower per 620 x 30522 chunk than one writing it); z keeps the bias-free
// values unless it is overwritten by the gradient (which is the same either way). All
// math in float32; one read of the row to compute the statistics and, for the
// gradient, one more read (from cache) and one write. With grad_bias, the float32
// gradient's column sums (before rounding) are added to it: per-chunk partial sums
// combined in a fixed order, so the result does not depend on thread timing. Plain
// data, pointers as integers.
#pragma once
#include <cstdint>

namespace fastpt {

struct CEChunkParams {
  uintptr_t z = 0;           // rows x cols logits, overwritten by the gradient when grad_scale != 0
  int64_t rows = 0, cols = 0, ld = 0;
  int dtype = 0;             // kFloat32, kFloat16 or kBFloat16
  uintptr_t bias = 0;        // (cols,) of z's dtype added to every row, or 0
  uintptr_t target = 0;      // (rows,) int64 class ids in [0, cols)
  uintptr_t grad_scale = 0;  // (rows,) float32, or 0: statistics only, z untouched
  uintptr_t grad_bias = 0;   // (cols,) float32: += the column sums of the gradient (with grad_scale), or 0
  uintptr_t loss = 0;        // (rows,) float32 out
  uintptr_t lse = 0;         // (rows,) float32 out
  float smoothing = 0.0f, z_coef = 0.0f;
  int isa = 0;               // 0: the widest this CPU runs; 1 baseline, 2 AVX2, 3 AVX-512 (tests)
};

void ce_chunk_cpu(const CEChunkParams& p, int num_threads);

}  // namespace fastpt
