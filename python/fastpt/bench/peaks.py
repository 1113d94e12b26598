"""Peak dense FLOP/s per device and dtype, looked up by the device's name: the denominator of MFU.

GPUs: the vendors' datasheet figures for dense math (sparsity halved away), in TFLOP/s, per
dtype: ``fp32`` (CUDA cores, or matrix cores where fp32 matrix math exists), ``tf32``, ``bf16``,
``fp16``, ``fp8``. Tensor-core figures assume fp32 accumulation. Names are matched by the
patterns in :data:`GPU_PEAKS`, most specific first (``H800 PCIe`` before ``H800``, ``L40S`` before
``L40`` before ``L4``), model numbers anchored (``A100`` and ``A100X`` are A100s, ``RTX A1000`` is not).

CPUs: derived, never a constant: the physical cores the work runs on x FLOPs per cycle per core
(from the vector width and FMA units the CPU's family implies) x clock (the model name's
``@ x.xxGHz``, else cpufreq's maximum, else ``cpu MHz`` in ``/proc/cpuinfo``). The cores are the
process's CPU affinity (SMT siblings counted once), capped at the threads torch computes with
(``torch.get_num_threads()``: one busy thread fills at most one core), so ``fastpt bench --threads 1``
or ``OMP_NUM_THREADS=1`` is measured against one core's peak. Where the microarchitecture is not
known the peak is None and the note says so; a report then prints MFU as ``n/a``.
"""
from __future__ import annotations

import functools
import math
import os
import re
import time
from dataclasses import dataclass

import torch

from .harness import cpu_fields

__all__ = ["Peak", "peak", "peak_flops", "dtype_name", "GPU_PEAKS"]

# (pattern, label, {dtype: dense TFLOP/s}); the first match wins
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"GH200", "GH200", dict(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9)),
    (r"H200.*NVL", "H200 NVL", dict(fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5)),
    (r"H200", "H200 SXM", dict(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9)),
    (r"H100.*NVL", "H100 NVL", dict(fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5)),
    (r"H100.*PCI", "H100 PCIe", dict(fp32=51.2, tf32=378.0, bf16=756.5, fp16=756.5, fp8=1513.0)),
    (r"H800.*PCI", "H800 PCIe", dict(fp32=51.2, tf32=378.0, bf16=756.5, fp16=756.5, fp8=1513.0)),
    (r"H100|H800", "H100 SXM", dict(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9)),
    (r"B200", "B200", dict(fp32=75.0, tf32=1100.0, bf16=2250.0, fp16=2250.0, fp8=4500.0)),
    (r"\bA[18]00(?!\d)", "A100", dict(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0)),
    (r"\bA40\b", "A40", dict(fp32=37.4, tf32=74.8, bf16=149.7, fp16=149.7)),
    (r"\bA30\b", "A30", dict(fp32=10.3, tf32=82.0, bf16=165.0, fp16=165.0)),
    (r"\bA10\b", "A10", dict(fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0)),
    (r"L40S", "L40S", dict(fp32=91.6, tf32=183.0, bf16=362.0, fp16=362.0, fp8=733.0)),
    (r"\bL40\b", "L40", dict(fp32=90.5, tf32=90.5, bf16=181.0, fp16=181.0, fp8=362.0)),
    (r"\bL4\b", "L4", dict(fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0, fp8=242.0)),
    (r"RTX 6000 Ada", "RTX 6000 Ada", dict(fp32=91.1, tf32=182.1, bf16=364.2, fp16=364.2)),
    (r"RTX A6000", "RTX A6000", dict(fp32=38.7, tf32=77.4, bf16=154.8, fp16=154.8)),
    (r"RTX 4090", "GeForce RTX 4090", dict(fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3)),
    (r"RTX 3090", "GeForce RTX 3090", dict(fp32=35.6, tf32=35.6, bf16=71.0, fp16=71.0)),
    (r"V100S", "V100S", dict(fp32=16.4, fp16=130.0)),
    (r"V100.*PCI", "V100 PCIe", dict(fp32=14.0, fp16=112.0)),
    (r"V100", "V100 SXM2", dict(fp32=15.7, fp16=125.0)),
    (r"\bT4\b", "T4", dict(fp32=8.1, fp16=65.0)),
    (r"MI300X|MI325X", "Instinct MI300X", dict(fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9)),
    (r"MI250X", "Instinct MI250X", dict(fp32=95.7, bf16=383.0, fp16=383.0)),
    (r"MI250", "Instinct MI250", dict(fp32=90.5, bf16=362.1, fp16=362.1)),
]

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Peak:
    """A device's peak: ``flops`` in FLOP/s (None when unknown) and how it was found (``note``)."""

    flops: float | None
    note: str

    @property
    def tflops(self) -> float | None:
        return None if self.flops is None else self.flops / 1e12

    def mfu(self, achieved_flops_per_s: float | None) -> float | None:
        """Achieved / peak (a fraction), or None when either is unknown."""
        if self.flops is None or achieved_flops_per_s is None:
            return None
        return achieved_flops_per_s / self.flops


