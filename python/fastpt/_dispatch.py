"""Backend dispatch: each op lists its backends in priority order, each backend
declares what it supports, and the first that accepts the inputs runs.

A backend is refused with a reason (a string); a forced backend that refuses,
or inputs that no backend accepts, raise ``BackendError`` listing every backend
and its reason. Nothing is patched at import time.

Under a ``torch.func`` transform (grad, vmap, jacrev, jvp, ...) only the backends made of plain
torch ops run (``transform_safe``: every ``reference``, and attention's ``sdpa``): the others are
``torch.library.custom_op`` ops (or ``autograd.Function``s) whose autograd formula torch's
transforms cannot apply (torch 2.13 has no functorch rule for
``register_autograd``; it raises "In order to use an autograd.Function with functorch
transforms ..."), and under vmap a fused kernel that reads ``requires_grad`` sees False on the
wrapped tensors and silently drops a gradient. Plain PyTorch ops are what every transform
traces. ``backend=None`` picks the first of those that accepts the inputs; a forced other backend
raises ``BackendError`` saying why (``transforms_active``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

from . import _native

# Every backend name any op may declare: fastpt's four (DESIGN.md) plus torch's own fused kernels
# where they measured faster ("sdpa": attention on plain rows; "blas": chunked cuBLAS products).
BACKENDS = ("cuda", "cpu", "triton", "reference", "sdpa", "blas")


class BackendError(RuntimeError):
    """No backend (or not the forced one) can serve these inputs."""


UNDER_TRANSFORM = ("a torch.func transform (grad, vmap, jacrev, jvp, ...) is active: this backend's kernels are "
                   "custom ops / autograd Functions without functorch rules; the reference backend (plain "
                   "PyTorch ops) serves under the transforms")


def device_constant(values, dtype, device):
    """``torch.tensor(values, dtype=dtype, device=device)`` made once per (values, dtype, device) and shared by
    every later call, which must only read it: a fresh tensor per call from host values is a host-to-device
    copy on every GPU step (special token ids, a float temperature, ALiBi slopes). ``values``: a number or a
    tuple. Traced (torch.compile), or under a dispatch mode (FakeTensorMode, make_fx: what it would make is
    no real tensor): a fresh tensor, not cached."""
    import torch
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # made under inference_mode it could not be saved for a later backward
            t = torch.tensor(values, dtype=dtype, device=device)
        if type(t) is torch.Tensor:  # a subclass (a mode's) is no constant to hand to later calls
            if len(_CONSTANTS) >= _MAX_CONSTANTS:
                _CONSTANTS.clear()
            _CONSTANTS[key] = t
    return t


_CONSTANTS: dict = {}  # device_constant's tensors
_MAX_CONSTANTS = 256


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, jvp, functionalize) is running: one C
    call (under 1 µs with this function's own overhead) reading functorch's interpreter stack. ``torch.compile`` folds it to a constant
    (False outside a transform), so a compiled graph neither breaks nor changes on it."""
    import torch

    return torch._C._are_functorch_transforms_active()


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    available: () -> reason it cannot run on this machine at all, or None.
    supports:  (**inputs) -> reason it refuses these inputs, or None.
    run:       (**inputs) -> result.
    """

    name: str
    available: Callable[[], str | None]
    supports: Callable[..., str | None]
    run: Callable
    # runs under torch.func transforms too (plain torch ops: every "reference", torch's own SDPA)
    transform_safe: bool = False

    def __post_init__(self):
        if self.name == "reference":
            object.__setattr__(self, "transform_safe", True)


@_native.once
def triton_unavailable() -> str | None:
    """Why Triton kernels cannot run here (GPU or interpreter), or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    import torch

    if torch.cuda.is_available() or _native.triton_interpreting():
        return None
    return "no CUDA device and TRITON_INTERPRET is not set"


def triton_device_refusal(device) -> str | None:
    """Why Triton kernels refuse tensors on ``device``: they need CUDA, or the interpreter on the CPU.
    Meta tensors (shapes only, no data for a kernel to read) are refused even under the interpreter,
    so that they reach the reference backend, which infers the output shapes as torch's ops do."""
    if device.type == "meta":
        return "meta tensors hold no data (shapes only); the reference backend infers the shapes"
    if device.type != "cuda" and not _native.triton_interpreting():
        return f"needs cuda tensors (or TRITON_INTERPRET=1), got {device.type}"
    return None


def kernel_dtype_refusal(dtype) -> str | None:
    """Why the fused kernels (every backend but the reference) refuse ``dtype``, or None."""
    import torch

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"supports float32, float16 and bfloat16, got {dtype} (float64 runs on the reference backend)"
    return None


def dot_width(d: int) -> int:
    """The width a Triton tile of ``d`` features takes: the power of two >= d, at least 16 (tl.dot's
    smallest K)."""
    return max(16, 1 << max(d - 1, 0).bit_length())


