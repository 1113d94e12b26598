// Counter-based dropout on the CPU (the contract is in dropout.h). One pass over
// the data, no mask tensor: the hash costs one mix32 per element, the rest is a
// load, a multiply and a store, so the loop runs at memory speed once vectorised.
// References: python/fastpt/ops/dropout.py (hidden) and ops/attention.py
// (dropout_keep, attention).
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#include "common.h"
#include "convert.h"
#include "dropout.h"
#include "parallel.h"
#include "rng.h"

namespace fastpt {
namespace {

// keep ? v : +0 on the stored bits: an integer select, which GCC vectorises where a
// floating-point one (whose multiply it would sink into a branch) stays scalar.
template <typename S>
inline S keep_or_zero(bool keep, S v) {
  using U = std::conditional_t<sizeof(S) == 8, uint64_t, std::conditional_t<sizeof(S) == 4, uint32_t, uint16_t>>;
  U u;
  std::memcpy(&u, &v, sizeof(S));
  u &= static_cast<U>(0) - static_cast<U>(keep);
  std::memcpy(&v, &u, sizeof(S));
  return v;
}

// out[c] = keep(c) ? x[c] * scale : 0 for c < n, with bits = rand_bits(rk, col0 + c).
template <int D, typename E = Elem<D>>
FASTPT_VECTOR_CLONES_512 void drop_span(const typename E::S* __restrict__ x, typename E::S* __restrict__ out,
                                        uint32_t n, uint32_t rk, uint32_t col0, uint32_t threshold,
                                        typename E::F scale) {
  for (uint32_t c = 0; c < n; ++c) {
    const bool keep = (rand_bits(rk, col0 + c) >> 8) >= threshold;
    out[c] = keep_or_zero(keep, E::store(E::load(x[c]) * scale));
  }
}

// The same over one query row of whole-row attention: key j is kept only inside the query's
// document d (doc[j] == d), with the hash column its local position local[j].
template <int D, typename E = Elem<D>>
FASTPT_VECTOR_CLONES_512 void drop_doc_span(const typename E::S* __restrict__ x, typename E::S* __restrict__ out,
                                            const int64_t* __restrict__ doc, const int64_t* __restrict__ local,
                                            uint32_t n, int64_t d, uint32_t rk, uint32_t threshold,
                                            typename E::F scale) {
  for (uint32_t j = 0; j < n; ++j) {  // `&`, not `&&`: no branch in the vector loop
    const bool keep = (doc[j] == d) & ((rand_bits(rk, static_cast<uint32_t>(local[j])) >> 8) >= threshold);
    out[j] = keep_or_zero(keep, E::store(E::load(x[j]) * scale));
  }
}

constexpr int kColBits = 16;  // hidden dropout: the flat buffer seen as rows of 2^16 columns
// Elements per chunk at least. One element costs 0.1-0.3 ns (float32 to float16, AVX-512, Zen 5)
// while waking the pool measured ~40 us: 2^17 elements ran 4x slower on 2 threads than on one.
constexpr int64_t kGrain = int64_t{1} << 18;

template <int D>
void dropout_all(uintptr_t x_, uintptr_t out_, int64_t n, uint32_t key, uint32_t threshold, double scale,
                 int threads) {
  using S = typename Elem<D>::S;
  using F = typename Elem<D>::F;
  const S* x = ptr<const S>(x_);
  S* out = ptr<S>(out_);
  parallel_for(n, kGrain, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end;) {  // one segment per 2^16-column row
      const int64_t row = b >> kColBits, e = std::min(end, (row + 1) << kColBits);
      drop_span<D>(x + b, out + b, static_cast<uint32_t>(e - b), row_key(key, static_cast<uint32_t>(row)),
                   static_cast<uint32_t>(b & ((int64_t{1} << kColBits) - 1)), threshold, static_cast<F>(scale));
      b = e;
    }
  });
}

