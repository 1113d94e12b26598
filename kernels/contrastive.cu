// CUDA kernels of the tiled contrastive log-sum-exp: the op of csrc/contrastive.h
// (math and contract there; the losses built on it are in
// python/fastpt/ops/contrastive.py). Same inputs, outputs and masking rules as
// csrc/contrastive_cpu.cpp; results differ from it only in summation order.
//
// Tiles are kBN = 64 queries x kBM = 64 keys; a block of 256 threads computes one
// S tile at a time into shared memory, streaming the feature dim in chunks of
// kBK = 32, and never holds more than that tile of the (N, M) matrix.
//   * fp16 / bf16: the tile products run on the tensor cores through nvcuda::wmma
//     (16x16x16 fragments, fp32 accumulation), 8 warps of 16 x 32 outputs each.
//   * fp32: register-blocked FMA, 4 x 4 outputs per thread from shared-memory
//     chunks stored feature-major. No TF32: it would break the fp32 accuracy that
//     the CPU kernel and the tests hold this backend to.
//
// Forward, one pass for both directions (fwd_kernel, grid P_r x P_c): block (r, c)
// walks row blocks r, r + P_r, ... and, for each, the column blocks of split c
// (keys, then queue), keeping the online (max, sum) of each row in registers and,
// when symmetric, the running (max, sum) of each key column for "its" row blocks
// in a global partial owned by (r, column). Partials are merged in a fixed order
// by merge_lse_kernel. Statistics: O(P_c * N + P_r * M) floats.
//
// Backward, two kernels that recompute S (as FlashAttention's backward does):
// dq_kernel (grid row blocks x P_c) adds dS @ [k; queue] into rows it owns, and
// dk_kernel (grid key blocks x P_r) adds dS^T @ q into keys it owns. Every output
// element is written by exactly one block (read-modify-write of fp32 partials, a
// feature chunk at a time, so any D works), and the P partials are summed in order
// by sum_parts_kernel: no float atomics, bit-reproducible on a given GPU. Splits
// (P > 1) happen only when there are too few row / key blocks to fill the GPU, so
// the partial buffers stay O(SMs * 64 * D), whatever N and M are.
//
// For fp16 / bf16 the backward rounds dS to the input dtype before the second
// product, as FlashAttention does; the Python layer scales the incoming gradients
// to a maximum of 1 first so that fp16 dS does not underflow (as for Triton).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "contrastive.h"
#include "dtypes.h"

