"""MoCo v3 (Chen, Xie & He, 2021): momentum encoder, predictor, symmetric InfoNCE, no queue.

    q1, q2 = predictor(projector(f(x1))), predictor(projector(f(x2)))        # trained
    k1, k2 = projector_m(f_m(x1)), projector_m(f_m(x2))                        # momentum copy, no grad
    loss = 2 tau * (InfoNCE(q1, k2) + InfoNCE(q2, k1))                         # cosine logits / tau

After each optimizer step the momentum encoder (backbone + projector copy) moves towards the
trained one: ``theta_m = m theta_m + (1 - m) theta``, with ``m`` rising from ``base_momentum`` to
``final_momentum`` on a half cosine over ``total_steps`` (constant when ``total_steps`` is None).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import info_nce
from .base import (Objective, ObjectiveOutput, check_first_pooling, check_images, choice, cosine_schedule, ema_update,
                   fraction, frozen_copy, gathered_keys, global_gradient, mlp, per_image_tokens, pool, positive,
                   require, seeded, top1_accuracy, view_area)
from .simclr import ViewAugment, fit_crop_sizes, gather_default, vision_tokens


class MoCoV3(Objective):
    """MoCo v3 for ViT backbones.

    Args:
        hidden_size: the backbone's width ``D``.
        proj_dim, proj_hidden_dim, proj_layers: projector MLP (BN + ReLU, affine-free BN last).
        pred_hidden_dim: predictor MLP hidden width (2 layers, BN + ReLU).
        value_range: the inputs' black and white for the views' jitter (``ViewAugment``; None: unclamped).
        predictor_bias: a bias on the predictor's last Linear (MoCo v3 has none; fastpt's checkpoints written
            before 2026-11-27 have one and are rebuilt with it, so their runs resume exactly).
        temperature: InfoNCE temperature (0.2 for ViT in the paper).
        base_momentum, final_momentum, total_steps: momentum schedule (see the module docstring).
        pooling: "first" (CLS token; ValueError at ``attach`` for a ViT without one) or "mean".
        crop_size, crop_scale, flip_prob, jitter_prob, brightness, contrast, saturation,
        grayscale_prob: the two views' augmentation (``ViewAugment``); a ``crop_size`` other than a
            ViT's image size turns on its ``patch_embed.dynamic_size`` (``attach``) and must tile into
            its patches.
        gather: all-gather keys across ranks (None: when torch.distributed runs with > 1 rank). The gradient is
            then world_size x this rank's share of the global batch's (``global_gradient``): averaged by DDP /
            FSDP, N ranks train as one process on the combined batch.
        log_accuracy: report the top-1 accuracy of q1 finding k2 among the batch's keys (every rank's when
            gathered).
        patch_size: the backbone's patch size, for ``tokens_in``.

    Batch: raw ``{"pixel_values": (B, C, H, W)}``; ``prepare`` adds ``"views"`` ``(2B, C, h, w)``.
    Training needs B >= 2 (the BatchNorm layers normalise over the images of a view).
    """

    needs = ("pixel_values",)

    def __init__(self, *, hidden_size: int, proj_dim: int = 256, proj_hidden_dim: int = 4096, proj_layers: int = 3,
                 pred_hidden_dim: int = 4096, temperature: float = 0.2, base_momentum: float = 0.99,
                 final_momentum: float = 1.0, total_steps: int | None = None, pooling: str = "first",
                 crop_size: int | None = None, crop_scale: tuple[float, float] = (0.08, 1.0), flip_prob: float = 0.5,
                 jitter_prob: float = 0.8, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 grayscale_prob: float = 0.2, gather: bool | None = None, log_accuracy: bool = True,
                 patch_size: int | None = None, predictor_bias: bool = False,
                 value_range: tuple[float, float] | None = (-1.0, 1.0)):
        super().__init__()
        positive("hidden_size", hidden_size, integer=True)
        for name, v in (("proj_dim", proj_dim), ("proj_hidden_dim", proj_hidden_dim), ("proj_layers", proj_layers),
                        ("pred_hidden_dim", pred_hidden_dim)):
            positive(name, v, integer=True)
        self.temperature = positive("temperature", temperature)
        self.base_momentum = fraction("base_momentum", base_momentum)
        self.final_momentum = fraction("final_momentum", final_momentum)
        if total_steps is not None:
            positive("total_steps", total_steps, integer=True)
        self.total_steps = total_steps
        self.pooling = choice("pooling", pooling, ("first", "mean"))
        self.augment = ViewAugment(size=crop_size, scale=crop_scale, flip_prob=flip_prob, jitter_prob=jitter_prob,
                                   brightness=brightness, contrast=contrast, saturation=saturation,
                                   grayscale_prob=grayscale_prob, value_range=value_range)
        self.projector = mlp(hidden_size, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_norm=True)
        # no bias on the last layer, as _build_mlp; predictor_bias: the layout fastpt had before 2026-11-27
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim, num_layers=2, last_bias=bool(predictor_bias))
        self.momentum_projector = frozen_copy(self.projector)
        self.momentum_backbone: nn.Module | None = None
        self.gather, self.log_accuracy, self.patch_size = gather, log_accuracy, patch_size

    legacy_options = ("predictor_bias",)

    @classmethod
    def upgrade_config(cls, config: dict, tensor_names, prefix: str = "") -> dict:
        """A checkpoint saved before the predictor's last layer lost its bias (MoCo v3 has none) holds that bias:
        it is rebuilt with ``predictor_bias=True``, so that its run resumes exactly (optimizer state included)."""
        if prefix + "predictor.3.bias" in tensor_names and "predictor_bias" not in config:
            return {**config, "predictor_bias": True}
        return config

    def upgrade_state(self, state: dict, prefix: str = "") -> None:
        """An older checkpoint's predictor bias loaded into a predictor without one (``load_state_dict``; a
        checkpoint directory is rebuilt with it instead: ``upgrade_config``): dropped, with a warning. In place."""
        key = prefix + "predictor.3.bias"
        if key in state and self.predictor[3].bias is None:
            bias = state.pop(key)
            warnings.warn(f"MoCoV3: the checkpoint's predictor has a last-layer bias (norm {float(bias.norm()):.3g}), "
                          "which MoCo v3's predictor does not have; it is dropped", stacklevel=3)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attach(self, backbone: nn.Module) -> None:
        """Make the momentum backbone: a frozen copy of ``backbone`` (once), after checking ``crop_size``
        against a ViT backbone (``fit_crop_sizes``: another size than its image size turns on
        ``patch_embed.dynamic_size``, and must tile into patches), and that "first" pooling has a cls token
        to pool (``check_first_pooling``)."""
        check_first_pooling("pooling", self.pooling, backbone)
        fit_crop_sizes(backbone, [("crop_size", self.augment.size)])
        if self.momentum_backbone is None:
            self.momentum_backbone = frozen_copy(backbone)
        self._attached = True

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Two augmented views of every image -> ``batch["views"]`` ``(2B, C, h, w)``."""
        require(batch, self.needs, "MoCoV3.prepare")
        px = check_images("pixel_values", batch["pixel_values"], min_batch=1)
        g = seeded(seed)
        return {**batch, "views": self.augment(px, g, views=2)}  # one ViewAugment pass for both views

    def momentum(self, step: int) -> float:
        """The EMA momentum after optimizer step ``step``."""
        return cosine_schedule(self.base_momentum, self.final_momentum, step, self.total_steps)

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """Symmetric InfoNCE of the two views (run ``prepare`` first)."""
        require(batch, ("views",), "MoCoV3.forward (run prepare first)")
        views = check_images("views", batch["views"])
        if views.shape[0] % 2:
            raise ValueError(f"views: expected 2B rows (two views per image), got {views.shape[0]}")
        if self.training and views.shape[0] < 4:
            raise ValueError(f"views: MoCo v3 trains on batches of at least 2 images (its projector and predictor "
                             f"BatchNorm normalises over the images of a view), got {views.shape[0] // 2} "
                             f"(pixel_values of batch size {views.shape[0] // 2})")
        self._ensure_attached(backbone)
        h = backbone(views).last_hidden_state
        f1, f2 = pool(h, self.pooling).chunk(2)
        # Projector and predictor run per view, so BatchNorm sees one view's batch (as MoCo v3).
        q1, q2 = (self.predictor(self.projector(f)) for f in (f1, f2))
        with torch.no_grad():
            hm = self.momentum_backbone(views).last_hidden_state
            k1, k2 = (self.momentum_projector(f) for f in pool(hm, self.pooling).chunk(2))
        gather = gather_default(self.gather)
        ctr = [info_nce(q, k, temperature=self.temperature, normalize=True, gather=gather) * (2 * self.temperature)
               for q, k in ((q1, k2), (q2, k1))]
        loss = global_gradient(ctr[0] + ctr[1], gather)
        metrics = {"loss": loss.detach()}
        if self.log_accuracy:  # among every rank's keys when gathered, as the loss
            keys, offset = gathered_keys(F.normalize(k2, dim=1), gather)
            metrics["accuracy"] = top1_accuracy(F.normalize(q1.detach(), dim=1), keys, key_offset=offset)
        return ObjectiveOutput(loss, metrics, None, h[: f1.shape[0]])

    def on_step_end(self, backbone: nn.Module, step: int) -> None:
        """EMA of the momentum backbone and projector towards the trained ones."""
        self._ensure_attached(backbone)
        m = self.momentum(step)
        ema_update(self.momentum_backbone, backbone, m)
        ema_update(self.momentum_projector, self.projector, m)

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """Two views through the backbone (forward + backward) and the momentum encoder (forward: 1/3);
        projector and predictor once per view (pooled)."""
        return {"backbone": 2 * view_area(backbone, self.augment.size) * (1 + 1 / 3),
                "heads": 2 / per_image_tokens(backbone)}

    def tokens_in(self, batch: dict) -> int:
        return vision_tokens(batch["pixel_values"], self.patch_size)
