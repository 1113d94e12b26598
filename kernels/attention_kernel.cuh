// FlashAttention-2 forward and backward on tensor cores (mma.sync m16n8k16,
// fp16/bf16 in, fp32 accumulate) for the document-structured masks of
// csrc/attention.h. Templates only; kernels/attention_{fwd,bwd}_hdim*.cu
// instantiate one head dim each so that they compile in parallel.
//
// Why mma.sync and not WMMA: the online softmax must know which row and column
// each accumulator element is. mma.sync's fragment layout is specified by the
// PTX ISA (see attention_ptx.cuh); WMMA's is opaque, and working around that
// means a round trip of every score tile through shared memory. The same
// layout lets the probabilities go from the S accumulators straight into the
// A operand of the P.V product without touching shared memory.
//
// Shared-memory tiles are row-major with a pitch of D + 8 elements: the 16-byte
// pad puts the 8 rows of every ldmatrix 8x8 load in 8 different bank groups, so
// no ldmatrix and no fragment store conflicts (a swizzle would save the pad but
// is easier to get wrong).
//
// Every kernel walks the documents of p.docs: grid.x indexes tiles inside a
// document, grid.y heads, grid.z documents (looping when there are more than
// 65535). Tiles past the end of a document return at once.
#pragma once
#include <cstdint>

#include "attention.h"
#include "attention_ptx.cuh"
#include "rng.h"

namespace fastpt {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------- tile shapes
//
// A warp owns 16 * kMT rows of the tile it iterates with (queries in the
// forward and the dq kernel, keys in the dk/dv kernel), so every softmax row
// lives in one quad of lanes and needs no shared-memory reduction. Register
// budget (fp32 accumulators per thread): forward D=128 keeps O (128) + S (32),
// the dk/dv kernel dK + dV (D) + S + dP (kBM / 2). K/V tiles are double
// buffered with cp.async: the next tile loads while the current one computes.
// Every shared-memory footprint stays under 99 KB, the opt-in limit of the
// smallest sm_8x parts (sm_86/89), so one configuration serves every GPU.

template <int D>
struct FwdCfg {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMT = 2;                   // 16-row mma tiles per warp
  static constexpr int kBM = kWarps * kMT * 16;   // query rows per block
  static constexpr int kBN = D <= 64 ? 64 : 32;   // keys per step
  static constexpr int kLd = D + 8;
  static constexpr int kQElems = kBM * kLd;
  static constexpr int kKVElems = kBN * kLd;
  static constexpr int kSmemBytes = (kQElems + 4 * kKVElems) * 2;  // Q + 2 stages of K and V
};

template <int D>
struct BwdKVCfg {
  static constexpr int kWarps = D <= 96 ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBN = kWarps * 16;          // keys per block (16 per warp)
  static constexpr int kBM = D <= 64 ? 64 : 32;    // queries per step
  static constexpr int kLd = D + 8;
  static constexpr int kKElems = kBN * kLd;
  static constexpr int kQElems = kBM * kLd;
  // K, V once; 2 stages of Q, dO, lse, delta.
  static constexpr int kSmemBytes = (2 * kKElems + 4 * kQElems) * 2 + 4 * kBM * 4;
};

template <int D>
struct BwdQCfg {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = kWarps * 16;          // query rows per block (16 per warp)
  static constexpr int kBN = D <= 64 ? 64 : 32;    // keys per step
  static constexpr int kLd = D + 8;
  static constexpr int kQElems = kBM * kLd;
  static constexpr int kKVElems = kBN * kLd;
  static constexpr int kSmemBytes = (2 * kQElems + 4 * kKVElems) * 2;  // Q, dO + 2 stages of K and V
};

// ---------------------------------------------------------------------------- helpers

struct Doc {
  int b, s0, L, P;
};

// A descriptor that would index out of bounds reads as an empty document. The
// Python layer validates docs; this guard only keeps every access in bounds.
__device__ __forceinline__ Doc load_doc(const AttentionParams& p, int64_t n) {
  const int* d = reinterpret_cast<const int*>(p.docs) + 4 * n;
  Doc doc{d[0], d[1], d[2], d[3]};
  const int64_t seq = p.Sq < p.Sk ? p.Sq : p.Sk;
  if (doc.b < 0 || doc.b >= p.B || doc.s0 < 0 || doc.L <= 0 || int64_t{doc.s0} + doc.L > seq) doc.L = 0;
  doc.P = min(max(doc.P, 0), max(doc.L, 0));
  return doc;
}

// cp.async of rows [0, kRows) of a (rows, D) tile whose row r starts at
// src + r * row_stride into dst (pitch D + 8); rows >= rows_valid become zeros.
template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t row_stride, int rows_valid, int tid) {
  constexpr int kVecPerRow = D / 8;
  constexpr int kVecs = kRows * kVecPerRow;
  constexpr int kIters = (kVecs + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = it * kThreads + tid;
    if (kVecs % kThreads == 0 || c < kVecs) {
      const int r = c / kVecPerRow;
      const int col = (c % kVecPerRow) * 8;
      const bool valid = r < rows_valid;
      // An invalid row copies 0 bytes, but the address must still be a legal one.
      cp_async_16(dst + r * (D + 8) + col, valid ? src + r * row_stride + col : src, valid);
    }
  }
}

