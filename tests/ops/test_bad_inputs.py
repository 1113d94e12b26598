"""Adversarial inputs to the public ops: each must give a TypeError / ValueError naming the
argument (``BackendError`` where a forced backend cannot serve), or the right answer; never a crash
of the interpreter, a hang, an unrelated exception or a silently wrong result.

Cases that can take the interpreter down (a SIGFPE in a kernel) run in a subprocess. Cases already
covered by the ops' own ``test_bad_input*`` tables are not repeated here.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastpt
from fastpt.ops import (attention, clip_loss, dropout, info_nce, linear_cross_entropy, mlm_mask, nt_xent, sdpa,
                        span_corrupt, span_corrupt_lengths, ul2_denoise)
from fastpt.ops import contrastive as con

from ..helpers import usable_backends

ATTN = usable_backends("attention")
DROP = usable_backends("dropout")
CON = usable_backends("contrastive")
LCE = usable_backends("linear_cross_entropy")
AUTO = [None]


def _raises_naming(exc_types, name, fn):
    """``fn()`` raises one of ``exc_types`` whose message names ``name``."""
    with pytest.raises(exc_types, match=name):
        fn()


def _isolated_popen(code: str) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter (a segfault / SIGFPE must not take pytest down)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    prog = "import faulthandler; faulthandler.enable()\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ============================================================================ attention


def _qkv(b=2, s=8, h=4, hk=2, d=16, dtype=torch.float32):
    g = _g()
    return (torch.randn(b, s, h, d, generator=g, dtype=dtype), torch.randn(b, s, hk, d, generator=g, dtype=dtype),
            torch.randn(b, s, hk, d, generator=g, dtype=dtype))


def _attn_vs_reference(q, k, v, backend, **kw):
    out = attention(q, k, v, backend=backend, **kw)
    ref = attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5, equal_nan=True)
    return out


EMPTY_ATTENTION = {
    # zero-length rows of a (B, S, H, D) batch
    "S=0": """
        q, k, v = (torch.randn(2, 0, h, 16) for h in (4, 2, 2))
        out = attention(q, k, v, causal=True, backend=BACKEND)
        assert out.shape == (2, 0, 4, 16), out.shape
    """,
    # packed input of one empty document (T = 0, cu_seqlens = [0, 0])
    "packed one empty document": """
        q, k, v = (torch.randn(0, h, 16) for h in (4, 2, 2))
        out = attention(q, k, v, cu_seqlens=torch.tensor([0, 0], dtype=torch.int32), backend=BACKEND)
        assert out.shape == (0, 4, 16), out.shape
    """,
    "S=0 backward": """
        q = torch.randn(2, 0, 4, 16, requires_grad=True)
        k, v = (torch.randn(2, 0, 2, 16) for _ in range(2))
        attention(q, k, v, backend=BACKEND).sum().backward()
        assert q.grad.shape == q.shape
    """,
}
_EMPTY_RESULTS: dict = {}


def _empty_attention_results() -> dict:
    """(case, backend) -> "ok" or what went wrong, from one fresh interpreter that runs every case
    in turn and prints each result as it goes: a crash (SIGFPE) ends it, and the cases after its
    last line are reported with the crash. Run once per test process."""
    if not _EMPTY_RESULTS:
        body = ["import torch", "from fastpt.ops import attention"]
        for c, code in EMPTY_ATTENTION.items():
            for b in AUTO + ATTN:
                body += ["try:", textwrap.indent(f"BACKEND = {b!r}\n" + textwrap.dedent(code), "    "),
                         f"    print('ok', {c!r}, {b!r}, sep='|', flush=True)", "except Exception as exc:",
                         f"    print('error', {c!r}, {b!r}, repr(exc).replace(chr(10), ' '), sep='|', flush=True)"]
        proc = _isolated_popen("\n".join(body))
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = "hung (300 s)\n" + err
        for line in out.splitlines():
            kind, case, backend, *msg = line.split("|")
            _EMPTY_RESULTS[case, None if backend == "None" else backend] = "ok" if kind == "ok" else f"raised {msg}"
        for c in EMPTY_ATTENTION:
            for b in AUTO + ATTN:
                _EMPTY_RESULTS.setdefault((c, b), f"the process ended first (exit {proc.returncode}): {err[-600:]}")
    return _EMPTY_RESULTS


@pytest.mark.parametrize("backend", AUTO + ATTN)
@pytest.mark.parametrize("case", list(EMPTY_ATTENTION))
def test_attention_empty_sequences_do_not_crash(case, backend):
    """S = 0 (or one empty packed document) gives an empty output, not a crash of the process
    (the cpu backend died of SIGFPE in torch's CPU flash kernel)."""
    got = _empty_attention_results()[case, backend]
    assert got == "ok", f"attention({case}, backend={backend!r}): {got}"


@pytest.mark.parametrize("backend", AUTO + ATTN)
@pytest.mark.parametrize("mask", ["causal", "prefix", "seqlens+causal"])
@pytest.mark.parametrize("scale", [-1.0, -0.01])
def test_attention_negative_scale(backend, mask, scale):
    """A negative scale passes the finiteness check, so it must be served correctly (or refused
    naming ``scale``): the cpu backend returned NaN for every masked row kind."""
    q, k, v = _qkv(b=2, s=6, h=2, hk=1, d=8)
    kw = {"causal": dict(causal=True), "prefix": dict(prefix_lens=torch.tensor([2, 4])),
          "seqlens+causal": dict(seqlens=torch.tensor([6, 3]), causal=True)}[mask]
    try:
        out = attention(q, k, v, scale=scale, backend=backend, **kw)
    except ValueError as exc:
        assert "scale" in str(exc)
        return
    ref = attention(q.double(), k.double(), v.double(), scale=scale, backend="reference", **kw)
    assert not out.isnan().any(), "NaN output for finite inputs"
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", AUTO + ATTN)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_attention_nan_input_propagates(backend, which):
    """A NaN in q, k or v of a real token must show up in the output of the rows that read it
    (as in the reference backend), not be silently dropped: the cpu backend turns a query row
    holding NaN into zeros."""
    q, k, v = _qkv(b=1, s=4, h=1, hk=1, d=8)
    t = dict(q=q, k=k, v=v)[which]
    t[0, 1, 0, 0] = float("nan")
    out = attention(q, k, v, backend=backend)
    ref = attention(q, k, v, backend="reference")
    assert torch.equal(out.isnan(), ref.isnan()), (out[0, :, 0, 0], ref[0, :, 0, 0])


STRIDED_QKV = {
    "stride-0 seq (expand)": lambda: (torch.randn(2, 1, 4, 16, generator=_g(1)).expand(2, 8, 4, 16),
                                      torch.randn(2, 1, 2, 16, generator=_g(2)).expand(2, 8, 2, 16),
                                      torch.randn(2, 8, 2, 16, generator=_g(3))),
    "stride-0 head dim": lambda: (torch.randn(2, 8, 4, 1, generator=_g(1)).expand(2, 8, 4, 16),
                                  torch.randn(2, 8, 2, 16, generator=_g(2)), torch.randn(2, 8, 2, 16, generator=_g(3))),
    "stride-2 head dim": lambda: tuple(torch.randn(2, 8, h, 32, generator=_g(h))[..., ::2] for h in (4, 2, 2)),
    "storage offset": lambda: tuple(torch.randn(3, 8, h, 16, generator=_g(h))[1:] for h in (4, 2, 2)),
}


@pytest.mark.parametrize("backend", AUTO + ATTN)
@pytest.mark.parametrize("layout", list(STRIDED_QKV))
def test_attention_unusual_strides(backend, layout):
    q, k, v = STRIDED_QKV[layout]()
    _attn_vs_reference(q, k, v, backend, causal=True)


@pytest.mark.parametrize("backend", AUTO + ATTN)
def test_attention_stride0_input_gradient(backend):
    q0 = torch.randn(2, 1, 4, 16, generator=_g(), requires_grad=True)
    _, k, v = _qkv()
    attention(q0.expand(2, 8, 4, 16), k, v, backend=backend).sum().backward()
    q1 = q0.detach().clone().requires_grad_()
    attention(q1.expand(2, 8, 4, 16), k, v, backend="reference").sum().backward()
    torch.testing.assert_close(q0.grad, q1.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", AUTO + ATTN)
def test_attention_packed_with_empty_documents_and_noncontiguous_cu_seqlens(backend):
    g = _g()
    q, k, v = (torch.randn(6, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 9, 0, 9, 3, 9, 3, 9, 6, 9, 6], dtype=torch.int32)[::2]  # [0, 0, 3, 3, 6, 6]
    _attn_vs_reference(q, k, v, backend, cu_seqlens=cu, causal=True)


SEED_BAD = [
    (torch.tensor(True), TypeError),  # a Python bool is refused; a bool tensor must be too
    (torch.tensor(1 + 0j), TypeError),  # refused, but by int() with a message that does not name seed
    (torch.tensor([3]).expand(2), TypeError),
]


@pytest.mark.parametrize("seed,exc", SEED_BAD, ids=["bool-tensor", "complex-tensor", "two-elements"])
@pytest.mark.parametrize("op", ["attention", "dropout", "mlm_mask", "span_corrupt", "random_masking"])
def test_bad_tensor_seeds_name_seed(op, seed, exc):
    call = {
        "attention": lambda: attention(*_qkv(), dropout_p=0.1, seed=seed),
        "dropout": lambda: dropout(torch.randn(8), 0.3, seed=seed),
        "mlm_mask": lambda: mlm_mask(torch.ones(2, 8, dtype=torch.long), mask_token_id=0, vocab_size=4, seed=seed),
        "span_corrupt": lambda: span_corrupt(torch.ones(2, 8, dtype=torch.long), sentinel_start_id=99, eos_id=1,
                                             pad_id=0, seed=seed),
        "random_masking": lambda: fastpt.ops.random_masking(2, 16, seed=seed),
    }[op]
    _raises_naming(exc, "seed", call)


ATTN_BAD = [
    (lambda: attention(*_qkv(), seqlens=torch.tensor([8, 8], dtype=torch.uint8)), TypeError, "seqlens"),
    (lambda: attention(*_qkv(), seqlens=torch.tensor([2**32 + 3, 8])), ValueError, "seqlens"),  # int32 would wrap to 3
    (lambda: attention(*_qkv(), prefix_lens=torch.tensor([2**32 + 3, 8])), ValueError, "prefix_lens"),
    (lambda: attention(*_qkv(), prefix_lens=torch.tensor(3)), ValueError, "prefix_lens"),
    (lambda: attention(torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16),
                       cu_seqlens=torch.tensor([], dtype=torch.int32)), ValueError, "cu_seqlens"),
    (lambda: attention(*_qkv(), max_seqlen=-1), ValueError, "max_seqlen"),
    (lambda: attention(*_qkv(), max_seqlen=8.0), TypeError, "max_seqlen"),
    (lambda: attention(*_qkv(), max_seqlen=True), TypeError, "max_seqlen"),
    (lambda: attention(*_qkv(), max_seqlen=3), ValueError, "max_seqlen"),  # below S for unpacked rows
    (lambda: attention(*_qkv(), deterministic=1), TypeError, "deterministic"),
    (lambda: attention(*_qkv(), causal=torch.tensor(True)), TypeError, "causal"),
    (lambda: attention(*_qkv(), scale=1j), TypeError, "scale"),
    (lambda: attention(*_qkv(), scale=torch.ones(2)), TypeError, "scale"),
    (lambda: attention(*_qkv(h=0, hk=0)), ValueError, r"q: expected at least one head"),
    (lambda: attention(torch.randn(1, 2, 8, 4, 16), torch.randn(1, 2, 8, 2, 16), torch.randn(1, 2, 8, 2, 16)),
     ValueError, "q: expected shape"),
    (lambda: attention(*_qkv(dtype=torch.float64), backend="triton"), fastpt.BackendError, "float64"),
    (lambda: attention(torch.randn(2, 8, 4, 16, dtype=torch.complex64), *_qkv()[1:]), TypeError, "q"),
    (lambda: sdpa(torch.randn(2, 3, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), enable_gqa=True),
     ValueError, "heads"),
    (lambda: sdpa(*(torch.randn(2, 4, 8, 16) for _ in range(3)), dropout_p=0.5, seed=-3), ValueError, "seed"),
    (lambda: sdpa(*(torch.randn(2, 4, 8, 16) for _ in range(3)), dropout_p=1.5), ValueError, "dropout_p"),
    (lambda: sdpa(*(torch.randn(2, 4, 8, 16) for _ in range(3)), backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("call,exc,name", ATTN_BAD, ids=[f"{i}-{r[2]}" for i, r in enumerate(ATTN_BAD)])
def test_attention_more_bad_arguments(call, exc, name):
    _raises_naming(exc, name, call)


def test_mhsa_attention_mask_shape_is_checked():
    """``attention_mask`` must be ``(B, S)`` of x: a mask of the wrong width or batch was
    silently turned into lengths for other rows (or dropped as 'no padding')."""
    m = fastpt.nn.MultiheadSelfAttention(16, 4)
    x = torch.randn(2, 8, 16)
    for bad in (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0]] * 2), torch.ones(2, 12, dtype=torch.long),
                torch.ones(3, 8, dtype=torch.long)):
        with pytest.raises(ValueError, match="attention_mask"):
            m(x, attention_mask=bad)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(dropout="x"), TypeError, "dropout"),
    (dict(dropout=float("nan")), ValueError, "dropout"),
    (dict(head_dim=-1), ValueError, "head_dim"),
    (dict(embed_dim=0), ValueError, "embed_dim"),
    (dict(num_heads=0), ValueError, "num"),
], ids=["dropout-str", "dropout-nan", "head_dim-neg", "embed_dim-0", "num_heads-0"])
def test_mhsa_constructor_arguments(kwargs, exc, name):
    _raises_naming(exc, name, lambda: fastpt.nn.MultiheadSelfAttention(**(dict(embed_dim=16, num_heads=4) | kwargs)))


