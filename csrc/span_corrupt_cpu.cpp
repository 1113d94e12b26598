// T5 span corruption on the CPU, rows split over the thread pool (csrc/parallel.h). The plan (valid length, noise
// tokens and noise spans per row) is made on the host in Python; this file only
// places the spans and writes the outputs, following
// python/fastpt/ops/span_corrupt.py (reference) bit for bit.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "rng.h"

namespace fastpt {

// Plain data, pointers as integers (see DESIGN.md: no torch headers). CPU only, so it
// lives here rather than in masking.h beside the structs shared with CUDA.
struct SpanCorruptParams {
  uintptr_t ids = 0;        // (rows, cols) input ids, int32 or int64 (id_dtype), row-major contiguous
  uintptr_t inputs = 0;     // (rows, in_width) output, same dtype
  uintptr_t targets = 0;    // (rows, tgt_width) output, same dtype
  uintptr_t lengths = 0;    // (rows,) int64 valid length of each row
  uintptr_t num_noise = 0;  // (rows,) int64 noise tokens per row
  uintptr_t num_spans = 0;  // (rows,) int64 noise spans per row (0 when lengths < 2)
  uintptr_t row_ids = 0;    // (rows,) int64 row index each row draws its random bits with
  int64_t rows = 0, cols = 0, in_width = 0, tgt_width = 0;
  int id_dtype = 1;
  uint32_t key_noise = 0, key_keep = 0;  // stream keys (STREAM_SPAN_NOISE, STREAM_SPAN_KEEP)
  int64_t sentinel_start_id = 0, eos_id = 0, pad_id = 0;
};

namespace {

// The k-1 cut points of n items into k nonempty spans, ascending, written to cuts:
// the positions 1..n-1 with the smallest (bits, pos) pairs. Packing bits into the high
// and pos into the low half makes one uint64 comparison the lexicographic order, and
// nth_element selects them in O(n) instead of sorting all n.
//
// The bits are uniform, so the k-1 smallest nearly always lie below a threshold that
// expects a few more than k-1 positions: only those enter the selection (written
// branch-free), and in the rare case that fewer pass, all positions do. Either way the
// selected set is exactly the k-1 smallest pairs.
void select_cuts(uint32_t rkey, int64_t n, int64_t k, std::vector<uint64_t>& buf, std::vector<uint32_t>& cuts) {
  cuts.clear();
  if (k <= 1) return;
  const uint64_t m = static_cast<uint64_t>(n - 1), need = static_cast<uint64_t>(k - 1);
  buf.resize(m);
  // Expect need/4 + 16 spare candidates: at least ~3 standard deviations, so under 1e-3 of rows fall back.
  const uint64_t want = need + need / 4 + 16;
  const uint64_t bound = want >= m ? (uint64_t{1} << 32) : (want << 32) / m;
  uint64_t c = 0;
  for (uint64_t p = 1; p <= m; ++p) {
    const uint64_t h = rand_bits(rkey, static_cast<uint32_t>(p));
    buf[c] = (h << 32) | p;
    c += h < bound;
  }
  if (c < need) {
    for (uint64_t p = 1; p <= m; ++p) buf[p - 1] = (uint64_t{rand_bits(rkey, static_cast<uint32_t>(p))} << 32) | p;
    c = m;
  }
  if (need < c) std::nth_element(buf.begin(), buf.begin() + static_cast<int64_t>(need - 1), buf.begin() + c);
  for (uint64_t i = 0; i < need; ++i) cuts.push_back(static_cast<uint32_t>(buf[i]));
  std::sort(cuts.begin(), cuts.end());
}

struct RowScratch {
  std::vector<uint64_t> buf;
  std::vector<uint32_t> keep_cuts, noise_cuts;
};

template <typename T>
void span_row(const SpanCorruptParams& p, int64_t r, RowScratch& s) {
  const int64_t L = ptr<const int64_t>(p.lengths)[r];
  const int64_t n_noise = ptr<const int64_t>(p.num_noise)[r];
  const int64_t k = ptr<const int64_t>(p.num_spans)[r];
  const uint32_t row = static_cast<uint32_t>(ptr<const int64_t>(p.row_ids)[r]);
  const T* src = ptr<const T>(p.ids) + r * p.cols;
  T* in = ptr<T>(p.inputs) + r * p.in_width;
  T* tg = ptr<T>(p.targets) + r * p.tgt_width;
  int64_t a = 0, b = 0;  // write positions in inputs / targets
  if (k == 0) {
    if (L > 0) std::memcpy(in, src, static_cast<size_t>(L) * sizeof(T));
    a = L;
  } else {
    const int64_t n_keep = L - n_noise;
    select_cuts(row_key(p.key_keep, row), n_keep, k, s.buf, s.keep_cuts);
    select_cuts(row_key(p.key_noise, row), n_noise, k, s.buf, s.noise_cuts);
    int64_t t = 0, keep_at = 0, noise_at = 0;  // read position; items consumed in each domain
    for (int64_t j = 0; j < k; ++j) {
      const int64_t keep_end = j + 1 < k ? s.keep_cuts[j] : n_keep;
      const int64_t noise_end = j + 1 < k ? s.noise_cuts[j] : n_noise;
      const int64_t nk = keep_end - keep_at, nn = noise_end - noise_at;
      std::memcpy(in + a, src + t, static_cast<size_t>(nk) * sizeof(T));
      a += nk;
      t += nk;
      const T sentinel = static_cast<T>(p.sentinel_start_id - j);
      in[a++] = sentinel;
      tg[b++] = sentinel;
      std::memcpy(tg + b, src + t, static_cast<size_t>(nn) * sizeof(T));
      b += nn;
      t += nn;
      keep_at = keep_end;
      noise_at = noise_end;
    }
  }
  in[a++] = static_cast<T>(p.eos_id);
  tg[b++] = static_cast<T>(p.eos_id);
  std::fill(in + a, in + p.in_width, static_cast<T>(p.pad_id));
  std::fill(tg + b, tg + p.tgt_width, static_cast<T>(p.pad_id));
}

template <typename T>
void span_all(const SpanCorruptParams& p, int num_threads) {
  // Rows differ in length (ragged batches): parallel_for hands out chunks of 8 rows dynamically.
  parallel_for(p.rows, 8, num_threads, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t r = begin; r < end; ++r) span_row<T>(p, r, scratch);
  });
}