// Stores rows [0, kRows) of a warp's staged tile (pitch D + 8) to dst with
// 16-byte vectors; rows >= rows_valid are skipped.
template <int kRows, int D, typename T>
__device__ __forceinline__ void store_rows_warp(T* dst, int64_t row_stride, const T* src, int rows_valid, int lane) {
  constexpr int kVecPerRow = D / 8;
  constexpr int kVecs = kRows * kVecPerRow;
  static_assert(kVecs % 32 == 0, "whole warps of 16-byte vectors");
#pragma unroll
  for (int it = 0; it < kVecs / 32; ++it) {
    const int c = it * 32 + lane;
    const int r = c / kVecPerRow;
    const int col = (c % kVecPerRow) * 8;
    if (r < rows_valid)
      *reinterpret_cast<uint4*>(dst + r * row_stride + col) = *reinterpret_cast<const uint4*>(src + r * (D + 8) + col);
  }
}

// Writes a 16 x D fp32 accumulator tile (C layout, acc[D/8][4]) as 16-bit values
// into rows [0, 16) of a staging tile with pitch D + 8.
template <typename T, int D>
__device__ __forceinline__ void stage_acc(T* dst, const float (&acc)[D / 8][4], int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    T* p0 = dst + g * (D + 8) + dt * 8 + 2 * t4;
    *reinterpret_cast<uint32_t*>(p0) = pack2<T>(acc[dt][0], acc[dt][1]);
    *reinterpret_cast<uint32_t*>(p0 + 8 * (D + 8)) = pack2<T>(acc[dt][2], acc[dt][3]);
  }
}

// The A operand (16 x 16, rows of this warp, k = 16 columns starting at 16 * kc)
// from a C-layout fp32 tile acc[.][4] whose n-tiles 2kc and 2kc+1 hold those
// columns: the C layout of two adjacent n-tiles is exactly the A layout.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(const float (&acc)[N][4], int kc, uint32_t (&a)[4]) {
  a[0] = pack2<T>(acc[2 * kc][0], acc[2 * kc][1]);
  a[1] = pack2<T>(acc[2 * kc][2], acc[2 * kc][3]);
  a[2] = pack2<T>(acc[2 * kc + 1][0], acc[2 * kc + 1][1]);
  a[3] = pack2<T>(acc[2 * kc + 1][2], acc[2 * kc + 1][3]);
}

// Fragment loads from a row-major shared tile with pitch D + 8 elements. Each
// thread computes its lane's row address once (tile address + lane_off_*);
// every load then adds a compile-time byte offset, which ldmatrix takes as an
// immediate, so the unrolled loops keep no per-load address registers.
//
// lane_off_a serves ldsm_a and ldsm_b: lanes 0-15 address rows 0-15 at column
// 0, lanes 16-31 rows 0-15 at column 8.
template <int D>
__device__ __forceinline__ uint32_t lane_off_a(int lane) {
  return static_cast<uint32_t>(((lane & 15) * (D + 8) + (lane >> 4) * 8) * 2);
}
// lane_off_bt serves ldsm_bt: lanes 0-7 rows 0-7 col 0, 8-15 rows 0-7 col 8,
// 16-23 rows 8-15 col 0, 24-31 rows 8-15 col 8.
template <int D>
__device__ __forceinline__ uint32_t lane_off_bt(int lane) {
  return static_cast<uint32_t>((((lane & 7) + (lane >> 4) * 8) * (D + 8) + ((lane >> 3) & 1) * 8) * 2);
}

// The A operand for k-step ks from rows [0, 16): matrices 0..3 = (rows 0-7,
// k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15), which is
// a[0..3] of the mma layout. base = tile + lane_off_a.
template <int D>
__device__ __forceinline__ void ldsm_a(uint32_t base, int ks, uint32_t (&a)[4]) {
  ldsm_x4(base + ks * 32, a);
}

