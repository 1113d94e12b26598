"""PretrainModel (the backbone + objective composition) and the model pieces it brought: position-table
resizing for other image sizes, ALBERT's factorised MLM head and shared layers, the two-tower backbone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastpt.assemble  # noqa: F401  (registers PretrainModel.builder for from_pretrained)
from fastpt.models import (MLMHead, ModelOutput, PatchEmbedding, PretrainModel, TwoTower, TwoTowerOutput, text_encoder,
                           two_tower, vit)
from fastpt.objectives import MLM, CausalLM, MoCoV3

V = 53


def tiny_text(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=40, max_positions=32,
                dropout=0.0, attention_dropout=0.0)
    return text_encoder(**{**args, **kw})


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, 17), generator=g)
    mask = (torch.arange(17)[None] < torch.tensor([17, 9, 13])[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_forward_delegates_to_the_objective():
    backbone = tiny_text()
    objective = MLM.from_backbone(backbone, mask_token_id=3, special_token_ids=(0,))
    model = PretrainModel(backbone, objective)
    raw = batch()
    prepared = model.prepare(raw, seed=4)
    assert torch.equal(prepared["labels"], objective.prepare(raw, seed=4)["labels"])
    out = model(**prepared, return_logits=True)
    ref = objective(backbone, {**prepared, "return_logits": True})
    assert isinstance(out, ModelOutput)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state) and out.metrics.keys() == ref.metrics.keys()
    # positional input_ids / attention_mask, as a Hugging Face model is called
    again = model(prepared["input_ids"], prepared["attention_mask"], labels=prepared["labels"])
    assert torch.equal(again.loss, out.loss)
    assert model.tokens_in(prepared) == 17 + 9 + 13
    # the head is tied: listed once among the trainable parameters
    ids = [id(p) for p in model.trainable_parameters()]
    assert len(ids) == len(set(ids)) and id(backbone.embeddings.word_embeddings.weight) in ids


def test_forward_without_objective_passes_the_backbone_arguments_on():
    """forward routed only token_type_ids / position_ids / prefix_lens / cu_seqlens to the backbone and dropped
    the rest: causal=True gave bidirectional states, output_hidden_states=True no hidden states, a misspelt
    key (token_typ_ids=) or labels were ignored without a word."""
    backbone = tiny_text().eval()
    model = PretrainModel(backbone).eval()
    b = batch()
    with torch.no_grad():
        want = backbone(b["input_ids"], b["attention_mask"], causal=True, output_hidden_states=True)
        got = model(**b, causal=True, output_hidden_states=True)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        assert len(got.hidden_states) == 3 and all(map(torch.equal, got.hidden_states, want.hidden_states))
        assert model(**b).hidden_states is None
        assert not torch.equal(model(**b).last_hidden_state, want.last_hidden_state)  # causal did change them
        # the raw batch's annotations (collators, the packed collate's max_seqlen) are taken, and encode nothing
        plain = model(**b).last_hidden_state
        noted = model(**b, special_tokens_mask=torch.zeros_like(b["input_ids"]), word_ids=b["input_ids"])
        assert torch.equal(noted.last_hidden_state, plain)
    with pytest.raises(TypeError, match="token_typ_ids.*token_type_ids"):
        model(**b, token_typ_ids=torch.ones_like(b["input_ids"]))
    with pytest.raises(TypeError, match="labels.*objective"):
        model(**b, labels=b["input_ids"])
    image = vit(image_size=8, patch_size=4, in_channels=1, hidden_size=16, num_layers=2, num_heads=2)
    px = torch.randn(2, 1, 8, 8)
    out = PretrainModel(image)(pixel_values=px, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and torch.equal(out.last_hidden_state, image(px).last_hidden_state)
    with pytest.raises(TypeError, match="ids_kep"):
        PretrainModel(image)(pixel_values=px, ids_kep=torch.zeros(2, 1, dtype=torch.long))


def test_forward_with_objective_refuses_keys_nothing_reads():
    """With an objective, a key neither its forward nor its prepare uses (a typo, a backbone argument such as
    causal that the objective does not pass on) was dropped without a word: TypeError naming it."""
    backbone = tiny_text()
    model = PretrainModel(backbone, MLM.from_backbone(backbone, mask_token_id=3, special_token_ids=(0,)))
    prepared = model.prepare(batch(), seed=0)
    assert torch.isfinite(model(**prepared).loss)
    with pytest.raises(TypeError, match="bogus_key.*MLM"):
        model(**prepared, bogus_key=1)
    for key in ("causal", "output_hidden_states"):
        with pytest.raises(TypeError, match=f"{key}: the MLM objective runs the backbone itself.*model.backbone"):
            model(**prepared, **{key: True})


def test_objectives_that_pass_raw_keys_through_and_custom_ones_are_not_refused():
    """SimCLR's prepare keeps a raw image batch's other keys (class labels) and a user's Objective subclass
    declares no batch_keys: forward took them before the key check and must still (it raised TypeError);
    only the backbone's mode switches, which these objectives would ignore, are refused."""
    from fastpt.objectives import Objective, ObjectiveOutput, SimCLR

    torch.manual_seed(0)
    backbone = vit(image_size=8, patch_size=4, in_channels=1, hidden_size=16, num_layers=1, num_heads=2)
    model = PretrainModel(backbone, SimCLR.from_backbone(backbone, proj_dim=8, proj_hidden_dim=16))
    raw = {"pixel_values": torch.randn(4, 1, 8, 8), "labels": torch.arange(4)}
    assert torch.isfinite(model(**model.prepare(raw, seed=0)).loss)
    with pytest.raises(TypeError, match="output_hidden_states: the SimCLR objective runs the backbone itself"):
        model(**model.prepare(raw, seed=0), output_hidden_states=True)

    class MeanPixel(Objective):  # a user's objective: reads pixel_values itself
        needs = ()

        def forward(self, backbone, batch):
            h = backbone(batch["pixel_values"]).last_hidden_state
            return ObjectiveOutput(h.pow(2).mean(), {}, None, h)

    model = PretrainModel(backbone, MeanPixel())
    assert torch.isfinite(model(pixel_values=torch.randn(2, 1, 8, 8)).loss)


