// BERT/RoBERTa MLM masking on the CPU: one pass over the ids, rows split over threads.
// The decisions follow python/fastpt/ops/mlm_mask.py (reference) exactly.
#include <algorithm>
#include <atomic>

#include "common.h"
#include "masking.h"
#include "parallel.h"
#include "rng.h"

namespace fastpt {
namespace {

// Special ids are compared against a fixed-size list (padded by repeating an
// id) so that the compare loop unrolls and the column loop stays branch-free.
constexpr int kSpecialSlots = 8;

// One row. Every input variant is a template parameter, so the column loop has
// no control flow and vectorises (AVX2 clone on x86-64): all three hashes are
// computed for every token, which costs less than branching on the selection.
template <typename T, typename W, bool kBlocked, bool kWords, int kSpecial>
// Returns whether the row holds an id outside [0, vocab_size): checking here
// costs one compare per token instead of a separate pass over the batch.
FASTPT_VECTOR_CLONES bool mlm_row(const MLMParams& p, const T* special, int64_t r) {
  const uint32_t S = static_cast<uint32_t>(p.cols);
  const T* __restrict__ ids = ptr<const T>(p.ids) + r * p.cols;
  T* __restrict__ out = ptr<T>(p.out) + r * p.cols;
  int64_t* __restrict__ labels = ptr<int64_t>(p.labels) + r * p.cols;
  const uint8_t* __restrict__ blocked = kBlocked ? ptr<const uint8_t>(p.blocked) + r * p.cols : nullptr;
  const W* __restrict__ words = kWords ? ptr<const W>(p.word_ids) + r * p.cols : nullptr;
  const uint32_t rk_sel = row_key(p.key_select, static_cast<uint32_t>(r));
  const uint32_t rk_act = row_key(p.key_action, static_cast<uint32_t>(r));
  const uint32_t rk_tok = row_key(p.key_token, static_cast<uint32_t>(r));
  const uint32_t t_select = p.t_select, t_mask = p.t_mask, t_random = p.t_random;
  const T mask_id = static_cast<T>(p.mask_token_id);
  const uint32_t vocab = static_cast<uint32_t>(p.vocab_size);
  T sp[kSpecial > 0 ? kSpecial : 1];
  for (int s = 0; s < kSpecial; ++s) sp[s] = special[s];
  // Read every parameter into a local first: the stores below could alias `p`
  // as far as the compiler knows, and a reload inside the loop blocks vectorising.
  const uint64_t vocab64 = static_cast<uint64_t>(p.vocab_size);
  uint32_t bad = 0;
  for (uint32_t c = 0; c < S; ++c) {
    const T tok = ids[c];
    bad |= static_cast<uint64_t>(static_cast<int64_t>(tok)) >= vocab64;
    bool eligible = true;
    if constexpr (kBlocked) eligible &= blocked[c] == 0;
    for (int s = 0; s < kSpecial; ++s) eligible &= tok != sp[s];
    uint32_t sel_col = c;
    if constexpr (kWords) {
      eligible &= words[c] >= 0;
      sel_col = static_cast<uint32_t>(words[c]);
    }
    const bool selected = eligible & ((rand_bits(rk_sel, sel_col) >> 8) < t_select);
    const uint32_t a = rand_bits(rk_act, c) >> 8;
    const T rnd = static_cast<T>(uniform_int(rand_bits(rk_tok, c), vocab));
    const T replaced = a < t_mask ? mask_id : (a < t_random ? rnd : tok);
    out[c] = selected ? replaced : tok;
    labels[c] = selected ? static_cast<int64_t>(tok) : int64_t{-100};
  }
  return bad != 0;
}

template <typename T, typename W, bool kBlocked, bool kWords>
bool mlm_all(const MLMParams& p, int num_threads) {
  // Padding the list with repeats of its first id changes nothing: a token
  // equal to a repeat equals the first id too.
  T special[kSpecialSlots];
  const int64_t* given = ptr<const int64_t>(p.special_ids);
  for (int s = 0; s < kSpecialSlots; ++s) special[s] = p.n_special ? static_cast<T>(given[s < p.n_special ? s : 0]) : T{0};
  const bool none = p.n_special == 0;
  std::atomic<bool> bad{false};
  // ~2 ns per token: chunks of at least 16k tokens keep the pool's wake-up cost small.
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(p.cols, 1)), num_threads,
               [&](int64_t begin, int64_t end) {
                 bool chunk_bad = false;
                 for (int64_t r = begin; r < end; ++r) {
                   chunk_bad |= none ? mlm_row<T, W, kBlocked, kWords, 0>(p, special, r)
                                     : mlm_row<T, W, kBlocked, kWords, kSpecialSlots>(p, special, r);
                 }
                 if (chunk_bad) bad.store(true, std::memory_order_relaxed);
               });
  return bad.load();
}

