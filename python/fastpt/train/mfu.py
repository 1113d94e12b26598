"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak, looked up by device name.

``PEAKS`` lists dense (no 2:4 sparsity) tensor-core peaks per GPU in TFLOP/s from the vendors'
datasheets, per precision: "bf16", "fp16", "tf32" (fp32 matmuls with TF32 allowed) and "fp32".
A device whose name matches no row, or a precision a device has no entry for (bf16 on V100),
gets no peak and MFU is reported as n/a rather than against a made-up number; so does the CPU,
whose peak depends on the core count, clock and vector units in ways a name does not tell.
``peak_tflops`` (recipe ``train.peak_tflops``) or $FASTPT_PEAK_TFLOPS supplies one by hand.

    MFU = flops_per_token * tokens_per_second / (peak_flops * world_size)

with ``flops_per_token`` from ``PretrainModel.flops_per_token`` (6 N + attention, fwd + bwd).
"""
from __future__ import annotations

import os
import re

import torch

# (name pattern, {precision: dense TFLOP/s}); first match wins, so specific names come first.
PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bGH200\b|\bH200\b|\bH100\b|\bH800\b", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b|\bA800\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA40\b", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"\bA30\b", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL40S\b", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bV100S\b", {"fp16": 130.0, "fp32": 16.4}),
    (r"\bV100\b.*\bPCIe\b", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
    (r"RTX 6000 Ada", {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1, "fp32": 91.1}),
    (r"RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bMI300X\b|\bMI325X\b", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
    (r"\bMI250X\b", {"bf16": 383.0, "fp16": 383.0, "fp32": 95.7}),
    (r"\bMI250\b", {"bf16": 362.1, "fp16": 362.1, "fp32": 90.5}),
]


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
    """Dense peak FLOP/s of a device called ``name`` at ``precision`` ("bf16", "fp16", "tf32", "fp32"),
    None when unknown. tf32 falls back to fp32 on devices without TF32 (V100, T4, MI250)."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, name):
            tflops = peaks.get(precision)
            if tflops is None and precision == "tf32":
                tflops = peaks.get("fp32")
            return None if tflops is None else tflops * 1e12
    return None


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
        return None, f"{name}: peak FLOP/s unknown, MFU n/a (set train.peak_tflops to estimate it)"
    peak = lookup_peak(name, math)
    if peak is None:
        return None, f"{name} {math}: not in fastpt.train.mfu.PEAKS, MFU n/a (set train.peak_tflops)"
    return peak, f"{name} {math} dense peak {peak / 1e12:g} TFLOP/s"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int = 1) -> float | None:
    """Fraction of the peak the run achieves (None without a peak)."""
    if not peak or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