def interpreter_upcast(t) -> bool:
    """Whether the Triton kernels take ``t``'s operands as fp32: bf16 under the interpreter (a CPU
    tensor), whose Triton 3.8 multiplies bfloat16 blocks as raw integers (exact: they are bf16 values)."""
    import torch

    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def triton_autotune() -> bool:
    """Whether the Triton kernels time their candidate configs (default); FASTPT_TRITON_AUTOTUNE=0 runs
    each kernel's first candidate (seconds instead of minutes of compiling, e.g. in the GPU tests)."""
    return os.environ.get("FASTPT_TRITON_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Multiprocessors of a CUDA ``device`` (its index, or the current device when it has none)."""
    import torch

    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


_ADDMM_F32: dict = {}  # CUDA device index -> whether torch's out_dtype addmm accumulates in place correctly


def _addmm_f32_works(device) -> bool:
    """Try ``torch.addmm(c, a, b, out_dtype=float32, out=c)`` once per device on a small bf16 product
    (one synchronisation): torch 2.8 and 2.9 had it but mishandled ``out`` (pytorch#154086, fixed by
    #167931). Not tried, and not used, while a CUDA graph is being captured before the first try."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ADDMM_F32:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a, b = (torch.randn(s, device=device, generator=g).to(torch.bfloat16) for s in ((64, 32), (48, 32)))
            c = torch.randn(64, 48, device=device, generator=g)
            want = c + a.float() @ b.float().t()
            torch.addmm(c, a, b.t(), out_dtype=torch.float32, out=c)
            _ADDMM_F32[index] = bool(torch.allclose(c, want, rtol=1e-4, atol=1e-4))
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_F32[index] = False
    return _ADDMM_F32[index]


def addmm_f32_(out, a, b) -> bool:
    """``out += a @ b`` for fp16 / bf16 ``a``, ``b`` and a float32 ``out``, summed by one cuBLAS GEMM
    into ``out`` (beta = 1): no half-precision product to round, allocate and add in a second pass.
    Returns False, doing nothing, where that is not available (not CUDA, other dtypes, a torch whose
    out_dtype addmm is missing or fails its one-time check); the caller then adds the product itself."""
    import torch

    if not (out.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype
            and out.dtype == torch.float32 and _addmm_f32_works(out.device)):
        return False
    torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    return True


def native_cpu_unavailable() -> str | None:
    return _native.cpu_unavailable()


def native_cuda_unavailable() -> str | None:
    return _native.cuda_unavailable()


def torch_cuda_unavailable() -> str | None:
    """Why torch's own CUDA kernels (the sdpa and blas backends) cannot run here, or None."""
    import torch

    return None if torch.cuda.is_available() else "no CUDA device (torch's own CUDA kernels)"


AVAILABILITY = {
    "cuda": native_cuda_unavailable,
    "cpu": native_cpu_unavailable,
    "triton": triton_unavailable,
    "reference": lambda: None,
    "sdpa": torch_cuda_unavailable,
    "blas": torch_cuda_unavailable,
}


def backend(name: str, supports: Callable[..., str | None], run: Callable, *, transform_safe: bool = False) -> Backend:
    """A backend whose machine-level availability is the standard one for ``name``."""
    return Backend(name, AVAILABILITY[name], supports, run, transform_safe)


# Every Op registers here when its module is imported (for fastpt.info and the test grid).
OPS: dict[str, "Op"] = {}


class Op:
    """A dispatchable op: ``op(backend=None, **inputs)``.

    probe: (device) -> small representative inputs, used by ``fastpt.info()`` to
    report which backend ``backend=None`` would pick on each device.
    """

    def __init__(self, name: str, backends: list[Backend], probe: Callable[[str], dict], register: bool = True):
        self.name = name
        self.backends = {b.name: b for b in backends}
        self.probe = probe
        if register:
            OPS[name] = self

    def refusals(self, **inputs) -> dict[str, str | None]:
        """For every backend: why it refuses these inputs, or None if it accepts them."""
        under = transforms_active()
        out = {}
        for b in self.backends.values():
            out[b.name] = (UNDER_TRANSFORM if under and not b.transform_safe else None) or b.available() \
                or b.supports(**inputs)
        return out

    def check_name(self, backend: str | None) -> None:
        """ValueError naming ``backend`` for an unknown name, BackendError for one this op lacks
        (what ``select`` raises first; for ops that return early without selecting)."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        if backend is not None and backend not in self.backends:
            raise BackendError(
                f"{self.name}: backend {backend!r} does not implement this op "
                f"(implemented: {', '.join(self.backends)})"
            )

    def select(self, backend: str | None = None, **inputs) -> Backend:
        """The backend that runs these inputs: the forced one, or the first in order that accepts them;
        under a torch.func transform only the backends made of plain torch ops (``transform_safe``: the
        reference, torch's SDPA; ``transforms_active``, module docstring)."""
        self.check_name(backend)
        candidates = [self.backends[backend]] if backend else list(self.backends.values())
        if transforms_active():
            if not any(b.transform_safe for b in candidates):
                raise BackendError(f"{self.name}: backend {backend!r} cannot run here: {UNDER_TRANSFORM}"
                                   + ("" if "reference" in self.backends else " (this op has no reference)"))
            candidates = [b for b in candidates if b.transform_safe]
        for b in candidates:
            if (b.available() or b.supports(**inputs)) is None:
                return b
        reasons = "; ".join(f"{k}: {v or 'ok'}" for k, v in self.refusals(**inputs).items())
        what = f"forced backend {backend!r} cannot serve these inputs" if backend else "no backend can serve these inputs"
        raise BackendError(f"{self.name}: {what} ({reasons})")

    def __call__(self, backend: str | None = None, **inputs):
        return self.select(backend, **inputs).run(**inputs)


def device_is(kind: str):
    """A ``supports`` helper: refuse tensors not on device type ``kind``."""

    def check(tensor_device) -> str | None:
        if tensor_device.type != kind:
            return f"needs {kind} tensors, got {tensor_device.type}"
        return None

    return check
