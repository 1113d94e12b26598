// Parameter block of the tiled contrastive log-sum-exp, shared by the CPU
// (csrc/contrastive_cpu.cpp) and CUDA (kernels/contrastive.cu) kernels. Plain
// data, pointers as integers: nothing here depends on torch or pybind11.
//
// The op (python/fastpt/ops/contrastive.py has the losses built on it):
//   S       = scale * q @ [k; queue]^T          (n, m + n_queue), never stored whole
//   S[i, i + self_offset] = -inf                 (exclude_self, key columns only: NT-Xent)
//   row_lse = logsumexp over the columns of S    (n,)
//   col_lse = logsumexp over the rows of S[:, :m] (m,)  only when symmetric
// backward, with dS[i, j] = g_row[i] exp(S[i, j] - row_lse[i])
//                         + g_col[j] exp(S[i, j] - col_lse[j])  (key columns, symmetric):
//   grad_q = dS @ [k; queue]   (n, d) float32, not multiplied by scale
//   grad_k = dS[:, :m]^T @ q   (m, d) float32, not multiplied by scale (the queue gets none)
#pragma once
#include <cstdint>

#include "dtypes.h"

namespace fastpt {

struct ContrastiveParams {
  uintptr_t q = 0;      // (n, d) queries, row-major contiguous, `dtype`
  uintptr_t k = 0;      // (m, d) keys, same dtype
  uintptr_t queue = 0;  // optional (n_queue, d) extra negatives, same dtype
  int64_t n = 0, m = 0, n_queue = 0, d = 0;
  int dtype = kFloat32;  // kFloat32, kFloat16 or kBFloat16 (csrc/dtypes.h)
  float scale = 1.0f;    // 1 / temperature (CPU kernels)
  bool symmetric = false;
  bool exclude_self = false;
  int64_t self_offset = 0;  // query i excludes key column i + self_offset (when exclude_self)
  int isa = 0;              // CPU only: 0 = widest supported; 1 = baseline, 2 = avx2, 3 = avx512 (tests)
  // forward outputs, float32
  uintptr_t row_lse = 0;  // (n,)
  uintptr_t col_lse = 0;  // (m,) when symmetric
  // backward inputs (float32; row_lse / col_lse as produced by the forward) and outputs
  uintptr_t grad_row = 0;  // (n,) dLoss / d row_lse
  uintptr_t grad_col = 0;  // (m,) dLoss / d col_lse, when symmetric
  uintptr_t grad_q = 0;    // (n, d) float32 out
  uintptr_t grad_k = 0;    // (m, d) float32 out
  // CUDA only, optional: the positives' gradient added to dS in float32, before dS is rounded for
  // the tensor cores: dS[i, (i + pos_shift) % pos_wrap + pos_base] += grad_pos[i] (pos_wrap > 0).
  uintptr_t grad_pos = 0;  // (n,) float32
  int64_t pos_shift = 0, pos_wrap = 0, pos_base = 0;
  // CUDA only. The scale is read on the device from a float32 scalar, so that a
  // learnable temperature / logit_scale costs no host synchronisation per call.
  uintptr_t scale_ptr = 0;
  // CUDA only: scratch of at least contrastive_cuda_workspace(...) bytes, allocated
  // by the caller (torch's caching allocator) on the same device and stream.
  uintptr_t workspace = 0;
  int64_t workspace_bytes = 0;
};

#if defined(FASTPT_WITH_CUDA)
// Launchers in kernels/contrastive.cu, on the current device; stream is a
// cudaStream_t as an integer. They return an empty string on success or the
// CUDA error text. The caller has checked shapes and pointers (csrc/ binding).
const char* contrastive_cuda_workspace(const ContrastiveParams& p, bool backward, int64_t* bytes);
const char* contrastive_forward_cuda(const ContrastiveParams& p, uintptr_t stream);
const char* contrastive_backward_cuda(const ContrastiveParams& p, uintptr_t stream);
#endif

}  // namespace fastpt