@pytest.mark.parametrize("objective", ["mlm", "clm", "prefix_lm", "self_distill"])
def test_forward_takes_every_key_of_a_packed_pipeline_batch(objective):
    """The recipe's pack-mode batches (input_ids, cu_seqlens, max_seqlen, position_ids; Recipe.to_device makes
    the rows one) go through prepare and forward (the key check must not refuse what fastpt's pipeline yields)."""
    from fastpt.data.shards import collate

    model = fastpt.assemble.build({"backbone": {"builder": "text_encoder", "vocab_size": V, "hidden_size": 16,
                                                "num_layers": 1, "num_heads": 2, "max_positions": 32},
                                   "objective": {"name": objective}, "special_ids": {"mask": 3, "pad": 0}})
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(4, V, (12,), generator=g), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
               for cu in ([0, 5, 12], [0, 12])]
    raw = collate(samples)
    assert {"cu_seqlens", "max_seqlen", "position_ids"} <= raw.keys()
    raw.update(input_ids=raw["input_ids"].reshape(1, -1), position_ids=raw["position_ids"].reshape(1, -1))  # as recipe
    assert torch.isfinite(model(**model.prepare(raw, seed=1)).loss)


def test_on_step_end_moves_the_momentum_encoder_and_frozen_copies_are_not_trainable():
    torch.manual_seed(0)
    backbone = vit(image_size=8, patch_size=4, in_channels=1, hidden_size=16, num_layers=1, num_heads=2)
    objective = MoCoV3.from_backbone(backbone, proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=16, base_momentum=0.5)
    model = PretrainModel(backbone, objective)
    frozen = {id(p) for p in objective.momentum_backbone.parameters()}
    assert not frozen & {id(p) for p in model.trainable_parameters()}
    with torch.no_grad():
        backbone.patch_embed.projection.weight.add_(1.0)
    before = objective.momentum_backbone.patch_embed.projection.weight.clone()
    model.on_step_end(0)
    after = objective.momentum_backbone.patch_embed.projection.weight
    torch.testing.assert_close(after, 0.5 * before + 0.5 * backbone.patch_embed.projection.weight)


