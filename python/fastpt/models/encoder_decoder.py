"""Encoder-decoder transformer (T5 / UL2 style) for span corruption and mixture-of-denoisers objectives.

The encoder is a bidirectional ``TextEncoder``; the decoder layers add cross-attention over its
states and run causal self-attention. One embedding (``.shared``) serves encoder input, decoder
input and, tied, the LM head. T5's bucketed relative position bias is not implemented: positions
come from the model's ``position`` option (rotary by default, the closest relative scheme).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.attention import check_padding_mask, padding_to_seqlens
from ..nn.dropout import Dropout
from ..ops import _validate
from .embeddings import TextEmbedding
from .encoder import POSITIONS, TextEncoder, check_stack, make_layers, run_layers
from .layers import check_choice, check_int, check_prob, init_weights, make_norm
from .outputs import BackboneOutput


class EncoderDecoder(nn.Module):
    """Encoder + decoder with a shared token embedding.

    Args:
        encoder: a ``TextEncoder`` (its embedding also embeds the decoder input).
        decoder_layers: ``TransformerLayer``s with ``cross_attn``.
        decoder_norm: the decoder's final norm, or None.
        final_dropout: dropout on each stack's output, after its final norm (T5's; the encoder
            states the decoder attends to, and the decoder states).
        config: the dict it was built from. gradient_checkpointing: for both stacks.

    Attributes: hidden_size, vocab_size, shared (the ``nn.Embedding``), encoder, decoder_layers,
    decoder_norm, final_dropout (a ``Dropout``), config, gradient_checkpointing (setting it sets the
    encoder's too).
    """

    def __init__(self, encoder: TextEncoder, decoder_layers: Sequence[nn.Module], decoder_norm: nn.Module | None = None,
                 *, final_dropout: float = 0.0, config: dict | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        for i, layer in enumerate(decoder_layers):
            if getattr(layer, "cross_attn", None) is None:
                raise ValueError(f"decoder_layers: layer {i} has no cross_attn")
        self.encoder = encoder
        self.decoder_layers = nn.ModuleList(decoder_layers)
        self.decoder_norm = decoder_norm
        self.final_dropout = Dropout(check_prob("final_dropout", final_dropout))
        self.config = dict(config or {})
        self.hidden_size, self.vocab_size = encoder.hidden_size, encoder.vocab_size
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def shared(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    @property
    def embeddings(self) -> TextEmbedding:
        return self.encoder.embeddings

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self._gradient_checkpointing = bool(value)
        self.encoder.gradient_checkpointing = bool(value)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids ``(B, S)``, attention_mask ``(B, S)`` right padding -> encoder states ``(B, S, D)``."""
        return self.final_dropout(self.encoder(input_ids, attention_mask, causal=False).last_hidden_state)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None,
               output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple | None]:
        """decoder_input_ids ``(B, T)`` over memory ``(B, S, D)`` (memory_mask ``(B, S)``, any padding) ->
        (decoder states ``(B, T, D)``, hidden states or None). Self-attention is causal; the
        decoder_attention_mask must be right padding."""
        _validate.index_tensor("decoder_input_ids", decoder_input_ids, ndim_min=0)
        if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != memory.shape[0]:
            raise ValueError(f"decoder_input_ids: expected shape (B, T) with B = {memory.shape[0]} (the encoder's "
                             f"batch), got {tuple(decoder_input_ids.shape)}")
        if not torch.compiler.is_compiling():
            _validate.ids_in_ranges([("decoder_input_ids", decoder_input_ids, "vocab_size", self.encoder.vocab_size)])
        seqlens = None
        if decoder_attention_mask is not None:
            check_padding_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
            seqlens = padding_to_seqlens(decoder_attention_mask, "decoder_attention_mask", none_if_full=True)
        y = self.encoder.embeddings(decoder_input_ids)
        y, hidden = run_layers(self, self.decoder_layers, y, output_hidden_states, causal=True, seqlens=seqlens,
                               memory=memory, memory_mask=memory_mask)
        if self.decoder_norm is not None:
            y = self.decoder_norm(y)
        return self.final_dropout(y), hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None, *,
                output_hidden_states: bool = False) -> BackboneOutput:
        """input_ids / attention_mask ``(B, S)`` (encoder), decoder_input_ids / decoder_attention_mask
        ``(B, T)``; masks are 1 = token, right-padded. Returns ``BackboneOutput`` with
        last_hidden_state = decoder states ``(B, T, D)``, encoder_last_hidden_state ``(B, S, D)``,
        hidden_states = the decoder's when asked for."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids: required (the decoder input, e.g. the shifted targets)")
        memory = self.encode(input_ids, attention_mask)
        y, hidden = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask,
                                output_hidden_states)
        return BackboneOutput(last_hidden_state=y, hidden_states=hidden, encoder_last_hidden_state=memory)


def encoder_decoder(*, vocab_size: int, hidden_size: int = 512, num_encoder_layers: int = 6,
                    num_decoder_layers: int | None = None, num_heads: int = 8, intermediate_size: int | None = None,
                    num_kv_heads: int | None = None, activation: str = "gelu", norm: str = "rmsnorm",
                    norm_eps: float = 1e-6, pre_norm: bool = True, position: str = "rotary", max_positions: int = 512,
                    rotary_base: float = 10000.0, pad_token_id: int | None = 0, bias: bool = False,
                    dropout: float = 0.1, attention_dropout: float = 0.0, ff_dropout: float | None = None,
                    initializer_range: float = 0.02, gradient_checkpointing: bool = False) -> EncoderDecoder:
    """Build a T5-style encoder-decoder from flat, typed arguments.

    Args:
        vocab_size: tokens V (shared by encoder input, decoder input and LM head).
        hidden_size, num_heads, intermediate_size (default 4 D), num_kv_heads: as ``text_encoder``.
        num_encoder_layers; num_decoder_layers (default: num_encoder_layers).
        activation: "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu" (T5 v1.1: "geglu").
        norm: "rmsnorm" (T5) or "layernorm"; norm_eps. pre_norm: pre-norm residuals (T5).
        position: "rotary" (default), "alibi", "learned", "sinusoidal" or "none".
        max_positions, rotary_base, bias, dropout, attention_dropout, initializer_range,
            gradient_checkpointing: as ``text_encoder``. As in T5, ``dropout`` also drops each stack's
            output after its final norm.
        ff_dropout: dropout inside the feed-forward, between activation and output projection
            (T5's ``DenseReluDense`` dropout); default ``dropout``, as T5's single ``dropout_rate``.
        pad_token_id: the padding id, recorded in the config; unlike ``text_encoder``'s, its embedding
            row is an ordinary one (as in T5, whose decoder starts from the pad id: that row is the
            decoder's first input and learns).

    Returns an ``EncoderDecoder`` whose ``.config`` is ``{"builder": "encoder_decoder", **arguments}``.
    Raises ValueError / TypeError naming the argument and the valid choices.
    """
    config = {"builder": "encoder_decoder", **{k: v for k, v in locals().items() if k != "config"}}
    num_decoder_layers = num_encoder_layers if num_decoder_layers is None else num_decoder_layers
    check_int("num_decoder_layers", num_decoder_layers, 0)
    intermediate_size = check_stack(hidden_size=hidden_size, num_layers=num_encoder_layers, num_heads=num_heads,
                                    num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                                    activation=activation, norm=norm, norm_eps=norm_eps, dropout=dropout,
                                    attention_dropout=attention_dropout, initializer_range=initializer_range,
                                    layers_name="num_encoder_layers")
    check_choice("position", position, POSITIONS)
    attention_position = position if position in ("rotary", "alibi") else None
    # No padding_idx (as T5's shared embedding): the pad id is T5's decoder start token, so its row is the
    # decoder's first input on every row and must start random and learn through the lookup.
    embeddings = TextEmbedding(vocab_size, hidden_size, max_positions, "none" if attention_position else position, 0,
                               None, None if pre_norm else norm, norm_eps, check_prob("dropout", dropout), None)
    if pad_token_id is not None and not 0 <= check_int("pad_token_id", pad_token_id, 0) < vocab_size:
        raise ValueError(f"pad_token_id: expected an id in [0, vocab_size={vocab_size}), got {pad_token_id}")
    shape = dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, activation=activation, norm=norm, norm_eps=norm_eps,
                 pre_norm=pre_norm, bias=bias, dropout=dropout, attention_dropout=attention_dropout,
                 attention_position=attention_position, rotary_base=rotary_base,
                 ff_dropout=dropout if ff_dropout is None else ff_dropout)
    final = (lambda: make_norm(norm, hidden_size, norm_eps)) if pre_norm else (lambda: None)
    encoder = TextEncoder(embeddings, make_layers(num_layers=num_encoder_layers, **shape), final(), causal=False)
    model = EncoderDecoder(encoder, make_layers(num_layers=num_decoder_layers, cross_attention=True, **shape), final(),
                           final_dropout=dropout, config=config, gradient_checkpointing=gradient_checkpointing)
    return init_weights(model, initializer_range)
