"""Loads the compiled core ``fastpt._C`` and says why when it cannot.

``_C`` is a plain pybind11 module without torch headers: the Python layer hands
it data pointers, sizes, strides and (for CUDA) the current stream as integers.
"""
from __future__ import annotations

import functools
import os

try:
    from . import _C  # noqa: F401
    LOAD_ERROR: str | None = None
except ImportError as exc:  # a source checkout that was never built
    _C = None
    LOAD_ERROR = f"fastpt._C did not load ({exc}); build with `pip install -e .`"


def build_info() -> dict:
    """What the native module was built with (empty when it is missing)."""
    return dict(_C.build_info()) if _C is not None else {}


def cpu_unavailable() -> str | None:
    """Why the C++ CPU kernels cannot run here, or None when they can."""
    return LOAD_ERROR


def once(probe):
    """``probe()``'s answer, computed on the first call and kept: a plain cache that
    ``torch.compile`` traces (dispatch asks the backends' ``available()`` inside compiled code;
    Dynamo cannot call into ``_C`` there, and torch 2.11's broke on ``functools.lru_cache``)."""
    box: list = []

    @functools.wraps(probe)
    def cached():
        if not box:
            box.append(probe())
        return box[0]

    return cached


@once
def cuda_unavailable() -> str | None:
    """Why the CUDA C++ kernels cannot run here, or None when they can."""
    if _C is None:
        return LOAD_ERROR
    if not _C.build_info()["cuda"]:
        return "fastpt._C was built without CUDA (nvcc not found or FASTPT_CUDA=OFF)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def num_threads() -> int:
    """Threads the CPU kernels use: torch's intra-op setting, so users control both at once."""
    import torch

    return max(1, torch.get_num_threads())


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dtype_code(dtype) -> int:
    """The dtype code of ``csrc/common.h`` for a torch dtype."""
    import torch

    codes = {
        torch.int32: 0, torch.int64: 1, torch.uint8: 2, torch.bool: 2, torch.int16: 3,
        torch.float32: 4, torch.float16: 5, torch.bfloat16: 6, torch.float64: 7,
    }
    return codes[dtype]


def cuda_stream(device) -> int:
    """The current CUDA stream of ``device`` as an integer handle."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream
