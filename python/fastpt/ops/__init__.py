"""Fused ops. Each lives in its own module with its kernels and its pure-PyTorch reference."""
from .attention import attention, sdpa
from .contrastive import clip_loss, info_nce, nt_xent
from .dropout import dropout
from .linear_cross_entropy import linear_cross_entropy
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
