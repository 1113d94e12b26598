"""Heads on top of the backbones: masked-LM (BERT's ``cls.predictions``), LM, and BERT's pooler.

Objectives hold these. For the losses they read ``head.transform(h)``, ``head.weight`` and
``head.bias`` and call ``fastpt.ops.linear_cross_entropy`` on the masked rows only, so the
``(T, V)`` logits are never materialised; ``forward`` gives logits for inference and tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ACTIVATIONS, check_choice, check_int, check_positive, init_weights


def _vocab_weight(name: str, tied_weight, vocab_size: int, hidden_size: int, std: float) -> nn.Parameter:
    """The tied Parameter itself (so the head and the embedding share one tensor), or a new one
    drawn from normal(0, std)."""
    if tied_weight is None:
        return nn.Parameter(torch.empty(vocab_size, hidden_size).normal_(0.0, std))
    if not isinstance(tied_weight, nn.Parameter):
        raise TypeError(f"{name}: expected an nn.Parameter (e.g. embeddings.word_embeddings.weight), "
                        f"got {type(tied_weight).__name__}")
    if tuple(tied_weight.shape) != (vocab_size, hidden_size):
        raise ValueError(f"{name}: expected shape ({vocab_size}, {hidden_size}), got {tuple(tied_weight.shape)}")
    return tied_weight


class MLMHead(nn.Module):
    """BERT / RoBERTa masked-LM head: ``transform`` (dense, activation, LayerNorm) then the vocabulary
    projection ``weight`` (tied to the input embedding when given) plus ``bias``.

    Args:
        hidden_size: D; vocab_size: V.
        activation: "gelu", "gelu_tanh", "relu" or "silu" (BERT, RoBERTa: "gelu").
        layer_norm_eps: of the transform's LayerNorm.
        tied_weight: the ``(V, E)`` embedding Parameter to share (``backbone.embeddings.
            word_embeddings.weight``), or None for an untied weight.
        embedding_size: E, the width the transform maps to (default D). ALBERT's factorised
            embedding: the transform is dense D -> E, activation, LayerNorm(E), and the decoder is the
            ``(V, E)`` word-embedding table (Hugging Face's ``AlbertMLMHead``).
        initializer_range: std of the normal init (BERT's ``initializer_range``).

    Parameters: ``dense``, ``layer_norm``, ``weight`` ``(V, E)``, ``bias`` ``(V,)``. A tied weight
    appears under both names in ``state_dict`` (as in Hugging Face); it is one tensor. Initialised as
    transformers' ``BertForMaskedLM``: ``dense`` and an untied ``weight`` normal(0, initializer_range),
    ``dense`` bias and ``bias`` 0, LayerNorm weight 1 and bias 0; a tied weight is left as it is.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 tied_weight: nn.Parameter | None = None, embedding_size: int | None = None,
                 initializer_range: float = 0.02):
        super().__init__()
        check_int("hidden_size", hidden_size)
        check_int("vocab_size", vocab_size)
        std = check_positive("initializer_range", initializer_range)
        out = hidden_size if embedding_size is None else check_int("embedding_size", embedding_size)
        self.activation = check_choice("activation", activation, list(ACTIVATIONS))
        # torch's Linear default (kaiming-uniform, std ~1/sqrt(3 fan_in), non-zero bias) is not BERT's
        self.dense = init_weights(nn.Linear(hidden_size, out), std)
        self.layer_norm = nn.LayerNorm(out, eps=check_positive("layer_norm_eps", layer_norm_eps))
        self.weight = _vocab_weight("tied_weight", tied_weight, vocab_size, out, std)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.tied = tied_weight is not None

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., E)``: BERT's ``cls.predictions.transform`` (E = D unless factorised)."""
        return self.layer_norm(ACTIVATIONS[self.activation](self.dense(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> logits ``(..., V)`` (materialises them: losses use linear_cross_entropy)."""
        return F.linear(self.transform(h), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.weight.shape[0]}, embedding_size={self.weight.shape[1]}, "
                f"activation={self.activation!r}, tied={self.tied}")


class LMHead(nn.Module):
    """Language-model head: ``logits = h @ weight.T (+ bias)``.

    Args: hidden_size D, vocab_size V, tied_weight (the embedding Parameter to share, GPT-2 style),
    bias (GPT-2: none), initializer_range (std of an untied weight's normal init; the bias starts at 0).
    Parameters: ``weight`` ``(V, D)``, ``bias`` ``(V,)`` or None.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, tied_weight: nn.Parameter | None = None,
                 bias: bool = False, initializer_range: float = 0.02):
        super().__init__()
        check_int("hidden_size", hidden_size)
        check_int("vocab_size", vocab_size)
        std = check_positive("initializer_range", initializer_range)
        self.weight = _vocab_weight("tied_weight", tied_weight, vocab_size, hidden_size, std)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.tied = tied_weight is not None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> logits ``(..., V)``."""
        return F.linear(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"vocab_size={self.weight.shape[0]}, bias={self.bias is not None}, tied={self.tied}"


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(h[:, 0]))``, the first (cls) token, for NSP / SOP and classifiers.

    ``h`` ``(B, S, D)`` -> ``(B, D)``. Parameters: ``dense``, initialised as BERT's: weight
    normal(0, initializer_range), bias 0.
    """

    def __init__(self, hidden_size: int, *, initializer_range: float = 0.02):
        super().__init__()
        self.dense = init_weights(nn.Linear(check_int("hidden_size", hidden_size), hidden_size),
                                  check_positive("initializer_range", initializer_range))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))
