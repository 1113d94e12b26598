"""The one timing and memory harness every fastpt bench uses (``fastpt bench`` and ``benches/``).

* :func:`time_fn`: warm-up calls, then ``repeats`` timed samples; CUDA events on a GPU (the
  device's own clock), ``time.perf_counter`` on the CPU. Returns a :class:`Timing` whose
  ``median`` is the figure reports use. On a GPU a sample can be a ``batch`` of back-to-back calls
  between one pair of events, divided by the batch: the device time per call in a queue, as a
  training loop runs it (the host's launch overhead is hidden unless it exceeds the device time,
  which then shows). A single call timed from an idle GPU also counts the host's Python and
  launch latency before the first kernel: the H100 run of 2026-11-26 timed 1-4M-element dropout
  at 0.03-0.24 ms a call, mostly that. :func:`calls_per_sample` picks the batch.
* :func:`peak_memory`: the peak memory one call adds above what is held before it starts:
  ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the kernel's resident high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) with glibc's mmap threshold pinned low for
  the measurement, so that every tensor-sized block is mapped on allocation and unmapped on free
  and the resident set follows live tensor bytes (``tracemalloc`` cannot see torch's allocator).
* :func:`machine_info`: what every result row names: device and its name, CPU, cores, threads,
  versions (python, torch, triton, transformers, fastpt, CUDA), the git commit, date and load.
"""
from __future__ import annotations

import datetime
import functools
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _cpu_malloc
from ..ops import empty_cache

__all__ = ["Timing", "time_fn", "calls_per_sample", "peak_memory", "cpu_memory_note", "machine_info", "machine", "git_commit",
           "cpu_fields", "synchronize"]


# ----------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Seconds per timed call, in the order they ran."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


SAMPLE_S = 5e-3  # a batched CUDA sample holds at least this much device time (calls_per_sample)
MAX_BATCH = 64


def calls_per_sample(seconds_per_call: float, *, target_s: float = SAMPLE_S, most: int = MAX_BATCH) -> int:
    """Back-to-back calls per timed CUDA sample: enough for ``target_s`` of work at
    ``seconds_per_call`` (so one call's launch latency is a small share), 1 for calls that long."""
    if seconds_per_call <= 0:
        return most
    return max(1, min(most, int(target_s / seconds_per_call + 0.999)))


def time_fn(fn: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 1, repeats: int = 5,
            setup: Callable[[], object] | None = None, budget_s: float | None = None, batch: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed samples.

    Args:
        fn: the work, no arguments (close over the inputs).
        device: where ``fn`` runs: "cuda" times each sample between two CUDA events, "cpu" with
            ``time.perf_counter``.
        warmup: untimed calls first (compilation, autotuning, allocator warm-up).
        repeats: timed samples (at least 1).
        setup: called before every call, outside the timed region (e.g. reset gradients).
        budget_s: stop repeating once the timed calls add up to this many seconds (after at least
            3, or ``repeats`` if fewer): bounds a slow case on a slow machine.
        batch: CUDA only, and only without ``setup``: calls per sample, queued back to back between
            one pair of events; the sample is their mean (see the module docstring).

    Returns a :class:`Timing` (seconds per call). Raises whatever ``fn`` raises.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if batch < 1:
        raise ValueError(f"batch: expected >= 1, got {batch}")
    cuda = torch.device(device).type == "cuda"
    if not cuda or setup is not None:
        batch = 1
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    timing = Timing()
    for i in range(repeats):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            timing.times.append(start.elapsed_time(end) / 1e3 / batch)
        else:
            t0 = time.perf_counter()
            fn()
            timing.times.append(time.perf_counter() - t0)
        if budget_s is not None and i + 1 >= min(3, repeats) and sum(timing.times) >= budget_s:
            break
    return timing


# ----------------------------------------------------------------------------- memory

def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name + ":"))


@functools.lru_cache(maxsize=None)
def cpu_memory_note() -> str | None:
    """None when CPU peak memory can be measured here, else why not (shown in reports)."""
    if not os.path.exists("/proc/self/status"):
        return "no /proc/self/status (not Linux): CPU peak memory is not measured"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        return f"/proc/self/clear_refs is not writable ({exc.strerror}): CPU peak memory is not measured"
    return None if _cpu_malloc.unavailable() is None else "not glibc: CPU peak memory is an upper bound"