// B = tile^T (B[k][n] = tile[n][k]) for n-tiles 2np, 2np + 1 at k-step ks:
// matrices 0..3 = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15,
// k 8-15), i.e. b[0], b[1] of n-tile 2np, then of n-tile 2np + 1. base = tile + lane_off_bt.
template <int D>
__device__ __forceinline__ void ldsm_bt(uint32_t base, int np, int ks, uint32_t (&b)[4]) {
  ldsm_x4(base + (np * 16 * (D + 8) + ks * 16) * 2, b);
}

// B = tile (B[k][n] = tile[k][n]) for k-step kc and n-tiles 2dp, 2dp + 1,
// by transposed loads of (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
// (k 8-15, n 8-15): again b[0], b[1] of n-tile 2dp, then of 2dp + 1. base = tile + lane_off_a.
template <int D>
__device__ __forceinline__ void ldsm_b(uint32_t base, int kc, int dp, uint32_t (&b)[4]) {
  ldsm_x4_trans(base + (kc * 16 * (D + 8) + dp * 16) * 2, b);
}

// acc[kN / 8][4] += A B with A = 16 rows x D (a_base: tile + lane_off_a) and
// B = the first kN rows of a tile, transposed (b_base: tile + lane_off_bt):
// the Q K^T shape, used for S = Q K^T, S^T = K Q^T, dP = dO V^T, dP^T = V dO^T.
template <typename T, int D, int kN>
__device__ __forceinline__ void gemm_abt(float (&acc)[kN / 8][4], uint32_t a_base, uint32_t b_base) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldsm_a<D>(a_base, ks, a);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      ldsm_bt<D>(b_base, np, ks, b);
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[D / 8][4] += A B with A = 16 x 16 in registers and B = rows [16 kc,
// 16 kc + 16) x D of a tile (b_base: tile + lane_off_a): the P V shape, used
// for O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <typename T, int D>
__device__ __forceinline__ void gemm_ab(float (&acc)[D / 8][4], const uint32_t (&a)[4], uint32_t b_base, int kc) {
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t b[4];
    ldsm_b<D>(b_base, kc, dp, b);
    mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
    mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
  }
}

// The per-(document, query head) dropout key of the spec.
__device__ __forceinline__ uint32_t dropout_head_key(const AttentionParams& p, int64_t n, int h) {
  return mix32(p.dropout_key ^ static_cast<uint32_t>(n * p.H + h));
}

// True when key j of a row whose row key is rq (= rand_bits(head_key, i)) is dropped.
__device__ __forceinline__ bool dropped(uint32_t rq, int j, uint32_t threshold24) {
  return (rand_bits(rq, static_cast<uint32_t>(j)) >> 8) < threshold24;
}

// ---------------------------------------------------------------------------- forward
//
// One block = kBM query rows of one (document, head). For each key tile the
// warp computes S = Q K^T for its rows, masks, updates the running max m and
// sum l (base 2, scale folded in), drops, and accumulates O += P V; at the end
// O / l goes out through shared memory as 16-byte stores, lse = (m + log2 l) ln 2.

