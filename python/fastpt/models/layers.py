"""Transformer parts the backbones are assembled from: norms, feed-forward, self- and cross-attention,
and a layer that composes them (torchtune style: the parts are arguments, not base classes).

Every mask kind (bidirectional, causal, prefix-LM, right padding, packed documents) reaches
``fastpt.ops.attention`` as its keyword arguments (``causal``, ``prefix_lens``, ``seqlens``,
``cu_seqlens``): no dense ``(S, S)`` mask tensor is built on that path. ALiBi is the exception,
see ``SelfAttention``.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dispatch
from ..nn.attention import MultiheadSelfAttention
from ..nn.dropout import Dropout
from ..ops import _rng
from ..ops.attention import attention

ACTIVATIONS = {
    "gelu": F.gelu,  # erf form (BERT, ViT)
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,
    "silu": F.silu,
}
GLU_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}  # gate activation of the gated variants
NORMS = ("layernorm", "rmsnorm")
ATTENTION_POSITIONS = (None, "rotary", "alibi")


# ----------------------------------------------------------------------------- argument checks


def check_choice(name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices``, else ValueError naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0 (inf and NaN are refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return float(value)


def check_heads(dim: int, heads: int, kv_heads: int | None, dim_name: str = "hidden_size",
                heads_name: str = "num_heads", kv_name: str = "num_kv_heads") -> None:
    check_int(heads_name, heads)
    if dim % heads:
        raise ValueError(f"{dim_name}: expected a multiple of {heads_name}={heads}, got {dim}")
    if kv_heads is not None and (check_int(kv_name, kv_heads) > heads or heads % kv_heads):
        raise ValueError(f"{kv_name}: expected a divisor of {heads_name}={heads}, got {kv_heads}")


# ----------------------------------------------------------------------------- norms and feed-forward


class RMSNorm(nn.Module):
    """Root-mean-square norm (T5, Llama): ``x / sqrt(mean(x**2) + eps) * weight`` over the last dim.

    Computed in float32 for half inputs (the mean of squares loses too much in fp16), returned
    in the input dtype. ``x`` ``(..., dim)`` -> ``(..., dim)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float = 1e-5, *, name: str = "norm") -> nn.Module:
    """``nn.LayerNorm`` ("layernorm") or ``RMSNorm`` ("rmsnorm") over ``dim``; ValueError naming
    ``name`` for anything else."""
    check_choice(name, kind, NORMS)
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """Position-wise MLP: ``fc2(dropout(act(fc1(x))))``, or gated ``fc2(act(a) * b)`` where
    ``a, b = fc1(x).chunk(2)`` for "swiglu" / "geglu" (fc1 then has ``2 * hidden`` outputs).

    Args:
        dim: model width; hidden: inner width.
        activation: "gelu" (erf), "gelu_tanh" (GPT-2's gelu_new), "relu", "silu", "swiglu", "geglu".
        bias: biases on fc1 and fc2.
        dropout: on the inner activations (the residual dropout is the layer's).
    ``x`` ``(..., dim)`` -> ``(..., dim)``.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        check_choice("activation", activation, list(ACTIVATIONS) + list(GLU_ACTIVATIONS))
        check_int("hidden", hidden)
        self.activation, self.gated = activation, activation in GLU_ACTIVATIONS
        self.fc1 = nn.Linear(dim, hidden * (2 if self.gated else 1), bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.dropout = Dropout(check_prob("dropout", dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = GLU_ACTIVATIONS[self.activation](a) * b
        else:
            h = ACTIVATIONS[self.activation](h)
        return self.fc2(self.dropout(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# ----------------------------------------------------------------------------- positions and masks


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token inside its document: long ``(T,)`` from int32 ``(N + 1,)``."""
    idx = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(cu[1:], idx, right=True).clamp(max=max(cu.shape[0] - 2, 0))
    return idx - cu[doc]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (GPT-NeoX / Llama "rotate half" layout) of q or k.

    x ``(B, S, H, D)`` or packed ``(T, H, D)`` with D even; positions long ``(B, S)``, ``(S,)`` or
    ``(T,)``. The angles and the rotation run in float32; the result has x's dtype.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(x.device, torch.float32)[..., None] * inv_freq  # (..., S, D/2)
    angles = torch.cat([angles, angles], -1)[..., None, :]  # (..., S, 1, D)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()).to(x.dtype)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), float32 ``(heads,)``: the geometric sequence for a power
    of two, interleaved with the next power's for other head counts (as in the reference code)."""
    return torch.tensor(alibi_slope_values(heads), dtype=torch.float32)


