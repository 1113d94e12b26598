"""fastpt.models backbones and heads: the backbone protocol, padding / packing invariances,
encoder-decoder, ViT + MAE decoder, heads with the fused loss, builder configs, fastpt's format."""
import pytest
import torch
import torch.nn.functional as F

import fastpt
from fastpt.models import (BackboneOutput, EncoderDecoder, LMHead, MAEDecoder, MLMHead, Pooler, TextEncoder,
                           VisionEncoder, encoder_decoder, load_fastpt, mae_decoder, patchify, save_fastpt,
                           text_encoder, unpatchify, vit)
from fastpt.models.hf import BUILDERS


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ids(*shape, seed=0, low=1, high=97):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def _bert(**kw):
    torch.manual_seed(0)
    return text_encoder(vocab_size=97, hidden_size=40, num_layers=2, num_heads=5, intermediate_size=37,
                        **kw).eval()


@pytest.mark.parametrize("kw", [dict(), dict(position="rotary", pre_norm=True, type_vocab_size=0),
                                dict(position="sinusoidal", causal=True, pre_norm=True)],
                         ids=["learned", "rotary", "sinusoidal-causal"])
def test_text_encoder_padding_and_packing_match_separate_rows(kw, device):
    model = _bert(**kw).to(device)
    tol = 1e-5 if device == "cpu" else 1e-2  # CUDA: the Triton kernels may multiply fp32 in TF32
    lengths = [17, 9, 4]
    ids = _ids(3, 17).to(device)
    mask = (torch.arange(17)[None] < torch.tensor(lengths)[:, None]).long().to(device)
    with torch.no_grad():
        batch = model(ids, mask).last_hidden_state
        alone = [model(ids[i:i + 1, :n]).last_hidden_state[0] for i, n in enumerate(lengths)]
        cu = torch.tensor([0, 17, 26, 30], dtype=torch.int32, device=device)
        packed = model(torch.cat([ids[i, :n] for i, n in enumerate(lengths)]), cu_seqlens=cu)
        packed_1t = model(torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None], cu_seqlens=cu)
    assert isinstance(packed, BackboneOutput) and packed.last_hidden_state.shape == (30, 40)
    assert packed_1t.last_hidden_state.shape == (1, 30, 40)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(batch[i, :n], alone[i], rtol=tol, atol=tol)
        torch.testing.assert_close(packed.last_hidden_state[cu[i]:cu[i + 1]], alone[i], rtol=tol, atol=tol)


@pytest.mark.parametrize("position", ["learned", "rotary", "alibi"])
def test_bf16_autocast_training_step(position, device):
    """The whole stack under bf16 autocast: padding, prefix-LM, packing, GQA; finite gradients."""
    torch.manual_seed(0)
    model = text_encoder(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         position=position, pre_norm=True, norm="rmsnorm", activation="swiglu", dropout=0.0,
                         attention_dropout=0.0).to(device).train()
    ids = _ids(3, 17).to(device)
    mask = (torch.arange(17)[None] < torch.tensor([17, 9, 4])[:, None]).long().to(device)
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        a = model(ids, mask, prefix_lens=torch.tensor([5, 0, 4], device=device)).last_hidden_state
        b = model(ids[0], cu_seqlens=cu, causal=True).last_hidden_state
    assert a.shape == (3, 17, 64) and b.shape == (17, 64)  # the fp32 residual stream stays fp32
    ((a.float() * mask[..., None]).square().mean() + b.float().square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_text_encoder_mask_kinds_and_protocol():
    model = _bert()
    assert (model.hidden_size, model.vocab_size) == (40, 97)
    assert model.embeddings.word_embeddings.weight.shape == (97, 40)
    assert model.config["builder"] == "text_encoder" and model.config["hidden_size"] == 40
    ids = _ids(2, 11)
    with torch.no_grad():
        full = model(ids).last_hidden_state
        causal = model(ids, causal=True).last_hidden_state
        changed = ids.clone()
        changed[:, 6:] = _ids(2, 5, seed=1)
        # causal: earlier positions do not see later tokens; bidirectional ones do
        torch.testing.assert_close(model(changed, causal=True).last_hidden_state[:, :6], causal[:, :6])
        assert not torch.allclose(model(changed).last_hidden_state[:, :6], full[:, :6])
        # prefix-LM: the prefix is bidirectional (prefix 11 = all, 0 = causal)
        torch.testing.assert_close(model(ids, prefix_lens=torch.tensor([11, 11])).last_hidden_state, full)
        torch.testing.assert_close(model(ids, prefix_lens=torch.tensor([0, 0])).last_hidden_state, causal)
        out = model(ids, output_hidden_states=True, token_type_ids=torch.ones_like(ids))
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 11, 40)
    assert causal.shape == (2, 11, 40)