template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::kThreads) attention_fwd_kernel(const AttentionParams p) {
  using C = FwdCfg<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kLd = C::kLd, kMT = C::kMT, kThreads = C::kThreads;
  constexpr int kNT = kBN / 8, kDT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + C::kQElems;       // 2 stages
  T* sV = sK + 2 * C::kKVElems;  // 2 stages

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int h = blockIdx.y;
  const int hk = static_cast<int>(h / (p.H / p.Hk));
  // Late query blocks of a causal document do the most work: start them first.
  const int mb = (p.flags & kAttnCausalAny) ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
  const T* q = reinterpret_cast<const T*>(p.q);
  const T* k = reinterpret_cast<const T*>(p.k);
  const T* v = reinterpret_cast<const T*>(p.v);
  T* out = reinterpret_cast<T*>(p.out);
  float* lse = reinterpret_cast<float*>(p.lse);
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_threshold24 != 0;
  const int wrow = warp * kMT * 16;  // first row of this warp in the block
  const uint32_t q_base = smem_addr(sQ + wrow * kLd) + lane_off_a<D>(lane);
  const uint32_t k_base = smem_addr(sK) + lane_off_bt<D>(lane);
  const uint32_t v_base = smem_addr(sV) + lane_off_a<D>(lane);
  constexpr uint32_t kKVBytes = C::kKVElems * 2;

  for (int64_t n = blockIdx.z; n < p.num_docs; n += gridDim.z) {
    const Doc doc = load_doc(p, n);
    const int i0 = mb * kBM;
    if (i0 >= doc.L) continue;  // uniform over the block
    const int rows_q = min(kBM, doc.L - i0);
    // Block skipping: the last row i0 + rows_q - 1 sees keys up to max(i, P - 1).
    const int n_end = min(doc.L, max(i0 + rows_q - 1, doc.P - 1) + 1);
    const int n_tiles = (n_end + kBN - 1) / kBN;

    const T* gq = q + doc.b * p.q_sb + int64_t{doc.s0 + i0} * p.q_ss + h * p.q_sh;
    const T* gk = k + doc.b * p.k_sb + int64_t{doc.s0} * p.k_ss + hk * p.k_sh;
    const T* gv = v + doc.b * p.v_sb + int64_t{doc.s0} * p.v_ss + hk * p.v_sh;
    load_rows<kBM, D, kThreads>(sQ, gq, p.q_ss, rows_q, tid);
    load_rows<kBN, D, kThreads>(sK, gk, p.k_ss, min(kBN, doc.L), tid);
    load_rows<kBN, D, kThreads>(sV, gv, p.v_ss, min(kBN, doc.L), tid);
    cp_async_commit();

    float m_run[kMT][2], l_run[kMT][2], o[kMT][kDT][4];
    uint32_t rq[kMT][2];
    const uint32_t head_key = dropout ? dropout_head_key(p, n, h) : 0u;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        m_run[mt][hr] = -INFINITY;
        l_run[mt][hr] = 0.f;
        rq[mt][hr] = rand_bits(head_key, static_cast<uint32_t>(i0 + wrow + mt * 16 + g + 8 * hr));
      }
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    }

    for (int t = 0; t < n_tiles; ++t) {
      cp_async_wait_all();
      // Tile t is visible to all, and every warp is done with tile t - 1, whose
      // stage the prefetch below overwrites.
      __syncthreads();
      if (t + 1 < n_tiles) {
        const int j1 = (t + 1) * kBN;
        const int st = (t + 1) & 1;
        load_rows<kBN, D, kThreads>(sK + st * C::kKVElems, gk + j1 * p.k_ss, p.k_ss, min(kBN, doc.L - j1), tid);
        load_rows<kBN, D, kThreads>(sV + st * C::kKVElems, gv + j1 * p.v_ss, p.v_ss, min(kBN, doc.L - j1), tid);
      }
      cp_async_commit();
      const uint32_t cK = k_base + (t & 1) * kKVBytes;
      const uint32_t cV = v_base + (t & 1) * kKVBytes;
      const int j0 = t * kBN;

      // S = Q K^T; each K fragment serves both m-tiles of the warp.
      float s[kMT][kNT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) ldsm_a<D>(q_base + mt * 16 * kLd * 2, ks, a[mt]);
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t b[4];
          ldsm_bt<D>(cK, np, ks, b);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
            mma_16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }

      // Every (row >= i0, key in tile) pair allowed: no per-element mask.
      const bool full = j0 + kBN <= doc.L && j0 + kBN - 1 <= max(i0, doc.P - 1);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int i = i0 + wrow + mt * 16 + g + 8 * hr;
          const int lim = max(i, doc.P - 1);
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = j0 + nt * 8 + 2 * t4 + e;
              float x = s[mt][nt][2 * hr + e] * scale_log2;
              if (!full && (j >= doc.L || j > lim)) x = -INFINITY;
              s[mt][nt][2 * hr + e] = x;
              mx = fmaxf(mx, x);
            }
          }
          // The four lanes of a quad hold the row.
          mx = fmaxf(mx, shfl_xor(mx, 1));
          mx = fmaxf(mx, shfl_xor(mx, 2));
          const float m_new = fmaxf(m_run[mt][hr], mx);
          // The first key tile always holds key 0, which every row may see, so
          // m_new is finite; the guard keeps -inf - -inf = NaN out regardless.
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = fast_exp2(m_run[mt][hr] - m_use);
          m_run[mt][hr] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pv = fast_exp2(s[mt][nt][2 * hr + e] - m_use);
              sum += pv;  // the normaliser counts dropped entries too (lse before dropout)
              s[mt][nt][2 * hr + e] = pv;
            }
          }
          l_run[mt][hr] = l_run[mt][hr] * alpha + sum;  // a per-lane partial; quad-summed at the end
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            o[mt][dt][2 * hr] *= alpha;
            o[mt][dt][2 * hr + 1] *= alpha;
          }
          if (dropout) {
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                if (dropped(rq[mt][hr], j0 + nt * 8 + 2 * t4 + e, p.dropout_threshold24)) s[mt][nt][2 * hr + e] = 0.f;
              }
            }
          }
        }
      }

      // O += P V, each V fragment serving both m-tiles; the 1 / (1 - p) of
      // dropout is applied once at the end.
