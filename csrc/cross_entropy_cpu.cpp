// The per-chunk softmax cross-entropy of the fused linear cross-entropy on the CPU
// (contract in cross_entropy.h). Rows split over threads; a row of a half-precision
// chunk is widened once into a per-thread float32 buffer, its statistics taken with
// simd.h's vector max / exp / sum, and the gradient written back rounded to the
// chunk's dtype. Replaces eight or so torch passes over a float32 copy of the chunk
// (widen, gather, max, subtract, exp, sum, scale, scatter, narrow).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "convert.h"
#include "cross_entropy.h"
#include "parallel.h"
#include "simd.h"

namespace fastpt {
namespace {

using namespace simd;  // NOLINT: the vector helpers of simd.h

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Row {
  float loss, lse;
};

// Statistics of one float32 row x[0, n) and, with grad, x overwritten by the scaled gradient.
template <class I>
FASTPT_ALWAYS_INLINE Row ce_row(float* x, int64_t n, int64_t y, float scale, float eps, float c, bool grad) {
  using V = typename I::V;
  constexpr int W = I::W;
  const int64_t full = n / W * W;
  V mv = splat<V>(kNegInf);
  for (int64_t j = 0; j < full; j += W) {
    const V v = vload<V>(x + j);
    mv = vselect<I>(v > mv, v, mv);  // NaN never wins: it reaches the sum below instead
  }
  float m = hmax<I>(mv);
  for (int64_t j = full; j < n; ++j) m = x[j] > m ? x[j] : m;
  const float shift = m == kNegInf ? 0.0f : m;  // an all -inf row: lse = -inf, not NaN
  const float zy = x[y];
  // With grad, x keeps exp(x - shift) for the gradient pass (x is a buffer or the row the gradient
  // overwrites): one exp per logit instead of two.
  V sv = V{}, zv = V{};
  for (int64_t j = 0; j < full; j += W) {
    const V v = vload<V>(x + j);
    const V e = vexp<I>(v - shift);
    sv += e;
    zv += v;
    if (grad) vstore<V>(x + j, e);
  }
  float s = hsum<I>(sv), zsum = hsum<I>(zv);
  for (int64_t j = full; j < n; ++j) {
    const float e = std::exp(x[j] - shift);
    s += e;
    zsum += x[j];
    if (grad) x[j] = e;
  }
  const float lse = shift + std::log(s);
  Row r{lse - (1.0f - eps) * zy + c * lse * lse, lse};
  if (eps != 0.0f) r.loss -= eps * zsum / static_cast<float>(n);
  if (grad) {  // softmax = exp(x - shift) / s
    const float a = scale * (1.0f + 2.0f * c * lse) / s, flat = scale * eps / static_cast<float>(n);
    const V av = splat<V>(a), fv = splat<V>(flat);
    for (int64_t j = 0; j < full; j += W) vstore<V>(x + j, vload<V>(x + j) * av - fv);
    for (int64_t j = full; j < n; ++j) x[j] = x[j] * a - flat;
    x[y] -= scale * (1.0f - eps);
  }
  return r;
}

// Rows [r0, r1) of the chunk on instruction set I.
template <class I, int D>
FASTPT_ALWAYS_INLINE void ce_rows(const CEChunkParams& p, int64_t r0, int64_t r1, float* __restrict__ gb) {
  using S = typename Elem<D>::S;
  const int64_t* target = ptr<const int64_t>(p.target);
  const float* grad_scale = ptr<const float>(p.grad_scale);
  const bool grad = grad_scale != nullptr;
  const bool biased = p.bias != 0;
  const bool copy = D != kFloat32 || biased;  // the row goes through a float32 buffer
  std::vector<float> buf(copy ? p.cols : 0), b(biased ? p.cols : 0);
  if (biased) widen<D>(ptr<const S>(p.bias), b.data(), p.cols);
  const float* __restrict__ bv = b.data();
  for (int64_t r = r0; r < r1; ++r) {
    S* row = ptr<S>(p.z) + r * p.ld;
    float* x = reinterpret_cast<float*>(row);
    if (copy) {
      x = buf.data();
      widen<D>(row, x, p.cols);
      if (biased) {
        for (int64_t j = 0; j < p.cols; ++j) x[j] += bv[j];
      }
    }
    const Row out = ce_row<I>(x, p.cols, target[r], grad ? grad_scale[r] : 0.0f, p.smoothing, p.z_coef, grad);
    ptr<float>(p.loss)[r] = out.loss;
    ptr<float>(p.lse)[r] = out.lse;
    if (grad && gb != nullptr) {
      for (int64_t j = 0; j < p.cols; ++j) gb[j] += x[j];
    }
    if (copy && grad) narrow<D>(x, row, p.cols);
  }
}

template <class I>
FASTPT_ALWAYS_INLINE void ce_rows_any(const CEChunkParams& p, int64_t r0, int64_t r1, float* gb) {
  switch (p.dtype) {
    case kFloat32: ce_rows<I, kFloat32>(p, r0, r1, gb); break;
    case kFloat16: ce_rows<I, kFloat16>(p, r0, r1, gb); break;
    default: ce_rows<I, kBFloat16>(p, r0, r1, gb); break;
  }
}

using RowsFn = void (*)(const CEChunkParams&, int64_t, int64_t, float*);

void rows_base(const CEChunkParams& p, int64_t r0, int64_t r1, float* gb) { ce_rows_any<IsaBase>(p, r0, r1, gb); }
#if defined(FASTPT_X86_ISAS)
FASTPT_TARGET_AVX2 void rows_avx2(const CEChunkParams& p, int64_t r0, int64_t r1, float* gb) {
  ce_rows_any<IsaAvx2>(p, r0, r1, gb);
}
FASTPT_TARGET_AVX512 void rows_avx512(const CEChunkParams& p, int64_t r0, int64_t r1, float* gb) {
  ce_rows_any<IsaAvx512>(p, r0, r1, gb);
}
#endif

RowsFn rows_for(int isa) {
  const int best = best_isa();
  if (isa == 0) isa = best;
  require(isa >= 1 && isa <= best, "ce_chunk: isa must be 0 (auto) or 1.." + std::to_string(best) +
                                       " on this CPU, got " + std::to_string(isa));
#if defined(FASTPT_X86_ISAS)
  if (isa == 3) return rows_avx512;
  if (isa == 2) return rows_avx2;
#endif
  return rows_base;
}

}  // namespace

void ce_chunk_cpu(const CEChunkParams& p, int num_threads) {
  require(p.rows >= 0 && p.cols >= 1 && p.ld >= p.cols, "ce_chunk: need rows >= 0, cols >= 1 and ld >= cols");
  require(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
          "ce_chunk: dtype code must be float32, float16 or bfloat16");
  require(p.rows == 0 || (p.z && p.target && p.loss && p.lse), "ce_chunk: null pointer");
  const int64_t* target = ptr<const int64_t>(p.target);
  for (int64_t r = 0; r < p.rows; ++r)
    require(target[r] >= 0 && target[r] < p.cols, "ce_chunk: target " + std::to_string(target[r]) + " of row " +
                                                      std::to_string(r) + " outside [0, " + std::to_string(p.cols) +
                                                      ")");
  const RowsFn rows = rows_for(p.isa);
  // ~64K logits per task: a few tens of microseconds between pool hand-offs
  const int64_t grain = std::max<int64_t>(1, 65536 / p.cols);
  if (p.grad_bias == 0 || p.grad_scale == 0) {
    parallel_for(p.rows, grain, num_threads, [&](int64_t r0, int64_t r1) { rows(p, r0, r1, nullptr); });
    return;
  }
  // the gradient's column sums: one partial per chunk (at most 4 per thread), added in chunk order
  const int64_t chunks = parallel_chunks(p.rows, grain, num_threads);
  std::vector<float> partial(static_cast<size_t>(chunks * p.cols), 0.0f);
  parallel_for_chunks(p.rows, grain, num_threads,
                      [&](int64_t c, int64_t r0, int64_t r1) { rows(p, r0, r1, partial.data() + c * p.cols); });
  float* gb = ptr<float>(p.grad_bias);
  for (int64_t c = 0; c < chunks; ++c) {
    const float* part = partial.data() + c * p.cols;
    for (int64_t j = 0; j < p.cols; ++j) gb[j] += part[j];
  }
}

void bind_cross_entropy(py::module_& m) {
  py::class_<CEChunkParams>(m, "CEChunkParams")
      .def(py::init<>())
      .def_readwrite("z", &CEChunkParams::z)
      .def_readwrite("rows", &CEChunkParams::rows)
      .def_readwrite("cols", &CEChunkParams::cols)
      .def_readwrite("ld", &CEChunkParams::ld)
      .def_readwrite("dtype", &CEChunkParams::dtype)
      .def_readwrite("bias", &CEChunkParams::bias)
      .def_readwrite("target", &CEChunkParams::target)
      .def_readwrite("grad_scale", &CEChunkParams::grad_scale)
      .def_readwrite("grad_bias", &CEChunkParams::grad_bias)
      .def_readwrite("loss", &CEChunkParams::loss)
      .def_readwrite("lse", &CEChunkParams::lse)
      .def_readwrite("smoothing", &CEChunkParams::smoothing)
      .def_readwrite("z_coef", &CEChunkParams::z_coef)
      .def_readwrite("isa", &CEChunkParams::isa);
  m.def("ce_chunk_cpu", &ce_chunk_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row loss / log-sum-exp of a logits chunk and, with grad_scale, its gradient in place.");
}

}  // namespace fastpt