namespace fastpt {
namespace {

constexpr int kThreads = 256;
constexpr int kBN = 64;          // queries per tile
constexpr int kBM = 64;          // keys (or queue rows) per tile
constexpr int kBK = 32;          // features per shared-memory chunk
constexpr int kLdS = kBM + 4;    // fp32 S / dS tile: row stride (keeps wmma stores 32-byte aligned)
constexpr int kLdH = kBK + 8;    // half operand chunk: row stride in elements (80 bytes)
constexpr int kLdD = kBM + 8;    // half dS tile: row stride in elements (144 bytes)
constexpr int kLdOut = kBK + 4;  // fp32 product chunk (half paths)
constexpr int kRowLanes = 4;     // threads per row in the row pass (a quad of one warp)
constexpr int kColParts = kThreads / kBM;  // threads per column in the column pass
static_assert(kBN == kBM, "the operand chunk buffers serve queries and keys alike");
static_assert(kThreads == 4 * kBN && kThreads % kBM == 0, "row / column pass thread maps");
static_assert(kBK % 16 == 0 && kBN % 32 == 0, "wmma tiling: 8 warps of 16 x 32");

__device__ __forceinline__ float neg_inf() { return -INFINITY; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ T* dev_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// What every kernel needs to know, resolved on the host.
struct Problem {
  uintptr_t q, k, queue;   // device pointers of `T`
  const float* scale;      // device scalar
  int64_t n, m, kq, d;     // queries, keys, queue rows, features
  int64_t n_rb, n_kb, n_b; // row blocks, key blocks, key + queue blocks
  int64_t self_offset;
  const float* g_pos;  // (n,) positives' gradient, or null: dS[i, (i + pos_shift) % pos_wrap + pos_base] += g_pos[i]
  int64_t pos_shift, pos_wrap, pos_base;
  bool sym, excl;
  bool vec;  // every operand 16-byte aligned and d a multiple of one 16-byte vector
};

// Column block b of [keys; queue]: the key blocks first, then the queue blocks;
// no block straddles the two, so each tile reads one tensor (as in Triton).
struct ColBlock {
  uintptr_t src;
  int64_t rows;  // rows of src
  int64_t c0;    // first row of src in this block
  int ncol;      // valid columns
  bool key;
};

__device__ __forceinline__ ColBlock col_block(const Problem& P, int64_t b) {
  ColBlock cb;
  cb.key = b < P.n_kb;
  cb.src = cb.key ? P.k : P.queue;
  cb.rows = cb.key ? P.m : P.kq;
  cb.c0 = (cb.key ? b : b - P.n_kb) * kBM;
  cb.ncol = static_cast<int>(imin(kBM, cb.rows - cb.c0));
  return cb;
}

// --------------------------------------------------------------------------- shared memory

// fp32 chunks are stored feature-major (x[f][row]): the FMA micro-tiles read a
// row-vector of 4 strided rows per feature; the +1 keeps the transposing stores
// and the column reads of the backward on distinct banks.
struct OperandsF32 {
  float a[kBK][kBN + 1];
  float b[kBK][kBM + 1];
};
// fp16 / bf16 chunks are row-major (x[row][f]) as wmma loads them; 8 elements of
// padding put the 8 rows of an ldmatrix on distinct banks and keep every fragment
// pointer 32-byte aligned (80-byte rows, fragments at multiples of 16 rows / cols).
template <typename T>
struct OperandsHalf {
  alignas(32) T a[kBN][kLdH];
  alignas(32) T b[kBM][kLdH];
};
template <typename T>
using Operands = std::conditional_t<std::is_same<T, float>::value, OperandsF32, OperandsHalf<T>>;

template <typename T>
struct FwdSmem {
  Operands<T> ops;
  alignas(32) float s[kBN][kLdS];   // the scaled, masked S tile
  float part_m[kColParts][kBM];     // column pass: per-part (max, sum)
  float part_s[kColParts][kBM];
};

// Extra buffers of the tensor-core backward: dS rounded to T, and one product chunk.
template <typename T>
struct HalfBwdExtra {
  alignas(32) T dh[kBN][kLdD];
  alignas(32) float out[kBN][kLdOut];
};
struct NoExtra {};

template <typename T>
struct BwdSmem {
  Operands<T> ops;
  alignas(32) float s[kBN][kLdS];  // S, then dS (fp32)
  std::conditional_t<std::is_same<T, float>::value, NoExtra, HalfBwdExtra<T>> x;
  float lse_r[kBN], g_r[kBN];  // this tile's row statistics and incoming gradients
  float g_p[kBN];              // its rows' positives' gradients (0 without positives)
  int64_t t_p[kBN];            // and the key column of each row's positive (-1 without)
  float lse_c[kBM], g_c[kBM];  // its key columns' (zero weight off the keys)
};

// Dynamic shared memory, so that the 48 KB static limit never binds a tile change.
template <typename S>
__device__ __forceinline__ S& shared_block() {
  extern __shared__ __align__(128) unsigned char fastpt_contrastive_smem[];
  return *reinterpret_cast<S*>(fastpt_contrastive_smem);
}

// --------------------------------------------------------------------------- tile loads and products

// Rows [r0, r0 + 64) x features [d0, d0 + kBK) of src (rows x d, row-major) into
// shared memory. Rows >= rows and features >= d read as zero: they must add
// nothing to the dot products.
template <typename T, typename Dst>
__device__ __forceinline__ void load_chunk(const Problem& P, uintptr_t src_addr, int64_t rows, int64_t r0,
                                           int64_t d0, Dst& dst) {
  const T* __restrict__ src = dev_ptr<const T>(src_addr);
  const int64_t d = P.d;
  if constexpr (std::is_same<T, float>::value) {
    if (P.vec) {  // float4 per thread, 2 per chunk: a warp reads 4 rows x 128 bytes
      constexpr int kPerRow = kBK / 4;
      for (int e = threadIdx.x; e < kBN * kPerRow; e += kThreads) {
        const int r = e / kPerRow, c = (e % kPerRow) * 4;
        const int64_t row = r0 + r, col = d0 + c;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < rows && col < d) v = *reinterpret_cast<const float4*>(src + row * d + col);
        dst[c][r] = v.x;
        dst[c + 1][r] = v.y;
        dst[c + 2][r] = v.z;
        dst[c + 3][r] = v.w;
      }
    } else {
      for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
        const int r = e / kBK, c = e % kBK;
        const int64_t row = r0 + r, col = d0 + c;
        dst[c][r] = (row < rows && col < d) ? src[row * d + col] : 0.f;
      }
    }
  } else {
    if (P.vec) {  // 8 elements (16 bytes) per thread, one per chunk
      constexpr int kPerRow = kBK / 8;
      for (int e = threadIdx.x; e < kBN * kPerRow; e += kThreads) {
        const int r = e / kPerRow, c = (e % kPerRow) * 8;
        const int64_t row = r0 + r, col = d0 + c;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row < rows && col < d) v = *reinterpret_cast<const uint4*>(src + row * d + col);
        *reinterpret_cast<uint4*>(&dst[r][c]) = v;
      }
    } else {
      const T zero = from_float<T>(0.f);
      for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
        const int r = e / kBK, c = e % kBK;
        const int64_t row = r0 + r, col = d0 + c;
        dst[r][c] = (row < rows && col < d) ? src[row * d + col] : zero;
      }
    }
  }
}