#pragma unroll
      for (int kc = 0; kc < kBN / 16; ++kc) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) acc_to_a<T>(s[mt], kc, a[mt]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldsm_b<D>(cV, kc, dp, b);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(o[mt][2 * dp], a[mt], b[0], b[1]);
            mma_16816<T>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float l = l_run[mt][hr];
        l += shfl_xor(l, 1);
        l += shfl_xor(l, 2);
        const float inv = l > 0.f ? p.keep_scale / l : 0.f;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          o[mt][dt][2 * hr] *= inv;
          o[mt][dt][2 * hr + 1] *= inv;
        }
        const int i = i0 + wrow + mt * 16 + g + 8 * hr;
        if (t4 == 0 && i < doc.L)
          lse[(doc.b * p.H + h) * p.Sq + doc.s0 + i] = (m_run[mt][hr] + log2f(l)) * kLn2;
      }
    }
    // Stage through this warp's own rows of sQ (no other warp reads them), then
    // write whole rows with 16-byte stores.
    sync_warp();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) stage_acc<T, D>(sQ + (wrow + mt * 16) * kLd, o[mt], lane);
    sync_warp();
    T* go = out + doc.b * p.o_sb + int64_t{doc.s0 + i0 + wrow} * p.o_ss + h * p.o_sh;
    store_rows_warp<kMT * 16, D>(go, p.o_ss, sQ + wrow * kLd, rows_q - wrow, lane);
    __syncthreads();  // the next document reuses shared memory
  }
}

// ---------------------------------------------------------------------------- backward: dK, dV
//
// One block = kBN keys of one (document, kv head), each warp 16 of them. The
// block walks every query head of the kv head's group and every query tile
// that can see its keys, in a fixed order, recomputing in transposed form
// (keys as rows, so dK and dV stay in registers):
//   S^T = K Q^T, P^T = exp(scale S^T - lse), dV += (P^T o keep) dO,
//   dP^T = V dO^T, dS^T = P^T o (Z dP^T - delta), dK += dS^T Q,
// with Z = keep / (1 - p). The GQA sum over the group happens in registers:
// deterministic, no atomics, no scratch.

