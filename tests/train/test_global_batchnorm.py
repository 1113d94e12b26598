"""BatchNorm over the batch of every rank (train.distributed.GlobalBatchNorm, put in by ``wrap`` on several
ranks): 2 gloo processes give what one process gives on the combined batch. Each rank normalised its own
micro-batch before, so SimCLR's and MoCo v3's projectors trained another model on N ranks (SimCLR's "global
BN", MoCo v3's SyncBatchNorm)."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastpt.assemble import build
from fastpt.train import distributed as fdist
from tests.helpers import free_port, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD, B = 2, 8
SIMCLR = {"backbone": {"builder": "vit", "image_size": 8, "patch_size": 4, "in_channels": 1, "hidden_size": 16,
                       "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "dropout": 0.0},
          "objective": {"name": "simclr", "proj_dim": 8, "proj_hidden_dim": 16, "log_accuracy": False}}


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 5, 3, generator=g, dtype=torch.float64) * 3 + 1  # (N, C, L): BatchNorm1d's 3-D input
    views = torch.randn(2 * B, 1, 8, 8, generator=g)  # SimCLR: B first views, then B second views
    return x, views


def _bn():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _simclr():
    torch.manual_seed(0)
    return build(SIMCLR).train()


def _one_process():
    x, views = _data()
    bn = _bn()
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    loss = _simclr()(views=views).loss.detach()
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "mean": bn.running_mean,
            "var": bn.running_var, "simclr": float(loss)}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    d = fdist.init("cpu", timeout_s=60)
    try:
        x, views = _data()
        per = B // WORLD
        rows = slice(rank * per, (rank + 1) * per)
        bn = nn.Sequential(_bn())
        assert fdist.global_batchnorm(bn) == 1 and isinstance(bn[0], fdist.GlobalBatchNorm)
        mine = x[rows].clone().requires_grad_()
        y = bn(mine)
        weights = torch.linspace(-1, 1, x.numel(), dtype=y.dtype).view_as(x)[rows]
        (y * weights).sum().backward()
        model = fdist.wrap(_simclr(), d)  # DDP, as the recipe does: its BatchNorms become global
        mine_views = torch.cat([views[rows], views[B:][rows]])
        loss = model(views=mine_views).loss.detach()
        fdist.all_reduce(loss, d, "mean")  # the recipe's logged loss
        torch.save({"y": y.detach(), "dx": mine.grad, "dw": bn[0].weight.grad, "db": bn[0].bias.grad,
                    "mean": bn[0].running_mean, "var": bn[0].running_var, "simclr": float(loss)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        fdist.cleanup(d)



def test_two_ranks_normalise_as_one_process_on_the_combined_batch(tmp_path):
    spawn_ranks(_worker, (free_port(), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    want = _one_process()
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), want["y"], **close)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), want["dx"], **close)
    for key in ("dw", "db"):  # each rank's share of the parameter gradient; DDP sums (and averages) them
        torch.testing.assert_close(sum(r[key] for r in ranks), want[key], **close)
    for key in ("mean", "var"):  # running statistics of the whole batch, the same on every rank
        for r in ranks:
            torch.testing.assert_close(r[key], want[key], **close)
    assert ranks[0]["simclr"] == pytest.approx(want["simclr"], rel=1e-5)


def test_one_process_and_eval_are_plain_batchnorm():
    x, _ = _data()
    ref, ours = _bn(), nn.Sequential(_bn())
    fdist.global_batchnorm(ours)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert set(ours.state_dict()) == {f"0.{k}" for k in ref.state_dict()}
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