// s = a[r0 : r0 + 64] @ b[c0 : c0 + 64]^T over all d features (unscaled fp32).
// Begins and ends with the operand buffers free; the caller syncs before reading s.
template <typename T>
__device__ __forceinline__ void score_tile(const Problem& P, Operands<T>& ops, float (*s)[kLdS], uintptr_t a_src,
                                           int64_t a_rows, int64_t r0, uintptr_t b_src, int64_t b_rows,
                                           int64_t c0) {
  if constexpr (std::is_same<T, float>::value) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < P.d; d0 += kBK) {
      load_chunk<T>(P, a_src, a_rows, r0, d0, ops.a);
      load_chunk<T>(P, b_src, b_rows, c0, d0, ops.b);
      __syncthreads();
#pragma unroll 8
      for (int f = 0; f < kBK; ++f) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = ops.a[f][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = ops.b[f][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[ty + 16 * i][tx + 16 * j] = acc[i][j];
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;  // rows 16 wr, columns 32 wc
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t d0 = 0; d0 < P.d; d0 += kBK) {
      load_chunk<T>(P, a_src, a_rows, r0, d0, ops.a);
      load_chunk<T>(P, b_src, b_rows, c0, d0, ops.b);
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &ops.a[16 * wr][16 * ks], kLdH);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // b[col][feature] read as a (feature x col) col-major matrix: K^T.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &ops.b[32 * wc + 16 * f][16 * ks], kLdH);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      wmma::store_matrix_sync(&s[16 * wr][32 * wc + 16 * f], acc[f], kLdS, wmma::mem_row_major);
    }
  }
}

// Is S[r0 + i, column j of cb] a real, non-excluded entry?
__device__ __forceinline__ bool entry_valid(const Problem& P, const ColBlock& cb, int64_t r0, int nrow, int i, int j) {
  return i < nrow && j < cb.ncol && !(P.excl && cb.key && cb.c0 + j == r0 + i + P.self_offset);
}

