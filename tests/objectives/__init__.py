"""Tiny real backbones and helpers shared by the objective tests (odd sizes, no dropout)."""
from __future__ import annotations

import torch

from fastpt.models.encoder import text_encoder
from fastpt.models.encoder_decoder import encoder_decoder
from fastpt.models.vision import vit

VOCAB = 97


def tiny_text(*, causal: bool = False, vocab_size: int = VOCAB, hidden_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return text_encoder(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=2, num_heads=4,
                        max_positions=64, dropout=0.0, attention_dropout=0.0, causal=causal)


def tiny_seq2seq(*, vocab_size: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    return encoder_decoder(vocab_size=vocab_size, hidden_size=32, num_encoder_layers=2, num_heads=4, dropout=0.0)


def tiny_vit(*, channels: int = 3, image_size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return vit(image_size=image_size, patch_size=4, in_channels=channels, hidden_size=32, num_layers=2, num_heads=4)


def text_batch(batch: int = 3, seq: int = 17, *, vocab_size: int = VOCAB, low: int = 5, seed: int = 0) -> dict:
    """Random ids in ``[low, vocab_size)`` with right padding on row 1 (ids there set to 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq - 5:] = 0
        ids[1, seq - 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def images(batch: int = 3, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def with_grad(*modules) -> set[str]:
    """Names (``i.name``) of the parameters of ``modules`` that received a nonzero gradient."""
    return {f"{i}.{n}" for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def train(objective, backbone, batch: dict, steps: int = 8, lr: float = 3e-3) -> list[float]:
    """A few AdamW steps on one prepared batch; returns the losses (before each step)."""
    params = {id(p): p for m in (backbone, objective) for p in m.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = objective(backbone, batch).loss
        loss.backward()
        opt.step()
        objective.on_step_end(backbone, step)
        losses.append(float(loss.detach()))
    return losses
