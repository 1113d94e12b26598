"""fastpt: assemble-on-demand pre-training with fused Triton and CUDA C++ kernels."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fastpt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from . import data, models, nn, objectives, ops  # noqa: E402
from . import assemble  # noqa: E402  (registers the builder PretrainModel.from_pretrained uses)
from ._dispatch import BackendError  # noqa: E402
from ._info import info  # noqa: E402
from .assemble import build, from_hf, list_configs, load_config, to_hf  # noqa: E402
from .models import PretrainModel  # noqa: E402
from .models.patch_hf import patch_hf, unpatch_hf  # noqa: E402

__all__ = ["__version__", "ops", "nn", "data", "models", "objectives", "assemble", "info", "BackendError",
           "patch_hf", "unpatch_hf", "build", "from_hf", "to_hf", "list_configs", "load_config", "PretrainModel"]
