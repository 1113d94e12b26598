"""Contrastive loss modules: ``InfoNCELoss`` (InfoNCE / SupCon / MoCo), ``NTXentLoss`` (SimCLR), ``CLIPLoss``.

Thin modules over ``fastpt.ops.contrastive``; see that module for the exact definitions, the
label convention and the distributed (``gather=True``) value / gradient convention.
"""
from __future__ import annotations

import math

import torch

from ..ops import contrastive as _ops


def _check_temperature(temperature) -> None:
    # Fail at construction, not at the first batch.
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")


class InfoNCELoss(torch.nn.Module):
    """InfoNCE of queries against keys (``fastpt.ops.info_nce``), tiled: no N x M logits in memory.

    Args:
        temperature: float > 0 (fixed; pass a tensor to ``fastpt.ops.info_nce`` to learn it).
        symmetric: also the key->query direction, averaged (CLIP style).
        normalize: L2-normalise the embeddings first (cosine similarity).
        gather: all-gather keys across ``torch.distributed`` ranks (``group``, default the world).
        backend: None (fastest that fits) or "cpu", "triton", "reference".

    Forward ``(query (N, D), key (M, D), labels=None, queue=None)``: labels None (pairs i <-> i),
    an int ``(N,)`` tensor of class ids (N == M) or a pair ``(query_labels, key_labels)``; queue an
    optional ``(K, D)`` tensor of extra negatives (MoCo; no gradient). Returns the float32 loss
    (float64 for float64 inputs). Raises what ``fastpt.ops.info_nce`` raises.
    """

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, normalize: bool = False,
                 gather: bool = False, group=None, backend: str | None = None):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)
        self.symmetric, self.normalize = symmetric, normalize
        self.gather, self.group, self.backend = gather, group, backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, labels=None, queue: torch.Tensor | None = None):
        return _ops.info_nce(query, key, temperature=self.temperature, labels=labels, symmetric=self.symmetric,
                             normalize=self.normalize, queue=queue, gather=self.gather, group=self.group,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}, "
                f"gather={self.gather}")


class NTXentLoss(torch.nn.Module):
    """SimCLR's NT-Xent over two views (``fastpt.ops.nt_xent``): 2N rows, self excluded, 2N-2 negatives.

    Args:
        temperature: float > 0 (SimCLR uses 0.1 - 0.5).
        normalize: cosine similarity (default, as SimCLR); False for raw dot products.
        gather, group, backend: as in :class:`InfoNCELoss` (gathered views are negatives too).

    Forward ``(z1 (N, D), z2 (N, D))`` -> float32 loss (float64 for float64 inputs).
    Raises what ``fastpt.ops.nt_xent`` raises.
    """

    def __init__(self, temperature: float = 0.5, *, normalize: bool = True, gather: bool = False, group=None,
                 backend: str | None = None):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)
        self.normalize, self.gather, self.group, self.backend = normalize, gather, group, backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return _ops.nt_xent(z1, z2, temperature=self.temperature, normalize=self.normalize, gather=self.gather,
                            group=self.group, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, gather={self.gather}"


class CLIPLoss(torch.nn.Module):
    """CLIP's symmetric image-text loss with its learnable temperature (``fastpt.ops.clip_loss``).

    Owns ``logit_scale``, a 0-dim float32 parameter initialised to ``log(1 / init_temperature)``
    (CLIP: log(1/0.07)); the logits are ``min(exp(logit_scale), 100) * cos(image, text)``.

    Args:
        init_temperature: float > 0, the initial ``1 / exp(logit_scale)``.
        normalize: L2-normalise the embeddings first (default; CLIP compares unit vectors).
        gather, group, backend: as in :class:`InfoNCELoss` (both directions see every rank's batch).

    Forward ``(image_emb (N, D), text_emb (N, D), labels=None)`` -> float32 loss (float64 for
    float64 inputs). Raises what ``fastpt.ops.clip_loss`` raises.
    """

    def __init__(self, init_temperature: float = 0.07, *, normalize: bool = True, gather: bool = False, group=None,
                 backend: str | None = None):
        super().__init__()
        _check_temperature(init_temperature)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32))
        self.normalize, self.gather, self.group, self.backend = normalize, gather, group, backend

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels=None) -> torch.Tensor:
        return _ops.clip_loss(image_emb, text_emb, self.logit_scale, labels=labels, normalize=self.normalize,
                              gather=self.gather, group=self.group, backend=self.backend)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, gather={self.gather}"