def peak_memory(fn: Callable[[], object], *, device: str | torch.device = "cpu",
                setup: Callable[[], object] | None = None) -> int | None:
    """Bytes of peak memory that one call of ``fn()`` adds above what is held before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (torch's allocator, all streams) minus the
    allocated bytes before the call. CPU: the resident set's high-water mark (``VmHWM``) minus
    the resident set before the call, with glibc's mmap threshold pinned at 128 KiB during the
    call (restored to 32 MiB, glibc's dynamic maximum, afterwards) and ``fastpt._cpu_malloc``'s
    tuning off during it (on again after, when it was). ``setup`` runs first,
    outside the measurement; then ``fastpt.ops.empty_cache()``, so that a scratch buffer fastpt
    keeps between calls is counted in the call that allocates it again. Returns None where the
    CPU measurement is unavailable (:func:`cpu_memory_note` says why).
    """
    if setup is not None:
        setup()
    empty_cache()  # buffers fastpt keeps between calls count as the call's memory
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    note = cpu_memory_note()
    if note is not None and "upper bound" not in note:
        return None
    libc = _cpu_malloc._libc()
    # glibc's own behaviour, free memory trimmed (restore()): kept memory would hide the call's allocations
    with _cpu_malloc.tuned(False):
        if libc is not None:
            libc.mallopt(_cpu_malloc.M_MMAP_THRESHOLD, 128 * 1024)
        try:
            base = _status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            fn()
            return max(0, _status_bytes("VmHWM") - base)
        finally:
            if libc is not None:
                libc.mallopt(_cpu_malloc.M_MMAP_THRESHOLD, _cpu_malloc.DEFAULTS[_cpu_malloc.M_MMAP_THRESHOLD])


# ----------------------------------------------------------------------------- machine

@functools.lru_cache(maxsize=None)
def cpu_fields() -> dict:
    """The first processor's ``/proc/cpuinfo`` fields (all processors of a machine match), or {}."""
    try:
        with open("/proc/cpuinfo") as f:
            fields: dict[str, str] = {}
            for line in f:
                if not line.strip():
                    break
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields[k.strip()] = v.strip()
            return fields
    except OSError:
        return {}


def _simd(flags: set[str]) -> str:
    return next((x for x in ("amx_bf16", "avx512f", "avx2", "sse4_2", "asimd") if x in flags), "unknown")


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """Short commit of the source tree fastpt runs from (``+dirty`` with uncommitted changes).

    ``FASTPT_COMMIT`` overrides (a machine without git, a copied tree); None when unknown.
    """
    if os.environ.get("FASTPT_COMMIT"):
        return os.environ["FASTPT_COMMIT"]
    root = Path(__file__).resolve().parents[3]  # python/fastpt/bench/harness.py -> the repository
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed, or broken: the report says None
        return None


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            text = f.read()
        return next((w for w in text.split() if w.count(".") >= 1 and w[0].isdigit()), None)
    except OSError:
        return None


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What every result row names about where it ran.

    Keys: ``device`` ("cpu"/"cuda"), ``device_name`` (GPU name, or the CPU model), ``cpu``,
    ``simd``, ``cores`` (usable logical cores), ``torch_threads``, ``python``, ``torch``,
    ``triton``, ``transformers``, ``fastpt``, ``cuda`` (torch's CUDA version), ``driver``,
    ``commit``, ``date`` (UTC, ISO), ``loadavg_1m``.
    """
    from .._info import _version as fastpt_version

    dev = torch.device(device).type
    fields = cpu_fields()
    cpu = fields.get("model name") or platform.processor() or "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    gpu = torch.cuda.get_device_name() if dev == "cuda" else None
    return dict(
        device=dev, device_name=gpu or cpu, cpu=cpu, simd=_simd(set(fields.get("flags", "").split())), cores=cores,
        torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
        triton=_version("triton"), transformers=_version("transformers"), fastpt=fastpt_version(),
        cuda=torch.version.cuda if dev == "cuda" else None, driver=_nvidia_driver() if dev == "cuda" else None,
        commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        loadavg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )


def machine(**extra) -> dict:
    """The fields the pytest benches of ``benches/`` record in ``extra_info`` (kept for their JSON):
    cpu, simd, cores, torch_threads, torch, fastpt, loadavg_1m, gpu, plus ``extra``."""
    info = machine_info("cpu")
    keep = {k: info[k] for k in ("cpu", "simd", "cores", "torch_threads", "torch", "fastpt", "loadavg_1m")}
    keep["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {**keep, **extra}
