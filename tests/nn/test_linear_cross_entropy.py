"""fastpt.nn.LinearCrossEntropyLoss: the functional op behind a module, usable as a tied LM head."""
import pytest
import torch
import torch.nn.functional as F

from fastpt.nn import LinearCrossEntropyLoss
from fastpt.ops import linear_cross_entropy
from tests.helpers import backend_grid

GRID = backend_grid("linear_cross_entropy")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, 13), generator=g)
    labels = ids.clone()
    labels[torch.rand(2, 13, generator=g) < 0.6] = -100
    return ids, labels


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_is_the_op(device, backend, reduction):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 13, 16, generator=g).to(device)
    w = torch.randn(50, 16, generator=g).to(device)
    b = torch.randn(50, generator=g).to(device)
    _, labels = _batch()
    labels = labels.to(device)
    loss_fn = LinearCrossEntropyLoss(reduction=reduction, label_smoothing=0.1, backend=backend)
    want = linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(loss_fn(h, w, labels, bias=b), want)
    dense = F.cross_entropy(F.linear(h, w, b).reshape(-1, 50), labels.reshape(-1), reduction=reduction,
                            label_smoothing=0.1)
    torch.testing.assert_close(want.reshape(dense.shape), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", GRID)
def test_tied_embedding_head(device, backend):
    """The head weight is the embedding matrix: both uses accumulate into one gradient, as with F.linear."""
    torch.manual_seed(0)
    ids, labels = (x.to(device) for x in _batch(2))
    emb = torch.nn.Embedding(50, 16).to(device)
    proj = torch.nn.Linear(16, 16).to(device)
    loss_fn = LinearCrossEntropyLoss(ignore_index=-100, backend=backend)

    loss_fn(torch.tanh(proj(emb(ids))), emb.weight, labels).backward()
    got = emb.weight.grad.clone()
    emb.weight.grad = None
    logits = F.linear(torch.tanh(proj(emb(ids))), emb.weight)
    F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1)).backward()
    torch.testing.assert_close(got, emb.weight.grad, rtol=1e-5, atol=1e-6)


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        LinearCrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="z_loss"):
        LinearCrossEntropyLoss(z_loss=-1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        LinearCrossEntropyLoss(ignore_index=-100.0)
    assert "reduction='sum'" in repr(LinearCrossEntropyLoss(reduction="sum"))
