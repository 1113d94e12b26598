// Entry points of the fused attention kernels (csrc/attention.h): argument
// checks, the backward's delta = rowsum(dout * out) pass, and dispatch on
// (dtype, head dim) to the launchers that kernels/attention_{fwd,bwd}_hdim*.cu
// compile. The kernels themselves are in attention_kernel.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention.h"
#include "attention_launch.cuh"
#include "dtypes.h"

FASTPT_ATTN_EXTERN(32)
FASTPT_ATTN_EXTERN(64)
FASTPT_ATTN_EXTERN(96)
FASTPT_ATTN_EXTERN(128)

namespace fastpt {
namespace {

constexpr int kHeadDims[] = {32, 64, 96, 128};

// ---------------------------------------------------------------------------- delta
//
// delta[b, h, s0 + i] = sum_d dout[i, d] * out[i, d] over each document's rows
// (fp32 from the 16-bit tensors, as FlashAttention-2 does): one warp per row,
// each lane two adjacent elements at a time.

constexpr int kDeltaWarps = 4;
constexpr int kDeltaRows = 32;  // rows per block

template <typename T>
__device__ __forceinline__ float2 to_float2(const T* p) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
}

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) attention_bwd_delta_kernel(const AttentionParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y;
  const int D = static_cast<int>(p.D);
  const T* out = reinterpret_cast<const T*>(p.out);
  const T* dout = reinterpret_cast<const T*>(p.dout);
  float* delta = reinterpret_cast<float*>(p.delta);
  for (int64_t n = blockIdx.z; n < p.num_docs; n += gridDim.z) {
    const attn::Doc doc = attn::load_doc(p, n);
    const int i0 = blockIdx.x * kDeltaRows;
    for (int r = warp; r < kDeltaRows; r += kDeltaWarps) {
      const int i = i0 + r;
      if (i >= doc.L) break;  // uniform over the warp
      const int64_t row = int64_t{doc.s0 + i};
      const T* o = out + doc.b * p.o_sb + row * p.o_ss + h * p.o_sh;
      const T* d = dout + doc.b * p.do_sb + row * p.do_ss + h * p.do_sh;
      float acc = 0.f;
      for (int c = 2 * lane; c < D; c += 64) {
        const float2 a = to_float2(o + c);
        const float2 b = to_float2(d + c);
        acc += a.x * b.x + a.y * b.y;
      }
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, m);
      if (lane == 0) delta[(doc.b * p.H + h) * p.Sq + row] = acc;
    }
  }
}

template <typename T>
const char* launch_delta(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid = attn::doc_grid((p.max_len + kDeltaRows - 1) / kDeltaRows, p.H, p.num_docs);
  attention_bwd_delta_kernel<T><<<grid, kDeltaWarps * 32, 0, stream>>>(p);
  return attn::launch_status();
}

// ---------------------------------------------------------------------------- checks

bool aligned16(uintptr_t ptr) { return ptr % 16 == 0; }

// A 16-bit tensor the kernels move in 16-byte vectors: every row start aligned.
bool vec_ok(uintptr_t ptr, int64_t sb, int64_t ss, int64_t sh) {
  return ptr != 0 && aligned16(ptr) && sb % 8 == 0 && ss % 8 == 0 && sh % 8 == 0;
}

bool head_dim_compiled(int64_t d) {
  for (int hd : kHeadDims)
    if (hd == d) return true;
  return false;
}

