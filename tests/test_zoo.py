"""Every shipped config: instantiated at a reduced size and trained one step (forward + backward),
and at its real size with the published parameter count."""
from __future__ import annotations

import inspect

import pytest
import torch

import fastpt.assemble as asm
from fastpt.objectives import OBJECTIVES

ZOO = ("bert-tiny", "bert-mini", "bert-small", "bert-base", "roberta-base", "albert-base", "gpt2-small", "t5-small",
       "ul2-small", "vit-mae-tiny", "vit-mae-base", "simclr-vit-tiny", "mocov3-vit-tiny", "clip-tiny",
       "dino-vit-tiny")
VOCAB = 101
IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eos": 5, "bos": 6}
TEXT = dict(hidden_size=32, num_heads=4, intermediate_size=48, dropout=0.0, attention_dropout=0.0)
# Fashion-MNIST's shape, as the demo uses: 1 x 28 x 28, 7 x 7 patches (a 4 x 4 grid)
VISION = dict(image_size=28, in_channels=1, patch_size=7, hidden_size=32, num_layers=2, num_heads=4,
              intermediate_size=48)
OBJECTIVE = dict(proj_dim=16, proj_hidden_dim=24, pred_hidden_dim=24, out_dim=40, head_hidden_dim=24,
                 bottleneck_dim=16, decoder_hidden_size=16, decoder_layers=1, decoder_heads=2, embed_dim=16,
                 local_crop_size=14, num_local_crops=2)
# Published parameter counts of the same composition in Hugging Face transformers (BertForMaskedLM,
# RobertaForMaskedLM, AlbertForPreTraining, GPT2LMHeadModel, T5ForConditionalGeneration,
# ViTMAEForPreTraining; ViTModel without pooler for the Tiny encoders), backbone-only where the
# objective's heads have no published counterpart.
PUBLISHED = {"bert-tiny": 4_416_698, "bert-mini": 11_201_594, "bert-small": 28_795_194, "bert-base": 109_514_298,
             "roberta-base": 124_697_433, "albert-base": 11_813_810, "gpt2-small": 124_439_808,
             "t5-small": 60_506_624, "ul2-small": 60_506_624, "vit-mae-base": 111_907_840}
PUBLISHED_BACKBONE = {"vit-mae-tiny": 5_524_416, "simclr-vit-tiny": 5_524_416, "mocov3-vit-tiny": 5_524_416,
                      "dino-vit-tiny": 5_524_416}


def test_the_zoo_is_complete():
    assert sorted(asm.list_configs()) == sorted(ZOO)


def reduced(name: str) -> dict:
    """Overrides that shrink ``name`` to a few-thousand-parameter model of the same composition."""
    cfg = asm.load_config(name)
    b, over = cfg["backbone"], {}
    if b["builder"] == "text_encoder":
        over = {**TEXT, "num_layers": 2, "max_positions": 40}
        if b.get("embed_dim"):
            over["embed_dim"] = 16
    elif b["builder"] == "encoder_decoder":
        over = {**TEXT, "num_encoder_layers": 2, "num_decoder_layers": 1}
    elif b["builder"] == "vit":
        over = VISION
    elif b["builder"] == "two_tower":
        over = {"text": {**TEXT, "num_layers": 2, "max_positions": 40}, "vision": VISION}
    params = inspect.signature(OBJECTIVES[cfg["objective"]["name"]].__init__).parameters
    return {"backbone": over, "objective": {k: v for k, v in OBJECTIVE.items() if k in params}}


