"""fastpt.bench.aot: every Triton kernel's default launch compiles for Hopper (sm_90a) on this machine.

The CPU tests run the kernels under Triton's interpreter, which accepts code the compiler refuses
(and knows nothing of registers or shared memory). Here the launches go through Triton's real
compiler and ptxas for the GPU the project targets, in a subprocess without TRITON_INTERPRET (under
it ``triton.jit`` gives interpreter functions).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="Triton's wheel has no ptxas here"),
    # the stand-in for machines without a GPU: where one is, the GPU tests run the kernels themselves
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: its tests run the kernels"),
]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _python(code: str, tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"  # triton.jit reads its functions' source from a file
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=timeout)


def test_every_default_launch_compiles_for_hopper(tmp_path):
    out = tmp_path / "sm90.md"
    r = subprocess.run([sys.executable, "-m", "fastpt.bench.aot", "--arch", "90", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = out.read_text()
    assert "failed" not in table
    for op, kernel in [("attention", "fwd"), ("attention", "dkdv"), ("attention", "dq"), ("attention", "delta"),
                       ("contrastive", "fwd"), ("contrastive", "grad_q"), ("contrastive", "grad_k"),
                       ("contrastive_blas", "row_lse"), ("contrastive_blas", "col_lse"),
                       ("contrastive_blas", "dscores"),
                       ("linear_cross_entropy", "ce_chunk"), ("dropout", "dropout"), ("mlm_mask", "mlm"),
                       ("random_masking", "random_masking")]:
        assert f"| {op} | {kernel} |" in table, (op, kernel)


def test_a_kernel_the_compiler_refuses_is_reported(tmp_path):
    """The check can fail: a dot of 8 x 8 tiles (tensor cores need 16) compiles under the interpreter
    but not for the GPU; compile_spec reports it instead of raising, and counts nothing."""
    r = _python("""
        import json, triton, triton.language as tl
        from fastpt.bench import aot

        @triton.jit
        def bad(x_ptr, B: tl.constexpr):
            i = tl.arange(0, B)
            a = tl.load(x_ptr + i[:, None] * B + i[None, :])
            tl.store(x_ptr + i[:, None] * B + i[None, :], tl.dot(a, a))

        @triton.jit
        def good(x_ptr, B: tl.constexpr):
            i = tl.arange(0, B)
            tl.store(x_ptr + i, tl.load(x_ptr + i) * 2)

        out = {}
        for name, fn in (("bad", bad), ("good", good)):
            spec = aot.Spec("test", name, "", fn, {"x_ptr": "*fp16"}, {"B": 8}, 4, 1)
            r = aot.compile_spec(spec)
            out[name] = [r.error, r.regs, r.local_bytes]
        print(json.dumps(out))
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["bad"][0] and got["bad"][1] is None
    assert got["good"][0] is None and got["good"][1] > 0 and got["good"][2] == 0


def test_refuses_to_run_under_the_interpreter():
    env = dict(_env(), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "fastpt.bench.aot", "--ops", "contrastive"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr
