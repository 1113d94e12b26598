import pytest
import torch
import torch.nn.functional as F

import fastpt

from fastpt.objectives import NSP, SOP
from fastpt.objectives.sentence import longest_pieces

from . import VOCAB, text_batch, tiny_text, train, with_grad

CLS, SEP, PAD, MASK = 1, 2, 0, 3


def make(cls, **kw):
    backbone = tiny_text()
    return backbone, cls.from_backbone(backbone, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD, **kw)


def segments(row_ids, row_types, row_mask):
    """(A, B) token lists of one ``[CLS] A [SEP] B [SEP]`` row."""
    ids = row_ids[row_mask.bool()].tolist()
    types = row_types[row_mask.bool()].tolist()
    assert ids[0] == CLS and ids[-1] == SEP
    first = [i for i, t in zip(ids, types) if t == 0]
    second = [i for i, t in zip(ids, types) if t == 1]
    assert first[-1] == SEP and second[-1] == SEP
    return first[1:-1], second[:-1]


@pytest.mark.parametrize("cls", [NSP, SOP])
def test_pairs_are_built_from_the_rows(cls):
    _, obj = make(cls)
    raw = text_batch(8, 13, low=10, seed=1)
    batch = obj.prepare(raw, seed=4)
    label = batch[obj.label_key]
    assert 0 < int(label.sum()) < 8  # both classes present
    rows = [r[m.bool()].tolist()[:13 - 3] for r, m in zip(raw["input_ids"], raw["attention_mask"])]
    for i in range(8):
        a, b = segments(batch["input_ids"][i], batch["token_type_ids"][i], batch["attention_mask"][i])
        assert a and b
        if label[i] == 0:
            assert a + b == rows[i]
        elif cls is SOP:
            assert b + a == rows[i]  # swapped
        else:
            assert a == rows[i][: len(a)]
            assert any(r[j:j + len(b)] == b for k, r in enumerate(rows) if k != i for j in range(len(r)))
    assert batch["special_tokens_mask"].sum(1).eq(3).all()
    again, other = obj.prepare(raw, seed=4), obj.prepare(raw, seed=5)
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    assert not torch.equal(other["input_ids"], batch["input_ids"])


