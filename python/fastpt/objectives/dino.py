"""DINO (Caron et al., 2021): self-distillation with no labels, multi-crop, centering, sharpening.

    student: P_s(x) = softmax(g_s(f_s(x)) / student_temp)              for every crop x (2 global + N local)
    teacher: P_t(x) = softmax((g_t(f_t(x)) - center) / teacher_temp)     for the 2 global crops, no grad
    loss = mean over pairs (global crop i, crop v != i) of CE(P_t(x_i), P_s(x_v))

``g`` is ``DINOHead`` (MLP -> L2-normalised bottleneck -> weight-normalised linear layer). The
teacher (backbone + head) is a frozen copy moved by EMA after each optimizer step with the cosine
momentum schedule; it always runs in eval mode (no dropout: DINO builds it without dropout or
stochastic depth). ``center`` is an EMA of the teacher's mean output over the optimizer step's
batch: the training forwards (every micro-batch of a gradient accumulation) add up the teacher's
outputs and ``on_step_end`` moves the center once, with their mean over every rank (one
all-reduce), as DINO's ``update_center`` does once per iteration; every micro-batch of a step is
centred with the same center. The teacher temperature warms up linearly from
``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_steps``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import (Objective, ObjectiveOutput, check_first_pooling, check_images, choice, cosine_schedule, ema_update,
                   fraction, frozen_copy, mlp, multi_rank, per_image_tokens, pool, positive, require, seeded,
                   view_area)
from .simclr import ViewAugment, fit_crop_sizes, vision_tokens


class DINOHead(nn.Module):
    """DINO's projection head: ``(N, in_dim)`` -> ``(N, out_dim)`` prototype scores.

    MLP (``num_layers`` Linear + GELU, no norm) to ``bottleneck_dim``, L2 normalisation, then a
    bias-free weight-normalised linear layer ``g * v / ||v||`` (row-wise). With ``norm_last_layer``
    the gains ``g`` stay fixed at 1 (DINO's default for ViT).

    Initialisation as DINO's ``DINOHead``: the MLP's Linear layers trunc_normal(0.02) with zero
    biases (its ``self.apply(_init_weights)``); the last layer is built after that, so ``v`` keeps
    ``nn.Linear``'s default init (kaiming_uniform, ``a = sqrt(5)``: uniform in
    ``+-1 / sqrt(bottleneck_dim)``, rows about ``sqrt(1/3)`` long) and ``g`` is filled with 1. The
    length of ``v``'s rows sets the step size of their direction (the gradient through
    ``v / ||v||`` scales as ``1 / ||v||``).
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        positive("out_dim", out_dim, integer=True)
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers=num_layers, norm=None, activation="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as DINO's last_layer
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        # g / max(||v||, 1e-12) per row (F.normalize's eps), then one product with v: 5.5 ms fwd + bwd at
        # (4096, 256) against 14.1 for g * F.normalize(v) (1 thread, loaded Xeon). Not torch._weight_norm
        # (DINO's nn.utils.weight_norm, 2.7 ms, no eps): its double backward fails gradgradcheck (torch 2.13).
        scale = self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True).clamp_min(1e-12)
        return x @ (self.weight_v * scale).T


