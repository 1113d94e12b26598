"""Self-attention modules on ``fastpt.ops.attention``: a fused-QKV multi-head (GQA) attention and a
drop-in ``torch.nn.TransformerEncoderLayer``.

Parameters carry torch's names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``; ``linear1``,
``linear2``, ``norm1``, ``norm2``) and layouts, so a state_dict of ``torch.nn.MultiheadAttention``
or ``torch.nn.TransformerEncoderLayer`` loads unchanged: torch's ``in_proj_weight`` stacks the
q, k and v projections with heads contiguous inside each, exactly the rows the fused projection
here splits into ``(H + 2 Hk)`` heads of ``D``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dispatch
from ..ops import _rng, _validate
from ..ops.attention import MAX_HEAD_DIM, attention, sdpa
from .dropout import Dropout

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def padding_to_seqlens(valid: torch.Tensor, name: str, *, none_if_full: bool = False) -> torch.Tensor | None:
    """Row lengths of a right-padded ``(B, S)`` validity mask (True / nonzero = real token).

    With ``none_if_full``, None when no row has padding (what a model stack passes on: its layers
    then run the plain mask, which on CUDA without dropout is torch's own SDPA, and the attention
    op has no lengths to read back). Raises ValueError naming ``name`` when a row is not
    right-padded (a padding token before a real one): the kernels express right padding through
    lengths, nothing else. One device sync for the checks in eager code. Under torch.compile
    (where a host read would break the graph and sync every call) the lengths are always
    returned, and the same check runs inside the graph (``torch._assert_async``): a left-padded
    mask then raises RuntimeError naming ``name`` on the CPU, and is a device-side assert on CUDA.
    A meta mask (shape inference) has no values: its lengths (meta) are returned unchecked.
    """
    if valid.dim() != 2:
        raise ValueError(f"{name}: expected shape (B, S), got {tuple(valid.shape)}")
    valid = valid != 0
    lengths = valid.sum(1)
    right = torch.arange(valid.shape[1], device=valid.device)[None, :] < lengths[:, None]
    bad = (right != valid).any(1)
    message = f"{name}: only right padding is supported (real tokens first, then padding)"
    if valid.is_meta:  # shape inference: no values to check or to read
        return lengths
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{message}; a row is not right-padded")
        return lengths
    bad_rows, short_rows = torch.stack([bad.sum(), (lengths < valid.shape[1]).sum()]).tolist()
    if bad_rows:
        raise ValueError(f"{message}; row {int(bad.nonzero()[0])} is not right-padded")
    return None if none_if_full and not short_rows else lengths


def check_padding_mask(name: str, mask, x: torch.Tensor) -> None:
    """TypeError / ValueError naming ``name`` unless it is a ``(B, S)`` tensor for ``x`` of shape
    (B, S) (token ids) or (B, S, E) (states)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, S), got {type(mask).__name__}")
    if x.dim() not in (2, 3) or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}: expected shape (B, S) = {tuple(x.shape[:2])} (from the input of shape "
                         f"{tuple(x.shape)}), got {tuple(mask.shape)}")