// Everything the row loop indexes, checked before it starts (no throwing inside the worker threads).
void check_plan(const SpanCorruptParams& p) {
  require(p.rows >= 0 && p.cols >= 0 && p.in_width >= 0 && p.tgt_width >= 0, "span_corrupt: negative shape");
  if (p.rows == 0) return;
  // An empty (rows, 0) id tensor may have no storage; every row then only gets EOS.
  require((p.ids || p.cols == 0) && p.inputs && p.targets && p.lengths && p.num_noise && p.num_spans && p.row_ids,
          "span_corrupt: null pointer");
  require(p.cols < (int64_t{1} << 32), "span_corrupt: rows longer than 2**32 - 1");
  const int64_t* len = ptr<const int64_t>(p.lengths);
  const int64_t* noise = ptr<const int64_t>(p.num_noise);
  const int64_t* spans = ptr<const int64_t>(p.num_spans);
  const int64_t* row_ids = ptr<const int64_t>(p.row_ids);
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t L = len[r], n = noise[r], k = spans[r];
    const std::string at = " at row " + std::to_string(r);
    require(L >= 0 && L <= p.cols, "span_corrupt: length out of [0, cols]" + at);
    require(row_ids[r] >= 0 && row_ids[r] <= 0xFFFFFFFFLL, "span_corrupt: row id out of [0, 2**32)" + at);
    if (k == 0) {
      require(n == 0, "span_corrupt: noise without spans" + at);
    } else {
      require(n >= 1 && n < L && k >= 1 && k <= n && k <= L - n, "span_corrupt: inconsistent noise plan" + at);
      require(p.sentinel_start_id - k + 1 >= 0, "span_corrupt: sentinel ids below 0" + at);
    }
    require(L - n + k + 1 <= p.in_width && n + k + 1 <= p.tgt_width, "span_corrupt: outputs too narrow" + at);
  }
}

}  // namespace

static void span_corrupt_cpu(const SpanCorruptParams& p, int num_threads) {
  check_plan(p);
  if (p.rows == 0) return;
  dispatch_index(p.id_dtype, "input_ids", [&](auto t) { span_all<decltype(t)>(p, num_threads); });
}

void bind_span_corrupt(py::module_& m) {
  py::class_<SpanCorruptParams>(m, "SpanCorruptParams")
      .def(py::init<>())
      .def_readwrite("ids", &SpanCorruptParams::ids)
      .def_readwrite("inputs", &SpanCorruptParams::inputs)
      .def_readwrite("targets", &SpanCorruptParams::targets)
      .def_readwrite("lengths", &SpanCorruptParams::lengths)
      .def_readwrite("num_noise", &SpanCorruptParams::num_noise)
      .def_readwrite("num_spans", &SpanCorruptParams::num_spans)
      .def_readwrite("row_ids", &SpanCorruptParams::row_ids)
      .def_readwrite("rows", &SpanCorruptParams::rows)
      .def_readwrite("cols", &SpanCorruptParams::cols)
      .def_readwrite("in_width", &SpanCorruptParams::in_width)
      .def_readwrite("tgt_width", &SpanCorruptParams::tgt_width)
      .def_readwrite("id_dtype", &SpanCorruptParams::id_dtype)
      .def_readwrite("key_noise", &SpanCorruptParams::key_noise)
      .def_readwrite("key_keep", &SpanCorruptParams::key_keep)
      .def_readwrite("sentinel_start_id", &SpanCorruptParams::sentinel_start_id)
      .def_readwrite("eos_id", &SpanCorruptParams::eos_id)
      .def_readwrite("pad_id", &SpanCorruptParams::pad_id);
  m.def("span_corrupt_cpu", &span_corrupt_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace fastpt
