// MAE random patch masking and BEiT block-wise masking on the CPU, rows split over the thread pool (csrc/parallel.h).
// The decisions follow python/fastpt/ops/random_masking.py (reference) exactly:
//   h(b, l) = rand_bits(row_key(key, b), l); a row keeps the K positions with the
//   smallest h. mix32 is a bijection, so the h of one row are distinct (no ties) and an
//   O(L) selection (std::nth_element) of the K-th smallest h gives the exact kept set
//   without sorting the row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "masking.h"
#include "parallel.h"
#include "rng.h"

namespace fastpt {

// BEiT block-wise masking of rows laid out as (height, width) patch grids. Outputs as in
// RandomMaskingParams. Only the CPU implements it (the loop is sequential per row).
struct BlockMaskingParams {
  uintptr_t ids_keep = 0;      // (rows, keep) int64, ascending positions kept
  uintptr_t mask = 0;          // (rows, height * width) uint8 (torch.bool): 1 = masked
  uintptr_t ids_restore = 0;   // (rows, height * width) int64
  uintptr_t aspect_table = 0;  // (aspect_table_size,) float64 aspect ratios, computed on the host
  int64_t rows = 0, height = 0, width = 0, keep = 0;
  int64_t min_block_patches = 4;
  int64_t aspect_table_size = 0;  // a power of two <= 2^32
  uint32_t key_block = 0;         // stream of the rectangle draws
  uint32_t key_fill = 0;          // stream that picks the top-up patches
};

namespace {

// Waking a pool thread costs a few microseconds: a row costs ~10 ns per patch, so hand
// out chunks of at least ~4096 patches (~40 us of work).
constexpr int64_t kPatchesPerChunk = 4096;

int64_t rows_per_chunk(int64_t patches) { return std::max<int64_t>(1, kPatchesPerChunk / std::max<int64_t>(patches, 1)); }

// The selection key h of position l in a row (distinct within a row: mix32 is a bijection).
inline uint32_t select_key(uint32_t rkey, int64_t l) { return rand_bits(rkey, static_cast<uint32_t>(l)); }

FASTPT_VECTOR_CLONES void fill_keys(uint32_t* keys, uint32_t rkey, int64_t L) {
  for (int64_t l = 0; l < L; ++l) keys[l] = select_key(rkey, l);
}

FASTPT_VECTOR_CLONES void mask_above(uint8_t* mask, uint32_t rkey, int64_t L, uint32_t threshold) {
  for (int64_t l = 0; l < L; ++l) mask[l] = select_key(rkey, l) > threshold;
}

// Writes ids_keep / ids_restore of one row from its mask (1 = masked, exactly L - K ones).
void write_indices(const uint8_t* mask, int64_t L, int64_t K, int64_t* ids_keep, int64_t* ids_restore) {
  int64_t kept = 0, masked = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (mask[l]) {
      ids_restore[l] = K + masked++;
    } else {
      ids_keep[kept] = l;
      ids_restore[l] = kept++;
    }
  }
}

// Marks kept positions (0) and masked ones (1) of one row: keep the K smallest keys.
// keys is scratch of length L.
void random_row(uint32_t rkey, int64_t L, int64_t K, uint32_t* keys, uint8_t* mask) {
  fill_keys(keys, rkey, L);
  uint32_t threshold = ~uint32_t{0};  // K == L keeps everything
  if (K < L) {
    std::nth_element(keys, keys + (K - 1), keys + L);
    threshold = keys[K - 1];
  }
  // The selection permuted keys; recomputing the hashes is cheaper than keeping a copy.
  mask_above(mask, rkey, L, threshold);
}

void random_masking_cpu(const RandomMaskingParams& p, int num_threads) {
  require(p.rows >= 0 && p.num_patches >= 1 && p.num_patches <= 0x7FFFFFFFLL, "random_masking: bad shape");
  require(p.keep >= 1 && p.keep <= p.num_patches, "random_masking: keep must lie in [1, num_patches]");
  require(p.ids_keep && p.mask && p.ids_restore, "random_masking: null output pointer");
  const int64_t L = p.num_patches, K = p.keep;
  parallel_for(p.rows, rows_per_chunk(L), num_threads, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(static_cast<size_t>(L));
    for (int64_t b = begin; b < end; ++b) {
      uint8_t* mask = ptr<uint8_t>(p.mask) + b * L;
      random_row(row_key(p.key, static_cast<uint32_t>(b)), L, K, keys.data(), mask);
      write_indices(mask, L, K, ptr<int64_t>(p.ids_keep) + b * K, ptr<int64_t>(p.ids_restore) + b * L);
    }
  });
}

