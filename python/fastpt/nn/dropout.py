"""``Dropout``: a drop-in ``torch.nn.Dropout`` that runs fastpt's counter-based C++ dropout on the CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native
from ..ops.dropout import dropout


class Dropout(nn.Dropout):
    """``torch.nn.Dropout(p, inplace)`` (a subclass: same constructor, checks, repr, no state).

    In training mode, on CPU floating tensors with ``0 < p < 1``, it calls ``fastpt.ops.dropout``
    with a seed drawn from torch's default generator (``torch.manual_seed`` reproduces the masks,
    and a checkpoint that restores torch's RNG state replays them). torch's CPU dropout measured
    5-7 ms on a (4096, 256) float32 or bfloat16 tensor against 0.25-0.35 ms for that one pass
    (2-core Zen 5, ``benches/results/dropout-cpu.md``): ~49 ms of a bert-mini MLM step went to its
    9 hidden dropouts. The masks differ from torch's (another generator); the statistics match.

    Under ``torch.compile`` on the CPU the seed is drawn inside the graph and the same C++ kernel
    runs through its custom op: no graph break, and faster than Inductor's own CPU dropout (a
    compiled bert-tiny MLM step, 32 x 128, dropout 0.1, 2-core Zen 5: 125 -> 109 ms in bf16,
    226 -> 202 ms in float32).

    Everything else is ``F.dropout``: other devices (torch's fused CUDA dropout stays until a GPU
    kernel is measured against it; under compile Inductor fuses it into its neighbours), ``p`` of
    0 or 1, eval mode and a build without ``fastpt._C``. ``inplace=True`` is honoured by copying
    the result into the input.

    Under a ``torch.func`` transform (``grad``, ``vmap``, ``functional_call`` + ``grad``, ``jacrev``)
    it runs the counter-based formula in plain torch ops (the op's reference backend: the C++
    kernel's custom op has no functorch rule), seeded by ``torch.randint``, so torch's randomness
    rules apply: ``vmap(randomness="different")`` gives each sample its own mask, ``"same"`` one
    shared mask, the default ``"error"`` raises torch's error (as for ``torch.nn.Dropout``). Under
    ``torch.func.grad`` the masks are the ones eager autograd would see after the same
    ``torch.manual_seed`` (the same draw, the same formula).

    ``torch.jit.script`` compiles it as ``torch.nn.Dropout`` (``F.dropout``, torch's generator):
    TorchScript cannot call the Python wrapper of the C++ kernel, so the fast path is left out of
    the scripted module (``torch.jit.unused``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.dropout(x, self.p, self.training, self.inplace)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or not x.is_floating_point()
                or _native.cpu_unavailable() is not None):
            return F.dropout(x, self.p, self.training, self.inplace)
        out = dropout(x, self.p, training=True)
        return x.copy_(out) if self.inplace else out
