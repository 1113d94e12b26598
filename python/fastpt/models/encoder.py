"""Text transformer stacks: ``TextEncoder`` (BERT / RoBERTa / ALBERT-style encoders and GPT-2-style
causal decoders alike: the mask kind is an argument) and its typed builder ``text_encoder``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn.attention import check_padding_mask, padding_to_seqlens
from ..ops.attention import check_mask_args
from .embeddings import TEXT_POSITIONS, TextEmbedding
from .layers import (ACTIVATIONS, GLU_ACTIVATIONS, NORMS, CrossAttention, FeedForward, SelfAttention,
                     TransformerLayer, check_choice, check_heads, check_int, check_positive, check_prob, init_weights,
                     document_positions, make_norm)
from .outputs import BackboneOutput

POSITIONS = TEXT_POSITIONS + ("rotary", "alibi")


def run_layers(module: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor, want_hidden: bool,
               **kwargs) -> tuple[torch.Tensor, tuple | None]:
    """Apply ``layers`` in order, through activation checkpointing when ``module.gradient_checkpointing``
    is set and gradients are on. Returns (x, hidden states (input, after each layer) or None)."""
    hidden = [x] if want_hidden else None
    ckpt = module.gradient_checkpointing and module.training and torch.is_grad_enabled()
    for layer in layers:
        # non-reentrant checkpointing takes keyword arguments and restores torch's RNG state on the
        # recompute, so dropout (and the attention-dropout seed drawn from it) replays identically
        x = checkpoint(layer, x, use_reentrant=False, **kwargs) if ckpt else layer(x, **kwargs)
        if want_hidden:
            hidden.append(x)
    return x, (tuple(hidden) if want_hidden else None)


class TextEncoder(nn.Module):
    """Embedding -> transformer layers -> optional final norm, over padded rows or packed documents.

    Args:
        embeddings: a ``TextEmbedding``.
        layers: ``TransformerLayer``s (self-attention only).
        final_norm: norm after the last layer (pre-norm stacks: GPT-2's ``ln_f``), or None.
        causal: the default mask kind (False: bidirectional encoder, True: causal LM).
        config: the dict it was built from (kept as ``.config``).
        gradient_checkpointing: recompute each layer in the backward (also settable later).

    Attributes: hidden_size, vocab_size, embeddings (``.embeddings.word_embeddings`` for weight
    tying), layers, final_norm, causal, config, gradient_checkpointing.
    """

    def __init__(self, embeddings: TextEmbedding, layers: Sequence[nn.Module], final_norm: nn.Module | None = None, *,
                 causal: bool = False, config: dict | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.causal = bool(causal)
        self.config = dict(config or {})
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.hidden_size, self.vocab_size = embeddings.dim, embeddings.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                prefix_lens: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, causal: bool | None = None,
                output_hidden_states: bool = False) -> BackboneOutput:
        """Encode token ids.

        Args:
            input_ids: long ``(B, S)``; packed documents: ``(T,)`` or ``(1, T)`` with ``cu_seqlens``.
            attention_mask: ``(B, S)`` 1 = token, 0 = padding; must be right padding (it becomes
                the fused op's ``seqlens``), else ValueError naming attention_mask (RuntimeError
                under torch.compile, where the check runs inside the graph).
            token_type_ids, position_ids: shaped like input_ids (defaults: segment 0; positions
                0.. per row, or per document when packed, plus the embedding's offset).
            prefix_lens: int ``(B,)`` (``(N,)`` packed): bidirectional prefix, causal after (prefix-LM).
            cu_seqlens: int32 ``(N + 1,)`` document boundaries of packed input; max_seqlen optional.
            causal: overrides the model's default mask kind.
            output_hidden_states: also return every layer's input / output.

        Returns ``BackboneOutput``: last_hidden_state ``(B, S, D)`` (shaped like input_ids plus D
        when packed). States at padded positions carry no meaning.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask: not with cu_seqlens (packed documents have no padding)")
            if input_ids.dim() == 2 and input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: packed input must be (T,) or (1, T), got {tuple(input_ids.shape)}")
        elif input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (B, S) (or packed (T,) with cu_seqlens), "
                             f"got {tuple(input_ids.shape)}")
        if attention_mask is not None:
            check_padding_mask("attention_mask", attention_mask, input_ids)
        seqlens = (padding_to_seqlens(attention_mask, "attention_mask", none_if_full=True)
                   if attention_mask is not None else None)
        if cu_seqlens is not None or prefix_lens is not None:  # before the embeddings index by position
            check_mask_args((input_ids.numel(),) if cu_seqlens is not None else input_ids.shape, input_ids.device,
                            causal=self.causal if causal is None else bool(causal), prefix_lens=prefix_lens,
                            seqlens=seqlens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        x = self.embeddings(input_ids, token_type_ids=token_type_ids, position_ids=position_ids, cu_seqlens=cu_seqlens)
        shape = x.shape
        if cu_seqlens is not None:
            x = x.reshape(-1, shape[-1])  # (T, D): the fused op's packed layout
            # rotary / ALiBi layers read document positions: found once here, not once per layer
            position_ids = (document_positions(cu_seqlens, x.shape[0]) if position_ids is None
                            else position_ids.reshape(-1))
        kwargs = dict(causal=self.causal if causal is None else bool(causal), seqlens=seqlens, prefix_lens=prefix_lens,
                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids)
        x, hidden = run_layers(self, self.layers, x, output_hidden_states, **kwargs)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if hidden is not None:
            hidden = tuple(h.reshape(shape) for h in hidden)
        return BackboneOutput(last_hidden_state=x.reshape(shape), hidden_states=hidden)


def make_layers(*, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int | None,
                intermediate_size: int, activation: str, norm: str, norm_eps: float, pre_norm: bool, bias: bool,
                dropout: float, attention_dropout: float, attention_position: str | None, rotary_base: float,
                qkv_bias: bool | None = None, cross_attention: bool = False,
                ff_dropout: float = 0.0) -> list[TransformerLayer]:
    """``num_layers`` transformer layers of one shape (shared by the text, encoder-decoder and vision
    builders). ``dropout`` is the residual-branch dropout; ``ff_dropout`` the feed-forward's inner one
    (between activation and output projection: T5's; BERT, GPT-2 and ViT have none)."""
    layers = []
    for _ in range(num_layers):
        attn = SelfAttention(hidden_size, num_heads, num_kv_heads, bias=bias, dropout=attention_dropout,
                             position=attention_position, rotary_base=rotary_base, qkv_bias=qkv_bias)
        mlp = FeedForward(hidden_size, intermediate_size, activation, bias=bias,
                          dropout=check_prob("ff_dropout", ff_dropout))
        cross = dict(cross_attn=None, cross_norm=None)
        if cross_attention:
            cross = dict(cross_attn=CrossAttention(hidden_size, num_heads, bias=bias, dropout=attention_dropout),
                         cross_norm=make_norm(norm, hidden_size, norm_eps))
        layers.append(TransformerLayer(attn, mlp, make_norm(norm, hidden_size, norm_eps),
                                       make_norm(norm, hidden_size, norm_eps), pre_norm=pre_norm, dropout=dropout,
                                       **cross))
    return layers


def check_stack(*, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, activation, norm, norm_eps,
                dropout, attention_dropout, initializer_range, layers_name="num_layers") -> int:
    """Validate the arguments every builder shares; returns the resolved intermediate size."""
    check_int("hidden_size", hidden_size)
    check_int(layers_name, num_layers, 0)
    check_heads(hidden_size, num_heads, num_kv_heads)
    check_choice("activation", activation, list(ACTIVATIONS) + list(GLU_ACTIVATIONS))
    check_choice("norm", norm, NORMS)
    check_positive("norm_eps", norm_eps)
    check_prob("dropout", dropout)
    check_prob("attention_dropout", attention_dropout)
    check_positive("initializer_range", initializer_range)
    return 4 * hidden_size if intermediate_size is None else check_int("intermediate_size", intermediate_size)


def text_encoder(*, vocab_size: int, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 intermediate_size: int | None = None, num_kv_heads: int | None = None, activation: str = "gelu",
                 norm: str = "layernorm", norm_eps: float = 1e-12, pre_norm: bool = False,
                 embedding_norm: bool | None = None, final_norm: bool | None = None, position: str = "learned",
                 max_positions: int = 512, position_offset: int = 0, rotary_base: float = 10000.0,
                 type_vocab_size: int = 2, embed_dim: int | None = None, pad_token_id: int | None = 0,
                 bias: bool = True, dropout: float = 0.1, attention_dropout: float = 0.1,
                 embedding_dropout: float | None = None, causal: bool = False, initializer_range: float = 0.02,
                 gradient_checkpointing: bool = False, share_layers: bool = False) -> TextEncoder:
    """Build a text transformer from flat, typed arguments (the YAML zoo names this function).

    Args:
        vocab_size: tokens V. hidden_size: width D. num_layers, num_heads: depth and heads
            (D % heads == 0). intermediate_size: MLP width (default 4 D). num_kv_heads: GQA
            key/value heads (default num_heads).
        activation: "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu".
        norm: "layernorm" or "rmsnorm"; norm_eps: its epsilon.
        pre_norm: pre-norm residuals (GPT-2, Llama) instead of post-norm (BERT).
        embedding_norm: norm the embeddings (default: ``not pre_norm``, as BERT vs GPT-2).
        final_norm: norm after the last layer (default: ``pre_norm``).
        position: "learned", "sinusoidal", "rotary", "alibi" or "none".
        max_positions: learned position rows. position_offset: first position (RoBERTa:
            pad_token_id + 1). rotary_base: rotary frequency base.
        type_vocab_size: segments (0: none). embed_dim: ALBERT factorised embedding width.
        pad_token_id: padding token id or None.
        bias: biases in attention and MLP. dropout: hidden (residual) dropout;
            attention_dropout: on attention probabilities; embedding_dropout: default ``dropout``.
        causal: default mask (True: causal LM). initializer_range: std of the normal init.
        gradient_checkpointing: recompute layers in the backward.
        share_layers: ALBERT's cross-layer parameter sharing: one layer's parameters applied
            ``num_layers`` times (``layers`` holds the same module at every index; its state_dict
            names each index, all one set of tensors).

    Returns a ``TextEncoder`` whose ``.config`` holds ``{"builder": "text_encoder", **arguments}``.
    Raises ValueError / TypeError naming the argument and the valid choices.
    """
    config = {"builder": "text_encoder", **{k: v for k, v in locals().items() if k != "config"}}
    intermediate_size = check_stack(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                    num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                                    activation=activation, norm=norm, norm_eps=norm_eps, dropout=dropout,
                                    attention_dropout=attention_dropout, initializer_range=initializer_range)
    check_choice("position", position, POSITIONS)
    attention_position = position if position in ("rotary", "alibi") else None
    embedding_norm = (not pre_norm) if embedding_norm is None else embedding_norm
    final_norm = pre_norm if final_norm is None else final_norm
    embeddings = TextEmbedding(vocab_size, hidden_size, max_positions, "none" if attention_position else position,
                               type_vocab_size, embed_dim, norm if embedding_norm else None, norm_eps,
                               check_prob("embedding_dropout", dropout if embedding_dropout is None
                                          else embedding_dropout), pad_token_id, position_offset)
    layers = make_layers(num_layers=min(num_layers, 1) if share_layers else num_layers, hidden_size=hidden_size,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                         activation=activation, norm=norm, norm_eps=norm_eps, pre_norm=pre_norm, bias=bias,
                         dropout=dropout, attention_dropout=attention_dropout, attention_position=attention_position,
                         rotary_base=rotary_base)
    if share_layers:
        layers = layers * num_layers  # the same module at every depth
    model = TextEncoder(embeddings, layers, make_norm(norm, hidden_size, norm_eps) if final_norm else None,
                        causal=causal, config=config, gradient_checkpointing=gradient_checkpointing)
    return init_weights(model, initializer_range)
