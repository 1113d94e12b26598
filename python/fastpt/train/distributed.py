"""Data parallelism through torch's own engine: DDP, or FSDP2 (``fully_shard``) for large models.

``torchrun --nproc_per_node N -m fastpt pretrain ...`` (or ``--nnodes`` with a rendezvous for
several machines) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``init``
reads them and joins the process group (NCCL on CUDA, gloo on the CPU). Without them the run is
one process and nothing here does any communication.

Gradient accumulation: ``sync_gradients(model, last)`` wraps a micro-step so that gradients
are all-reduced only on the last micro-step of an optimizer step (DDP ``no_sync``, FSDP2
``set_requires_gradient_sync``).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module started the process group (and ends it in ``cleanup``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto": CUDA device ``local_rank`` when CUDA is available, else the CPU; "cuda" without
    CUDA raises RuntimeError."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: 'cuda' was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device: str = "auto", *, timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun process group when its environment is set (else a one-process ``Dist``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns)


def cleanup(d: Dist, *, ok: bool = True) -> None:
    """Destroy the process group this run created, once its worker threads are idle.

    gloo's worker thread frees a finished collective's work object (and the Python-owned tensors
    it holds, which needs the GIL) just after the caller's wait returns. If the group's last
    reference (DDP's Reducer holds one) goes away while that thread waits for the GIL, the group's
    destructor joins it with the GIL held: a deadlock at exit (a 2-process CPU run hung after its
    final checkpoint's barrier: main thread in ~ProcessGroupGloo -> thread::join, gloo thread in
    ~AsyncGatherWork -> gil_scoped_acquire). A last barrier, then a sleep that releases the GIL,
    lets the thread finish first.

    ``ok=False`` (the run is ending on an exception): no barrier. The other ranks are not coming to
    it (they wait in the step's next collective, or failed themselves), so the failing rank waited in
    it for the group's timeout (30 minutes) while they waited for it, and torchrun, which tears the
    job down once one worker exits non-zero, never saw one exit. The group goes at once (the sleep
    alone still lets gloo's thread let go of its last work object); the peers' pending collectives
    then fail on the closed connections, or torchrun ends them."""
    if d.owns_group and dist.is_initialized():
        if d.enabled and dist.get_backend() == "gloo":
            if ok:
                dist.barrier()
            time.sleep(0.05)
        dist.destroy_process_group()
        d.owns_group = False


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient is summed the same way (each rank's input feeds every rank's output)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of every rank: SimCLR's "global BN", MoCo v3's
    SyncBatchNorm. With several ranks the mean, then the variance, are summed over them by a differentiable
    all-reduce, so gradients flow across ranks as through ``torch.nn.SyncBatchNorm`` (which refuses CPU
    tensors; this runs on gloo and NCCL alike). One process, or eval: plain BatchNorm. Same parameters and
    buffers as ``nn.BatchNorm1d/2d/3d``, so state dicts are unchanged."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected an input of at least 2 dims (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce_grad = _AllReduceSum.apply
        self._check_input_dim(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # half inputs: float32 statistics
        total = all_reduce_grad(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // max(c, 1))]))
        n = total[c]
        mean = total[:c] / n
        var = all_reduce_grad(((xf - mean.view(shape)) ** 2).sum(dims)) / n  # two passes: no cancellation
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(model: nn.Module) -> int:
    """Replace every ``nn.BatchNorm1d/2d/3d`` of ``model`` by a ``GlobalBatchNorm`` holding the same tensors
    (in place); returns how many. Without it each rank normalised its own micro-batch: N ranks trained a
    different model than one process on the combined batch (SimCLR's and MoCo v3's projectors)."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                new = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                      affine=child.affine, track_running_stats=child.track_running_stats)
                for key in ("weight", "bias"):
                    setattr(new, key, getattr(child, key))
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(new, key, getattr(child, key))
                new.train(child.training)
                setattr(module, name, new)
                count += 1
    return count


def wrap(model: nn.Module, d: Dist, *, fsdp: bool = False, find_unused_parameters: bool = False) -> nn.Module:
    """The model the training step calls: ``model`` itself (one process), DDP, or FSDP2.

    With several ranks every BatchNorm normalises over the whole batch of all ranks (``global_batchnorm``).
    FSDP2 shards every distinct trainable transformer layer (``.layers`` of the backbone and of any decoder; a
    layer shared across depths, ALBERT's, once) as its own unit and then the whole model, on a mesh of
    ``d.device``'s type. Frozen teacher / momentum copies get no units of their own: their parameters are
    sharded in the root unit with the rest (heads, embeddings), so the whole teacher is all-gathered at the
    model's forward and kept until its backward ends (no per-layer memory saving for it). Parameters and
    gradients then are DTensors: save with ``full_state_dict``. FSDP2 needs torch >= 2.6
    (``torch.distributed.fsdp.fully_shard``).
    """
    if d.enabled:
        global_batchnorm(model)
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:
            from .config import ConfigError

            raise ConfigError(f"train.fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6; this is "
                               f"torch {torch.__version__}; use DDP (train.fsdp: false)") from exc
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():  # one process: FSDP2 still needs a (one-rank) process group
            dist.init_process_group("gloo" if d.device.type == "cpu" else "nccl", rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
            d.owns_group = True
        # the recipe's device, not torch's default accelerator (CUDA on any GPU host, also for device: cpu)
        mesh = init_device_mesh(d.device.type, (dist.get_world_size(),))
        done: set[int] = set()
        for module in model.modules():
            layers = getattr(module, "layers", None)
            if isinstance(layers, nn.ModuleList) and all(p.requires_grad for p in module.parameters()):
                for layer in layers:
                    if id(layer) not in done:  # ALBERT's share_layers: one module at every depth
                        done.add(id(layer))
                        fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_gradients(model: nn.Module, sync: bool):
    """Context for one micro-step's backward: all-reduce gradients only when ``sync``."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or averaged: op="mean", or max: op="max") over the ranks, in place; one process: ``t``."""
    if d.enabled:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        if op == "mean":
            t /= d.world_size
    return t


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, d: Dist) -> list | None:
    """Every rank's ``obj`` on rank 0 (list by rank); None on the others."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded ``(model, optimizer)`` state dicts on the CPU (FSDP2; collective: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """Load an unsharded optimizer state dict (``full_state_dicts``) into an FSDP2 model's optimizer
    (collective: every rank passes the full dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
