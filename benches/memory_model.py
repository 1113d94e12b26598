"""Device memory of the contrastive losses, modelled on a machine without a GPU.

    TRITON_INTERPRET=1 python benches/memory_model.py [--n 512] [--d 256] [--chunk 16384]

What a CUDA run's ``torch.cuda.max_memory_allocated`` measures is the peak of the torch tensors alive
at once. This script replays one bf16 forward + backward per provider on the CPU (the Triton kernels
under the interpreter) and tracks every tensor the torch ops return (a ``TorchDispatchMode``, also
inside fastpt's custom ops, whose Python bodies it runs under the mode) until its storage is freed.
Not counted: the inputs (held before the call, as in the GPU bench) and the Triton interpreter's own
host copies of kernel arguments (a GPU has none). The output is the peak in MiB and in units of one
bf16 (N, D) tensor, with the largest tensors alive at that peak: it shows which buffers scale with
N x D or N x N, which is what the GPU bench's memory ratios at N = 16384 follow.

``--chunk`` sets ``contrastive.CHUNK_ELEMENTS`` (the row chunks of the torch-side O(N * D) work) so
that a small N takes several chunks, as N = 16384 does with the default 2**20. The ``blas`` backend
(dispatched on CUDA only) is run here on CPU tensors with its fused Triton chunk kernels, its score
chunks scaled with N: N / 16 rows, as its 64 MiB chunks are at N = 16384.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import traceback
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


MODE = None  # the LiveTensors mode of the running case


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the tensor storages created under the mode and still referenced."""

    def __init__(self, held=()):
        super().__init__()
        self.live = {t.untyped_storage().data_ptr(): 0 for t in held}  # counted as already there
        self.desc: dict = {}
        self.cur = self.peak = 0
        self.at_peak: list = []

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if key in self.live or n == 0:
            return
        self.live[key] = n
        self.desc[key] = (str(t.dtype).replace("torch.", ""), tuple(t.shape), n)
        self.cur += n
        if self.cur > self.peak:
            self.peak = self.cur
            self.at_peak = sorted((self.desc[k] for k in self.live if k in self.desc), key=lambda x: -x[2])

        def gone(k=key, n=n):
            if self.live.pop(k, None) is not None:
                self.cur -= n
        weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = None
        if func.namespace == "fastpt":  # a custom op: run its Python body under the mode to see inside it
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(f"fastpt::{func._opname}")
            body = getattr(opdef, "_init_fn", None)
        if body is not None:
            with self:
                out = body(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if any("triton/runtime/interpreter" in f.filename for f in traceback.extract_stack(limit=40)):
            return out  # the interpreter's host copies of kernel arguments
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16384, help="contrastive.CHUNK_ELEMENTS for the run")
    args = ap.parse_args()
    from fastpt.ops import clip_loss, contrastive, contrastive_blas, info_nce

    contrastive.CHUNK_ELEMENTS = args.chunk
    n, d = args.n, args.d
    # blas on CPU tensors, as on CUDA: fused chunk kernels, chunks of N / 16 rows
    contrastive.OP.backends["blas"] = dataclasses.replace(contrastive.OP.backends["blas"], available=lambda: None,
                                                         supports=lambda **_: None)
    contrastive_blas.CHUNK_BYTES = 4 * n * max(1, n // 16)
    fused = contrastive_blas._fused
    contrastive_blas._fused = lambda q, f: True if f is None else fused(q, f)
    mm = contrastive_blas._mm

    def cuda_like_mm(a, b):
        """On CUDA a half product writes float32 directly (torch.mm out_dtype); the CPU upcasts both
        operands first. Only the product is counted."""
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            out = mm(a, b)
        if MODE is not None:
            MODE._add(out)
        return out
    contrastive_blas._mm = cuda_like_mm
    t = 0.07
    cases = {
        "torch eager InfoNCE (cross_entropy(q @ k.T / t))": lambda q, k, s: F.cross_entropy(q @ k.T / t, torch.arange(n)),
        "fastpt info_nce, triton": lambda q, k, s: info_nce(q, k, temperature=t, backend="triton"),
        "fastpt info_nce, cpu (chunked torch epilogue)": lambda q, k, s: info_nce(q, k, temperature=t, backend="cpu"),
        "fastpt info_nce, blas (chunks of N / 16 rows)": lambda q, k, s: info_nce(q, k, temperature=t, backend="blas"),
        "fastpt info_nce with labels (SupCon, 16 classes), triton": lambda q, k, s: info_nce(
            q, k, temperature=t, labels=torch.arange(n) % 16, backend="triton"),
        "torch eager CLIP (normalize=False)": lambda q, k, s: (lambda lg: (F.cross_entropy(lg, torch.arange(n))
                                                                          + F.cross_entropy(lg.T, torch.arange(n))) / 2)(
            s.exp().clamp(max=100) * q @ k.T),
        "fastpt clip_loss normalize=False, triton": lambda q, k, s: clip_loss(q, k, s, normalize=False, backend="triton"),
        "fastpt clip_loss normalize=True, triton": lambda q, k, s: clip_loss(q, k, s, backend="triton"),
        "fastpt clip_loss normalize=False, blas": lambda q, k, s: clip_loss(q, k, s, normalize=False, backend="blas"),
    }
    unit = n * d * 2
    print(f"N = {n}, D = {d}, bf16; unit = one bf16 (N, D) tensor = {unit / 2**20:.3f} MiB; "
          f"CHUNK_ELEMENTS = {args.chunk}\n")
    print("| provider | peak MiB | peak / unit | largest tensors alive at the peak |")
    print("|---|---|---|---|")
    for name, fn in cases.items():
        g = torch.Generator().manual_seed(0)
        q, k = (F.normalize(torch.randn(n, d, generator=g), dim=1).bfloat16().requires_grad_() for _ in range(2))
        s = torch.tensor(math.log(1 / t), requires_grad=True)
        global MODE
        with LiveTensors([q, k, s]) as mode:
            MODE = mode
            fn(q, k, s).backward()
        MODE = None
        top = ", ".join(f"{dt} {tuple(shape)}" for dt, shape, nb in mode.at_peak if nb >= unit // 8)
        print(f"| {name} | {mode.peak / 2**20:.2f} | {mode.peak / unit:.2f} | {top} |")


if __name__ == "__main__":
    main()
