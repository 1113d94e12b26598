"""Vision transformers: ``VisionEncoder`` (ViT; encodes only the kept patches when given MAE's
``ids_keep``), ``MAEDecoder`` (MAE's light decoder that predicts pixels of every patch), their
builders ``vit`` / ``mae_decoder``, and ``patchify`` / ``unpatchify`` (MAE's pixel-target layout)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import _validate
from .embeddings import PATCH_POSITIONS, PatchEmbedding, _pair, sincos_2d
from .encoder import check_stack, make_layers, run_layers
from .layers import check_choice, check_int, check_positive, check_prob, init_weights, make_norm
from .outputs import BackboneOutput


def patchify(images: torch.Tensor, patch_size) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, ph * pw * C)``: patches in row-major order, each flattened as
    (row in patch, column in patch, channel), MAE's layout for pixel targets and predictions."""
    ph, pw = _pair("patch_size", patch_size)
    b, c, h, w = images.shape
    if h % ph or w % pw:
        raise ValueError(f"images: {h}x{w} does not tile into {ph}x{pw} patches")
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: torch.Tensor, patch_size, grid_size, in_channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: ``(B, L, ph * pw * C)`` -> ``(B, C, gh * ph, gw * pw)``."""
    ph, pw = _pair("patch_size", patch_size)
    gh, gw = _pair("grid_size", grid_size)
    b = patches.shape[0]
    x = patches.reshape(b, gh, gw, ph, pw, in_channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, in_channels, gh * ph, gw * pw)


def _square(p: tuple[int, int]):
    return p[0] if p[0] == p[1] else p


class VisionEncoder(nn.Module):
    """Patch embedding -> [embedding norm] -> transformer layers -> final norm (ViT, the MAE / SimCLR /
    DINO encoder; CLIP's vision tower with the embedding norm).

    Args:
        patch_embed: a ``PatchEmbedding``; layers: ``TransformerLayer``s; final_norm: or None.
        embedding_norm: a norm of the embedded tokens (``[cls;] patches + positions``) before the
            first layer (CLIP's ``ln_pre``), or None (ViT: no parameters, no state_dict keys).
        config: the dict it was built from. gradient_checkpointing: recompute layers in backward.

    Attributes: hidden_size, num_patches, patch_size (int, or (h, w) when not square),
    in_channels, grid_size, patch_embed, embedding_norm, layers, final_norm, config,
    gradient_checkpointing.
    """

    def __init__(self, patch_embed: PatchEmbedding, layers: Sequence[nn.Module], final_norm: nn.Module | None = None,
                 *, embedding_norm: nn.Module | None = None, config: dict | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.patch_embed = patch_embed
        self.embedding_norm = embedding_norm
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.config = dict(config or {})
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.hidden_size, self.num_patches = patch_embed.dim, patch_embed.num_patches
        self.patch_size, self.grid_size = _square(patch_embed.patch_size), patch_embed.grid_size
        self.in_channels = patch_embed.in_channels

    def forward(self, pixel_values: torch.Tensor, *, ids_keep: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> BackboneOutput:
        """pixel_values ``(B, C, H, W)``; ids_keep long ``(B, K)``: encode only these patches (MAE).
        Returns last_hidden_state ``(B, [1 +] K or L, D)``, the cls token first when there is one.
        Raises ValueError naming pixel_values / ids_keep on a wrong shape."""
        x = self.patch_embed(pixel_values, ids_keep=ids_keep)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x, hidden = run_layers(self, self.layers, x, output_hidden_states)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return BackboneOutput(last_hidden_state=x, hidden_states=hidden)


class MAEDecoder(nn.Module):
    """MAE's decoder: embed the visible tokens, fill in mask tokens, unshuffle, add fixed 2-D sin-cos
    positions, run pre-norm layers, predict each patch's pixels.

    Args:
        num_patches: L of the encoder; patch_size: int or (h, w); in_channels: C.
        encoder_dim: width of the encoder states; dim, depth, heads: the decoder's.
        intermediate_size: MLP width (default 4 dim); activation, norm, norm_eps: as the builders.
        grid_size: (gh, gw) patch grid (default: square, sqrt(num_patches)).
        cls_token: the encoder output starts with a cls token (kept through the decoder, dropped
            from the prediction).

    Parameters: ``decoder_embed``, ``mask_token`` ``(1, 1, dim)``, ``layers``, ``norm``, ``pred``; the
    ``position_embeddings`` table is a non-persistent buffer.
    """

    def __init__(self, num_patches: int, patch_size, in_channels: int, encoder_dim: int, dim: int, depth: int,
                 heads: int, *, intermediate_size: int | None = None, activation: str = "gelu",
                 norm: str = "layernorm", norm_eps: float = 1e-6, grid_size=None, cls_token: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        check_int("num_patches", num_patches)
        if grid_size is None:
            side = int(round(num_patches ** 0.5))
            if side * side != num_patches:
                raise ValueError(f"num_patches: {num_patches} is not a square grid; give grid_size=(h, w)")
            grid_size = (side, side)
        grid_size = _pair("grid_size", grid_size)
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(f"grid_size: {grid_size} does not hold num_patches={num_patches}")
        ph, pw = _pair("patch_size", patch_size)
        intermediate_size = check_stack(hidden_size=dim, num_layers=depth, num_heads=heads, num_kv_heads=None,
                                        intermediate_size=intermediate_size, activation=activation, norm=norm,
                                        norm_eps=norm_eps, dropout=dropout, attention_dropout=0.0,
                                        initializer_range=0.02)
        self.num_patches, self.grid_size, self.patch_size = num_patches, grid_size, _square((ph, pw))
        self.in_channels, self.cls_token = check_int("in_channels", in_channels), bool(cls_token)
        self.decoder_embed = nn.Linear(check_int("encoder_dim", encoder_dim), dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("position_embeddings", sincos_2d(dim, grid_size, self.cls_token), persistent=False)
        self.layers = nn.ModuleList(make_layers(
            num_layers=depth, hidden_size=dim, num_heads=heads, num_kv_heads=None, intermediate_size=intermediate_size,
            activation=activation, norm=norm, norm_eps=norm_eps, pre_norm=True, bias=True, dropout=dropout,
            attention_dropout=0.0, attention_position=None, rotary_base=10000.0))
        self.norm = make_norm(norm, dim, norm_eps)
        self.pred = nn.Linear(dim, ph * pw * in_channels)
        self.gradient_checkpointing = False

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent ``(B, [1 +] K, encoder_dim)`` (encoder output of the kept patches), ids_restore long
        ``(B, L)`` (from ``fastpt.ops.random_masking``) -> pixel predictions ``(B, L, ph * pw * C)`` in
        ``patchify``'s layout, for every patch in the original order."""
        n_cls = int(self.cls_token)
        _validate.index_tensor("ids_restore", ids_restore, ndim_min=0)
        if ids_restore.dim() != 2 or ids_restore.shape != (latent.shape[0], self.num_patches):
            raise ValueError(f"ids_restore: expected shape ({latent.shape[0]}, {self.num_patches}), "
                             f"got {tuple(ids_restore.shape)}")
        if latent.dim() != 3 or not n_cls <= latent.shape[1] - n_cls <= self.num_patches:
            raise ValueError(f"latent: expected shape (B, {n_cls} + K, D) with K <= {self.num_patches}, "
                             f"got {tuple(latent.shape)}")
        if not torch.compiler.is_compiling():
            _validate.ids_in_ranges([("ids_restore", ids_restore, "num_patches", self.num_patches)])
        x = self.decoder_embed(latent)
        cls, x = x.split((n_cls, x.shape[1] - n_cls), 1)  # backward: one cat, not two zero-filled slices
        b, k, d = x.shape
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, self.num_patches - k, d)], 1)
        x = torch.gather(x, 1, ids_restore.to(torch.int64)[..., None].expand(-1, -1, d))  # unshuffle
        x = torch.cat([cls, x], 1) + self.position_embeddings.to(x.dtype)
        x, _ = run_layers(self, self.layers, x, False)
        return self.pred(self.norm(x))[:, n_cls:]


