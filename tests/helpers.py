"""Helpers shared by the tests: the backend grid comes from each op's own declarations."""
from __future__ import annotations

import torch

from fastpt import _dispatch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def usable_backends(op_name: str, device: str = "cpu") -> list[str]:
    """Backends of an op that are built and available here and accept ``device`` probe inputs."""
    op = _dispatch.OPS[op_name]
    probe = op.probe(device)
    return [name for name, why in op.refusals(**probe).items() if why is None]


def backend_grid(op_name: str) -> list[tuple[str, str]]:
    """Every (device, backend) pair that can run ``op_name`` here."""
    return [(dev, b) for dev in DEVICES for b in usable_backends(op_name, dev)]


def spawn_ranks(fn, args: tuple, nprocs: int, timeout_s: float = 180.0) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, failing the test (workers killed) when they have not
    finished within ``timeout_s``: never hang the suite on a stuck collective."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s:g} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FullDisk:
    """A file the disk has ``room`` bytes left for: the write that does not fit lands in part, then fails as a
    full disk's does (ENOSPC, no file name)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = data if isinstance(data, str) else bytes(data)  # text or binary files
        n = max(0, min(len(data), self.room))
        self.f.write(data[:n])
        self.room -= n
        if n < len(data):
            raise OSError(28, "No space left on device")
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
