"""fastpt.nn.Dropout: a drop-in torch.nn.Dropout on fastpt's counter-based dropout (CPU)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastpt import _native
from fastpt.nn import Dropout
from fastpt.ops import dropout

NATIVE = pytest.mark.skipif(_native.cpu_unavailable() is not None, reason="fastpt._C is not built")


def _x(n=100_000, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5  # never 0


def test_drop_in():
    d = Dropout(0.1)
    assert isinstance(d, nn.Dropout) and repr(d) == repr(nn.Dropout(0.1)) == "Dropout(p=0.1, inplace=False)"
    assert d.state_dict() == {} and list(d.parameters()) == []
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_train_and_eval_statistics(p):
    """Training: drop rate p within 5 binomial sigmas, as nn.Dropout; kept values scaled by 1 / (1 - p).
    Eval: the input itself."""
    x, n = _x(), 100_000
    d, ref = Dropout(p), nn.Dropout(p)
    for module in (d, ref):
        out = module(x)
        dropped = int((out == 0).sum())
        assert abs(dropped - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (module, dropped)
        torch.testing.assert_close(out[out != 0], x[out != 0] / (1 - p), rtol=1e-6, atol=0)
        assert abs(out.mean().item() - x.mean().item()) < 0.01
    d.eval()
    assert d(x) is x


@NATIVE
def test_uses_fastpt_on_cpu():
    torch.manual_seed(3)
    out = Dropout(0.3)(_x())
    torch.manual_seed(3)
    assert torch.equal(out, dropout(_x(), 0.3))


def test_manual_seed_reproduces():
    d = Dropout(0.5)
    torch.manual_seed(0)
    a, b = d(_x()), d(_x())
    torch.manual_seed(0)
    assert torch.equal(a, d(_x())) and torch.equal(b, d(_x())) and not torch.equal(a, b)


def test_gradient_is_the_mask():
    x = _x(5000).requires_grad_()
    g = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    out = Dropout(0.25)(x)
    out.backward(g)
    assert torch.equal(x.grad, torch.where(out != 0, g * (1 / 0.75), 0.0))


def test_inplace_and_edge_probabilities():
    x = _x(1000)
    y = x.clone()
    out = Dropout(0.5, inplace=True)(y)
    assert out.data_ptr() == y.data_ptr() and (y == 0).any() and torch.equal(out, y)
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    half = Dropout(0.5)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and (half == 0).any()


@pytest.mark.skipif(_native.cpu_unavailable() is not None, reason="needs fastpt._C")
def test_torch_compile_runs_the_cpu_kernel_without_a_graph_break(monkeypatch):
    """Under torch.compile on the CPU the module still runs fastpt's kernel (its custom op, the seed
    drawn in the graph), not F.dropout, with no graph break and a fresh mask each call."""
    def refuse(*args, **kwargs):
        raise AssertionError("F.dropout was called")

    monkeypatch.setattr(F, "dropout", refuse)
    model = nn.Sequential(nn.Linear(64, 64), Dropout(0.3))
    x = torch.randn(40, 64)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        a, b = compiled(x), compiled(x)
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
    dense = model[0](x).detach()
    for out in (a, b):
        kept = out != 0
        assert abs(1 - kept.float().mean().item() - 0.3) < 0.05
        torch.testing.assert_close(out[kept], (dense / 0.7)[kept])
    assert not torch.equal(a != 0, b != 0)
    a.sum().backward()  # the self-adjoint backward through the custom op
    assert model[0].weight.grad is not None


def test_other_devices_use_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(F, "dropout", lambda *a, **k: calls.append(a) or a[0])
    x = torch.empty(3, 4, device="meta")
    assert Dropout(0.5)(x) is x and len(calls) == 1


def test_activation_checkpointing_replays_the_mask():
    """checkpoint() restores torch's RNG state for the recompute: the seed, hence the mask, repeats."""
    lin, d = nn.Linear(64, 64), Dropout(0.5)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        lin.zero_grad()
        torch.manual_seed(1)
        f = lambda x: torch.tanh(d(lin(x)))  # noqa: E731
        out = checkpoint(f, x, use_reentrant=False) if ckpt else f(x)
        out.sum().backward()
        grads.append(lin.weight.grad.clone())
    assert torch.equal(*grads)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_jit_script_compiles_torchs_dropout():
    """torch.jit.script failed on the fast path's Python (fastpt._native); scripted, the module is
    torch.nn.Dropout (F.dropout on torch's generator). Eager calls keep fastpt's kernel (test_uses_fastpt_on_cpu)."""
    d = Dropout(0.5)
    scripted = torch.jit.script(d)
    x = _x(1000)
    torch.manual_seed(4)
    got = scripted(x)
    torch.manual_seed(4)
    assert torch.equal(got, F.dropout(x, 0.5, True))
    scripted.eval()
    assert torch.equal(scripted(x), x)


def test_torch_func_transforms():
    """torch.func.grad / functional_call and vmap(randomness=...) work as with torch.nn.Dropout (the
    custom op raised torch's 'setup_context' error, the seed's .item() failed under vmap): under
    grad the masks are eager's after the same manual_seed; under vmap "different" each sample gets
    its own seed from torch's generator, and the default "error" raises torch's error."""
    d = Dropout(0.5)
    x = _x(600).reshape(3, 200)
    torch.manual_seed(2)
    got = torch.func.grad(lambda a: d(a).square().sum())(x)
    torch.manual_seed(2)
    a = x.clone().requires_grad_(True)
    d(a).square().sum().backward()
    assert torch.equal(got, a.grad)
    torch.manual_seed(3)
    seeds = torch.randint(0, 2**62, (3,)).tolist()
    torch.manual_seed(3)
    batched = torch.func.vmap(d, randomness="different")(x)
    assert torch.equal(batched, torch.stack([dropout(x[i], 0.5, seed=s) for i, s in enumerate(seeds)]))
    for mod in (d, nn.Dropout(0.5)):
        with pytest.raises(RuntimeError, match="randomness"):
            torch.func.vmap(mod)(x)
    d.eval()
    assert torch.equal(torch.func.vmap(d)(x), x)
