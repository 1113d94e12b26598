import pytest
import torch
import torch.nn.functional as F

from fastpt.objectives import SimCLR, ViewAugment
from fastpt.objectives.base import seeded

from . import images, tiny_vit, train, with_grad

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
SMALL = dict(proj_dim=8, proj_hidden_dim=16)


def test_augment_identity_flip_and_grayscale():
    px = images(2, 5, 12)
    torch.testing.assert_close(ViewAugment(**IDENTITY)(px, seeded(0)), px, rtol=0, atol=1e-5)
    flipped = ViewAugment(**{**IDENTITY, "flip_prob": 1.0})(px, seeded(0))
    torch.testing.assert_close(flipped, px.flip(-1), rtol=0, atol=1e-5)
    gray = ViewAugment(**{**IDENTITY, "grayscale_prob": 1.0})(px, seeded(0))
    torch.testing.assert_close(gray, px.mean(1, keepdim=True).expand_as(px))  # any channel count: the mean
    rgb = images(2, 3, 12)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(ViewAugment(**{**IDENTITY, "grayscale_prob": 1.0})(rgb, seeded(0)), luma.expand_as(rgb))


def test_augment_is_deterministic_per_seed():
    aug = ViewAugment(size=8)
    px = images(4, 4, 16)
    a, b, c = aug(px, seeded(3)), aug(px, seeded(3)), aug(px, seeded(4))
    assert a.shape == (4, 4, 8, 8) and a.dtype == px.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    half = aug(px.double(), seeded(3))
    torch.testing.assert_close(half.float(), a, rtol=1e-4, atol=1e-4)  # same draws whatever the dtype


def make(**kw):
    backbone = tiny_vit()
    return backbone, SimCLR.from_backbone(backbone, **{**SMALL, **kw})


def test_loss_matches_reference_nt_xent():
    backbone, obj = make(temperature=0.3)
    px = images(5)
    batch = obj.prepare({"pixel_values": px}, seed=1)
    assert batch["views"].shape == (10, 3, 16, 16)
    assert not torch.equal(batch["views"][:5], batch["views"][5:])
    out = obj(backbone, batch)
    z = F.normalize(obj.projector(backbone(batch["views"]).last_hidden_state[:, 0]), dim=1)
    sim = z @ z.T / 0.3
    sim.fill_diagonal_(float("-inf"))
    target = torch.arange(10).roll(5)
    torch.testing.assert_close(out.loss, F.cross_entropy(sim, target), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["accuracy"], (sim.argmax(1) == target).float().mean())
    assert torch.equal(obj.prepare({"pixel_values": px}, seed=1)["views"], batch["views"])


def test_gradients_and_training():
    backbone, obj = make()
    batch = obj.prepare({"pixel_values": images(6)}, seed=0)
    obj(backbone, batch).loss.backward()
    assert {"0.patch_embed.cls_token", "1.projector.0.weight", "1.projector.3.weight"} <= with_grad(backbone, obj)
    backbone, obj = make()
    losses = train(obj, backbone, batch, steps=10, lr=3e-3)
    assert losses[-1] < 0.85 * losses[0]
    assert obj.tokens_in(batch) == 6 * 16


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="temperature"):
        make(temperature=0.0)
    with pytest.raises(ValueError, match="pooling"):
        make(pooling="max")
    with pytest.raises(ValueError, match="scale"):
        ViewAugment(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="flip_prob"):
        ViewAugment(flip_prob=2)
    backbone, obj = make()
    with pytest.raises(KeyError, match="views"):
        obj(backbone, {"pixel_values": images()})
    with pytest.raises(ValueError, match="views"):
        obj(backbone, {"views": images(3)})
    with pytest.raises(KeyError, match="pixel_values"):
        obj.prepare({"images": images()}, seed=0)