def dtype_name(dtype: torch.dtype | str, device: str = "cpu") -> str:
    """The peak table's name for a dtype: torch dtypes map to fp32/bf16/fp16/fp64; float32 matrix
    math on CUDA counts as ``tf32`` when torch allows TF32 (``torch.get_float32_matmul_precision()``
    is "high" or "medium"; read through that API, as torch refuses the legacy ``allow_tf32`` flag
    once the new precision API has been used)."""
    name = _DTYPES.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else str(dtype)
    if name == "fp32" and torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return name


def gpu_peak(name: str, dtype: str) -> Peak:
    """The table's peak for a GPU called ``name`` at the table dtype ``dtype`` ("fp32", "tf32", "bf16" ...)."""
    for pattern, label, table in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if dtype not in table:
                return Peak(None, f"{label}: no {dtype} peak in fastpt.bench.peaks.GPU_PEAKS (has "
                                  f"{', '.join(table)}); MFU n/a")
            return Peak(table[dtype] * 1e12, f"{label} datasheet, dense {dtype}: {table[dtype]:g} TFLOP/s")
    return Peak(None, f"no peak known for {name!r}: MFU n/a (add its datasheet figures to "
                      f"fastpt.bench.peaks.GPU_PEAKS)")


def _cpu_flops_per_cycle(fields: dict) -> tuple[int | None, str]:
    """FP32 FLOPs per cycle per core and why (vector lanes x 2 for FMA x FMA units)."""
    flags = set(fields.get("flags", "").split())
    vendor = fields.get("vendor_id", "")
    family = int(fields.get("cpu family", "0") or 0)
    model = int(fields.get("model", "0") or 0)
    if "fma" not in flags and "asimd" not in flags:
        return None, "no FMA in the CPU flags"
    if vendor == "AuthenticAMD":
        if family >= 26 and "avx512f" in flags:
            return 64, "AMD Zen 5: 2 x 512-bit FMA"
        if family == 25 or (family == 23 and model >= 0x30):
            return 32, "AMD Zen 2/3/4: 2 x 256-bit FMA (Zen 4 runs AVX-512 on 256-bit units)"
        if family == 23:
            return 16, "AMD Zen 1: 2 x 128-bit FMA"
        return None, f"AMD family {family}: FMA width not in fastpt.bench.peaks"
    if vendor == "GenuineIntel":
        if "avx512f" in flags:
            return 64, "Intel AVX-512: 2 x 512-bit FMA assumed (1 on some Xeon Silver/Bronze and client parts)"
        if "avx2" in flags:
            return 32, "Intel AVX2: 2 x 256-bit FMA"
        return None, "Intel without AVX2: FMA width not in fastpt.bench.peaks"
    return None, f"vendor {vendor or 'unknown'}: FMA width not in fastpt.bench.peaks"


def _cpu_clock_ghz(fields: dict) -> tuple[float | None, str]:
    m = re.search(r"@\s*([\d.]+)\s*GHz", fields.get("model name", ""))
    if m:
        return float(m.group(1)), "the model name's clock"
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "cpufreq's maximum clock"
    except (OSError, ValueError):
        pass
    if fields.get("cpu MHz"):
        return float(fields["cpu MHz"]) / 1e3, "/proc/cpuinfo cpu MHz, nominal: boost clocks run higher"
    return None, "no clock found"