def vit(*, image_size=224, patch_size=16, in_channels: int = 3, hidden_size: int = 768, num_layers: int = 12,
        num_heads: int = 12, intermediate_size: int | None = None, activation: str = "gelu", norm: str = "layernorm",
        norm_eps: float = 1e-12, pre_norm: bool = True, embedding_norm: bool = False, final_norm: bool | None = None,
        cls_token: bool = True, position: str = "learned", qkv_bias: bool = True, bias: bool = True,
        dropout: float = 0.0, attention_dropout: float = 0.0, initializer_range: float = 0.02,
        gradient_checkpointing: bool = False) -> VisionEncoder:
    """Build a ViT from flat, typed arguments.

    Args:
        image_size, patch_size: int or [height, width]. in_channels: any count (multispectral).
        hidden_size, num_layers, num_heads, intermediate_size (default 4 D): the stack.
        activation, norm ("layernorm" / "rmsnorm"), norm_eps (HF ViT 1e-12, MAE / timm 1e-6).
        pre_norm: pre-norm residuals (ViT). final_norm: default ``pre_norm``.
        embedding_norm: norm the embedded tokens (patches, cls and positions) before the first
            layer, as CLIP's vision tower (``ln_pre``; HF ``pre_layrnorm``). ViT, MAE, DINO: False.
        cls_token: prepend a cls token. position: "learned" (ViT) or "sincos" (MAE, fixed).
        qkv_bias: biases on q/k/v; bias: on the other linears. dropout, attention_dropout,
        initializer_range, gradient_checkpointing: as ``text_encoder``.

    Returns a ``VisionEncoder`` whose ``.config`` is ``{"builder": "vit", **arguments}``.
    Raises ValueError / TypeError naming the argument and the valid choices.
    """
    config = {"builder": "vit", **{k: v for k, v in locals().items() if k != "config"}}
    intermediate_size = check_stack(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                    num_kv_heads=None, intermediate_size=intermediate_size, activation=activation,
                                    norm=norm, norm_eps=norm_eps, dropout=dropout,
                                    attention_dropout=attention_dropout, initializer_range=initializer_range)
    check_choice("position", position, PATCH_POSITIONS)
    patch_embed = PatchEmbedding(image_size, patch_size, in_channels, hidden_size, cls_token, position,
                                 check_prob("dropout", dropout))
    layers = make_layers(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=None,
                         intermediate_size=intermediate_size, activation=activation, norm=norm, norm_eps=norm_eps,
                         pre_norm=pre_norm, bias=bias, dropout=dropout, attention_dropout=attention_dropout,
                         attention_position=None, rotary_base=10000.0, qkv_bias=qkv_bias)
    final_norm = pre_norm if final_norm is None else final_norm
    model = VisionEncoder(patch_embed, layers, make_norm(norm, hidden_size, norm_eps) if final_norm else None,
                          embedding_norm=make_norm(norm, hidden_size, norm_eps) if embedding_norm else None,
                          config=config, gradient_checkpointing=gradient_checkpointing)
    return init_weights(model, initializer_range)


