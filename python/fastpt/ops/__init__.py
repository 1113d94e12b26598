"""Fused ops. Each lives in its own module with its kernels and its pure-PyTorch reference."""
from .attention import attention, sdpa
from .contrastive import clip_loss, info_nce, nt_xent
from .dropout import dropout
from .linear_cross_entropy import linear_cross_entropy
from .linear_cross_entropy import empty_cache as _lce_empty_cache
from .mlm_mask import mlm_mask
from .random_masking import random_masking
from .span_corrupt import SpanCorruption, span_corrupt, span_corrupt_lengths
from .ul2 import UL2_DENOISERS, Denoiser, UL2Batch, ul2_denoise

__all__ = ["mlm_mask", "random_masking"]
__all__ += ["SpanCorruption", "span_corrupt", "span_corrupt_lengths"]
__all__ += ["UL2_DENOISERS", "Denoiser", "UL2Batch", "ul2_denoise"]
__all__ += ["linear_cross_entropy"]
__all__ += ["info_nce", "nt_xent", "clip_loss"]
__all__ += ["attention", "sdpa"]
__all__ += ["dropout"]
__all__ += ["empty_cache"]


def empty_cache() -> None:
    """Free the scratch buffers fastpt's CPU ops keep between calls in the calling thread (today
    one: linear_cross_entropy's chunk of logits, at most 128 MiB), as ``torch.cuda.empty_cache``
    does for CUDA's caching allocator. They are allocated again on the next call that needs them."""
    _lce_empty_cache()
