// Tiled contrastive log-sum-exp on the CPU: the denominators of InfoNCE / CLIP /
// NT-Xent and their gradients without ever holding the (N, M) similarity matrix.
//
// python/fastpt/ops/contrastive.py reduces every loss to two pieces. The positive
// terms are O((N + M) * D) dot products done in torch; this file does the rest:
//
//   S       = scale * q @ [k; queue]^T         (N, M + K), never stored whole
//   S[i, i + self_offset] = -inf                (exclude_self, key columns only: NT-Xent)
//   row_lse = logsumexp over columns of S       (N,)
//   col_lse = logsumexp over rows of S[:, :M]   (M,)   only when symmetric
//
// and, for the backward, with dS[i, j] = g_row[i] exp(S[i, j] - row_lse[i])
//                                      + g_col[j] exp(S[i, j] - col_lse[j])  (key columns, symmetric),
//   grad_q = dS @ [k; queue]     (N, D) float32, *not* multiplied by scale
//   grad_k = dS[:, :M]^T @ q     (M, D) float32, *not* multiplied by scale (the queue gets none)
//
// Work is split into (row block of kBN queries) x (column split) items. Each item
// walks its column blocks of kBM keys: one fp32 S tile in a per-worker scratch,
// online max / sum per row (and per column, per worker, when symmetric) in the
// forward; the same tile turned into dS and two small GEMMs in the backward.
// Memory: padded fp32 copies of q, k and the queue (plus a panel-packed copy of
// k and queue), O(N + M) statistics, and per worker one tile and (backward) one
// fp32 grad_k accumulator: O((N + M + K) * D), never O(N * M).
//
// The GEMMs are register-blocked micro-kernels written with GCC/clang vector
// extensions and compiled three times (AVX-512, AVX2+FMA, baseline); the widest
// the CPU supports is chosen at run time (or forced by `isa`, for tests).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "contrastive.h"
#include "convert.h"
#include "parallel.h"
#include "simd.h"

