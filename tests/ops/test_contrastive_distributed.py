"""gather=True on 2 processes (gloo, CPU) against one process computing the concatenated batch.

The convention under test (fastpt.ops.contrastive docstring): every rank returns the global loss;
each rank's local embeddings receive exactly the gradient of that global loss; replicated scalars
(temperature, logit_scale) receive shares that sum over ranks to the global gradient. Ranks hold
different numbers of rows, so the padded all-gather is exercised too.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from fastpt.ops import clip_loss, info_nce, nt_xent
from tests.helpers import free_port, spawn_ranks, usable_backends

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2
# (backend, dtype, relative tolerance): float64 on the reference backend is exact up to rounding;
# float32 on the C++ kernels sums in a different order on one and two processes.
RUNS = [("reference", torch.float64, 1e-10)] + (
    [("cpu", torch.float32, 2e-5)] if "cpu" in usable_backends("contrastive") else [])


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _scalar(v):
    return torch.tensor(v, dtype=torch.float64)


def _cases():
    """name -> (per-rank row counts, global tensors, fn(tensors..., gather, backend) -> loss, scalar index).

    Tensors listed before the scalar are split by rows across ranks with the counts given per
    tensor; labels travel in the closure (split the same way). The scalar is replicated."""
    n_q, n_k = [4, 6], [6, 3]
    lq = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])  # every class on both sides: all rows have positives
    lk = torch.tensor([2, 1, 0, 0, 1, 2, 1, 0, 2])
    queue = _rand((7, 6), 3)
    return {
        "info_nce_pairs": ([[5, 3], [5, 3]], [_rand((8, 6), 1), _rand((8, 6), 2)], _scalar(0.3),
                           lambda q, k, t, lab, g, b: info_nce(q, k, temperature=t, gather=g, backend=b)),
        "symmetric_label_pairs": ([n_q, n_k], [_rand((10, 6), 4), _rand((9, 6), 5)],
                                  torch.tensor(0.5, dtype=torch.float64),
                                  lambda q, k, t, lab, g, b: info_nce(q, k, temperature=t, labels=lab, symmetric=True,
                                                                      gather=g, backend=b)),
        "queue_normalized": ([[3, 5], [3, 5]], [_rand((8, 6), 6), _rand((8, 6), 7)], _scalar(0.2),
                             lambda q, k, t, lab, g, b: info_nce(q, k, temperature=t, queue=queue.to(q.dtype),
                                                                 normalize=True, gather=g, backend=b)),
        "nt_xent": ([[3, 4], [3, 4]], [_rand((7, 6), 8), _rand((7, 6), 9)], torch.tensor(0.5, dtype=torch.float64),
                    lambda a, b_, t, lab, g, b: nt_xent(a, b_, temperature=t, gather=g, backend=b)),
        "clip": ([[4, 4], [4, 4]], [_rand((8, 6), 10), _rand((8, 6), 11)], torch.tensor(2.6, dtype=torch.float64),
                 lambda a, b_, s, lab, g, b: clip_loss(a, b_, s, gather=g, backend=b)),
    }, (lq, lk, n_q, n_k)


def _labels_for(name, labels, rank):
    if name != "symmetric_label_pairs":
        return None
    lq, lk, n_q, n_k = labels
    if rank is None:
        return lq, lk
    return lq.split(n_q)[rank], lk.split(n_k)[rank]


def _run(name, case, labels, rank, backend, dtype, gather):
    counts, tensors, scalar, fn = case
    leaves = []
    for t, c in zip(tensors, counts):
        part = t.split(c)[rank] if rank is not None else t
        leaves.append(part.to(dtype).clone().requires_grad_())
    s = scalar.to(dtype).clone().requires_grad_()
    loss = fn(*leaves, s, _labels_for(name, labels, rank), gather, backend)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves], s.grad


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cases, labels = _cases()
        results = {}
        for backend, dtype, _ in RUNS:
            for name, case in cases.items():
                results[(backend, name)] = _run(name, case, labels, rank, backend, dtype, True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    spawn_ranks(_worker, (free_port(), str(out)), WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _close(a, b, rtol, what):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    assert err <= rtol * max(1.0, b.abs().max().item()), f"{what}: max error {err:.3e}"


@pytest.mark.parametrize("backend,dtype,rtol", RUNS)
@pytest.mark.parametrize("name", list(_cases()[0]))
def test_gather_matches_single_process(distributed_results, backend, dtype, rtol, name):
    cases, labels = _cases()
    case = cases[name]
    loss, grads, scalar_grad = _run(name, case, labels, None, backend, dtype, False)
    counts = case[0]
    scalar_sum = 0
    for rank, res in enumerate(distributed_results):
        r_loss, r_grads, r_scalar = res[(backend, name)]
        _close(r_loss, loss, rtol, f"rank {rank} loss")
        for i, (g, full) in enumerate(zip(r_grads, grads)):
            _close(g, full.split(counts[i])[rank], rtol, f"rank {rank} grad of input {i}")
        scalar_sum = scalar_sum + r_scalar
    _close(scalar_sum, scalar_grad, rtol, "sum over ranks of the scalar's gradient")
