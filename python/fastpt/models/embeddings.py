"""Input embeddings: tokens (+ positions + segments) for text, patches for images.

Rotary and ALiBi positions live in the attention (``layers.SelfAttention``); a text embedding
for such a model uses ``position="none"``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dropout import Dropout
from ..ops import _validate
from .layers import check_choice, check_int, check_prob, document_positions, make_norm

TEXT_POSITIONS = ("learned", "sinusoidal", "none")
PATCH_POSITIONS = ("learned", "sincos")


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin / cos position code of "Attention is all you need": float32 ``(*positions.shape, dim)``.

    Channel ``2i`` is ``sin(pos / 10000**(2i / dim))`` and ``2i + 1`` the matching cos (an odd
    ``dim`` drops the last cos).
    """
    half = (dim + 1) // 2
    inv = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / dim))
    angles = positions.to(torch.float32)[..., None] * inv
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)[..., :dim]


class TextEmbedding(nn.Module):
    """Token + position + segment embedding, then norm and dropout, then (ALBERT) a projection.

    Args:
        vocab_size: V; dim: model width D.
        max_positions: rows of the learned position table (positions past it raise).
        position: "learned" (BERT, GPT-2), "sinusoidal" (fixed), or "none" (rotary / ALiBi models).
        type_vocab_size: segment (token type) vocabulary; 0 for none (GPT-2, T5).
        embed_dim: ALBERT's factorised embedding width E (default D): the tables are E wide and a
            ``projection`` Linear(E, D) follows the norm.
        norm: "layernorm", "rmsnorm" or None (GPT-2 has no embedding norm); eps: its epsilon.
        dropout: on the summed embedding.
        pad_token_id: the padding token (its embedding row starts at zero and gets no gradient).
        position_offset: first position index of a sequence. RoBERTa uses ``pad_token_id + 1``,
            and as in Hugging Face's ``create_position_ids_from_input_ids`` the padding tokens then
            take position ``pad_token_id`` and real tokens count from the offset, skipping pads.

    Parameters: ``word_embeddings``, ``position_embeddings`` (learned), ``token_type_embeddings``,
    ``norm``, ``projection`` (factorised only).
    """

    def __init__(self, vocab_size: int, dim: int, max_positions: int = 512, position: str = "learned",
                 type_vocab_size: int = 0, embed_dim: int | None = None, norm: str | None = "layernorm",
                 eps: float = 1e-12, dropout: float = 0.0, pad_token_id: int | None = None, position_offset: int = 0):
        super().__init__()
        check_int("vocab_size", vocab_size)
        check_int("dim", dim)
        check_int("max_positions", max_positions)
        check_choice("position", position, TEXT_POSITIONS)
        check_int("type_vocab_size", type_vocab_size, 0)
        check_int("position_offset", position_offset, 0)
        if position == "learned" and position_offset >= max_positions:
            raise ValueError(f"position_offset: expected < max_positions={max_positions} (the first position's "
                             f"row of the table), got {position_offset}")
        embed_dim = dim if embed_dim is None else check_int("embed_dim", embed_dim)
        if pad_token_id is not None and not 0 <= check_int("pad_token_id", pad_token_id, 0) < vocab_size:
            raise ValueError(f"pad_token_id: expected an id in [0, vocab_size={vocab_size}), got {pad_token_id}")
        self.vocab_size, self.dim, self.embed_dim = vocab_size, dim, embed_dim
        self.position, self.max_positions, self.position_offset = position, max_positions, position_offset
        self.pad_token_id = pad_token_id
        self.word_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, embed_dim) if position == "learned" else None
        self.token_type_embeddings = nn.Embedding(type_vocab_size, embed_dim) if type_vocab_size else None
        self.norm = make_norm(norm, embed_dim, eps, name="norm") if norm is not None else None
        self.dropout = Dropout(check_prob("dropout", dropout))
        self.projection = nn.Linear(embed_dim, dim) if embed_dim != dim else None

    def position_ids(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Default positions: long, shaped like ``input_ids`` (0.. per row, or per packed document,
        plus ``position_offset``, with Hugging Face's RoBERTa rule for padding; see the class)."""
        if cu_seqlens is not None:
            return document_positions(cu_seqlens, input_ids.shape[-1]).expand_as(input_ids) + self.position_offset
        if self.position_offset and self.pad_token_id is not None:
            real = (input_ids != self.pad_token_id).to(torch.int64)
            return (torch.cumsum(real, -1) + self.position_offset - 1) * real + self.pad_token_id * (1 - real)
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device) + self.position_offset
        return pos.expand_as(input_ids)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids long ``(B, S)`` or packed ``(T,)`` (with ``cu_seqlens`` int32 ``(N + 1,)`` the
        positions restart per document); token_type_ids / position_ids shaped like input_ids.
        Returns ``(..., D)`` in the parameters' dtype. Raises ValueError naming the argument for
        token types without a segment table or positions past ``max_positions``, and for ids that are
        not integer tensors shaped like input_ids or that fall outside their table (one host read
        for all of them, skipped under torch.compile)."""
        _validate.index_tensor("input_ids", input_ids, ndim_min=0)
        for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if t is not None:
                _validate.index_tensor(name, t, ndim_min=0)
                if t.shape != input_ids.shape:
                    raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                                     f"got {tuple(t.shape)}")
        if token_type_ids is not None and self.token_type_embeddings is None:
            raise ValueError("token_type_ids: this embedding has no segment table (type_vocab_size=0)")
        if self.position != "none" and position_ids is None:
            if (self.position == "learned" and cu_seqlens is None
                    and input_ids.shape[-1] + self.position_offset > self.max_positions):
                raise ValueError(f"input_ids: {input_ids.shape[-1]} tokens (+ position_offset "
                                 f"{self.position_offset}) exceed max_positions={self.max_positions}")
            position_ids = self.position_ids(input_ids, cu_seqlens)
        if not torch.compiler.is_compiling():
            tables = [("input_ids", input_ids, "vocab_size", self.vocab_size)]
            if token_type_ids is not None:
                tables.append(("token_type_ids", token_type_ids, "type_vocab_size",
                               self.token_type_embeddings.num_embeddings))
            if self.position == "learned":  # defaults too: a packed document longer than the table
                tables.append(("position_ids", position_ids, "max_positions", self.max_positions))
            _validate.ids_in_ranges(tables)  # torch's lookup: an unnamed IndexError on a CPU, a device assert on a GPU
        x = self.word_embeddings(input_ids)
        if self.position != "none":
            if self.position == "learned":
                x = x + self.position_embeddings(position_ids)
            else:
                x = x + sinusoidal_table(position_ids, self.embed_dim).to(x.dtype)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:  # segment 0, as Hugging Face's buffered zeros
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        x = self.dropout(x)
        return self.projection(x) if self.projection is not None else x


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table, float32 ``(1, [1 +] gh * gw, dim)`` (a zero row
    first for the cls token). Half the channels code the column, half the row, as in MAE's
    ``get_2d_sincos_pos_embed``; ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"dim: the 2-D sin-cos position code needs a multiple of 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def code(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    table = torch.cat([code(cols), code(rows)], 1)  # MAE: first half from the column (w) coordinate
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], 0)
    return table.to(torch.float32)[None]


def _pair(name, value) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name}: expected an int or a pair (height, width), got {value!r}")
    return tuple(check_int(name, v) for v in value)  # ints: 8.5 is no size


class PatchEmbedding(nn.Module):
    """Image to patch tokens (ViT / MAE): a strided Conv2d, a position table, an optional cls token.

    Args:
        image_size, patch_size: int or (height, width); the image must tile into patches.
        in_channels: any count (RGB 3, multispectral SatMAE-style 10+).
        dim: token width D.
        cls_token: prepend a learned cls token.
        position: "learned" (ViT) or "sincos" (MAE's fixed 2-D code, a non-persistent buffer).
        dropout: on the tokens.
        dynamic_size: accept images of any size that tiles into patches (DINO's local crops, fine-
            tuning at another resolution): the position table is resized bicubically to the image's
            patch grid, as timm / DINO / Hugging Face's ``interpolate_pos_encoding`` do. Off by
            default, so a wrong image size raises; an attribute, settable later.

    Parameters (Hugging Face ViT names): ``projection`` (Conv2d), ``cls_token`` ``(1, 1, D)``,
    ``position_embeddings`` ``(1, [1 +] L, D)``. Attributes num_patches L, grid_size, patch_size,
    in_channels, dynamic_size.
    """

    def __init__(self, image_size, patch_size, in_channels: int = 3, dim: int = 768, cls_token: bool = True,
                 position: str = "learned", dropout: float = 0.0, dynamic_size: bool = False):
        super().__init__()
        self.image_size, self.patch_size = _pair("image_size", image_size), _pair("patch_size", patch_size)
        for side, (i, p) in zip(("height", "width"), zip(self.image_size, self.patch_size)):
            if i % p:
                raise ValueError(f"patch_size: image {side} {i} is not a multiple of the patch {side} {p}")
        self.in_channels, self.dim = check_int("in_channels", in_channels), check_int("dim", dim)
        self.position = check_choice("position", position, PATCH_POSITIONS)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        n = self.num_patches + int(cls_token)
        if position == "learned":
            self.position_embeddings = nn.Parameter(torch.zeros(1, n, dim))
        else:
            self.register_buffer("position_embeddings", sincos_2d(dim, self.grid_size, cls_token), persistent=False)
        self.dropout = Dropout(check_prob("dropout", dropout))
        self.dynamic_size = bool(dynamic_size)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens before positions: ``(B, C, H, W)`` -> ``(B, L, D)``, row-major patch order.
        Floating-point pixels of another dtype are cast to the projection's (as Hugging Face's ViT
        does); integer pixels are refused (normalise them to floats first)."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values: expected a float torch.Tensor (B, C, H, W), "
                            f"got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values: expected floating-point pixels (normalised images), got dtype "
                            f"{pixel_values.dtype}")
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() != 4 or shape[1] != self.in_channels:
            raise ValueError(f"pixel_values: expected shape (B, {self.in_channels}, H, W), got {shape}")
        pixel_values = pixel_values.to(self.projection.weight.dtype)  # autocast still picks the conv's dtype
        if self.dynamic_size:
            if shape[2] < self.patch_size[0] or shape[3] < self.patch_size[1]:
                raise ValueError(f"pixel_values: a {shape[2]}x{shape[3]} image holds no "
                                 f"{self.patch_size[0]}x{self.patch_size[1]} patch")
            if shape[2] % self.patch_size[0] or shape[3] % self.patch_size[1]:
                raise ValueError(f"pixel_values: a {shape[2]}x{shape[3]} image does not tile into "
                                 f"{self.patch_size[0]}x{self.patch_size[1]} patches")
        elif shape[2:] != self.image_size:
            raise ValueError(f"pixel_values: expected shape (B, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {shape} (set dynamic_size=True to resize the "
                             f"position table to other image sizes)")
        return self.projection(pixel_values).flatten(2).transpose(1, 2)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a ``grid`` (rows, columns) of patches: ``(1, [1 +] gh * gw, D)``.

        The built grid's table itself, else its patch rows resized bicubically (``align_corners=False``,
        as timm and Hugging Face ViT; in float32) with the cls row kept."""
        table = self.position_embeddings
        if tuple(grid) == self.grid_size:
            return table
        n_cls = int(self.cls_token is not None)
        gh, gw = self.grid_size
        patches = table[:, n_cls:].float().reshape(1, gh, gw, self.dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], self.dim).to(table.dtype)
        return torch.cat([table[:, :n_cls], patches], 1)

    def forward(self, pixel_values: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values ``(B, C, H, W)`` (``image_size``, or any tiling size with ``dynamic_size``);
        ids_keep long ``(B, K)`` patch indices to keep (MAE: the positions are added before the
        patches are dropped). Returns ``(B, [1 +] K or L, D)``, L the image's patch count."""
        x = self.patchify(pixel_values)
        grid = (pixel_values.shape[2] // self.patch_size[0], pixel_values.shape[3] // self.patch_size[1])
        pos = self.positions(grid).to(x.dtype)
        n_cls = int(self.cls_token is not None)
        x = x + pos[:, n_cls:]
        if ids_keep is not None:
            _validate.index_tensor("ids_keep", ids_keep, ndim_min=0)
            if ids_keep.dim() != 2 or ids_keep.shape[0] != x.shape[0]:
                raise ValueError(f"ids_keep: expected shape ({x.shape[0]}, K), got {tuple(ids_keep.shape)}")
            if not torch.compiler.is_compiling():
                _validate.ids_in_ranges([("ids_keep", ids_keep, "the patch count", x.shape[1])])
            x = torch.gather(x, 1, ids_keep.to(torch.int64)[..., None].expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], 1)
        return self.dropout(x)
