"""Peak FLOP/s looked up by device name and precision (derived for the CPU); MFU n/a where no peak is known."""
import pytest
import torch

from fastpt.train import mfu


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA GH200 480GB", "tf32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L40", "fp32", 90.5),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-SXM2-16GB", "tf32", 15.7),  # no TF32 on Volta: the fp32 peak
    ("Tesla T4", "fp16", 65.0),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("AMD Instinct MI300X", "bf16", 1307.4),
])
def test_lookup(name, precision, tflops):
    assert mfu.lookup_peak(name, precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, precision", [("NVIDIA A10G", "bf16"), ("Tesla V100-SXM2-16GB", "bf16"),
                                             ("Some Future GPU", "bf16"), ("cpu", "fp32")])
def test_unknown_is_none(name, precision):
    assert mfu.lookup_peak(name, precision) is None


def test_cpu_peak_is_derived_or_na_unless_given(monkeypatch):
    monkeypatch.delenv("FASTPT_PEAK_TFLOPS", raising=False)
    peak, desc = mfu.peak_flops("cpu", "fp32")
    assert (peak is None and "MFU" in desc) or (peak > 0 and "TFLOP/s" in desc)  # cores x FLOP/cycle x clock
    assert mfu.mfu(1e6, 1e3, None) is None and mfu.format_mfu(None) == "n/a"
    peak, desc = mfu.peak_flops("cpu", "fp32", peak_tflops=2.0)
    assert peak == 2e12 and "given" in desc
    monkeypatch.setenv("FASTPT_PEAK_TFLOPS", "0.5")
    assert mfu.peak_flops("cpu", "bf16")[0] == 0.5e12


def test_cpu_fp16_peak_is_the_tables(monkeypatch):
    """An fp16 run on a CPU was measured against the FP32 peak (2x too small with AVX512_FP16: MFU 2x over)."""
    from fastpt.bench import peaks

    monkeypatch.delenv("FASTPT_PEAK_TFLOPS", raising=False)
    asked = []
    real = peaks.peak
    monkeypatch.setattr(peaks, "peak", lambda name, dtype, **kw: asked.append(dtype) or real(name, dtype, **kw))
    mfu.peak_flops("cpu", "fp16")
    mfu.peak_flops("cpu", "bf16")
    assert asked == ["fp16", "bf16"]


def test_mfu_value_and_precision_mapping():
    assert mfu.mfu(6e9, 1e4, 1e14, world_size=2) == pytest.approx(6e13 / 2e14)
    assert mfu.format_mfu(0.4123) == "41.2%"
    assert mfu.math_precision("bf16") == "bf16"
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert mfu.math_precision("fp32") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert mfu.math_precision("fp32") == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("avx512_bf16, amx, speedup, want", [
    (True, False, 5.0, "bf16"), (False, True, 5.0, "bf16"), (False, False, 5.0, "fp32"),
    (True, False, 0.65, "fp32"),  # the flags, but bf16 GEMMs slower than fp32 (an Intel Xeon VM without AMX)
])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, speedup, want):
    """precision "auto" trains in bf16 on a CPU that multiplies bf16 natively and faster than fp32
    (measured once), in fp32 elsewhere; an explicit precision is kept as given."""
    from fastpt.bench import peaks
    from fastpt.train.recipe import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(peaks, "cpu_bf16_gemm_speedup", lambda threads: speedup)
    assert resolve_precision("auto", torch.device("cpu")) == want
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_cpu_peak_follows_torchs_thread_count(monkeypatch):
    """fastpt pretrain under OMP_NUM_THREADS=1 on a 4-core machine divided by all 4 cores' peak (the affinity's),
    understating MFU 4x: the recipe's CPU peak counts the cores of torch's threads."""
    import os

    from fastpt.bench import peaks

    monkeypatch.delenv("FASTPT_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(peaks, "cpu_fields", lambda: {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17",
                                                      "flags": "fma avx2", "cpu MHz": "3000.0"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, desc = mfu.peak_flops("cpu", "fp32")
        assert one == pytest.approx(32 * 3.0e9) and "1 core (1 torch thread, 4 usable)" in desc
        torch.set_num_threads(4)
        assert mfu.peak_flops("cpu", "fp32")[0] == pytest.approx(4 * one)
    finally:
        torch.set_num_threads(old)


def test_cpu_bf16_gemm_speedup_is_measured_once_per_thread_count():
    from fastpt.bench import peaks

    peaks.cpu_bf16_gemm_speedup.cache_clear()
    first = peaks.cpu_bf16_gemm_speedup(torch.get_num_threads())
    assert first > 0 and peaks.cpu_bf16_gemm_speedup(torch.get_num_threads()) == first  # cached
