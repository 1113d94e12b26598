"""fastpt.bench.peaks: the CPU peak counts the cores torch's threads compute on; GPU names match their own row."""
import os

import pytest
import torch

from fastpt.bench import peaks

AMD = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17", "flags": "fma avx2 avx512f", "cpu MHz": "3000.0"}
INTEL_SMT = {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143", "flags": "fma avx2 avx512f",
             "model name": "Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz", "siblings": "8", "cpu cores": "4"}


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.parametrize("n", [1, 3])
def test_cpu_peak_counts_the_cores_of_torchs_threads(threads, n):
    """`fastpt bench --threads 1` (or OMP_NUM_THREADS=1) on 4 usable cores was measured against all 4 cores'
    peak: MFU understated 4x (2x on the 2-core machine the benches ran on)."""
    threads(n)
    p = peaks.peak(None, "fp32", device="cpu", cores=4, cpuinfo=AMD)
    assert p.flops == pytest.approx(n * 32 * 3.0e9)
    assert p.note.startswith(f"{n} core{'s' * (n > 1)} ({n} torch thread{'s' * (n > 1)}, 4 usable) x 32")


def test_cpu_peak_caps_threads_at_the_physical_cores():
    """More threads than physical cores (SMT siblings, oversubscription) add no FMA units."""
    assert peaks.peak(None, "fp32", device="cpu", cores=8, threads=16, cpuinfo=INTEL_SMT).flops == pytest.approx(
        4 * 64 * 2.0e9)
    assert peaks.peak(None, "fp32", device="cpu", cores=8, threads=2, cpuinfo=INTEL_SMT).flops == pytest.approx(
        2 * 64 * 2.0e9)


def test_cpu_peak_defaults_to_the_affinity_and_torchs_threads(threads, monkeypatch):
    monkeypatch.setattr(peaks, "cpu_fields", lambda: AMD)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    threads(2)
    assert peaks.peak(None, torch.float32, device="cpu").flops == pytest.approx(2 * 32 * 3.0e9)
    threads(8)
    assert peaks.peak(None, torch.float32, device="cpu").flops == pytest.approx(4 * 32 * 3.0e9)


@pytest.mark.parametrize("name, label, bf16", [
    ("NVIDIA H800 PCIe", "H800 PCIe", 756.5),  # was the SXM row's 989.4
    ("NVIDIA H800", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA A800-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A800 80GB PCIe", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA A100X", "A100", 312.0),  # a suffix letter is still an A100 (converged card, vGPU profiles)
    ("NVIDIA A100D-80C", "A100", 312.0),
])
def test_gpu_names_find_their_row(name, label, bf16):
    p = peaks.gpu_peak(name, "bf16")
    assert p.note.startswith(f"{label} datasheet") and p.tflops == pytest.approx(bf16)


@pytest.mark.parametrize("name", ["NVIDIA RTX A1000", "NVIDIA RTX A1000 Laptop GPU", "NVIDIA RTX A1000 6GB"])
def test_rtx_a1000_is_not_an_a100(name):
    """r"A100" matched "RTX A1000" (a 2,304-core workstation card) and gave it the A100's 312 TFLOP/s."""
    p = peaks.gpu_peak(name, "bf16")
    assert p.flops is None and "no peak known" in p.note