# ============================================================================ dropout


@pytest.mark.parametrize("backend", AUTO + DROP)
@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 7, generator=_g()).expand(5, 7),  # stride 0
    lambda: torch.tensor(3.0),  # 0-d
    lambda: torch.randn(2, 1, 3, 1, 2, generator=_g()),  # 5-d
    lambda: torch.randn(10, generator=_g())[3:],  # storage offset
    lambda: torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 4),
], ids=["stride0", "0-d", "5-d", "offset", "nan-inf"])
def test_dropout_unusual_inputs_match_reference(backend, make):
    x = make()
    out = dropout(x, 0.5, seed=3, backend=backend)
    ref = dropout(x.contiguous(), 0.5, seed=3, backend="reference")
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
@pytest.mark.parametrize("backend", DROP)
def test_dropout_largest_seeds_agree(backend, seed):
    x = torch.randn(4, 5, generator=_g())
    assert torch.equal(dropout(x, 0.3, seed=seed, backend=backend), dropout(x, 0.3, seed=seed, backend="reference"))


@pytest.mark.parametrize("backend", AUTO + ["reference"])
def test_dropout_unsupported_float_dtype_names_x(backend):
    """float8 is a floating dtype but no backend computes in it: a TypeError naming x, not
    NotImplementedError from the reference's multiply."""
    x = torch.zeros(4, dtype=torch.float8_e4m3fn)
    with pytest.raises((TypeError, fastpt.BackendError), match="x|float8"):
        dropout(x, 0.3, seed=1, backend=backend)


