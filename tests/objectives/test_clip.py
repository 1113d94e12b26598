import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpt.objectives import CLIP

from . import images, text_batch, tiny_text, tiny_vit, train, with_grad


def make(**kw):
    backbone = nn.ModuleDict({"text": tiny_text(causal=True, hidden_size=24), "vision": tiny_vit()})
    return backbone, CLIP.from_backbone(backbone, embed_dim=16, **kw)


def pairs(n=5, seed=0):
    return {**text_batch(n, 11, seed=seed), "pixel_values": images(n, seed=seed)}


def test_loss_matches_reference():
    backbone, obj = make()
    assert obj.text_projection.in_features == 24 and obj.vision_projection.in_features == 32
    batch = obj.prepare(pairs(), seed=0)
    out = obj(backbone, batch)
    th = backbone.text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1  # EOT: the last valid token
    t = F.normalize(obj.text_projection(th[torch.arange(5), last]), dim=1)
    i = F.normalize(obj.vision_projection(backbone.vision(batch["pixel_values"]).last_hidden_state[:, 0]), dim=1)
    logits = math.exp(math.log(1 / 0.07)) * i @ t.T
    target = torch.arange(5)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["image_to_text_accuracy"], (logits.argmax(1) == target).float().mean())
    torch.testing.assert_close(out.metrics["text_to_image_accuracy"], (logits.argmax(0) == target).float().mean())
    assert obj.tokens_in(batch) == int(batch["attention_mask"].sum()) + 5 * 16


def test_gradients_reach_both_towers_and_the_scale():
    backbone, obj = make(text_pooling="mean")
    obj(backbone, pairs()).loss.backward()
    names = with_grad(backbone, obj)
    assert {"0.text.embeddings.word_embeddings.weight", "0.vision.patch_embed.projection.weight",
            "1.text_projection.weight", "1.vision_projection.weight", "1.logit_scale"} <= names
    backbone, obj = make(learn_logit_scale=False, init_logit_scale=2.0)
    assert "logit_scale" not in dict(obj.named_parameters()) and float(obj.logit_scale) == 2.0


def test_training_reduces_loss():
    backbone, obj = make()
    batch = pairs(6)  # images told apart by their colour: noise alone gives a tiny ViT near-identical embeddings
    batch["pixel_values"] = 0.2 * batch["pixel_values"] + 3 * torch.randn(6, 3, 1, 1, generator=torch.Generator())
    losses = train(obj, backbone, obj.prepare(batch, seed=0), steps=8, lr=1e-3)
    assert losses[-1] < 0.85 * losses[0]


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="backbone"):
        CLIP.from_backbone(tiny_vit())
    with pytest.raises(ValueError, match="text_pooling"):
        make(text_pooling="max")
    with pytest.raises(ValueError, match="init_logit_scale"):
        make(init_logit_scale=float("inf"))
    backbone, obj = make()
    with pytest.raises(ValueError, match="pixel_values"):
        obj.prepare({**text_batch(3, 7), "pixel_values": images(2)}, seed=0)
    with pytest.raises(KeyError, match="pixel_values"):
        obj.prepare(text_batch(3, 7), seed=0)


def test_logit_scale_is_clamped_after_each_step_and_can_come_back():
    """Past ln 100 the loss's clamp has zero gradient: a logit_scale an optimizer step carried there stayed
    for good. on_step_end clamps the parameter to [0, ln 100] (open_clip's rule), where the gradient is live."""
    backbone, obj = make(init_logit_scale=math.log(100) + 0.5)
    obj(backbone, pairs()).loss.backward()
    assert float(obj.logit_scale.grad) == 0.0  # the dead zone
    obj.on_step_end(backbone, 0)
    assert float(obj.logit_scale) == pytest.approx(math.log(100)) and float(obj.logit_scale.exp()) <= 100
    obj.logit_scale.grad = None
    obj(backbone, pairs()).loss.backward()
    assert float(obj.logit_scale.grad) != 0.0
    with torch.no_grad():
        obj.logit_scale.fill_(-1.0)
    obj.on_step_end(backbone, 1)
    assert float(obj.logit_scale) == 0.0