template <typename T, int D>
__global__ void __launch_bounds__(BwdKVCfg<D>::kThreads) attention_bwd_dkdv_kernel(const AttentionParams p) {
  using C = BwdKVCfg<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kLd = C::kLd, kThreads = C::kThreads;
  constexpr int kNT = kBM / 8, kDT = D / 8;
  static_assert(kNT * 4 <= 32, "dropped-bit mask holds 32 entries");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::kKElems;
  T* sQ = sV + C::kKElems;        // 2 stages
  T* sdO = sQ + 2 * C::kQElems;   // 2 stages
  float* sL = reinterpret_cast<float*>(sdO + 2 * C::kQElems);  // 2 stages of lse
  float* sD = sL + 2 * kBM;                                     // 2 stages of delta

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int hk = blockIdx.y;
  const int group = static_cast<int>(p.H / p.Hk);
  const int nb = blockIdx.x;
  const T* q = reinterpret_cast<const T*>(p.q);
  const T* k = reinterpret_cast<const T*>(p.k);
  const T* v = reinterpret_cast<const T*>(p.v);
  const T* dout = reinterpret_cast<const T*>(p.dout);
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* delta = reinterpret_cast<const float*>(p.delta);
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_threshold24 != 0;
  const int wrow = warp * 16;
  const uint32_t k_base = smem_addr(sK + wrow * kLd) + lane_off_a<D>(lane);  // A operand rows
  const uint32_t v_base = smem_addr(sV + wrow * kLd) + lane_off_a<D>(lane);
  const uint32_t q_bt = smem_addr(sQ) + lane_off_bt<D>(lane);    // Q^T as B
  const uint32_t q_b = smem_addr(sQ) + lane_off_a<D>(lane);      // Q as B
  const uint32_t do_bt = smem_addr(sdO) + lane_off_bt<D>(lane);
  const uint32_t do_b = smem_addr(sdO) + lane_off_a<D>(lane);
  constexpr uint32_t kQBytes = C::kQElems * 2;

  for (int64_t n = blockIdx.z; n < p.num_docs; n += gridDim.z) {
    const Doc doc = load_doc(p, n);
    const int j0 = nb * kBN;
    if (j0 >= doc.L) continue;
    const int rows_k = min(kBN, doc.L - j0);
    const T* gk = k + doc.b * p.k_sb + int64_t{doc.s0 + j0} * p.k_ss + hk * p.k_sh;
    const T* gv = v + doc.b * p.v_sb + int64_t{doc.s0 + j0} * p.v_ss + hk * p.v_sh;
    load_rows<kBN, D, kThreads>(sK, gk, p.k_ss, rows_k, tid);
    load_rows<kBN, D, kThreads>(sV, gv, p.v_ss, rows_k, tid);

    // Queries i see a key j >= j0 only if max(i, P - 1) >= j0: all of them when
    // the prefix reaches the block, else only i >= j0.
    const int m_begin = doc.P - 1 >= j0 ? 0 : j0 / kBM;
    const int m_count = (doc.L + kBM - 1) / kBM - m_begin;
    const int steps = group * m_count;

    // Loads step `step` (query head hk * group + step / m_count, query tile
    // m_begin + step % m_count) into stage `stage`.
    auto issue = [&](int step, int stage) {
      const int hq = hk * group + step / m_count;
      const int i0 = (m_begin + step % m_count) * kBM;
      const int rows = min(kBM, doc.L - i0);
      const int64_t row0 = int64_t{doc.s0 + i0};
      load_rows<kBM, D, kThreads>(sQ + stage * C::kQElems, q + doc.b * p.q_sb + row0 * p.q_ss + hq * p.q_sh, p.q_ss,
                                  rows, tid);
      load_rows<kBM, D, kThreads>(sdO + stage * C::kQElems, dout + doc.b * p.do_sb + row0 * p.do_ss + hq * p.do_sh,
                                  p.do_ss, rows, tid);
      const int64_t stat0 = (doc.b * p.H + hq) * p.Sq + row0;
      for (int r = tid; r < kBM; r += kThreads) {
        cp_async_4(sL + stage * kBM + r, lse + stat0 + (r < rows ? r : 0), r < rows);
        cp_async_4(sD + stage * kBM + r, delta + stat0 + (r < rows ? r : 0), r < rows);
      }
    };
    if (steps > 0) issue(0, 0);  // always true (key j0 < L is seen by query j0), kept as a guard
    cp_async_commit();            // K, V and step 0 together

    float dk[kDT][4], dv[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
      dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
    }

    for (int step = 0; step < steps; ++step) {
      cp_async_wait_all();
      __syncthreads();  // step visible to all; every warp done with step - 1's stage
      if (step + 1 < steps) issue(step + 1, (step + 1) & 1);
      cp_async_commit();
      const int stage = step & 1;
      const int hq = hk * group + step / m_count;
      const int i0 = (m_begin + step % m_count) * kBM;
      const uint32_t soff = stage * kQBytes;
      const float* cL = sL + stage * kBM;
      const float* cD = sD + stage * kBM;

      float st[kNT][4];  // S^T, then P^T: rows = this warp's keys, columns = the tile's queries
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
      gemm_abt<T, D, kBM>(st, k_base, q_bt + soff);

      const bool full = i0 + kBM <= doc.L && j0 + kBN <= doc.L && j0 + kBN - 1 <= max(i0, doc.P - 1);
      const uint32_t head_key = dropout ? dropout_head_key(p, n, hq) : 0u;
      uint32_t drop_bits = 0;  // bit nt * 4 + c: entry st[nt][c] dropped
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int il = nt * 8 + 2 * t4 + e;
          const int i = i0 + il;
          const float lse2 = cL[il] * kLog2e;
          const uint32_t rq = dropout ? rand_bits(head_key, static_cast<uint32_t>(i)) : 0u;
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int j = j0 + wrow + g + 8 * hr;
            const bool allowed = full || (i < doc.L && j < doc.L && j <= max(i, doc.P - 1));
            const int c = 2 * hr + e;
            st[nt][c] = allowed ? fast_exp2(st[nt][c] * scale_log2 - lse2) : 0.f;
            if (dropout && dropped(rq, j, p.dropout_threshold24)) drop_bits |= 1u << (nt * 4 + c);
          }
        }
      }

      // dV += (P^T with dropped entries zeroed) dO