@pytest.mark.parametrize("kwargs", [dict(p=0.0), dict(training=False), dict(x=torch.empty(0, 3))],
                         ids=["p=0", "eval", "empty"])
def test_dropout_bad_backend_named_even_when_nothing_is_dropped(kwargs):
    """The identity shortcuts must not skip the check of ``backend`` (they do check ``seed``)."""
    args = dict(x=torch.randn(4), p=0.5, seed=0, backend="gpu") | kwargs
    with pytest.raises(ValueError, match="backend"):
        dropout(args.pop("x"), args.pop("p"), **args)


# ============================================================================ contrastive


def _emb(n, d, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=_g(seed), dtype=dtype)


@pytest.mark.parametrize("backend", AUTO + CON)
@pytest.mark.parametrize("layout", ["stride0", "transposed", "D=1", "N=1"])
def test_info_nce_unusual_layouts(backend, layout):
    q, k = {"stride0": (_emb(1, 8).expand(4, 8), _emb(4, 8, 1)),
            "transposed": (_emb(8, 4).t(), _emb(8, 4, 1).t()),
            "D=1": (_emb(4, 1), _emb(4, 1, 1)),
            "N=1": (_emb(1, 8), _emb(1, 8, 1))}[layout]
    got = info_nce(q, k, backend=backend, queue=_emb(8, 5, 2).t() if layout == "transposed" else None)
    ref = con.info_nce_reference(q.double(), k.double(), temperature=0.07,
                                 queue=_emb(8, 5, 2).t().double() if layout == "transposed" else None)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", AUTO + CON)