// --------------------------------------------------------------------------- forward

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    fwd_kernel(const Problem P, float* __restrict__ row_m, float* __restrict__ row_s, float* __restrict__ col_m,
               float* __restrict__ col_s) {
  FwdSmem<T>& sm = shared_block<FwdSmem<T>>();
  const int t = threadIdx.x;
  const int64_t pid_r = blockIdx.x, n_r = gridDim.x, split = blockIdx.y, n_split = gridDim.y;
  const int64_t b0 = split * P.n_b / n_split, b1 = (split + 1) * P.n_b / n_split;
  const float scale = *P.scale;
  const int ri = t / kRowLanes, rq = t % kRowLanes;  // row pass: row ri, columns rq + 4 c
  const int cj = t % kBM, cq = t / kBM;              // column pass: column cj, rows cq + 4 r
  for (int64_t rb = pid_r; rb < P.n_rb; rb += n_r) {
    const int64_t r0 = rb * kBN;
    const int nrow = static_cast<int>(imin(kBN, P.n - r0));
    float m_run = neg_inf(), s_run = 0.f;  // this row's online statistics (same in its 4 lanes)
    for (int64_t b = b0; b < b1; ++b) {
      const ColBlock cb = col_block(P, b);
      const bool col_pass = P.sym && cb.key;
      score_tile<T>(P, sm.ops, sm.s, P.q, P.n, r0, cb.src, cb.rows, cb.c0);
      __syncthreads();
      // Row pass: scale and mask this thread's 16 entries (written back for the
      // column pass), then one online log-sum-exp step over the quad. fmaxf
      // ignores NaN, so a NaN never becomes the max: it reaches the sum instead.
      float x[kBM / kRowLanes];
      float mx = neg_inf();
#pragma unroll
      for (int c = 0; c < kBM / kRowLanes; ++c) {
        const int j = rq + kRowLanes * c;
        const float v = entry_valid(P, cb, r0, nrow, ri, j) ? sm.s[ri][j] * scale : neg_inf();
        x[c] = v;
        mx = fmaxf(mx, v);
        if (col_pass) sm.s[ri][j] = v;
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run, mx);
      const float safe = m_new == neg_inf() ? 0.f : m_new;  // all masked so far: stay (-inf, 0)
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kBM / kRowLanes; ++c) sum += expf(x[c] - safe);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      s_run = s_run * expf(m_run - safe) + sum;
      m_run = m_new;
      if (col_pass) {
        __syncthreads();
        // Column pass: each of 4 parts takes 16 rows of column cj, then part 0
        // folds the parts into the running (max, sum) of (this block, column).
        float cm = neg_inf();
#pragma unroll
        for (int r = 0; r < kBN / kColParts; ++r) cm = fmaxf(cm, sm.s[cq + kColParts * r][cj]);
        const float csafe = cm == neg_inf() ? 0.f : cm;
        float cs = 0.f;
#pragma unroll
        for (int r = 0; r < kBN / kColParts; ++r) cs += expf(sm.s[cq + kColParts * r][cj] - csafe);
        sm.part_m[cq][cj] = cm;
        sm.part_s[cq][cj] = cs;
        __syncthreads();
        if (t < cb.ncol) {
          // Only this block touches (pid_r, column); its first row block starts it fresh.
          const int64_t off = pid_r * P.m + cb.c0 + t;
          float m_old = neg_inf(), s_old = 0.f;
          if (rb != pid_r) {
            m_old = col_m[off];
            s_old = col_s[off];
          }
          float mn = m_old;
#pragma unroll
          for (int q = 0; q < kColParts; ++q) mn = fmaxf(mn, sm.part_m[q][t]);
          const float sf = mn == neg_inf() ? 0.f : mn;
          float tot = s_old * expf(m_old - sf);
#pragma unroll
          for (int q = 0; q < kColParts; ++q) tot += sm.part_s[q][t] * expf(sm.part_m[q][t] - sf);
          col_m[off] = mn;
          col_s[off] = tot;
        }
      }
    }
    if (rq == 0 && ri < nrow) {
      row_m[split * P.n + r0 + ri] = m_run;
      row_s[split * P.n + r0 + ri] = s_run;
    }
  }
}

// out[i] = log-sum-exp of the partial (max, sum) pairs m[t * stride + i], s[...],
// t < parts, combined in order (as merge_lse in csrc/contrastive_cpu.cpp).
__global__ void merge_lse_kernel(const float* __restrict__ m, const float* __restrict__ s, int parts, int64_t stride,
                                 int64_t n, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float mx = neg_inf();
    for (int t = 0; t < parts; ++t) mx = fmaxf(mx, m[t * stride + i]);
    if (mx == neg_inf()) {
      out[i] = neg_inf();
      continue;
    }
    float tot = 0.f;
    for (int t = 0; t < parts; ++t) tot += s[t * stride + i] * expf(m[t * stride + i] - mx);
    out[i] = mx + logf(tot);
  }
}

// --------------------------------------------------------------------------- backward

// S tile -> dS = g_row exp(S - row_lse) (+ g_col exp(S - col_lse) on key columns),
// 0 outside the matrix and on excluded entries, plus g_pos at each row's positive
// (added in fp32: where the views agree it nearly cancels the softmax term, and
// rounding first would lose the difference); fp32 in place, and rounded to T for
// the tensor-core products.
template <typename T>
__device__ __forceinline__ void ds_tile(const Problem& P, BwdSmem<T>& sm, const ColBlock& cb, int64_t r0, int nrow,
                                        float scale) {
  const bool col_term = P.sym && cb.key;
  for (int e = threadIdx.x; e < kBN * kBM; e += kThreads) {
    const int i = e / kBM, j = e % kBM;
    float ds = 0.f;
    if (entry_valid(P, cb, r0, nrow, i, j)) {
      const float x = sm.s[i][j] * scale;
      ds = expf(x - sm.lse_r[i]) * sm.g_r[i];
      if (col_term) ds += expf(x - sm.lse_c[j]) * sm.g_c[j];
    }
    if (cb.key && i < nrow && j < cb.ncol && cb.c0 + j == sm.t_p[i]) ds += sm.g_p[i];
    if constexpr (std::is_same<T, float>::value) {
      sm.s[i][j] = ds;
    } else {
      sm.x.dh[i][j] = from_float<T>(ds);
    }
  }
}

