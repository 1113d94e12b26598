// Host launchers of the attention kernels, one template per (dtype, head dim).
// kernels/attention_{fwd,bwd}_hdim<D>.cu instantiate them with
// FASTPT_ATTN_INSTANTIATE_{FWD,BWD}; kernels/attention.cu dispatches to them
// and sees only the extern declarations, so each head dim compiles once, in
// its own translation unit, in parallel with the others.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "attention.h"
#include "attention_kernel.cuh"

namespace fastpt {
namespace attn {

inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Raises the kernel's dynamic shared-memory limit to `bytes` (above the 48 KB
// default that needs an explicit opt-in), after checking that the device has that
// much per block. Returns nullptr or the error text.
template <typename Kernel>
const char* set_smem(Kernel kernel, int bytes) {
  int dev = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (bytes > limit) return "attention_cuda: the device has too little shared memory per block for this head dim";
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline dim3 doc_grid(int64_t tiles, int64_t heads, int64_t num_docs) {
  // grid.z stops at 65535; the kernels loop over the documents beyond.
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads),
              static_cast<unsigned>(std::min<int64_t>(num_docs, 65535)));
}

template <typename T, int D>
const char* run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using C = FwdCfg<D>;
  auto kernel = attention_fwd_kernel<T, D>;
  if (const char* err = set_smem(kernel, C::kSmemBytes)) return err;
  const dim3 grid = doc_grid((p.max_len + C::kBM - 1) / C::kBM, p.H, p.num_docs);
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return launch_status();
}

// dK/dV then dQ; p.delta must already hold rowsum(dout * out) (attention.cu).
template <typename T, int D>
const char* run_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  {
    using C = BwdKVCfg<D>;
    auto kernel = attention_bwd_dkdv_kernel<T, D>;
    if (const char* err = set_smem(kernel, C::kSmemBytes)) return err;
    const dim3 grid = doc_grid((p.max_len + C::kBN - 1) / C::kBN, p.Hk, p.num_docs);
    kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
    if (const char* err = launch_status()) return err;
  }
  {
    using C = BwdQCfg<D>;
    auto kernel = attention_bwd_dq_kernel<T, D>;
    if (const char* err = set_smem(kernel, C::kSmemBytes)) return err;
    const dim3 grid = doc_grid((p.max_len + C::kBM - 1) / C::kBM, p.H, p.num_docs);
    kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
    return launch_status();
  }
}

}  // namespace attn
}  // namespace fastpt

#define FASTPT_ATTN_FOR_DTYPES(MACRO, D) \
  MACRO(__half, D)                       \
  MACRO(__nv_bfloat16, D)

#define FASTPT_ATTN_FWD_DECL(T, D) \
  template const char* fastpt::attn::run_attention_fwd<T, D>(const fastpt::AttentionParams&, cudaStream_t);
#define FASTPT_ATTN_BWD_DECL(T, D) \
  template const char* fastpt::attn::run_attention_bwd<T, D>(const fastpt::AttentionParams&, cudaStream_t);
#define FASTPT_ATTN_FWD_EXTERN(T, D) extern FASTPT_ATTN_FWD_DECL(T, D)
#define FASTPT_ATTN_BWD_EXTERN(T, D) extern FASTPT_ATTN_BWD_DECL(T, D)

// In kernels/attention_{fwd,bwd}_hdim<D>.cu: compile the head dim's kernels.
#define FASTPT_ATTN_INSTANTIATE_FWD(D) FASTPT_ATTN_FOR_DTYPES(FASTPT_ATTN_FWD_DECL, D)
#define FASTPT_ATTN_INSTANTIATE_BWD(D) FASTPT_ATTN_FOR_DTYPES(FASTPT_ATTN_BWD_DECL, D)
// In kernels/attention.cu: use them without compiling them again.
#define FASTPT_ATTN_EXTERN(D)                           \
  FASTPT_ATTN_FOR_DTYPES(FASTPT_ATTN_FWD_EXTERN, D)     \
  FASTPT_ATTN_FOR_DTYPES(FASTPT_ATTN_BWD_EXTERN, D)
