import pytest
import torch
import torch.nn.functional as F

from fastpt.objectives import DINO, DINOHead

from . import images, tiny_vit, train, with_grad

SMALL = dict(out_dim=24, head_hidden_dim=16, bottleneck_dim=8, num_local_crops=2)


def make(**kw):
    backbone = tiny_vit()
    return backbone, DINO.from_backbone(backbone, **{**SMALL, **kw})


def test_prepare_multi_crop():
    _, obj = make(global_crop_size=16)
    raw = {"pixel_values": images(3)}
    a, b, c = (obj.prepare(raw, seed=s) for s in (4, 4, 5))
    assert a["global_crops"].shape == (6, 3, 16, 16) and a["local_crops"].shape == (6, 3, 16, 16)
    assert torch.equal(a["local_crops"], b["local_crops"]) and not torch.equal(a["local_crops"], c["local_crops"])
    assert "local_crops" not in make(num_local_crops=0)[1].prepare(raw, seed=0)


def test_loss_matches_reference_and_center_moves():
    backbone, obj = make(student_temp=0.1, teacher_temp=0.05, center_momentum=0.8)
    with torch.no_grad():
        obj.center.normal_()
    center = obj.center.clone()
    batch = obj.prepare({"pixel_values": images(3)}, seed=1)
    out = obj(backbone, batch)

    crops = list(batch["global_crops"].chunk(2)) + list(batch["local_crops"].chunk(2))
    student = [F.log_softmax(obj.head(backbone(x).last_hidden_state[:, 0]) / 0.1, -1) for x in crops]
    t_out = obj.teacher_head(obj.teacher_backbone(batch["global_crops"]).last_hidden_state[:, 0])
    teacher = F.softmax((t_out - center) / 0.05, -1).chunk(2)
    terms = [-(teacher[i] * student[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    torch.testing.assert_close(out.loss, sum(terms) / len(terms), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(obj.center, 0.8 * center + 0.2 * t_out.mean(0, keepdim=True))

    obj.eval()
    frozen = obj.center.clone()
    obj(backbone, batch)
    assert torch.equal(obj.center, frozen)  # no center update outside training


def test_teacher_temperature_warmup():
    backbone, obj = make(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_steps=4)
    assert obj.current_teacher_temp() == pytest.approx(0.02)
    obj.on_step_end(backbone, 1)  # two steps done: DINO's np.linspace(0.02, 0.06, 4)[2]
    assert obj.current_teacher_temp() == pytest.approx(0.02 + 0.04 * 2 / 3)
    obj.on_step_end(backbone, 2)  # the warm-up's last step is the final temperature, as in DINO
    assert obj.current_teacher_temp() == pytest.approx(0.06)
    obj.on_step_end(backbone, 9)
    assert obj.current_teacher_temp() == pytest.approx(0.06)
    assert "steps_done" in obj.state_dict()  # the schedule resumes from a checkpoint


def test_teacher_ema_and_no_teacher_gradients():
    backbone, obj = make(base_momentum=0.7)
    obj(backbone, obj.prepare({"pixel_values": images(3)}, seed=0)).loss.backward()
    names = with_grad(backbone, obj)
    assert {"0.patch_embed.projection.weight", "1.head.weight_v", "1.head.mlp.0.weight"} <= names
    assert not any("teacher" in n for n in names)
    assert not obj.head.weight_g.requires_grad  # norm_last_layer
    with torch.no_grad():
        for p in list(backbone.parameters()) + list(obj.head.parameters()):
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in obj.teacher_head.parameters()]
    tb_before = [p.clone() for p in obj.teacher_backbone.parameters()]
    obj.on_step_end(backbone, 0)
    for old, new, online in zip(before, obj.teacher_head.parameters(), obj.head.parameters()):
        torch.testing.assert_close(new, 0.7 * old + 0.3 * online)
    for old, new, online in zip(tb_before, obj.teacher_backbone.parameters(), backbone.parameters()):
        torch.testing.assert_close(new, 0.7 * old + 0.3 * online)


def test_head_is_weight_normalised():
    head = DINOHead(32, 24, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(5, 32)
    ref = F.normalize(head.mlp(x), dim=-1) @ F.normalize(head.weight_v, dim=1).T
    torch.testing.assert_close(head(x), ref)
    assert DINOHead(32, 24, norm_last_layer=False).weight_g.requires_grad


def test_training_reduces_loss():
    backbone, obj = make(base_momentum=0.9)
    losses = train(obj, backbone, obj.prepare({"pixel_values": images(4)}, seed=0), steps=10)
    assert losses[-1] < 0.85 * losses[0]


def test_real_local_crops_run_on_resized_positions():
    backbone, obj = make(local_crop_size=8)  # 16x16 global crops, 8x8 local crops: 2x2 patches
    assert backbone.patch_embed.dynamic_size and obj.teacher_backbone.patch_embed.dynamic_size
    batch = obj.prepare({"pixel_values": images(3)}, seed=0)
    assert batch["global_crops"].shape == (6, 3, 16, 16) and batch["local_crops"].shape == (6, 3, 8, 8)
    out = obj(backbone, batch)
    out.loss.backward()
    assert backbone.patch_embed.position_embeddings.grad is not None and torch.isfinite(out.loss)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="local_crop_size"):
        make(local_crop_size=6)  # does not tile into the tiny ViT's 4x4 patches
    with pytest.raises(ValueError, match="teacher_temp"):
        make(teacher_temp=0)
    with pytest.raises(ValueError, match="num_local_crops"):
        make(num_local_crops=-1)
    backbone, obj = make()
    with pytest.raises(KeyError, match="global_crops"):
        obj(backbone, {"pixel_values": images()})
    batch = obj.prepare({"pixel_values": images(3)}, seed=0)
    with pytest.raises(ValueError, match="local_crops"):
        obj(backbone, {**batch, "local_crops": batch["local_crops"][:4]})