def _cpu_peak(dtype: str, fields: dict, cores: int | None, threads: int) -> Peak:
    """The peak of ``threads`` compute threads on ``cores`` logical CPUs (each thread on its own physical
    core while there are enough; SMT siblings share one core's FMA units)."""
    per_cycle, why = _cpu_flops_per_cycle(fields)
    ghz, clock_src = _cpu_clock_ghz(fields)
    if per_cycle is None or ghz is None or not cores:
        reason = why if per_cycle is None else clock_src if ghz is None else "core count unknown"
        return Peak(None, f"CPU peak unknown ({reason}): MFU n/a")
    flags = set(fields.get("flags", "").split())
    scale, kind = {"fp32": (1.0, "FP32"), "fp64": (0.5, "FP64")}.get(dtype, (None, dtype))
    if dtype == "bf16":
        scale, kind = (1024 / per_cycle, "BF16 (AMX)") if "amx_bf16" in flags else (
            (2.0, "BF16 (AVX512_BF16 dot products)") if "avx512_bf16" in flags else (1.0, "BF16 at the FP32 rate"))
    elif dtype == "fp16":
        scale, kind = (1024 / per_cycle, "FP16 (AMX)") if "amx_fp16" in flags else (
            (2.0, "FP16 (AVX512_FP16)") if "avx512_fp16" in flags else (1.0, "FP16 at the FP32 rate"))
    if scale is None:
        return Peak(None, f"no CPU peak for dtype {dtype}: MFU n/a")
    # SMT siblings share one core's FMA units
    siblings, phys = int(fields.get("siblings", "0") or 0), int(fields.get("cpu cores", "0") or 0)
    per_core = max(1, siblings // phys) if siblings and phys else 1
    usable = math.ceil(cores / per_core)
    physical = max(1, min(usable, threads))
    flops = physical * per_cycle * scale * ghz * 1e9
    return Peak(flops, f"{physical} core{'s' * (physical != 1)} ({threads} torch thread{'s' * (threads != 1)}, "
                       f"{usable} usable) x {per_cycle * scale:g} "
                       f"{kind} FLOP/cycle ({why}) x {ghz:.2f} GHz ({clock_src}) = {flops / 1e12:.3f} TFLOP/s")


# a CPU's bf16 GEMMs must beat fp32's by this factor for precision "auto" to pick bf16 there
CPU_BF16_MIN_SPEEDUP = 1.25


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 at a higher rate than float32: a CUDA GPU with bf16
    tensor cores (Ampere or later), or a CPU with AVX512_BF16 dot products or AMX tiles whose bf16
    GEMMs torch runs faster than its fp32 ones, by ``CPU_BF16_MIN_SPEEDUP``
    (``cpu_bf16_gemm_speedup``, measured once). The flags alone do not say it: on a 2-core AMD EPYC
    Zen 5 (torch 2.13) a 4096 x 256 x 1024 product ran at 957 GFLOP/s in bf16 against 185 in fp32,
    on a 2-core Intel Xeon VM with AVX512_BF16 and no AMX at 165 against 253 (bf16 autocast made
    its training steps 1.3x slower). Decides ``precision: auto``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(bool(check()) for check in checks if check is not None):
        return False
    return cpu_bf16_gemm_speedup(torch.get_num_threads()) >= CPU_BF16_MIN_SPEEDUP


@functools.lru_cache(maxsize=None)
def cpu_bf16_gemm_speedup(threads: int) -> float:
    """fp32 time / bf16 time of a 1024 x 256 x 1024 GEMM with torch's CPU kernels at ``threads``
    threads (the best of 5 after 2 warm-up calls each; ~40 ms once per thread count)."""
    del threads  # the cache key: torch's kernels use torch.get_num_threads() threads
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 256, generator=gen), torch.randn(256, 1024, generator=gen)

    def best(x, y) -> float:
        for _ in range(2):
            x @ y
        times = []
        for _ in range(5):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def peak(device_name: str | None, dtype: torch.dtype | str, *, device: str = "cuda", cores: int | None = None,
         threads: int | None = None, cpuinfo: dict | None = None) -> Peak:
    """The peak dense FLOP/s of ``device_name`` in ``dtype``, with a note on where it came from.

    Args:
        device_name: a GPU's name (``torch.cuda.get_device_name()``); ignored for the CPU.
        dtype: a torch dtype or "fp32", "tf32", "bf16", "fp16", "fp8", "fp64".
        device: "cuda" (look the name up in :data:`GPU_PEAKS`) or "cpu" (derive it).
        cores: logical CPUs the work may use (default: this process's CPU affinity).
        threads: threads the work computes with (default: ``torch.get_num_threads()``); the peak counts
            min(physical cores among ``cores``, ``threads``) cores, and its note says how many threads.
        cpuinfo: ``/proc/cpuinfo`` fields to use instead of this machine's (for tests).

    Returns a :class:`Peak`; ``Peak.flops`` is None for an unknown device or dtype (never a guess).
    """
    dev = torch.device(device).type
    name = dtype_name(dtype, dev)
    if dev == "cuda":
        return gpu_peak(device_name or "", name)
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count()
    if threads is None:
        threads = torch.get_num_threads()
    return _cpu_peak(name, cpu_fields() if cpuinfo is None else cpuinfo, cores, threads)


def peak_flops(device_name: str | None, dtype: torch.dtype | str, *, device: str = "cuda") -> float | None:
    """:func:`peak`'s FLOP/s alone (None when unknown)."""
    return peak(device_name, dtype, device=device).flops