class DINO(Objective):
    """DINO for ViT backbones.

    Args:
        hidden_size: the backbone's width ``D``.
        out_dim, head_hidden_dim, bottleneck_dim, head_layers, norm_last_layer: ``DINOHead``.
        student_temp, teacher_temp: softmax temperatures (teacher sharpened: lower).
        warmup_teacher_temp, warmup_teacher_temp_steps: linear teacher-temperature warm-up (0 steps: none).
        center_momentum: EMA factor of the center.
        base_momentum, final_momentum, total_steps: the teacher's EMA momentum schedule.
        num_local_crops: local crops per image (0: global crops only).
        global_crop_size, local_crop_size: sides of the crops (None: the input's size). DINO uses
            224 / 96: a ViT (``PatchEmbedding``) then runs each crop size on its own resized position
            table (``attach`` turns on ``patch_embed.dynamic_size``); sizes must tile into patches.
        global_crop_scale, local_crop_scale: crop area ranges.
        flip_prob, jitter_prob, brightness, contrast, saturation, grayscale_prob, value_range:
            ``ViewAugment`` (``value_range``: the inputs' black and white, ``(-1, 1)`` from ``ImageStream``).
        pooling: "first" (CLS token; ValueError at ``attach`` for a ViT without one) or "mean".
        patch_size: the backbone's patch size, for ``tokens_in``.

    Batch: raw ``{"pixel_values": (B, C, H, W)}``; ``prepare`` adds ``"global_crops"`` ``(2B, C, G, G)``
    and, with local crops, ``"local_crops"`` ``(N * B, C, l, l)`` (crop-major).
    """

    needs = ("pixel_values",)

    def __init__(self, *, hidden_size: int, out_dim: int = 65536, head_hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, head_layers: int = 3, norm_last_layer: bool = True,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, total_steps: int | None = None, num_local_crops: int = 6,
                 global_crop_size: int | None = None, local_crop_size: int | None = None,
                 global_crop_scale: tuple[float, float] = (0.4, 1.0),
                 local_crop_scale: tuple[float, float] = (0.05, 0.4),
                 flip_prob: float = 0.5, jitter_prob: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, grayscale_prob: float = 0.2, pooling: str = "first",
                 patch_size: int | None = None, value_range: tuple[float, float] | None = (-1.0, 1.0)):
        super().__init__()
        positive("hidden_size", hidden_size, integer=True)
        positive("out_dim", out_dim, integer=True)
        for name, v in (("head_hidden_dim", head_hidden_dim), ("bottleneck_dim", bottleneck_dim),
                        ("head_layers", head_layers)):
            positive(name, v, integer=True)
        self.student_temp = positive("student_temp", student_temp)
        self.teacher_temp = positive("teacher_temp", teacher_temp)
        self.warmup_teacher_temp = positive("warmup_teacher_temp", warmup_teacher_temp)
        self.warmup_teacher_temp_steps = positive("warmup_teacher_temp_steps", warmup_teacher_temp_steps,
                                                  integer=True, allow_zero=True)
        self.center_momentum = fraction("center_momentum", center_momentum)
        self.base_momentum = fraction("base_momentum", base_momentum)
        self.final_momentum = fraction("final_momentum", final_momentum)
        if total_steps is not None:
            positive("total_steps", total_steps, integer=True)
        self.total_steps = total_steps
        self.num_local_crops = positive("num_local_crops", num_local_crops, integer=True, allow_zero=True)
        self.pooling = choice("pooling", pooling, ("first", "mean"))
        jitter = dict(flip_prob=flip_prob, jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
                      saturation=saturation, grayscale_prob=grayscale_prob, value_range=value_range)
        self.global_augment = ViewAugment(size=global_crop_size, scale=global_crop_scale, **jitter)
        self.local_augment = ViewAugment(size=local_crop_size, scale=local_crop_scale, **jitter)
        self.head = DINOHead(hidden_size, out_dim, hidden_dim=head_hidden_dim, bottleneck_dim=bottleneck_dim,
                             num_layers=head_layers, norm_last_layer=norm_last_layer)
        self.teacher_head = frozen_copy(self.head).eval()
        self.teacher_backbone: nn.Module | None = None
        self.register_buffer("center", torch.zeros(1, out_dim))
        # this optimizer step's teacher outputs: (sum (1, out_dim), rows), not saved (empty at step boundaries)
        self._center_pending: tuple[torch.Tensor, int] | None = None
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self.patch_size = patch_size

    def attach(self, backbone: nn.Module) -> None:
        """Make the teacher backbone: a frozen copy of ``backbone`` in eval mode (once). Crop sizes other than
        the backbone's image size turn on its patch embedding's ``dynamic_size`` (position table resized
        bicubically per crop size, as DINO's ``interpolate_pos_encoding``); they must tile into patches.
        "first" pooling needs a cls token (``check_first_pooling``)."""
        check_first_pooling("pooling", self.pooling, backbone)
        # set before the teacher copy, which inherits it
        fit_crop_sizes(backbone, [("global_crop_size", self.global_augment.size),
                                  ("local_crop_size", self.local_augment.size)])
        if self.teacher_backbone is None:
            self.teacher_backbone = frozen_copy(backbone).eval()
        self._attached = True

    def train(self, mode: bool = True):
        """``nn.Module.train``, except that the teacher (backbone and head) stays in eval mode."""
        super().train(mode)
        for teacher in (self.teacher_backbone, self.teacher_head):
            if teacher is not None:
                teacher.eval()
        return self

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Multi-crop: 2 global crops and ``num_local_crops`` local crops of every image, each crop with its
        own random box, flip and jitter; crop-major rows. One ``ViewAugment`` pass per crop size (``views=``),
        not one per crop: off the CPU, with 8 local crops ~450 ops instead of ~1,100 (about a kernel launch each
        on a GPU; counted on the meta device)."""
        require(batch, self.needs, "DINO.prepare")
        px = check_images("pixel_values", batch["pixel_values"], min_batch=1)
        g = seeded(seed)
        out = {**batch, "global_crops": self.global_augment(px, g, views=2)}
        if self.num_local_crops:
            out["local_crops"] = self.local_augment(px, g, views=self.num_local_crops)
        return out

    def current_teacher_temp(self) -> float:
        """Teacher temperature at the current step: DINO's ``np.linspace(warmup_teacher_temp, teacher_temp,
        n)`` over the first n steps (reaching teacher_temp at step n - 1), then teacher_temp."""
        n, step = self.warmup_teacher_temp_steps, int(self.steps_done)
        if step >= n:
            return self.teacher_temp
        if n == 1:
            return self.warmup_teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / (n - 1)

    def momentum(self, step: int) -> float:
        """The teacher's EMA momentum after optimizer step ``step``."""
        return cosine_schedule(self.base_momentum, self.final_momentum, step, self.total_steps)

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """DINO loss over the prepared crops (run ``prepare`` first)."""
        require(batch, ("global_crops",), "DINO.forward (run prepare first)")
        glob = check_images("global_crops", batch["global_crops"])
        if glob.shape[0] % 2:
            raise ValueError(f"global_crops: expected 2B rows (two crops per image), got {glob.shape[0]}")
        self._ensure_attached(backbone)
        h = backbone(glob).last_hidden_state
        pooled = [pool(h, self.pooling)]
        if batch.get("local_crops") is not None:
            local = check_images("local_crops", batch["local_crops"])
            if local.shape[0] % (glob.shape[0] // 2):
                raise ValueError(f"local_crops: expected N * B rows (B = {glob.shape[0] // 2} images), "
                                 f"got {local.shape[0]}")
            pooled.append(pool(backbone(local).last_hidden_state, self.pooling))
        # The backbone once per crop size, the head once on all crops' pooled features, as DINO's
        # MultiCropWrapper: the head works row by row (no batch norm), so the result is that of a
        # call per crop size, for one weight normalisation and larger products (head fwd + bwd on
        # 64 global + 128 local rows, out_dim 4096: 106 -> 71 ms, 1 thread, loaded Xeon).
        student = self.head(torch.cat(pooled) if len(pooled) > 1 else pooled[0])
        with torch.no_grad():
            t_out = self.teacher_head(pool(self.teacher_backbone(glob).last_hidden_state, self.pooling))
            temp = self.current_teacher_temp()
            t_prob = F.softmax((t_out - self.center) / temp, dim=-1).chunk(2)
        b = glob.shape[0] // 2
        s_logp = F.log_softmax(student / self.student_temp, dim=-1).split(b)  # one chunk per crop
        loss, terms = 0.0, 0
        for i, t in enumerate(t_prob):
            for v, s in enumerate(s_logp):
                if v != i:
                    loss = loss - (t * s).sum(-1).mean()
                    terms += 1
        loss = loss / terms
        if self.training:  # the center moves once per optimizer step (on_step_end)
            total = t_out.detach().sum(0, keepdim=True, dtype=self._sum_dtype())
            if self._center_pending is not None:
                total, rows = total + self._center_pending[0], self._center_pending[1] + t_out.shape[0]
            else:
                rows = t_out.shape[0]
            self._center_pending = (total, rows)
        entropy = -(torch.cat(t_prob) * torch.cat(t_prob).clamp_min(1e-12).log()).sum(-1).mean()
        metrics = {"loss": loss.detach(), "teacher_temp": torch.tensor(temp, device=loss.device), "teacher_entropy": entropy}
        return ObjectiveOutput(loss, metrics, None, h[:b])

    def _sum_dtype(self) -> torch.dtype:
        """The pending sums' dtype: at least float32 (a half center's sums and row counts would round)."""
        return torch.promote_types(self.center.dtype, torch.float32)

    @torch.no_grad()
    def _update_center(self) -> None:
        """``center = m center + (1 - m) mean`` of the teacher outputs since the last step, over every rank
        (one all-reduce, made on every rank: a rank without training forwards adds nothing); no-op when
        no rank ran one."""
        pending, self._center_pending = self._center_pending, None
        total, rows = pending if pending is not None else (self.center.new_zeros(self.center.shape,
                                                                              dtype=self._sum_dtype()), 0)
        if multi_rank():
            box = torch.cat([total.reshape(-1), total.new_tensor([rows])])
            torch.distributed.all_reduce(box)
            total, rows = box[:-1].view_as(self.center), float(box[-1])
        if rows:
            self.center.mul_(self.center_momentum).add_(total / rows, alpha=1 - self.center_momentum)

    def on_step_end(self, backbone: nn.Module, step: int) -> None:
        """After an optimizer step: the center (``_update_center``), the EMA of the teacher backbone and head,
        the temperature schedule."""
        self._ensure_attached(backbone)
        self._update_center()
        m = self.momentum(step)
        ema_update(self.teacher_backbone, backbone, m)
        ema_update(self.teacher_head, self.head, m)
        self.steps_done.fill_(step + 1)

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """The student on 2 global and ``num_local_crops`` local crops (by their area), the teacher on the 2
        global crops (forward: 1/3); the head once per crop (pooled).""" 
        glob = 2 * view_area(backbone, self.global_augment.size)
        local = self.num_local_crops * view_area(backbone, self.local_augment.size)
        return {"backbone": glob + local + glob / 3, "heads": (2 + self.num_local_crops) / per_image_tokens(backbone)}

    def tokens_in(self, batch: dict) -> int:
        return vision_tokens(batch["pixel_values"], self.patch_size)
