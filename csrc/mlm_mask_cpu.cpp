// BERT/RoBERTa MLM masking on the CPU: one pass over the ids, OpenMP over rows.
// The decisions follow python/fastpt/ops/mlm_mask.py (reference) exactly.
#include <cstring>

#include "common.h"
#include "masking.h"
#include "rng.h"

namespace fastpt {
namespace {

// One row. Branch-free so that the column loop vectorises (AVX2 clone on x86).
template <typename T, typename W>
FASTPT_VECTOR_CLONES void mlm_row(const MLMParams& p, int64_t r) {
  const int64_t S = p.cols;
  const T* ids = ptr<const T>(p.ids) + r * S;
  T* out = ptr<T>(p.out) + r * S;
  int64_t* labels = ptr<int64_t>(p.labels) + r * S;
  const uint8_t* blocked = p.blocked ? ptr<const uint8_t>(p.blocked) + r * S : nullptr;
  const W* words = p.word_ids ? ptr<const W>(p.word_ids) + r * S : nullptr;
  const int64_t* special = ptr<const int64_t>(p.special_ids);
  const uint32_t rk_sel = row_key(p.key_select, static_cast<uint32_t>(r));
  const uint32_t rk_act = row_key(p.key_action, static_cast<uint32_t>(r));
  const uint32_t rk_tok = row_key(p.key_token, static_cast<uint32_t>(r));
  const T mask_id = static_cast<T>(p.mask_token_id);
  const uint32_t vocab = static_cast<uint32_t>(p.vocab_size);
  for (int64_t c = 0; c < S; ++c) {
    const T tok = ids[c];
    bool eligible = blocked ? blocked[c] == 0 : true;
    for (int s = 0; s < p.n_special; ++s) eligible &= static_cast<int64_t>(tok) != special[s];
    uint32_t sel_col = static_cast<uint32_t>(c);
    if (words) {
      const int64_t w = static_cast<int64_t>(words[c]);
      eligible &= w >= 0;
      sel_col = static_cast<uint32_t>(w);
    }
    const bool selected = eligible && bernoulli24(rand_bits(rk_sel, sel_col), p.t_select);
    const uint32_t a = rand_bits(rk_act, static_cast<uint32_t>(c)) >> 8;
    const T rnd = static_cast<T>(uniform_int(rand_bits(rk_tok, static_cast<uint32_t>(c)), vocab));
    const T replaced = a < p.t_mask ? mask_id : (a < p.t_random ? rnd : tok);
    out[c] = selected ? replaced : tok;
    labels[c] = selected ? static_cast<int64_t>(tok) : int64_t{-100};
  }
}

template <typename T, typename W>
void mlm_all(const MLMParams& p, int num_threads) {
#if defined(FASTPT_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t r = 0; r < p.rows; ++r) mlm_row<T, W>(p, r);
}

}  // namespace

static void mlm_mask_cpu(const MLMParams& p, int num_threads) {
  require(p.rows >= 0 && p.cols >= 0, "mlm_mask: negative shape");
  if (p.rows == 0 || p.cols == 0) return;
  require(p.ids && p.out && p.labels, "mlm_mask: null output or input pointer");
  require(p.n_special >= 0 && (p.n_special == 0 || p.special_ids), "mlm_mask: bad special_ids");
  require(p.vocab_size > 0 && p.vocab_size <= 0xFFFFFFFFLL, "mlm_mask: vocab_size out of range");
  dispatch_index(p.id_dtype, "input_ids", [&](auto t) {
    using T = decltype(t);
    if (p.word_ids) {
      dispatch_index(p.word_dtype, "word_ids", [&](auto w) { mlm_all<T, decltype(w)>(p, num_threads); });
    } else {
      mlm_all<T, int32_t>(p, num_threads);
    }
  });
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
