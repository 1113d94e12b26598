// Parameter blocks of the masking kernels, shared by the CPU (csrc/) and CUDA
// (kernels/masking.cu) implementations. Plain data: pointers as integers so
// that nothing here depends on torch or pybind11.
#pragma once
#include <cstdint>

namespace fastpt {

// BERT-style masking of an (rows, cols) id matrix, row-major and contiguous.
struct MLMParams {
  uintptr_t ids = 0;          // (rows, cols) input ids, int32 or int64 (id_dtype)
  uintptr_t out = 0;          // (rows, cols) masked ids, same dtype
  uintptr_t labels = 0;       // (rows, cols) int64: original id where selected, else -100
  uintptr_t blocked = 0;      // optional (rows, cols) uint8: nonzero = never mask (special/padding)
  uintptr_t word_ids = 0;     // optional (rows, cols) word ids (word_dtype); < 0 = never mask
  uintptr_t special_ids = 0;  // optional (n_special,) int64 ids that are never masked
  int64_t rows = 0, cols = 0;
  int id_dtype = 1, word_dtype = 1, n_special = 0;
  uint32_t key_select = 0, key_action = 0, key_token = 0;  // stream keys (see rng.h)
  uint32_t t_select = 0, t_mask = 0, t_random = 0;         // 24-bit thresholds
  int64_t mask_token_id = 0, vocab_size = 0;
};

// MAE-style per-row random masking of exactly (num_patches - keep) patches.
struct RandomMaskingParams {
  uintptr_t ids_keep = 0;     // (rows, keep) int64, ascending positions kept
  uintptr_t mask = 0;         // (rows, num_patches) uint8 (torch.bool): 1 = masked
  uintptr_t ids_restore = 0;  // (rows, num_patches) int64
  int64_t rows = 0, num_patches = 0, keep = 0;
  uint32_t key = 0;
};

#if defined(FASTPT_WITH_CUDA)
// Launchers in kernels/masking.cu; stream is a cudaStream_t as an integer.
// They return an empty string on success or the CUDA error text.
const char* mlm_mask_cuda(const MLMParams& p, uintptr_t stream);
const char* random_masking_cuda(const RandomMaskingParams& p, uintptr_t stream);
int64_t random_masking_cuda_max_patches();
#endif

}  // namespace fastpt
