"""fastpt.assemble: configs (zoo names, YAML, dicts, nested overrides), validation errors that name
the key, special-token ids, checkpoints (exact round trip, atomic write), Hugging Face interop."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

import fastpt.assemble as asm
from fastpt.models import PretrainModel
from fastpt.models.model import CONFIG_FILE, WEIGHTS_FILE

IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
TINY_TEXT = dict(builder="text_encoder", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=40, max_positions=32, dropout=0.0, attention_dropout=0.0)
TINY_VIT = dict(image_size=28, in_channels=1, patch_size=7, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=40)


def tiny_mlm(**objective) -> dict:
    return {"name": "tiny", "backbone": dict(TINY_TEXT), "objective": {"name": "mlm", **objective},
            "special_ids": dict(IDS)}


def text_batch(vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 17), generator=g)
    mask = (torch.arange(17)[None] < torch.tensor([17, 11, 14])[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


# ----------------------------------------------------------------------------- configs


def test_zoo_names_yaml_paths_dicts_and_checkpoint_dirs(tmp_path):
    assert "bert-base" in asm.list_configs() and "vit-mae-tiny" in asm.list_configs()
    zoo = asm.load_config("bert-mini")
    assert zoo["backbone"]["hidden_size"] == 256 and zoo["objective"]["name"] == "mlm"
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tiny_mlm()))
    assert asm.load_config(path) == asm.load_config(str(path)) == asm.load_config(tiny_mlm())
    model = asm.build(path)
    model.save_pretrained(tmp_path / "ckpt")
    assert asm.load_config(tmp_path / "ckpt") == model.config


def test_overrides_merge_nested_dicts():
    cfg = asm.load_config("vit-mae-tiny", backbone={"image_size": 28, "in_channels": 1, "patch_size": 4})
    assert cfg["backbone"]["hidden_size"] == 192 and cfg["backbone"]["image_size"] == 28
    clip = asm.load_config("clip-tiny", backbone={"vision": {"image_size": 28, "in_channels": 1}})
    assert clip["backbone"]["vision"]["patch_size"] == 16 and clip["backbone"]["text"]["max_positions"] == 77
    base = {"backbone": dict(TINY_TEXT)}
    asm.merge(base, {"backbone": {"hidden_size": 8}})
    assert base["backbone"]["hidden_size"] == 32  # inputs are not changed
    model = asm.build("vit-mae-tiny", backbone=TINY_VIT, objective={"decoder_hidden_size": 16, "decoder_heads": 2})
    assert model.backbone.num_patches == 16 and model.backbone.in_channels == 1
    assert model.objective.decoder.num_patches == 16
    assert model.config["backbone"]["image_size"] == 28


def test_errors_name_the_key_and_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'bert-bas' is neither a zoo name .*bert-base.*vit-mae-tiny.* "
                                         r"\(did you mean 'bert-base'\?\)"):
        asm.load_config("bert-bas")
    with pytest.raises(FileNotFoundError, match="nope.yaml' is neither a zoo name"):  # meant as a path
        asm.load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match=r"backbone\.hidden_sise: unknown argument of builder 'text_encoder'; "
                                         r"valid keys: vocab_size, hidden_size"):
        asm.load_config("bert-base", backbone={"hidden_sise": 3})
    with pytest.raises(ValueError, match=r"objective\.mask_prb: .* valid keys: .*mask_prob"):
        asm.load_config("bert-base", objective={"mask_prb": 0.2})
    with pytest.raises(ValueError, match=r"backbone\.vision\.imagesize: .*image_size"):
        asm.load_config("clip-tiny", backbone={"vision": {"imagesize": 28}})
    with pytest.raises(ValueError, match="config: unknown key 'objectiv'; valid keys: name, description, backbone"):
        asm.load_config({**tiny_mlm(), "objectiv": {}})
    with pytest.raises(ValueError, match="defaults: unknown key 'lrr'"):
        asm.load_config("bert-base", defaults={"lrr": 1e-4})
    with pytest.raises(ValueError, match=r"backbone\.builder: expected one of \['encoder_decoder', 'text_encoder', "
                                         r"'two_tower', 'vit'\], got 'resnet'"):
        asm.load_config("bert-base", backbone={"builder": "resnet"})
    with pytest.raises(ValueError, match=r"objective\.name: expected one of \[.*'mlm'.*\], got 'mlmm'"):
        asm.load_config("bert-base", objective={"name": "mlmm"})
    with pytest.raises(TypeError, match=r"backbone\.hidden_size: expected int, got str '768'"):
        asm.load_config("bert-base", backbone={"hidden_size": "768"})
    with pytest.raises(TypeError, match=r"objective\.mask_prob: expected float, got str"):
        asm.load_config("bert-base", objective={"mask_prob": "high"})
    with pytest.raises(TypeError, match=r"objective\.global_crop_scale: expected tuple\[float, float\], got list"):
        asm.load_config("dino-vit-tiny", objective={"global_crop_scale": [0.4]})
    with pytest.raises(TypeError, match=r"special_ids\.mask: expected a token id"):
        asm.load_config(tiny_mlm(), special_ids={"mask": -1})
    with pytest.raises(ValueError, match="backbone: required"):
        asm.load_config({"objective": {"name": "mlm"}})
    with pytest.raises(TypeError, match="config: expected a zoo name"):
        asm.load_config(3)
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        asm.load_config(bad)
    # values the builders / objectives reject come back prefixed with the section
    with pytest.raises(ValueError, match=r"backbone \(text_encoder\): .*num_heads"):
        asm.build(tiny_mlm(), backbone={"num_heads": 5})
    with pytest.raises(ValueError, match=r"objective \(mlm\): mask_token_id"):
        asm.build("bert-tiny", vocab_size=50)  # the zoo's [MASK] = 103 is not in a 50-token vocabulary
    with pytest.raises(ValueError, match="vocab_size: a vit backbone has no vocabulary"):
        asm.build("vit-mae-tiny", vocab_size=50)


def test_special_ids_fill_the_objective():
    # config's special_ids (the zoo's published tokenizer) when build gets none
    model = asm.build("bert-tiny")
    assert model.objective.mask_token_id == 103 and model.objective.special_token_ids == (0, 101, 102)
    # build's special_ids win over the config's; the ones used are recorded
    ids = {"cls": 7, "sep": 8, "pad": 1, "mask": 9}
    model = asm.build("bert-tiny", vocab_size=40, special_ids=ids, backbone={"num_layers": 1})
    assert model.objective.mask_token_id == 9 and model.objective.special_token_ids == (1, 7, 8)
    assert model.backbone.vocab_size == 40 and model.config["special_ids"]["mask"] == 9
    assert model.config["objective"]["mask_token_id"] == 9
    # an explicit id in the config wins
    model = asm.build(tiny_mlm(mask_token_id=3), special_ids={"mask": 4})
    assert model.objective.mask_token_id == 3
    # a required id nobody gives
    cfg = tiny_mlm()
    del cfg["special_ids"]
    with pytest.raises(ValueError, match=r"objective\.mask_token_id: required by MLM .*special_ids=\{'mask': id\}"):
        asm.build(cfg)
    # seq2seq ids: null -> filled; sentence pairs: cls / sep / pad
    t5 = asm.build("t5-small", vocab_size=50, special_ids={"pad": 2, "eos": 3},
                   backbone={"hidden_size": 16, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                             "intermediate_size": 16})
    assert (t5.objective.pad_id, t5.objective.eos_id, t5.objective.sentinel_start_id) == (2, 3, 49)
    # the zoo's own tokenizer: T5's <extra_id_0> (32099 of 32128), not vocab_size - 1 (an id T5 does not have)
    assert asm.build("t5-small").objective.sentinel_start_id == 32099
    assert asm.build("ul2-small").objective.sentinel_start_id == 32099
    albert = asm.build("albert-base", vocab_size=60, special_ids={"pad": 0, "cls": 5, "sep": 6, "mask": 7},
                       backbone={"hidden_size": 32, "num_heads": 4, "num_layers": 2, "intermediate_size": 32})
    sop = albert.objective
    assert (sop.cls_token_id, sop.sep_token_id, sop.mlm.mask_token_id) == (5, 6, 7)


def test_albert_shares_layers_and_ties_a_factorised_head():
    model = asm.build("albert-base", backbone={"num_layers": 3, "hidden_size": 32, "num_heads": 4,
                                               "intermediate_size": 32, "embed_dim": 16})
    layers = model.backbone.layers
    assert layers[0] is layers[1] is layers[2]
    head = model.objective.mlm.head
    assert head.weight is model.backbone.embeddings.word_embeddings.weight and head.weight.shape == (30000, 16)
    assert head.dense.out_features == 16


def test_objectives_compose_with_the_backbones_they_are_built_on():
    """Assemble-on-demand pairings that built and then trained something else or failed at step 1: gpt2-small
    (a causal stack) + mlm ran the MLM causally (now bidirectionally: causal is the stack's default mask kind,
    which the objective sets, in the saved config too: eval and to_hf ran the causal default); roberta-base + sop failed at the first step (no segment type 1); albert
    + clm failed with the head's tied_weight shapes; clip-tiny (a causal text tower) + text_pooling first gave
    every caption one embedding. Each now trains as asked or is refused at build, naming the option."""
    small = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 40, "max_positions": 32}
    gpt = asm.build("gpt2-small", vocab_size=61, backbone=small, objective={"name": "mlm", "mask_token_id": 4},
                    special_ids=IDS).eval()
    # the objective's mask is the backbone's default and its saved config: eval / export see what trained
    assert gpt.backbone.causal is False and gpt.config["backbone"]["causal"] is False
    bert = asm.load_config("bert-tiny", backbone=small)
    bert["objective"] = {"name": "clm"}
    bert = asm.build(bert, vocab_size=61)
    assert bert.backbone.causal is True and bert.config["backbone"]["causal"] is True
    ids = text_batch()["input_ids"][:1]
    labels = torch.full_like(ids, -100)
    labels[0, 5] = 9
    later = ids.clone()
    later[0, 6:] = 7
    with torch.no_grad():
        a, b = (gpt(input_ids=x, labels=labels, return_logits=True).logits[0, 5] for x in (ids, later))
    assert (a - b).abs().max() > 1e-4  # the masked token sees its right context
    with pytest.raises(ValueError, match=r"objective \(sop\): backbone\.type_vocab_size"):
        asm.build("roberta-base", vocab_size=61, backbone=small, objective={"name": "sop"}, special_ids=IDS)
    albert = asm.load_config("albert-base", backbone={**small, "embed_dim": 16})
    albert["objective"] = {"name": "clm"}
    with pytest.raises(ValueError, match=r"objective \(clm\): tie_word_embeddings: .*embed_dim=16"):
        asm.build(albert, vocab_size=61)
    albert["objective"]["tie_word_embeddings"] = False
    assert asm.build(albert, vocab_size=61).objective.head.weight.shape == (61, 32)
    towers = {"text": {"vocab_size": 61, "hidden_size": 32, "num_layers": 1, "num_heads": 4},
              "vision": dict(TINY_VIT, num_layers=1)}
    with pytest.raises(ValueError, match=r"objective \(clip\): objective\.text_pooling: 'first'"):
        asm.build("clip-tiny", backbone=towers, objective={"text_pooling": "first", "embed_dim": 16})
    asm.build("clip-tiny", backbone=towers, objective={"text_pooling": "last", "embed_dim": 16})


def test_bare_backbone_model():
    model = asm.build({"backbone": TINY_TEXT})
    out = model(**text_batch())
    assert out.loss is None and out.last_hidden_state.shape == (3, 17, 32)
    assert model.prepare({"input_ids": 1}, seed=0) == {"input_ids": 1} and model.tokens_in(text_batch()) == 42


# ----------------------------------------------------------------------------- checkpoints


def _train_step(model, batch, step=0, lr=1e-2):
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr)
    out = model(**model.prepare(batch, seed=step))
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    model.on_step_end(step)
    return out


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_save_and_load_are_exact_with_ties(tmp_path):
    torch.manual_seed(0)
    model = asm.build(tiny_mlm())
    _train_step(model, text_batch())
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary files left
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["format"] == "fastpt-pretrain" and meta["model"] == model.config
    from safetensors.torch import load_file

    stored = load_file(str(path / WEIGHTS_FILE))
    assert "backbone.embeddings.word_embeddings.weight" in stored and "objective.head.weight" not in stored
    back = PretrainModel.from_pretrained(path)
    _assert_same_state(model, back)
    assert back.objective.head.weight is back.backbone.embeddings.word_embeddings.weight
    batch = model.prepare(text_batch(seed=1), seed=5)
    model.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, back(**batch).loss)
    # overwrite in place, then a dtype on load
    _train_step(model, text_batch(), step=1)
    model.save_pretrained(path)
    half = PretrainModel.from_pretrained(path, dtype=torch.bfloat16)
    assert half.backbone.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.backbone.embeddings.word_embeddings.weight.float(),
                               model.backbone.embeddings.word_embeddings.weight, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["dino-vit-tiny", "mocov3-vit-tiny"])
def test_teachers_and_momentum_copies_round_trip(name, tmp_path):
    torch.manual_seed(0)
    small = {"dino-vit-tiny": dict(out_dim=24, head_hidden_dim=16, bottleneck_dim=8, num_local_crops=2,
                                   local_crop_size=14),
             "mocov3-vit-tiny": dict(proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=16)}
    model = asm.build(name, backbone=TINY_VIT, objective=small[name])
    batch = {"pixel_values": torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))}
    for step in range(2):
        _train_step(model, batch, step)
    model.save_pretrained(tmp_path)
    back = PretrainModel.from_pretrained(tmp_path)
    _assert_same_state(model, back)  # teacher / momentum copies, DINO's center and step count included
    teacher = "teacher_backbone" if name.startswith("dino") else "momentum_backbone"
    assert not any(p.requires_grad for p in getattr(back.objective, teacher).parameters())
    trainable = {id(p) for p in back.trainable_parameters()}
    assert not trainable & {id(p) for p in getattr(back.objective, teacher).parameters()}
    # both continue identically
    a, b = _train_step(model, batch, 2), _train_step(back, batch, 2)
    assert torch.equal(a.loss, b.loss)
    _assert_same_state(model, back)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastpt_config.json"):
        PretrainModel.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "fastpt", "backbone": {}}))
    with pytest.raises(ValueError, match="from_hf"):
        PretrainModel.from_pretrained(tmp_path)
    model = asm.build(tiny_mlm())
    model.save_pretrained(tmp_path / "a")
    other = asm.build(tiny_mlm(), backbone={"hidden_size": 16, "intermediate_size": 16})
    from safetensors.torch import save_file

    sd = {k: v for k, v in other.state_dict().items() if k != "objective.head.weight"}
    save_file(sd, str(tmp_path / "a" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="shape"):
        PretrainModel.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="no build config"):
        PretrainModel(model.backbone, model.objective).save_pretrained(tmp_path / "b")


# ----------------------------------------------------------------------------- Hugging Face


def _hf_bert(tmp_path, vocab_size=61):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = transformers.BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    return transformers, hf


def test_from_hf_train_to_hf_matches_transformers(tmp_path):
    transformers, hf = _hf_bert(tmp_path)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(61 - len(vocab))]
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = asm.from_hf(tmp_path / "hf")
    assert model.config["objective"]["name"] == "mlm" and model.config["hf"]["arch"] == "bert"
    assert model.objective.mask_token_id == 7 and model.objective.special_token_ids == (0, 5, 6)
    head = model.objective.head
    assert head.weight is model.backbone.embeddings.word_embeddings.weight
    torch.testing.assert_close(head.bias, hf.cls.predictions.bias)  # the checkpoint's head, loaded
    # continue pre-training one step, then hand it back
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    out = model(**model.prepare(text_batch(), seed=0))
    out.loss.backward()
    opt.step()
    assert not torch.equal(head.bias, hf.cls.predictions.bias)
    asm.to_hf(model, tmp_path / "out")
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    batch = text_batch(seed=3)
    model.eval()
    with torch.no_grad():
        ours = model(**batch, labels=torch.full_like(batch["input_ids"], -100), return_logits=True).logits
        ref = back(**batch).logits
    valid = batch["attention_mask"].bool()
    assert (ours - ref)[valid].abs().max().item() <= 1e-5


def test_from_hf_objective_choices(tmp_path):
    transformers, _ = _hf_bert(tmp_path)
    with pytest.raises(ValueError, match=r"objective\.mask_token_id: required .*pass mask_token_id=<id> to from_hf"):
        asm.from_hf(tmp_path / "hf")  # no tokenizer files and config.json has no mask id
    model = asm.from_hf(tmp_path / "hf", mask_token_id=3, mask_prob=0.3)
    assert model.objective.mask_prob == 0.3 and model.objective.special_token_ids == (0,)  # config.json's pad
    with pytest.warns(UserWarning, match=r"dropped the checkpoint's \['mlm'\] head\(s\): a model without objective"):
        bare = asm.from_hf(tmp_path / "hf", objective=None)
    assert bare.objective is None and bare(**text_batch()).last_hidden_state.shape == (3, 17, 32)
    with pytest.raises(ValueError, match="objective: expected 'auto', None or one of"):
        asm.from_hf(tmp_path / "hf", objective="mlmm")
    # GPT-2 -> causal LM, tied head, back to GPT2LMHeadModel with the same logits
    torch.manual_seed(0)
    gcfg = transformers.GPT2Config(vocab_size=53, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                   attn_pdrop=0.0, embd_pdrop=0.0)
    gpt = transformers.GPT2LMHeadModel(gcfg).eval()
    gpt.save_pretrained(tmp_path / "gpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = asm.from_hf(tmp_path / "gpt")
    assert model.config["objective"]["name"] == "clm" and model.objective.head.weight is \
        model.backbone.embeddings.word_embeddings.weight
    asm.to_hf(model, tmp_path / "gpt-out")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt-out").eval()
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, return_logits=True).logits
        torch.testing.assert_close(ours, back(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="PretrainModel"):
        asm.to_hf(model.backbone, tmp_path / "x")


def test_from_hf_warns_about_the_heads_it_initializes(tmp_path):
    """A checkpoint without the objective's head (a BertModel, such as all-MiniLM-L6-v2, under MLM) got a random
    MLM head with no notice: only the dropped pooler was reported. transformers reports such weights as newly
    initialized; from_hf warns naming the head, and not for a checkpoint that has it."""
    transformers, _ = _hf_bert(tmp_path)
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=37))
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asm.from_hf(tmp_path / "base", mask_token_id=3)
    said = [str(w.message) for w in caught]
    assert any("no weights for the 'mlm' objective's ['mlm'] head(s): newly initialized" in m for m in said), said
    assert any("dropped the checkpoint's ['pooler']" in m for m in said), said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asm.from_hf(tmp_path / "hf", mask_token_id=3)  # BertForMaskedLM: its head is loaded, nothing to say


def test_to_hf_writes_the_special_ids_from_hf_reads_back(tmp_path):
    """A pre-trained model exported without tokenizer files (a checkpoint holds none) loads back with its
    own MLM mask id: to_hf writes <role>_token_id into config.json (from_hf needed mask_token_id= before)."""
    ids = {"mask": 4, "pad": 0, "cls": 1, "sep": 2, "unk": 3}
    model = asm.build("bert-tiny", vocab_size=60, special_ids=ids, backbone={"num_layers": 1})
    asm.to_hf(model, tmp_path / "hf")
    back = asm.from_hf(tmp_path / "hf")
    assert back.objective.mask_token_id == 4 and back.config["special_ids"] == ids


def test_defaults_keys_are_the_recipes():
    recipe = pytest.importorskip("fastpt.train.config")
    assert set(asm.DEFAULT_KEYS) == set(recipe.MODEL_DEFAULTS)
    for name in asm.list_configs():  # every zoo defaults: block is one the recipe takes
        assert set(asm.load_config(name).get("defaults", {})) <= set(recipe.MODEL_DEFAULTS), name


def test_from_hf_reads_convert_output_and_points_checkpoints_elsewhere(tmp_path):
    _hf_bert(tmp_path)
    from fastpt.models import from_hf as backbone_from_hf, save_fastpt

    backbone, heads, info = backbone_from_hf(tmp_path / "hf")
    save_fastpt(tmp_path / "converted", backbone, heads, hf_config=info["hf_config"], arch=info["arch"])
    model = asm.from_hf(tmp_path / "converted", mask_token_id=3)
    assert torch.equal(model.objective.head.bias, heads["mlm"].bias)
    assert model.config["hf"]["arch"] == "bert"
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="from_pretrained"):
        asm.from_hf(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert asm.load_config(meta) == model.config  # the file's content, as read, is a config too


@pytest.mark.parametrize("objective", ["nsp", "sop", "self_distill"])
def test_from_hf_gives_every_mlm_objective_the_checkpoints_head(objective, tmp_path):
    """BERT's own pre-training (MLM + NSP) and the other objectives holding an MLM head built it with the
    defaults (gelu, tied) instead of the checkpoint's head: a relu checkpoint's logits were off by ~0.2, and an
    untied checkpoint's decoder was copied over the word embedding (logits off by ~0.4, the embedding changed).
    The head now takes the checkpoint's activation / eps / tying, and computes transformers' logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37, hidden_act="relu", layer_norm_eps=1e-5,
                                  tie_word_embeddings=False)
    hf = transformers.BertForPreTraining(cfg).eval()
    hf.set_attn_implementation("eager")
    hf.save_pretrained(tmp_path / "hf")
    kw = dict(mask_token_id=4) if objective == "self_distill" else dict(cls_token_id=2, sep_token_id=3, mask_token_id=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SOP / self_distill drop the NSP head / pooler
        model = asm.from_hf(tmp_path / "hf", objective=objective, **kw).eval()
    head = model.objective.heads()["mlm"]
    assert (head.activation, head.layer_norm.eps, head.tied) == ("relu", 1e-5, False)
    assert torch.equal(model.backbone.embeddings.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)
    ids = text_batch()["input_ids"]
    with torch.no_grad():
        ref = hf(input_ids=ids)
        h = model.backbone(ids).last_hidden_state
        assert (head(h) - ref.prediction_logits).abs().max().item() <= 1e-6
        if objective == "nsp":
            nsp = model.objective.classifier(model.objective.pooler(h))
            assert (nsp - ref.seq_relationship_logits).abs().max().item() <= 1e-6
    if objective == "nsp":  # and back: BertForPreTraining with the same logits
        asm.to_hf(model, tmp_path / "out")
        back = transformers.BertForPreTraining.from_pretrained(tmp_path / "out").eval()
        with torch.no_grad():
            assert (back(input_ids=ids).prediction_logits - ref.prediction_logits).abs().max().item() <= 1e-6
