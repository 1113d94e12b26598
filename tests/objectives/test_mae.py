import pytest
import torch

from fastpt.objectives import MAE

from . import images, tiny_vit, train, with_grad

DECODER = dict(decoder_hidden_size=16, decoder_layers=1, decoder_heads=2)


def make(channels=3, **kw):
    backbone = tiny_vit(channels=channels)
    return backbone, MAE.from_backbone(backbone, **{**DECODER, **kw})


def reference_targets(px, p, norm):
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, each (row, col, channel) — written out by loops."""
    b, c, h, w = px.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            rows.append(px[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(b, -1))
    t = torch.stack(rows, 1)
    if norm:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    return t


@pytest.mark.parametrize("channels,norm", [(3, True), (5, False)])
def test_loss_is_masked_patch_mse(channels, norm):
    backbone, obj = make(channels, norm_pix_loss=norm)
    px = images(3, channels)
    batch = obj.prepare({"pixel_values": px}, seed=9)
    out = obj(backbone, batch)
    k = 16 - round(16 * 0.75)
    assert out.last_hidden_state.shape == (3, 1 + k, 32)  # the encoder saw the kept patches only
    latent = backbone(px, ids_keep=batch["ids_keep"]).last_hidden_state
    pred = obj.decoder(latent, batch["ids_restore"])
    torch.testing.assert_close(out.logits, pred)
    per_patch = ((pred - reference_targets(px, 4, norm)) ** 2).mean(-1)
    mask = batch["mask"].float()
    torch.testing.assert_close(out.loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_prepare_masks_exact_count_and_is_deterministic():
    _, obj = make(mask_ratio=0.5)
    raw = {"pixel_values": images(4)}
    a, b, c = (obj.prepare(raw, seed=s) for s in (1, 1, 2))
    assert a["mask"].sum(1).eq(8).all()
    assert torch.equal(a["ids_keep"], b["ids_keep"]) and not torch.equal(a["ids_keep"], c["ids_keep"])
    kept = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, a["ids_keep"], True)
    assert torch.equal(kept, ~a["mask"])
    block = MAE.from_backbone(tiny_vit(), mask_mode="block", mask_ratio=0.5, **DECODER)
    assert block.prepare(raw, seed=1)["mask"].sum(1).eq(8).all()


def test_gradients_and_training():
    backbone, obj = make()
    batch = obj.prepare({"pixel_values": images(4)}, seed=0)
    obj(backbone, batch).loss.backward()
    names = with_grad(backbone, obj)
    assert {"0.patch_embed.projection.weight", "1.decoder.mask_token", "1.decoder.pred.weight"} <= names
    backbone, obj = make(norm_pix_loss=False)
    losses = train(obj, backbone, batch, steps=10, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0]
    assert obj.tokens_in(batch) == 4 * 16


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="mask_ratio"):
        make(mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_mode"):
        make(mask_mode="grid")
    backbone, obj = make()
    with pytest.raises(TypeError, match="pixel_values"):
        obj.prepare({"pixel_values": torch.ones(2, 3, 16, 16, dtype=torch.long)}, seed=0)
    with pytest.raises(ValueError, match="pixel_values"):
        obj.prepare({"pixel_values": torch.ones(3, 16, 16)}, seed=0)
    with pytest.raises(KeyError, match="ids_keep"):
        obj(backbone, {"pixel_values": images()})


def test_grid_size_and_cls_token_given_must_be_the_backbones():
    """MAE took a config's grid_size / cls_token over the backbone's (setdefault): grid_size [2, 8] on a 4x4
    patch grid trained with the position table of another grid, and block masking would use it too."""
    import fastpt

    vb = dict(builder="vit", image_size=16, patch_size=4, in_channels=3, hidden_size=32, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=r"objective\.grid_size: \(2, 8\) .*backbone's grid_size \(4, 4\)"):
        fastpt.build({"backbone": vb, "objective": {"name": "mae", "grid_size": [2, 8], **DECODER}})
    with pytest.raises(ValueError, match=r"objective\.cls_token: False .*backbone's cls_token True"):
        make(cls_token=False)
    backbone, obj = make(grid_size=[4, 4], cls_token=True)  # the backbone's own: fine
    assert obj.grid_size == (4, 4)


def test_a_float64_model_keeps_its_loss_in_float64():
    """The loss upcasts half precision only (it computed a float64 model's loss in float32: ~1e-8 off)."""
    backbone, obj = make(norm_pix_loss=True)
    backbone, obj = backbone.double(), obj.double()
    px = images(3).double()
    out = obj(backbone, obj.prepare({"pixel_values": px}, seed=2))
    assert out.loss.dtype == torch.float64