def test_encoder_decoder():
    torch.manual_seed(0)
    model = encoder_decoder(vocab_size=97, hidden_size=32, num_encoder_layers=2, num_decoder_layers=1, num_heads=4,
                            activation="geglu").eval()
    assert isinstance(model, EncoderDecoder) and model.shared is model.encoder.embeddings.word_embeddings
    assert (model.hidden_size, model.vocab_size) == (32, 97)
    ids, dec = _ids(3, 13), _ids(3, 7, seed=1)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = model(ids, mask, dec)
        assert out.last_hidden_state.shape == (3, 7, 32) and out.encoder_last_hidden_state.shape == (3, 13, 32)
        # encoder padding is invisible to the decoder
        other = ids.clone()
        other[1, 8:] = 5
        torch.testing.assert_close(model(other, mask, dec).last_hidden_state, out.last_hidden_state)
        # the decoder is causal
        later = dec.clone()
        later[:, 4:] = 3
        torch.testing.assert_close(model(ids, mask, later).last_hidden_state[:, :4], out.last_hidden_state[:, :4])
    model.train()
    model.gradient_checkpointing = True
    assert model.encoder.gradient_checkpointing
    model(ids, mask, dec).last_hidden_state.sum().backward()
    assert model.shared.weight.grad is not None
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(ids, mask)


@pytest.mark.parametrize("zoo", ["t5-small", "ul2-small"])
def test_decoder_start_row_learns(zoo, tmp_path):
    """The shared embedding had padding_idx = pad_token_id = 0, T5's decoder start token: the first decoder
    input of every row was a zero vector that never got a gradient through the lookup (HF's T5 has no
    padding_idx). It now starts random and learns; a checkpoint of the old layout still loads."""
    torch.manual_seed(0)
    over = dict(vocab_size=100, hidden_size=32, num_heads=4, intermediate_size=64, num_encoder_layers=1,
                num_decoder_layers=1)
    model = fastpt.build(zoo, backbone=over, objective={"tie_word_embeddings": False},
                         special_ids={"pad": 0, "eos": 1})
    start = model.objective.decoder_start_id
    assert start == model.backbone.config["pad_token_id"] == 0 and model.backbone.shared.padding_idx is None
    assert model.backbone.shared.weight[start].abs().sum() > 0
    batch = model.prepare({"input_ids": _ids(4, 20, low=2, high=90)}, seed=0)
    assert (batch["decoder_input_ids"][:, 0] == start).all()
    model(**batch).loss.backward()  # untied head: the row's gradient can only come from the decoder input
    assert model.backbone.shared.weight.grad[start].abs().sum() > 0
    with torch.no_grad():
        model.backbone.shared.weight[start].zero_()  # as an old checkpoint holds it
    model.save_pretrained(tmp_path)
    back = fastpt.PretrainModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def _t5_tokens(model, names: dict) -> list[str]:
    """The order in which ``model``'s forward calls its embeddings ("E"), norms ("N"), attention output
    projections ("A"), feed-forward input / output projections ("I" / "O") and dropouts with p > 0
    ("D"), by module name: a map of where each dropout sits."""
    calls = []
    for name, mod in model.named_modules():
        tag = next((t for t, match in names.items() if match(name, mod)), None)
        if tag is not None:
            mod.register_forward_pre_hook(lambda m, args, tag=tag: calls.append(tag))
    return calls