def alibi_slope_values(heads: int) -> tuple[float, ...]:
    """``alibi_slopes`` as Python floats (plain arithmetic: traced by torch.compile as constants)."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(heads))
    return tuple(power_of_two(closest) + power_of_two(2 * closest)[0::2][:heads - closest])


def dense_attention_mask(batch: int, seq: int, device, *, causal: bool = False, prefix_lens=None, seqlens=None,
                         cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask rule of ``fastpt.ops.attention`` written out densely (for ALiBi and for tests).

    Returns ``allowed`` bool ``(B, S, S)`` (query, key) and ``valid`` bool ``(B, S)`` (tokens inside
    a row / document). Query ``i`` attends key ``j`` iff both lie in the same document and
    ``local(j) <= max(local(i), prefix - 1)``, where prefix is the document's length when
    bidirectional, 0 when causal, ``prefix_lens[n]`` for prefix-LM. Packed input: ``batch == 1``
    and ``cu_seqlens`` int32 ``(N + 1,)``.
    """
    idx = torch.arange(seq, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device, torch.int64)
        doc = torch.searchsorted(cu[1:], idx, right=True).clamp(max=max(cu.shape[0] - 2, 0))
        local = (idx - cu[doc])[None]
        lengths = (cu[1:] - cu[:-1])[doc][None]
        valid = (idx < cu[-1])[None]
        prefix = prefix_lens.to(device, torch.int64)[doc][None] if prefix_lens is not None else None
        doc = doc[None]
    else:
        doc = torch.zeros(batch, seq, dtype=torch.int64, device=device)
        local = idx.expand(batch, seq)
        lengths = (seqlens.to(device, torch.int64) if seqlens is not None
                   else torch.full((batch,), seq, device=device))[:, None].expand(batch, seq)
        valid = local < lengths
        prefix = prefix_lens.to(device, torch.int64)[:, None].expand(batch, seq) if prefix_lens is not None else None
    if prefix is None:
        prefix = torch.zeros_like(lengths) if causal else lengths
    reach = torch.maximum(local, prefix - 1)  # the last local key each query may see
    allowed = ((doc[:, :, None] == doc[:, None, :]) & valid[:, :, None] & valid[:, None, :]
               & (local[:, None, :] <= reach[:, :, None]))
    return allowed, valid


# ----------------------------------------------------------------------------- attention