def test_nt_xent_stride0_input(backend):
    z1, z2 = _emb(1, 8).expand(3, 8), _emb(3, 8, 1)
    torch.testing.assert_close(nt_xent(z1, z2, backend=backend).double(),
                               con.nt_xent_reference(z1.double(), z2.double()), atol=1e-5, rtol=1e-5)


def _finite_or_named(fn, name, ref):
    """Either a ValueError naming ``name`` or a finite value close to ``ref`` (float64 math)."""
    try:
        got = fn()
    except ValueError as exc:
        assert name in str(exc), f"the error does not name {name!r}: {exc}"
        return
    assert torch.isfinite(got), f"non-finite loss {got} where the float64 math gives {ref}"
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", AUTO + CON)
@pytest.mark.parametrize("temperature", [1e-50, torch.tensor(1e-50, dtype=torch.float64), 1e300],
                         ids=["tiny-float", "tiny-f64-tensor", "huge"])
def test_info_nce_temperature_beyond_float32(backend, temperature):
    """A temperature that is finite and > 0 (so accepted) but whose reciprocal is not a finite
    float32: the cpu kernel rejected it with 'contrastive: scale must be finite and > 0' (naming
    no argument), the triton and reference backends returned NaN."""
    q, k = _emb(4, 8), _emb(4, 8, 1)
    ref = con.info_nce_reference(q.double(), k.double(), temperature=float(temperature))
    _finite_or_named(lambda: info_nce(q, k, temperature=temperature, backend=backend), "temperature", ref)


