"""fastpt.patch_hf: patched tiny HF models against the unpatched ones (random init, no downloads)."""
import copy
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, BertLMHeadModel, DistilBertConfig,  # noqa: E402
                          DistilBertModel, GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM,
                          ViTConfig, ViTForImageClassification)

PH = importlib.import_module("fastpt.models.patch_hf")
patch_hf, unpatch_hf = PH.patch_hf, PH.unpatch_hf

B, S, VOCAB, LENGTHS = 3, 17, 101, [17, 11, 5]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _model(arch, dtype=torch.float32, impl="sdpa", dropout=0.0, device="cpu", **kw):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=VOCAB,
                  max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=dropout)
    if arch == "bert":
        model = BertForMaskedLM(BertConfig(hidden_size=32, **common, **kw))
    elif arch == "bert-decoder":
        model = BertLMHeadModel(BertConfig(hidden_size=32, is_decoder=True, add_cross_attention=True, **common))
    elif arch == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(hidden_size=32, pad_token_id=1, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=dropout, bos_token_id=0,
                                           eos_token_id=0, **kw))
    else:  # vit: 16x16 images in 4x4 patches -> 16 patches + CLS = 17 tokens
        model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_labels=5,
                                                    **{k: v for k, v in common.items() if k != "vocab_size"}))
    model.set_attn_implementation(impl)
    return model.to(device, dtype)


def _pair(arch, **kw):
    ref = _model(arch, **kw)
    return ref, patch_hf(copy.deepcopy(ref))


def _batch(arch, padding="right", device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (B, S), generator=g)
    pos = torch.arange(S)[None]
    lengths = torch.tensor(LENGTHS)[:, None]
    mask = {"right": pos < lengths, "left": pos >= S - lengths, "none": torch.ones(B, S, dtype=torch.bool)}[padding]
    ids[~mask] = 1  # RoBERTa's pad id
    labels = torch.where(torch.rand(B, S, generator=g) < 0.4, ids, -100)
    if arch == "gpt2":
        labels = ids.clone()
    labels[~mask] = -100
    return dict(input_ids=ids.to(device), attention_mask=mask.long().to(device)), labels.to(device), mask.to(device)


@pytest.fixture
def fused(monkeypatch):
    """The keyword arguments of every call that reached fastpt.ops.attention."""
    calls, real = [], PH.attention

    def spy(q, k, v, **kw):
        calls.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(PH, "attention", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["right", "none"])
@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
def test_outputs_match_hf(arch, padding, dtype, device, fused):
    ref, ours = _pair(arch, dtype=dtype, device=device)
    inputs, _, valid = _batch(arch, padding, device)
    with torch.no_grad():
        want = ref.eval()(**inputs, output_hidden_states=True)
        got = ours.eval()(**inputs, output_hidden_states=True)
    # padded positions are meaningless and differ (fastpt outputs 0 attention there); real ones match
    for w, g in ((want.logits, got.logits), (want.hidden_states[-1], got.hidden_states[-1])):
        torch.testing.assert_close(g[valid], w[valid], rtol=0, atol=TOL[dtype])
    assert len(fused) == 2  # both layers ran the fused op
    for kw in fused:
        assert kw["causal"] == (arch == "gpt2")
        if padding == "right":
            assert kw["seqlens"].tolist() == LENGTHS
        else:
            assert kw["seqlens"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
def test_loss_and_gradients_match_hf(arch, dtype, device, fused):
    ref, ours = _pair(arch, dtype=dtype, device=device)
    inputs, labels, _ = _batch(arch, device=device)
    want = ref.train()(**inputs, labels=labels)
    got = ours.train()(**inputs, labels=labels)
    assert got.logits is None  # the (T, V) logits were never materialised
    # HF's causal-LM loss upcasts logits to float32, also from float64: that reference is fp32-accurate
    tol, rtol = (1e-6, 1e-5) if arch == "gpt2" and dtype == torch.float64 else (TOL[dtype], TOL[dtype] * 10)
    torch.testing.assert_close(got.loss, want.loss.to(got.loss.dtype), rtol=tol, atol=tol)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=tol, msg=name)
    assert len(fused) == 2
    # GPT-2's gradient-accumulation normaliser (tuple outputs: test_return_dict_false_keeps_hf_tuple)
    if arch == "gpt2":
        n = torch.tensor(50, device=device)
        torch.testing.assert_close(ours(**inputs, labels=labels, num_items_in_batch=n).loss,
                                   ref(**inputs, labels=labels, num_items_in_batch=n).loss, rtol=1e-6, atol=1e-6,
                                   check_dtype=False)