#pragma unroll
      for (int kc = 0; kc < kBM / 16; ++kc) {
        float pk[2][4];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int nt = 2 * kc + u;
            pk[u][c] = (drop_bits >> (nt * 4 + c)) & 1u ? 0.f : st[nt][c];
          }
        }
        uint32_t a[4];
        a[0] = pack2<T>(pk[0][0], pk[0][1]);
        a[1] = pack2<T>(pk[0][2], pk[0][3]);
        a[2] = pack2<T>(pk[1][0], pk[1][1]);
        a[3] = pack2<T>(pk[1][2], pk[1][3]);
        gemm_ab<T, D>(dv, a, do_b + soff, kc);
      }

      float dpt[kNT][4];  // dP^T, then dS^T
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
      gemm_abt<T, D, kBM>(dpt, v_base, do_bt + soff);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float dl = cD[nt * 8 + 2 * t4 + (c & 1)];
          const float z = !dropout ? 1.f : ((drop_bits >> (nt * 4 + c)) & 1u ? 0.f : p.keep_scale);
          dpt[nt][c] = st[nt][c] * (z * dpt[nt][c] - dl);
        }
      }

      // dK += dS^T Q (scale applied at the end)
#pragma unroll
      for (int kc = 0; kc < kBM / 16; ++kc) {
        uint32_t a[4];
        acc_to_a<T>(dpt, kc, a);
        gemm_ab<T, D>(dk, a, q_b + soff, kc);
      }
    }

    const float dv_scale = dropout ? p.keep_scale : 1.f;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        dk[dt][c] *= p.scale;
        dv[dt][c] *= dv_scale;
      }
    }
    // Stage through this warp's own rows of sK and sV (read by no other warp).
    cp_async_wait_all();  // nothing is in flight after a step; free when so
    sync_warp();
    stage_acc<T, D>(sK + wrow * kLd, dk, lane);
    stage_acc<T, D>(sV + wrow * kLd, dv, lane);
    sync_warp();
    const int64_t row0 = int64_t{doc.s0 + j0 + wrow};
    T* gdk = reinterpret_cast<T*>(p.dk) + doc.b * p.dk_sb + row0 * p.dk_ss + hk * p.dk_sh;
    T* gdv = reinterpret_cast<T*>(p.dv) + doc.b * p.dv_sb + row0 * p.dv_ss + hk * p.dv_sh;
    store_rows_warp<16, D>(gdk, p.dk_ss, sK + wrow * kLd, rows_k - wrow, lane);
    store_rows_warp<16, D>(gdv, p.dv_ss, sV + wrow * kLd, rows_k - wrow, lane);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------- backward: dQ
//
// One block = kBM queries of one (document, head), each warp 16 of them; walks
// the same key tiles as the forward: S = Q K^T, P = exp(scale S - lse),
// dP = dO V^T, dS = P o (Z dP - delta), dQ += dS K. A separate pass from dK/dV
// so that no accumulation crosses blocks (no atomics: deterministic).

