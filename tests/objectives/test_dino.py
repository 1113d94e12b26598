import pytest
import torch
import torch.nn.functional as F

from fastpt.models.vision import vit
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
    assert torch.equal(obj.center, center)  # it moves once per optimizer step
    obj.on_step_end(backbone, 0)
    torch.testing.assert_close(obj.center, 0.8 * center + 0.2 * t_out.mean(0, keepdim=True))

    obj.eval()
    frozen = obj.center.clone()
    obj(backbone, batch)
    obj.on_step_end(backbone, 1)
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


def test_head_init_matches_dino():
    # DINO builds last_layer after self.apply(_init_weights): nn.Linear's kaiming_uniform(a=sqrt(5)), i.e.
    # uniform in +-1/sqrt(bottleneck_dim), rows sqrt(1/3) ~ 0.577 long (trunc_normal(0.02): 0.02 * sqrt(256) = 0.32)
    torch.manual_seed(0)
    head = DINOHead(32, 512, hidden_dim=64, bottleneck_dim=256)
    rows = head.weight_v.detach().norm(dim=1)
    assert abs(rows.mean().item() - (1 / 3) ** 0.5) < 0.01 and rows.std().item() < 0.03
    assert head.weight_v.abs().max().item() <= 256 ** -0.5
    assert torch.equal(head.weight_g, torch.ones(512, 1))
    mlp = [m for m in head.mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert all(abs(m.weight.std().item() - 0.02) < 0.002 and not m.bias.any() for m in mlp)


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


def _images(batch, lo, hi, n):
    """Images lo..hi of a prepared batch of n images (each crop key is blocks of n rows, one per crop)."""
    return {k: torch.cat([c[lo:hi] for c in v.split(n)]) for k, v in batch.items() if k != "pixel_values"}


def test_accumulated_micro_batches_match_one_batch():
    """The center moved in every training forward: with grad_accum k it took k EMA steps per optimizer step
    (momentum center_momentum^k) and each micro-batch was centred by the ones before, so 2 x 4 accumulated
    images trained another model than one batch of 8. It moves once per step (on_step_end), as in DINO."""
    results = []
    for micro in (1, 2):
        backbone, obj = make(center_momentum=0.5)
        with torch.no_grad():
            obj.center.normal_()
        batch = obj.prepare({"pixel_values": images(8)}, seed=1)
        losses = []
        for i in range(micro):
            n = 8 // micro
            out = obj(backbone, _images(batch, i * n, (i + 1) * n, 8))
            (out.loss / micro).backward()
            losses.append(float(out.loss))
        obj.on_step_end(backbone, 0)
        grads = [p.grad.clone() for p in list(backbone.parameters()) + list(obj.head.parameters())
                 if p.grad is not None]
        results.append((sum(losses) / micro, obj.center.clone(), grads))
    (loss8, center8, grads8), (loss4, center4, grads4) = results
    assert loss4 == pytest.approx(loss8, rel=1e-6)
    torch.testing.assert_close(center4, center8)
    for a, b in zip(grads4, grads8):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_stays_in_eval_mode():
    """The teacher (a copy of the backbone) followed model.train() and ran with the student's dropout:
    stochastic targets, where DINO builds its teacher without dropout. It stays in eval mode now."""
    from fastpt.assemble import build

    backbone = vit(image_size=16, patch_size=4, in_channels=3, hidden_size=32, num_layers=2, num_heads=4, dropout=0.3)
    obj = DINO.from_backbone(backbone, **SMALL)
    assert not obj.teacher_backbone.training and not obj.teacher_head.training
    obj.train()
    backbone.train()
    assert obj.training and obj.head.training and backbone.training
    assert not obj.teacher_backbone.training and not obj.teacher_head.training
    crops = obj.prepare({"pixel_values": images(3)}, seed=0)["global_crops"]
    with torch.no_grad():
        torch.testing.assert_close(obj.teacher_backbone(crops).last_hidden_state,
                                   obj.teacher_backbone(crops).last_hidden_state, rtol=0, atol=0)
        assert not torch.equal(backbone(crops).last_hidden_state, backbone(crops).last_hidden_state)
    model = build({"backbone": {"builder": "vit", "image_size": 16, "patch_size": 4, "hidden_size": 32,
                                "num_layers": 1, "num_heads": 4, "dropout": 0.3},
                   "objective": {"name": "dino", **SMALL}}).train()
    assert model.backbone.training and not model.objective.teacher_backbone.training


def _head_per_call(head, x):
    """``DINOHead`` as it was computed before: last layer ``g * F.normalize(v)``."""
    x = F.normalize(head.mlp(x), dim=-1)
    return x @ (head.weight_g * F.normalize(head.weight_v, dim=1)).T


def test_head_runs_once_on_every_crop():
    """DINO's MultiCropWrapper: the backbone once per crop size, the head once on every crop's pooled
    features (DINO.forward called it once per crop size: 106 -> 71 ms for a 192-row head step). The
    head works row by row, so the loss and every gradient (float64) are those of a head call per crop
    size with the last layer spelled ``g * F.normalize(v)``."""
    backbone, obj = make(local_crop_size=8, norm_last_layer=False, student_temp=0.1, teacher_temp=0.05)
    backbone.double(), obj.double()
    with torch.no_grad():
        obj.center.normal_()
    batch = obj.prepare({"pixel_values": images(3).double()}, seed=1)
    rows = []
    hook = obj.head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    out = obj(backbone, batch)
    hook.remove()
    assert rows == [12]  # 2 x 3 global + 2 x 3 local crops, one call
    params = [p for p in list(backbone.parameters()) + list(obj.head.parameters()) if p.requires_grad]
    assert any(p is obj.head.weight_g for p in params)
    got = torch.autograd.grad(out.loss, params)

    glob, local = batch["global_crops"], batch["local_crops"]
    student = torch.cat([_head_per_call(obj.head, backbone(x).last_hidden_state[:, 0]) for x in (glob, local)])
    s_logp = F.log_softmax(student / 0.1, -1).chunk(4)
    with torch.no_grad():
        t_out = _head_per_call(obj.teacher_head, obj.teacher_backbone(glob).last_hidden_state[:, 0])
    teacher = F.softmax((t_out - obj.center) / 0.05, -1).chunk(2)
    terms = [-(teacher[i] * s_logp[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    ref = sum(terms) / len(terms)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for p, a, b in zip(params, got, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{tuple(p.shape)}: {m}")


def test_head_last_layer_twice_differentiable():
    """The weight normalisation has a correct second derivative (torch._weight_norm, DINO's own
    nn.utils.weight_norm, fails gradgradcheck in torch 2.13), and keeps the checkpoint keys."""
    torch.manual_seed(0)
    head = DINOHead(6, 5, hidden_dim=4, bottleneck_dim=3, num_layers=2, norm_last_layer=False).double()
    assert {"weight_v", "weight_g"} <= set(head.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    v, g = (t.detach().clone().requires_grad_() for t in (head.weight_v, head.weight_g.add(torch.rand(5, 1))))
    assert torch.autograd.gradgradcheck(
        lambda v, g: torch.func.functional_call(head, {"weight_v": v, "weight_g": g}, (x,)), (v, g))


def test_prepare_runs_one_pass_per_crop_size():
    """prepare called ViewAugment once per crop (2 global + 8 local: 1072 ops, about a kernel launch each on
    a GPU). It runs one pass per crop size: the op count barely grows with num_local_crops (a grid_sample
    and a slice per crop)."""
    from .test_simclr import aten_ops

    raw = {"pixel_values": images(3).to("meta")}  # a GPU stand-in: ops counted, nothing computed
    few, many = make(num_local_crops=2)[1], make(num_local_crops=8)[1]
    assert aten_ops(lambda: many.prepare(raw, seed=0)) <= aten_ops(lambda: few.prepare(raw, seed=0)) + 6 * 3


def test_crops_keep_the_row_layout_and_draw_independently():
    """Crop-major rows (block c holds crop c of every image) and, within an image, every crop with its own
    draws: on constant images a crop is the image's value times its brightness factor, whatever the box."""
    n = 400
    level = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5
    px = level.view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    obj = DINO(hidden_size=8, out_dim=8, head_hidden_dim=8, bottleneck_dim=8, num_local_crops=3,
               local_crop_size=4, jitter_prob=1.0, brightness=0.4, contrast=0.0, saturation=0.0,
               grayscale_prob=0.0, value_range=None)
    out = obj.prepare({"pixel_values": px}, seed=0)
    assert out["global_crops"].shape == (2 * n, 1, 8, 8) and out["local_crops"].shape == (3 * n, 1, 4, 4)
    crops = torch.cat([out["global_crops"].mean((1, 2, 3)), out["local_crops"].mean((1, 2, 3))]).view(5, n)
    f = crops / level  # each crop's brightness factor, in [0.6, 1.4] only on the rows of its own image
    assert f.min() > 0.6 - 1e-5 and f.max() < 1.4 + 1e-5
    assert all(bool((f[i] != f[j]).all()) for i in range(5) for j in range(i))
    corr = torch.corrcoef(f) - torch.eye(5)
    assert corr.abs().max() < 0.2  # 0.05 std for independent draws
    random = obj.prepare({"pixel_values": images(4)}, seed=1)["global_crops"].view(2, 4, -1)
    assert not any(torch.equal(a, b) for a, b in zip(*random))  # the two global crops of an image differ