@pytest.mark.parametrize("zoo", ["t5-small", "ul2-small"])
def test_t5_dropout_sites_match_transformers(zoo):
    """make_layers built the feed-forward without its dropout, so T5's dropout between activation and
    output projection (T5DenseActDense) was missing, and so was the dropout after each stack's final
    norm (T5Stack): 9 dropout calls of T5's 19 with 2 + 1 layers. The sites now match HF T5 in train mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = fastpt.build(zoo, backbone=dict(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=64,
                                            num_encoder_layers=2, num_decoder_layers=1)).backbone.train()
    assert model.config["ff_dropout"] == model.config["dropout"] == 0.1
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        dropout_rate=0.1)).train()
    dropout = lambda n, m: isinstance(m, torch.nn.Dropout) and m.p > 0  # noqa: E731
    ours = _t5_tokens(model, {
        "D": dropout, "E": lambda n, m: isinstance(m, torch.nn.Embedding),
        "N": lambda n, m: n.endswith(("norm", "norm1", "norm2", "cross_norm")),
        "A": lambda n, m: n.endswith("attn.out_proj"), "I": lambda n, m: n.endswith("mlp.fc1"),
        "O": lambda n, m: n.endswith("mlp.fc2")})
    theirs = _t5_tokens(hf, {
        "D": dropout, "E": lambda n, m: n.endswith("embed_tokens"), "N": lambda n, m: n.endswith("layer_norm"),
        "A": lambda n, m: n.endswith(("SelfAttention.o", "EncDecAttention.o")),
        "I": lambda n, m: n.endswith("DenseReluDense.wi"), "O": lambda n, m: n.endswith("DenseReluDense.wo")})
    ids, dec = _ids(2, 9, high=64), _ids(2, 5, seed=1, high=64)
    model(ids, None, dec)
    hf(input_ids=ids, decoder_input_ids=dec)
    layer = "NAD" + "NIDOD"
    assert "".join(ours) == "".join(theirs) == "ED" + 2 * layer + "ND" + "ED" + "NADNAD" + "NIDOD" + "ND"
    # the feed-forward's inner dropout drops activations at its rate (gelu: an exact zero is a drop)
    model = fastpt.build(zoo, backbone=dict(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=256,
                                            num_encoder_layers=1, num_decoder_layers=1, activation="gelu",
                                            ff_dropout=0.3)).backbone.train()
    seen = []
    model.encoder.layers[0].mlp.fc2.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(_ids(4, 64, high=64), None, _ids(4, 3, seed=1, high=64))
    assert abs((seen[0] == 0).float().mean().item() - 0.3) < 0.02


def test_ff_dropout_only_in_the_encoder_decoder():
    """ff_dropout is the encoder-decoder's (T5's): the BERT / GPT-2 / ViT zoo models keep a 0 inner
    dropout and their state_dict keys; encoder_decoder's default follows ``dropout`` as T5's."""
    for name in ("bert-tiny", "gpt2-small", "albert-base", "vit-mae-tiny"):
        with torch.device("meta"):
            backbone = fastpt.build(name).backbone
        assert {m.mlp.dropout.p for m in backbone.layers} == {0.0}, name
        assert not any("dropout" in k for k in backbone.state_dict()), name
    model = encoder_decoder(vocab_size=50, hidden_size=24, num_encoder_layers=1, num_heads=3, dropout=0.2)
    assert model.encoder.layers[0].mlp.dropout.p == model.decoder_layers[0].mlp.dropout.p == 0.2
    assert model.final_dropout.p == 0.2
    model = encoder_decoder(vocab_size=50, hidden_size=24, num_encoder_layers=1, num_heads=3, ff_dropout=0.0)
    assert model.encoder.layers[0].mlp.dropout.p == 0.0
    with pytest.raises(ValueError, match="ff_dropout"):
        encoder_decoder(vocab_size=50, hidden_size=24, num_encoder_layers=1, num_heads=3, ff_dropout=1.5)


def test_vision_encoder_and_mae_decoder():
    torch.manual_seed(0)
    enc = vit(image_size=(24, 16), patch_size=8, in_channels=10, hidden_size=32, num_layers=2, num_heads=4,
              norm_eps=1e-6, position="sincos").eval()
    assert isinstance(enc, VisionEncoder)
    assert (enc.num_patches, enc.patch_size, enc.in_channels, enc.hidden_size) == (6, 8, 10, 32)
    x = _x(2, 10, 24, 16)
    with torch.no_grad():
        full = enc(x).last_hidden_state
        assert full.shape == (2, 7, 32)
        # keeping every patch in order is the full forward
        torch.testing.assert_close(enc(x, ids_keep=torch.arange(6).expand(2, 6)).last_hidden_state, full)
        ids_keep, _, ids_restore = fastpt.ops.random_masking(2, 6, mask_ratio=0.5, seed=0)
        latent = enc(x, ids_keep=ids_keep).last_hidden_state
    assert latent.shape == (2, 4, 32)

    dec = mae_decoder(num_patches=6, patch_size=8, in_channels=10, encoder_dim=32, hidden_size=16, num_layers=0,
                      num_heads=2, grid_size=(3, 2))
    assert isinstance(dec, MAEDecoder)
    pred = dec(latent, ids_restore)
    assert pred.shape == (2, 6, 8 * 8 * 10) == patchify(x, 8).shape
    # depth 0: each output is a function of its own token + position; check the unshuffle
    tokens = dec.decoder_embed(latent[:, 1:])
    pos = dec.position_embeddings[0, 1:]
    for b in range(2):
        for j, p in enumerate(ids_keep[b].tolist()):
            torch.testing.assert_close(pred[b, p], dec.pred(dec.norm(tokens[b, j] + pos[p])))
        for p in set(range(6)) - set(ids_keep[b].tolist()):
            torch.testing.assert_close(pred[b, p], dec.pred(dec.norm(dec.mask_token[0, 0] + pos[p])))
    assert torch.equal(unpatchify(patchify(x, 8), 8, (3, 2), 10), x)
    with pytest.raises(ValueError, match="ids_restore"):
        dec(latent, ids_restore[:, :5])
    with pytest.raises(ValueError, match="num_patches"):
        MAEDecoder(6, 8, 10, 32, 16, 1, 2)


def test_clip_token_zero_is_an_ordinary_row():
    """clip-tiny set the text tower's pad_token_id to 0, the embedding's padding_idx: CLIP's token 0 ("!",
    a real BPE token; CLIP has no padding row) was a frozen zero row that never got a gradient."""
    torch.manual_seed(0)
    model = fastpt.build("clip-tiny", backbone=dict(
        text=dict(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        vision=dict(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)),
        objective=dict(embed_dim=16))
    emb = model.backbone.text.embeddings.word_embeddings
    assert emb.padding_idx is None and emb.weight[0].abs().sum() > 0
    ids = torch.tensor([[49406, 320, 1125, 0, 49407, 0, 0], [49406, 320, 1929, 0, 0, 49407, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    model(input_ids=ids, attention_mask=mask, pixel_values=_x(2, 3, 16, 16)).loss.backward()
    assert emb.weight.grad[0].abs().sum() > 0


def test_vit_embedding_norm_matches_clip_vision_tower():
    """vit() had no norm between the patch embedding and the first layer, so clip-tiny's vision tower lacked
    CLIP's ln_pre (HF pre_layrnorm): image embeddings were 1.19 (relative) off HF CLIP's with the same
    weights. embedding_norm=True adds it (clip-tiny sets it); float64, weights copied by hand."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    d, heads = 32, 4
    model = fastpt.build("clip-tiny", backbone=dict(vision=dict(image_size=16, patch_size=4, hidden_size=d,
                                                                num_layers=2, num_heads=heads, intermediate_size=64)),
                         objective=dict(embed_dim=16)).double().eval()
    v, proj = model.backbone.vision, model.objective.vision_projection
    assert v.config["embedding_norm"] and isinstance(v.embedding_norm, torch.nn.LayerNorm)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from the identity, nonzero biases
        v.patch_embed.projection.bias.zero_()  # CLIP's patch convolution has no bias
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        image_size=16, patch_size=4, hidden_size=d, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=64, hidden_act="gelu", layer_norm_eps=v.config["norm_eps"], projection_dim=16)).double()
    sd = {"visual_projection.weight": proj.weight, "vision_model.embeddings.class_embedding": v.patch_embed.cls_token,
          "vision_model.embeddings.patch_embedding.weight": v.patch_embed.projection.weight,
          "vision_model.embeddings.position_embedding.weight": v.patch_embed.position_embeddings[0]}
    pairs = {"vision_model.pre_layrnorm": v.embedding_norm, "vision_model.post_layernorm": v.final_norm}
    for i, layer in enumerate(v.layers):
        p = f"vision_model.encoder.layers.{i}."
        for j, name in enumerate("qkv"):
            sd[p + f"self_attn.{name}_proj.weight"] = layer.attn.in_proj_weight[j * d:(j + 1) * d]
            sd[p + f"self_attn.{name}_proj.bias"] = layer.attn.in_proj_bias[j * d:(j + 1) * d]
        pairs.update({p + "self_attn.out_proj": layer.attn.out_proj, p + "layer_norm1": layer.norm1,
                      p + "layer_norm2": layer.norm2, p + "mlp.fc1": layer.mlp.fc1, p + "mlp.fc2": layer.mlp.fc2})
    for prefix, mod in pairs.items():
        sd[prefix + ".weight"], sd[prefix + ".bias"] = mod.weight, mod.bias
    hf.load_state_dict({k: t.detach().reshape(hf.state_dict()[k].shape) for k, t in sd.items()}, strict=True)
    hf.eval()
    x = _x(3, 3, 16, 16).double()
    with torch.no_grad():
        ours, ref = proj(v(x).last_hidden_state[:, 0]), hf(pixel_values=x).image_embeds
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-12


