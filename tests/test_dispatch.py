"""Dispatch: declared support drives selection; refusals are explained; info reports it all."""
import json
import subprocess
import sys

import pytest
import torch

import fastpt
from fastpt import _dispatch


def _toy_op():
    calls = []

    def make(name, refuse=None):
        def run(x):
            calls.append(name)
            return name
        return _dispatch.Backend(name, lambda: None, lambda x: refuse(x) if refuse else None, run)

    op = _dispatch.Op("toy", [
        make("cuda", lambda x: "needs cuda tensors"),
        make("cpu", lambda x: "x too large" if x > 10 else None),
        _dispatch.Backend("triton", lambda: "triton is not installed", lambda x: None, lambda x: "triton"),
        make("reference"),
    ], probe=lambda device: {"x": 0}, register=False)
    return op, calls


def test_picks_first_backend_that_accepts():
    op, calls = _toy_op()
    assert op(x=1) == "cpu"
    assert op(x=11) == "reference"  # cpu refuses, triton unavailable
    assert calls == ["cpu", "reference"]


def test_forced_backend_refusal_explains_every_backend():
    op, _ = _toy_op()
    with pytest.raises(_dispatch.BackendError) as exc:
        op(backend="cpu", x=11)
    msg = str(exc.value)
    assert "forced backend 'cpu'" in msg and "x too large" in msg
    assert "cuda: needs cuda tensors" in msg and "triton: triton is not installed" in msg and "reference: ok" in msg
    with pytest.raises(_dispatch.BackendError, match="triton is not installed"):
        op(backend="triton", x=1)


def test_unknown_backend_name():
    op, _ = _toy_op()
    with pytest.raises(ValueError, match="backend"):
        op(backend="metal", x=1)


def test_every_registered_op_has_a_reference_and_serves_cpu():
    assert _dispatch.OPS, "no op registered"
    for name, op in _dispatch.OPS.items():
        assert "reference" in op.backends, name
        assert op.select(None, **op.probe("cpu")).name in ("cpu", "reference"), name


def test_cpu_backend_is_built_here():
    info = fastpt.info()
    assert info["native"], "fastpt._C did not load"
    assert info["backends"]["cpu"] is None and info["backends"]["reference"] is None


def test_info_shape():
    info = fastpt.info()
    for key in ("version", "python", "torch", "triton", "native", "backends", "ops"):
        assert key in info
    assert set(info["backends"]) == set(_dispatch.BACKENDS)
    assert set(info["ops"]) == set(_dispatch.OPS)
    if torch.cuda.is_available():
        assert all("cuda" in per for per in info["ops"].values())


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "fastpt", "info", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["version"] == fastpt.__version__ and "mlm_mask" in data["ops"]


def test_cli_info_text():
    out = subprocess.run([sys.executable, "-m", "fastpt", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "mlm_mask" in out.stdout


def test_availability_traces_under_torch_compile():
    """Dispatch runs inside ``torch.compile``d code: every backend's ``available()`` must trace
    in a full graph. torch 2.11's Dynamo failed on an ``lru_cache``d one stored in the Backend
    field (bound as a method); newer ones only warn, so the warning is an error here."""
    import warnings

    fastpt.info()  # every op module imported and registered
    backends = [b for op in _dispatch.OPS.values() for b in op.backends.values()]

    def every_available(x):
        for b in backends:
            if b.available() is None:
                x = x + 1
        return x

    expected = every_available(torch.zeros(()))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")
        got = torch.compile(every_available, backend="eager", fullgraph=True)(torch.zeros(()))
    assert got.item() == expected.item()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_addmm_f32_accumulates_half_products_in_float32_or_declines(device):
    """CUDA: out += a @ b summed by the GEMM in float32 (the half product is never rounded); elsewhere
    (and for float32 operands) it declines and leaves out untouched, so the caller adds the product."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 29, generator=g), torch.randn(29, 45, generator=g)
    out = torch.randn(37, 45, generator=g).to(device)
    before = out.clone()
    ah, bh = a.to(device, torch.bfloat16), b.t().contiguous().to(device, torch.bfloat16).t()  # a transposed view
    done = _dispatch.addmm_f32_(out, ah, bh)
    if device == "cuda" and not done:
        pytest.skip(f"torch {torch.__version__}: out_dtype addmm missing or failed its check (callers add the product)")
    assert done == (device == "cuda")
    want = before + ah.double() @ bh.double() if done else before
    torch.testing.assert_close(out.double(), want.double(), rtol=1e-5, atol=1e-5)
    assert not _dispatch.addmm_f32_(out, a.to(device), b.to(device))  # float32 operands: not this path


def test_torch_func_transforms_pick_the_reference():
    """Under a torch.func transform every op runs its reference backend (the others are custom ops
    without functorch rules); a forced other backend raises naming the reason. Outside, and under
    torch.compile (where the check folds to False: one graph), the order is unchanged."""
    op, calls = _toy_op()
    seen = []

    def f(x):
        seen.append(op(x=1))
        with pytest.raises(_dispatch.BackendError, match="torch.func transform"):
            op(backend="cpu", x=1)
        assert op.refusals(x=1)["cpu"].startswith("a torch.func transform") and op.refusals(x=1)["reference"] is None
        return x * 2

    assert _dispatch.transforms_active() is False
    torch.func.grad(lambda x: f(x).sum())(torch.ones(2))
    torch.func.vmap(f)(torch.ones(3, 2))
    assert seen == ["reference", "reference"]
    assert op(x=1) == "cpu" and op.refusals(x=1)["cpu"] is None  # outside again

    def compiled(x):
        return x + (1.0 if _dispatch.transforms_active() else 2.0)

    assert torch.equal(torch.compile(compiled, backend="eager", fullgraph=True)(torch.zeros(2)), torch.full((2,), 2.0))
    # a backend of plain torch ops (attention's sdpa: torch's own op) stays in line under the transforms
    safe = _dispatch.Op("toy_safe", [
        _dispatch.Backend("cpu", lambda: None, lambda x: None, lambda x: "cpu"),
        _dispatch.Backend("sdpa", lambda: None, lambda x: None, lambda x: "sdpa", transform_safe=True),
        _dispatch.Backend("reference", lambda: None, lambda x: None, lambda x: "reference"),
    ], probe=lambda device: {"x": 0}, register=False)
    picked = []
    torch.func.grad(lambda x: (picked.append((safe(x=1), safe(backend="sdpa", x=1))) or x).sum())(torch.ones(2))
    assert picked == [("sdpa", "sdpa")] and safe(x=1) == "cpu"


def test_vmap_keeps_the_gradient_of_a_fused_op():
    """linear_cross_entropy under vmap with autograd outside: its fused cpu path read requires_grad,
    False on vmap's wrapped tensors, and silently gave the hidden states no gradient (the encoder
    before the head got None). The dispatcher now runs the reference there: the gradient equals a
    Python loop over the samples."""
    from fastpt.ops import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    enc = torch.nn.Linear(4, 4)
    w = torch.nn.Parameter(torch.randn(7, 4, generator=g))
    x = torch.randn(3, 6, 4, generator=g)
    y = torch.tensor([1, -100, 3, 6, 0, -100])
    torch.func.vmap(lambda h: linear_cross_entropy(h, w, y))(enc(x)).sum().backward()
    got = enc.weight.grad, w.grad
    assert got[0] is not None, "the hidden states got no gradient"
    enc.zero_grad()
    w.grad = None
    sum(linear_cross_entropy(enc(x[i]), w, y) for i in range(3)).backward()
    torch.testing.assert_close(got[0], enc.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-5, atol=1e-6)