def test_longest_pieces_of_packed_rows():
    ids = torch.zeros(3, 10, dtype=torch.long)
    # documents over the 30 tokens: [0, 4) [4, 13) crosses row 0's end, [13, 30) crosses row 1's
    cu = torch.tensor([0, 4, 13, 30], dtype=torch.int32)
    lengths, starts = longest_pieces(cu, ids)
    assert lengths.tolist() == [6, 7, 10] and starts.tolist() == [4, 3, 0]
    lengths, starts = longest_pieces(torch.tensor([0, 5, 10, 15, 20, 30]), ids)  # ties: the first piece
    assert lengths.tolist() == [5, 5, 10] and starts.tolist() == [0, 0, 0]
    for bad in (torch.tensor([0, 4, 29]), torch.tensor([1, 30]), torch.tensor([0, 20, 10, 30]), torch.tensor([0.0, 30])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            longest_pieces(bad, ids)


@pytest.mark.parametrize("cls", [NSP, SOP])
def test_packed_rows_give_pairs_from_one_document(cls):
    """With cu_seqlens (the recipe's packed rows), A and B come from one document's piece of the row:
    every document here is one repeated token, so a pair's tokens must all be one id (true pairs)."""
    _, obj = make(cls)
    b, s = 6, 16
    lengths = torch.tensor([3, 9, 7, 12, 2, 5, 14, 8, 11, 9, 16])  # 96 tokens in all
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.repeat_interleave(torch.arange(10, 10 + len(lengths)), lengths).view(b, s)
    batch = obj.prepare({"input_ids": ids, "cu_seqlens": cu.int()}, seed=3)
    label = batch[obj.label_key]
    want, _ = longest_pieces(cu, ids)
    for i in range(b):
        a, bb = segments(batch["input_ids"][i], batch["token_type_ids"][i], batch["attention_mask"][i])
        if label[i] == 0 or cls is SOP:
            assert len(a) + len(bb) == min(int(want[i]), s - 3) and len(set(a + bb)) == 1, (i, a, bb)
        else:  # NSP's random B: another row's piece, no longer than this row's B
            assert len(set(a)) == 1 and len(set(bb)) == 1 and len(a) + len(bb) <= min(int(want[i]), s - 3)


@pytest.mark.parametrize("cls", [NSP, SOP])
def test_loss_is_pair_ce_plus_mlm(cls):
    backbone, obj = make(cls, mask_token_id=MASK)
    batch = obj.prepare(text_batch(5, 15, low=10), seed=2)
    assert not (batch["labels"][batch["special_tokens_mask"]] != -100).any()  # CLS / SEP never masked
    out = obj(backbone, batch)
    h = backbone(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"]).last_hidden_state
    pair_logits = obj.classifier(torch.tanh(obj.pooler.dense(h[:, 0])))
    head = obj.mlm.head
    mlm_logits = F.linear(head.layer_norm(F.gelu(head.dense(h))), head.weight, head.bias)
    ref = F.cross_entropy(pair_logits, batch[obj.label_key]) + F.cross_entropy(
        mlm_logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, pair_logits)
    out.loss.backward()
    names = with_grad(backbone, obj)
    assert {"1.pooler.dense.weight", "1.classifier.weight", "1.mlm.head.dense.weight",
            "0.embeddings.word_embeddings.weight", "0.embeddings.token_type_embeddings.weight"} <= names


def test_sop_alone_trains():
    backbone, obj = make(SOP)
    assert obj.mlm is None
    losses = train(obj, backbone, obj.prepare(text_batch(6, 15, low=10), seed=0), steps=12)
    assert losses[-1] < 0.85 * losses[0]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="vocab_size"):
        NSP(hidden_size=32, cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK)
    with pytest.raises(ValueError, match="cls_token_id"):
        SOP(hidden_size=32, cls_token_id=-1, sep_token_id=SEP)
    backbone, obj = make(NSP)
    with pytest.raises(KeyError, match="next_sentence_label"):
        obj(backbone, text_batch())
    with pytest.raises(ValueError, match="input_ids"):
        obj.prepare({"input_ids": torch.ones(4, dtype=torch.long)}, seed=0)


@pytest.mark.parametrize("objective", ["sop", "nsp"])
def test_pairs_fit_a_row_of_max_positions(objective):
    """prepare wrapped a row of S tokens as [CLS] A [SEP] B [SEP] (S + 3 wide), so the albert-base zoo
    recipe (seq_len 512 == max_positions) died at step 1: now a row keeps its first S - 3 tokens."""
    s = 16
    model = fastpt.build("albert-base", objective={"name": objective},
                         backbone=dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, intermediate_size=64,
                                       num_layers=1, max_positions=s))
    raw = text_batch(4, s, low=10, seed=3)
    batch = model.prepare(raw, seed=0)
    assert batch["input_ids"].shape[1] == s
    if objective == "sop":  # full rows stay full, short rows uncut (NSP's random B may be shorter)
        assert batch["attention_mask"].sum(1).tolist() == [s, s - 5 + 3, s, s]
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("cls", [NSP, SOP])
def test_flops_weights_count_the_pair_head_per_row_and_the_mlm_head_per_masked_token(cls):
    """The default weights counted the MLM head (vocabulary matrix included) on every token and the
    pooler / classifier once per token: the head runs on the mask_prob of the tokens, the pair head once per row."""
    from fastpt.models.model import _matmul_params

    backbone, obj = make(cls, mask_token_id=MASK, mask_prob=0.2)
    pair = _matmul_params(obj.pooler) + _matmul_params(obj.classifier)
    mlm = _matmul_params(obj.mlm, trainable=True)
    w = obj.flops_weights(backbone, 64)
    assert w["backbone"] == 1.0
    assert w["heads"] * (pair + mlm) == pytest.approx(0.2 * mlm + pair / 64)
    _, alone = make(cls)
    assert alone.flops_weights(backbone, 64)["heads"] == pytest.approx(1 / 64)