namespace fastpt {
namespace {

using namespace simd;  // NOLINT: the vector helpers of simd.h

constexpr int64_t kBN = 96;    // queries per tile: a multiple of the MR of every ISA in simd.h
constexpr int64_t kBM = 192;   // keys per tile: a multiple of every NR and MR there
constexpr int64_t kDPad = 32;  // feature dim padded to a multiple of the widest NR
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static_assert(kBN % 8 == 0 && kBN % 6 == 0 && kBM % 32 == 0 && kBM % 6 == 0 && kDPad % 32 == 0, "tile sizes");

// c[r * c_r + 0 .. NR) (+)= sum_p a[r * a_r + p * a_p] * b[p * b_p + 0 .. NR), r < MR.
// The MR x NR accumulators stay in registers for the whole p loop.
template <class I>
FASTPT_ALWAYS_INLINE void micro(int64_t P, const float* a, int64_t a_r, int64_t a_p, const float* b, int64_t b_p,
                                float* c, int64_t c_r, bool accumulate) {
  using V = typename I::V;
  constexpr int MR = I::MR, NV = I::NV, W = I::W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < P; ++p) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(b + p * b_p + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float x = a[r * a_r + p * a_p];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
  // The tile's partial sum (at most kBM / kBN terms) is added to c once: a two-level sum, whose
  // rounding error grows with the tile and the tile count, not with all the columns (or rows)
  // one accumulator would otherwise run through (8,000 queue columns on one thread: 4x the
  // error of a blocked matmul).
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      vstore<V>(c + r * c_r + v * W, accumulate ? vload<V>(c + r * c_r + v * W) + acc[r][v] : acc[r][v]);
}

// --------------------------------------------------------------------------- packed operands

// One row of `d` elements of `dtype` at `src` -> fp32 `dst`.
void load_row(uintptr_t src, int dtype, int64_t row, int64_t d, float* dst) {
  switch (dtype) {
    case kFloat32:
      std::memcpy(dst, ptr<const float>(src) + row * d, sizeof(float) * d);
      break;
    case kBFloat16:
      widen<kBFloat16>(ptr<const uint16_t>(src) + row * d, dst, d);
      break;
    case kFloat16:
      widen<kFloat16>(ptr<const uint16_t>(src) + row * d, dst, d);
      break;
    default:
      throw std::invalid_argument("contrastive: dtype code must be float32, float16 or bfloat16, got " +
                                  std::to_string(dtype));
  }
}

struct Ctx {
  const ContrastiveParams& p;
  int64_t N, M, C, D, Dp, Np, Cp, Mp, NR;
  int64_t n_rb, n_cb, splits;  // row blocks, column blocks, column splits per row block
  std::vector<float> Qf;       // (Np, Dp) zero-padded fp32 queries
  std::vector<float> Kt;       // (Cp / NR, Dp, NR) keys then queue, in NR-wide column panels
  std::vector<float> Kf;       // (Cp, Dp) keys then queue, row-major (backward only)
  std::vector<float> col_lse, col_g;  // (Cp,) padded copies (backward, symmetric)
  explicit Ctx(const ContrastiveParams& params) : p(params) {}
};

void pack(Ctx& c, int threads, bool row_major_keys) {
  const ContrastiveParams& p = c.p;
  c.Qf.assign(c.Np * c.Dp, 0.0f);
  c.Kt.assign(c.Cp * c.Dp, 0.0f);
  if (row_major_keys) c.Kf.assign(c.Cp * c.Dp, 0.0f);
  parallel_for(c.N, 256, threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) load_row(p.q, p.dtype, i, c.D, &c.Qf[i * c.Dp]);
  });
  const int64_t NR = c.NR, strips = c.Cp / NR;
  parallel_for(strips, 4, threads, [&](int64_t b, int64_t e) {
    std::vector<float> row(c.Dp, 0.0f);
    for (int64_t s = b; s < e; ++s) {
      float* panel = &c.Kt[s * c.Dp * NR];
      for (int64_t jj = 0; jj < NR; ++jj) {
        const int64_t j = s * NR + jj;
        if (j >= c.C) break;
        if (j < c.M) load_row(p.k, p.dtype, j, c.D, row.data());
        else load_row(p.queue, p.dtype, j - c.M, c.D, row.data());
        for (int64_t x = 0; x < c.D; ++x) panel[x * NR + jj] = row[x];
        if (row_major_keys) std::memcpy(&c.Kf[j * c.Dp], row.data(), sizeof(float) * c.D);
      }
    }
  });
}

// Work items: (row block, column split); the split covers column blocks [b0, b1).
FASTPT_ALWAYS_INLINE void item_range(const Ctx& c, int64_t item, int64_t* rb, int64_t* b0, int64_t* b1) {
  *rb = item / c.splits;
  const int64_t s = item % c.splits;
  *b0 = s * c.n_cb / c.splits;
  *b1 = (s + 1) * c.n_cb / c.splits;
}

struct Worker {
  std::vector<float> tile;          // (kBN, kBM) S, then dS
  std::vector<float> col_m, col_s;  // (Mp,) this worker's column max / sum (forward, symmetric)
  std::vector<float> dk;            // (Mp, Dp) this worker's grad_k accumulator (backward)
  bool used = false;
};

// The scaled S tile of row block rb x column block cb into `tile` (ld kBM) for
// its nrow valid rows. Columns from ncol up to the next vector boundary and the
// excluded self column are -inf; rows >= nrow are left unscaled and never read
// as statistics (they only feed padded, discarded grad_q rows).
template <class I>
FASTPT_ALWAYS_INLINE void score_tile(const Ctx& c, float* tile, int64_t rb, int64_t cb, int64_t nrow, int64_t ncol) {
  using V = typename I::V;
  const int64_t r0 = rb * kBN, c0 = cb * kBM, NR = I::NR;
  const int64_t nstrip = (ncol + NR - 1) / NR, nmicro = (nrow + I::MR - 1) / I::MR;
  for (int64_t s = 0; s < nstrip; ++s) {
    const float* panel = &c.Kt[(c0 / NR + s) * c.Dp * NR];
    for (int64_t ib = 0; ib < nmicro; ++ib) {
      const int64_t i = ib * I::MR;
      micro<I>(c.Dp, &c.Qf[(r0 + i) * c.Dp], c.Dp, 1, panel, NR, tile + i * kBM + s * NR, kBM, false);
    }
  }
  const float scale = c.p.scale;
  const int64_t nvec = (ncol + I::W - 1) / I::W;
  for (int64_t i = 0; i < nrow; ++i) {
    float* row = tile + i * kBM;
    for (int64_t v = 0; v < nvec; ++v) vstore<V>(row + v * I::W, vload<V>(row + v * I::W) * scale);
    for (int64_t j = ncol; j < nvec * I::W; ++j) row[j] = kNegInf;
    if (c.p.exclude_self) {
      const int64_t j = r0 + i + c.p.self_offset - c0;  // tile column of this query's own key
      if (j >= 0 && j < ncol && c0 + j < c.M) row[j] = kNegInf;
    }
  }
}

