"""Self-distillation for further pre-training (Lee et al., 2023), with MLM as the masked objective.

The recipe: (1) further pre-train the initial model on the target corpus (plain MLM) -> teacher;
(2) start again from the *initial* model (the student) and train it with MLM while its hidden
states are pulled towards the frozen teacher's::

    loss = mlm(student) + alpha * mean over layers l of MSE(h_l(student), stopgrad(h_l(teacher)))

the MSE averaged over the valid (non-padding) tokens and the hidden dimension. ``distill_inputs``
picks what both models encode for the distillation term: "masked" (the MLM inputs, one student
pass) or "clean" (the unmasked ids, as the paper's ``f(x)``, one more student pass).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..models.hf import _load_into
from ..models.model import restoring_checkpoint
from .base import (TEXT_BATCH, Objective, ObjectiveOutput, choice, encode_text, frozen_copy, positive,
                   refuse_prefix_lens, require, upcast)
from .mlm import MLM


def load_state(source) -> dict:
    """A state dict from a dict, a ``.safetensors`` file or a directory holding ``model.safetensors``;
    a common ``backbone.`` prefix is stripped (a ``PretrainModel`` checkpoint)."""
    if isinstance(source, dict):
        state = source
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher_path: no such file {path!r}")
        from safetensors.torch import load_file
        state = load_file(path)
    prefix = "backbone."
    if state and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


class SelfDistillation(Objective):
    """MLM plus hidden-state distillation from a frozen, further-pre-trained teacher.

    Args:
        hidden_size, vocab_size, mask_token_id, mask_prob, replace_prob, random_prob,
        special_token_ids, whole_word_masking, tie_word_embeddings, activation, layer_norm_eps,
        log_accuracy: the MLM part (``MLM``; ``from_hf``, and ``init_from`` a Hugging Face checkpoint, set
        the head's tying, activation and layer_norm_eps to the checkpoint's).
        alpha: weight of the distillation term.
        layers: indices into the backbone's ``hidden_states`` (0: embeddings, i: after layer i,
            -1: the last layer) whose states are matched.
        distill_inputs: "masked" or "clean" (see the module docstring).
        teacher_path: teacher weights (``.safetensors`` file or checkpoint directory) loaded by
            ``attach`` into a copy of the backbone; None: the teacher is a copy of the backbone as
            it is at ``attach`` (load one later with ``load_teacher``). A saved student restores its
            teacher from its own checkpoint (``objective.teacher.*``), not from this path.

    Batch: as ``MLM`` (a ``prefix_lens`` refused). ``prepare`` also keeps ``clean_input_ids`` for "clean"
    distillation. The teacher stays in eval mode (no dropout) and never receives gradients. Student and
    teacher both run bidirectionally (``causal=False``) whatever the backbone's default mask kind, as ``MLM``:
    the MLM term needs both sides of a masked token, and the teacher's states are matched token by token.
    """

    needs = ("input_ids",)
    batch_keys = TEXT_BATCH + ("clean_input_ids",)
    backbone_causal = False
    prepare_on_host = True  # MLM's masking (see MLM)
    hf_heads = {"mlm": "mlm.head"}

    def __init__(self, *, hidden_size: int, vocab_size: int, mask_token_id: int, alpha: float = 1.0,
                 layers: tuple[int, ...] = (-1,), distill_inputs: str = "masked", teacher_path: str | None = None,
                 mask_prob: float = 0.15, replace_prob: float = 0.8, random_prob: float = 0.1,
                 special_token_ids: tuple[int, ...] = (), whole_word_masking: bool = False,
                 tie_word_embeddings: bool = True, activation: str = "gelu", layer_norm_eps: float | None = None,
                 log_accuracy: bool = False):
        super().__init__()
        self.mlm = MLM(hidden_size=hidden_size, vocab_size=vocab_size, mask_token_id=mask_token_id,
                       mask_prob=mask_prob, replace_prob=replace_prob, random_prob=random_prob,
                       special_token_ids=special_token_ids, whole_word_masking=whole_word_masking,
                       tie_word_embeddings=tie_word_embeddings, activation=activation,
                       layer_norm_eps=layer_norm_eps, log_accuracy=log_accuracy)
        self.alpha = positive("alpha", alpha, allow_zero=True)
        if isinstance(layers, int) or not layers or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in layers):
            raise ValueError(f"layers: expected a non-empty sequence of ints, got {layers!r}")
        self.layers = tuple(layers)
        self.distill_inputs = choice("distill_inputs", distill_inputs, ("masked", "clean"))
        self.teacher_path = teacher_path
        self.teacher: nn.Module | None = None

    def attach(self, backbone: nn.Module) -> None:
        """Tie the MLM head; make the teacher (a frozen copy of ``backbone``, loaded from ``teacher_path``,
        except while ``PretrainModel.from_pretrained`` rebuilds a checkpoint that holds the teacher's weights)."""
        self.mlm.attach(backbone)
        if self.teacher is None:
            self.teacher = frozen_copy(backbone).eval()
            if self.teacher_path is not None and not restoring_checkpoint():
                self.load_teacher(self.teacher_path)
        self._attached = True

    def load_teacher(self, source) -> None:
        """Load teacher weights from a state dict, ``.safetensors`` file or checkpoint directory: every
        tensor of the teacher, shared (ALBERT's ``share_layers``) and tied ones from their one stored copy,
        as ``save_pretrained`` writes them. ValueError naming ``teacher_path`` for a tensor missing, left
        over or of another shape."""
        if self.teacher is None:
            raise RuntimeError("load_teacher: attach(backbone) first (the teacher is a copy of the backbone)")
        state = load_state(source)
        named = self.teacher.state_dict(keep_vars=True)
        unexpected = sorted(k for k in state if k not in named)
        if unexpected:
            raise ValueError(f"teacher_path: tensors the backbone has no place for: {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        _load_into(named, state, "teacher_path")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """MLM masks (``MLM.prepare``), keeping the unmasked ids as ``clean_input_ids``."""
        refuse_prefix_lens(batch, "the self_distill objective")
        out = self.mlm.prepare(batch, seed=seed)
        if self.distill_inputs == "clean" and out.get("clean_input_ids") is None:
            out["clean_input_ids"] = batch["input_ids"]
        return out

    def _states(self, out, where: str):
        hs = out.hidden_states
        if hs is None:
            raise RuntimeError(f"{where}: the backbone returned no hidden_states (output_hidden_states=True)")
        try:
            return [hs[i] for i in self.layers]
        except IndexError:
            raise ValueError(f"layers: {self.layers} out of range for {len(hs)} hidden states") from None

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """``mlm + alpha * distill`` (run ``prepare`` first, or pass ``labels``)."""
        require(batch, ("input_ids", "labels"), "SelfDistillation.forward (run prepare first, or pass labels)")
        self._ensure_attached(backbone)
        student = encode_text(backbone, batch, causal=False, output_hidden_states=True,
                              objective="the self_distill objective")
        mlm_loss, metrics = self.mlm.loss_from_hidden(student.last_hidden_state, batch["labels"])
        inputs = batch
        if self.distill_inputs == "clean":
            require(batch, ("clean_input_ids",), "SelfDistillation.forward (distill_inputs='clean')")
            clean, ids = batch["clean_input_ids"], batch["input_ids"]
            if not isinstance(clean, torch.Tensor) or clean.shape != ids.shape:
                raise ValueError(f"clean_input_ids: expected the shape of input_ids {tuple(ids.shape)}, got "
                                 f"{tuple(getattr(clean, 'shape', ()))}")
            inputs = {**batch, "input_ids": batch["clean_input_ids"]}
            s_states = self._states(encode_text(backbone, inputs, causal=False, output_hidden_states=True), "student")
        else:
            s_states = self._states(student, "student")
        with torch.no_grad():
            t_states = self._states(encode_text(self.teacher, inputs, causal=False, output_hidden_states=True),
                                    "teacher")
        distill = sum(masked_mse(s, t, batch.get("attention_mask")) for s, t in zip(s_states, t_states))
        distill = distill / len(self.layers)
        loss = mlm_loss + self.alpha * distill
        metrics["distill_loss"] = distill.detach()
        return ObjectiveOutput(loss, metrics, None, student.last_hidden_state)


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference over the valid tokens (``attention_mask`` 1) and the hidden dimension."""
    diff = (upcast(student) - upcast(teacher)).pow(2).mean(-1)
    if attention_mask is None:
        return diff.mean()
    m = attention_mask.to(diff.dtype)
    return (diff * m).sum() / m.sum().clamp(min=1)