class SelfAttention(MultiheadSelfAttention):
    """Multi-head self-attention (GQA) with optional rotary or ALiBi positions, on fastpt's fused op.

    Args:
        dim: model width E; heads: query heads H (head dim ``E // H``); kv_heads: key/value heads
            (default H; must divide H).
        bias: biases on the q/k/v and output projections; qkv_bias: override for q/k/v only
            (ViT's ``qkv_bias``).
        dropout: attention-probability dropout while training.
        position: None, "rotary" (applied to q and k before the fused op; D must be even) or
            "alibi". ALiBi adds a per-head linear distance bias that the fused op cannot take (it has
            no bias input), so that path builds the dense float bias ``(B, H, S, S)`` from the same
            mask rule (``dense_attention_mask``) and runs ``torch.nn.functional.
            scaled_dot_product_attention``: O(S^2) memory, meant for short rows.
        rotary_base: the rotary frequency base.

    Parameters (named as in ``torch.nn.MultiheadAttention``): ``in_proj_weight`` ``((H + 2 Hk) D, E)``
    stacking the q, k and v projections (so Hugging Face's separate q/k/v weights map onto row
    blocks exactly), ``in_proj_bias``, ``out_proj``.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, bias: bool = True, dropout: float = 0.0,
                 position: str | None = None, rotary_base: float = 10000.0, *, qkv_bias: bool | None = None,
                 backend: str | None = None):
        check_heads(dim, heads, kv_heads, "dim", "heads", "kv_heads")
        check_choice("position", position, ATTENTION_POSITIONS)
        super().__init__(dim, heads, kv_heads, bias=bias if qkv_bias is None else qkv_bias,
                         dropout=check_prob("dropout", dropout), backend=backend)
        if qkv_bias is not None and qkv_bias != bias:  # ViT may keep the output bias without q/k/v ones
            self.out_proj = nn.Linear(dim, dim, bias=bias)
        if position == "rotary" and self.head_dim % 2:
            raise ValueError(f"position: rotary needs an even head dim, got dim={dim} / heads={heads} = "
                             f"{self.head_dim}")
        self.position, self.rotary_base = position, check_positive("rotary_base", rotary_base)

    def forward(self, x: torch.Tensor, *, causal: bool | None = None, seqlens: torch.Tensor | None = None,
                prefix_lens: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of ``x`` ``(B, S, E)`` (or packed ``(T, E)`` with ``cu_seqlens``) -> same shape.

        causal / seqlens (B,) / prefix_lens (B,) or (N,) / cu_seqlens int32 (N + 1,) / max_seqlen:
        as in ``fastpt.ops.attention``. position_ids: long ``(B, S)`` / ``(T,)`` for rotary and
        ALiBi (default 0.. per row, per document when packed). Padded query rows give ``out_proj``'s
        bias. Raises the ops' ValueError / TypeError naming the argument.
        """
        causal = self.causal if causal is None else bool(causal)
        q, k, v = self.project(x)
        p = self.dropout if self.training else 0.0
        if self.position is not None and position_ids is None:
            if cu_seqlens is not None:
                position_ids = document_positions(cu_seqlens, x.shape[0])
            else:
                position_ids = torch.arange(x.shape[-2], device=x.device)
        if self.position == "rotary":
            q, k = apply_rotary(q, position_ids, self.rotary_base), apply_rotary(k, position_ids, self.rotary_base)
        if self.position == "alibi":
            out = self._alibi(q, k, v, position_ids, p, causal=causal, prefix_lens=prefix_lens, seqlens=seqlens,
                              cu_seqlens=cu_seqlens)
        else:
            out = attention(q, k, v, causal=causal, prefix_lens=prefix_lens, seqlens=seqlens, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, dropout_p=p, seed=_rng.fresh_seed() if p > 0 else 0,
                            backend=self.backend)
        return self.out_proj(out.flatten(-2))

    def _alibi(self, q, k, v, positions, p, **mask):
        packed = q.dim() == 3
        if packed:
            q, k, v, positions = q[None], k[None], v[None], positions.reshape(1, -1)
        b, s, h, _ = q.shape
        allowed, valid = dense_attention_mask(b, s, q.device, **mask)
        positions = positions.to(q.device).expand(b, s)
        dist = (positions[:, None, :] - positions[:, :, None]).abs().to(torch.float32)  # (B, S, S)
        slopes = _dispatch.device_constant(alibi_slope_values(h), torch.float32, q.device)
        bias = -slopes[None, :, None, None] * dist[:, None]
        # padded queries have no key: let them see all (finite softmax), zero their rows after
        allowed = allowed | ~valid[:, :, None]
        bias = bias.masked_fill(~allowed[:, None], float("-inf")).to(q.dtype)
        group = h // k.shape[2]
        k, v = (t.repeat_interleave(group, dim=2) if group > 1 else t for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias, dropout_p=p).transpose(1, 2)
        out = out.masked_fill(~valid[:, :, None, None], 0.0)
        return out[0] if packed else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", position={self.position!r}"