// Forward of one item: online log-sum-exp per row over the split's column blocks,
// written as a partial (max, sum) pair per (split, row); per-worker column stats.
template <class I>
FASTPT_ALWAYS_INLINE void fwd_item(const Ctx& c, Worker& w, int64_t item, float* part_m, float* part_s) {
  using V = typename I::V;
  int64_t rb, b0, b1;
  item_range(c, item, &rb, &b0, &b1);
  const int64_t r0 = rb * kBN, nrow = std::min(kBN, c.N - r0);
  float m_row[kBN], s_row[kBN];
  for (int64_t i = 0; i < kBN; ++i) m_row[i] = kNegInf, s_row[i] = 0.0f;
  float* tile = w.tile.data();
  for (int64_t cb = b0; cb < b1; ++cb) {
    const int64_t c0 = cb * kBM, ncol = std::min(kBM, c.C - c0);
    const int64_t nvec = (ncol + I::W - 1) / I::W;
    score_tile<I>(c, tile, rb, cb, nrow, ncol);
    for (int64_t i = 0; i < nrow; ++i) {
      const float* row = tile + i * kBM;
      V mv = splat<V>(kNegInf);
      for (int64_t v = 0; v < nvec; ++v) {
        const V x = vload<V>(row + v * I::W);
        mv = vselect<I>(x > mv, x, mv);  // NaN never wins: it reaches the sum below instead
      }
      const float m_new = std::max(m_row[i], hmax<I>(mv));
      if (m_new == kNegInf) continue;  // every column so far excluded
      V sv = V{};
      for (int64_t v = 0; v < nvec; ++v) sv += vexp<I>(vload<V>(row + v * I::W) - m_new);
      s_row[i] = s_row[i] * std::exp(m_row[i] - m_new) + hsum<I>(sv);
      m_row[i] = m_new;
    }
    if (c.p.symmetric && c0 < c.M) {
      // Column direction over this tile's rows, vectorised across key columns.
      const int64_t nkey = std::min(ncol, c.M - c0), nkv = (nkey + I::W - 1) / I::W;
      float* cm = w.col_m.data() + c0;
      float* cs = w.col_s.data() + c0;
      for (int64_t v = 0; v < nkv; ++v) {
        V mv = vload<V>(cm + v * I::W);
        const V m_old = mv;
        for (int64_t i = 0; i < nrow; ++i) {
          const V x = vload<V>(tile + i * kBM + v * I::W);
          mv = vselect<I>(x > mv, x, mv);
        }
        const V safe = vselect<I>(mv == splat<V>(kNegInf), V{}, mv);
        V sv = vload<V>(cs + v * I::W) * vexp<I>(m_old - safe);
        for (int64_t i = 0; i < nrow; ++i) sv += vexp<I>(vload<V>(tile + i * kBM + v * I::W) - safe);
        vstore<V>(cm + v * I::W, mv);
        vstore<V>(cs + v * I::W, sv);
      }
    }
  }
  const int64_t split = item % c.splits;
  for (int64_t i = 0; i < nrow; ++i) {
    part_m[split * c.Np + r0 + i] = m_row[i];
    part_s[split * c.Np + r0 + i] = s_row[i];
  }
}