def test_logit_scale_has_one_element_and_old_state_dicts_load(tmp_path):
    """FSDP2 (train.fsdp) refuses 0-dim parameters: logit_scale is (1,) now; a 0-dim one of an older state dict
    still loads, and the loss, the metric and the clamp read the (1,) one."""
    backbone, obj = make()
    assert obj.logit_scale.shape == (1,)
    out = obj(backbone, pairs())
    assert out.metrics["logit_scale"].dim() == 0
    assert float(out.metrics["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    for learn in (True, False):
        backbone, obj = make(learn_logit_scale=learn)
        state = obj.state_dict()
        state["logit_scale"] = torch.tensor(2.5)  # as saved before
        obj.load_state_dict(state)
        assert obj.logit_scale.shape == (1,) and float(obj.logit_scale) == 2.5
        assert isinstance(obj.logit_scale, nn.Parameter) == learn
    from fastpt.assemble import build
    from fastpt.models.model import PretrainModel

    text = {"vocab_size": 50, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_positions": 16}
    vision = {"image_size": 8, "patch_size": 4, "in_channels": 1, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    model = build({"backbone": {"builder": "two_tower", "text": text, "vision": vision},
                   "objective": {"name": "clip", "embed_dim": 8}})
    with torch.no_grad():
        model.objective.logit_scale.fill_(1.25)
    again = PretrainModel.from_pretrained(model.save_pretrained(tmp_path / "clip"))
    assert again.objective.logit_scale.shape == (1,) and float(again.objective.logit_scale) == 1.25
    old = {k: (v.reshape(()) if k == "objective.logit_scale" else v) for k, v in model.state_dict().items()}
    again.load_state_dict(old)
    assert float(again.objective.logit_scale) == 1.25
    # a checkpoint written before: its safetensors hold the 0-dim value (from_pretrained checks shapes itself)
    from safetensors.torch import load_file, save_file

    weights = next((tmp_path / "clip").glob("*.safetensors"))
    saved = load_file(weights)
    saved["objective.logit_scale"] = saved["objective.logit_scale"].reshape(())
    save_file(saved, weights)
    assert float(PretrainModel.from_pretrained(tmp_path / "clip").objective.logit_scale) == 1.25


def test_labels_are_refused_naming_the_op_that_takes_them():
    """The objective pairs image i with text i; a labels key (several captions per image) was ignored silently
    once PretrainModel.forward let pass-through objectives take any key."""
    backbone, obj = make()
    batch = pairs()
    batch["labels"] = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    with pytest.raises(TypeError, match="labels: the clip objective pairs image i with text i.*clip_loss"):
        obj(backbone, batch)


@pytest.mark.parametrize("pooling", ["first", "last", "mean"])
@pytest.mark.parametrize("causal", [True, False])
def test_first_token_pooling_needs_a_bidirectional_text_tower(pooling, causal):
    """On a causal text tower (OpenAI CLIP's is causal and pools its EOT, the last token) "first" pooled a
    token that sees only itself: every caption one embedding, built without a word. attach refuses it,
    naming text_pooling; "last" and "mean", and "first" on a bidirectional tower, build and tell captions
    apart."""
    backbone = nn.ModuleDict({"text": tiny_text(causal=causal, hidden_size=24), "vision": tiny_vit()})
    if causal and pooling == "first":
        with pytest.raises(ValueError, match=r"objective\.text_pooling: 'first' .*causal"):
            CLIP.from_backbone(backbone, embed_dim=16, text_pooling=pooling)
        return
    obj = CLIP.from_backbone(backbone, embed_dim=16, text_pooling=pooling)
    batch = pairs()
    batch["input_ids"][:, 0] = 5  # one first token for every caption
    t, _, _ = obj.embed(backbone, batch)
    assert (t - t[0]).abs().max() > 1e-4


def test_prefix_lens_is_refused():
    """encode_text passed a batch's prefix_lens to the text tower (a prefix-LM mask under a contrastive loss)."""
    backbone, obj = make()
    with pytest.raises(TypeError, match="prefix_lens: the clip objective"):
        obj(backbone, {**pairs(), "prefix_lens": torch.tensor([2, 2, 2, 2, 2])})