def mae_decoder(*, num_patches: int, patch_size, encoder_dim: int, in_channels: int = 3, hidden_size: int = 512,
                num_layers: int = 8, num_heads: int = 16, intermediate_size: int | None = None,
                activation: str = "gelu", norm: str = "layernorm", norm_eps: float = 1e-6, grid_size=None,
                cls_token: bool = True, initializer_range: float = 0.02) -> MAEDecoder:
    """Build an ``MAEDecoder`` from flat, typed arguments (MAE-base: 512 wide, 8 layers, 16 heads).

    num_patches / patch_size / in_channels / encoder_dim / cls_token must match the encoder
    (``VisionEncoder.num_patches``, ``.patch_size``, ``.in_channels``, ``.hidden_size``);
    grid_size defaults to the square grid. The decoder's ``.config`` is
    ``{"builder": "mae_decoder", **arguments}``. Raises ValueError naming the argument.
    """
    config = {"builder": "mae_decoder", **{k: v for k, v in locals().items() if k != "config"}}
    check_positive("initializer_range", initializer_range)
    model = MAEDecoder(num_patches, patch_size, in_channels, encoder_dim, hidden_size, num_layers, num_heads,
                       intermediate_size=intermediate_size, activation=activation, norm=norm, norm_eps=norm_eps,
                       grid_size=grid_size, cls_token=cls_token)
    model.config = config
    return init_weights(model, initializer_range)