// Backward of one item: dS per tile, then grad_q rows (owned by this (row block,
// split)) and this worker's grad_k accumulator.
template <class I>
FASTPT_ALWAYS_INLINE void bwd_item(const Ctx& c, Worker& w, int64_t item, float* dq_part) {
  using V = typename I::V;
  int64_t rb, b0, b1;
  item_range(c, item, &rb, &b0, &b1);
  const int64_t r0 = rb * kBN, nrow = std::min(kBN, c.N - r0);
  const float* row_lse = ptr<const float>(c.p.row_lse);
  const float* g_row = ptr<const float>(c.p.grad_row);
  float* tile = w.tile.data();
  float* dq = dq_part + (item % c.splits) * c.Np * c.Dp + r0 * c.Dp;
  const int64_t nmicro = (nrow + I::MR - 1) / I::MR, ndv = c.Dp / I::NR;
  for (int64_t cb = b0; cb < b1; ++cb) {
    const int64_t c0 = cb * kBM, ncol = std::min(kBM, c.C - c0);
    const int64_t nvec = (ncol + I::W - 1) / I::W;
    score_tile<I>(c, tile, rb, cb, nrow, ncol);
    const int64_t nkey = c0 < c.M ? std::min(ncol, c.M - c0) : 0;
    const int64_t nkv = (nkey + I::W - 1) / I::W;
    for (int64_t i = 0; i < nrow; ++i) {
      float* row = tile + i * kBM;
      const float lse = row_lse[r0 + i], g = g_row[r0 + i];
      for (int64_t v = 0; v < nvec; ++v) {
        const V x = vload<V>(row + v * I::W);
        V ds = vexp<I>(x - lse) * g;
        if (c.p.symmetric && v < nkv) {
          ds += vexp<I>(x - vload<V>(&c.col_lse[c0 + v * I::W])) * vload<V>(&c.col_g[c0 + v * I::W]);
        }
        vstore<V>(row + v * I::W, ds);
      }
    }
    // grad_q[rows] += dS @ K[cols]: (MR rows) x (NR features) micro-tiles, p over columns.
    for (int64_t ib = 0; ib < nmicro; ++ib) {
      const int64_t i = ib * I::MR;
      for (int64_t dv = 0; dv < ndv; ++dv) {
        micro<I>(ncol, tile + i * kBM, kBM, 1, &c.Kf[c0 * c.Dp + dv * I::NR], c.Dp, dq + i * c.Dp + dv * I::NR, c.Dp,
                 true);
      }
    }
    // grad_k[key cols] += dS^T @ Q[rows]: (MR keys) x (NR features), p over rows.
    const int64_t nkm = (nkey + I::MR - 1) / I::MR;
    for (int64_t jb = 0; jb < nkm; ++jb) {
      const int64_t j = jb * I::MR;
      for (int64_t dv = 0; dv < ndv; ++dv) {
        micro<I>(nrow, tile + j, 1, kBM, &c.Qf[r0 * c.Dp + dv * I::NR], c.Dp, &w.dk[(c0 + j) * c.Dp + dv * I::NR], c.Dp,
                 true);
      }
    }
  }
}

// --------------------------------------------------------------------------- per-ISA entry points

using FwdFn = void (*)(const Ctx&, Worker&, int64_t, float*, float*);
using BwdFn = void (*)(const Ctx&, Worker&, int64_t, float*);

void fwd_base(const Ctx& c, Worker& w, int64_t item, float* pm, float* ps) { fwd_item<IsaBase>(c, w, item, pm, ps); }
void bwd_base(const Ctx& c, Worker& w, int64_t item, float* dq) { bwd_item<IsaBase>(c, w, item, dq); }

#if defined(FASTPT_X86_ISAS)
FASTPT_TARGET_AVX2 void fwd_avx2(const Ctx& c, Worker& w, int64_t item, float* pm, float* ps) {
  fwd_item<IsaAvx2>(c, w, item, pm, ps);
}
FASTPT_TARGET_AVX2 void bwd_avx2(const Ctx& c, Worker& w, int64_t item, float* dq) {
  bwd_item<IsaAvx2>(c, w, item, dq);
}
FASTPT_TARGET_AVX512 void fwd_avx512(const Ctx& c, Worker& w, int64_t item, float* pm, float* ps) {
  fwd_item<IsaAvx512>(c, w, item, pm, ps);
}
FASTPT_TARGET_AVX512 void bwd_avx512(const Ctx& c, Worker& w, int64_t item, float* dq) {
  bwd_item<IsaAvx512>(c, w, item, dq);
}
#endif