def test_flops_per_token_follows_palm():
    backbone = tiny_text()
    model = PretrainModel(backbone, CausalLM.from_backbone(backbone))
    d, inner, layers, s = 32, 40, 2, 17
    per_layer = 4 * d * d + 2 * d * inner  # fused q/k/v + out projection, the MLP
    n = layers * per_layer + V * d  # + the tied LM head (the embedding lookups are not matmuls)
    assert model.flops_per_token(s) == 6 * n + 12 * layers * d * s
    with pytest.raises(ValueError, match="seq_len"):
        model.flops_per_token()
    shared = tiny_text(share_layers=True, num_layers=3)  # ALBERT: a shared layer counts once per use
    assert PretrainModel(shared).flops_per_token(s) == 6 * 3 * per_layer + 12 * 3 * d * s
    mlm = PretrainModel(backbone, MLM.from_backbone(backbone, mask_token_id=3, mask_prob=0.2))
    head = d * d + V * d  # the MLM transform and the tied decoder run on the masked 20% only
    assert mlm.flops_per_token(s) == pytest.approx(6 * (layers * per_layer + 0.2 * head) + 12 * layers * d * s)
    image = vit(image_size=8, patch_size=4, in_channels=1, hidden_size=16, num_layers=1, num_heads=2)
    conv = 16 * 16  # 4 x 4 x 1 patch -> 16
    assert PretrainModel(image).flops_per_token() == 6 * (conv + 4 * 16 * 16 + 2 * 16 * 64) + 12 * 16 * 5


def test_flops_per_token_weights_what_a_counted_token_runs_through():
    """The objective's weights (Objective.flops_weights): SimCLR's two views and pooled projector, MAE's
    encoder on the visible patches, T5's encoder / decoder shares of a raw token (they were charged the
    whole model per raw token: 2.4x over for t5-small; SimCLR 2x under, CLIP 1.8x over)."""
    from fastpt.objectives import MAE, SimCLR

    image = vit(image_size=8, patch_size=4, in_channels=1, hidden_size=16, num_layers=1, num_heads=2)
    bare = PretrainModel(image).flops_per_token()
    simclr = SimCLR.from_backbone(image, proj_dim=8, proj_hidden_dim=8)
    heads = sum(p.numel() for p in simclr.parameters() if p.requires_grad and p.dim() == 2)
    assert PretrainModel(image, simclr).flops_per_token() == pytest.approx(2 * bare + 6 * heads * 2 / 4)
    mae = MAE.from_backbone(image, decoder_hidden_size=8, decoder_layers=1, decoder_heads=2, mask_ratio=0.75)
    heads = sum(p.numel() for p in mae.parameters() if p.requires_grad and p.dim() == 2)  # not its mask token
    assert PretrainModel(image, mae).flops_per_token() == pytest.approx(0.25 * bare + 6 * heads)
    t5 = fastpt.assemble.build("t5-small", vocab_size=V, backbone={"hidden_size": 16, "num_heads": 2,
                                                                    "num_encoder_layers": 1, "num_decoder_layers": 1,
                                                                    "intermediate_size": 16})
    enc, dec = 1 - 0.15 + 0.15 / 3, 0.15 + 0.15 / 3
    assert t5.objective.flops_weights(t5.backbone, 64) == pytest.approx({"encoder": enc, "decoder": dec, "heads": dec})
    assert t5.flops_per_token(64) < 0.6 * PretrainModel(t5.backbone).flops_per_token(64)


