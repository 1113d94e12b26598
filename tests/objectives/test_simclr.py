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


JITTER = dict(IDENTITY, jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)


def torchvision_blend(x01, out01, anchor):
    """Check ``out01 == clamp(anchor + f * (x01 - anchor), 0, 1)`` (torchvision's ``_blend`` on
    [0, 1] pixels) for one factor ``f`` per image, read off the pixels the clamp left alone; returns f."""
    factors = []
    for x, out, a in zip(x01, out01, anchor.expand_as(x01)):
        free = (out > 1e-3) & (out < 1 - 1e-3) & ((x - a).abs() > 0.1)
        f = ((out - a)[free] / (x - a)[free]).median()
        torch.testing.assert_close(out, (a + f * (x - a)).clamp(0, 1), rtol=0, atol=2e-5)
        factors.append(float(f))
    return torch.tensor(factors)


def test_jitter_matches_torchvision_color_jitter_in_minus_one_one():
    # pixels as ImageStream feeds them (u8 / 127.5 - 1); torchvision's ColorJitter works on u8 / 255
    u8 = torch.randint(0, 256, (16, 3, 7, 7), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    u8[:, :, 0, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)  # black, white and mid-grey everywhere
    x01 = u8.double() / 255
    x = x01 * 2 - 1

    def view01(**kw):
        return (ViewAugment(**{**JITTER, **kw})(x, seeded(0)) + 1) / 2

    # brightness: blend with black (0), not with mid-grey: black stays black, white saturates at 1
    f = torchvision_blend(x01, view01(brightness=0.4), torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    assert f.min() >= 0.6 - 1e-6 and f.max() <= 1.4 + 1e-6 and (f > 1.05).any() and (f < 0.95).any()
    # contrast: blend with the image's mean grayscale value, clamped
    mean = (x01 * LUMA).sum(1, keepdim=True).mean((1, 2, 3), keepdim=True)
    f = torchvision_blend(x01, view01(contrast=0.4), mean)
    assert (f > 1.05).any() and (f < 0.95).any()
    # saturation: blend with the per-pixel grayscale, clamped
    f = torchvision_blend(x01, view01(saturation=0.4), (x01 * LUMA).sum(1, keepdim=True))
    assert (f > 1.05).any() and (f < 0.95).any()
    # one channel: saturation is the identity (torchvision returns 1-channel images unchanged)
    torch.testing.assert_close(ViewAugment(**{**JITTER, "saturation": 0.4})(x[:, :1], seeded(0)), x[:, :1])


def test_value_range_moves_black_and_white():
    # the same views of the same picture stored as [0, 1] or [-1, 1] pixels
    x01 = images(8, 3, 16, seed=2)
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_prob=1.0, brightness=0.8, contrast=0.8, saturation=0.8)
    a = ViewAugment(**kw, value_range=(0.0, 1.0))(x01, seeded(5))
    b = ViewAugment(**kw)(x01 * 2 - 1, seeded(5))
    torch.testing.assert_close(a, (b + 1) / 2, rtol=0, atol=1e-5)
    assert a.min() == 0 and a.max() == 1  # clamped to the range at both ends
    with pytest.raises(ValueError, match="value_range"):
        ViewAugment(value_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="value_range"):
        ViewAugment(value_range=(0.0,))


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
    batch = obj.prepare({"pixel_values": images(6) * 2 - 1}, seed=0)  # ImageStream's range, [-1, 1]
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


def test_views_without_jitter_are_not_clamped_and_none_turns_clamping_off():
    """Clamping to value_range applied to every view, also those the jitter skipped: inputs normalised with
    a mean and std (beyond [-1, 1]) came out clipped (55% of pixels). Only jittered images are clamped, as in
    torchvision; value_range=None clamps nothing (brightness then scales around 0)."""
    from fastpt.objectives.simclr import ViewAugment

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2  # beyond [-1, 1]
    plain = ViewAugment(jitter_prob=0.0, flip_prob=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), grayscale_prob=0.0)
    torch.testing.assert_close(plain(x, torch.Generator().manual_seed(1)), x)
    free = ViewAugment(jitter_prob=1.0, flip_prob=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), grayscale_prob=0.0,
                       value_range=None)
    out = free(x, torch.Generator().manual_seed(1))
    assert out.abs().max() > 1.5  # nothing clamped
    jittered = ViewAugment(jitter_prob=1.0, flip_prob=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), grayscale_prob=0.0)
    assert jittered(x, torch.Generator().manual_seed(1)).abs().max() <= 1.0


