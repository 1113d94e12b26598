"""fastpt.bench: the harness, the peak table, result rows and their files. Fast: no real benchmarking."""
from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from fastpt.bench import bench_main, e2e, harness, peaks, report
from fastpt.bench.kernels import Context, measure

# ----------------------------------------------------------------------------- timing


def test_time_fn_measures_a_known_sleep_with_warmup_and_setup():
    calls, setups = [], []
    timing = harness.time_fn(lambda: (calls.append(1), time.sleep(0.02)), warmup=2, repeats=3,
                             setup=lambda: setups.append(1))
    assert len(calls) == 5 and len(setups) == 5  # warm-up and timed calls, setup before each
    assert timing.repeats == 3
    assert 0.019 <= timing.min <= timing.median < 0.2


def test_time_fn_measures_compute_and_stops_at_its_budget():
    # sleeps, not compute: a sleep is a lower bound on its measured time whatever the load, so the
    # check cannot flake on a busy machine
    fast = harness.time_fn(lambda: time.sleep(0.001), repeats=3)
    slow = harness.time_fn(lambda: time.sleep(0.05), repeats=3)
    assert 0.001 <= fast.min and 0.05 <= slow.min and fast.median < slow.median
    capped = harness.time_fn(lambda: time.sleep(0.03), warmup=0, repeats=50, budget_s=0.05)
    assert capped.repeats == 3  # at least 3, then the budget stops it


def test_timing_median_and_min_and_bad_repeats():
    t = harness.Timing([3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5 and t.min == 1.0 and t.repeats == 4
    with pytest.raises(ValueError, match="repeats"):
        harness.time_fn(lambda: None, repeats=0)


class _FakeEvent:
    """torch.cuda.Event on the host clock: lets the CUDA timing path run on a CPU-only machine."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda_clock(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)


def test_calls_per_sample():
    assert harness.calls_per_sample(1e-3) == 5  # 5 ms of work per sample
    assert harness.calls_per_sample(2e-3) == 3
    assert harness.calls_per_sample(5e-3) == 1 and harness.calls_per_sample(0.2) == 1
    assert harness.calls_per_sample(1e-6) == harness.MAX_BATCH and harness.calls_per_sample(0.0) == harness.MAX_BATCH


def test_time_fn_batches_cuda_samples_only(fake_cuda_clock):
    calls = []
    t = harness.time_fn(lambda: (calls.append(1), time.sleep(0.002)), device="cuda", warmup=1, repeats=2, batch=4)
    assert len(calls) == 1 + 2 * 4 and t.repeats == 2  # a sample is 4 calls, reported per call
    assert 0.002 <= t.min < 0.02
    calls.clear()
    harness.time_fn(lambda: calls.append(1), device="cuda", warmup=0, repeats=2, batch=4, setup=lambda: None)
    assert len(calls) == 2  # with a setup between calls, one call per sample
    calls.clear()
    harness.time_fn(lambda: calls.append(1), device="cpu", warmup=0, repeats=2, batch=4)
    assert len(calls) == 2  # the CPU times single calls
    with pytest.raises(ValueError, match="batch"):
        harness.time_fn(lambda: None, device="cuda", batch=0)


def test_measure_on_cuda_queues_fast_providers_back_to_back(fake_cuda_clock):
    """A provider faster than SAMPLE_S is re-timed in batches (its single first call from an idle
    GPU is dropped), and its row says how many calls a sample holds; a slow one stays single."""
    calls = {"fast": 0, "slow": 0}

    def work(name, seconds):
        calls[name] += 1
        time.sleep(seconds)

    rows = measure(Context(device="cuda", quick=True, log=lambda s: None, machine={"device_name": "t"}), op="toy",
                   case="c", mode="fwd", shape=(1,), dtype=torch.float32, baseline="slow", memory=False, warmup=1,
                   repeats=3, providers={"slow": lambda: work("slow", 0.006), "fast": lambda: work("fast", 0.001)})
    by = {r["provider"]: r for r in rows}
    n = harness.calls_per_sample(0.001)
    assert by["fast"]["repeats"] == 3 and "back-to-back calls per timed sample" in by["fast"]["note"]
    assert calls["fast"] >= 1 + 1 + 3 * 2  # warm-up, the dropped single call, then batches of >= 2
    assert calls["slow"] == 1 + 3 and "back-to-back" not in by["slow"]["note"]
    assert 0.001 <= by["fast"]["time_ms"] / 1e3 < 0.006 and n >= 2


def test_peak_memory_on_the_cpu_sees_a_tensor_it_allocates():
    if harness.cpu_memory_note() is not None:
        pytest.skip(harness.cpu_memory_note())

    def alloc():
        t = torch.ones(16 << 20)  # 64 MiB, touched
        return float(t[-1])

    got = harness.peak_memory(alloc)
    assert 48 << 20 <= got <= 96 << 20
    assert harness.peak_memory(lambda: None) < 16 << 20


def test_machine_info_names_the_device_and_versions():
    info = harness.machine_info("cpu")
    for key in ("device", "device_name", "cores", "torch_threads", "python", "torch", "fastpt", "commit", "date"):
        assert key in info
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert info["commit"] is None or isinstance(info["commit"], str)
    assert {"cpu", "simd", "cores", "gpu", "extra"} <= set(harness.machine(extra=1))


def test_git_commit_can_be_overridden(monkeypatch):
    harness.git_commit.cache_clear()
    monkeypatch.setenv("FASTPT_COMMIT", "abc1234")
    try:
        assert harness.git_commit() == "abc1234"
    finally:
        harness.git_commit.cache_clear()


# ----------------------------------------------------------------------------- peaks


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
    ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A10", torch.float16, 125.0),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("NVIDIA L40S", torch.bfloat16, 362.0),
    ("NVIDIA L40", "fp32", 90.5),
    ("NVIDIA H200", torch.float32, 67.0),
])
def test_gpu_peaks_are_looked_up_by_name_and_dtype(name, dtype, tflops):
    p = peaks.peak(name, dtype, device="cuda")
    assert p.tflops == pytest.approx(tflops)
    assert "datasheet" in p.note
    assert p.mfu(p.flops / 2) == pytest.approx(0.5)


def test_unknown_device_or_dtype_has_no_peak_and_says_so():
    p = peaks.peak("Some Future Accelerator", torch.bfloat16, device="cuda")
    assert p.flops is None and p.mfu(1e12) is None
    assert "no peak known for 'Some Future Accelerator'" in p.note and "MFU n/a" in p.note
    assert peaks.peak_flops("NVIDIA A10G", "bf16") is None  # not an A10
    t4 = peaks.peak("Tesla T4", torch.bfloat16, device="cuda")
    assert t4.flops is None and "no bf16 peak" in t4.note


def test_fp32_matmul_counts_as_tf32_when_torch_allows_it():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert peaks.dtype_name(torch.float32, "cuda") == "tf32"
        assert peaks.dtype_name(torch.float32, "cpu") == "fp32"
        torch.set_float32_matmul_precision("highest")
        assert peaks.dtype_name(torch.float32, "cuda") == "fp32"
    finally:
        torch.set_float32_matmul_precision(old)


INTEL = {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143", "flags": "fma avx2 avx512f",
         "model name": "Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz", "siblings": "8", "cpu cores": "4"}


def test_cpu_peak_is_derived_from_cores_width_and_clock():
    # 8 logical CPUs = 4 cores x 2 (SMT); 8 torch threads still fill only the 4 cores
    p = peaks.peak(None, torch.float32, device="cpu", cores=8, threads=8, cpuinfo=INTEL)
    assert p.flops == pytest.approx(4 * 64 * 2.0e9)
    assert "4 cores (8 torch threads, 4 usable) x 64" in p.note and "2.00 GHz" in p.note
    amd = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17", "flags": "fma avx2 avx512f",
           "cpu MHz": "3000.0"}
    assert peaks.peak(None, "fp32", device="cpu", cores=2, threads=2, cpuinfo=amd).flops == pytest.approx(
        2 * 32 * 3.0e9)
    assert peaks.peak(None, "bf16", device="cpu", cores=8, threads=8, cpuinfo={**INTEL, "flags": "fma avx512f amx_bf16"}
                      ).flops == pytest.approx(4 * 1024 * 2.0e9)


def test_cpu_peak_unknown_is_none_with_a_note():
    p = peaks.peak(None, torch.float32, device="cpu", cores=2, cpuinfo={"vendor_id": "Mystery", "flags": "fma"})
    assert p.flops is None and "MFU n/a" in p.note and "Mystery" in p.note
    assert peaks.peak(None, "fp32", device="cpu", cores=2, cpuinfo={**INTEL, "model name": "x"}).flops is None


# ----------------------------------------------------------------------------- rows and files


def _rows():
    peak = peaks.Peak(1e12, "test peak")
    base = report.make_row(op="attention", case="none S8", mode="fwd", shape=(1, 8), dtype="fp32",
                           provider="torch-sdpa", baseline="torch-sdpa", timing=harness.Timing([0.004, 0.005]),
                           mem_bytes=4 << 20, flops=4e9, units=1000, unit="tokens", peak=peak)
    ours = report.make_row(op="attention", case="none S8", mode="fwd", shape=(1, 8), dtype="fp32", provider="fastpt",
                           baseline="torch-sdpa", timing=harness.Timing([0.002, 0.002, 0.003]), mem_bytes=1 << 20,
                           flops=4e9, units=1000, unit="tokens", peak=peak)
    skipped = report.make_row(op="attention", case="none S8", mode="fwd", shape=(1, 8), dtype="fp32", provider="flex",
                              baseline="torch-sdpa", status="skipped: needs CUDA")
    return report.add_ratios([base, ours, skipped])


def test_make_row_and_ratios():
    base, ours, skipped = _rows()
    assert set(base) == set(report.COLUMNS)
    assert ours["time_ms"] == pytest.approx(2.0) and ours["min_ms"] == pytest.approx(2.0) and ours["repeats"] == 3
    assert ours["tflops"] == pytest.approx(2.0) and ours["mfu"] == pytest.approx(2.0)
    assert ours["rate"] == pytest.approx(5e5) and ours["rate_unit"] == "tokens/s"
    assert base["ratio"] == pytest.approx(1.0) and ours["ratio"] == pytest.approx(2.25)
    assert ours["mem_mb"] == pytest.approx(1.0) and ours["mem_ratio"] == pytest.approx(0.25)
    assert skipped["ratio"] is None and skipped["time_ms"] is None


def test_csv_and_json_append(tmp_path):
    rows = _rows()
    for _ in range(2):
        report.append_csv(tmp_path / "r.csv", rows)
        report.append_json(tmp_path / "r.json", rows)
    with open(tmp_path / "r.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 6 and got[1]["provider"] == "fastpt" and float(got[1]["ratio"]) == pytest.approx(2.25)
    assert json.loads((tmp_path / "r.json").read_text())[4]["provider"] == "fastpt"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        report.append_json(tmp_path / "bad.json", rows)


def test_csv_with_other_columns_is_rewritten_with_their_union(tmp_path):
    (tmp_path / "r.csv").write_text("provider,old_column\nx,1\n")
    report.append_csv(tmp_path / "r.csv", _rows())
    with open(tmp_path / "r.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and got[0]["old_column"] == "1" and got[2]["provider"] == "fastpt"


def test_markdown_table_names_baseline_and_speedups():
    md = report.markdown(_rows(), machine={"device": "cpu", "device_name": "Test CPU", "commit": "abc"},
                         peaks={"fp32": "test peak"})
    assert "# fastpt bench: cpu (Test CPU)" in md and "commit abc" in md and "peak for MFU, fp32: test peak" in md
    assert "| case | mode | dtype | provider | median ms |" in md
    assert "| none S8 | fwd | fp32 | torch-sdpa | 4.500 |" in md and "1.00x (baseline) | 2.25x |" in md
    assert "| fastpt | 2.000 | 2.000 | 2.000 | 200.0% | 500.0 k tokens/s | 1.0 | 2.25x |" in md
    assert "skipped: needs CUDA" in md
    assert report.fmt_rate(1.5e9, " tokens/s") == "1.5 G tokens/s" and report.fmt_rate(12, " x/s") == "12 x/s"


def test_write_results_writes_csv_json_markdown(tmp_path):
    paths = report.write_results(_rows(), tmp_path / "out", "bench-test")
    names = {p.name for p in paths}
    assert {"bench-test.csv", "bench-test.json", "bench-test.md"} <= names
    if "bench-test.png" in names:  # matplotlib installed
        assert (tmp_path / "out" / "bench-test.png").read_bytes()[:4] == b"\x89PNG"
        assert "![" in (tmp_path / "out" / "bench-test.md").read_text()


def test_measure_records_ok_skipped_and_failed_providers():
    def boom():
        raise RuntimeError("backend exploded\nmore")

    x = torch.randn(64, 64)
    rows = measure(Context(device="cpu", quick=True, log=lambda s: None, machine={"device_name": "t"}), op="toy",
                   case="mm", mode="fwd", shape=(64, 64), dtype=torch.float32, baseline="torch",
                   providers={"torch": lambda: x @ x, "fastpt": lambda: x @ x, "broken": boom, "absent": "not here"},
                   flops=2 * 64**3, memory=False)
    status = {r["provider"]: r["status"] for r in report.add_ratios(rows)}
    assert status == {"torch": "ok", "fastpt": "ok", "broken": "error: RuntimeError: backend exploded",
                      "absent": "skipped: not here"}
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[1]["ratio"] > 0


def test_bench_main_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["--ops", "nonsense"])
    assert exc.value.code == 2 and "nonsense" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_main(["--device", "cuda"]) == 2


def test_e2e_flops_per_token_and_config():
    cfg = e2e.backbone_config("bert-medium", dropout=0.0)  # not in the zoo: BERT's published sizes
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["attention_dropout"]) == (8, 512, 0.0)
    base = dict(num_layers=12, hidden_size=768, intermediate_size=3072, vocab_size=30522)
    expected = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 12 * 768 * 128 + 0.15 * 6 * (768**2 + 768 * 30522)
    assert e2e.mlm_flops_per_token(base, 128) == pytest.approx(expected)


def test_dropout_bench_times_fastpt_against_torch_on_the_cpu():
    from fastpt.bench.kernels import Context, bench_dropout

    rows = bench_dropout(Context(device="cpu", quick=True, log=lambda s: None, machine={"device_name": "t"}))
    assert {(r["provider"], r["status"]) for r in rows} == {("torch", "ok"), ("fastpt", "ok")}
    assert {(r["dtype"], r["mode"]) for r in rows} == {(d, m) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")}
    assert all(r["baseline"] == "torch" and r["time_ms"] > 0 for r in rows)


def test_contrastive_million_case_runs_fastpt_alone(monkeypatch):
    """The CUDA-only N = 1M InfoNCE row, at a CPU size: fastpt timed with its memory, eager skipped
    with the memory it would need."""
    from fastpt.bench import kernels

    monkeypatch.setattr(kernels, "MILLION", (96, 16))
    rows = kernels._contrastive_million(Context(device="cpu", quick=True, log=lambda s: None,
                                                machine={"device_name": "t"}))
    by = {r["provider"]: r for r in rows}
    assert by["fastpt"]["status"] == "ok" and by["fastpt"]["time_ms"] > 0 and by["fastpt"]["case"] == "info_nce N96 D16"
    assert by["torch-eager"]["status"].startswith("skipped: its 96 x 96 scores")
    assert kernels.bench_contrastive_million(Context(device="cpu", quick=False, log=lambda s: None,
                                                     machine={"device_name": "t"})) == []  # CUDA only
    assert kernels.SUITES["contrastive_1m"] is kernels.bench_contrastive_million


def test_attention_case_with_dropout_runs_every_cpu_provider():
    """A dropout case drops for every contender (fastpt's counter-based mask, torch's SDPA and the
    eager softmax with F.dropout); the CPU grid runs with every provider ok."""
    import torch.nn.functional as F

    from fastpt.bench.kernels import AttentionCase, attention_providers, bench_attention

    plain = AttentionCase("none", 33, 2, 2, 16, "cpu", torch.float32)
    case = AttentionCase("none", 33, 2, 2, 16, "cpu", torch.float32, dropout=0.25)
    assert case.name == "none S33 D16 p0.25" and plain.name == "none S33 D16"
    q, k, v = plain.qkv
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    providers = attention_providers(case)
    assert set(providers) == {"fastpt", "torch-sdpa", "torch-eager"}
    torch.manual_seed(0)
    for name, fn in providers.items():
        got = fn(q, k, v)
        assert got.shape == want.shape
        assert not torch.allclose(got, want, atol=1e-3), name  # dropped something
    torch.testing.assert_close(attention_providers(plain)["fastpt"](q, k, v), want, rtol=1e-5, atol=1e-5)
    rows = bench_attention(Context(device="cpu", quick=True, log=lambda s: None, machine={"device_name": "t"}))
    assert {r["case"] for r in rows} == {f"{kind} S256 D64" for kind in ("none", "causal", "packed", "prefix")}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]


def test_tuning_choices_are_written_when_there_are_some(monkeypatch, tmp_path):
    """``fastpt bench`` records which Triton candidates won on the GPU (``<stem>-tuning.json``); nothing
    is written where nothing was tuned (every CPU run)."""
    import json

    import fastpt.bench as bench

    monkeypatch.setattr(bench, "tuning_choices", lambda: [])
    assert bench.write_tuning(tmp_path, "bench-cuda") is None and not list(tmp_path.iterdir())
    pick = dict(op="attention", kernel="dkdv", block_d=64, fp32=False, key=["64", "False", "True", "512"],
                config=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2), candidates=4)
    monkeypatch.setattr(bench, "tuning_choices", lambda: [pick])
    path = bench.write_tuning(tmp_path, "bench-cuda")
    assert path == tmp_path / "bench-cuda-tuning.json" and json.loads(path.read_text()) == [pick]


def test_the_pytest_benchmark_entry_points_collect():
    """`python -m pytest benches --benchmark-only` (the README's CPU benchmark command) ran nothing when one bench
    module failed to import (bench_dropout read a helper that had moved to another module)."""
    import subprocess
    import sys
    from pathlib import Path

    benches = Path(__file__).resolve().parents[2] / "benches"
    if not benches.is_dir():
        pytest.skip("no benches/ beside the tests")
    pytest.importorskip("pytest_benchmark")
    done = subprocess.run([sys.executable, "-m", "pytest", str(benches), "--collect-only", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, cwd=benches.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
