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


@pytest.mark.parametrize("cls", [CausalLM, PrefixLM])
def test_prefix_lens_only_for_prefix_lm(cls):
    """A batch's prefix_lens reached the backbone under CLM (it was one of encode_text's keys) while the labels
    kept every prefix token: each prefix position saw the next token it is scored on (a loss under the data's
    entropy on i.i.d. tokens). CLM refuses the key, naming it; prefix_lm takes it."""
    backbone, obj = make(cls)
    raw = {**text_batch(), "prefix_lens": torch.tensor([4, 5, 6])}
    if cls is PrefixLM:
        out = obj(backbone, obj.prepare(raw, seed=0))
        assert torch.isfinite(out.loss) and "prefix_lens" in obj.batch_keys
        return
    with pytest.raises(TypeError, match="prefix_lens: the clm objective takes no prefix.*prefix_lm"):
        obj.prepare(raw, seed=0)
    batch = {**obj.prepare(text_batch(), seed=0), "prefix_lens": raw["prefix_lens"]}
    with pytest.raises(TypeError, match="prefix_lens: the clm objective"):
        obj(backbone, batch)
    assert "prefix_lens" not in obj.batch_keys


@pytest.mark.parametrize("cls", [CausalLM, PrefixLM])
def test_tied_head_on_a_factorised_embedding_is_refused_by_name(cls):
    """ALBERT's factorised (V, E) embedding cannot be the LM head's (V, D) matrix (the head has no transform
    D -> E): the error named the head's tied_weight shapes; it names tie_word_embeddings and embed_dim. Untied,
    the objective trains."""
    from fastpt.models.encoder import text_encoder

    backbone = text_encoder(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, embed_dim=16,
                            dropout=0.0, attention_dropout=0.0)
    with pytest.raises(ValueError, match=r"tie_word_embeddings: .*embed_dim=16.*hidden_size=32"):
        cls.from_backbone(backbone)
    obj = cls.from_backbone(backbone, tie_word_embeddings=False)
    assert torch.isfinite(obj(backbone, obj.prepare(text_batch(), seed=0)).loss)


def test_encode_text_passes_prefix_lens_only_when_asked():
    """encode_text forwarded any batch's prefix_lens to the backbone (it was one of TEXT_KEYS): every text
    objective then ran a prefix-LM mask. Now only an explicit prefix_lens argument (PrefixLM's) reaches it."""
    from fastpt.objectives.base import encode_text

    backbone = tiny_text()
    batch = {**text_batch(), "prefix_lens": torch.tensor([3, 3, 3])}
    with pytest.raises(TypeError, match="prefix_lens"):
        encode_text(backbone, batch, causal=True)
    got = encode_text(backbone, batch, causal=True, prefix_lens=batch["prefix_lens"]).last_hidden_state
    want = backbone(batch["input_ids"], batch["attention_mask"], causal=True,
                    prefix_lens=batch["prefix_lens"]).last_hidden_state
    torch.testing.assert_close(got, want)