def aten_ops(fn) -> int:
    """Aten ops ``fn()`` runs (about the kernel launches it makes on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_views_run_in_one_pass():
    """SimCLR.prepare called ViewAugment once per view (215 ops for 2 views, ~1070 for DINO's 2 + 8 crops:
    a kernel launch each on a GPU). ``views=`` runs them in one pass off the CPU ("meta" stands in for a
    GPU: ops are counted, nothing computed): a grid_sample per view, the rest once; on a CPU the jitter goes
    view by view (cache-sized tensors), with the same numbers as one pass."""
    from fastpt.objectives import simclr

    px = images(4, 3, 12)
    aug = ViewAugment(size=8)
    meta = px.to("meta")
    one = aten_ops(lambda: aug(meta, seeded(0)))
    _, obj = make(crop_size=8)
    assert aten_ops(lambda: obj.prepare({"pixel_values": meta}, seed=0)) <= one + 5
    assert aten_ops(lambda: aug(meta, seeded(0), views=5)) <= one + 5 * 3
    assert aug(px, seeded(0), views=5).shape == (20, 3, 8, 8)
    per_view = aug(px, seeded(0), views=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simclr, "_jitter_per_view", lambda device: False)
        torch.testing.assert_close(aug(px, seeded(0), views=5), per_view, rtol=0, atol=0)
    with pytest.raises(ValueError, match="views"):
        aug(px, seeded(0), views=0)


def test_grayscale_after_a_call_under_inference_mode_still_has_a_gradient():
    """grayscale's weights are a cached device constant: made first under inference_mode they were an inference
    tensor, and a later x * w could not be saved for backward."""
    from fastpt import _dispatch
    from fastpt.objectives.simclr import grayscale

    _dispatch._CONSTANTS.clear()
    with torch.inference_mode():
        grayscale(images(2, 3, 4))
    y = images(2, 3, 4).requires_grad_()
    grayscale(y).sum().backward()
    torch.testing.assert_close(y.grad[:, :, 0, 0], torch.tensor([[0.299, 0.587, 0.114]] * 2))


def test_views_are_view_major_with_independent_draws():
    """Rows v * B .. (v + 1) * B are view v of every image, and every view of every image draws its own
    flip, jitter factor and crop box (independent of the image's other views)."""
    px = images(3, 2, 8)
    torch.testing.assert_close(ViewAugment(**IDENTITY)(px, seeded(0), views=3), px.repeat(3, 1, 1, 1),
                               rtol=0, atol=1e-5)
    # out = f * x or f * flip(x): brightness only, nothing clamped (value_range None scales around 0)
    n = 512
    x = images(n, 1, 6, seed=1) + 0.5
    aug = ViewAugment(**{**JITTER, "flip_prob": 0.5, "brightness": 0.4, "value_range": None})
    out = aug(x, seeded(2), views=2).view(2, n, 1, 6, 6)
    f = out.sum((2, 3, 4)) / x.sum((1, 2, 3))
    flip = (out - f.view(2, n, 1, 1, 1) * x.flip(-1)).abs().amax((2, 3, 4)) < 1e-4
    torch.testing.assert_close(out, f.view(2, n, 1, 1, 1) * torch.where(flip.view(2, n, 1, 1, 1), x.flip(-1), x),
                               rtol=0, atol=1e-4)
    assert f.min() > 0.6 - 1e-4 and f.max() < 1.4 + 1e-4 and (f.min() < 0.65) and (f.max() > 1.35)
    assert bool((f[0] != f[1]).all())  # the two views of an image: two draws
    assert abs(float(torch.corrcoef(f)[0, 1])) < 0.15  # about 0.044 std for independent draws
    assert 0.4 < float(flip.double().mean()) < 0.6 and 0.4 < float((flip[0] == flip[1]).double().mean()) < 0.6
    # crop box: on a horizontal ramp (value = x coordinate) a view's mean is its centre, its spread its width
    ramp = torch.linspace(-1, 1, 33).expand(n, 1, 33, 33).contiguous()
    crop = ViewAugment(**{**IDENTITY, "scale": (0.1, 0.6), "ratio": (0.5, 2.0)})
    v = crop(ramp, seeded(3), views=2).view(2, n, -1)
    for stat in (v.mean(-1), v.amax(-1) - v.amin(-1)):
        assert float(stat.std(1).min()) > 0.05 and abs(float(torch.corrcoef(stat)[0, 1])) < 0.15