template <typename T, int D>
__global__ void __launch_bounds__(BwdQCfg<D>::kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
  using C = BwdQCfg<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kLd = C::kLd, kThreads = C::kThreads;
  constexpr int kNT = kBN / 8, kDT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + C::kQElems;
  T* sK = sdO + C::kQElems;       // 2 stages
  T* sV = sK + 2 * C::kKVElems;   // 2 stages

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int h = blockIdx.y;
  const int hk = static_cast<int>(h / (p.H / p.Hk));
  const int mb = (p.flags & kAttnCausalAny) ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
  const T* q = reinterpret_cast<const T*>(p.q);
  const T* k = reinterpret_cast<const T*>(p.k);
  const T* v = reinterpret_cast<const T*>(p.v);
  const T* dout = reinterpret_cast<const T*>(p.dout);
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* delta = reinterpret_cast<const float*>(p.delta);
  const float scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_threshold24 != 0;
  const int wrow = warp * 16;
  const uint32_t q_base = smem_addr(sQ + wrow * kLd) + lane_off_a<D>(lane);
  const uint32_t do_base = smem_addr(sdO + wrow * kLd) + lane_off_a<D>(lane);
  const uint32_t k_bt = smem_addr(sK) + lane_off_bt<D>(lane);  // K^T as B
  const uint32_t k_b = smem_addr(sK) + lane_off_a<D>(lane);    // K as B
  const uint32_t v_bt = smem_addr(sV) + lane_off_bt<D>(lane);
  constexpr uint32_t kKVBytes = C::kKVElems * 2;

  for (int64_t n = blockIdx.z; n < p.num_docs; n += gridDim.z) {
    const Doc doc = load_doc(p, n);
    const int i0 = mb * kBM;
    if (i0 >= doc.L) continue;
    const int rows_q = min(kBM, doc.L - i0);
    const int n_end = min(doc.L, max(i0 + rows_q - 1, doc.P - 1) + 1);
    const int n_tiles = (n_end + kBN - 1) / kBN;

    const int64_t row0 = int64_t{doc.s0 + i0};
    const T* gk = k + doc.b * p.k_sb + int64_t{doc.s0} * p.k_ss + hk * p.k_sh;
    const T* gv = v + doc.b * p.v_sb + int64_t{doc.s0} * p.v_ss + hk * p.v_sh;
    load_rows<kBM, D, kThreads>(sQ, q + doc.b * p.q_sb + row0 * p.q_ss + h * p.q_sh, p.q_ss, rows_q, tid);
    load_rows<kBM, D, kThreads>(sdO, dout + doc.b * p.do_sb + row0 * p.do_ss + h * p.do_sh, p.do_ss, rows_q, tid);
    load_rows<kBN, D, kThreads>(sK, gk, p.k_ss, min(kBN, doc.L), tid);
    load_rows<kBN, D, kThreads>(sV, gv, p.v_ss, min(kBN, doc.L), tid);
    cp_async_commit();

    // This thread's two rows: lse (base 2), delta and dropout row key.
    float lse2[2], dl[2];
    uint32_t rq[2];
    const uint32_t head_key = dropout ? dropout_head_key(p, n, h) : 0u;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = i0 + wrow + g + 8 * hr;
      const int64_t at = (doc.b * p.H + h) * p.Sq + doc.s0 + i;
      lse2[hr] = i < doc.L ? lse[at] * kLog2e : 0.f;
      dl[hr] = i < doc.L ? delta[at] : 0.f;
      rq[hr] = rand_bits(head_key, static_cast<uint32_t>(i));
    }

    float dq[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

    for (int t = 0; t < n_tiles; ++t) {
      cp_async_wait_all();
      __syncthreads();
      if (t + 1 < n_tiles) {
        const int j1 = (t + 1) * kBN;
        const int st = (t + 1) & 1;
        load_rows<kBN, D, kThreads>(sK + st * C::kKVElems, gk + j1 * p.k_ss, p.k_ss, min(kBN, doc.L - j1), tid);
        load_rows<kBN, D, kThreads>(sV + st * C::kKVElems, gv + j1 * p.v_ss, p.v_ss, min(kBN, doc.L - j1), tid);
      }
      cp_async_commit();
      const uint32_t soff = (t & 1) * kKVBytes;
      const int j0 = t * kBN;

      float s[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      gemm_abt<T, D, kBN>(s, q_base, k_bt + soff);

      const bool full = j0 + kBN <= doc.L && j0 + kBN - 1 <= max(i0, doc.P - 1);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int lim = max(i0 + wrow + g + 8 * hr, doc.P - 1);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = j0 + nt * 8 + 2 * t4 + e;
            const bool allowed = full || (j < doc.L && j <= lim);
            const int c = 2 * hr + e;
            s[nt][c] = allowed ? fast_exp2(s[nt][c] * scale_log2 - lse2[hr]) : 0.f;
          }
        }
      }

      float dp[kNT][4];  // dP, then dS
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
      gemm_abt<T, D, kBN>(dp, do_base, v_bt + soff);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = 2 * hr + e;
            float z = 1.f;
            if (dropout) z = dropped(rq[hr], j0 + nt * 8 + 2 * t4 + e, p.dropout_threshold24) ? 0.f : p.keep_scale;
            dp[nt][c] = s[nt][c] * (z * dp[nt][c] - dl[hr]);
          }
        }
      }

      // dQ += dS K (scale applied at the end)
#pragma unroll
      for (int kc = 0; kc < kBN / 16; ++kc) {
        uint32_t a[4];
        acc_to_a<T>(dp, kc, a);
        gemm_ab<T, D>(dq, a, k_b + soff, kc);
      }
    }

#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) dq[dt][c] *= p.scale;
    }
    sync_warp();
    stage_acc<T, D>(sQ + wrow * kLd, dq, lane);
    sync_warp();
    T* gdq = reinterpret_cast<T*>(p.dq) + doc.b * p.dq_sb + (row0 + wrow) * p.dq_ss + h * p.dq_sh;
    store_rows_warp<16, D>(gdq, p.dq_ss, sQ + wrow * kLd, rows_q - wrow, lane);
    __syncthreads();
  }
}

}  // namespace attn
}  // namespace fastpt
