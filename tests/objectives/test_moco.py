import math

import pytest
import torch
import torch.nn.functional as F

from fastpt.objectives import MoCoV3

from . import images, tiny_vit, train, with_grad

SMALL = dict(proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=16)


def make(**kw):
    backbone = tiny_vit()
    return backbone, MoCoV3.from_backbone(backbone, **{**SMALL, **kw})


def test_loss_matches_reference():
    backbone, obj = make(temperature=0.2)
    batch = obj.prepare({"pixel_values": images(5)}, seed=2)
    out = obj(backbone, batch)
    x1, x2 = batch["views"].chunk(2)
    q1, q2 = (obj.predictor(obj.projector(backbone(x).last_hidden_state[:, 0])) for x in (x1, x2))
    k1, k2 = (obj.momentum_projector(obj.momentum_backbone(x).last_hidden_state[:, 0]) for x in (x1, x2))

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
        return F.cross_entropy(logits, torch.arange(5)) * 2 * 0.2

    torch.testing.assert_close(out.loss, ctr(q1, k2) + ctr(q2, k1), rtol=1e-5, atol=1e-5)
    acc = ((F.normalize(q1, dim=1) @ F.normalize(k2, dim=1).T).argmax(1) == torch.arange(5)).float().mean()
    torch.testing.assert_close(out.metrics["accuracy"], acc)


def test_no_gradient_reaches_the_momentum_encoder():
    backbone, obj = make()
    assert all(not p.requires_grad for m in (obj.momentum_backbone, obj.momentum_projector) for p in m.parameters())
    for a, b in zip(backbone.parameters(), obj.momentum_backbone.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, not the same tensors
    obj(backbone, obj.prepare({"pixel_values": images(4)}, seed=0)).loss.backward()
    names = with_grad(backbone, obj)
    assert {"0.patch_embed.projection.weight", "1.predictor.0.weight", "1.projector.0.weight"} <= names
    assert not any("momentum" in n for n in names)


def test_momentum_update_and_schedule():
    backbone, obj = make(base_momentum=0.9, total_steps=10)
    assert obj.momentum(0) == pytest.approx(0.9) and obj.momentum(10) == pytest.approx(1.0)
    assert obj.momentum(5) == pytest.approx(0.95)
    with torch.no_grad():
        for p in list(backbone.parameters()) + list(obj.projector.parameters()):
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in obj.momentum_backbone.parameters()]
    obj.on_step_end(backbone, 0)  # m = 0.9
    for old, new, online in zip(before, obj.momentum_backbone.parameters(), backbone.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    m = obj.momentum(3)
    assert m == pytest.approx(1 - 0.1 * (math.cos(math.pi * 0.3) + 1) / 2)
    proj_before = [p.clone() for p in obj.momentum_projector.parameters()]
    obj.on_step_end(backbone, 3)
    for old, new, online in zip(proj_before, obj.momentum_projector.parameters(), obj.projector.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * online)


def test_training_reduces_loss():
    backbone, obj = make(base_momentum=0.9)
    losses = train(obj, backbone, obj.prepare({"pixel_values": images(6)}, seed=0), steps=15)
    assert min(losses[-5:]) < 0.85 * losses[0]  # six images, lr 3e-3: the loss moves by steps, not smoothly


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="base_momentum"):
        make(base_momentum=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        make(total_steps=0)
    backbone, obj = make()
    with pytest.raises(KeyError, match="views"):
        obj(backbone, {"pixel_values": images()})


def test_predictor_has_no_last_bias_as_moco_v3():
    """MoCo v3's _build_mlp has no bias on any Linear, the predictor's last included (it had one); a
    checkpoint saved with that bias still loads, with a warning."""
    import warnings
    backbone, obj = make()
    linears = [m for m in obj.predictor if isinstance(m, torch.nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True]
    assert all(m.bias is None for m in obj.projector if isinstance(m, torch.nn.Linear))
    state = obj.state_dict()
    state["predictor.3.bias"] = torch.ones(linears[-1].out_features)
    with pytest.warns(UserWarning, match="predictor has a last-layer bias"):
        obj.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj.load_state_dict(obj.state_dict())


def test_a_checkpoint_with_the_old_predictor_bias_is_rebuilt_with_it(tmp_path):
    """A run saved before the predictor lost its last bias resumes exactly: from_pretrained rebuilds its
    MoCo v3 with predictor_bias=True (the bias loaded, not dropped; its optimizer state then fits)."""
    from safetensors.torch import load_file, save_file

    import fastpt
    from fastpt.models.model import PretrainModel

    model = fastpt.build("mocov3-vit-tiny", backbone=dict(image_size=16, patch_size=4, in_channels=1, hidden_size=32,
                                                           num_layers=1, num_heads=4, intermediate_size=48),
                         objective=dict(proj_dim=16, proj_hidden_dim=24, pred_hidden_dim=24, crop_size=16))
    model.save_pretrained(tmp_path)
    values = load_file(tmp_path / "model.safetensors")
    values["objective.predictor.3.bias"] = torch.arange(16.0)
    save_file(values, tmp_path / "model.safetensors")
    again = PretrainModel.from_pretrained(tmp_path)
    assert torch.equal(again.objective.predictor[3].bias.detach(), torch.arange(16.0))
    assert again.config["objective"]["predictor_bias"] is True
    assert PretrainModel.from_pretrained(tmp_path).objective.predictor[3].bias is not None
    assert model.objective.predictor[3].bias is None  # a new model: MoCo v3's layout


def test_views_take_value_range_as_simclr_and_dino():
    """MoCo v3 built its ViewAugment without value_range: normalised inputs were always clamped to [-1, 1]."""
    backbone, obj = make(value_range=None)
    x = torch.full((2, 3, 16, 16), 2.5)
    views = obj.prepare({"pixel_values": x}, seed=0)
    assert max(float(v.max()) for v in views.values() if isinstance(v, torch.Tensor) and v.is_floating_point()) > 2


def test_init_from_an_old_layout_keeps_the_rest_of_the_objective():
    """init_from an older MoCo v3 checkpoint (predictor with a last bias) into a new run: the new run takes
    MoCo v3's layout, the bias is dropped with a warning, and every other tensor of the objective (projector,
    predictor, momentum encoder) is the checkpoint's."""
    from types import SimpleNamespace

    from fastpt.train.recipe import PretrainRecipe

    backbone, old = make(predictor_bias=True)
    _, new = make()
    with pytest.warns(UserWarning, match="predictor has a last-layer bias"):
        assert PretrainRecipe._load_whole_objective(SimpleNamespace(objective=new), SimpleNamespace(objective=old))
    assert new.predictor[3].bias is None
    for k, v in new.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k