def _not_scriptable(module: nn.Module):
    """TorchScript cannot compile the fused attention (Python dispatch over custom ops) nor a forward
    with keyword-only arguments: say so, instead of TorchScript's error from deep inside."""
    raise RuntimeError(
        f"torch.jit.script: {type(module).__module__}.{type(module).__qualname__} is not scriptable (its fused "
        f"attention is Python dispatch over custom ops, and forward takes keyword-only arguments); use "
        f"torch.compile, or script torch's module loaded with this one's state_dict (the parameter names match)")


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, GQA, and every pre-training mask.

    Args:
        embed_dim: model width E.
        num_heads: query heads H; the head dim is ``head_dim`` or ``E // H``.
        num_kv_heads: key / value heads Hk dividing H (default H; 1 is multi-query attention).
        bias: biases on the projections.
        dropout: attention-probability dropout in training (counter-based, seeded from torch's
            default generator on each call).
        causal: default mask kind of ``forward`` (a call may override it with ``is_causal``).
        head_dim: per-head width D when it is not ``E // H``.
        backend: forced attention backend, or None for the fastest that fits. The calls that run
            torch's SDPA (a general ``attn_mask``, head dims over 256) then raise
            ``fastpt.BackendError``: no fastpt backend serves them.

    Parameters: ``in_proj_weight`` ``((H + 2 Hk) D, E)``, ``in_proj_bias``, ``out_proj``
    (``Linear(H D, E)``), named and laid out as in ``torch.nn.MultiheadAttention``.

    Not scriptable: ``torch.jit.script`` raises (the fused op is Python dispatch over custom ops,
    and ``forward`` takes keyword-only arguments); ``torch.compile`` traces it whole.
    """

    batch_first = True  # (B, S, E), as torch.nn.MultiheadAttention(batch_first=True); torch's TransformerEncoder reads it

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = True,
                 dropout: float = 0.0, causal: bool = False, head_dim: int | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        embed_dim, num_heads = _validate.positive_int("embed_dim", embed_dim), _validate.positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _validate.positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim: expected a multiple of num_heads={num_heads}, got {embed_dim} "
                                 f"(or give head_dim)")
            head_dim = embed_dim // num_heads
        head_dim = _validate.positive_int("head_dim", head_dim)
        dropout = _validate.probability("dropout", dropout)
        if dropout >= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.dropout, self.causal, self.backend = dropout, causal, backend
        kw = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty((num_heads + 2 * num_kv_heads) * head_dim, embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty((num_heads + 2 * num_kv_heads) * head_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **kw)
        self.reset_parameters()

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` before it compiles: a clear error instead of TorchScript's."""
        _not_scriptable(self)

    def reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(..., H, D)``, k, v ``(..., Hk, D)``: views into one projection output, no copies.

        ``split`` rather than three slices: its backward concatenates the three gradients into the
        projection's (one write), where each slice's backward fills a zero tensor the size of the
        whole projection and autograd adds the three (~5x the traffic; the gradient assembly of a
        16 x 512 x 768 layer took 61 ms sliced, 16 ms split, float32 on 2 Zen 5 cores)."""
        h, hk = self.num_heads, self.num_kv_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (h + 2 * hk, self.head_dim))
        return qkv.split((h, hk, hk), dim=-2)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                seqlens: torch.Tensor | None = None, prefix_lens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        """Self-attention of ``x``.

        Args:
            x: ``(B, S, E)``, or packed ``(T, E)`` with ``cu_seqlens`` (int32 ``(N + 1,)``).
            seqlens: int ``(B,)`` valid lengths of right-padded rows.
            prefix_lens: int ``(B,)`` / ``(N,)``: prefix-LM (bidirectional prefix, causal rest).
            attention_mask: Hugging Face style ``(B, S)``, 1 for tokens and 0 for padding; must be
                right-padded (turned into ``seqlens``; a mask without padding into no mask, so
                that on CUDA without dropout the rows reach torch's SDPA); not together with
                ``seqlens``.
            attn_mask: a general mask in ``F.scaled_dot_product_attention`` semantics (bool True =
                attend, or additive float), broadcastable to ``(B, H, S, S)``; runs torch's SDPA.
            is_causal: overrides the module's ``causal``.

        Returns ``(B, S, E)`` / ``(T, E)``; outputs of padded positions are ``out_proj``'s bias.
        Raises ValueError / TypeError naming the argument (see ``fastpt.ops.attention``); under
        torch.compile the value checks (right padding, lengths) run in the graph and raise
        RuntimeError on the CPU, a device-side assert on CUDA.
        """
        causal = self.causal if is_causal is None else bool(is_causal)
        if attention_mask is not None:
            if seqlens is not None:
                raise ValueError("attention_mask: give either attention_mask or seqlens, not both")
            check_padding_mask("attention_mask", attention_mask, x)
            seqlens = padding_to_seqlens(attention_mask, "attention_mask", none_if_full=True)
        q, k, v = self.project(x)
        p = self.dropout if self.training else 0.0
        seed = _rng.fresh_seed() if p > 0 else 0
        if attn_mask is None and self.head_dim > MAX_HEAD_DIM and q.dim() == 4 and cu_seqlens is None \
                and prefix_lens is None:  # past the kernels' head dims: torch's SDPA with a dense mask, as torch's layer
            s = q.shape[1]
            dense = torch.ones(s, s, dtype=torch.bool, device=q.device)
            out = self._general(q, k, v, dense.tril() if causal else dense, seqlens, False, p, seed, None, None)
        elif attn_mask is not None:
            out = self._general(q, k, v, attn_mask, seqlens, causal, p, seed, cu_seqlens, prefix_lens)
        else:
            out = attention(q, k, v, causal=causal, prefix_lens=prefix_lens, seqlens=seqlens,
                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=p, seed=seed,
                            backend=self.backend)
        return self.out_proj(out.flatten(-2))

    def _general(self, q, k, v, attn_mask, seqlens, causal, p, seed, cu_seqlens, prefix_lens):
        """An arbitrary dense mask: torch's SDPA with the padding folded into the mask."""
        if cu_seqlens is not None or prefix_lens is not None or causal:
            raise ValueError("attn_mask: a general mask cannot be combined with cu_seqlens, prefix_lens or causal")
        if q.dim() != 4:
            raise ValueError(f"attn_mask: needs (B, S, E) input, got x with {q.dim() - 1} dims")
        s = q.shape[1]
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        elif attn_mask.is_floating_point():
            mask = attn_mask.to(q.dtype)
        else:
            raise TypeError(f"attn_mask: expected a bool or float tensor, got dtype {attn_mask.dtype}")
        b, h = q.shape[0], q.shape[2]
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, h, s, s))
        except RuntimeError:
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, S, S) = {(b, h, s, s)}, got "
                             f"{tuple(attn_mask.shape)}") from None
        valid = None
        if seqlens is not None:
            valid = torch.arange(s, device=q.device)[None, :] < seqlens.to(q.device)[:, None]  # (B, S)
            keys = valid[:, None, None, :]
            mask = mask & keys if mask.dtype == torch.bool else mask.masked_fill(~keys, float("-inf"))
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=p,
                   enable_gqa=self.num_kv_heads != self.num_heads, seed=seed, backend=self.backend).transpose(1, 2)
        if valid is not None:  # padded query rows may see no key at all (NaN in torch): 0, as elsewhere
            out = out.masked_fill(~valid[:, :, None, None], 0.0)
        return out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}, causal={self.causal}")


