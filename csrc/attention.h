// Parameter block of the fused attention kernels (kernels/attention*.cu), the
// contract between python/fastpt/ops/attention_cuda.py and the CUDA side. Plain
// data, pointers as integers: nothing here depends on torch or pybind11.
//
// Layout (see /work/shared attention spec, "Normalised form every kernel receives"):
//   q, out, dout, dq: (B, Sq, H, D)   k, v, dk, dv: (B, Sk, Hk, D)   any strides in
//   elements with unit stride on D; every row start 16-byte aligned (the kernels
//   move 16-byte vectors), i.e. 16-byte aligned base pointers and strides that are
//   multiples of 8 elements.
//   lse, delta: (B, H, Sq) float32, contiguous.
//   docs: (num_docs, 4) int32, contiguous: [batch b, start s0, length L, prefix P].
// Query i of a document (0 <= i < L, local) attends key j iff 0 <= j < L and
// j <= max(i, P - 1): P = L is bidirectional, P = 0 causal, 0 < P < L prefix-LM.
// Tokens outside every document are never read as keys and never written: the
// caller zero-initialises out, dq, dk and dv so that padding comes out as 0.
#pragma once
#include <cstdint>

namespace fastpt {

// AttentionParams::flags
enum AttentionFlags : int {
  // Some document is not fully bidirectional (P < L): query blocks late in a
  // document then carry more work, so the forward and dq grids start with them.
  kAttnCausalAny = 1,
};

struct AttentionParams {
  // Forward inputs and outputs.
  uintptr_t q = 0, k = 0, v = 0;  // fp16/bf16 (dtype)
  uintptr_t out = 0;              // like q; zero-initialised by the caller
  uintptr_t lse = 0;              // (B, H, Sq) float32, natural-log log-sum-exp of scale * q.k
  // Backward inputs, outputs and scratch.
  uintptr_t dout = 0;             // like q
  uintptr_t dq = 0;               // like q; zero-initialised by the caller
  uintptr_t dk = 0, dv = 0;       // like k; zero-initialised by the caller
  uintptr_t delta = 0;            // scratch (B, H, Sq) float32: rowsum(dout * out)
  uintptr_t docs = 0;             // (num_docs, 4) int32 on the device

  // Strides in elements: batch, sequence, head (the head dim is contiguous).
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  int64_t o_sb = 0, o_ss = 0, o_sh = 0;     // out
  int64_t do_sb = 0, do_ss = 0, do_sh = 0;  // dout
  int64_t dq_sb = 0, dq_ss = 0, dq_sh = 0;
  int64_t dk_sb = 0, dk_ss = 0, dk_sh = 0;
  int64_t dv_sb = 0, dv_ss = 0, dv_sh = 0;

  int64_t B = 0;         // batch count of q and k
  int64_t Sq = 0;        // sequence length of q, out, lse (documents must end by min(Sq, Sk))
  int64_t Sk = 0;        // sequence length of k, v
  int64_t H = 0;         // query heads
  int64_t Hk = 0;        // key/value heads, H % Hk == 0 (query head h reads kv head h / (H / Hk))
  int64_t D = 0;         // head dim, one of attention_cuda_head_dims()
  int64_t num_docs = 0;  // rows of docs
  int64_t max_len = 0;   // max over documents of L (sizes the grid)

  float scale = 0.f;       // softmax scale (1 / sqrt(D) by default, chosen by the caller)
  // Dropout on the attention probabilities (spec: rng.h mix32):
  //   rk = mix32(dropout_key ^ (n * H + h)); r = mix32(mix32(rk ^ colmix(i)) ^ colmix(j));
  //   dropped iff (r >> 8) < dropout_threshold24; kept ones are scaled by keep_scale.
  uint32_t dropout_threshold24 = 0;  // 0 = no dropout
  uint32_t dropout_key = 0;
  float keep_scale = 1.f;            // 1 / (1 - p)

  int dtype = 0;  // kFloat16 (5) or kBFloat16 (6), csrc/dtypes.h
  int flags = 0;  // AttentionFlags
};

#if defined(FASTPT_WITH_CUDA)
// Launchers in kernels/attention.cu; stream is a cudaStream_t as an integer.
// They return an empty string on success or the text of the error.
// Forward: writes out and lse.
const char* attention_fwd_cuda(const AttentionParams& p, uintptr_t stream);
// Backward: reads q, k, v, out, lse, dout; writes delta (scratch), dq, dk, dv.
// Deterministic: no atomics; the dk/dv of a kv head sum its query heads in order.
const char* attention_bwd_cuda(const AttentionParams& p, uintptr_t stream);
// Head dims with compiled kernels, ascending; writes at most cap of them to dims
// and returns how many there are. Other head dims up to the largest are padded
// with zeros by the caller (python/fastpt/ops/attention_cuda.py).
int attention_cuda_head_dims(int* dims, int cap);
#endif

}  // namespace fastpt
