"""Probes on frozen features and classification metrics, for ``fastpt eval``.

``linear_probe``: multinomial logistic regression on standardised features, full-batch L-BFGS.
``knn_predict``: weighted kNN (cosine similarity, votes ``exp(sim / temperature)``: DINO's protocol).
``classification_metrics``: accuracy and macro-F1.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- metrics


def classification_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (F1 averaged over the classes present in ``target`` or ``pred``,
    as scikit-learn's default) of integer predictions ``(N,)`` against ``(N,)`` targets."""
    pred, target = pred.long().cpu(), target.long().cpu()
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)}: "
                         "expected the same non-empty shape")
    f1s = []
    for c in torch.unique(torch.cat([pred, target])).tolist():
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": (pred == target).double().mean().item(), "macro_f1": float(np.mean(f1s))}


# ----------------------------------------------------------------------------- probes on features


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Centre and scale every column by the statistics of ``train`` (float32)."""
    train = train.float()
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(eps)
    return [(x.float() - mean) / std for x in (train, *others)]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *,
                 num_classes: int | None = None, l2: float = 1e-4, max_iter: int = 300) -> torch.Tensor:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS
    (strong Wolfe line search, zero init: deterministic). Loss: mean cross-entropy +
    ``l2 / 2 * |W|^2`` (bias not penalised).

    train_x ``(N, D)``, train_y long ``(N,)`` in ``[0, num_classes)``, test_x ``(M, D)``.
    Returns predicted classes ``(M,)`` (long, on test_x's device).
    """
    train_x, test_x = standardize(train_x, test_x)
    train_y = train_y.to(train_x.device).long()
    c = int(num_classes or int(train_y.max()) + 1)
    w = torch.zeros(train_x.shape[1], c, device=train_x.device)
    b = torch.zeros(c, device=train_x.device)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    onehot = F.one_hot(train_y, c).float()

    def closure():  # the analytic gradient: no autograd graph, much cheaper for small problems
        logits = train_x @ w + b
        loss = F.cross_entropy(logits, train_y) + 0.5 * l2 * w.pow(2).sum()
        resid = (logits.softmax(1) - onehot) / train_x.shape[0]
        w.grad = train_x.T @ resid + l2 * w
        b.grad = resid.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
        return (test_x @ w + b).argmax(1)


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """Weighted kNN (DINO's eval_knn): cosine similarity to every training feature, the ``k`` most
    similar vote for their class with weight ``exp(sim / temperature)``; the class with the largest
    vote wins (ties: the lowest class id).

    train_x ``(N, D)``, train_y long ``(N,)``, test_x ``(M, D)``. Test rows go ``chunk`` at a time
    (default: about 16M scores at once). Returns predicted classes ``(M,)`` (long).
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: expected k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train_n = F.normalize(train_x.float(), dim=1)
    test_n = F.normalize(test_x.float().to(train_n.device), dim=1)
    train_y = train_y.to(train_n.device).long()
    c = int(num_classes or int(train_y.max()) + 1)
    k = min(k, train_n.shape[0])
    chunk = chunk or max(1, (1 << 24) // max(train_n.shape[0], 1))
    out = []
    for lo in range(0, test_n.shape[0], chunk):
        sim, idx = (test_n[lo:lo + chunk] @ train_n.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], c, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=train_n.device)
