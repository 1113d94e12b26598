"""``fastpt.info()``: versions, which backends are built and usable here, and which serves each op."""
from __future__ import annotations

import platform

from . import _dispatch, _native


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastpt")
    except PackageNotFoundError:  # a source tree that was never installed (as fastpt.__version__)
        return "0.0.0+unknown"


def info() -> dict:
    """A report of this installation.

    Returns a dict with ``version``, ``python``, ``torch``, ``triton`` (version or None),
    ``native`` (what ``fastpt._C`` was built with), ``backends`` (backend -> None when usable
    here, else the reason it is not) and ``ops`` (op -> device -> the backend ``backend=None``
    picks for typical inputs, or the refusals when none can).
    """
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for name, op in _dispatch.OPS.items():
        ops[name] = {}
        for dev in devices:
            try:
                ops[name][dev] = op.select(None, **op.probe(dev)).name
            except _dispatch.BackendError as exc:
                ops[name][dev] = str(exc)
    return {
        "version": _version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "native": _native.build_info(),
        "backends": {name: check() for name, check in _dispatch.AVAILABILITY.items()},
        "triton_interpreter": _native.triton_interpreting(),
        "ops": ops,
    }
