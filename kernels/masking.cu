// CUDA kernels of the masking ops: BERT-style mlm_mask and MAE-style random_masking.
// Every random decision comes from csrc/rng.h, the counter-based formula that all
// backends share, so the outputs are bit-identical to the references in
// python/fastpt/ops/{mlm_mask,random_masking}.py and to the CPU kernels in csrc/.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "dtypes.h"
#include "masking.h"
#include "rng.h"

namespace fastpt {
namespace {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;

template <typename T>
__device__ __forceinline__ T* dev_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The launchers' result: "" or the text of the error the launch raised.
const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// ============================================================================ mlm_mask
//
// Elementwise over (rows, cols). A block is (tx, ty) threads: ty rows at a time,
// each row's columns strided by tx, kMlmItems columns per thread. tx adapts to
// cols so that short rows (128 tokens) still keep every thread busy, and no
// thread ever divides an index by cols. The kMlmItems loads of a thread are
// issued before any is used, so several loads per thread are in flight.

constexpr int kMlmThreads = 256;
constexpr int kMlmItems = 4;
constexpr int kMaxSpecial = 64;  // MAX_SPECIAL_IDS in python/fastpt/ops/mlm_mask.py

struct NoWords {};  // word_ids absent: selection is drawn per token

template <typename T, typename W>
__global__ void __launch_bounds__(kMlmThreads) mlm_mask_kernel(const MLMParams p) {
  constexpr bool kWords = !std::is_same<W, NoWords>::value;
  using WordT = std::conditional_t<kWords, W, int32_t>;

  // Special ids are read once per block; every element compares against all of them.
  __shared__ int64_t special[kMaxSpecial];
  const int n_special = p.n_special;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if (tid < n_special) special[tid] = dev_ptr<const int64_t>(p.special_ids)[tid];
  __syncthreads();

  const T* __restrict__ ids = dev_ptr<const T>(p.ids);
  T* __restrict__ out = dev_ptr<T>(p.out);
  int64_t* __restrict__ labels = dev_ptr<int64_t>(p.labels);
  const uint8_t* __restrict__ blocked = dev_ptr<const uint8_t>(p.blocked);
  const WordT* __restrict__ words = dev_ptr<const WordT>(p.word_ids);
  const int64_t cols = p.cols;
  const int64_t c0 = int64_t(blockIdx.x) * blockDim.x * kMlmItems + threadIdx.x;
  const T mask_id = static_cast<T>(p.mask_token_id);
  const uint32_t vocab = static_cast<uint32_t>(p.vocab_size);

  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < p.rows; r += int64_t(gridDim.y) * blockDim.y) {
    const int64_t base = r * cols;
    T tok[kMlmItems];
    bool eligible[kMlmItems];
    uint32_t sel_col[kMlmItems];
#pragma unroll
    for (int j = 0; j < kMlmItems; ++j) {
      const int64_t c = c0 + int64_t(j) * blockDim.x;
      const bool inside = c < cols;
      tok[j] = inside ? ids[base + c] : T(0);
      eligible[j] = inside && (blocked == nullptr || blocked[base + c] == 0);
      sel_col[j] = static_cast<uint32_t>(c);
      if constexpr (kWords) {
        // Whole-word masking: the selection bits are drawn at the word id, so
        // every piece of a word sees the same draw; word id < 0 is never masked.
        const int64_t w = inside ? static_cast<int64_t>(words[base + c]) : int64_t{-1};
        eligible[j] = eligible[j] && w >= 0;
        sel_col[j] = static_cast<uint32_t>(w);
      }
    }
    for (int s = 0; s < n_special; ++s) {
      const int64_t sid = special[s];
#pragma unroll
      for (int j = 0; j < kMlmItems; ++j) eligible[j] = eligible[j] && static_cast<int64_t>(tok[j]) != sid;
    }

    const uint32_t r32 = static_cast<uint32_t>(r);
    const uint32_t rk_sel = row_key(p.key_select, r32);
    const uint32_t rk_act = row_key(p.key_action, r32);
    const uint32_t rk_tok = row_key(p.key_token, r32);
#pragma unroll
    for (int j = 0; j < kMlmItems; ++j) {
      const int64_t c = c0 + int64_t(j) * blockDim.x;
      if (c >= cols) continue;
      const uint32_t c32 = static_cast<uint32_t>(c);
      // Same three draws and the same integer comparisons as mlm_row in csrc/mlm_mask_cpu.cpp.
      const bool selected = eligible[j] && bernoulli24(rand_bits(rk_sel, sel_col[j]), p.t_select);
      const uint32_t a = rand_bits(rk_act, c32) >> 8;
      const T rnd = static_cast<T>(uniform_int(rand_bits(rk_tok, c32), vocab));
      const T replaced = a < p.t_mask ? mask_id : (a < p.t_random ? rnd : tok[j]);
      out[base + c] = selected ? replaced : tok[j];
      labels[base + c] = selected ? static_cast<int64_t>(tok[j]) : int64_t{-100};
    }
  }
}

template <typename T, typename W>
void launch_mlm(const MLMParams& p, int tx, cudaStream_t stream) {
  const int ty = kMlmThreads / tx;
  const int64_t col_tiles = ceil_div(p.cols, int64_t(tx) * kMlmItems);
  // gridDim.y is capped at 65535; the kernel loops over the remaining rows.
  const int64_t row_groups = std::min<int64_t>(ceil_div(p.rows, ty), 65535);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_groups));
  mlm_mask_kernel<T, W><<<grid, dim3(tx, ty), 0, stream>>>(p);
}

