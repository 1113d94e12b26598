"""SimCLR (Chen et al., 2020): two augmented views per image, a projection MLP, NT-Xent.

The augmentations run on the batch's device, on float ``(B, C, H, W)`` tensors of any channel
count (multispectral included): random resized crop + horizontal flip (one ``grid_sample``),
colour jitter (brightness, contrast, saturation, in that order; no hue, which only RGB has) and
random grayscale (luma for RGB, the channel mean otherwise). Gaussian blur and solarisation are
not applied. Crops that would leave the image are clamped to it (torchvision retries instead),
and bilinear sampling reflects at the border. Every random number is drawn from a CPU
``torch.Generator`` seeded with ``seed``, so a batch's views are a pure function of (pixels, seed)
on any device.

The jitter follows torchvision's ``ColorJitter`` on pixels whose black is ``lo`` and white ``hi``
of ``value_range`` (default ``(-1, 1)``, what ``fastpt.train.data.ImageStream`` yields; torchvision
works on ``[0, 1]``): brightness scales towards black, ``lo + f (x - lo)``; contrast blends with the
image's mean grayscale value, ``m + f (x - m)``; saturation blends with the per-pixel grayscale,
``y + f (x - y)``; each result of a jittered image is clamped to ``value_range`` as torchvision clamps to ``[0, 1]``.
Unlike torchvision the three are applied in that fixed order, not a random permutation.
MoCo v3 and DINO reuse ``ViewAugment``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dispatch
from ..ops import nt_xent
from .base import (Objective, ObjectiveOutput, check_first_pooling, check_images, choice, fraction, gathered_keys,
                   global_gradient, mlp, multi_rank, per_image_tokens, pool, positive, require, seeded, top1_accuracy,
                   view_area)

# ITU-R 601 luma weights for 3-channel images; other channel counts use the plain channel mean.
RGB_LUMA = (0.299, 0.587, 0.114)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 1, H, W)`` luma (RGB weights for C == 3, the channel mean otherwise)."""
    if x.shape[1] == 3:
        w = _dispatch.device_constant(tuple(RGB_LUMA), x.dtype, x.device).view(1, 3, 1, 1)  # no upload per call
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class ViewAugment:
    """Random views of a batch of images (SimCLR / BYOL / MoCo v3 / DINO style), on the device.

    Args:
        size: output side (square views); None keeps the input's height and width.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_prob: probability of a horizontal flip.
        jitter_prob: probability of colour jitter; brightness, contrast, saturation: its strengths
            (factors uniform in ``[1 - s, 1 + s]``).
        grayscale_prob: probability of replacing all channels by the luma.
        value_range: ``(black, white)`` pixel values of the inputs, which should lie in it:
            brightness scales towards ``black`` and the colour steps clamp to the range, as
            torchvision does for ``(0, 1)`` (a pixel outside it is clamped too; images the jitter
            skips are left as they are). The default ``(-1, 1)`` is what ``ImageStream`` produces
            (``x / 127.5 - 1``). None: inputs of no fixed range (normalised with a mean and std):
            brightness scales around 0 and nothing is clamped.
    """

    def __init__(self, *, size: int | None = None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5,
                 jitter_prob: float = 0.8, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 grayscale_prob: float = 0.2, value_range=(-1.0, 1.0)):
        if size is not None:
            positive("size", size, integer=True)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale: expected (low, high) with 0 < low <= high <= 1, got {scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio: expected (low, high) with 0 < low <= high, got {ratio!r}")
        self.size, self.scale, self.ratio = size, tuple(map(float, scale)), tuple(map(float, ratio))
        self.flip_prob = fraction("flip_prob", flip_prob)
        self.jitter_prob = fraction("jitter_prob", jitter_prob)
        self.strength = tuple(fraction(n, v) for n, v in
                              (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)))
        self.grayscale_prob = fraction("grayscale_prob", grayscale_prob)
        if value_range is not None and (len(value_range) != 2 or not all(math.isfinite(v) for v in value_range)
                                        or not value_range[0] < value_range[1]):
            raise ValueError(f"value_range: expected finite (black, white) with black < white, or None, "
                             f"got {value_range!r}")
        self.value_range = None if value_range is None else tuple(map(float, value_range))

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *, views: int = 1) -> torch.Tensor:
        """``views`` random views of each image: ``(B, C, H, W)`` -> ``(views * B, C, size, size)``, same
        dtype/device, view-major (rows ``v * B`` to ``(v + 1) * B`` are view ``v`` of images ``0 .. B - 1``).

        Every row draws its own crop, flip, jitter and grayscale (the views of an image are independent,
        as SimCLR's two views and DINO's multi-crop). Each kind of draw is made for all ``views * B`` rows at
        once, in row order: the same distribution as ``views`` one-view calls on the generator, other
        numbers. Off the CPU the views then go through one pass (a grid_sample per view, the jitter once over
        all rows): the op count barely grows with ``views`` (a call per view made DINO's 2 + 8 crops ~1000
        ops, ~1000 kernel launches on a GPU; two passes (global, local) ~450); on a CPU the jitter runs view by
        view, on cache-sized tensors. ValueError unless ``views`` is an int >= 1.
        """
        positive("views", views, integer=True)
        n, _, h, w = images.shape
        b = views * n
        g = generator
        # Random resized crop (crop extents clamped to the image instead of torchvision's retries).
        area = _uniform(g, b, *self.scale)
        log_r = _uniform(g, b, math.log(self.ratio[0]), math.log(self.ratio[1]))
        cw = torch.sqrt(area * torch.exp(log_r) * h / w).clamp(max=1.0)  # crop width / image width
        ch = torch.sqrt(area / torch.exp(log_r) * w / h).clamp(max=1.0)
        cx = (1 - cw) * (2 * torch.rand(b, generator=g, dtype=torch.float64) - 1)  # centre in [-1, 1] coords
        cy = (1 - ch) * (2 * torch.rand(b, generator=g, dtype=torch.float64) - 1)
        flip = torch.where(torch.rand(b, generator=g, dtype=torch.float64) < self.flip_prob, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw * flip, cx, ch, cy
        out_h, out_w = (h, w) if self.size is None else (self.size, self.size)
        # Colour jitter and grayscale draws happen for every image so the stream layout is fixed.
        jitter = torch.rand(b, generator=g, dtype=torch.float64) < self.jitter_prob
        factors = [torch.where(jitter, _uniform(g, b, 1 - s, 1 + s), 1.0) for s in self.strength]
        gray = torch.rand(b, generator=g, dtype=torch.float64) < self.grayscale_prob

        dev, dt = images.device, images.dtype
        work = images if dt in (torch.float32, torch.float64) else images.float()
        grid = F.affine_grid(theta.to(dev, work.dtype), [b, work.shape[1], out_h, out_w], align_corners=False)
        shape = (b, 1, 1, 1)
        bright, contrast, sat = (f.to(dev, work.dtype).view(shape) for f in factors)
        jittered, gray = jitter.to(dev).view(shape), gray.to(dev).view(shape)

        def render(r: slice) -> torch.Tensor:  # rows r of the output: their view of the images, then the jitter
            x = F.grid_sample(work, grid[r], mode="bilinear", padding_mode="reflection", align_corners=False)
            return self._jitter(x, bright[r], contrast[r], sat[r], jittered[r], gray[r])

        # Every view samples the images as they are (no views-fold copy of the input, which at 224 px cost more
        # than the launches it saved). On a GPU the jitter then runs once over all rows (~1 launch per op); on
        # a CPU it runs view by view, on tensors that stay in cache (one pass over 8 views of 32 x 96 px was
        # 1.5x slower than 8).
        if views == 1:
            x = render(slice(None))
        elif _jitter_per_view(dev):
            x = torch.cat([render(slice(v * n, (v + 1) * n)) for v in range(views)])
        else:
            x = torch.cat([F.grid_sample(work, grid[v * n:(v + 1) * n], mode="bilinear", padding_mode="reflection",
                                         align_corners=False) for v in range(views)])
            x = self._jitter(x, bright, contrast, sat, jittered, gray)
        return x.to(dt)

    def _jitter(self, x, bright, contrast, sat, jittered, gray) -> torch.Tensor:
        """Colour jitter and grayscale of sampled views ``x`` with their per-row factors ``(rows, 1, 1, 1)``."""
        lo, hi = self.value_range or (0.0, None)

        def clamp(t):  # only the jittered images, as torchvision clamps inside its adjust_* functions
            return t if hi is None else torch.where(jittered, t.clamp(lo, hi), t)

        # torchvision's adjust_brightness / _contrast / _saturation: blend with black, the mean
        # grayscale value, the per-pixel grayscale; clamp to the value range after each.
        x = clamp((x - lo) * bright + lo)
        mean = grayscale(x).mean((1, 2, 3), keepdim=True)
        x = clamp((x - mean) * contrast + mean)
        luma = grayscale(x)
        x = clamp((x - luma) * sat + luma)
        return torch.where(gray, grayscale(x).expand_as(x), x)


def _jitter_per_view(device: torch.device) -> bool:
    """Whether ``ViewAugment`` jitters view by view (a CPU: cache-sized tensors) or all views at once."""
    return device.type == "cpu"


def fit_crop_sizes(backbone: nn.Module, sizes) -> None:
    """Check view sides ``sizes`` (``(argument name, side or None)`` pairs) against a ViT backbone.

    A side other than the backbone's fixed image size turns on its patch embedding's ``dynamic_size``
    (position table resized per view size, as DINO's ``interpolate_pos_encoding``); it must tile
    into the patches. Call it before copying the backbone (teacher / momentum copies inherit the
    flag). A backbone without ``patch_embed.image_size`` is not checked. ValueError naming the argument.
    """
    embed = getattr(backbone, "patch_embed", None)
    fixed = getattr(embed, "image_size", None)
    for name, size in sizes:
        if fixed is None or size is None or (size, size) == tuple(fixed):
            continue
        if not hasattr(embed, "dynamic_size"):
            raise ValueError(f"{name}: the backbone takes {tuple(fixed)} images only (fixed position "
                             f"embeddings), got {size}; use None (the input size) or {fixed[0]}")
        if any(size % p for p in embed.patch_size):
            raise ValueError(f"{name}: {size} does not tile into the backbone's "
                             f"{embed.patch_size[0]}x{embed.patch_size[1]} patches")
        embed.dynamic_size = True


def gather_default(gather: bool | None) -> bool:
    """``gather=None``: all-gather negatives when torch.distributed runs with more than one rank."""
    return bool(gather) if gather is not None else multi_rank()


class SimCLR(Objective):
    """SimCLR: ``loss = nt_xent(g(f(view1)), g(f(view2)))`` with ``f`` the backbone + pooling, ``g``
    the projection MLP.

    Args:
        hidden_size: the backbone's width ``D``.
        proj_dim, proj_hidden_dim, proj_layers: projection MLP (Linear-BN-ReLU ... Linear).
        temperature: NT-Xent temperature.
        pooling: "first" (CLS token; ValueError at ``attach`` for a ViT without one) or "mean" over the
            backbone's output tokens.
        crop_size: side of the views (None: the input's size); crop_scale: crop area range. A side
            other than a ViT's image size turns on its ``patch_embed.dynamic_size`` (``attach``) and
            must tile into its patches.
        flip_prob, jitter_prob, brightness, contrast, saturation, grayscale_prob, value_range: see
            ``ViewAugment`` (``value_range``: the inputs' black and white, ``(-1, 1)`` from ``ImageStream``).
        gather: all-gather negatives across ranks (None: when torch.distributed runs with > 1 rank). The
            gradient is then world_size x this rank's share of the global batch's (``global_gradient``):
            averaged by DDP / FSDP, N ranks train as one process on the combined batch.
        log_accuracy: report the top-1 accuracy of finding the other view (one extra (2N)^2 D pass; among
            every rank's views when gathered).
        patch_size: the backbone's patch size, for ``tokens_in`` (None: count images).

    Batch: raw ``{"pixel_values": (B, C, H, W) float}``; ``prepare`` adds ``"views"`` ``(2B, C, h, w)``
    (first all first views, then all second views).
    """

    needs = ("pixel_values",)

    def __init__(self, *, hidden_size: int, proj_dim: int = 128, proj_hidden_dim: int = 2048, proj_layers: int = 2,
                 temperature: float = 0.5, pooling: str = "first", crop_size: int | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip_prob: float = 0.5, jitter_prob: float = 0.8,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 grayscale_prob: float = 0.2, gather: bool | None = None, log_accuracy: bool = True,
                 patch_size: int | None = None, value_range: tuple[float, float] | None = (-1.0, 1.0)):
        super().__init__()
        positive("hidden_size", hidden_size, integer=True)
        for name, v in (("proj_dim", proj_dim), ("proj_hidden_dim", proj_hidden_dim), ("proj_layers", proj_layers)):
            positive(name, v, integer=True)
        self.temperature = positive("temperature", temperature)
        self.pooling = choice("pooling", pooling, ("first", "mean"))
        self.augment = ViewAugment(size=crop_size, scale=crop_scale, flip_prob=flip_prob, jitter_prob=jitter_prob,
                                   brightness=brightness, contrast=contrast, saturation=saturation,
                                   grayscale_prob=grayscale_prob, value_range=value_range)
        self.projector = mlp(hidden_size, proj_hidden_dim, proj_dim, num_layers=proj_layers)
        self.gather, self.log_accuracy, self.patch_size = gather, log_accuracy, patch_size

    def attach(self, backbone: nn.Module) -> None:
        """Check ``crop_size`` against a ViT backbone (``fit_crop_sizes``: another size than its image
        size turns on ``patch_embed.dynamic_size``, and must tile into patches) and that "first" pooling
        has a cls token to pool (``check_first_pooling``)."""
        check_first_pooling("pooling", self.pooling, backbone)
        fit_crop_sizes(backbone, [("crop_size", self.augment.size)])
        self._attached = True

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Two augmented views of every image -> ``batch["views"]`` ``(2B, C, h, w)``."""
        require(batch, self.needs, "SimCLR.prepare")
        px = check_images("pixel_values", batch["pixel_values"], min_batch=1)
        g = seeded(seed)
        return {**batch, "views": self.augment(px, g, views=2)}

    def embed(self, backbone: nn.Module, images: torch.Tensor):
        """Backbone states ``(N, T, D)`` and projections ``(N, proj_dim)`` of ``images``."""
        h = backbone(images).last_hidden_state
        return h, self.projector(pool(h, self.pooling))

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """NT-Xent over ``batch["views"]`` (run ``prepare`` first)."""
        require(batch, ("views",), "SimCLR.forward (run prepare first)")
        views = check_images("views", batch["views"])
        if views.shape[0] % 2:
            raise ValueError(f"views: expected 2B rows (two views per image), got {views.shape[0]}")
        self._ensure_attached(backbone)
        h, z = self.embed(backbone, views)
        z1, z2 = z.chunk(2)
        gather = gather_default(self.gather)
        loss = global_gradient(nt_xent(z1, z2, temperature=self.temperature, gather=gather), gather)
        metrics = {"loss": loss.detach()}
        if self.log_accuracy:  # among every rank's views when gathered, as the loss
            zn = F.normalize(z.detach(), dim=1)
            keys, offset = gathered_keys(zn, gather)
            metrics["accuracy"] = top1_accuracy(zn, keys, target_offset=z1.shape[0], exclude_self=True,
                                                key_offset=offset)
        return ObjectiveOutput(loss, metrics, None, h[: z1.shape[0]])

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """Two views of every counted image through the backbone; the projector once per view (pooled)."""
        return {"backbone": 2 * view_area(backbone, self.augment.size), "heads": 2 / per_image_tokens(backbone)}

    def tokens_in(self, batch: dict) -> int:
        """Patches of the input images (images when ``patch_size`` is unknown)."""
        return vision_tokens(batch["pixel_values"], self.patch_size)


def vision_tokens(pixel_values: torch.Tensor, patch_size: int | None) -> int:
    """``B * (H // p) * (W // p)`` for ``(B, C, H, W)`` images, ``B`` without a patch size."""
    b, _, h, w = pixel_values.shape
    if not patch_size:
        return b
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return b * (h // ph) * (w // pw)
