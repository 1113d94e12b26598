"""Fused LM / MLM head: ``cross_entropy(hidden @ weight.T + bias, labels)`` without the (T, V) logits.

Only rows whose label is not ``ignore_index`` do any work: they are gathered first, so an MLM
batch with 15% masked tokens costs 15% of the dense head. The active rows are processed in
chunks of ``C`` rows; per chunk the logits ``(C, V)`` are one GEMM, the loss, log-sum-exp and
the gradient of the logits are computed in place in that buffer, and two more GEMMs turn it into
the chunk's rows of ``grad_hidden`` and its contribution to ``grad_weight``. Peak memory is
``O(C * V)`` on top of the gradients themselves, instead of several ``(T, V)`` buffers. On the
CPU that one chunk buffer is kept per thread between calls (``fastpt.ops.empty_cache()`` frees it):
a fresh one costs a page fault per 4 KiB page its GEMM first writes.

Forward and backward happen in the same call (as in Liger-Kernel's fused linear cross-entropy)
when any input requires grad. This is what makes the op memory-cheap: what autograd keeps
between forward and backward is then ``grad_hidden`` (T, D) and ``grad_weight`` (V, D), the
tensors backward has to produce anyway, instead of the (T, V) logits / softmax a plain
``F.linear`` + ``F.cross_entropy`` saves; and the logits are computed once instead of being
recomputed in backward. Backward only scales the stored gradients by the incoming scalar
gradient (in place, so the weight-sized gradient exists once). The prices: a forward whose
backward never runs did the backward work anyway, so evaluate under ``torch.no_grad()``; and a
"mean" / "sum" loss takes one backward (a second one through the same graph, after
``retain_graph=True``, ``autograd.grad`` or in ``gradcheck``, raises a RuntimeError saying so: the
gradients were handed out already). With ``reduction="none"`` the incoming gradient differs per
row, so ``grad_weight`` cannot be formed ahead of time; that case recomputes the logits chunk by
chunk in backward (as often as backward runs).

Numerics (both fused backends): the GEMMs run in the input dtype with fp32 accumulation (BLAS /
cuBLAS), softmax, loss and log-sum-exp in fp32 (fp64 for fp64 inputs), and ``grad_weight`` is
summed over chunks in fp32 before the final cast: on CUDA each half-precision chunk GEMM adds into
the fp32 buffer itself (``torch.addmm(..., out_dtype=float32, out=buffer)``, where torch has it),
elsewhere each chunk's product is rounded to the input dtype and then added. The logits of half inputs are rounded to the
input dtype once, as in ``F.linear`` + ``F.cross_entropy`` run in that dtype. With a bias, the triton backend (and
float32 / float64 everywhere) adds it inside the GEMM, before that rounding, exactly as ``F.linear``; the cpu backend
rounds the half product ``h @ W.T`` and adds the bias in float32 as the chunk step reads each row (a GEMM into a
bias-filled output cost 1.5x the plain product; and the bias is not rounded with the product, so the loss is closer to
float64's than torch's), except for a float16 chunk whose product could overflow fp16 (``_fp16_product_fits``), which
adds the bias in the GEMM as ``F.linear`` does: a logit that fits fp16 only after its bias is added stays finite.

float16 with "mean" / "sum" (fp16 training with a GradScaler): the gradient of the logits, which is
rounded to fp16 for the GEMMs, is written at a power-of-two scale that fills fp16's range without
overflow (``_fp16_grad_unit``) rather than at ``1 / active rows``, since the loss scale only
arrives in backward, after that rounding; ``1 / rows``, the scale's inverse and the incoming
gradient are applied in float32, and the three gradients are kept in float32 until backward rounds
them to the inputs' dtypes once (twice the stored bytes of the other dtypes; on the CPU, where no
GEMM sums fp16 operands into float32, both chunk GEMMs run on float32 copies: ``grad_weight``'s fp16
product could overflow, and ``grad_hidden``'s would be rounded twice).

Backends: ``triton`` (CUDA; CPU under TRITON_INTERPRET=1) runs the per-chunk softmax / loss /
gradient-of-logits in a Triton kernel and the GEMMs in cuBLAS; ``cpu`` does the same per-chunk
step with torch ops (a C++ GEMM would only be slower than the BLAS torch already calls);
``reference`` is ``F.linear`` + ``F.cross_entropy`` on the active rows, in float32 math.

Why cuBLAS GEMMs plus a Triton softmax kernel rather than one kernel that recomputes logits tile
by tile (FlashAttention style): the work is three (A x V x D) GEMMs. A fully fused kernel must
recompute the logits once for ``grad_hidden`` and once more for ``grad_weight`` (or use atomics
for one of them), i.e. five GEMM-sized passes through ``tl.dot`` instead of three through cuBLAS,
which on an H100 already runs near peak; the softmax pass is memory-bound and small next to
them. Chunking keeps the memory at O(C * V), which is all the fully fused design would buy.
``grad_weight`` needs no atomics either: each chunk adds one cuBLAS GEMM into an fp32 buffer.

Under ``torch.autocast`` the head runs in the autocast dtype, as ``F.linear`` would: hidden is
cast to it first; float32 weight and bias (master weights) are cast inside the op, and their
gradients come back in float32, summed in float32 over chunks, instead of being rounded to the
autocast dtype and cast back by autograd (two (V, D) copies a step; GPT-2's tied 50257-row head
paid ~8 ms for each on 2 Zen 5 cores).

The ops are registered with ``torch.library.custom_op`` (with fake implementations and an
autograd formula), so ``torch.compile`` traces through them without graph breaks.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dispatch, _native
from . import _validate
from ._validate import FLOAT_DTYPES
from ._validate import acc_dtype as _acc_dtype

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

REDUCTIONS = ("mean", "sum", "none")

# Working-set budget for one chunk of logits (bytes of the (C, V) buffer in the inputs' dtype;
# counted as float32 under the Triton interpreter). Large enough
# that each chunk's GEMM has hundreds of rows (efficient on BLAS and cuBLAS), small enough to
# stay far below the (T, V) logits of a real batch. Tests shrink it to force many chunks.
# CPU: every chunk after the first adds a (V, D) product into the fp32 weight gradient, which for
# half inputs is a widening pass over V x D: at D = 768, V = 30522 (319 MLM rows, bf16) two
# chunks of a 32 MiB budget took 160 ms fwd+bwd, one chunk of 64 MiB 85 ms (2-core Zen 5).
# CUDA: a chunk has at least max(D, GPU_MIN_ROWS) rows (``chunk_rows``). Each chunk after the
# first adds its (V, D) product into the fp32 weight gradient (a bf16 product, then a widening add:
# ~12 bytes of traffic per weight element), against 6 C V D FLOPs of GEMMs per chunk: at H100 rates
# (~700 TFLOP/s, ~3 TB/s) the adds cost ~470 / C of the GEMM time, 23% at C = 2048 rows. At 64 MiB
# a Llama-3 head (T 8192, D 2048, V 128256, bf16) went through in 63 chunks of 130 rows and took
# 116 ms fwd+bwd against 34 ms for torch eager and 35 ms for Liger-Kernel (H100,
# benches/results/gpu-h100-2026-11-26); now 4 chunks of 2048 rows. The logits chunk is then about
# the weight's own size (D >= 2048) or 2048 rows (a GPT-2 head: 206 MB), far below the (T, V)
# logits of the batches that need chunking.
CHUNK_BYTES = {"cpu": 128 << 20, "triton": 64 << 20}
GPU_MIN_ROWS = 2048


def chunk_rows(kind: str, device_type: str, v: int, d: int, dtype: torch.dtype) -> int:
    """Active rows per chunk: ``CHUNK_BYTES[kind]`` of logits (in their dtype on the CPU and on CUDA;
    counted as float32 for the Triton interpreter, whose bf16 path goes through a float32 copy),
    and on CUDA at least ``max(d, GPU_MIN_ROWS)`` rows."""
    per_logit = 4 if kind == "triton" and device_type != "cuda" else dtype.itemsize
    rows = CHUNK_BYTES[kind] // (v * per_logit)
    if device_type == "cuda":
        rows = max(rows, d, GPU_MIN_ROWS)
    return max(1, rows)


# CPU: the chunk's logits go into a buffer each thread keeps between calls (one chunk: at most
# CHUNK_BYTES["cpu"]). A fresh tensor that size is a fresh mmap from glibc:
# the GEMM then pays a page fault per 4 KiB page it first writes (~1 us each here), which made a
# (2048, 128) x (128, 50257) bf16 logits GEMM run at 300 GFLOP/s instead of 830 (2-core Zen 5).
# ``empty_cache()`` gives the buffers back.
_SCRATCH = threading.local()


def _logits_out(kind: str, rows: int, v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A (rows, v) buffer for one chunk's logits: this thread's kept buffer on the CPU, else None
    (a fresh tensor from the device's caching allocator)."""
    if kind != "cpu" or device.type != "cpu":
        return None
    need = rows * v
    buf = getattr(_SCRATCH, "logits", None)
    inference = torch.is_inference_mode_enabled()
    if buf is None or buf.dtype != dtype or buf.numel() < need or buf.is_inference() != inference:
        _SCRATCH.logits = None  # free the old one before allocating its successor
        buf = _SCRATCH.logits = torch.empty(need, dtype=dtype)
    return buf[:need].view(rows, v)