template <typename T>
void dispatch_words(const MLMParams& p, int tx, cudaStream_t stream) {
  if (!p.word_ids) {
    launch_mlm<T, NoWords>(p, tx, stream);
  } else if (p.word_dtype == kInt32) {
    launch_mlm<T, int32_t>(p, tx, stream);
  } else {
    launch_mlm<T, int64_t>(p, tx, stream);
  }
}

// ============================================================================ random_masking
//
// One thread block per row. The kept set is the K smallest of the L distinct
// 64-bit keys (h(b, l) << 32 | l), found by a radix select, most significant 8
// bits first: each pass histograms the digit of the keys that share the bits
// chosen so far and picks the bucket holding the K-th smallest. The select ends
// as soon as the K-th smallest is the largest key of its bucket (then "key's
// bits down to this digit <= the chosen ones" is exactly the kept set): after
// one or two passes for realistic L, and by the eighth pass at the latest,
// where every bucket holds one key. Within a row h is a bijection of l (mix32
// is one), so the low half never decides today; it makes the keys distinct by
// construction, so exactly K positions are kept (and the ids_keep writes stay
// in bounds) whatever the hash, with ties going to the smaller l.
//
// Nothing is stored per position: each pass recomputes h, which costs a few
// integer operations, so shared memory is a fixed 1.2 KB and L is not bounded
// by it. A final pass walks the row in tiles of blockDim positions, in order,
// and a block-wide prefix count of the kept flags gives each position its rank.

constexpr int kRmMaxThreads = 1024;
// Counters are 32-bit, so any L < 2^31 would be exact; the cap keeps a row,
// which a single block streams three to nine times, in the milliseconds. MAE
// uses L in the hundreds to a few thousands.
constexpr int64_t kRmMaxPatches = int64_t{1} << 24;

__device__ __forceinline__ uint64_t patch_key(uint32_t rkey, uint32_t l) {
  return (static_cast<uint64_t>(rand_bits(rkey, l)) << 32) | l;
}

// Number of threads before this one (in threadIdx.x order) whose flag is set;
// `total` gets the count over the whole block. Every thread of the block must
// call it; blockDim.x must be a multiple of 32. warp_counts has 32 entries.
__device__ __forceinline__ uint32_t block_count_before(bool flag, uint32_t* warp_counts, uint32_t& total) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  const unsigned n_warps = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(kFullWarp, flag);
  const uint32_t in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    // Inclusive scan of the per-warp counts; each lane reads and writes only its own entry.
    uint32_t v = lane < n_warps ? warp_counts[lane] : 0u;
#pragma unroll
    for (unsigned o = 1; o < 32; o <<= 1) {
      const uint32_t up = __shfl_up_sync(kFullWarp, v, o);
      if (lane >= o) v += up;
    }
    warp_counts[lane] = v;
  }
  __syncthreads();
  const uint32_t before = (warp == 0 ? 0u : warp_counts[warp - 1]) + in_warp;
  total = warp_counts[n_warps - 1];
  __syncthreads();  // the next call overwrites warp_counts
  return before;
}