template <int D>
void attention_all(uintptr_t probs, uintptr_t out_, const int64_t* docs, int64_t n, int64_t heads, int64_t length,
                   uint32_t key, uint32_t threshold, double scale, int threads) {
  using S = typename Elem<D>::S;
  using F = typename Elem<D>::F;
  const S* x = ptr<const S>(probs);
  S* out = ptr<S>(out_);
  const int64_t rows = n * heads * length;  // one (document, head, query) per row of `length` keys
  parallel_for(rows, std::max<int64_t>(1, kGrain / length), threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % length, dh = r / length, d = dh / heads, h = dh % heads;
      const uint32_t rk = row_key(key, static_cast<uint32_t>(docs[d] * heads + h));
      drop_span<D>(x + r * length, out + r * length, static_cast<uint32_t>(length),
                   rand_bits(rk, static_cast<uint32_t>(i)), 0u, threshold, static_cast<F>(scale));
    }
  });
}

template <int D>
void rows_all(uintptr_t probs, uintptr_t out_, const int64_t* doc, const int64_t* local, int64_t batch,
              int64_t heads, int64_t length, uint32_t key, uint32_t threshold, double scale, int threads) {
  using S = typename Elem<D>::S;
  using F = typename Elem<D>::F;
  const S* x = ptr<const S>(probs);
  S* out = ptr<S>(out_);
  const int64_t rows = batch * heads * length;  // one (row, head, query) per row of `length` keys
  parallel_for(rows, std::max<int64_t>(1, kGrain / length), threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % length, bh = r / length, b = bh / heads, h = bh % heads;
      const int64_t d = doc[b * length + i];
      if (d < 0) {  // a padding query attends nothing
        std::fill_n(out + r * length, length, S{});
        continue;
      }
      const uint32_t rk = rand_bits(row_key(key, static_cast<uint32_t>(d * heads + h)),
                                    static_cast<uint32_t>(local[b * length + i]));
      drop_doc_span<D>(x + r * length, out + r * length, doc + b * length, local + b * length,
                       static_cast<uint32_t>(length), d, rk, threshold, static_cast<F>(scale));
    }
  });
}

template <typename Fn>
void dispatch_float(int dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(std::integral_constant<int, kFloat32>{}); break;
    case kFloat64: fn(std::integral_constant<int, kFloat64>{}); break;
    case kBFloat16: fn(std::integral_constant<int, kBFloat16>{}); break;
    case kFloat16: fn(std::integral_constant<int, kFloat16>{}); break;
    default:
      throw std::invalid_argument(std::string(op) + ": dtype code must be float32, float64, float16 or bfloat16, got " +
                                  std::to_string(dtype));
  }
}

void check_common(const char* op, uintptr_t in, uintptr_t out, int64_t bytes, uint32_t threshold) {
  const std::string o(op);
  require(in && out, o + ": null input or output pointer");
  // The loops read and write with __restrict__: the buffers must not overlap.
  require(in + bytes <= out || out + bytes <= in, o + ": input and output overlap");
  require(threshold <= (1u << 24), o + ": threshold24 above 2^24");
}

int elem_size(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

}  // namespace

void dropout_cpu(uintptr_t x, uintptr_t out, int64_t n, int dtype, uint32_t key, uint32_t threshold24, double scale,
                 int num_threads) {
  require(n >= 0, "dropout: negative size");
  require(n < (int64_t{1} << 48), "dropout: more than 2^48 elements (the row index is 32 bits)");
  if (n == 0) return;
  dispatch_float(dtype, "dropout", [&](auto d) {
    check_common("dropout", x, out, n * elem_size(d), threshold24);
    dropout_all<decltype(d)::value>(x, out, n, key, threshold24, scale, num_threads);
  });
}

