"""``LinearCrossEntropyLoss``: the LM / MLM head projection and its cross-entropy as one module."""
from __future__ import annotations

import torch

from ..ops.linear_cross_entropy import check_options, linear_cross_entropy


class LinearCrossEntropyLoss(torch.nn.Module):
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits.

    The module holds only the options; the head's weight is passed in, so it can be a tied
    embedding matrix or any ``(V, D)`` parameter owned elsewhere.

    Args:
        ignore_index: label of rows that contribute nothing (default -100); they cost nothing.
        reduction: "mean" over non-ignored rows (0 when all are ignored), "sum" or "none".
        label_smoothing: in [0, 1], as in ``torch.nn.CrossEntropyLoss``.
        z_loss: coefficient of the auxiliary ``logsumexp(logits)**2`` term (0 disables it).
        backend: None (fastest that fits) or "cpu", "triton", "reference".

    Forward ``(hidden, weight, labels, bias=None)``: hidden ``(..., D)`` float16/bfloat16/float32,
    weight ``(V, D)`` and bias ``(V,)`` of the same dtype and device, labels int64 ``(...)``.
    Returns the float32 loss (shaped like ``labels`` for "none"). Raises what
    ``fastpt.ops.linear_cross_entropy`` raises (TypeError / ValueError naming the argument).

    Backward: the fused backends ("cpu", "triton") compute the gradients in the forward, so a
    "mean" / "sum" loss takes one backward; a second through the same graph (``retain_graph=True``
    then another backward or ``torch.autograd.grad``, or ``torch.autograd.gradcheck``) raises a
    RuntimeError. Use ``reduction="none"`` (reduce the per-row losses yourself; its backward
    recomputes) or ``backend="reference"`` there. Under ``torch.func`` transforms ``backend=None``
    runs the reference.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, backend: str | None = None):
        super().__init__()
        check_options(ignore_index, reduction, label_smoothing, z_loss)  # at construction, not the first batch
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")