__global__ void __launch_bounds__(kRmMaxThreads) random_masking_kernel(const RandomMaskingParams p) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t warp_counts[32];
  __shared__ uint32_t chosen_digit, chosen_below, chosen_exact;

  const uint32_t L = static_cast<uint32_t>(p.num_patches);
  const uint32_t K = static_cast<uint32_t>(p.keep);
  for (int64_t b = blockIdx.x; b < p.rows; b += gridDim.x) {
    const uint32_t rkey = row_key(p.key, static_cast<uint32_t>(b));

    // Invariant: exactly K - rank keys have their bits above `shift` below
    // prefix's, and the K-th smallest key has prefix's bits above `shift` and
    // is the rank-th smallest of the keys that do.
    uint64_t prefix = 0;
    uint32_t rank = K;
    int shift = 64;
    if (K > 0 && K < L) {
      bool exact = false;
      while (!exact) {
        shift -= 8;
        const uint64_t known = shift == 56 ? 0 : ~uint64_t{0} << (shift + 8);
        for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (uint32_t l = threadIdx.x; l < L; l += blockDim.x) {
          const uint64_t key = patch_key(rkey, l);
          if ((key & known) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
          // Lane i owns buckets 8i..8i+7; the lane whose range of cumulative
          // counts contains `rank` finds the bucket (exactly one lane does,
          // because 1 <= rank <= the number of keys that share the prefix).
          const unsigned lane = threadIdx.x;
          uint32_t count[8];
          uint32_t sum = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            count[j] = hist[lane * 8 + j];
            sum += count[j];
          }
          uint32_t incl = sum;
#pragma unroll
          for (unsigned o = 1; o < 32; o <<= 1) {
            const uint32_t up = __shfl_up_sync(kFullWarp, incl, o);
            if (lane >= o) incl += up;
          }
          const uint32_t excl = incl - sum;
          if (excl < rank && rank <= incl) {
            uint32_t below = excl;
            int digit = -1;
            uint32_t in_bucket = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (digit >= 0) continue;
              if (rank <= below + count[j]) {
                digit = static_cast<int>(lane) * 8 + j;
                in_bucket = count[j];
              } else {
                below += count[j];
              }
            }
            chosen_digit = static_cast<uint32_t>(digit);
            chosen_below = below;
            chosen_exact = rank - below == in_bucket;
          }
        }
        __syncthreads();
        prefix |= static_cast<uint64_t>(chosen_digit) << shift;
        rank -= chosen_below;
        exact = chosen_exact != 0;
        // No barrier needed before the next pass: the bucket counts are next
        // written after this barrier (all reads of them came before it), and
        // chosen_* only after two more barriers.
      }
    }
    const uint64_t top = K > 0 && K < L ? prefix >> shift : 0;

    const int64_t row = b;
    int64_t* ids_keep = dev_ptr<int64_t>(p.ids_keep) + row * p.keep;
    uint8_t* mask = dev_ptr<uint8_t>(p.mask) + row * p.num_patches;
    int64_t* ids_restore = dev_ptr<int64_t>(p.ids_restore) + row * p.num_patches;
    uint32_t kept_before = 0;
    for (uint32_t tile = 0; tile < L; tile += blockDim.x) {
      const uint32_t l = tile + threadIdx.x;
      const bool inside = l < L;
      bool kept = inside && K == L;
      if (inside && K > 0 && K < L) kept = (patch_key(rkey, l) >> shift) <= top;
      uint32_t tile_kept;
      const uint32_t below = kept_before + block_count_before(kept, warp_counts, tile_kept);
      if (inside) {
        // `below` kept positions precede l, so l - below masked ones do.
        mask[l] = kept ? 0 : 1;
        if (kept) {
          ids_restore[l] = below;
          ids_keep[below] = l;
        } else {
          ids_restore[l] = int64_t{K} + (l - below);
        }
      }
      kept_before += tile_kept;
    }
  }
}

}  // namespace

const char* mlm_mask_cuda(const MLMParams& p, uintptr_t stream) {
  if (p.rows < 0 || p.cols < 0) return "mlm_mask_cuda: negative shape";
  if (p.rows == 0 || p.cols == 0) return "";
  if (!p.ids || !p.out || !p.labels) return "mlm_mask_cuda: null input or output pointer";
  if (p.n_special < 0 || p.n_special > kMaxSpecial || (p.n_special > 0 && !p.special_ids))
    return "mlm_mask_cuda: special_ids must hold 0 to 64 ids";
  if (p.vocab_size <= 0 || p.vocab_size > 0xFFFFFFFFLL) return "mlm_mask_cuda: vocab_size out of range";
  if (p.id_dtype != kInt32 && p.id_dtype != kInt64) return "mlm_mask_cuda: input_ids must be int32 or int64";
  if (p.word_ids && p.word_dtype != kInt32 && p.word_dtype != kInt64)
    return "mlm_mask_cuda: word_ids must be int32 or int64";

  // Smallest power-of-two tx (32..256) whose kMlmItems columns per thread cover the row.
  const int64_t per_thread = ceil_div(p.cols, kMlmItems);
  int tx = 32;
  while (tx < kMlmThreads && tx < per_thread) tx *= 2;
  if (ceil_div(p.cols, int64_t(tx) * kMlmItems) > 0x7FFFFFFF) return "mlm_mask_cuda: rows too long";

  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (p.id_dtype == kInt32) {
    dispatch_words<int32_t>(p, tx, s);
  } else {
    dispatch_words<int64_t>(p, tx, s);
  }
  return launch_status();
}

const char* random_masking_cuda(const RandomMaskingParams& p, uintptr_t stream) {
  if (p.rows < 0 || p.num_patches < 0 || p.keep < 0 || p.keep > p.num_patches)
    return "random_masking_cuda: expected rows >= 0 and 0 <= keep <= num_patches";
  if (p.num_patches > kRmMaxPatches) return "random_masking_cuda: num_patches above random_masking_cuda_max_patches()";
  if (p.rows == 0 || p.num_patches == 0) return "";
  if (!p.mask || !p.ids_restore || (p.keep > 0 && !p.ids_keep)) return "random_masking_cuda: null output pointer";

  // One warp per 32 positions up to 1024 threads; whole warps, as the ballots need.
  const int64_t threads = std::min<int64_t>(ceil_div(p.num_patches, 32) * 32, kRmMaxThreads);
  // gridDim.x stops at 2^31 - 1; the kernel loops over any rows beyond.
  const int64_t blocks = std::min<int64_t>(p.rows, 0x7FFFFFFF);
  random_masking_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0,
                          reinterpret_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int64_t random_masking_cuda_max_patches() { return kRmMaxPatches; }

}  // namespace fastpt