// nullptr when the forward inputs are usable, else why not.
const char* check_forward(const AttentionParams& p) {
  if (p.B < 0 || p.Sq < 0 || p.Sk < 0 || p.H <= 0 || p.Hk <= 0 || p.num_docs < 0 || p.max_len < 0)
    return "attention_cuda: negative size or no heads";
  if (p.H % p.Hk != 0) return "attention_cuda: H must be a multiple of Hk";
  if (p.H > 65535) return "attention_cuda: at most 65535 heads";
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) return "attention_cuda: dtype must be float16 or bfloat16";
  if (!head_dim_compiled(p.D)) return "attention_cuda: head dim without compiled kernels (see attention_cuda_head_dims)";
  if (p.max_len > (p.Sq < p.Sk ? p.Sq : p.Sk)) return "attention_cuda: max_len longer than the sequences";
  if (p.max_len >= (int64_t{1} << 31) - 256) return "attention_cuda: documents must be shorter than 2^31 tokens";
  if (p.num_docs > 0 && p.docs == 0) return "attention_cuda: null docs pointer";
  if (!vec_ok(p.q, p.q_sb, p.q_ss, p.q_sh) || !vec_ok(p.k, p.k_sb, p.k_ss, p.k_sh) ||
      !vec_ok(p.v, p.v_sb, p.v_ss, p.v_sh) || !vec_ok(p.out, p.o_sb, p.o_ss, p.o_sh))
    return "attention_cuda: q, k, v and out need 16-byte aligned data and strides that are multiples of 8";
  if (p.lse == 0 || p.lse % 4 != 0) return "attention_cuda: null or misaligned lse";
  if (p.dropout_threshold24 > (1u << 24)) return "attention_cuda: dropout threshold above 2^24";
  return nullptr;
}

const char* check_backward(const AttentionParams& p) {
  if (const char* err = check_forward(p)) return err;
  if (!vec_ok(p.dout, p.do_sb, p.do_ss, p.do_sh) || !vec_ok(p.dq, p.dq_sb, p.dq_ss, p.dq_sh) ||
      !vec_ok(p.dk, p.dk_sb, p.dk_ss, p.dk_sh) || !vec_ok(p.dv, p.dv_sb, p.dv_ss, p.dv_sh))
    return "attention_cuda: dout, dq, dk and dv need 16-byte aligned data and strides that are multiples of 8";
  if (p.delta == 0 || p.delta % 4 != 0) return "attention_cuda: null or misaligned delta scratch";
  return nullptr;
}

template <typename T>
const char* dispatch_fwd(const AttentionParams& p, cudaStream_t s) {
  switch (p.D) {
    case 32: return attn::run_attention_fwd<T, 32>(p, s);
    case 64: return attn::run_attention_fwd<T, 64>(p, s);
    case 96: return attn::run_attention_fwd<T, 96>(p, s);
    default: return attn::run_attention_fwd<T, 128>(p, s);
  }
}

template <typename T>
const char* dispatch_bwd(const AttentionParams& p, cudaStream_t s) {
  if (const char* err = launch_delta<T>(p, s)) return err;
  switch (p.D) {
    case 32: return attn::run_attention_bwd<T, 32>(p, s);
    case 64: return attn::run_attention_bwd<T, 64>(p, s);
    case 96: return attn::run_attention_bwd<T, 96>(p, s);
    default: return attn::run_attention_bwd<T, 128>(p, s);
  }
}

const char* or_empty(const char* err) { return err ? err : ""; }

}  // namespace

const char* attention_fwd_cuda(const AttentionParams& p, uintptr_t stream) {
  if (const char* err = check_forward(p)) return err;
  if (p.num_docs == 0 || p.max_len == 0 || p.B == 0) return "";
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return or_empty(p.dtype == kFloat16 ? dispatch_fwd<__half>(p, s) : dispatch_fwd<__nv_bfloat16>(p, s));
}

const char* attention_bwd_cuda(const AttentionParams& p, uintptr_t stream) {
  if (const char* err = check_backward(p)) return err;
  if (p.num_docs == 0 || p.max_len == 0 || p.B == 0) return "";
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return or_empty(p.dtype == kFloat16 ? dispatch_bwd<__half>(p, s) : dispatch_bwd<__nv_bfloat16>(p, s));
}

int attention_cuda_head_dims(int* dims, int cap) {
  const int n = static_cast<int>(sizeof(kHeadDims) / sizeof(kHeadDims[0]));
  for (int i = 0; i < n && i < cap; ++i) dims[i] = kHeadDims[i];
  return n;
}

}  // namespace fastpt