def test_save_pretrained_of_a_compiled_submodule(tmp_path):
    """model.backbone = torch.compile(model.backbone) names its weights backbone._orig_mod.*: saved under the
    rebuilt model's names (the file did not load back)."""
    model = fastpt.assemble.build({"backbone": {"builder": "text_encoder", "vocab_size": V, "hidden_size": 16,
                                                "num_layers": 1, "num_heads": 2}, "objective": {"name": "clm"}})
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model.backbone = torch.compile(model.backbone)
    model.save_pretrained(tmp_path)
    back = PretrainModel.from_pretrained(tmp_path).state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], v) for k, v in want.items())


def test_a_model_without_config_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="build config"):
        PretrainModel(tiny_text()).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="backbone"):
        PretrainModel("bert")


def test_save_pretrained_round_trip_through_the_registered_builder(tmp_path):
    model = fastpt.assemble.build({"backbone": {"builder": "text_encoder", "vocab_size": V, "hidden_size": 32,
                                                "num_layers": 1, "num_heads": 4, "share_layers": True},
                                   "objective": {"name": "clm"}})
    model.save_pretrained(tmp_path)
    back = PretrainModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    assert back.objective.head.weight is back.backbone.embeddings.word_embeddings.weight


# ----------------------------------------------------------------------------- model pieces


def test_position_table_resized_like_hugging_face_vit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastpt.models import from_hf

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=2, hidden_size=24, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=40)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        hf.embeddings.position_embeddings.normal_()
    hf.save_pretrained(tmp_path)
    backbone, _, _ = from_hf(tmp_path)
    backbone.eval()
    x = torch.randn(2, 2, 24, 12)  # 6 x 3 patches instead of 4 x 4
    with pytest.raises(ValueError, match="dynamic_size"):
        backbone(x)
    backbone.patch_embed.dynamic_size = True
    with torch.no_grad():
        ours = backbone(x).last_hidden_state
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert (ours - ref).abs().max().item() <= 1e-5
        same = torch.randn(2, 2, 16, 16)  # the built size takes the table as it is
        torch.testing.assert_close(backbone(same).last_hidden_state, hf(pixel_values=same).last_hidden_state,
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="does not tile"):
        backbone(torch.randn(1, 2, 10, 12))


def test_resized_positions_are_bicubic_and_keep_the_cls_row():
    pe = PatchEmbedding(8, 4, in_channels=1, dim=8, dynamic_size=True)
    with torch.no_grad():
        pe.position_embeddings.normal_()
    table = pe.positions((3, 1))
    assert table.shape == (1, 4, 8) and torch.equal(table[:, 0], pe.position_embeddings[:, 0])
    grid = pe.position_embeddings[:, 1:].reshape(1, 2, 2, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(3, 1), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 3, 8)
    torch.testing.assert_close(table[:, 1:], ref)
    assert pe.positions((2, 2)) is pe.position_embeddings
    sincos = PatchEmbedding(8, 4, in_channels=1, dim=8, position="sincos", dynamic_size=True)
    assert sincos(torch.randn(2, 1, 12, 4), ids_keep=torch.tensor([[0, 2], [1, 0]])).shape == (2, 3, 8)


def test_factorised_mlm_head_maps_to_the_embedding_width():
    emb = torch.nn.Parameter(torch.randn(V, 8))
    head = MLMHead(32, V, tied_weight=emb, embedding_size=8)
    h = torch.randn(3, 5, 32)
    assert head.transform(h).shape == (3, 5, 8) and head.weight is emb
    torch.testing.assert_close(head(h), F.linear(head.layer_norm(F.gelu(head.dense(h))), emb, head.bias))
    with pytest.raises(ValueError, match="tied_weight"):
        MLMHead(32, V, tied_weight=emb)  # (V, 8) but the transform gives 32