@pytest.mark.parametrize("backend", AUTO + CON)
@pytest.mark.parametrize("logit_scale", [-1e6, -200.0])
def test_clip_loss_very_negative_logit_scale(backend, logit_scale):
    """exp(logit_scale) underflows to 0: the cpu kernel raised naming 'scale', not logit_scale."""
    i, t = _emb(4, 8), _emb(4, 8, 1)
    ref = con.clip_loss_reference(i.double(), t.double(), torch.tensor(logit_scale, dtype=torch.float64))
    _finite_or_named(lambda: clip_loss(i, t, logit_scale, backend=backend), "logit_scale", ref)


CON_BAD = [
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), temperature=True), TypeError, "temperature"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), temperature=None), TypeError, "temperature"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), temperature=torch.tensor(1e-8, dtype=torch.float16)), ValueError,
     "temperature"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), labels=[0, 1, 0, 1]), ValueError, "labels"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), labels=torch.zeros(4, dtype=torch.uint8)), TypeError, "labels"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), labels=torch.tensor([True, False, True, False])), TypeError, "labels"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), queue=torch.zeros(3, 8, dtype=torch.long)), TypeError, "queue"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), queue=_emb(3, 8).double()), TypeError, "queue"),
    (lambda: info_nce(_emb(4, 8), _emb(4, 8), queue=_emb(1, 8)[0]), ValueError, "queue"),
    (lambda: info_nce(torch.randn(4, 8, dtype=torch.complex64), _emb(4, 8)), TypeError, "query"),
    (lambda: nt_xent(_emb(0, 8), _emb(0, 8)), ValueError, "z1"),
    (lambda: nt_xent(_emb(4, 8), _emb(4, 8).double()), TypeError, "z2"),
    (lambda: clip_loss(_emb(4, 8), _emb(4, 8), True), TypeError, "logit_scale"),
    (lambda: clip_loss(_emb(4, 8), _emb(4, 8), "1.0"), TypeError, "logit_scale"),
    (lambda: clip_loss(_emb(4, 8), _emb(4, 8), float("-inf")), ValueError, "logit_scale"),
    (lambda: clip_loss(_emb(4, 8), _emb(4, 8), torch.tensor(2)), TypeError, "logit_scale"),
    (lambda: fastpt.nn.NTXentLoss(temperature=0.0), ValueError, "temperature"),
    (lambda: fastpt.nn.CLIPLoss(init_temperature=float("inf")), ValueError, "temperature"),
    (lambda: fastpt.nn.InfoNCELoss(temperature="x"), TypeError, "temperature"),
]


@pytest.mark.parametrize("call,exc,name", CON_BAD, ids=[f"{i}-{r[2]}" for i, r in enumerate(CON_BAD)])
def test_contrastive_more_bad_arguments(call, exc, name):
    _raises_naming(exc, name, call)


# ============================================================================ linear_cross_entropy


