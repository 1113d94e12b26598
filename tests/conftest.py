"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any module that defines Triton kernels is
imported, hence here, before fastpt is imported by the test modules.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpt  # noqa: E402


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return request.param


def pytest_report_header(config):
    info = fastpt.info()
    return [f"fastpt {info['version']}: native={info['native']} backends={info['backends']}"]


def pytest_runtest_logreport(report):
    """With FASTPT_FAILURE_LOG set, append each failure's traceback to that file as it happens
    (benches/gpu_check.sh: a test phase cut short by its time limit still leaves every traceback)."""
    path = os.environ.get("FASTPT_FAILURE_LOG")
    # under pytest-xdist the hook runs in the worker and again in the controller: the controller writes
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
