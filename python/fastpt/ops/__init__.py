"""Fused ops. Each lives in its own module with its kernels and its pure-PyTorch reference."""
from .mlm_mask import mlm_mask

__all__ = ["mlm_mask"]
