"""Data: collators that batch tokenised examples for pre-training objectives."""
from .collator import MLMCollator

__all__ = ["MLMCollator"]