// Row t of the tile starting at r0: its statistics, incoming gradient and positive.
template <typename T>
__device__ __forceinline__ void load_rows(const Problem& P, BwdSmem<T>& sm, const float* __restrict__ row_lse,
                                          const float* __restrict__ g_row, int64_t r0, int nrow, int t) {
  const bool on = t < nrow;
  sm.lse_r[t] = on ? row_lse[r0 + t] : 0.f;
  sm.g_r[t] = on ? g_row[r0 + t] : 0.f;
  const bool pos = on && P.g_pos != nullptr;
  sm.g_p[t] = pos ? P.g_pos[r0 + t] : 0.f;
  sm.t_p[t] = pos ? (r0 + t + P.pos_shift) % P.pos_wrap + P.pos_base : -1;
}

// out[(o0 + o) * d + f] += sum_p dS'[o][p] * src[p0 + p][f] over the 64 p of the
// tile, o < n_o, for every feature chunk; dS' = dS (TRANS false: o = query rows,
// p = key columns, src = keys) or dS^T (TRANS true: o = key columns, p = query
// rows, src = queries). The caller owns those rows of out. Each chunk loads its
// operand, then waits at a barrier before reading dS: that barrier also publishes
// the caller's dS tile.
template <typename T, bool TRANS>
__device__ __forceinline__ void add_product(const Problem& P, BwdSmem<T>& sm, uintptr_t src, int64_t src_rows,
                                            int64_t p0, float* __restrict__ out, int64_t o0, int n_o) {
  const int64_t d = P.d;
  if constexpr (std::is_same<T, float>::value) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // outputs (ty + 16 i, tx + 16 j)
    for (int64_t d0 = 0; d0 < d; d0 += kBK) {
      if (TRANS) {
        load_chunk<T>(P, src, src_rows, p0, d0, sm.ops.a);
      } else {
        load_chunk<T>(P, src, src_rows, p0, d0, sm.ops.b);
      }
      __syncthreads();
      float acc[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = 0.f;
#pragma unroll 8
      for (int p = 0; p < kBM; ++p) {
        float av[4], bv[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = TRANS ? sm.s[p][ty + 16 * i] : sm.s[ty + 16 * i][p];
#pragma unroll
        for (int j = 0; j < 2; ++j) bv[j] = TRANS ? sm.ops.a[tx + 16 * j][p] : sm.ops.b[tx + 16 * j][p];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int o = ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t f = d0 + tx + 16 * j;
          if (o < n_o && f < d) out[(o0 + o) * d + f] += acc[i][j];
        }
      }
      __syncthreads();  // before the next chunk overwrites the operand buffer
    }
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;  // outputs 16 wr.., features 16 wc..
    for (int64_t d0 = 0; d0 < d; d0 += kBK) {
      if (TRANS) {
        load_chunk<T>(P, src, src_rows, p0, d0, sm.ops.a);
      } else {
        load_chunk<T>(P, src, src_rows, p0, d0, sm.ops.b);
      }
      __syncthreads();
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int ps = 0; ps < kBM / 16; ++ps) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        if constexpr (TRANS) {
          // dS^T: dh[row][key] read as a (key x row) col-major matrix.
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
          wmma::load_matrix_sync(fa, &sm.x.dh[16 * ps][16 * wr], kLdD);
          wmma::load_matrix_sync(fb, &sm.ops.a[16 * ps][16 * wc], kLdH);
          wmma::mma_sync(acc, fa, fb, acc);
        } else {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, &sm.x.dh[16 * wr][16 * ps], kLdD);
          wmma::load_matrix_sync(fb, &sm.ops.b[16 * ps][16 * wc], kLdH);
          wmma::mma_sync(acc, fa, fb, acc);
        }
      }
      wmma::store_matrix_sync(&sm.x.out[16 * wr][16 * wc], acc, kLdOut, wmma::mem_row_major);
      __syncthreads();
      // Coalesced read-modify-write: a warp adds one output row's 32 features.
      // The next chunk's first barrier keeps its store to `out` behind these reads.
      for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
        const int o = e / kBK, c = e % kBK;
        const int64_t f = d0 + c;
        if (o < n_o && f < d) out[(o0 + o) * d + f] += sm.x.out[o][c];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dq_kernel(const Problem P, const float* __restrict__ row_lse, const float* __restrict__ g_row,
              const float* __restrict__ col_lse, const float* __restrict__ g_col, float* __restrict__ dq) {
  BwdSmem<T>& sm = shared_block<BwdSmem<T>>();
  const int t = threadIdx.x;
  const int64_t rb = blockIdx.x, split = blockIdx.y, n_split = gridDim.y;
  const int64_t b0 = split * P.n_b / n_split, b1 = (split + 1) * P.n_b / n_split;
  const int64_t r0 = rb * kBN;
  const int nrow = static_cast<int>(imin(kBN, P.n - r0));
  float* out = dq + split * P.n * P.d;  // this split's partial (the output itself when P_c = 1)
  const float scale = *P.scale;
  if (t < kBN) load_rows(P, sm, row_lse, g_row, r0, nrow, t);
  for (int64_t b = b0; b < b1; ++b) {
    const ColBlock cb = col_block(P, b);
    // Read by ds_tile after score_tile's barriers; the previous tile's readers
    // are past the barriers of its products.
    if (t < kBM) {
      const bool on = P.sym && cb.key && t < cb.ncol;
      sm.lse_c[t] = on ? col_lse[cb.c0 + t] : 0.f;
      sm.g_c[t] = on ? g_col[cb.c0 + t] : 0.f;
    }
    score_tile<T>(P, sm.ops, sm.s, P.q, P.n, r0, cb.src, cb.rows, cb.c0);
    __syncthreads();
    ds_tile<T>(P, sm, cb, r0, nrow, scale);  // add_product's first barrier publishes dS
    add_product<T, false>(P, sm, cb.src, cb.rows, cb.c0, out, r0, nrow);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dk_kernel(const Problem P, const float* __restrict__ row_lse, const float* __restrict__ g_row,
              const float* __restrict__ col_lse, const float* __restrict__ g_col, float* __restrict__ dk) {
  BwdSmem<T>& sm = shared_block<BwdSmem<T>>();
  const int t = threadIdx.x;
  const int64_t kb = blockIdx.x, split = blockIdx.y, n_split = gridDim.y;
  const int64_t rb0 = split * P.n_rb / n_split, rb1 = (split + 1) * P.n_rb / n_split;
  ColBlock cb;
  cb.key = true;
  cb.src = P.k;
  cb.rows = P.m;
  cb.c0 = kb * kBM;
  cb.ncol = static_cast<int>(imin(kBM, P.m - cb.c0));
  float* out = dk + split * P.m * P.d;
  const float scale = *P.scale;
  if (t < kBM) {
    const bool on = P.sym && t < cb.ncol;
    sm.lse_c[t] = on ? col_lse[cb.c0 + t] : 0.f;
    sm.g_c[t] = on ? g_col[cb.c0 + t] : 0.f;
  }
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t r0 = rb * kBN;
    const int nrow = static_cast<int>(imin(kBN, P.n - r0));
    if (t < kBN) load_rows(P, sm, row_lse, g_row, r0, nrow, t);
    score_tile<T>(P, sm.ops, sm.s, P.q, P.n, r0, cb.src, cb.rows, cb.c0);
    __syncthreads();
    ds_tile<T>(P, sm, cb, r0, nrow, scale);
    add_product<T, true>(P, sm, P.q, P.n, r0, out, cb.c0, cb.ncol);
  }
}

// out[x] = sum over p < parts of part[p * size + x], in order of p.
__global__ void sum_parts_kernel(const float* __restrict__ part, int parts, int64_t size, float* __restrict__ out) {
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < size; x += int64_t(gridDim.x) * blockDim.x) {
    float acc = part[x];
    for (int p = 1; p < parts; ++p) acc += part[p * size + x];
    out[x] = acc;
  }
}

