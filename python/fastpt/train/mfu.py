"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peaks are ``fastpt.bench.peaks``' (one table for the recipe and the bench suite): dense
datasheet figures per GPU name and precision ("bf16", "fp16", "tf32" for fp32 matmuls with TF32
allowed, "fp32"), and for the CPU a peak derived from the cores torch computes on (the affinity's
physical cores, capped at ``torch.get_num_threads()``), their vector units and clock. A device
or precision with no known peak (bf16 on V100, an unknown GPU or CPU) gets MFU n/a rather than a
made-up number. ``peak_tflops`` (recipe ``train.peak_tflops``) or $FASTPT_PEAK_TFLOPS supplies
one by hand.

    MFU = flops_per_token * tokens_per_second / (peak_flops * world_size)

with ``flops_per_token`` from ``PretrainModel.flops_per_token`` (6 N + attention, fwd + bwd).
"""
from __future__ import annotations

import os

import torch

from ..bench import peaks as _peaks

def device_name(device: torch.device | str) -> str:
    """Marketing name of ``device`` (``torch.cuda.get_device_name``), or "cpu"."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def math_precision(precision: str) -> str:
    """The matmul precision of a run: "bf16" / "fp16" under autocast; fp32 is "tf32" when
    ``torch.get_float32_matmul_precision()`` allows TF32 ("high" / "medium"), else "fp32"."""
    if precision in ("bf16", "fp16"):
        return precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def lookup_peak(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU called ``name`` at ``precision`` ("bf16", "fp16", "tf32", "fp32"),
    None when unknown. tf32 falls back to fp32 on devices without TF32 (V100, T4, MI250)."""
    # the table by name and the precision as given: math_precision already resolved TF32
    flops = _peaks.gpu_peak(name, precision).flops
    if flops is None and precision == "tf32":
        flops = _peaks.gpu_peak(name, "fp32").flops
    return flops


def peak_flops(device: torch.device | str, precision: str, *,
               peak_tflops: float | None = None) -> tuple[float | None, str]:
    """``(peak FLOP/s or None, description)`` for one device running at ``precision`` (a recipe's
    "fp32" / "bf16" / "fp16"). ``peak_tflops`` or $FASTPT_PEAK_TFLOPS overrides the table."""
    name, math = device_name(device), math_precision(precision)
    override = peak_tflops if peak_tflops is not None else os.environ.get("FASTPT_PEAK_TFLOPS")
    if override not in (None, ""):
        value = float(override)
        return value * 1e12, f"{name} {math}: {value:g} TFLOP/s (given)"
    if torch.device(device).type != "cuda":
        # the cores of torch's threads (OMP_NUM_THREADS / torch.set_num_threads), not all the affinity's
        found = _peaks.peak(None, math if math in ("bf16", "fp16") else "fp32", device="cpu",
                            threads=torch.get_num_threads())
        if found.flops is None:
            return None, f"{name}: {found.note} (set train.peak_tflops to estimate MFU)"
        return found.flops, f"{name}: {found.note}"
    peak = lookup_peak(name, math)
    if peak is None:
        return None, f"{name} {math}: not in fastpt.bench.peaks.GPU_PEAKS, MFU n/a (set train.peak_tflops)"
    return peak, f"{name} {math} dense peak {peak / 1e12:g} TFLOP/s"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int = 1) -> float | None:
    """Fraction of the peak the run achieves (None without a peak)."""
    if not peak or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