@contextlib.contextmanager
def attention_backend(module: nn.Module, backend: str | None):
    """Every fastpt attention layer in ``module`` (``MultiheadSelfAttention`` and the models' layers built on it)
    runs ``backend`` inside the block; each layer's own choice is restored after.

    For exporters: ``torch.onnx.export`` (dynamo) has no translation for fastpt's attention op
    (``fastpt::attention_fwd``) and stops at it; under ``attention_backend(model, "reference")`` the layers
    compute with plain PyTorch ops (the masks written out, as ``fastpt.ops.attention``'s reference), which it
    translates: e.g. ``with attention_backend(model, "reference"): torch.onnx.export(model, args, dynamo=True)``.
    ``torch.export`` keeps the custom op as it is (no need for this). ValueError naming ``backend`` for a
    name no op declares."""
    if backend is not None and backend not in _dispatch.BACKENDS:
        raise ValueError(f"backend: expected None or one of {list(_dispatch.BACKENDS)}, got {backend!r}")
    layers = [m for m in module.modules() if isinstance(m, MultiheadSelfAttention)]
    saved = [m.backend for m in layers]
    try:
        for m in layers:
            m.backend = backend
        yield module
    finally:
        for m, b in zip(layers, saved):
            m.backend = b


class TransformerEncoderLayer(nn.Module):
    """Drop-in for ``torch.nn.TransformerEncoderLayer(batch_first=True)`` on fused attention.

    Same arguments, parameter names and math (post-norm by default, pre-norm with
    ``norm_first=True``), so ``load_state_dict`` of a torch layer works. Differences: only
    ``batch_first=True`` (the default activation is relu, as torch's); ``src_key_padding_mask`` must be right
    padding; extra keywords ``num_kv_heads`` (GQA), ``backend``, and in ``forward``
    ``cu_seqlens`` / ``max_seqlen`` (packed ``(T, E)`` input) and ``prefix_lens``.

    Outputs at padded positions differ from torch's (those at real tokens match): a padded query
    attends to nothing here, so its attention output is ``self_attn.out_proj``'s bias (zero without
    bias) and its output is the rest of the layer (residual, norms, feed-forward) applied to that;
    torch's padded queries attend to the real tokens of their row. Neither carries meaning (the
    real tokens never see a padded one); mask them out downstream.

    Not scriptable: ``torch.jit.script`` raises (use ``torch.compile``, or script
    ``torch.nn.TransformerEncoderLayer`` loaded with this layer's state_dict).

    Args:
        d_model, nhead, dim_feedforward, dropout, activation ("relu", "gelu" or a callable),
        layer_norm_eps, batch_first, norm_first, bias, device, dtype: as in torch.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = True, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, num_kv_heads: int | None = None, backend: str | None = None):
        super().__init__()
        if not batch_first:
            raise ValueError("batch_first: fastpt's TransformerEncoderLayer is batch-first only (B, S, E); "
                             "transpose (S, B, E) inputs first")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
            activation = ACTIVATIONS[activation]
        kw = dict(device=device, dtype=dtype)
        self.batch_first, self.norm_first = True, norm_first
        self.self_attn = MultiheadSelfAttention(d_model, nhead, num_kv_heads, bias=bias, dropout=dropout,
                                                backend=backend, **kw)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = activation

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` before it compiles: a clear error instead of TorchScript's."""
        _not_scriptable(self)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
        """``src`` ``(B, S, E)``, unbatched ``(S, E)`` (as torch), or packed ``(T, E)`` with ``cu_seqlens``
        -> the same shape.

        src_mask: torch semantics, ``(S, S)`` or ``(B * nhead, S, S)``, bool (True = not allowed) or
            additive float; with
            ``is_causal=True`` it is taken to be the causal mask (as torch's hint says) and the
            kernels' causal mask is used instead of it.
        src_key_padding_mask: ``(B, S)`` bool (True = padding) or additive float (-inf = padding),
            right-padded.
        """
        if isinstance(src, torch.Tensor) and src.dim() == 2 and cu_seqlens is None:  # torch's unbatched (S, E)
            if src_key_padding_mask is not None and src_key_padding_mask.dim() != 1:
                raise ValueError(f"src_key_padding_mask: an unbatched src (S, E) takes an (S,) mask, got "
                                 f"{tuple(src_key_padding_mask.shape)}")
            return self.forward(src[None], src_mask,
                                None if src_key_padding_mask is None else src_key_padding_mask[None], is_causal,
                                prefix_lens=prefix_lens)[0]
        attn = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, prefix_lens=prefix_lens, is_causal=is_causal)
        if src_key_padding_mask is not None:
            pad = src_key_padding_mask
            check_padding_mask("src_key_padding_mask", pad, src)
            valid = ~pad if pad.dtype == torch.bool else pad == 0
            attn["seqlens"] = padding_to_seqlens(valid, "src_key_padding_mask", none_if_full=True)
        if src_mask is not None and not is_causal:
            if src_mask.dim() == 3 and src.dim() == 3:  # torch's per-head form (B * nhead, S, S)
                b, h = src.shape[0], self.self_attn.num_heads
                if src_mask.shape[0] != b * h:
                    raise ValueError(f"src_mask: a 3-D mask is (batch * nhead, S, S) = ({b * h}, S, S), got "
                                     f"{tuple(src_mask.shape)}")
                src_mask = src_mask.unflatten(0, (b, h))
            elif src_mask.dim() != 2:
                raise ValueError(f"src_mask: expected (S, S) or (batch * nhead, S, S), got {tuple(src_mask.shape)}")
            attn["attn_mask"] = ~src_mask if src_mask.dtype == torch.bool else src_mask
        x = src
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), **attn))
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self.dropout1(self.self_attn(x, **attn)))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