def _lce_vs_torch(h, w, y, backend, **kw):
    got = linear_cross_entropy(h, w, y, backend=backend, **kw)
    logits = h.double() @ w.double().T
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1).long(),
                                            reduction=kw.get("reduction", "mean"))
    torch.testing.assert_close(got.double().reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", AUTO + LCE)
@pytest.mark.parametrize("layout", ["stride0 weight", "stride0 hidden", "stride0 labels", "int32 strided labels",
                                    "V=1", "5-d none", "1-d hidden"])
def test_linear_cross_entropy_unusual_layouts(backend, layout):
    g = _g()
    h, w, y, kw = torch.randn(4, 8, generator=g), torch.randn(16, 8, generator=g), torch.tensor([1, 2, 3, 4]), {}
    if layout == "stride0 weight":
        w = w[:1].expand(16, 8)
    elif layout == "stride0 hidden":
        h = h[:1].expand(4, 8)
    elif layout == "stride0 labels":
        y = torch.tensor([3]).expand(4)
    elif layout == "int32 strided labels":
        y = torch.tensor([1, 0, 2, 0, 3, 0, 4, 0], dtype=torch.int32)[::2]
    elif layout == "V=1":
        w, y = w[:1], torch.zeros(4, dtype=torch.long)
    elif layout == "5-d none":
        h, y, kw = torch.randn(1, 2, 1, 2, 8, generator=g), torch.randint(0, 16, (1, 2, 1, 2), generator=g), \
            dict(reduction="none")
    else:
        h, y = h[0], torch.tensor(5)
    _lce_vs_torch(h, w, y, backend, **kw)


@pytest.mark.parametrize("backend", AUTO + LCE)
def test_linear_cross_entropy_zero_width_hidden(backend):
    """D = 0: the logits are all 0 (loss log V) or a ValueError naming hidden / weight; it raised
    torch's 'cannot reshape tensor of 0 elements' RuntimeError."""
    h, w, y = torch.randn(4, 0), torch.randn(16, 0), torch.tensor([1, 2, 3, 4])
    try:
        loss = linear_cross_entropy(h, w, y, backend=backend)
    except ValueError as exc:
        assert "hidden" in str(exc) or "weight" in str(exc)
        return
    torch.testing.assert_close(loss.double(), torch.tensor(math.log(16), dtype=torch.float64))


@pytest.mark.parametrize("backend", AUTO + LCE)
@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70], ids=["2**63", "-2**63-1", "2**70"])
def test_linear_cross_entropy_ignore_index_outside_int64(backend, ignore_index):
    """An int that does not fit int64 cannot equal any label: either the plain loss (as the
    reference backend gives for 2**63) or a TypeError / ValueError naming ignore_index; the fused
    backends raised a RuntimeError from the custom op's schema, the reference an OverflowError."""
    h, w, y = torch.randn(4, 8, generator=_g()), torch.randn(16, 8, generator=_g(1)), torch.tensor([1, 2, 3, 4])
    try:
        loss = linear_cross_entropy(h, w, y, ignore_index=ignore_index, backend=backend)
    except (TypeError, ValueError) as exc:
        assert "ignore_index" in str(exc)
        return
    torch.testing.assert_close(loss, linear_cross_entropy(h, w, y, backend="reference"))


LCE_BAD = [
    (lambda: linear_cross_entropy(torch.randn(4, 8, dtype=torch.complex64), torch.randn(16, 8),
                                  torch.tensor([1, 2, 3, 4])), TypeError, "hidden"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4], dtype=torch.uint8)),
     TypeError, "labels"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([True, False, True, False])),
     TypeError, "labels"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 2**32 + 3, 4])),
     ValueError, "labels"),  # would be 3 in int32
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]),
                                  bias=torch.zeros(16, dtype=torch.long)), TypeError, "bias"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]), z_loss=None),
     TypeError, "z_loss"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]), z_loss=float("inf")),
     ValueError, "z_loss"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]), reduction=None),
     ValueError, "reduction"),
    (lambda: linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]),
                                  ignore_index=torch.tensor(-100)), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("call,exc,name", LCE_BAD, ids=[f"{i}-{r[2]}" for i, r in enumerate(LCE_BAD)])
def test_linear_cross_entropy_more_bad_arguments(call, exc, name):
    _raises_naming(exc, name, call)


# ============================================================================ mlm_mask


def _ids(*shape, dtype=torch.int64):
    return torch.randint(5, 100, shape, generator=_g(), dtype=dtype)


@pytest.mark.parametrize("special", [5, 0, "12", [5.7], [None], ["a"], [2**70], torch.tensor([[5, 6], [7, 8]])],
                         ids=["int-5", "int-0", "str", "float", "None", "str-item", "huge", "2-d-tensor"])
def test_mlm_special_token_ids_checked(special):
    """``special_token_ids`` is an iterable of ints. Anything else needs an error naming it:
    0 was silently treated as 'no special ids' (its tokens got masked), 5 raised "'int' object
    is not iterable", "12" became ids {1, 2}, 5.7 became 5, and the others raised errors that
    name nothing."""
    ids = torch.zeros(2, 8, dtype=torch.long) if isinstance(special, int) and special == 0 else _ids(2, 8)
    with pytest.raises((TypeError, ValueError), match="special_token_ids"):
        mlm_mask(ids, mask_token_id=3, vocab_size=100, mask_prob=1.0, special_token_ids=special)


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if "triton" in usable_backends("mlm_mask")
                                                                else []))
def test_mlm_huge_and_negative_special_ids_are_harmless(backend):
    ids = _ids(2, 30)
    a = mlm_mask(ids, mask_token_id=3, vocab_size=100, special_token_ids=[2**40, -1, 7], mask_prob=0.9, backend=backend)
    r = mlm_mask(ids, mask_token_id=3, vocab_size=100, special_token_ids=[2**40, -1, 7], mask_prob=0.9,
                 backend="reference")
    assert torch.equal(a[0], r[0]) and torch.equal(a[1], r[1])