def test_eval_mode_with_labels_is_hf_forward():
    ref, ours = _pair("bert")
    inputs, labels, _ = _batch("bert")
    with torch.no_grad():
        want, got = ref.eval()(**inputs, labels=labels), ours.eval()(**inputs, labels=labels)
    assert got.logits is not None and got.logits.shape == (B, S, VOCAB)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_vit_matches_hf(device, fused):
    ref, ours = _pair("vit", device=device)
    pixels = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        want = ref.eval()(pixels, output_hidden_states=True)
        got = ours.eval()(pixels, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_states[-1], want.hidden_states[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    assert len(fused) == 2 and all(kw["seqlens"] is None and not kw["causal"] for kw in fused)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["left_padding", "output_attentions"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fallback_is_hf_exactly(arch, case, impl, fused):
    ref, ours = _pair(arch, impl=impl)
    inputs, _, _ = _batch(arch, "left" if case == "left_padding" else "right")
    extra = dict(output_attentions=True) if case == "output_attentions" else {}
    with torch.no_grad():
        want, got = ref.eval()(**inputs, **extra), ours.eval()(**inputs, **extra)
    assert torch.equal(got.logits, want.logits)
    if case == "output_attentions" and impl == "eager":
        assert len(got.attentions) == 2
        assert all(torch.equal(g, w) for g, w in zip(got.attentions, want.attentions))
    assert fused == []


def test_cross_attention_falls_back_self_attention_fused(fused):
    ref, ours = _pair("bert-decoder")
    inputs, _, valid = _batch("bert")
    enc = torch.randn(B, 9, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.eval()(**inputs, encoder_hidden_states=enc, use_cache=False)
        got = ours.eval()(**inputs, encoder_hidden_states=enc, use_cache=False)
    torch.testing.assert_close(got.logits[valid], want.logits[valid], rtol=0, atol=1e-5)
    assert len(fused) == 2 and all(kw["causal"] for kw in fused)  # the decoder's causal self-attention


def test_attention_dropout_runs_fused_and_follows_manual_seed(fused):
    _, ours = _pair("bert", dropout=0.3)
    inputs, labels, _ = _batch("bert")
    ours.train()
    torch.manual_seed(5)
    a = ours(**inputs, labels=labels).loss
    torch.manual_seed(5)
    b = ours(**inputs, labels=labels).loss
    assert torch.equal(a, b)
    assert fused and all(kw["dropout_p"] == pytest.approx(0.3) for kw in fused)
    a.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("padding", ["right", "none"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_patched_model_compiles_as_one_graph(arch, padding):
    """Under torch.compile the patched backbone stays one graph in training with attention dropout,
    as the unpatched one does: no ContextVar read, no host check of the mask per layer (masked
    layers keep the model's own attention there), the dropout seed drawn in the graph. In eval
    mode the compiled patched backbone computes what the unpatched one does. (The fused loss
    selects the labelled rows, a data-dependent shape: one graph break at the head, by design.)"""
    ref = _model(arch, dropout=0.1)
    ours = patch_hf(copy.deepcopy(ref), loss=False)
    inputs, _, valid = _batch(arch, padding)
    torch._dynamo.reset()
    compiled = torch.compile(ours.base_model.train(), backend="aot_eager", fullgraph=True)  # raises on a break
    hidden = compiled(**inputs).last_hidden_state
    hidden[valid].square().sum().backward()
    assert torch.isfinite(hidden[valid]).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    ours.eval()
    with torch.no_grad():
        want = ref.base_model.eval()(**inputs).last_hidden_state
        got = compiled(**inputs).last_hidden_state
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)


def test_unknown_architecture_is_an_error():
    model = DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=VOCAB))
    with pytest.raises(TypeError, match="DistilBertModel.*BERT, RoBERTa, GPT-2, ViT"):
        patch_hf(model)
    with pytest.raises(TypeError, match="Linear"):
        patch_hf(torch.nn.Linear(2, 2))


def test_patch_twice_unpatch_and_options():
    ref, ours = _pair("gpt2")
    inputs, labels, _ = _batch("gpt2")
    assert patch_hf(ours) is ours and ours.config._attn_implementation == "fastpt"
    assert isinstance(copy.deepcopy(ours).forward.__self__, GPT2LMHeadModel)  # a copy stays patched, on itself
    loss = ours.train()(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, ref.train()(**inputs, labels=labels).loss, rtol=1e-5, atol=1e-6)

    assert unpatch_hf(ours) is ours
    assert ours.config._attn_implementation == "sdpa" and "forward" not in ours.__dict__
    assert not any("_fastpt_attn" in m.__dict__ for m in ours.modules())
    assert unpatch_hf(ours) is ours  # unpatching an unpatched model is a no-op
    with torch.no_grad():
        assert torch.equal(ours.eval()(**inputs).logits, ref.eval()(**inputs).logits)

    patch_hf(ours, attention=False)  # loss only
    assert ours.config._attn_implementation == "sdpa" and "forward" in ours.__dict__
    patch_hf(ours, loss=False)  # attention only: the options replace the previous patch
    assert ours.config._attn_implementation == "fastpt"  # the forward is HF's, behind the padding check
    assert ours.train()(**inputs, labels=labels).logits is not None


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_patched_model_pickles(arch, tmp_path):
    """pickle / torch.save of a whole patched model load back patched (the patched forward pickles as
    the model and the forward's name; a bound method pickled as getattr(model, its name) and failed to
    load), with HF's forward signature for inspect (Trainer reads it)."""
    import inspect
    import pickle

    ref, ours = _pair(arch)
    inputs, labels, _ = _batch(arch)
    for back in (pickle.loads(pickle.dumps(ours)), _torch_save_load(ours, tmp_path / "m.pt")):
        assert "forward" in back.__dict__ and back.forward.__self__ is back
        assert inspect.signature(back.forward) == inspect.signature(ref.forward)
        loss = back.train()(**inputs, labels=labels).loss
        torch.testing.assert_close(loss, ref.train()(**inputs, labels=labels).loss, rtol=1e-5, atol=1e-6)
        assert back.train()(**inputs, labels=labels).logits is None  # the fused loss forward


def _torch_save_load(model, path):
    torch.save(model, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fused_loss_forward_passes_backbone_arguments_through(arch):
    """The fused-loss forwards name only input_ids, labels and the loss options: any other keyword
    (the cache's name changed within transformers 5) reaches the backbone, and the output carries
    the backbone's fields (hidden states here) as HF's would."""
    ref, ours = _pair(arch)
    inputs, labels, valid = _batch(arch)
    want = ref.train()(**inputs, labels=labels, output_hidden_states=True)
    got = ours.train()(**inputs, labels=labels, output_hidden_states=True)
    assert got.logits is None and len(got.hidden_states) == len(want.hidden_states)
    torch.testing.assert_close(got.hidden_states[-1][valid], want.hidden_states[-1][valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["output_attentions", "config_output_attentions", "head_mask"])
@pytest.mark.parametrize("arch", ["gpt2", "bert-decoder"])
def test_eager_fallback_without_padding_is_causal(arch, case, fused):
    """A causal model whose original attention is eager, falling back without padding: the mask
    builder ("sdpa"'s) gives None there and left causality to SDPA's is_causal, so the eager
    fallback attended to future tokens."""
    ref = _model(arch, impl="eager")
    extra = {"head_mask": torch.ones(2, 4)} if case == "head_mask" else {}
    if case == "output_attentions":
        extra = {"output_attentions": True}
    elif case == "config_output_attentions":
        ref.config.output_attentions = True
    ours = patch_hf(copy.deepcopy(ref))
    inputs, _, _ = _batch("gpt2", "none")
    with torch.no_grad():
        want, got = ref.eval()(**inputs, **extra), ours.eval()(**inputs, **extra)
    assert torch.equal(got.logits, want.logits)
    if case != "head_mask":
        assert len(got.attentions) == 2 and all(torch.equal(g, w) for g, w in zip(got.attentions, want.attentions))
        assert all(a.triu(1).eq(0).all() for a in got.attentions)  # nothing above the diagonal
    assert fused == []


@pytest.mark.parametrize("loss", [True, False])
@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
def test_forward_signature_keeps_trainer_columns(arch, loss):
    """The patched forward showed (input_ids, *args, labels, **kwargs) to inspect.signature, so Trainer
    (remove_unused_columns, the default) dropped attention_mask / token_type_ids from every batch.
    Trainer's own rule (_set_signature_columns_if_needed) and collator; accelerate rebinds __func__."""
    import inspect
    import types

    from transformers import default_data_collator
    from transformers.trainer_utils import RemoveColumnsCollator

    ref = _model(arch)
    ours = patch_hf(copy.deepcopy(ref), loss=loss)
    assert "forward" in ours.__dict__
    inputs, labels, _ = _batch(arch)
    features = [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
                 "token_type_ids": torch.zeros(S, dtype=torch.long), "position_ids": torch.arange(S),
                 "labels": labels[i], "text": "a raw column"} for i in range(B)]

    def trainer_batch(model):
        columns = list(inspect.signature(model.forward).parameters) + ["label", "label_ids", "labels"]
        return RemoveColumnsCollator(default_data_collator, columns)(features)

    assert sorted(trainer_batch(ours)) == sorted(trainer_batch(ref))
    assert "attention_mask" in trainer_batch(ours)
    assert inspect.signature(ours.forward) == inspect.signature(ref.forward)
    rebound = types.MethodType(ours.forward.__func__, ours)  # accelerate's mixed-precision wrapping
    assert inspect.signature(rebound) == inspect.signature(ref.forward)


@pytest.mark.parametrize("loss", [True, False])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_loss_reading_padded_positions_is_hf_exactly(arch, loss, fused):
    """Right padding with labels that are not -100 at padded positions (GPT-2 on labels=input_ids):
    HF's loss reads outputs there, which the fused attention computes differently (0 attention in
    padded query rows), so loss and gradients differed. Such a call runs the original attention."""
    ref = _model(arch, dtype=torch.float64)
    ours = patch_hf(copy.deepcopy(ref), loss=loss)
    inputs, _, valid = _batch(arch)
    labels = inputs["input_ids"].clone()  # labels at padded positions too
    want = ref.train()(**inputs, labels=labels)
    got = ours.train()(**inputs, labels=labels)
    assert (got.logits is None) == loss  # the fused loss still runs, over exact hidden states
    # HF's causal-LM loss upcasts logits to float32, also from float64: that reference is fp32-accurate
    tol = 1e-6 if arch == "gpt2" and loss else 1e-10
    torch.testing.assert_close(got.loss, want.loss.to(got.loss.dtype), rtol=tol, atol=tol)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol * 10, atol=tol, msg=name)
    args = (inputs["input_ids"], None, inputs["attention_mask"]) if arch == "gpt2" else inputs.values()
    with torch.no_grad():  # eval: HF's forward and loss, with the mask passed by position (GPT-2: after the cache)
        want = ref.eval()(*args, labels=labels).loss
        got = ours.eval()(*args, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fused == []
    labels[~valid] = -100  # the loss reads real positions only: fused again
    ours.train()(**inputs, labels=labels)
    assert len(fused) == 2


def test_head_dim_over_the_fused_limit_falls_back(fused):
    """A head dim over fastpt.ops.attention.MAX_HEAD_DIM (256) raised from the fused op; HF's runs."""
    torch.manual_seed(0)
    ref = BertForMaskedLM(BertConfig(hidden_size=2 * (PH.MAX_HEAD_DIM + 4), num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37, vocab_size=VOCAB,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ours = patch_hf(copy.deepcopy(ref))
    inputs, _, _ = _batch("bert", "none")
    with torch.no_grad():
        assert torch.equal(ours.eval()(**inputs).logits, ref.eval()(**inputs).logits)
    assert fused == []


def test_patched_model_runs_after_loading_in_a_fresh_process(tmp_path):
    """torch.save of a patched model loaded in another process raised KeyError ('fastpt' is not a
    valid attention implementation): "fastpt" was registered with transformers only by patch_hf."""
    import subprocess
    import sys

    ref, ours = _pair("gpt2")
    inputs, _, valid = _batch("gpt2")
    with torch.no_grad():
        want = ref.eval()(**inputs).logits
    torch.save({"model": ours.eval(), "backbone": ours.transformer, "inputs": inputs, "valid": valid,
                "want": want}, tmp_path / "ck.pt")
    child = f"""
import torch
ck = torch.load({str(tmp_path / "ck.pt")!r}, weights_only=False)  # no import of fastpt here
model, inputs, valid = ck["model"], ck["inputs"], ck["valid"]
assert model.config._attn_implementation == "fastpt"
with torch.no_grad():
    got = model(**inputs).logits
    hidden = ck["backbone"](**inputs).last_hidden_state
torch.testing.assert_close(got[valid], ck["want"][valid], rtol=0, atol=1e-5)
assert torch.isfinite(hidden[valid]).all()
print("ran")
"""
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ran" in run.stdout, run.stderr[-2000:]


def test_patch_leaves_models_sharing_the_config_alone(tmp_path):
    """patch_hf wrote _attn_implementation on the config object, which transformers shares among
    models built from it: a teacher built from the student's config switched to "fastpt" too (and
    lost its eager attentions), and unpatch_hf switched it back."""
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=VOCAB, max_position_embeddings=40)
    config._attn_implementation = "eager"
    teacher, student = BertForMaskedLM(config).eval(), BertForMaskedLM(config).eval()
    inputs, _, _ = _batch("bert")
    patch_hf(student)
    assert teacher.config is config and config._attn_implementation == "eager"
    assert len(teacher(**inputs, output_attentions=True).attentions) == 2
    assert student.config._attn_implementation == "fastpt"
    assert all(m.config is student.config for m in student.modules() if "config" in m.__dict__)
    student.save_pretrained(tmp_path)
    assert "fastpt" not in (tmp_path / "config.json").read_text()
    assert type(student).from_pretrained(tmp_path).config._attn_implementation != "fastpt"
    unpatch_hf(student)
    assert student.config._attn_implementation == "eager" and config._attn_implementation == "eager"
    assert len(student(**inputs, output_attentions=True).attentions) == 2


def _head(name, dtype=torch.float64, **kw):
    """Tiny random-init transformers heads beyond _model's (dropout 0)."""
    from transformers import (BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification,
                              GPT2DoubleHeadsModel, GPT2ForQuestionAnswering, GPT2ForSequenceClassification,
                              RobertaForQuestionAnswering)
    torch.manual_seed(0)
    bert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=VOCAB,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gpt2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=40, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=0, eos_token_id=0)
    model = {"bert-qa": lambda: BertForQuestionAnswering(BertConfig(**bert)),
             "roberta-qa": lambda: RobertaForQuestionAnswering(RobertaConfig(pad_token_id=1, **bert)),
             "gpt2-qa": lambda: GPT2ForQuestionAnswering(GPT2Config(**gpt2)),
             "gpt2-double-heads": lambda: GPT2DoubleHeadsModel(GPT2Config(**gpt2)),
             "bert-seq-cls": lambda: BertForSequenceClassification(BertConfig(num_labels=3, **bert)),
             "bert-token-cls": lambda: BertForTokenClassification(BertConfig(num_labels=3, **bert)),
             "gpt2-seq-cls": lambda: GPT2ForSequenceClassification(GPT2Config(num_labels=3, **gpt2, **kw))}[name]()
    return model.to(dtype)


def _head_call(name, inputs):
    """The call's loss arguments (start/end positions and labels inside the real tokens)."""
    if name.endswith("-qa"):
        return dict(inputs, start_positions=torch.tensor([3, 2, 1]), end_positions=torch.tensor([5, 4, 3]))
    if name == "gpt2-double-heads":  # (B, 2 choices, S); mc_token_ids left to HF's default, the last position
        return dict({k: torch.stack([v, v.flip(0)], 1) for k, v in inputs.items()}, mc_labels=torch.tensor([0, 1, 1]))
    if name == "bert-token-cls":
        labels = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"] % 3, -100)
        return dict(inputs, labels=labels)
    return dict(inputs, labels=torch.tensor([0, 2, 1]))


def _assert_loss_and_gradients_equal(ref, ours, call, tol=1e-10):
    want, got = ref.train()(**call), ours.train()(**call)
    want_loss = want.loss if want.loss is not None else want.mc_loss
    got_loss = got.loss if got.loss is not None else got.mc_loss
    torch.testing.assert_close(got_loss, want_loss, rtol=tol, atol=tol)
    want_loss.backward()
    got_loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=tol * 10, atol=tol, msg=name)
    return want, got


@pytest.mark.parametrize("name", ["bert-qa", "roberta-qa", "gpt2-qa", "gpt2-double-heads"])
def test_heads_reading_every_position_are_hf_exactly_on_padded_batches(name, fused):
    """Question answering takes start_positions / end_positions, not labels: its span loss is a softmax
    over every position, padded ones included, so on a right-padded batch the fused attention's 0 in
    padded query rows changed loss and gradients (float64, here: BERT 2.791307 vs HF's 2.791283, GPT-2
    2.86692 vs 2.86939, gradients off by up to 6e-2) although every answer lies in the real tokens.
    GPT2DoubleHeadsModel pools the last position by default (its multiple-choice logits differed).
    A head fastpt does not know to read no padding runs the original attention on a padded batch."""
    ref = _head(name)
    ours = patch_hf(copy.deepcopy(ref))
    inputs, _, _ = _batch("bert")
    want, got = _assert_loss_and_gradients_equal(ref, ours, _head_call(name, inputs))
    for field in ("start_logits", "end_logits", "mc_logits"):  # every position, padded ones too
        if field in want:
            torch.testing.assert_close(got[field], want[field], rtol=0, atol=1e-12)
    assert fused == []
    inputs, _, _ = _batch("bert", "none")  # without padding the fused op runs
    _assert_loss_and_gradients_equal(ref, ours, _head_call(name, inputs))
    assert len(fused) == 2


@pytest.mark.parametrize("name", ["bert-seq-cls", "bert-token-cls", "gpt2-seq-cls"])
def test_heads_reading_no_padding_stay_fused(name, fused):
    """Heads pooled from position 0 or the last real token, and token classification with -100 at
    padded positions, read no padded position: right-padded batches keep the fused op, and still
    match HF."""
    ref = _head(name, pad_token_id=1)
    ours = patch_hf(copy.deepcopy(ref))
    inputs, _, _ = _batch("bert")  # padded with id 1
    _assert_loss_and_gradients_equal(ref, ours, _head_call(name, inputs))
    assert len(fused) == 2


def test_a_call_running_the_original_attention_leaves_other_threads_fused():
    """A padded question-answering call runs HF's own attention by switching the layers' plan off for its
    duration: that was an attribute of the shared model, so a thread calling it meanwhile lost the fused op
    (or, entering during another's call, restored "unfused" for good when it left). It is per thread now."""
    import threading

    from fastpt.models import patch_hf as ph

    model = patch_hf(_model("bert"))
    layer = next(m for m in model.modules() if "_fastpt_attn" in m.__dict__)
    q = torch.randn(2, 4, 5, 8)
    inside, leave, seen = threading.Event(), threading.Event(), {}

    def padded_call():
        with ph._unfused(model):
            seen["inside"] = ph._plan(layer, q, q, q, None, {})
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=padded_call)
    t.start()
    assert inside.wait(10)
    seen["other"] = ph._plan(layer, q, q, q, None, {})  # this thread, while the other is inside
    leave.set()
    t.join(10)
    assert seen["inside"] is None and seen["other"] is not None
    assert layer._fastpt_attn[1] and ph._plan(layer, q, q, q, None, {}) is not None


def test_gpt2_sequence_classifier_pooling_a_padded_position_is_hf_exactly(fused):
    """GPT2ForSequenceClassification pools each row's last position whose id is not pad_token_id: with
    ids at padded positions that are not pad_token_id, that is a padded position (the fused op's 0
    attention there changed the logits), so the call runs the original attention."""
    ref = _head("gpt2-seq-cls", pad_token_id=0)
    ours = patch_hf(copy.deepcopy(ref))
    inputs, _, _ = _batch("bert")  # padded with id 1, not 0
    want, got = _assert_loss_and_gradients_equal(ref, ours, _head_call("gpt2-seq-cls", inputs))
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-12)
    assert fused == []


def test_subclass_with_its_own_forward_is_hf_exactly_on_padded_batches(fused):
    """A subclass overriding forward may read any position (here a mean over every position): fastpt
    does not know it, so a padded call runs the original attention; unpadded calls stay fused."""
    from transformers import BertForSequenceClassification

    class MeanPooled(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.bert(input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            logits = self.classifier(hidden.mean(1))
            return transformers.modeling_outputs.SequenceClassifierOutput(
                loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)

    torch.manual_seed(0)
    ref = MeanPooled(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                num_labels=3)).double()
    ours = patch_hf(copy.deepcopy(ref))
    inputs, _, _ = _batch("bert")
    _assert_loss_and_gradients_equal(ref, ours, _head_call("bert-seq-cls", inputs))
    assert fused == []
    inputs, _, _ = _batch("bert", "none")
    _assert_loss_and_gradients_equal(ref, ours, _head_call("bert-seq-cls", inputs))
    assert len(fused) == 2


# (HF's own GPT2LMHeadModel fails with config.return_dict False in transformers 5.24: its backbone
# returns a tuple, which it reads as an output; the patched model does the same)
@pytest.mark.parametrize("arch, how", [("bert", "argument"), ("bert", "config"), ("roberta", "argument"),
                                       ("roberta", "config"), ("gpt2", "argument")])
def test_return_dict_false_keeps_hf_tuple(arch, how):
    """Training with labels and return_dict=False: the fused loss's output had logits None, which a
    tuple drops, so every later field shifted (GPT-2's out[1] was the cache, BERT's tuple had one
    element and `loss, logits = out[:2]` raised). Tuples come from HF's forward and loss."""
    ref, ours = _pair(arch, dtype=torch.float64)
    inputs, labels, valid = _batch(arch)
    if how == "config":
        ref.config.return_dict = ours.config.return_dict = False
        extra = {}
    else:
        extra = dict(return_dict=False)
    want = ref.train()(**inputs, labels=labels, **extra)
    got = ours.train()(**inputs, labels=labels, **extra)
    assert isinstance(got, tuple) and [type(x) for x in got] == [type(x) for x in want]
    loss, logits = got[:2]
    assert logits.shape == (B, S, VOCAB)
    torch.testing.assert_close(loss, want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[valid], want[1][valid], rtol=0, atol=1e-10)  # padded ones differ
    if how == "config":  # return_dict=True still gets the fused loss
        assert ours(**inputs, labels=labels, return_dict=True).logits is None
