"""Backbones, the parts they are assembled from, heads, and Hugging Face checkpoint conversion.

Builders (flat typed kwargs, named by the YAML zoo): ``text_encoder``, ``encoder_decoder``,
``vit``, ``mae_decoder``. Backbones: ``TextEncoder``, ``EncoderDecoder``, ``VisionEncoder`` (and
``MAEDecoder``), all returning ``BackboneOutput``. Heads: ``MLMHead``, ``LMHead``, ``Pooler``.
Conversion: ``from_hf(path) -> (backbone, heads, config)``, ``to_hf(backbone, heads, path)``.
"""
from .embeddings import PatchEmbedding, TextEmbedding
from .encoder import TextEncoder, text_encoder
from .encoder_decoder import EncoderDecoder, encoder_decoder
from .heads import LMHead, MLMHead, Pooler
from .hf import from_hf, load_fastpt, save_fastpt, to_hf
from .layers import (CrossAttention, FeedForward, RMSNorm, SelfAttention, TransformerLayer, init_weights,
                     make_norm)
from .outputs import BackboneOutput
from .vision import MAEDecoder, VisionEncoder, mae_decoder, patchify, unpatchify, vit

__all__ = ["BackboneOutput", "TextEncoder", "EncoderDecoder", "VisionEncoder", "MAEDecoder"]
__all__ += ["text_encoder", "encoder_decoder", "vit", "mae_decoder"]
__all__ += ["TextEmbedding", "PatchEmbedding", "RMSNorm", "make_norm", "FeedForward", "SelfAttention",
            "CrossAttention", "TransformerLayer", "init_weights", "patchify", "unpatchify"]
__all__ += ["MLMHead", "LMHead", "Pooler"]
__all__ += ["from_hf", "to_hf", "save_fastpt", "load_fastpt"]
