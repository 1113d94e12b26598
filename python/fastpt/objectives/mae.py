"""Masked autoencoder (He et al., 2021): encode the visible patches, reconstruct the masked ones.

    ids_keep, mask, ids_restore = fastpt.ops.random_masking(B, L, mask_ratio=0.75, seed=seed)
    latent = backbone(pixel_values, ids_keep=ids_keep)        # (B, 1 + K, D): visible patches only
    pred = decoder(latent, ids_restore)                       # (B, L, p * p * C)
    target = patchify(pixel_values), normalised per patch     # norm_pix_loss
    loss = sum(mask * mean((pred - target)^2, -1)) / sum(mask)  # masked patches only

Any channel count works (SatMAE-style multispectral input): the targets are ``p * p * C`` wide.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import random_masking
from ..models.vision import mae_decoder, patchify
from .base import (Objective, ObjectiveOutput, check_backbone_size, check_images, check_seed, choice, positive,
                   require, upcast)
from .simclr import vision_tokens


class MAE(Objective):
    """MAE on a ``VisionEncoder`` with an ``MAEDecoder`` head.

    Args:
        hidden_size, num_patches, patch_size, in_channels, grid_size: the encoder's (``from_backbone``
            reads them; grid_size None: square).
        cls_token: the encoder's output starts with a cls token (``from_backbone`` reads it).
        mask_ratio: fraction of patches removed per image.
        mask_mode: "random" (MAE) or "block" (BEiT rectangles, topped up to the exact count).
        norm_pix_loss: targets normalised per patch (mean 0, variance 1), as MAE's best setting.
        decoder_hidden_size, decoder_layers, decoder_heads, decoder_intermediate_size: the decoder
            (MAE-base: 512, 8, 16).

    Batch: raw ``{"pixel_values": (B, C, H, W) float}``; ``prepare`` adds ``ids_keep`` (B, K),
    ``mask`` (B, L) bool (True = removed) and ``ids_restore`` (B, L). ``logits`` of the output are
    the pixel predictions ``(B, L, p * p * C)``; ``last_hidden_state`` the encoder's ``(B, 1 + K, D)``.
    """

    needs = ("pixel_values",)

    def __init__(self, *, hidden_size: int, num_patches: int, patch_size: int, in_channels: int = 3,
                 grid_size: tuple[int, int] | None = None, cls_token: bool = True, mask_ratio: float = 0.75,
                 mask_mode: str = "random", norm_pix_loss: bool = True, decoder_hidden_size: int = 512,
                 decoder_layers: int = 8, decoder_heads: int = 16, decoder_intermediate_size: int | None = None):
        super().__init__()
        self.num_patches = positive("num_patches", num_patches, integer=True)
        self.patch_size, self.in_channels = patch_size, positive("in_channels", in_channels, integer=True)
        self.grid_size = None if grid_size is None else tuple(grid_size)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio: expected a number in [0, 1), got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        self.mask_mode = choice("mask_mode", mask_mode, ("random", "block"))
        self.norm_pix_loss = bool(norm_pix_loss)
        self.decoder = mae_decoder(num_patches=num_patches, patch_size=patch_size, encoder_dim=hidden_size,
                                   in_channels=in_channels, hidden_size=decoder_hidden_size, num_layers=decoder_layers,
                                   num_heads=decoder_heads, intermediate_size=decoder_intermediate_size,
                                   grid_size=grid_size, cls_token=cls_token)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, **kwargs):
        """As ``Objective.from_backbone``, also reading ``grid_size`` and whether there is a cls token
        (given ones must be the backbone's: ValueError naming ``objective.grid_size`` / ``objective.cls_token``)."""
        check_backbone_size("grid_size", kwargs, tuple(backbone.grid_size))
        check_backbone_size("cls_token", kwargs, getattr(backbone.patch_embed, "cls_token", None) is not None)
        return super().from_backbone(backbone, **kwargs)

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Draw each image's kept / removed patches (a pure function of ``seed`` and the row)."""
        seed = check_seed(seed)
        require(batch, self.needs, "MAE.prepare")
        px = check_images("pixel_values", batch["pixel_values"])
        grid = self.grid_size or self.decoder.grid_size
        ids_keep, mask, ids_restore = random_masking(px.shape[0], self.num_patches, mask_ratio=self.mask_ratio,
                                                         seed=seed, device=px.device, mode=self.mask_mode,
                                                         grid=grid if self.mask_mode == "block" else None)
        return {**batch, "ids_keep": ids_keep, "mask": mask, "ids_restore": ids_restore}

    def target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel targets ``(B, L, p * p * C)`` (normalised per patch with ``norm_pix_loss``)."""
        t = upcast(patchify(pixel_values, self.patch_size))
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """Mean squared error on the removed patches (run ``prepare`` first)."""
        require(batch, ("pixel_values", "ids_keep", "mask", "ids_restore"), "MAE.forward (run prepare first)")
        px = check_images("pixel_values", batch["pixel_values"])
        latent = backbone(px, ids_keep=batch["ids_keep"]).last_hidden_state
        pred = self.decoder(latent, batch["ids_restore"])
        if not isinstance(batch["mask"], torch.Tensor) or batch["mask"].shape != pred.shape[:2]:
            raise ValueError(f"mask: expected shape {tuple(pred.shape[:2])} (B, L: one flag per patch), got "
                             f"{tuple(getattr(batch['mask'], 'shape', ()))}")
        mask = batch["mask"].to(torch.float32)
        per_patch = (upcast(pred) - self.target(px)).pow(2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum().clamp(min=1)
        return ObjectiveOutput(loss, {"loss": loss.detach()}, pred, latent)

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """The encoder on the visible patches only; the decoder (the heads) on every patch."""
        return {"backbone": 1.0 - self.mask_ratio, "heads": 1.0}

    def tokens_in(self, batch: dict) -> int:
        """Patches of the input images (visible and removed)."""
        return vision_tokens(batch["pixel_values"], self.patch_size)