def test_vit_default_has_no_embedding_norm():
    """embedding_norm defaults to False: a ViT keeps its state_dict keys and its forward
    (patch embedding -> layers -> final norm); only clip-tiny's vision tower turns it on."""
    torch.manual_seed(0)
    enc = vit(image_size=8, patch_size=4, hidden_size=24, num_layers=1, num_heads=3).eval()
    assert enc.embedding_norm is None and not enc.config["embedding_norm"]
    assert not any(k.startswith("embedding_norm") for k in enc.state_dict())
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).last_hidden_state, enc.final_norm(enc.layers[0](enc.patch_embed(x))))
    on = vit(image_size=8, patch_size=4, hidden_size=24, num_layers=1, num_heads=3, embedding_norm=True)
    assert set(on.state_dict()) - set(enc.state_dict()) == {"embedding_norm.weight", "embedding_norm.bias"}
    for name in ("vit-mae-tiny", "simclr-vit-tiny", "mocov3-vit-tiny", "dino-vit-tiny"):
        with torch.device("meta"):
            assert fastpt.build(name).backbone.embedding_norm is None, name


def test_heads_and_fused_loss():
    model = _bert()
    emb = model.embeddings.word_embeddings.weight
    mlm = MLMHead(40, 97, tied_weight=emb)
    assert mlm.weight is emb and mlm.bias.shape == (97,)
    h = model(_ids(3, 17)).last_hidden_state
    logits = mlm(h)
    torch.testing.assert_close(logits, F.linear(mlm.transform(h), emb, mlm.bias))
    labels = torch.full((3, 17), -100)
    labels[:, 3] = _ids(3, seed=2)
    sel = labels != -100
    loss = fastpt.ops.linear_cross_entropy(mlm.transform(h[sel]), mlm.weight, labels[sel], bias=mlm.bias)
    torch.testing.assert_close(loss, F.cross_entropy(logits[sel], labels[sel]), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert emb.grad is not None and mlm.dense.weight.grad is not None

    lm = LMHead(40, 97, tied_weight=emb)
    assert lm.bias is None and lm(h).shape == (3, 17, 97)
    assert Pooler(40)(h).shape == (3, 40)
    with pytest.raises(ValueError, match="tied_weight"):
        MLMHead(40, 96, tied_weight=emb)
    with pytest.raises(ValueError, match="activation"):
        MLMHead(40, 97, activation="swiglu")


def test_heads_are_bert_initialised():
    """The heads' dense layers kept torch's nn.Linear default (std ~1/sqrt(3 D), e.g. 0.05 for bert-tiny's
    MLM head, non-zero bias) instead of BERT's normal(0, initializer_range) and zero bias."""
    torch.manual_seed(0)
    mlm = MLMHead(256, 97, initializer_range=0.05)
    pooler, lm = Pooler(256), LMHead(256, 97, bias=True, initializer_range=0.03)
    for lin, std in ((mlm.dense, 0.05), (pooler.dense, 0.02)):
        assert abs(lin.weight.std().item() - std) < 0.1 * std and abs(lin.weight.mean().item()) < 0.1 * std
        assert torch.equal(lin.bias, torch.zeros(256))
    assert abs(mlm.weight.std().item() - 0.05) < 0.005 and abs(lm.weight.std().item() - 0.03) < 0.003
    assert torch.equal(mlm.bias, torch.zeros(97)) and torch.equal(lm.bias, torch.zeros(97))
    assert torch.equal(mlm.layer_norm.weight, torch.ones(256)) and torch.equal(mlm.layer_norm.bias, torch.zeros(256))
    emb = torch.nn.Parameter(torch.randn(97, 256))
    before = emb.detach().clone()
    assert torch.equal(MLMHead(256, 97, tied_weight=emb).weight, before)  # a tied weight is left alone
    with pytest.raises(ValueError, match="initializer_range"):
        Pooler(8, initializer_range=0.0)
    with torch.device("meta"):
        fastpt.build("bert-tiny")  # no data to draw: still builds
    head = fastpt.build("bert-tiny").objective.head  # the zoo's MLM head (tied, recreated by attach)
    assert abs(head.dense.weight.std().item() - 0.02) < 0.002 and not head.dense.bias.any()


@pytest.mark.parametrize("name,kw", [
    ("text_encoder", dict(vocab_size=50, hidden_size=24, num_layers=1, num_heads=3, embed_dim=8)),
    ("encoder_decoder", dict(vocab_size=50, hidden_size=24, num_encoder_layers=1, num_heads=3)),
    ("vit", dict(image_size=8, patch_size=4, hidden_size=24, num_layers=1, num_heads=3)),
])
def test_builders_rebuild_from_their_config(name, kw):
    model = BUILDERS[name](**kw)
    config = dict(model.config)
    assert config.pop("builder") == name
    again = BUILDERS[name](**config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_init_std():
    model = text_encoder(vocab_size=500, hidden_size=64, num_layers=1, num_heads=4, initializer_range=0.05)
    assert abs(model.layers[0].attn.in_proj_weight.std().item() - 0.05) < 0.005
    assert float(model.embeddings.word_embeddings.weight[0].detach().abs().sum()) == 0.0  # the padding row
    assert torch.equal(model.layers[0].norm1.weight, torch.ones(64))


def test_fastpt_format_round_trip(tmp_path):
    model = _bert(type_vocab_size=0)
    heads = {"mlm": MLMHead(40, 97, tied_weight=model.embeddings.word_embeddings.weight), "pooler": Pooler(40)}
    save_fastpt(tmp_path, model, heads)
    back, back_heads, config = load_fastpt(tmp_path)
    assert isinstance(back, TextEncoder) and config["heads"]["mlm"]["tied"]
    assert back_heads["mlm"].weight is back.embeddings.word_embeddings.weight
    for a, b in zip(list(model.state_dict().values()) + list(heads["pooler"].state_dict().values()),
                    list(back.state_dict().values()) + list(back_heads["pooler"].state_dict().values())):
        assert torch.equal(a, b)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "heads.mlm.weight" not in f.keys() and "heads.mlm.bias" in f.keys()  # tied: stored once