// ============================================================================ host launchers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

const char* status(cudaError_t err) { return err == cudaSuccess ? "" : cudaGetErrorString(err); }

// Splits of a loop dimension of `blocks` so that other_blocks * splits ~ target.
int64_t splits(int64_t blocks, int64_t other_blocks, int64_t target) {
  if (other_blocks >= target) return 1;
  return std::max<int64_t>(1, std::min<int64_t>({blocks, ceil_div(target, std::max<int64_t>(other_blocks, 1)), 65535}));
}

struct Plan {
  Problem P;
  int64_t p_r = 1, p_c = 1;  // forward: row programs x column splits; backward: dk and dq splits
  int64_t ws_bytes = 0;
  // byte offsets in the workspace
  int64_t off_a = 0, off_b = 0, off_c = 0, off_d = 0;
};

template <typename F>
const char* with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    default: return "contrastive: dtype code must be float32, float16 or bfloat16";
  }
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

// Blocks of this kernel resident per SM times the SMs: the grid that fills the GPU once.
template <typename K>
const char* fill_target(K kernel, int smem, int64_t* target) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  *target = int64_t(std::max(1, sms)) * std::max(1, per_sm);
  return status(err);
}

const char* make_plan(const ContrastiveParams& p, bool backward, Plan* plan) {
  if (p.n < 1 || p.m < 1 || p.d < 1 || p.n_queue < 0 || p.n > INT32_MAX || p.m + p.n_queue > INT32_MAX)
    return "contrastive: need 1 <= n, m and d, 0 <= n_queue, and n, m + n_queue < 2^31";
  if (backward && p.grad_pos &&
      (p.pos_wrap < 1 || p.pos_shift < 0 || p.pos_base < 0 || p.pos_base + p.pos_wrap > p.m))
    return "contrastive: positives need pos_wrap >= 1, pos_shift >= 0 and keys [pos_base, pos_base + pos_wrap) within m";
  Problem& P = plan->P;
  P.q = p.q, P.k = p.k, P.queue = p.queue;
  P.scale = reinterpret_cast<const float*>(p.scale_ptr);
  P.n = p.n, P.m = p.m, P.kq = p.n_queue, P.d = p.d;
  P.n_rb = ceil_div(p.n, kBN), P.n_kb = ceil_div(p.m, kBM), P.n_b = P.n_kb + ceil_div(p.n_queue, kBM);
  P.self_offset = p.exclude_self ? p.self_offset : 0;
  P.sym = p.symmetric, P.excl = p.exclude_self;
  P.g_pos = backward && p.grad_pos ? reinterpret_cast<const float*>(p.grad_pos) : nullptr;
  P.pos_shift = p.pos_shift, P.pos_wrap = p.pos_wrap, P.pos_base = p.pos_base;
  const int64_t vec_elems = p.dtype == kFloat32 ? 4 : 8;
  P.vec = p.d % vec_elems == 0 && aligned16(p.q) && aligned16(p.k) && (p.n_queue == 0 || aligned16(p.queue));
  int64_t target = 1;
  const char* err = with_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    return backward ? fill_target(dq_kernel<T>, sizeof(BwdSmem<T>), &target)
                    : fill_target(fwd_kernel<T>, sizeof(FwdSmem<T>), &target);
  });
  if (err[0]) return err;
  const int64_t f = sizeof(float);
  if (!backward) {
    if (P.sym) {  // balance the two kinds of partials: P_r * P_c ~ target
      plan->p_r = std::max<int64_t>(1, std::min<int64_t>(P.n_rb, static_cast<int64_t>(std::sqrt(double(target)))));
      plan->p_c = std::max<int64_t>(1, std::min<int64_t>({P.n_b, target / plan->p_r, 65535}));
    } else {
      plan->p_r = P.n_rb;
      plan->p_c = splits(P.n_b, P.n_rb, target);
    }
    // row (max, sum) partials, then column ones
    plan->off_a = 0;
    plan->off_b = align_up(plan->off_a + plan->p_c * P.n * f, 256);
    plan->off_c = align_up(plan->off_b + plan->p_c * P.n * f, 256);
    const int64_t cols = P.sym ? plan->p_r * P.m : 0;
    plan->off_d = align_up(plan->off_c + cols * f, 256);
    plan->ws_bytes = align_up(plan->off_d + cols * f, 256);
  } else {
    plan->p_c = splits(P.n_b, P.n_rb, target);   // dq: column splits per row block
    plan->p_r = splits(P.n_rb, P.n_kb, target);  // dk: row splits per key block
    // dq partials (only when split), then dk partials
    plan->off_a = 0;
    plan->off_b = align_up(plan->p_c > 1 ? plan->p_c * P.n * P.d * f : 0, 256);
    plan->ws_bytes = align_up(plan->off_b + (plan->p_r > 1 ? plan->p_r * P.m * P.d * f : 0), 256);
  }
  return "";
}