void attention_dropout_cpu(uintptr_t probs, uintptr_t out, uintptr_t doc_ids, int64_t n, int64_t heads,
                           int64_t length, int dtype, uint32_t key, uint32_t threshold24, double scale,
                           int num_threads) {
  require(n >= 0 && heads >= 0 && length >= 0, "attention_dropout: negative shape");
  if (n == 0 || heads == 0 || length == 0) return;
  require(doc_ids, "attention_dropout: null doc_ids pointer");
  require(length < (int64_t{1} << 31) && heads < (int64_t{1} << 31), "attention_dropout: heads or length >= 2^31");
  require(length <= (int64_t{1} << 59) / length / heads / n, "attention_dropout: shape overflows 64-bit byte sizes");
  const int64_t* docs = ptr<const int64_t>(doc_ids);
  for (int64_t d = 0; d < n; ++d) {
    require(docs[d] >= 0 && docs[d] < (int64_t{1} << 32) / heads,
            "attention_dropout: doc_ids[" + std::to_string(d) + "] = " + std::to_string(docs[d]) +
                " outside [0, 2^32 / heads)");
  }
  dispatch_float(dtype, "attention_dropout", [&](auto d) {
    check_common("attention_dropout", probs, out, n * heads * length * length * elem_size(d), threshold24);
    attention_all<decltype(d)::value>(probs, out, docs, n, heads, length, key, threshold24, scale, num_threads);
  });
}

void attention_dropout_rows_cpu(uintptr_t probs, uintptr_t out, uintptr_t doc, uintptr_t local, int64_t batch,
                                int64_t heads, int64_t length, int dtype, uint32_t key, uint32_t threshold24,
                                double scale, int num_threads) {
  const std::string op = "attention_dropout_rows";
  require(batch >= 0 && heads >= 0 && length >= 0, op + ": negative shape");
  if (batch == 0 || heads == 0 || length == 0) return;
  require(doc && local, op + ": null doc or local pointer");
  require(length < (int64_t{1} << 31) && heads < (int64_t{1} << 31), op + ": heads or length >= 2^31");
  require(length <= (int64_t{1} << 59) / length / heads / batch, op + ": shape overflows 64-bit byte sizes");
  const int64_t* docs = ptr<const int64_t>(doc);
  const int64_t* locals = ptr<const int64_t>(local);
  const int64_t doc_end = (int64_t{1} << 32) / heads;  // d * H + h must fit the 32-bit hash input
  for (int64_t t = 0; t < batch * length; ++t) {
    const int64_t d = docs[t], l = locals[t];
    if (d >= -1 && d < doc_end && (d < 0 || (l >= 0 && l < length))) continue;
    const std::string at = "[" + std::to_string(t / length) + ", " + std::to_string(t % length) + "] = ";
    require(d >= -1 && d < doc_end, op + ": doc" + at + std::to_string(d) + " outside [-1, 2^32 / heads)");
    require(false, op + ": local" + at + std::to_string(l) + " outside [0, length) (doc " + std::to_string(d) + ")");
  }
  dispatch_float(dtype, op.c_str(), [&](auto d) {
    check_common(op.c_str(), probs, out, batch * heads * length * length * elem_size(d), threshold24);
    rows_all<decltype(d)::value>(probs, out, docs, locals, batch, heads, length, key, threshold24, scale,
                                 num_threads);
  });
}

void bind_dropout(py::module_& m) {
  m.def("dropout_cpu", &dropout_cpu, py::arg("x"), py::arg("out"), py::arg("n"), py::arg("dtype"), py::arg("key"),
        py::arg("threshold24"), py::arg("scale"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "out = keep ? x * scale : 0 over n contiguous elements (csrc/dropout.h has the mask formula).");
  m.def("attention_dropout_cpu", &attention_dropout_cpu, py::arg("probs"), py::arg("out"), py::arg("doc_ids"),
        py::arg("n"), py::arg("heads"), py::arg("length"), py::arg("dtype"), py::arg("key"), py::arg("threshold24"),
        py::arg("scale"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "Dropout of dense (n, H, L, L) attention probabilities (csrc/dropout.h has the mask formula).");
  m.def("attention_dropout_rows_cpu", &attention_dropout_rows_cpu, py::arg("probs"), py::arg("out"), py::arg("doc"),
        py::arg("local"), py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("dtype"), py::arg("key"),
        py::arg("threshold24"), py::arg("scale"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
        "Dropout of whole-row (B, H, S, S) attention probabilities of packed documents (csrc/dropout.h).");
}

}  // namespace fastpt
