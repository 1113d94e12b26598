"""Drop-in ``nn.Module``s built on ``fastpt.ops``."""
from .attention import MultiheadSelfAttention, TransformerEncoderLayer, attention_backend
from .contrastive import CLIPLoss, InfoNCELoss, NTXentLoss
from .dropout import Dropout
from .linear_cross_entropy import LinearCrossEntropyLoss

__all__ = ["LinearCrossEntropyLoss"]
__all__ += ["InfoNCELoss", "NTXentLoss", "CLIPLoss"]
__all__ += ["MultiheadSelfAttention", "TransformerEncoderLayer", "attention_backend"]
__all__ += ["Dropout"]