MLM_BAD = [
    (lambda: mlm_mask(_ids(2, 8), mask_token_id=3, vocab_size=True), TypeError, "vocab_size"),
    (lambda: mlm_mask(_ids(2, 8), mask_token_id=3, vocab_size=100.0), TypeError, "vocab_size"),
    (lambda: mlm_mask(_ids(2, 8), mask_token_id=3, vocab_size=2**31), ValueError, "vocab_size"),
    (lambda: mlm_mask(_ids(2, 8), mask_token_id="3", vocab_size=100), TypeError, "mask_token_id"),
    (lambda: mlm_mask(_ids(2, 8), mask_token_id=3, vocab_size=100, random_prob=-0.1), ValueError, "random_prob"),
    (lambda: mlm_mask(torch.ones(2, 8, dtype=torch.uint8), mask_token_id=3, vocab_size=100), TypeError, "input_ids"),
    (lambda: mlm_mask(_ids(2, 8), mask_token_id=3, vocab_size=100, word_ids=torch.ones(2, 8, dtype=torch.bool)),
     TypeError, "word_ids"),
    (lambda: mlm_mask(_ids(2, 8), mask_token_id=3, vocab_size=100, attention_mask=torch.ones(8, dtype=torch.long)),
     ValueError, "attention_mask"),
]


@pytest.mark.parametrize("call,exc,name", MLM_BAD, ids=[f"{i}-{r[2]}" for i, r in enumerate(MLM_BAD)])
def test_mlm_more_bad_arguments(call, exc, name):
    _raises_naming(exc, name, call)


# ============================================================================ span_corrupt / ul2 / random_masking

IDS = dict(sentinel_start_id=99, eos_id=1, pad_id=0)


MASKING_BAD = [
    (lambda: span_corrupt(_ids(2, 8), "88", **IDS), TypeError, "seqlens"),
    (lambda: span_corrupt(_ids(2, 8), [2**63, 8], **IDS), ValueError, "seqlens"),
    (lambda: span_corrupt(_ids(2, 8), [8.0, 8.0], **IDS), TypeError, "seqlens"),
    (lambda: span_corrupt(_ids(2, 8), torch.tensor([255, 8], dtype=torch.uint8), **IDS), ValueError, "seqlens"),
    (lambda: span_corrupt_lengths(2**70), ValueError, "seqlens"),
    (lambda: span_corrupt_lengths(True), TypeError, "seqlens"),
    (lambda: span_corrupt_lengths(torch.tensor(8)), ValueError, "seqlens"),
    (lambda: span_corrupt(_ids(2, 8), noise_density=torch.tensor([[0.1], [0.2]]), **IDS), ValueError, "noise_density"),
    (lambda: span_corrupt(_ids(2, 8), mean_span_len=float("inf"), **IDS), ValueError, "mean_span_len"),
    (lambda: span_corrupt(_ids(2, 8), sentinel_start_id=99, eos_id=1.0, pad_id=0), TypeError, "eos_id"),
    (lambda: span_corrupt(_ids(2, 8), sentinel_start_id=99, eos_id=True, pad_id=0), TypeError, "eos_id"),
    (lambda: ul2_denoise(_ids(2, 8), **IDS, mode_token_ids={"R": 5.0, "X": 6, "S": 7}), TypeError, "mode_token_ids"),
    (lambda: ul2_denoise(_ids(2, 8), **IDS, denoisers=[("r", 3.0, 0.15)]), ValueError, r"denoisers\[0\]"),
    (lambda: ul2_denoise(_ids(2, 8, dtype=torch.int32), sentinel_start_id=99, eos_id=1, pad_id=2**31), ValueError,
     "pad_id"),
    (lambda: fastpt.ops.random_masking(True, 16), TypeError, "batch"),
    (lambda: fastpt.ops.random_masking(2**32, 16), ValueError, "batch"),
    (lambda: fastpt.ops.random_masking(2, 2**31), ValueError, "num_patches"),
    (lambda: fastpt.ops.random_masking(2, 16, mask_ratio=float("inf")), ValueError, "mask_ratio"),
    (lambda: fastpt.ops.random_masking(2, 16, device=0), TypeError, "device"),
    (lambda: fastpt.ops.random_masking(2, 16, mode="block", grid=(4.0, 4.0)), TypeError, "grid"),
    (lambda: fastpt.ops.random_masking(2, 16, mode="block", grid=(4, 4), min_aspect=float("nan")), ValueError,
     "min_aspect"),
]