// One row of BEiT's MaskingGenerator (beit/masking_generator.py) with counter-based draws:
// draw d of row b is rand_bits(row_key(key_block, b), d). Every attempt consumes exactly four
// draws (area, aspect, top, left) whether or not the rectangle fits, so the counter never
// depends on branch order. The floating-point steps are exact or correctly rounded IEEE
// operations (see random_masking.py) so Python and C++ take identical decisions:
//   area = min + (remaining - min) * u      exact: u has 24 bits and |integers| < 2^24, so a
//                                            fused multiply-add (aarch64) cannot change it
//   h = nearbyint(sqrt(area * aspect))       one rounding each; nearbyint rounds half to even
//   w = nearbyint(sqrt(area / aspect))       like Python's round()
// Returns the number of masked patches (<= target).
int64_t block_rectangles(const BlockMaskingParams& p, uint32_t rkey, int64_t target, uint8_t* mask) {
  const int64_t H = p.height, W = p.width, m = p.min_block_patches;
  const double* aspect = ptr<const double>(p.aspect_table);
  const int shift = 32 - __builtin_ctzll(static_cast<unsigned long long>(p.aspect_table_size));
  uint32_t draw = 0;
  int64_t count = 0;
  while (count < target) {
    const int64_t remaining = target - count;
    int64_t delta = 0;
    for (int attempt = 0; attempt < 10 && delta == 0; ++attempt) {
      const double u = static_cast<double>(rand_bits(rkey, draw) >> 8) * 0x1p-24;
      const uint32_t a_bits = rand_bits(rkey, draw + 1);
      const uint32_t top_bits = rand_bits(rkey, draw + 2), left_bits = rand_bits(rkey, draw + 3);
      draw += 4;
      const double area = static_cast<double>(m) + static_cast<double>(remaining - m) * u;
      const double ar = aspect[shift >= 32 ? 0 : (a_bits >> shift)];
      const double ha = area * ar, wa = area / ar;  // separate statements: no contraction into sqrt arguments
      const int64_t h = static_cast<int64_t>(std::nearbyint(std::sqrt(ha)));
      const int64_t w = static_cast<int64_t>(std::nearbyint(std::sqrt(wa)));
      if (!(w < W && h < H)) continue;  // BEiT's strict bound: a block never spans a whole side
      const int64_t top = uniform_int(top_bits, static_cast<uint32_t>(H - h + 1));
      const int64_t left = uniform_int(left_bits, static_cast<uint32_t>(W - w + 1));
      int64_t fresh = 0;
      for (int64_t i = top; i < top + h; ++i)
        for (int64_t j = left; j < left + w; ++j) fresh += mask[i * W + j] == 0;
      if (fresh > 0 && fresh <= remaining) {
        for (int64_t i = top; i < top + h; ++i)
          for (int64_t j = left; j < left + w; ++j) mask[i * W + j] = 1;
        delta = fresh;
      }
    }
    if (delta == 0) break;  // ten failed attempts: BEiT gives up here
    count += delta;
  }
  return count;
}

