"""Tiled contrastive losses against torch eager (matmul + cross_entropy), same run, same inputs.

CPU (any machine): forward + backward at N = M = 8192, D = 512, float32, unit-norm embeddings,
temperature 0.07:
  * InfoNCE: ``fastpt.ops.info_nce(backend="cpu")`` vs ``F.cross_entropy(q @ k.T / t, arange(N))``;
  * CLIP (symmetric): ``fastpt.ops.clip_loss(backend="cpu")`` vs the open_clip formula.
Memory: the extra peak resident memory of one forward + backward, measured in a fresh subprocess
(``ru_maxrss`` minus the resident size just before the call) at one N per approach, next to the
analytic model below; the model then gives the largest N that fits in 8 GiB.
CUDA (skipped without a GPU): N = 16384, D = 512, fastpt blas, triton and cuda vs eager in bf16, and
fastpt blas and triton vs eager vs the PyPI package inf-cl (``cal_flash_loss``, float32 only) in fp32 when
importable; time and
``torch.cuda.max_memory_allocated``.

Run::

    python -m pytest benches/bench_contrastive.py --benchmark-only \\
        --benchmark-json=benches/results/contrastive-cpu.json

Inputs and the eager baselines live in ``fastpt.bench.kernels`` (shared with ``fastpt bench``).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fastpt import _native
from fastpt.bench import harness
from fastpt.bench.kernels import TEMPERATURE, contrastive_inputs as _inputs, eager_clip as _eager_clip
from fastpt.bench.kernels import eager_info_nce as _eager_info_nce
from fastpt.ops import clip_loss, info_nce

pytest.importorskip("pytest_benchmark")

N_CPU, D = 8192, 512
BUDGET = 8 << 30  # bytes
FP32 = 4


def machine() -> dict:
    isa = _native._C.contrastive_cpu_isa() if _native._C is not None else None
    return harness.machine(fastpt_cpu_isa=isa)


# ------------------------------------------------------------------ memory models (bytes, float32, N = M)

def eager_bytes(n: int, d: int) -> int:
    """Peak extra memory of eager InfoNCE forward + backward.

    At the peak (inside log_softmax's backward) three (N, N) fp32 matrices are alive: the saved
    log-softmax output, the gradient from nll_loss and the gradient being produced. On top: the
    two (N, D) input gradients.
    """
    return 3 * n * n * FP32 + 2 * n * d * FP32


def fastpt_cpu_bytes(n: int, d: int, threads: int) -> int:
    """Peak extra memory of fastpt's cpu backend forward + backward (csrc/contrastive_cpu.cpp).

    The peak is inside the backward kernel: padded fp32 copies of q (1), of the keys row-major (1)
    and in panels (1), the grad_q partials (1: one column split once N spans many row blocks), one
    grad_k accumulator per worker (``threads``), and the float32 G_q / G_k outputs it fills (2).
    The (N, D) input gradients are made after those buffers are freed. No (N, M) term.
    """
    dp = -(-d // 32) * 32
    rows = -(-n // 192) * 192  # rounded up to whole tiles
    return (4 + threads) * rows * dp * FP32 + 2 * n * d * FP32


def largest_n(model, *args) -> int:
    lo, hi = 1, 1 << 26
    while lo < hi:  # the models grow with N
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if model(mid, *args) <= BUDGET else (lo, mid - 1)
    return lo


# Peak RSS of the child's own address space (VmHWM, reset through clear_refs where the kernel
# allows it): ru_maxrss would also count the parent's pages the child shared between fork and exec.
_MEASURE = r"""
import json, resource, sys, torch, torch.nn.functional as F
import fastpt.ops
n, d, impl, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
k = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
before, hwm_before = status("VmRSS"), status("VmHWM")
if impl == "eager":
    F.cross_entropy(q @ k.T / 0.07, torch.arange(n)).backward()
else:
    fastpt.ops.info_nce(q, k, temperature=0.07, backend="cpu").backward()
print(json.dumps(dict(extra=status("VmHWM") - before, hwm_before_call=hwm_before - before)))
"""


def measure_extra_bytes(impl: str, n: int, d: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(n), str(d), impl, str(threads)], capture_output=True,
                         text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ CPU timing

def _fwd_bwd(loss_fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        loss_fn().backward()
    return run


needs_cpu_kernels = pytest.mark.skipif(_native.cpu_unavailable() is not None, reason="fastpt._C not built")


@needs_cpu_kernels
@pytest.mark.parametrize("impl", ["fastpt_cpu", "torch_eager"])
def test_info_nce_cpu(benchmark, impl):
    q, k = (t.requires_grad_() for t in _inputs(N_CPU, D))
    fn = (lambda: info_nce(q, k, temperature=TEMPERATURE, backend="cpu")) if impl == "fastpt_cpu" else (
        lambda: _eager_info_nce(q, k))
    benchmark.group = f"info_nce fwd+bwd cpu N={N_CPU} D={D} fp32"
    # the logits (2 N N D) and their two gradients (4 N N D), as fastpt.bench.kernels counts them
    benchmark.extra_info.update(machine(), n=N_CPU, d=D, flops=6 * N_CPU * N_CPU * D)
    benchmark.pedantic(_fwd_bwd(fn, [q, k]), rounds=3, warmup_rounds=1, iterations=1)


@needs_cpu_kernels
@pytest.mark.parametrize("impl", ["fastpt_cpu", "torch_eager"])
def test_clip_cpu(benchmark, impl):
    q, k = (t.requires_grad_() for t in _inputs(N_CPU, D))
    scale = torch.tensor(math.log(1 / TEMPERATURE), requires_grad=True)
    fn = (lambda: clip_loss(q, k, scale, normalize=False, backend="cpu")) if impl == "fastpt_cpu" else (
        lambda: _eager_clip(q, k, scale))
    benchmark.group = f"clip_loss fwd+bwd cpu N={N_CPU} D={D} fp32"
    benchmark.extra_info.update(machine(), n=N_CPU, d=D)
    benchmark.pedantic(_fwd_bwd(fn, [q, k, scale]), rounds=3, warmup_rounds=1, iterations=1)


@needs_cpu_kernels
@pytest.mark.parametrize("impl,n", [("torch_eager", 8192), ("fastpt_cpu", 16384)])
def test_memory_cpu(benchmark, impl, n):
    """Measured extra peak memory at one N vs the model; the model's largest N within 8 GiB."""
    threads = torch.get_num_threads()
    model = (lambda m: eager_bytes(m, D)) if impl == "torch_eager" else (lambda m: fastpt_cpu_bytes(m, D, threads))
    result = benchmark.pedantic(measure_extra_bytes, args=(impl.split("_")[-1].replace("cpu", "fastpt"), n, D, threads),
                                rounds=1, iterations=1)
    predicted = model(n)
    n_max = largest_n(lambda m: model(m))
    benchmark.group = f"memory fwd+bwd cpu D={D} fp32 (8 GiB budget)"
    benchmark.extra_info.update(machine(), n=n, d=D, measured_extra_bytes=result["extra"],
                                predicted_extra_bytes=predicted, measured_over_predicted=result["extra"] / predicted,
                                largest_n_in_8GiB=n_max, similarity_matrix_bytes=n * n * FP32)
    print(f"\n{impl}: N={n} measured {result['extra'] / 2**20:.0f} MiB, model {predicted / 2**20:.0f} MiB; "
          f"largest N in 8 GiB by the model: {n_max}")


# ------------------------------------------------------------------ CUDA (skipped here)

N_GPU = 16384
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("impl,dtype", [("fastpt_blas", "bf16"), ("fastpt_triton", "bf16"), ("fastpt_cuda", "bf16"),
                                        ("torch_eager", "bf16"), ("fastpt_blas", "fp32"), ("fastpt_triton", "fp32"),
                                        ("torch_eager", "fp32"), ("inf_cl", "fp32")])
def test_info_nce_cuda(benchmark, impl, dtype):
    if impl == "inf_cl":
        inf_cl = pytest.importorskip("inf_cl")
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    q, k = (t.requires_grad_() for t in _inputs(N_GPU, D, dt, "cuda"))
    if impl == "inf_cl":  # inf-cl is fp32 only
        fn = lambda: inf_cl.cal_flash_loss(q, k, scale=1 / TEMPERATURE).mean()  # noqa: E731
    elif impl.startswith("fastpt_"):
        backend = impl.split("_")[1]
        fn = lambda: info_nce(q, k, temperature=TEMPERATURE, backend=backend)  # noqa: E731
    else:
        fn = lambda: _eager_info_nce(q, k)  # noqa: E731
    step = _fwd_bwd(fn, [q, k])
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"info_nce fwd+bwd cuda N={N_GPU} D={D} {dtype}"
    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    with torch.no_grad():
        loss = float(fn())  # every contender computes the same loss: a cross-check in the results
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), n=N_GPU, d=D, dtype=str(q.dtype),
                                peak_extra_bytes=torch.cuda.max_memory_allocated() - base, loss=loss)