@pytest.mark.parametrize("call,exc,name", MASKING_BAD, ids=[f"{i}-{r[2]}" for i, r in enumerate(MASKING_BAD)])
def test_masking_more_bad_arguments(call, exc, name):
    _raises_naming(exc, name, call)


def test_ul2_huge_weights_are_a_valid_mixture_or_named():
    """Seven weights of 1e308 are finite and non-negative, so they are a uniform mixture (or,
    if refused, refused naming weights): their sum overflowed and an IndexError escaped."""
    try:
        out = ul2_denoise(_ids(8, 16), **IDS, weights=[1e308] * 7, seed=4)
    except ValueError as exc:
        assert "weights" in str(exc)
        return
    ref = ul2_denoise(_ids(8, 16), **IDS, seed=4)
    assert torch.equal(out.denoiser, ref.denoiser)


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
@pytest.mark.parametrize("layout", ["S=0", "B=0", "S=1", "stride0", "transposed"])
def test_span_corrupt_unusual_layouts(backend, layout):
    ids = {"S=0": _ids(2, 0), "B=0": _ids(0, 5), "S=1": _ids(2, 1), "stride0": _ids(1, 20).expand(3, 20),
           "transposed": _ids(20, 3).t()}[layout]
    a = span_corrupt(ids, seed=3, backend=backend, **IDS)
    r = span_corrupt(ids.contiguous(), seed=3, backend="reference", **IDS)
    assert torch.equal(a.inputs, r.inputs) and torch.equal(a.targets, r.targets)


# ============================================================================ flags and numbers given as strings

_E = torch.nn.functional.normalize(torch.randn(4, 8, generator=_g(5)), dim=1)
LOOSE_TYPES = [
    (lambda: info_nce(_E, _E, symmetric="no"), "symmetric"),
    (lambda: info_nce(_E, _E, normalize=1), "normalize"),
    (lambda: nt_xent(_E, _E, gather="False"), "gather"),
    (lambda: clip_loss(_E, _E, 1.0, normalize=None), "normalize"),
    (lambda: sdpa(*(torch.randn(1, 2, 4, 8) for _ in range(3)), is_causal="no"), "is_causal"),
    (lambda: dropout(torch.ones(4), "0.1", seed=1), "p"),
    (lambda: dropout(torch.ones(4), 0.1, training=None, seed=1), "training"),
    (lambda: attention(*_qkv(), dropout_p=True, seed=1), "dropout_p"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                  label_smoothing="0.1"), "label_smoothing"),
    (lambda: mlm_mask(torch.ones(2, 8, dtype=torch.long), mask_token_id=3, vocab_size=10, mask_prob="0.5"), "mask_prob"),
]


@pytest.mark.parametrize("call,name", LOOSE_TYPES, ids=[r[1] + f"-{i}" for i, r in enumerate(LOOSE_TYPES)])
def test_flags_and_numbers_are_not_read_from_other_types(call, name):
    """``bool("no")`` is True and ``float("0.1")`` is 0.1: a flag or a number given as a string
    (or None) is refused naming the argument, never read as something else."""
    _raises_naming(TypeError, name, call)


def test_sdpa_errors_name_its_own_arguments():
    """sdpa's errors name query / key / value (its parameters, as in torch), not attention's q / k / v."""
    q = torch.randn(2, 4, 8, 16)
    _raises_naming(TypeError, "^query:", lambda: sdpa(q.to(torch.int64), q, q))
    _raises_naming((TypeError, ValueError), "^key:", lambda: sdpa(q, q.double(), q))


def test_numpy_integers_are_accepted_where_ints_are():
    # seeds drawn with numpy (np.random.default_rng().integers), np.prod(grid) sizes, numpy label values
    np = pytest.importorskip("numpy")
    from fastpt.ops import dropout, linear_cross_entropy, random_masking
    from fastpt.ops.span_corrupt import span_corrupt_lengths

    x = torch.randn(4, 8)
    assert torch.equal(dropout(x, 0.1, seed=np.int64(3)), dropout(x, 0.1, seed=3))
    assert torch.equal(dropout(x, 0.1, seed=np.uint64(3)), dropout(x, 0.1, seed=3))
    assert torch.equal(random_masking(2, np.prod((4, 4)), seed=np.int64(5))[1], random_masking(2, 16, seed=5)[1])
    h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([1, 2, -100, 3, 4])
    assert torch.equal(linear_cross_entropy(h, w, y, ignore_index=np.int64(-100)), linear_cross_entropy(h, w, y))
    assert span_corrupt_lengths(np.int64(512)) == span_corrupt_lengths(512) == (462, 104)
    with pytest.raises(TypeError, match="seed: expected an int, got bool"):
        dropout(x, 0.1, seed=np.bool_(True))