struct Kernels {
  FwdFn fwd;
  BwdFn bwd;
  int64_t NR;
};

Kernels kernels_for(int isa) {
  const int best = best_isa();
  if (isa == 0) isa = best;
  require(isa >= 1 && isa <= 3, "contrastive: isa must be 0 (auto), 1 (baseline), 2 (avx2) or 3 (avx512), got " +
                                    std::to_string(isa));
  require(isa <= best, "contrastive: isa " + std::to_string(isa) + " is not supported by this CPU (best: " +
                           std::to_string(best) + ")");
#if defined(FASTPT_X86_ISAS)
  if (isa == 3) return {fwd_avx512, bwd_avx512, IsaAvx512::NR};
  if (isa == 2) return {fwd_avx2, bwd_avx2, IsaAvx2::NR};
#endif
  return {fwd_base, bwd_base, IsaBase::NR};
}

const char* isa_name(int isa) { return isa == 3 ? "avx512" : isa == 2 ? "avx2" : "baseline"; }

// Checks shared by the CPU and CUDA entry points (the CUDA kernels read the scale on the device).
void check_shapes(const ContrastiveParams& p) {
  require(p.n >= 1 && p.m >= 1 && p.d >= 1 && p.n_queue >= 0, "contrastive: need n, m, d >= 1 and n_queue >= 0");
  require(p.q && p.k && (p.n_queue == 0 || p.queue), "contrastive: null input pointer");
  require(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
          "contrastive: dtype code must be float32, float16 or bfloat16");
  require(!p.exclude_self || p.self_offset >= 0, "contrastive: self_offset must be >= 0");
  require(p.row_lse && (!p.symmetric || p.col_lse), "contrastive: null statistics pointer");
}

void check(const ContrastiveParams& p) {
  check_shapes(p);
  require(std::isfinite(p.scale) && p.scale > 0.0f, "contrastive: scale must be finite and > 0");
}

void setup(Ctx& c, int threads, int64_t NR) {
  const ContrastiveParams& p = c.p;
  c.N = p.n, c.M = p.m, c.C = p.m + p.n_queue, c.D = p.d, c.NR = NR;
  c.Dp = round_up(c.D, kDPad), c.Np = round_up(c.N, kBN), c.Cp = round_up(c.C, kBM), c.Mp = round_up(c.M, kBM);
  c.n_rb = c.Np / kBN, c.n_cb = c.Cp / kBM;
  // Few row blocks (small N, e.g. MoCo's batch against a long queue): split the
  // columns too, so that every thread gets work; 2 items per thread balance load.
  const int64_t want = 2 * static_cast<int64_t>(std::max(1, threads));
  c.splits = c.n_rb >= want ? 1 : std::min(c.n_cb, (want + c.n_rb - 1) / c.n_rb);
}

// Combines per-part (max, sum) pairs into log-sum-exp values.
void merge_lse(const float* m, const float* s, int64_t parts, int64_t stride, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float mx = kNegInf;
    for (int64_t t = 0; t < parts; ++t) mx = std::max(mx, m[t * stride + i]);
    if (mx == kNegInf) {
      out[i] = kNegInf;
      continue;
    }
    float tot = 0.0f;
    for (int64_t t = 0; t < parts; ++t) tot += s[t * stride + i] * std::exp(m[t * stride + i] - mx);
    out[i] = mx + std::log(tot);
  }
}

// Runs body(worker, item) over all items, worker slot w taking items w, w + W, ...
// Static so that every sum over workers (column statistics, grad_k) adds the
// same items in the same order on every run: results are reproducible for a
// given thread count. Items cost the same (one row block x one column split).
template <typename F>
void run_items(int64_t items, std::vector<Worker>& ws, F&& body) {
  const int64_t n = static_cast<int64_t>(ws.size());
  ThreadPool::run(n, static_cast<int>(n), [&](int64_t slot) {
    Worker& w = ws[slot];
    for (int64_t it = slot; it < items; it += n) {
      w.used = true;
      body(w, it);
    }
  });
}

}  // namespace