def raw_batch(model) -> dict:
    g = torch.Generator().manual_seed(0)
    b = model.config["backbone"]
    batch = {}
    if b["builder"] in ("vit", "two_tower"):
        batch["pixel_values"] = torch.rand(3, 1, 28, 28, generator=g)
    if b["builder"] != "vit":
        ids = torch.randint(7, VOCAB, (3, 17), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
        batch.update(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)
    return batch


@pytest.mark.parametrize("name", ZOO)
def test_reduced_model_trains_one_step(name):
    torch.manual_seed(0)
    text = asm.load_config(name)["backbone"]["builder"] != "vit"
    model = asm.build(name, vocab_size=VOCAB if text else None, special_ids=IDS if text else None, **reduced(name))
    model.train()
    batch = model.prepare(raw_batch(model), seed=3)
    out = model(**batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), name
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2, name
    model.on_step_end(0)
    assert model.tokens_in(batch) > 0
    assert model.flops_per_token(17) > 0


@pytest.mark.parametrize("name", ZOO)
def test_real_size_parameter_count(name):
    if name == "ul2-small":  # UL2 validates its denoisers on a dummy batch: a real op, not on meta tensors
        model = asm.build(name)
    else:
        with torch.device("meta"):
            model = asm.build(name)
    if name in PUBLISHED:
        assert model.num_parameters() == pytest.approx(PUBLISHED[name], rel=0.01)
    elif name in PUBLISHED_BACKBONE:
        assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(PUBLISHED_BACKBONE[name],
                                                                                     rel=0.01)


@pytest.mark.parametrize("name, hf_class, hf_config", [
    ("bert-base", "BertForMaskedLM", dict(model_type="bert")),
    ("vit-mae-base", "ViTMAEForPreTraining", dict(model_type="vit_mae")),
])
def test_real_size_matches_transformers(name, hf_class, hf_config):
    """bert-base and vit-mae-base instantiated for real (CPU), counted against transformers' classes
    for the published configs (ViTMAE counts its fixed sin-cos tables as parameters: 197 x 768 +
    197 x 512 elements that fastpt keeps as buffers)."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ref = getattr(transformers, hf_class)(transformers.AutoConfig.for_model(**hf_config))
    expected = sum(p.numel() for p in ref.parameters())
    model = asm.build(name)
    assert model.num_parameters() == pytest.approx(expected, rel=0.01)
    if name == "bert-base":
        assert model.num_parameters() == expected  # the same composition, to the parameter
    else:
        assert expected - model.num_parameters() == 197 * 768 + 197 * 512


def test_t5_small_rows_become_t5s_512_inputs_and_114_targets():
    """T5 trains on 512 encoder inputs and 114 targets, made from 568 raw tokens (random_spans_helper(512));
    t5-small's seq_len is that raw length (it was 512: 462 inputs, 104 targets)."""
    from fastpt.ops.span_corrupt import span_corrupt_lengths
    cfg = asm.load_config("t5-small")
    obj = cfg["objective"]
    assert span_corrupt_lengths(cfg["defaults"]["seq_len"], noise_density=obj["noise_density"],
                                mean_span_len=obj["mean_span_len"]) == (512, 114)


@pytest.mark.parametrize("name", ["vit-mae-tiny", "vit-mae-base"])
def test_mae_recipe_defaults_are_the_papers(name):
    """MAE (main_pretrain.py): cosine decay to min_lr 0, no gradient clipping. The configs resolved to
    the recipe's min_lr_ratio 0.1 and clip_grad 1.0 while their descriptions claimed the paper's recipe."""
    from fastpt.train.config import load_recipe

    recipe = load_recipe({"model": name, "data": {"images": "fashion-mnist"}, "train": {"max_steps": 10 ** 6}},
                         resolve_model=asm.load_config)
    assert recipe["train"]["min_lr_ratio"] == 0.0 and recipe["train"]["clip_grad"] is None
    assert recipe["train"]["schedule"] == "cosine" and recipe["train"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("name", ZOO)
def test_builds_on_the_meta_device(name):
    """The recipe builds the recipe's model on the meta device to compare it with a resumed checkpoint's
    (no weights allocated); ul2-small's constructor dry run called nonzero on meta tensors and failed."""
    kw = {"vocab_size": 60000} if name not in ("vit-mae-tiny", "vit-mae-base", "simclr-vit-tiny", "mocov3-vit-tiny",
                                              "dino-vit-tiny", "clip-tiny") else {}
    with torch.device("meta"):
        model = asm.build(name, **kw)
    assert all(p.device.type == "meta" for p in model.parameters())
