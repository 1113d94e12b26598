"""Two towers, one per modality (CLIP): a text ``TextEncoder`` and a vision ``VisionEncoder`` side by
side, and their typed builder ``two_tower``. The towers share nothing; the objective
(``fastpt.objectives.CLIP``) holds the projections into the joint space and reads ``.text`` /
``.vision`` directly."""
from __future__ import annotations

import torch
from torch import nn

from .encoder import text_encoder
from .outputs import TwoTowerOutput
from .vision import vit


class TwoTower(nn.Module):
    """A text tower and a vision tower.

    Args:
        text: a ``TextEncoder``; vision: a ``VisionEncoder``.
        config: the dict it was built from (kept as ``.config``).

    Attributes: text, vision, config, gradient_checkpointing (setting it sets both towers').
    """

    def __init__(self, text: nn.Module, vision: nn.Module, *, config: dict | None = None):
        super().__init__()
        self.text = text
        self.vision = vision
        self.config = dict(config or {})

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.text, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.text.gradient_checkpointing = bool(value)
        self.vision.gradient_checkpointing = bool(value)

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` each tower in place (``nn.Module.compile``'s arguments). Objectives call
        the towers directly (CLIP encodes text and images separately), never this module's
        ``forward``, so compiling this module itself, as ``train.compile`` does to a backbone,
        would compile nothing that runs."""
        self.text.compile(*args, **kwargs)
        self.vision.compile(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **text_kwargs) -> TwoTowerOutput:
        """input_ids / attention_mask ``(B, S)`` for the text tower (``text_kwargs`` passed on to it),
        pixel_values ``(B, C, H, W)`` for the vision tower; either may be None. Returns
        ``TwoTowerOutput(text, vision)``, each a ``BackboneOutput`` or None."""
        if input_ids is None and pixel_values is None:
            raise ValueError("input_ids, pixel_values: give at least one (text and / or images)")
        text = self.text(input_ids, attention_mask, **text_kwargs) if input_ids is not None else None
        vision = self.vision(pixel_values) if pixel_values is not None else None
        return TwoTowerOutput(text=text, vision=vision)


def _tower(name: str, kwargs, builder) -> dict:
    if not isinstance(kwargs, dict):
        raise TypeError(f"{name}: expected a dict of {builder.__name__} arguments, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    given = kwargs.pop("builder", builder.__name__)
    if given != builder.__name__:
        raise ValueError(f"{name}.builder: the {name} tower is built by {builder.__name__!r}, got {given!r}")
    return kwargs


def two_tower(*, text: dict, vision: dict) -> TwoTower:
    """Build CLIP's two towers from flat argument dicts (the YAML zoo names this function).

    Args:
        text: ``text_encoder`` arguments (e.g. CLIP's causal text transformer: ``causal=True``,
            ``pre_norm=True``, ``max_positions=77``); an optional ``builder: text_encoder`` key.
        vision: ``vit`` arguments; an optional ``builder: vit`` key.

    Returns a ``TwoTower`` whose ``.config`` is ``{"builder": "two_tower", "text": text tower's
    config, "vision": vision tower's config}``. Raises TypeError / ValueError naming the argument.
    """
    t = text_encoder(**_tower("text", text, text_encoder))
    v = vit(**_tower("vision", vision, vit))
    return TwoTower(t, v, config={"builder": "two_tower", "text": dict(t.config), "vision": dict(v.config)})