// Elementwise kernels: 256 threads per block, at most 65535 blocks (they loop over the rest).
dim3 grid_1d(int64_t n) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), 65535))));
}

template <typename T>
const char* launch_forward(const ContrastiveParams& p, const Plan& plan, cudaStream_t stream) {
  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  float* row_m = reinterpret_cast<float*>(ws + plan.off_a);
  float* row_s = reinterpret_cast<float*>(ws + plan.off_b);
  float* col_m = reinterpret_cast<float*>(ws + plan.off_c);
  float* col_s = reinterpret_cast<float*>(ws + plan.off_d);
  const dim3 grid(static_cast<unsigned>(plan.p_r), static_cast<unsigned>(plan.p_c));
  fwd_kernel<T><<<grid, kThreads, sizeof(FwdSmem<T>), stream>>>(plan.P, row_m, row_s, col_m, col_s);
  merge_lse_kernel<<<grid_1d(p.n), 256, 0, stream>>>(row_m, row_s, static_cast<int>(plan.p_c), p.n, p.n,
                                                     reinterpret_cast<float*>(p.row_lse));
  if (p.symmetric) {
    merge_lse_kernel<<<grid_1d(p.m), 256, 0, stream>>>(col_m, col_s, static_cast<int>(plan.p_r), p.m, p.m,
                                                       reinterpret_cast<float*>(p.col_lse));
  }
  return status(cudaGetLastError());
}

