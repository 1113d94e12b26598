"""What the backbones return: one small dataclass shared by the text, encoder-decoder and vision stacks."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
