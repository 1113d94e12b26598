// Backward attention kernels (dK/dV and dQ) for head dim 128 (fp16 and bf16); see attention_kernel.cuh.
#include "attention_launch.cuh"

FASTPT_ATTN_INSTANTIATE_BWD(128)