template <typename T>
const char* launch_backward(const ContrastiveParams& p, const Plan& plan, cudaStream_t stream) {
  const Problem& P = plan.P;
  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  const float* row_lse = reinterpret_cast<const float*>(p.row_lse);
  const float* g_row = reinterpret_cast<const float*>(p.grad_row);
  const float* col_lse = reinterpret_cast<const float*>(p.col_lse);
  const float* g_col = reinterpret_cast<const float*>(p.grad_col);
  float* gq = reinterpret_cast<float*>(p.grad_q);
  float* gk = reinterpret_cast<float*>(p.grad_k);
  // Without a split the kernels add straight into the (zeroed) outputs.
  float* dq = plan.p_c > 1 ? reinterpret_cast<float*>(ws + plan.off_a) : gq;
  float* dk = plan.p_r > 1 ? reinterpret_cast<float*>(ws + plan.off_b) : gk;
  const int64_t f = sizeof(float);
  cudaError_t err = cudaMemsetAsync(dq, 0, plan.p_c * P.n * P.d * f, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(dk, 0, plan.p_r * P.m * P.d * f, stream);
  if (err != cudaSuccess) return status(err);
  dq_kernel<T><<<dim3(static_cast<unsigned>(P.n_rb), static_cast<unsigned>(plan.p_c)), kThreads, sizeof(BwdSmem<T>),
                 stream>>>(P, row_lse, g_row, col_lse, g_col, dq);
  dk_kernel<T><<<dim3(static_cast<unsigned>(P.n_kb), static_cast<unsigned>(plan.p_r)), kThreads, sizeof(BwdSmem<T>),
                 stream>>>(P, row_lse, g_row, col_lse, g_col, dk);
  if (plan.p_c > 1) {
    sum_parts_kernel<<<grid_1d(P.n * P.d), 256, 0, stream>>>(dq, static_cast<int>(plan.p_c), P.n * P.d, gq);
  }
  if (plan.p_r > 1) {
    sum_parts_kernel<<<grid_1d(P.m * P.d), 256, 0, stream>>>(dk, static_cast<int>(plan.p_r), P.m * P.d, gk);
  }
  return status(cudaGetLastError());
}

// The shared memory of every kernel stays under the 48 KB that needs no opt-in.
static_assert(sizeof(FwdSmem<float>) <= 48 * 1024 && sizeof(FwdSmem<__half>) <= 48 * 1024, "forward smem");
static_assert(sizeof(BwdSmem<float>) <= 48 * 1024 && sizeof(BwdSmem<__half>) <= 48 * 1024 &&
                  sizeof(BwdSmem<__nv_bfloat16>) <= 48 * 1024,
              "backward smem");

}  // namespace

const char* contrastive_cuda_workspace(const ContrastiveParams& p, bool backward, int64_t* bytes) {
  Plan plan;
  const char* err = make_plan(p, backward, &plan);
  *bytes = plan.ws_bytes;
  return err;
}

const char* contrastive_forward_cuda(const ContrastiveParams& p, uintptr_t stream) {
  Plan plan;
  const char* err = make_plan(p, false, &plan);
  if (err[0]) return err;
  if (p.workspace_bytes < plan.ws_bytes || (plan.ws_bytes > 0 && !p.workspace))
    return "contrastive: workspace smaller than contrastive_cuda_workspace() asked for";
  return with_dtype(p.dtype, [&](auto tag) {
    return launch_forward<decltype(tag)>(p, plan, reinterpret_cast<cudaStream_t>(stream));
  });
}

const char* contrastive_backward_cuda(const ContrastiveParams& p, uintptr_t stream) {
  Plan plan;
  const char* err = make_plan(p, true, &plan);
  if (err[0]) return err;
  if (p.workspace_bytes < plan.ws_bytes || (plan.ws_bytes > 0 && !p.workspace))
    return "contrastive: workspace smaller than contrastive_cuda_workspace() asked for";
  return with_dtype(p.dtype, [&](auto tag) {
    return launch_backward<decltype(tag)>(p, plan, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastpt
