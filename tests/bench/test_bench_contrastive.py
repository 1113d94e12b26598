"""benches/bench_contrastive.py records the FLOPs fastpt.bench.kernels credits a contrastive fwd + bwd."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "bench_contrastive.py"


class FakeBenchmark:
    """pytest-benchmark's fixture, recording instead of timing."""

    def __init__(self):
        self.extra_info, self.group, self.ran = {}, None, None

    def pedantic(self, fn, **kw):
        self.ran = fn


def test_info_nce_flops_are_the_logits_and_their_two_gradients(monkeypatch):
    """6 N N D (2 for the logits q k^T, 2 each for dq and dk), as kernels.bench_contrastive counts them; the
    script recorded 8 N N D."""
    if not SCRIPT.is_file():
        pytest.skip("no benches/ beside the tests")
    pytest.importorskip("pytest_benchmark")
    spec = importlib.util.spec_from_file_location("bench_contrastive_under_test", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "N_CPU", 96)
    fake = FakeBenchmark()
    bench.test_info_nce_cpu(fake, "torch_eager")
    assert fake.extra_info["flops"] == 6 * 96 * 96 * bench.D and fake.extra_info["n"] == 96
