"""fastpt._cpu_malloc: glibc malloc that keeps freed blocks, measured by the page faults it saves."""
import os
import subprocess
import sys

import pytest

from fastpt import _cpu_malloc

pytestmark = pytest.mark.skipif(_cpu_malloc.unavailable() is not None or not os.path.exists("/proc/self/stat"),
                                reason="needs glibc and /proc")

# A child process, so that this test's malloc settings cannot leak into other tests: it prints the
# minor page faults of touching a fresh 64 MiB tensor, freed and allocated again, eight times, after
# sixteen such rounds to let glibc settle (how soon it reuses a freed block depends on the small
# allocations that land between them: 1 to 7 rounds were seen).
CHILD = r"""
import sys, torch
from fastpt import _cpu_malloc

def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # minflt

if sys.argv[1] == "tuned":
    assert _cpu_malloc.tune() is None and _cpu_malloc.is_tuned()
for _ in range(16):
    torch.ones(16 << 20)
before = faults()
for _ in range(8):
    torch.ones(16 << 20)  # 64 MiB, freed at once
print(faults() - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != _cpu_malloc.ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_tuned_malloc_reuses_freed_blocks_without_page_faults():
    plain, tuned = _faults("plain"), _faults("tuned")
    pages = 8 * (64 << 20) // 4096
    assert plain > 0.8 * pages, plain  # glibc as it comes: every fresh 64 MiB block faults its pages in
    assert tuned < 0.25 * pages, (tuned, plain)  # kept: the same heap memory again


def test_tune_restore_and_the_context_manager(monkeypatch):
    assert not _cpu_malloc.is_tuned()
    try:
        with _cpu_malloc.tuned():
            assert _cpu_malloc.is_tuned() and "keeps freed memory" in _cpu_malloc.describe()
            with _cpu_malloc.tuned(False):
                assert not _cpu_malloc.is_tuned() and "as it comes" in _cpu_malloc.describe()
            assert _cpu_malloc.is_tuned()
        assert not _cpu_malloc.is_tuned()
        monkeypatch.setenv(_cpu_malloc.ENV, "default")
        assert _cpu_malloc.refusal() == f"{_cpu_malloc.ENV}=default"
        assert _cpu_malloc.tune() == f"{_cpu_malloc.ENV}=default" and not _cpu_malloc.is_tuned()
    finally:
        _cpu_malloc.restore()
