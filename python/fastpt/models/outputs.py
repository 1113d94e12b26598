"""What the backbones and the assembled model return: ``BackboneOutput`` (shared by the text,
encoder-decoder and vision stacks), ``TwoTowerOutput`` (CLIP's two towers), ``ModelOutput`` (``PretrainModel``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree


@dataclass
class BackboneOutput:
    """Output of every fastpt backbone.

    Attributes:
        last_hidden_state: ``(B, S, D)`` (``(T, D)`` for packed ``(T,)`` text input): the final
            states, after the final norm when the stack has one. For an encoder-decoder these are
            the decoder states ``(B, T, D)``.
        hidden_states: when asked for, ``(embeddings, layer 1, ..., layer N)`` outputs, each shaped
            like ``last_hidden_state`` and taken before the final norm; else None.
        encoder_last_hidden_state: encoder-decoder only: the encoder states ``(B, S, D)``.

    States at padded positions (right padding, ``attention_mask == 0``) carry no meaning: the
    fused attention outputs 0 for padded queries, so they differ from Hugging Face's values there.
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


@dataclass
class TwoTowerOutput:
    """Output of a ``TwoTower`` backbone (CLIP): each tower's ``BackboneOutput``, None for a tower
    whose input was not given."""

    text: BackboneOutput | None = None
    vision: BackboneOutput | None = None


@dataclass
class ModelOutput:
    """What ``PretrainModel(...)`` returns.

    Attributes:
        loss: 0-dim float tensor, the objective's training loss (None for a model without objective).
        logits: head logits when the objective computed them (e.g. ``return_logits=True``), else None.
        last_hidden_state: the backbone's states for the (first) input, e.g. ``(B, S, D)``.
        metrics: name -> detached 0-dim tensor (loss parts, accuracies, temperatures ...).
        hidden_states: a model without objective called with ``output_hidden_states=True``: the
            backbone's ``(embeddings, layer 1, ..., layer N)`` (``BackboneOutput.hidden_states``); else None.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    hidden_states: tuple[torch.Tensor, ...] | None = None


# pytree nodes, as transformers registers its ModelOutput: torch.export (and torch.onnx's exporter) take
# a module returning them; unregistered, export refused every fastpt backbone and PretrainModel
# (serialized_type_name: torch.export.save needs it to write a program returning them)
for _cls in (BackboneOutput, TwoTowerOutput, ModelOutput):
    pytree.register_dataclass(_cls, serialized_type_name=f"{_cls.__module__}.{_cls.__qualname__}")