def test_shared_layers_are_one_module():
    enc = tiny_text(share_layers=True, num_layers=4)
    assert len(enc.layers) == 4 and all(layer is enc.layers[0] for layer in enc.layers)
    unshared = tiny_text(num_layers=1)
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in unshared.parameters())
    out = enc(**batch()).last_hidden_state
    out.sum().backward()
    assert enc.layers[0].mlp.fc1.weight.grad is not None
    assert enc.config["share_layers"] is True


def test_two_tower():
    torch.manual_seed(0)
    model = two_tower(text=dict(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, causal=True),
                      vision=dict(builder="vit", image_size=8, patch_size=4, in_channels=1, hidden_size=24,
                                  num_layers=1, num_heads=2))
    assert isinstance(model, TwoTower) and model.text.hidden_size == 16 and model.vision.hidden_size == 24
    assert model.config["builder"] == "two_tower" and model.config["vision"]["image_size"] == 8
    out = model(**batch(), pixel_values=torch.randn(3, 1, 8, 8))
    assert isinstance(out, TwoTowerOutput)
    assert out.text.last_hidden_state.shape == (3, 17, 16) and out.vision.last_hidden_state.shape == (3, 5, 24)
    assert model(pixel_values=torch.randn(2, 1, 8, 8)).text is None
    model.gradient_checkpointing = True
    assert model.text.gradient_checkpointing and model.vision.gradient_checkpointing
    with pytest.raises(ValueError, match="input_ids, pixel_values"):
        model()
    with pytest.raises(ValueError, match="vision.builder"):
        two_tower(text=dict(vocab_size=V), vision=dict(builder="text_encoder"))
    with pytest.raises(TypeError, match="text"):
        two_tower(text=None, vision={})


def test_encoder_decoder_flops_count_each_side_on_its_own_tokens():
    """Kaplan / PaLM per side: the encoder's weights x encoder tokens, the decoder's x decoder tokens, the
    decoder's cross-attention K/V projections x encoder tokens, attention 12 * layers * width * keys attended
    (the encoder its row; the decoder its row + the encoder's). fastpt charged the cross K/V at the decoder's
    share and both stacks' attention at the raw seq_len: t5-small 174.9 against 186.6 MFLOP per raw token."""
    t5 = fastpt.assemble.build("t5-small", vocab_size=V, backbone={"hidden_size": 16, "num_heads": 2,
                                                                    "num_encoder_layers": 2, "num_decoder_layers": 3,
                                                                    "intermediate_size": 24})
    bb, s, d = t5.backbone, 64, 16
    enc, dec = 1 - 0.15 + 0.15 / 3, 0.15 + 0.15 / 3  # T5 span corruption's shares of a raw token
    s_enc, s_dec = enc * s, dec * s

    def matrices(names):
        return sum(p.numel() for n, p in bb.named_parameters() if p.dim() == 2 and "embeddings" not in n and names(n))

    n_enc = matrices(lambda n: n.startswith("encoder."))
    n_kv = matrices(lambda n: "cross_attn.kv_proj" in n)
    n_dec = matrices(lambda n: not n.startswith("encoder.")) - n_kv
    assert n_kv == 3 * 2 * d * d
    heads = sum(p.numel() for p in t5.objective.parameters() if p.requires_grad and p.dim() == 2)
    want = (enc * (6 * n_enc + 12 * 2 * d * s_enc) + enc * 6 * n_kv
            + dec * (6 * n_dec + 12 * 3 * d * (s_dec + s_enc)) + dec * 6 * heads)
    assert t5.flops_per_token(s) == pytest.approx(want, rel=1e-12)
    # an encoder-decoder without the objective's shares: both rows seq_len long, cross-attention over the encoder's
    plain = PretrainModel(bb).flops_per_token(s)
    assert plain == pytest.approx(6 * (n_enc + n_kv + n_dec) + 12 * 2 * d * s + 12 * 3 * d * 2 * s, rel=1e-12)
    with pytest.raises(ValueError, match="seq_len"):
        t5.flops_per_token()