static void contrastive_forward_cpu(const ContrastiveParams& p, int num_threads) {
  check(p);
  const Kernels kern = kernels_for(p.isa);
  const int threads = std::max(1, num_threads);
  Ctx c(p);
  setup(c, threads, kern.NR);
  pack(c, threads, false);
  const int64_t items = c.n_rb * c.splits;
  std::vector<Worker> ws(static_cast<size_t>(std::min<int64_t>(threads, items)));
  for (Worker& w : ws) {
    w.tile.assign(kBN * kBM, 0.0f);
    if (p.symmetric) w.col_m.assign(c.Mp, kNegInf), w.col_s.assign(c.Mp, 0.0f);
  }
  std::vector<float> part_m(c.splits * c.Np, kNegInf), part_s(c.splits * c.Np, 0.0f);
  run_items(items, ws, [&](Worker& w, int64_t it) { kern.fwd(c, w, it, part_m.data(), part_s.data()); });
  merge_lse(part_m.data(), part_s.data(), c.splits, c.Np, c.N, ptr<float>(p.row_lse));
  if (p.symmetric) {
    std::vector<float> cm, cs;
    int64_t parts = 0;
    for (const Worker& w : ws) {
      if (!w.used) continue;
      cm.insert(cm.end(), w.col_m.begin(), w.col_m.end());
      cs.insert(cs.end(), w.col_s.begin(), w.col_s.end());
      ++parts;
    }
    merge_lse(cm.data(), cs.data(), parts, c.Mp, c.M, ptr<float>(p.col_lse));
  }
}

static void contrastive_backward_cpu(const ContrastiveParams& p, int num_threads) {
  check(p);
  require(p.grad_row && (!p.symmetric || p.grad_col) && p.grad_q && p.grad_k, "contrastive: null gradient pointer");
  require(!p.grad_pos && p.pos_wrap == 0,
          "contrastive: grad_pos is for the CUDA kernels (the CPU ones leave the positives to the caller)");
  const Kernels kern = kernels_for(p.isa);
  const int threads = std::max(1, num_threads);
  Ctx c(p);
  setup(c, threads, kern.NR);
  pack(c, threads, true);
  if (p.symmetric) {
    c.col_lse.assign(c.Cp, 0.0f);
    c.col_g.assign(c.Cp, 0.0f);  // zero weight: padded and queue columns get no column term
    std::memcpy(c.col_lse.data(), ptr<const float>(p.col_lse), sizeof(float) * c.M);
    std::memcpy(c.col_g.data(), ptr<const float>(p.grad_col), sizeof(float) * c.M);
  }
  const int64_t items = c.n_rb * c.splits;
  // One fp32 grad_k accumulator per worker. Bound their memory: beyond
  // max(512 MiB, 4x the padded fp32 inputs) use fewer workers instead.
  const int64_t dk_bytes = c.Mp * c.Dp * static_cast<int64_t>(sizeof(float));
  const int64_t budget = std::max<int64_t>(int64_t{512} << 20, 4 * (c.Np + c.Cp) * c.Dp * int64_t{4});
  const int64_t max_workers = std::max<int64_t>(1, budget / std::max<int64_t>(dk_bytes, 1));
  std::vector<Worker> ws(static_cast<size_t>(std::min<int64_t>({threads, items, max_workers})));
  for (Worker& w : ws) {
    w.tile.assign(kBN * kBM, 0.0f);
    w.dk.assign(c.Mp * c.Dp, 0.0f);
  }
  std::vector<float> dq_part(c.splits * c.Np * c.Dp, 0.0f);
  run_items(items, ws, [&](Worker& w, int64_t it) { kern.bwd(c, w, it, dq_part.data()); });
  float* gq = ptr<float>(p.grad_q);
  float* gk = ptr<float>(p.grad_k);
  parallel_for(c.N, 64, threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* out = gq + i * c.D;
      std::memcpy(out, &dq_part[i * c.Dp], sizeof(float) * c.D);
      for (int64_t s = 1; s < c.splits; ++s) {
        const float* src = &dq_part[(s * c.Np + i) * c.Dp];
        for (int64_t x = 0; x < c.D; ++x) out[x] += src[x];
      }
    }
  });
  parallel_for(c.M, 64, threads, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      float* out = gk + j * c.D;
      std::fill(out, out + c.D, 0.0f);
      for (const Worker& w : ws) {
        if (!w.used) continue;
        const float* src = &w.dk[j * c.Dp];
        for (int64_t x = 0; x < c.D; ++x) out[x] += src[x];
      }
    }
  });
}

