// Backward attention kernels (dK/dV and dQ) for head dim 64 (fp16 and bf16); see attention_kernel.cuh.
#include "attention_launch.cuh"

FASTPT_ATTN_INSTANTIATE_BWD(64)