template <typename T, typename W>
bool mlm_dispatch_flags(const MLMParams& p, int num_threads) {
  if (p.blocked) {
    return p.word_ids ? mlm_all<T, W, true, true>(p, num_threads) : mlm_all<T, W, true, false>(p, num_threads);
  }
  return p.word_ids ? mlm_all<T, W, false, true>(p, num_threads) : mlm_all<T, W, false, false>(p, num_threads);
}

}  // namespace

// Returns false when an id lies outside [0, vocab_size): the outputs are then
// meaningless and the Python layer raises an error naming input_ids.
static bool mlm_mask_cpu(const MLMParams& p, int num_threads) {
  require(p.rows >= 0 && p.cols >= 0, "mlm_mask: negative shape");
  if (p.rows == 0 || p.cols == 0) return true;
  require(p.ids && p.out && p.labels, "mlm_mask: null output or input pointer");
  require(p.n_special >= 0 && p.n_special <= kSpecialSlots && (p.n_special == 0 || p.special_ids),
          "mlm_mask: at most 8 special ids reach the CPU kernel (more are folded into the blocked mask)");
  require(p.cols < (int64_t{1} << 32), "mlm_mask: rows longer than 2^32 tokens");
  require(p.vocab_size > 0 && p.vocab_size <= 0xFFFFFFFFLL, "mlm_mask: vocab_size out of range");
  bool bad = false;
  dispatch_index(p.id_dtype, "input_ids", [&](auto t) {
    using T = decltype(t);
    if (p.word_ids) {
      dispatch_index(p.word_dtype, "word_ids", [&](auto w) { bad = mlm_dispatch_flags<T, decltype(w)>(p, num_threads); });
    } else {
      bad = mlm_dispatch_flags<T, int32_t>(p, num_threads);
    }
  });
  return !bad;
}

void bind_mlm_mask(py::module_& m) {
  py::class_<MLMParams>(m, "MLMParams")
      .def(py::init<>())
      .def_readwrite("ids", &MLMParams::ids)
      .def_readwrite("out", &MLMParams::out)
      .def_readwrite("labels", &MLMParams::labels)
      .def_readwrite("blocked", &MLMParams::blocked)
      .def_readwrite("word_ids", &MLMParams::word_ids)
      .def_readwrite("special_ids", &MLMParams::special_ids)
      .def_readwrite("rows", &MLMParams::rows)
      .def_readwrite("cols", &MLMParams::cols)
      .def_readwrite("id_dtype", &MLMParams::id_dtype)
      .def_readwrite("word_dtype", &MLMParams::word_dtype)
      .def_readwrite("n_special", &MLMParams::n_special)
      .def_readwrite("key_select", &MLMParams::key_select)
      .def_readwrite("key_action", &MLMParams::key_action)
      .def_readwrite("key_token", &MLMParams::key_token)
      .def_readwrite("t_select", &MLMParams::t_select)
      .def_readwrite("t_mask", &MLMParams::t_mask)
      .def_readwrite("t_random", &MLMParams::t_random)
      .def_readwrite("mask_token_id", &MLMParams::mask_token_id)
      .def_readwrite("vocab_size", &MLMParams::vocab_size);
  m.def("mlm_mask_cpu", &mlm_mask_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
#if defined(FASTPT_WITH_CUDA)
  m.def(
      "mlm_mask_cuda", [](const MLMParams& p, uintptr_t stream) { check_cuda(mlm_mask_cuda(p, stream), "mlm_mask"); },
      py::arg("params"), py::arg("stream"));
#endif
}

}  // namespace fastpt