class CrossAttention(nn.Module):
    """Decoder-over-encoder attention (T5 / BART style).

    Query length and memory length differ, which the fused op (self-attention only) does not
    take, so this runs ``torch.nn.functional.scaled_dot_product_attention`` with the memory's key
    padding as a boolean ``(B, 1, 1, S)`` mask (any padding pattern is fine here).

    Args: dim (E, queries), heads, kv_dim (memory width, default E), bias, dropout.
    Parameters: ``q_proj`` (E -> E), ``kv_proj`` (kv_dim -> 2E: k rows then v rows), ``out_proj``.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        check_heads(dim, heads, None, "dim", "heads")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, check_prob("dropout", dropout)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.kv_proj = nn.Linear(kv_dim or dim, 2 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, T, E)``, memory ``(B, S, kv_dim)``, memory_mask ``(B, S)`` 1/True = real token ->
        ``(B, T, E)``. A memory row with no real token gives NaN (as torch's SDPA does)."""
        q = self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv_proj(memory).unflatten(-1, (2, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        mask = None
        if memory_mask is not None:
            if memory_mask.shape != memory.shape[:2]:
                raise ValueError(f"memory_mask: expected shape {tuple(memory.shape[:2])}, "
                                 f"got {tuple(memory_mask.shape)}")
            mask = (memory_mask != 0)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(-2))


# ----------------------------------------------------------------------------- the layer


class TransformerLayer(nn.Module):
    """One transformer block composed from its parts (torchtune style).

    Args:
        attn: a ``SelfAttention``; mlp: a ``FeedForward`` (any module ``(..., E) -> (..., E)``).
        norm1, norm2: the norms around attention and MLP.
        pre_norm: ``x + f(norm(x))`` (GPT-2, ViT, T5) if True, else ``norm(x + f(x))`` (BERT).
        cross_attn, cross_norm: optional ``CrossAttention`` over an encoder memory and its norm
            (decoder layers of an encoder-decoder), between self-attention and MLP.
        dropout: on each branch output before the residual add (BERT's hidden dropout).
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module, *, pre_norm: bool = True,
                 cross_attn: nn.Module | None = None, cross_norm: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        if (cross_attn is None) != (cross_norm is None):
            raise ValueError("cross_norm: give cross_attn and cross_norm together")
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2
        self.cross_attn, self.cross_norm = cross_attn, cross_norm
        self.pre_norm = pre_norm
        self.dropout = Dropout(check_prob("dropout", dropout))

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, **attn_kwargs) -> torch.Tensor:
        """x ``(B, S, E)`` or packed ``(T, E)`` -> same shape. ``attn_kwargs`` go to the self-attention
        (causal, seqlens, prefix_lens, cu_seqlens, max_seqlen, position_ids); memory ``(B, S', E')``
        and memory_mask ``(B, S')`` to the cross-attention (required when the layer has one)."""
        x = self._residual(x, lambda h: self.attn(h, **attn_kwargs), self.norm1)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("memory: this layer has cross-attention and needs the encoder states")
            x = self._residual(x, lambda h: self.cross_attn(h, memory, memory_mask), self.cross_norm)
        return self._residual(x, self.mlp, self.norm2)

    def _residual(self, x, fn, norm):
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))


DEFAULT_INIT_STD = 0.02  # BERT's initializer_range: every builder's and head's default


def init_weights(module: nn.Module, std: float = DEFAULT_INIT_STD) -> nn.Module:
    """BERT-style initialisation for pre-training from scratch: normal(0, std) weights (Linear, Conv,
    Embedding with its padding row zeroed, the fused q/k/v weight, learned cls / mask tokens and
    position tables), zero biases, unit norms. Returns ``module``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            if isinstance(m, MultiheadSelfAttention):
                m.in_proj_weight.normal_(0.0, std)
                if m.in_proj_bias is not None:
                    m.in_proj_bias.zero_()
            for name in ("cls_token", "mask_token", "position_embeddings"):
                t = getattr(m, name, None)
                if isinstance(t, nn.Parameter):
                    t.normal_(0.0, std)
    return module