def empty_cache() -> None:
    """Free the chunk buffer the CPU path keeps in the calling thread between calls."""
    _SCRATCH.logits = None


def check_options(ignore_index, reduction, label_smoothing, z_loss) -> tuple[float, float]:
    """Validate the scalar options (also what ``nn.LinearCrossEntropyLoss`` checks when built);
    returns ``(label_smoothing, z_loss)`` as floats. Errors name the option."""
    value = _validate.integer(ignore_index)
    if value is None:
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    ignore_index = value
    if not -2**63 <= ignore_index < 2**63:  # an int64 label value, as the kernels compare it
        raise ValueError(f"ignore_index: expected an int64 value, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    try:
        if isinstance(label_smoothing, (bool, str, bytes)) or isinstance(z_loss, (bool, str, bytes)):
            raise TypeError
        label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    except (TypeError, ValueError):
        raise TypeError(f"label_smoothing / z_loss: expected floats, got {label_smoothing!r}, {z_loss!r}") from None
    if not 0.0 <= label_smoothing <= 1.0:  # also rejects NaN
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss: expected a finite float >= 0, got {z_loss}")
    return label_smoothing, z_loss


def _prepare(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, wide_params=False):
    """Validate the public arguments; return backend inputs (rows flattened) and the labels' shape.
    ``wide_params``: weight and bias may be float32 with half ``hidden`` (autocast's master weights)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden: expected float16, bfloat16, float32 or float64, got dtype {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected shape (..., D) with D >= 1, got {tuple(hidden.shape)}")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight: expected shape (V, D={d}) (D from hidden), got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight: expected at least one class (V >= 1), got V=0")
    v = weight.shape[0]
    named = [("weight", weight)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (v,):
            raise ValueError(f"bias: expected shape (V={v},) (V from weight), got {tuple(bias.shape)}")
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != hidden.dtype and not (wide_params and t.dtype == torch.float32):
            raise TypeError(f"{name}: expected dtype {hidden.dtype} (the dtype of hidden), got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name}: expected a tensor on {hidden.device} (the device of hidden), got {t.device}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels: expected an int64 (or int32) tensor, got dtype {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's shape without D), "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels: expected a tensor on {hidden.device} (the device of hidden), got {labels.device}")
    label_smoothing, z_loss = check_options(ignore_index, reduction, label_smoothing, z_loss)
    inputs = dict(hidden=hidden.reshape(-1, d), weight=weight, bias=bias, labels=labels.reshape(-1).long(),
                  ignore_index=int(ignore_index), reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    return inputs, labels.shape


def _active_rows(labels: torch.Tensor, v: int, ignore_index: int) -> torch.Tensor:
    """Indices of the rows whose label is not ``ignore_index``, after checking those labels are in
    ``[0, v)``, with one device sync for the count and both bounds (``nonzero_static`` then needs
    none; ``nonzero`` plus the range check were two, each draining the GPU's queue)."""
    mask = labels != ignore_index
    if labels.numel() == 0:
        return mask.nonzero().squeeze(1)
    count, lo, hi = torch.stack([mask.sum(), torch.where(mask, labels, v).min(),
                                 torch.where(mask, labels, -1).max()]).tolist()
    _label_bounds_check(lo, hi, v, ignore_index)
    return torch.nonzero_static(mask, size=count).squeeze(1)


def _check_label_range(active_labels: torch.Tensor, v: int, ignore_index: int) -> None:
    if active_labels.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(active_labels)).tolist()  # one device sync for both
    _label_bounds_check(lo, hi, v, ignore_index)


def _label_bounds_check(lo: int, hi: int, v: int, ignore_index: int) -> None:
    """ValueError naming labels when the smallest / largest active label is outside [0, v)."""
    if lo < 0 or hi >= v:
        raise ValueError(f"labels: expected class ids in [0, V={v}) or ignore_index={ignore_index}, "
                         f"found {lo if lo < 0 else hi}")


# ----------------------------------------------------------------------------- reference


def reference(hidden, weight, bias, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              compute_dtype=None):
    """Ground truth: ``F.linear`` + ``F.cross_entropy`` on the non-ignored rows, with plain autograd.

    hidden (N, D), weight (V, D), bias (V,) or None, labels (N,) int64. The math runs in
    ``compute_dtype`` (default float32, float64 for float64 inputs); tests pass the inputs' own
    low-precision dtype to measure what plain PyTorch loses in that dtype. Returns ``(loss, lse)``:
    the reduced loss (or per-row losses, 0 at ignored rows) in float32 (float64 for float64
    inputs) and the per-row log-sum-exp of the logits (0 at ignored rows). The all-ignored
    "mean" is 0, not NaN.
    """
    with _validate.autocast_off(hidden.device.type):  # the math runs in compute_dtype, not autocast's
        return _reference(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, z_loss,
                          compute_dtype)


def _reference(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, z_loss, compute_dtype):
    out_dtype = _acc_dtype(hidden.dtype)
    dt = compute_dtype or out_dtype
    meta = hidden.device.type == "meta"
    # meta tensors hold no labels to select by: every row is kept, which gives the shapes
    keep = (torch.arange(labels.shape[0], device=labels.device) if meta
            else (labels != ignore_index).nonzero().squeeze(1))
    y = labels.index_select(0, keep)
    if not (meta or torch.compiler.is_compiling()):
        _check_label_range(y, weight.shape[0], ignore_index)
    logits = F.linear(hidden.index_select(0, keep).to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    rows = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    lse_rows = torch.logsumexp(logits, dim=-1)
    if z_loss:
        rows = rows + z_loss * lse_rows.square()
    rows = rows.to(out_dtype)
    n = labels.shape[0]
    lse = torch.zeros(n, dtype=out_dtype, device=hidden.device).index_put((keep,), lse_rows.detach().to(out_dtype))
    if reduction == "none":
        return torch.zeros(n, dtype=out_dtype, device=hidden.device).index_put((keep,), rows), lse
    total = rows.sum()
    return (total / max(keep.numel(), 1) if reduction == "mean" else total), lse


# ----------------------------------------------------------------------------- per-chunk step


def _ce_chunk_torch(z, y, scale, smoothing, z_coef, write_grad):
    """Loss and log-sum-exp of the logits chunk ``z`` (C, V); with ``write_grad`` overwrite ``z``
    with ``scale[:, None] * d(loss)/d(z)``. fp32 math for half ``z`` (a (C, V) fp32 copy)."""
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    v = z.shape[1]
    zy = zf.gather(1, y[:, None]).squeeze(1)
    zmean = zf.mean(1) if smoothing else None
    m = zf.amax(1, keepdim=True)
    zf.sub_(m).exp_()  # in place: no second (C, V) buffer
    s = zf.sum(1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    loss = lse - (1.0 - smoothing) * zy
    if smoothing:
        loss = loss - smoothing * zmean
    if z_coef:
        loss = loss + z_coef * lse.square()
    if write_grad:
        scale = scale.to(zf.dtype)
        # d/dz [lse - (1-e) z_y - e mean(z) + c lse^2] = (1 + 2 c lse) softmax - (1-e) onehot - e / V
        zf.mul_((scale * (1.0 + 2.0 * z_coef * lse))[:, None] / s)
        if smoothing:
            zf.sub_((scale * (smoothing / v))[:, None])
        zf.scatter_add_(1, y[:, None], -(scale * (1.0 - smoothing))[:, None])
        if zf is not z:
            z.copy_(zf)
    return loss, lse


if triton is not None:

    @triton.jit
    def _ce_chunk_kernel(z_ptr, stride_z, g_ptr, stride_g, y_ptr, scale_ptr, loss_ptr, lse_ptr, rows, V, smoothing,
                         z_coef, WRITE_GRAD: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_V: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = r < rows
        base = z_ptr + r.to(tl.int64)[:, None] * stride_z
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        zsum = tl.zeros([BLOCK_M], tl.float32)
        # pass 1: online log-sum-exp over V tiles (and the logit sum for label smoothing)
        for v0 in range(0, V, BLOCK_V):
            c = v0 + tl.arange(0, BLOCK_V)
            ok = inside[:, None] & (c < V)[None, :]
            z = tl.load(base + c[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 1))
            # rows past the end (or all -inf) keep m = -inf; shift by 0 there so exp() sees -inf, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
            m = m_new
            if SMOOTH:
                zsum += tl.sum(tl.where(ok, z, 0.0), 1)
        # the unused lanes (rows past the end) get lse = 0 so nothing below computes inf - inf
        lse = tl.where(inside, tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(inside, s, 1.0)), 0.0)
        y = tl.load(y_ptr + r, mask=inside, other=0)
        zy = tl.load(z_ptr + r.to(tl.int64) * stride_z + y, mask=inside, other=0.0).to(tl.float32)
        loss = lse - (1.0 - smoothing) * zy + z_coef * lse * lse
        if SMOOTH:
            loss -= smoothing * zsum / V
        tl.store(loss_ptr + r, loss, mask=inside)
        tl.store(lse_ptr + r, lse, mask=inside)
        if WRITE_GRAD:
            # pass 2: scale * dloss/dz over the logits (g_ptr is z_ptr on GPU), read back while still in L2
            gbase = g_ptr + r.to(tl.int64)[:, None] * stride_g
            sc = tl.load(scale_ptr + r, mask=inside, other=0.0)
            a = sc * (1.0 + 2.0 * z_coef * lse)
            hit = sc * (1.0 - smoothing)
            flat = sc * smoothing / V
            for v0 in range(0, V, BLOCK_V):
                c = v0 + tl.arange(0, BLOCK_V)
                ok = inside[:, None] & (c < V)[None, :]
                z = tl.load(base + c[None, :], mask=ok, other=float("-inf")).to(tl.float32)
                g = a[:, None] * tl.exp(z - lse[:, None]) - flat[:, None]
                g -= tl.where(c[None, :] == y[:, None], hit[:, None], 0.0)
                tl.store(gbase + c[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


def gpu_tiles(v: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, num_warps) of the chunk kernel on a GPU for V classes: one row per program,
    the row streamed in 4K-wide tiles (as in Triton's softmax tutorial), so thousands of programs fill
    the SMs; not autotuned (no GPU was at hand to tune on)."""
    block_v = min(triton.next_power_of_2(v), 4096)
    return 1, block_v, 8 if block_v >= 2048 else 4


def _ce_chunk_triton(z, y, scale, smoothing, z_coef, write_grad):
    """Same contract as ``_ce_chunk_torch``, one Triton launch."""
    c, v = z.shape
    loss = torch.empty(c, dtype=torch.float32, device=z.device)
    lse = torch.empty(c, dtype=torch.float32, device=z.device)
    interpreting = _native.triton_interpreting()
    if interpreting:
        # the interpreter pays per program and per loop step, not per element: few, big tiles
        block_v = min(triton.next_power_of_2(v), 8192)
        block_m = max(1, min(triton.next_power_of_2(c), (1 << 18) // block_v))
        warps = 4
    else:
        block_m, block_v, warps = gpu_tiles(v)
    scale = loss if scale is None else scale.float()  # never read without WRITE_GRAD
    # Triton 3.8's interpreter truncates fp32 -> bf16 stores (the GPU rounds to nearest even), so
    # under it the gradient goes through an fp32 buffer and torch rounds it; on GPU it is in place.
    g = z.new_empty(z.shape, dtype=torch.float32) if write_grad and interpreting and z.dtype == torch.bfloat16 else z
    _ce_chunk_kernel[(triton.cdiv(c, block_m),)](
        z, z.stride(0), g, g.stride(0), y, scale, loss, lse, c, v, smoothing, z_coef,
        WRITE_GRAD=write_grad, SMOOTH=smoothing > 0, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps,
    )
    if g is not z:
        z.copy_(g)
    return loss, lse


def _ce_chunk_cpu(z, y, scale, smoothing, z_coef, write_grad, bias=None, grad_bias=None):
    """Same contract as ``_ce_chunk_torch``, for the logits ``z + bias`` (``bias`` (V,) or None),
    and with ``write_grad`` the gradient's column sums added to ``grad_bias`` ((V,) in the
    accumulation dtype, or None): csrc/cross_entropy_cpu.cpp (one read of each row for its
    statistics, the bias added as it is read, one more read and a write for its gradient, whose
    float32 values are summed per column on the way) where the native core is built and z is
    float32 / float16 / bfloat16; torch ops otherwise (float64, or no native core). The column
    sums in C++ replaced ``z.sum(0, dtype=float32)``, which widened the whole bf16 chunk first
    (~17 ms per 620 x 30522 chunk, 2-core Zen 5)."""
    if z.dtype == torch.float64 or _native.cpu_unavailable() is not None or z.stride(1) != 1:
        if bias is not None:
            z.add_(bias)
        out = _ce_chunk_torch(z, y, scale, smoothing, z_coef, write_grad)
        if write_grad and grad_bias is not None:
            grad_bias.add_(z.sum(0, dtype=grad_bias.dtype))
        return out
    c, v = z.shape
    loss = torch.empty(c, dtype=torch.float32)
    lse = torch.empty(c, dtype=torch.float32)
    y = y.to(torch.int64).contiguous()
    p = _native._C.CEChunkParams()
    p.z, p.rows, p.cols, p.ld, p.dtype = z.data_ptr(), c, v, z.stride(0), _native.dtype_code(z.dtype)
    p.target, p.loss, p.lse = y.data_ptr(), loss.data_ptr(), lse.data_ptr()
    p.smoothing, p.z_coef = float(smoothing), float(z_coef)
    if bias is not None:
        bias = bias.to(z.dtype).contiguous()
        p.bias = bias.data_ptr()
    if write_grad:
        scale = scale.to(torch.float32).contiguous()
        p.grad_scale = scale.data_ptr()
        if grad_bias is not None:
            if grad_bias.dtype != torch.float32 or not grad_bias.is_contiguous():
                raise ValueError(f"grad_bias: expected a contiguous float32 (V,) tensor, got {grad_bias.dtype}")
            p.grad_bias = grad_bias.data_ptr()
    _native._C.ce_chunk_cpu(p, _native.num_threads())
    return loss, lse


_CE_CHUNK = {"cpu": _ce_chunk_cpu, "triton": _ce_chunk_triton}


# ----------------------------------------------------------------------------- chunked driver


# CPU: rows of grad_weight per GEMM of z.T @ hidden. BLAS ran the whole (V, C) x (C, D) product of
# a large vocabulary slower than the same in slices of V: 50257 x 1335 x 256 bf16 at 527 GFLOP/s
# whole, 778 in slices of 4096 (768 wide: 647 -> 888); float32 and V <= 30522 the same either way
# (2-core Zen 5, torch 2.13).
GW_BLOCK = 4096


def _zt_h(kind, z, hc, out=None, add=False):
    """``z.T @ hc`` (V, D) into ``out`` (added to it with ``add``), or a new tensor."""
    if out is None:
        out = z.new_empty((z.shape[1], hc.shape[1]))
    step = GW_BLOCK if kind == "cpu" else z.shape[1]
    for j in range(0, z.shape[1], step):
        zj, oj = z[:, j:j + step].t(), out[j:j + step]
        if add:
            oj.addmm_(zj, hc)
        else:
            torch.mm(zj, hc, out=oj)
    return out


# fp16 gradients of a reduced loss ("mean" / "sum"): the largest value the gradient of the logits
# and grad_hidden's chunk GEMM may reach, 4x below fp16's largest finite 65504 (slack for the
# bounds' own rounding). See ``_fp16_grad_unit``.
FP16_GRAD_TOP = 2.0 ** 14


def _fp16_grad_unit(hidden, active, weight, bias, z_coef, need_h, w_max=None):
    """The power of two ``u`` (a 0-dim float32 tensor on hidden's device: no host sync) at which the
    fp16 gradient of the logits of a reduced loss is written: ``u * dloss_row/dlogits``, the
    gradient of the *sum*, scaled up, instead of ``(1 / a) * dloss_row/dlogits``.

    Why: the chunk step rounds the gradient of the logits to the input dtype, and with "mean" over
    ``a`` rows its entries are ``(1 / a) * softmax``: ~2.4e-9 at a = 4096, V = 8192, below fp16's
    smallest subnormal (6e-8). The upstream gradient (a GradScaler's loss scale) only arrives in
    backward, after that rounding, so loss scaling could not rescue them (grad_weight's never-targeted
    rows came back 97% wrong; torch's F.linear + F.cross_entropy, which scale before rounding, 0.09%).
    1 / a, the upstream gradient and 1 / u are applied in float32 to the float32 gradients at the
    end (``_fused_pass_impl``, ``_backward``), the same idea as the contrastive backwards' gradient
    unit (``_validate.grad_unit``).

    The bound: per row, ``sum_j |dloss/dz_j| <= |1 + 2 c lse| + (1 - eps) + eps <= 2 + 2 c |lse|``
    (softmax sums to 1; ``c`` the z_loss coefficient, ``eps`` the smoothing), which also bounds each
    entry; with z_loss, ``|lse| <= max ||h_r|| * max ||W_j|| + max |b| + log V`` (Cauchy-Schwarz).
    grad_hidden's chunk GEMM (rounded to fp16 where no float32-output GEMM exists) is at most that row
    sum times ``max |W|``. ``u`` is the largest power of two keeping both at most ``FP16_GRAD_TOP``;
    grad_weight and grad_bias are summed in float32 and need no bound. A non-finite bound (NaN / inf
    inputs, whose gradients are NaN anyway) gives u = 1. ``w_max``: ``max |W|`` as a 0-dim float32
    tensor where the caller has it already (``_fp16_product_fits``), else computed here."""
    f32 = torch.float32
    bound = torch.full((), 2.0, dtype=f32, device=hidden.device)
    if z_coef and active.numel():
        h_norm = torch.linalg.vector_norm(hidden.index_select(0, active), dim=1, dtype=f32).amax()
        w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=f32).amax()
        lse = h_norm * w_norm + math.log(weight.shape[0])
        if bias is not None:
            lse = lse + torch.stack(torch.aminmax(bias)).abs().amax().to(f32)
        bound = bound + 2.0 * z_coef * lse
    if need_h:
        w_max = _abs_max(weight) if w_max is None else w_max
        bound = bound * w_max.clamp_min(1.0)
    u = torch.exp2(torch.floor(torch.log2(FP16_GRAD_TOP / bound)))
    return torch.where(torch.isfinite(u) & (u > 0), u, torch.ones_like(u))


def _abs_max(x):
    """``max |x|`` as a 0-dim float32 tensor, from one ``aminmax`` pass (no ``|x|`` copy)."""
    return torch.stack(torch.aminmax(x)).abs().amax().to(torch.float32)


# float16 logits on the CPU with a bias: the product ``h @ W.T`` is rounded to fp16 before the chunk
# step adds the bias (``late_bias`` in ``_fused_pass_impl``), so it must stay below fp16's overflow
# (results of 65520 and up round to inf) even where the bias would bring the logit back into range,
# as F.linear's bias-filled GEMM does. The bound below is 1% under fp16's largest finite 65504: slack
# for the float32 accumulation of the GEMM and of the bound itself.
FP16_PRODUCT_TOP = 0.99 * torch.finfo(torch.float16).max


def _fp16_product_fits(hc, w_max):
    """Whether every entry of the float16 product ``hc @ W.T`` is certainly finite:
    ``max_r ||hc_r||_1 * max |W| < FP16_PRODUCT_TOP`` (Hoelder's inequality: ``|h . w| <= ||h||_1
    max |w|``; the one ``aminmax`` pass over W costs far less than W's row norms for Cauchy-Schwarz:
    1-2 against 18 ms at 30522 x 128 in fp16, 1 thread of a Xeon). False for non-finite inputs. One
    host sync: CPU only."""
    h1 = torch.linalg.vector_norm(hc, ord=1, dim=1, dtype=torch.float32).amax()  # a chunk has rows
    return bool(h1 * w_max < FP16_PRODUCT_TOP)


def _mm_f32(a, b):
    """``a @ b`` of fp16 ``a``, ``b`` as float32: summed into float32 by cuBLAS where torch has that
    (no fp16 rounding of the product), else the fp16 product widened."""
    if a.is_cuda:
        out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
        if _dispatch.addmm_f32_(out, a, b):
            return out
    return torch.mm(a, b).float()


def _fused_pass(kind, hidden, weight, bias, labels, ignore_index, smoothing, z_coef, grad_scale, need_h, need_w,
                need_b):
    """Loss and (optionally) gradients over the active rows, ``CHUNK_BYTES[kind]`` of logits at a time.

    grad_scale: None (no gradients), "mean" (1 / active rows), "sum" (1) or a per-row (N,) tensor.
    Returns per-row losses (N,), per-row lse (N,), the active row count, grad_hidden (N, D) in the
    dtype of hidden, grad_weight (V, D) and grad_bias (V,) in the dtype of weight (or None); for
    float16 hidden with "mean" / "sum" all three in float32 (``_fp16_grad_unit``: the caller rounds
    them to the inputs' dtypes once, after applying the upstream gradient).
    """
    with _validate.autocast_off(hidden.device.type):  # the dtypes below are chosen, not autocast's
        return _fused_pass_impl(kind, hidden, weight, bias, labels, ignore_index, smoothing, z_coef, grad_scale,
                                need_h, need_w, need_b)


def _fused_pass_impl(kind, hidden, weight, bias, labels, ignore_index, smoothing, z_coef, grad_scale, need_h,
                     need_w, need_b):
    n, d = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    active = _active_rows(labels, v, ignore_index)
    a = active.numel()
    y_all = labels.index_select(0, active)
    losses = torch.zeros(n, dtype=acc, device=hidden.device)
    lses = torch.zeros(n, dtype=acc, device=hidden.device)
    grads = grad_scale is not None
    need_h, need_w, need_b = grads and need_h, grads and need_w, grads and need_b and bias is not None
    # float16 and a reduced loss: the gradient of the logits at the power of two ``unit`` (a 0-dim
    # tensor) instead of 1 / a, all three gradients in float32, 1 / a and 1 / unit applied at the end
    fp16 = grads and hidden.dtype == torch.float16 and not isinstance(grad_scale, torch.Tensor)
    unit = None
    gh = (torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if fp16 else torch.zeros_like(hidden)) \
        if need_h else None
    gb = torch.zeros(v, dtype=acc, device=hidden.device) if need_b else None
    # float32 master weights with half hidden states (autocast): the products run in hidden's dtype,
    # the gradients come back in the parameters' own dtypes, summed in float32 and never rounded
    # to the half dtype (autocast's cast outside the op would round them and copy them twice)
    param_dtypes = weight.dtype, None if bias is None else bias.dtype
    weight = weight.to(hidden.dtype)
    bias = None if bias is None else bias.to(hidden.dtype)
    # CPU, half inputs: the chunk step adds the bias as it widens each row; a bf16 GEMM into a
    # bias-filled output (addmm) took 10.3 ms per 620 x 128 x 30522 chunk, the plain product 6.5
    # (BERT MLM head, 4096 rows 15% active, fwd+bwd: 50.4 -> 44.6 ms at D 128, 154.9 -> 149.4 at
    # 768; 2-core Zen 5), and the logits are more accurate (the bias is not rounded with the product).
    # float32 addmm costs nothing extra, so float32 keeps it. float16 adds the bias late too (that
    # chunk's product 37 ms, 59 with the bias; 1 thread of a Xeon), except in a chunk whose product
    # could overflow fp16 (``_fp16_product_fits``): there the bias goes into the GEMM, as in F.linear,
    # so a logit that fits fp16 only after its bias is added (h . w = 8e4, b = -5e4: torch's loss
    # 9.61) is right instead of NaN (inf + b). bfloat16 has float32's exponent range: only float16 needs this.
    late_bias = bias is not None and kind == "cpu" and hidden.dtype in (torch.float16, torch.bfloat16)
    w_max = _abs_max(weight) if hidden.dtype == torch.float16 and (late_bias or fp16 and need_h) else None
    if isinstance(grad_scale, torch.Tensor):
        scale_all = grad_scale.to(acc).index_select(0, active)
    elif fp16:
        unit = _fp16_grad_unit(hidden, active, weight, bias, z_coef, need_h, w_max)
        scale_all = unit.to(acc).expand(a).contiguous()
    elif grads:
        scale_all = torch.full((a,), 1.0 / max(a, 1) if grad_scale == "mean" else 1.0, dtype=acc,
                               device=hidden.device)
    wt = weight.t()
    # float16 grad_hidden off CUDA (no float32-output GEMM there): its chunk products in float32, from one
    # float32 copy of the weight per pass, so the gradient is rounded once, at the end
    w32 = weight.float() if fp16 and need_h and not hidden.is_cuda else None
    low = hidden.dtype in (torch.float16, torch.bfloat16)
    gw = gw_part = None  # (V, D): the weight gradient; a half-precision chunk product
    ce = _CE_CHUNK[kind]
    step = chunk_rows(kind, hidden.device.type, v, d, hidden.dtype)
    several = a > step
    for s in range(0, a, step):
        idx = active[s:s + step]
        y = y_all[s:s + step]
        hc = hidden.index_select(0, idx)
        out = _logits_out(kind, idx.numel(), v, hidden.dtype, hidden.device)
        late = late_bias and (w_max is None or _fp16_product_fits(hc, w_max))
        if bias is None or late:
            z = torch.mm(hc, wt) if out is None else torch.mm(hc, wt, out=out)
        else:
            z = torch.addmm(bias, hc, wt) if out is None else torch.addmm(bias, hc, wt, out=out)
        loss, lse = ce(z, y, scale_all[s:s + step] if grads else None, smoothing, z_coef, grads,
                       **({"bias": bias if late else None, "grad_bias": gb} if kind == "cpu" else {}))
        losses.index_copy_(0, idx, loss.to(acc))
        lses.index_copy_(0, idx, lse.to(acc))
        if grads:  # z now holds scale * dloss/dlogits for the chunk
            zf = None  # float16 off CUDA: the chunk's gradient in float32, for both products
            if need_h:
                if w32 is not None:  # one rounding (backward's), as torch's fp16 path: not the product's too
                    zf = z.float()
                    gh.index_copy_(0, idx, zf @ w32)
                else:
                    gh.index_copy_(0, idx, _mm_f32(z, weight) if fp16 else z @ weight)
            if need_w:
                if fp16:  # float16: summed in float32, by cuBLAS or from a float32 copy
                    if gw is None and hidden.is_cuda:
                        gw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
                    if gw is None or not _dispatch.addmm_f32_(gw, z.t(), hc):
                        # the fp16 product of the scaled gradient could overflow (a column's sum over
                        # the chunk's rows is bounded by the row count only): float32 operands here
                        zf = z.float() if zf is None else zf
                        gw = _zt_h(kind, zf, hc.float()) if gw is None else _zt_h(kind, zf, hc.float(), out=gw,
                                                                                   add=True)
                elif gw is None and not (low and several):
                    gw = _zt_h(kind, z, hc)  # the first (or only) chunk: no zero-filled (V, D) buffer
                elif not low:
                    _zt_h(kind, z, hc, out=gw, add=True)
                else:  # half inputs over several chunks: the chunk products are summed in fp32
                    if gw is None and hidden.is_cuda:  # where addmm_f32_ can sum into it
                        gw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
                    if gw is None or not _dispatch.addmm_f32_(gw, z.t(), hc):  # CUDA: summed by the GEMM
                        gw_part = _zt_h(kind, z, hc, out=gw_part)
                        gw = gw_part.float() if gw is None else gw.add_(gw_part)
            if need_b and kind != "cpu":  # the CPU step summed its gradient's columns into gb
                gb.add_(z.sum(0, dtype=acc))
            del zf
        del z, hc, out  # before the next chunk's GEMM allocates: one (C, V) buffer alive, not two
    del gw_part  # before the cast below allocates the weight-dtype gradient
    if fp16:  # float32 gradients of the reduced loss: 1 / a and 1 / unit applied here
        factor = (1.0 / max(a, 1) if grad_scale == "mean" else 1.0) / unit
        if need_w and gw is None:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
        for g in (gh, gw, gb):
            if g is not None:
                g.mul_(factor)
        return losses, lses, a, gh, gw, gb
    if need_w:
        gw = torch.zeros_like(weight, dtype=param_dtypes[0]) if gw is None else gw.to(param_dtypes[0])
    return losses, lses, a, gh, gw, None if gb is None else gb.to(param_dtypes[1])


# ----------------------------------------------------------------------------- custom ops + autograd


def _reduce(losses, a, reduction):
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / max(a, 1) if reduction == "mean" else total


def _empty(like):
    return like.new_empty(0)


@torch.library.custom_op("fastpt::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
            ignore_index: int, label_smoothing: float, z_loss: float, reduction: str, backend: str,
            need_h: bool, need_w: bool, need_b: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, grad_hidden, grad_weight, grad_bias); the gradients are for a unit upstream
    gradient and empty when not needed, or when ``reduction="none"`` (formed in backward); float32
    for float16 hidden (``_fp16_grad_unit``). ``need_*`` must name every input that requires grad:
    backward raises for one that autograd needs and the forward skipped."""
    grad_scale = reduction if reduction != "none" and (need_h or need_w or need_b) else None
    losses, lse, a, gh, gw, gb = _fused_pass(backend, hidden, weight, bias, labels, ignore_index, label_smoothing,
                                             z_loss, grad_scale, need_h, need_w, need_b)
    return (_reduce(losses, a, reduction), lse, _empty(hidden) if gh is None else gh,
            _empty(weight) if gw is None else gw, _empty(weight) if gb is None else gb)


@_lce_op.register_fake
def _lce_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, reduction, backend,
              need_h, need_w, need_b):
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    early = reduction != "none"
    fp16 = early and hidden.dtype == torch.float16  # stored in float32 (``_fp16_grad_unit``), rounded in backward
    need_b = need_b and bias is not None

    def grad(like, shape, need, dtype):
        return like.new_empty(shape if early and need else (0,), dtype=torch.float32 if fp16 and need else dtype)
    return (hidden.new_empty((n,) if reduction == "none" else (), dtype=acc), hidden.new_empty(n, dtype=acc),
            grad(hidden, hidden.shape, need_h, hidden.dtype), grad(weight, weight.shape, need_w, weight.dtype),
            grad(weight, (weight.shape[0],), need_b, weight.dtype if not need_b else bias.dtype))


@torch.library.custom_op("fastpt::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                     z_loss: float, backend: str, need_h: bool, need_w: bool, need_b: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_rows * per_row_loss)``: the logits recomputed chunk by chunk."""
    _, _, _, gh, gw, gb = _fused_pass(backend, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                                      grad_rows, need_h, need_w, need_b)
    return (_empty(hidden) if gh is None else gh, _empty(weight) if gw is None else gw,
            _empty(weight) if gb is None else gb)


@_lce_backward_op.register_fake
def _lce_backward_fake(grad_rows, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, backend,
                       need_h, need_w, need_b):
    return (hidden.new_empty(hidden.shape if need_h else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty((weight.shape[0],) if need_b and bias is not None else (0,),
                             dtype=weight.dtype if bias is None else bias.dtype))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, smoothing, z_loss, reduction, backend, need_h, need_w, need_b = inputs
    ctx.reduction = reduction
    ctx.need = (need_h, need_w, need_b and bias is not None)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.spent = False  # the stored gradients were handed out (see _backward)
    # Otherwise autograd hands backward zero-filled gradients for the unused outputs, among them
    # a (V, D) one for grad_weight: as much memory again as the gradient itself.
    ctx.set_materialize_grads(False)
    if reduction == "none":
        ctx.args = (ignore_index, smoothing, z_loss, backend)
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:
        ctx.save_for_backward(*output[2:])


_INPUTS = ("hidden", "weight", "bias")


def _backward(ctx, g_loss, g_lse, g_gh, g_gw, g_gb):
    # lse and the stored gradients are auxiliary outputs: only the loss carries a gradient
    if g_loss is None:  # the loss itself was not used
        if any(g is not None for g in (g_gh, g_gw, g_gb)):  # a gradient of the gradients: double backward
            _no_double_backward()
        return (None,) * 12
    wanted = tuple(ctx.needs_input_grad[:3])
    if ctx.reduction == "none":  # computed here: whatever autograd asks for
        hidden, weight, bias, labels = ctx.saved_tensors
        need = tuple(bool(c or w) for c, w in zip(ctx.need, wanted))
        need = need[:2] + (need[2] and bias is not None,)
        gh, gw, gb = _lce_backward_op(g_loss, hidden, weight, bias, labels, *ctx.args, *need)
        return tuple(g if n else None for g, n in zip((gh, gw, gb), need)) + (None,) * 9
    # "mean" / "sum": the forward computed the gradients of the inputs that required grad when it ran
    missing = [name for name, w, c in zip(_INPUTS, wanted, ctx.need) if w and not c]
    if missing:
        raise RuntimeError(
            f"linear_cross_entropy: autograd needs the gradient of {' and '.join(missing)}, which the fused "
            f"forward did not compute: {'/'.join(missing)}.requires_grad read False when it ran (the wrapped "
            "tensors of a torch.func transform such as vmap hide it); run it with backend='reference' there")
    # Eager: scaled in place, since a copy would double the weight-sized memory at the peak
    # (Liger does the same; float16's float32 gradients are scaled in place, then rounded once).
    # A second backward through this node (retain_graph=True) would find them scaled already: it
    # raises (below) rather than autograd's misleading "modified by an inplace operation".
    # Traced (torch.compile, or the functional tensors of AOT tracing): out of place, as graph
    # partitioning cannot handle the mutation of a saved forward output.
    eager = type(g_loss) is torch.Tensor and not torch.compiler.is_compiling()
    if eager:
        if ctx.spent:
            _no_second_backward()
        ctx.spent = True
    return tuple(((g.mul_(g_loss) if eager else g * g_loss).to(dt)) if need else None
                 for g, need, dt in zip(ctx.saved_tensors, ctx.need, ctx.dtypes)) + (None,) * 9


def _no_second_backward():
    raise RuntimeError(
        "linear_cross_entropy: a second backward through the same loss (retain_graph=True and another "
        "backward / autograd.grad, or torch.autograd.gradcheck) is not supported by the fused backends with "
        "reduction='mean' or 'sum': they compute the gradients in the forward and the first backward hands them "
        "out, scaled in place (a copy would double the weight-sized memory). Use reduction='none' (and reduce "
        "the per-row losses yourself: its backward recomputes) or backend='reference'")


def _no_double_backward(*_):
    raise RuntimeError("linear_cross_entropy: the fused backends have no double backward (create_graph=True through "
                       "their gradients, e.g. a gradient penalty); use backend='reference'")


_lce_op.register_autograd(_backward, setup_context=_setup_context)
_lce_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _fused(kind):
    def run(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, z_loss):
        on = torch.is_grad_enabled()
        need_b = on and bias is not None and bias.requires_grad
        loss, lse, *_ = _lce_op(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, reduction, kind,
                                on and hidden.requires_grad, on and weight.requires_grad, need_b)
        return loss, lse
    return run


# ----------------------------------------------------------------------------- dispatch


def _reference_run(hidden, weight, bias, **kw):
    """``reference`` with float32 master weights (autocast) cast to hidden's dtype first, with
    autograd, as F.linear under autocast would."""
    weight = weight.to(hidden.dtype)
    return reference(hidden, weight, None if bias is None else bias.to(hidden.dtype), **kw)


def _cpu_supports(hidden, **_):
    return None if hidden.device.type == "cpu" else f"needs cpu tensors, got {hidden.device.type}"


def _triton_supports(hidden, **_):
    why = _dispatch.triton_device_refusal(hidden.device)
    if why is not None:
        return why
    if hidden.dtype == torch.float64:
        return "float64 is not supported (fp32 softmax); use cpu or reference"
    return None


def _probe(device):
    return _prepare(torch.randn(4, 8, device=device), torch.randn(16, 8, device=device),
                    torch.tensor([1, -100, 3, 15], device=device), None, -100, "mean", 0.0, 0.0)[0]


OP = _dispatch.Op("linear_cross_entropy", [
    # The cpu backend is torch + BLAS, not fastpt._C, so it is always available.
    _dispatch.Backend("cpu", lambda: None, _cpu_supports, _fused("cpu")),
    _dispatch.backend("triton", _triton_supports, _fused("triton")),
    _dispatch.backend("reference", lambda **_: None, _reference_run),
], probe=_probe)


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """``(rows (N, D), their labels (N,))``: the rows of ``hidden`` ``(..., D)`` whose label in
    ``labels`` ``(...)`` is not ``ignore_index``, for a head that should run on those rows only (the
    MLM head's transform). One ``nonzero`` (a device sync on a GPU) and ``index_select``, whose
    backward is an ``index_add``: boolean indexing would read the mask on the host twice here and
    once more in the backward."""
    labels = labels.to(hidden.device).reshape(-1)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), labels.index_select(0, rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, return_lse: bool = False,
                         backend: str | None = None):
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits.

    Args:
        hidden: ``(..., D)`` float16, bfloat16, float32 (or float64: cpu and reference backends).
        weight: ``(V, D)``, same dtype and device as ``hidden`` (e.g. the tied embedding matrix).
        labels: int64 (or int32) ``(...)``, the shape of ``hidden`` without ``D``; class ids in
            ``[0, V)`` or ``ignore_index``. Ignored rows are never read.
        bias: optional ``(V,)``, same dtype and device.
        ignore_index: label value of rows that contribute nothing (default -100, as in torch).
        reduction: "mean" over non-ignored rows (0, with zero gradients, when every row is
            ignored; torch returns NaN there), "sum", or "none" (per-row losses shaped like
            ``labels``, 0 at ignored rows).
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        z_loss: coefficient of the PaLM auxiliary loss ``z_loss * logsumexp(logits)**2`` added to
            each non-ignored row's loss (0 disables it).
        return_lse: also return the per-row log-sum-exp of the logits (shaped like ``labels``,
            0 at ignored rows), detached: for logging; train on it through ``z_loss``.
        backend: None (fastest that fits), "cpu", "triton" or "reference".

    Returns:
        The loss, float32 (float64 for float64 inputs): a scalar, or shaped like ``labels`` for
        ``reduction="none"``; with ``return_lse`` a tuple ``(loss, lse)``. Differentiable with
        respect to ``hidden``, ``weight`` and ``bias`` (no double backward on the fused backends).
        When any of them requires grad, the fused backends compute the gradients in this call and
        backward only scales them, in place: a "mean" / "sum" loss of theirs takes one backward (a
        second through the same graph, as after ``retain_graph=True`` or ``autograd.grad``, or in
        ``torch.autograd.gradcheck``, raises a RuntimeError); ``reduction="none"`` (reduce it
        yourself) recomputes in each backward, and ``backend="reference"`` is plain autograd.
        Under ``torch.func`` transforms (vmap, grad, ...) ``backend=None`` runs the reference
        (plain autograd), as every fastpt op does (``_dispatch.transforms_active``).

    Under ``torch.autocast`` (on the tensors' device type) the head runs in the autocast dtype, as
    ``F.linear`` would: hidden is cast to it, and float32 weight and bias are cast inside the op,
    whose gradients for them come back in float32, summed in float32 (not rounded to the autocast
    dtype and cast back, as autograd would do for a cast outside).

    float16 under loss scaling (a GradScaler's ``scaler.scale(loss).backward()``): the gradients
    are as accurate as torch's fp16 ``F.linear`` + ``F.cross_entropy`` (the small softmax terms are
    not rounded at ``1 / rows`` before the loss scale arrives; module docstring, Numerics).
    Meta tensors give meta outputs of the right shapes (the reference backend infers them).

    NaN / inf: a non-finite value in a non-ignored row's hidden state makes that row's loss (and,
    through the reduction, the loss and the gradients) NaN, as in torch. Ignored rows are not
    read, so NaN there does not propagate (torch's dense F.linear would spread it into
    ``grad_weight``). A NaN weight makes every active row NaN. An inf weight affects only the rows
    whose logit it makes non-finite, as in torch: a +inf logit (or ``0 * inf``, NaN) makes the row
    NaN, a -inf logit makes the loss inf where it is the row's label (or with label smoothing) and
    otherwise just drops out of the softmax. grad_hidden is non-finite in every active row either
    way (the gradient of the logits meets the inf in grad_hidden's product).

    Raises:
        TypeError / ValueError naming the argument for wrong types, dtypes, shapes or devices,
        labels outside ``[0, V)`` that are not ``ignore_index``, a bad reduction, label_smoothing
        outside [0, 1] or a negative z_loss; ``BackendError`` if the forced backend cannot serve.
    """
    # float64 is left alone under autocast, as torch's autocast leaves it; so are meta tensors
    # (autocast has no meta device type: shape inference sees the dtypes as they are)
    wide = (isinstance(hidden, torch.Tensor) and _validate.autocast_known(hidden.device.type)
            and torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != torch.float64)
    if wide:
        # what F.linear does under autocast: the projection runs in the autocast dtype. float32
        # weight and bias go in as they are: the op casts them and returns their gradients in
        # float32 (``_fused_pass_impl``); the reference backend casts them with autograd
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden = hidden.to(dt) if hidden.is_floating_point() else hidden
        weight, bias = (x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point()
                        and (x.dtype != torch.float32 or dt == torch.float32) else x for x in (weight, bias))
    inputs, shape = _prepare(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss,
                             wide_params=wide)
    loss, lse = OP(backend, **inputs)
    if reduction == "none":
        loss = loss.reshape(shape)
    return (loss, lse.detach().reshape(shape)) if return_lse else loss
