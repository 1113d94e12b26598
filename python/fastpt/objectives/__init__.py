"""Pre-training objectives: each a small ``nn.Module`` that says what batch it needs, prepares it on
the device (masks, spans, views, crops) and turns a backbone's states into a loss plus metrics.

``OBJECTIVES`` maps the config names to the classes; build one with
``OBJECTIVES[name].from_backbone(backbone, **kwargs)`` (sizes read from the backbone).
"""
from .base import Objective, ObjectiveOutput
from .clip import CLIP
from .clm import CausalLM, PrefixLM
from .dino import DINO, DINOHead
from .distill import SelfDistillation
from .mae import MAE
from .mlm import MLM
from .moco import MoCoV3
from .sentence import NSP, SOP
from .simclr import SimCLR, ViewAugment
from .span import UL2, T5SpanCorruption

OBJECTIVES = {
    "mlm": MLM,
    "clm": CausalLM,
    "prefix_lm": PrefixLM,
    "span": T5SpanCorruption,
    "ul2": UL2,
    "nsp": NSP,
    "sop": SOP,
    "mae": MAE,
    "simclr": SimCLR,
    "moco_v3": MoCoV3,
    "clip": CLIP,
    "dino": DINO,
    "self_distill": SelfDistillation,
}

__all__ = ["Objective", "ObjectiveOutput", "OBJECTIVES", "MLM", "CausalLM", "PrefixLM", "T5SpanCorruption", "UL2",
           "NSP", "SOP", "MAE", "SimCLR", "MoCoV3", "CLIP", "DINO", "DINOHead", "SelfDistillation", "ViewAugment"]
