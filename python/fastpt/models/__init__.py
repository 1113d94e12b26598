"""Backbones, the parts they are assembled from, heads, and Hugging Face checkpoint conversion.

Builders (flat typed kwargs, named by the YAML zoo through ``BUILDERS``): ``text_encoder``,
``encoder_decoder``, ``vit``, ``two_tower`` (and ``mae_decoder``, built by the MAE objective).
Backbones: ``TextEncoder``, ``EncoderDecoder``, ``VisionEncoder`` (and ``MAEDecoder``), all returning
``BackboneOutput``; ``TwoTower`` (CLIP). Heads: ``MLMHead``, ``LMHead``, ``Pooler``. The assembled
model: ``PretrainModel`` (backbone + objective, ``ModelOutput``). Conversion: ``from_hf(path) ->
(backbone, heads, config)``, ``to_hf(backbone, heads, path)``.
"""
from .embeddings import PatchEmbedding, TextEmbedding
from .encoder import TextEncoder, text_encoder
from .encoder_decoder import EncoderDecoder, encoder_decoder
from .heads import LMHead, MLMHead, Pooler
from .hf import from_hf, load_fastpt, save_fastpt, to_hf
from .layers import (CrossAttention, FeedForward, RMSNorm, SelfAttention, TransformerLayer, init_weights,
                     make_norm)
from .model import PretrainModel
from .outputs import BackboneOutput, ModelOutput, TwoTowerOutput
from .two_tower import TwoTower, two_tower
from .vision import MAEDecoder, VisionEncoder, mae_decoder, patchify, unpatchify, vit

# The backbone builders a config's ``backbone.builder`` may name.
BUILDERS = {"text_encoder": text_encoder, "encoder_decoder": encoder_decoder, "vit": vit, "two_tower": two_tower}

__all__ = ["BackboneOutput", "TextEncoder", "EncoderDecoder", "VisionEncoder", "MAEDecoder", "TwoTower",
           "TwoTowerOutput", "PretrainModel", "ModelOutput"]
__all__ += ["BUILDERS", "text_encoder", "encoder_decoder", "vit", "mae_decoder", "two_tower"]
__all__ += ["TextEmbedding", "PatchEmbedding", "RMSNorm", "make_norm", "FeedForward", "SelfAttention",
            "CrossAttention", "TransformerLayer", "init_weights", "patchify", "unpatchify"]
__all__ += ["MLMHead", "LMHead", "Pooler"]
__all__ += ["from_hf", "to_hf", "save_fastpt", "load_fastpt"]