def test_a_float64_model_keeps_its_pair_loss_in_float64():
    """The pair loss upcasts half precision only (it computed a float64 model's loss in float32)."""
    backbone, obj = make(SOP, mask_token_id=MASK)
    backbone, obj = backbone.double(), obj.double()
    out = obj(backbone, obj.prepare(text_batch(4, 13, low=10, seed=2), seed=1))
    assert out.loss.dtype == torch.float64 and out.metrics["sentence_order_loss"].dtype == torch.float64


@pytest.mark.parametrize("cls", [NSP, SOP])
def test_the_mlm_part_takes_the_heads_activation_and_eps(cls):
    """NSP / SOP built their MLM head with MLM's defaults only (gelu, the backbone's eps): from_hf of a relu
    BertForPreTraining computed other logits than the checkpoint's. The options reach the head."""
    backbone, obj = make(cls, mask_token_id=MASK, activation="relu", layer_norm_eps=1e-5, tie_word_embeddings=False)
    head = obj.mlm.head
    assert (head.activation, head.layer_norm.eps, head.tied) == ("relu", 1e-5, False)
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    want = F.linear(F.layer_norm(F.relu(head.dense(h)), (32,), head.layer_norm.weight, head.layer_norm.bias, 1e-5),
                    head.weight, head.bias)
    torch.testing.assert_close(head(h), want)
    assert make(cls, mask_token_id=MASK)[1].mlm.head.activation == "gelu"  # the default is still BERT's


@pytest.mark.parametrize("types", [0, 1])
@pytest.mark.parametrize("cls", [NSP, SOP])
def test_a_backbone_without_two_segment_types_is_refused_at_build(cls, types):
    """NSP / SOP write token type 1 on segment B: on a RoBERTa-style (type_vocab_size 1) or GPT-2-style (0)
    backbone they built and then failed at the first training step; attach (so build) names
    backbone.type_vocab_size."""
    from fastpt.models.encoder import text_encoder

    backbone = text_encoder(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, type_vocab_size=types)
    with pytest.raises(ValueError, match=rf"backbone\.type_vocab_size: .*>= 2.*got type_vocab_size {types}"):
        cls.from_backbone(backbone, cls_token_id=1, sep_token_id=2, vocab_size=VOCAB, mask_token_id=3)
    cfg = fastpt.load_config("roberta-base", backbone={"hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                                       "intermediate_size": 64})
    cfg["objective"] = {"name": cls.__name__.lower(), "cls_token_id": 0, "sep_token_id": 2, "pad_token_id": 1}
    with pytest.raises(ValueError, match=r"objective \(\w+\): backbone\.type_vocab_size"):
        fastpt.build(cfg, vocab_size=VOCAB)


@pytest.mark.parametrize("cls", [NSP, SOP])
def test_pairs_are_read_bidirectionally_on_a_causal_backbone(cls):
    """On a causal backbone (causal: true, its default mask kind) the pooled first token saw only [CLS]: every
    pair got the same logits and the pair loss stayed at the label prior. The objective now runs the backbone
    bidirectionally: the loss and logits are those of the same weights built with causal=False."""
    backbone = tiny_text(causal=True)
    twin = tiny_text(causal=False)
    twin.load_state_dict(backbone.state_dict())
    obj = cls.from_backbone(backbone, cls_token_id=1, sep_token_id=2, vocab_size=VOCAB, mask_token_id=3)
    batch = obj.prepare(text_batch(6, 17), seed=0)
    out, ref = obj(backbone, batch), obj(twin, batch)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.logits, ref.logits)
    first = out.last_hidden_state[:, 0]  # what the pooler reads: the [CLS] state of each pair
    assert (first - first[0]).abs().max() > 1e-3