void bind_contrastive(py::module_& m) {
  py::class_<ContrastiveParams>(m, "ContrastiveParams")
      .def(py::init<>())
      .def_readwrite("q", &ContrastiveParams::q)
      .def_readwrite("k", &ContrastiveParams::k)
      .def_readwrite("queue", &ContrastiveParams::queue)
      .def_readwrite("n", &ContrastiveParams::n)
      .def_readwrite("m", &ContrastiveParams::m)
      .def_readwrite("n_queue", &ContrastiveParams::n_queue)
      .def_readwrite("d", &ContrastiveParams::d)
      .def_readwrite("dtype", &ContrastiveParams::dtype)
      .def_readwrite("scale", &ContrastiveParams::scale)
      .def_readwrite("symmetric", &ContrastiveParams::symmetric)
      .def_readwrite("exclude_self", &ContrastiveParams::exclude_self)
      .def_readwrite("self_offset", &ContrastiveParams::self_offset)
      .def_readwrite("isa", &ContrastiveParams::isa)
      .def_readwrite("row_lse", &ContrastiveParams::row_lse)
      .def_readwrite("col_lse", &ContrastiveParams::col_lse)
      .def_readwrite("grad_row", &ContrastiveParams::grad_row)
      .def_readwrite("grad_col", &ContrastiveParams::grad_col)
      .def_readwrite("grad_q", &ContrastiveParams::grad_q)
      .def_readwrite("grad_k", &ContrastiveParams::grad_k)
      .def_readwrite("grad_pos", &ContrastiveParams::grad_pos)
      .def_readwrite("pos_shift", &ContrastiveParams::pos_shift)
      .def_readwrite("pos_wrap", &ContrastiveParams::pos_wrap)
      .def_readwrite("pos_base", &ContrastiveParams::pos_base)
      .def_readwrite("scale_ptr", &ContrastiveParams::scale_ptr)
      .def_readwrite("workspace", &ContrastiveParams::workspace)
      .def_readwrite("workspace_bytes", &ContrastiveParams::workspace_bytes);
  m.def("contrastive_forward_cpu", &contrastive_forward_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_backward_cpu", &contrastive_backward_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_cpu_isa", [] { return std::string(isa_name(best_isa())); },
        "The widest instruction set the contrastive CPU kernels use on this machine.");
#if defined(FASTPT_WITH_CUDA)
  // kernels/contrastive.cu, on the current device and the given stream (integers).
  m.def(
      "contrastive_cuda_workspace",
      [](const ContrastiveParams& p, bool backward) {
        check_shapes(p);
        int64_t bytes = 0;
        check_cuda(contrastive_cuda_workspace(p, backward, &bytes), "contrastive");
        return bytes;
      },
      py::arg("params"), py::arg("backward"), "Scratch bytes the CUDA forward / backward needs for these params.");
  m.def(
      "contrastive_forward_cuda",
      [](const ContrastiveParams& p, uintptr_t stream) {
        check_shapes(p);
        require(p.scale_ptr, "contrastive: the CUDA kernels read the scale from scale_ptr (a device float32)");
        check_cuda(contrastive_forward_cuda(p, stream), "contrastive");
      },
      py::arg("params"), py::arg("stream"));
  m.def(
      "contrastive_backward_cuda",
      [](const ContrastiveParams& p, uintptr_t stream) {
        check_shapes(p);
        require(p.scale_ptr, "contrastive: the CUDA kernels read the scale from scale_ptr (a device float32)");
        require(p.grad_row && (!p.symmetric || p.grad_col) && p.grad_q && p.grad_k,
                "contrastive: null gradient pointer");
        check_cuda(contrastive_backward_cuda(p, stream), "contrastive");
      },
      py::arg("params"), py::arg("stream"));
#endif
}

}  // namespace fastpt