void block_masking_cpu(const BlockMaskingParams& p, int num_threads) {
  // The 2^24 bounds keep the area computation exact (see block_rectangles).
  require(p.rows >= 0 && p.height >= 1 && p.width >= 1 && p.height * p.width <= (int64_t{1} << 24),
          "block_masking: bad shape (height * width must lie in [1, 2^24])");
  const int64_t L = p.height * p.width, K = p.keep;
  require(K >= 1 && K <= L, "block_masking: keep must lie in [1, height * width]");
  require(p.min_block_patches >= 1 && p.min_block_patches <= L, "block_masking: min_block_patches must lie in [1, height * width]");
  require(p.aspect_table && p.aspect_table_size >= 1 && p.aspect_table_size <= (int64_t{1} << 32) &&
              (p.aspect_table_size & (p.aspect_table_size - 1)) == 0,
          "block_masking: aspect_table size must be a power of two <= 2^32");
  require(p.ids_keep && p.mask && p.ids_restore, "block_masking: null output pointer");
  const int64_t target = L - K;
  parallel_for(p.rows, rows_per_chunk(L), num_threads, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(static_cast<size_t>(L));
    for (int64_t b = begin; b < end; ++b) {
      uint8_t* mask = ptr<uint8_t>(p.mask) + b * L;
      std::memset(mask, 0, static_cast<size_t>(L));
      const int64_t covered = block_rectangles(p, row_key(p.key_block, static_cast<uint32_t>(b)), target, mask);
      const int64_t need = target - covered;
      if (need > 0) {
        // Top up with the `need` unmasked positions of smallest h: a uniform random subset.
        const uint32_t rkey = row_key(p.key_fill, static_cast<uint32_t>(b));
        int64_t n = 0;
        for (int64_t l = 0; l < L; ++l)
          if (!mask[l]) keys[n++] = select_key(rkey, l);
        std::nth_element(keys.data(), keys.data() + (need - 1), keys.data() + n);
        const uint32_t threshold = keys[need - 1];
        for (int64_t l = 0; l < L; ++l)
          if (!mask[l] && select_key(rkey, l) <= threshold) mask[l] = 1;
      }
      write_indices(mask, L, K, ptr<int64_t>(p.ids_keep) + b * K, ptr<int64_t>(p.ids_restore) + b * L);
    }
  });
}

}  // namespace

void bind_random_masking(py::module_& m) {
  py::class_<RandomMaskingParams>(m, "RandomMaskingParams")
      .def(py::init<>())
      .def_readwrite("ids_keep", &RandomMaskingParams::ids_keep)
      .def_readwrite("mask", &RandomMaskingParams::mask)
      .def_readwrite("ids_restore", &RandomMaskingParams::ids_restore)
      .def_readwrite("rows", &RandomMaskingParams::rows)
      .def_readwrite("num_patches", &RandomMaskingParams::num_patches)
      .def_readwrite("keep", &RandomMaskingParams::keep)
      .def_readwrite("key", &RandomMaskingParams::key);
  py::class_<BlockMaskingParams>(m, "BlockMaskingParams")
      .def(py::init<>())
      .def_readwrite("ids_keep", &BlockMaskingParams::ids_keep)
      .def_readwrite("mask", &BlockMaskingParams::mask)
      .def_readwrite("ids_restore", &BlockMaskingParams::ids_restore)
      .def_readwrite("aspect_table", &BlockMaskingParams::aspect_table)
      .def_readwrite("rows", &BlockMaskingParams::rows)
      .def_readwrite("height", &BlockMaskingParams::height)
      .def_readwrite("width", &BlockMaskingParams::width)
      .def_readwrite("keep", &BlockMaskingParams::keep)
      .def_readwrite("min_block_patches", &BlockMaskingParams::min_block_patches)
      .def_readwrite("aspect_table_size", &BlockMaskingParams::aspect_table_size)
      .def_readwrite("key_block", &BlockMaskingParams::key_block)
      .def_readwrite("key_fill", &BlockMaskingParams::key_fill);
  m.def("random_masking_cpu", &random_masking_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("block_masking_cpu", &block_masking_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
#if defined(FASTPT_WITH_CUDA)
  m.def(
      "random_masking_cuda",
      [](const RandomMaskingParams& p, uintptr_t stream) { check_cuda(random_masking_cuda(p, stream), "random_masking"); },
      py::arg("params"), py::arg("stream"));
  m.def("random_masking_cuda_max_patches", &random_masking_cuda_max_patches);
#endif
}

}  // namespace fastpt
