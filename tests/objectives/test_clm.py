import pytest
import torch
import torch.nn.functional as F

from fastpt.objectives import CausalLM, PrefixLM

from . import VOCAB, text_batch, tiny_text, train, with_grad


def make(cls=CausalLM, **kw):
    backbone = tiny_text()  # bidirectional by default: the objective must ask for the causal mask
    return backbone, cls.from_backbone(backbone, **kw)


def shifted_ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_causal_loss_matches_reference():
    backbone, obj = make(log_accuracy=True)
    raw = text_batch()
    out = obj(backbone, {**obj.prepare(raw, seed=0), "return_logits": True})
    h = backbone(raw["input_ids"], raw["attention_mask"], causal=True).last_hidden_state
    logits = h @ backbone.embeddings.word_embeddings.weight.T
    labels = raw["input_ids"].masked_fill(raw["attention_mask"] == 0, -100)
    torch.testing.assert_close(out.loss, shifted_ce(logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    sel = labels[:, 1:] != -100
    acc = (logits[:, :-1][sel].argmax(-1) == labels[:, 1:][sel]).float().mean()
    torch.testing.assert_close(out.metrics["lm_accuracy"], acc)
    # HF style: labels = input_ids (padding -100) without prepare gives the same loss
    torch.testing.assert_close(obj(backbone, {**raw, "labels": labels}).loss, out.loss)


def test_packed_documents_match_padded_rows():
    backbone, obj = make()
    lengths = [5, 7, 4]
    padded = text_batch(3, 7, seed=4)
    padded["attention_mask"] = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    packed_ids = torch.cat([padded["input_ids"][i, :n] for i, n in enumerate(lengths)])
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    packed = obj.prepare({"input_ids": packed_ids, "cu_seqlens": cu}, seed=0)
    assert packed["labels"][cu[:-1].long()].eq(-100).all()  # a document's first token is never a target
    ref = obj(backbone, obj.prepare(padded, seed=0)).loss
    torch.testing.assert_close(obj(backbone, packed).loss, ref, rtol=1e-5, atol=1e-5)


def test_prefix_lm_prepare_and_loss():
    backbone, obj = make(PrefixLM)
    raw = text_batch(4, 17)
    a, b, c = (obj.prepare(raw, seed=s) for s in (1, 1, 2))
    assert torch.equal(a["prefix_lens"], b["prefix_lens"]) and not torch.equal(a["prefix_lens"], c["prefix_lens"])
    lengths = raw["attention_mask"].sum(1)
    p = a["prefix_lens"]
    assert ((p >= 1) & (p <= lengths - 1)).all()
    pos = torch.arange(17)
    expect = raw["input_ids"].masked_fill((pos < p[:, None]) | (pos >= lengths[:, None]), -100)
    assert torch.equal(a["labels"], expect)  # loss only after the prefix

    out = obj(backbone, a)
    h = backbone(raw["input_ids"], raw["attention_mask"], prefix_lens=p).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, h)
    causal = backbone(raw["input_ids"], raw["attention_mask"], causal=True).last_hidden_state
    assert not torch.allclose(h[:, 0], causal[:, 0])  # the prefix attends bidirectionally
    ref = shifted_ce(h @ backbone.embeddings.word_embeddings.weight.T, expect)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)


def test_prefix_lm_keeps_given_prefixes():
    _, obj = make(PrefixLM)
    raw = {**text_batch(), "prefix_lens": torch.tensor([3, 2, 9])}
    assert torch.equal(obj.prepare(raw, seed=0)["prefix_lens"], raw["prefix_lens"])


def test_gradients_and_training():
    backbone, obj = make(bias=True)
    batch = obj.prepare(text_batch(), seed=0)
    obj(backbone, batch).loss.backward()
    assert {"0.embeddings.word_embeddings.weight", "1.head.bias"} <= with_grad(backbone, obj)
    backbone, obj = make(PrefixLM)
    losses = train(obj, backbone, obj.prepare(text_batch(), seed=0), steps=10)
    assert losses[-1] < 0.85 * losses[0]


def test_bad_inputs_name_the_argument():
    backbone, obj = make(PrefixLM)
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLM(hidden_size=32, vocab_size=0)
    with pytest.raises(TypeError, match="input_ids"):
        obj.prepare({"input_ids": torch.rand(2, 4)}, seed=0)
    with pytest.raises(KeyError, match="prefix_lens"):
        obj(backbone, text_batch())
    with pytest.raises(TypeError, match="prefix_lens"):
        obj.prepare({**text_batch(), "prefix_lens": torch.ones(3)}, seed=0)


def test_labels_drop_exactly_the_padded_positions():
    """lm_labels reads the mask itself, not a length: a left-padded batch's labels keep its real tokens and
    ignore its padding (they were [0, 0, 11, -100, -100]: padding as targets, real tokens dropped); the
    model's forward then refuses left padding by name."""
    from fastpt.objectives.clm import lm_labels
    ids = torch.tensor([[0, 0, 11, 12, 13], [11, 12, 13, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert lm_labels(ids, mask).tolist() == [[-100, -100, 11, 12, 13], [11, 12, 13, -100, -100]]
