import pytest
import torch
import torch.nn.functional as F

from fastpt.models.encoder import text_encoder
from fastpt.objectives import MLM

from . import VOCAB, text_batch, tiny_text, train, with_grad

SPECIAL = (0, 1, 2)


def make(**kw):
    backbone = tiny_text()
    return backbone, MLM.from_backbone(backbone, mask_token_id=3, special_token_ids=SPECIAL, mask_prob=0.3, **kw)


def test_loss_matches_full_logits_cross_entropy():
    backbone, obj = make(log_accuracy=True)
    batch = obj.prepare(text_batch(), seed=7)
    out = obj(backbone, {**batch, "return_logits": True})
    h = backbone(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    logits = F.linear(obj.head.layer_norm(F.gelu(obj.head.dense(h))), backbone.embeddings.word_embeddings.weight,
                      obj.head.bias)
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, h)
    sel = batch["labels"] != -100
    acc = (logits[sel].argmax(-1) == batch["labels"][sel]).float().mean()
    torch.testing.assert_close(out.metrics["mlm_accuracy"], acc)
    assert out.metrics["mlm_loss"].requires_grad is False
    assert obj(backbone, batch).logits is None  # logits only when asked


def test_prepare_is_deterministic_and_dynamic():
    _, obj = make()
    raw = text_batch()
    a, b, c = (obj.prepare(raw, seed=s) for s in (5, 5, 6))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])  # a new mask per seed (RoBERTa's dynamic masking)
    sel = a["labels"] != -100
    assert sel.any()
    assert torch.equal(a["labels"][sel], raw["input_ids"][sel])
    assert not sel[raw["attention_mask"] == 0].any()  # padding never masked
    assert torch.equal(a["input_ids"][~sel], raw["input_ids"][~sel])
    assert torch.equal(raw["input_ids"], text_batch()["input_ids"])  # the raw batch is not modified


def test_collator_labels_pass_through():
    _, obj = make()
    raw = {**text_batch(), "labels": torch.full((3, 17), -100)}
    assert obj.prepare(raw, seed=0)["labels"] is raw["labels"]


def test_whole_word_masking_selects_words_together():
    _, obj = make(whole_word_masking=True)
    raw = {"input_ids": torch.randint(5, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))}
    raw["word_ids"] = (torch.arange(24) // 3).expand(4, -1).contiguous()  # 3 pieces per word
    labels = obj.prepare(raw, seed=3)["labels"]
    sel = (labels != -100).view(4, 8, 3)
    assert sel.any()
    assert torch.equal(sel.all(-1), sel.any(-1))
    with pytest.raises(KeyError, match="word_ids"):
        obj.prepare(text_batch(), seed=0)


def test_whole_word_masking_restarting_word_ids_are_separate_words():
    """mlm_mask ties every token of a row that shares a word id: word ids restarting per packed document
    or per sequence of a pair (as Encoding.word_ids() gives them) tied words of different documents
    together. Each run of equal ids is a word now; ids numbered 0, 1, ... per row mean what they did."""
    from fastpt.ops import mlm_mask

    _, obj = make(whole_word_masking=True)
    ids = torch.randint(5, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    doc = torch.arange(8) // 2  # 4 words of 2 pieces
    packed = {"input_ids": ids, "word_ids": torch.cat([doc, doc]).expand(3, -1).contiguous(),
              "cu_seqlens": torch.arange(0, 49, 8, dtype=torch.int32)}
    pair = torch.tensor([-1, 0, 0, 1, 1, 2, 2, -1, 0, 0, 1, 1, 2, 2, 3, -1]).expand(3, -1).contiguous()
    single = {"input_ids": ids[0], "word_ids": torch.zeros(16, dtype=torch.int64),  # one word per document
              "cu_seqlens": torch.tensor([0, 8, 16], dtype=torch.int32)}
    agree = {"packed": 0, "pair": 0, "single": 0}
    seeds = 150
    for seed in range(seeds):
        sel = obj.prepare(packed, seed=seed)["labels"] != -100
        assert torch.equal(sel[:, 0::2], sel[:, 1::2])  # pieces of a word together
        agree["packed"] += int((sel[:, :8] == sel[:, 8:]).sum()) // 2  # per word
        sel = obj.prepare({"input_ids": ids, "word_ids": pair}, seed=seed)["labels"] != -100
        agree["pair"] += int((sel[:, 1:7] == sel[:, 8:14]).sum()) // 2
        sel = obj.prepare(single, seed=seed)["labels"] != -100
        assert torch.equal(sel[:8], sel[:1].expand(8)) and torch.equal(sel[8:], sel[8:9].expand(8))
        agree["single"] += int(sel[0] == sel[8])
    p_agree = 0.3**2 + 0.7**2  # two independent words
    for name, n in (("packed", seeds * 3 * 4), ("pair", seeds * 3 * 3), ("single", seeds)):
        assert abs(agree[name] - n * p_agree) <= 5 * (n * p_agree * (1 - p_agree)) ** 0.5 + 1, (name, agree[name], n)
    numbered = (torch.arange(16) // 3).expand(3, -1).contiguous()
    numbered[:, 0] = -1
    direct = mlm_mask(ids, mask_token_id=3, vocab_size=VOCAB, mask_prob=0.3, special_token_ids=SPECIAL,
                      word_ids=numbered, seed=9)
    out = obj.prepare({"input_ids": ids, "word_ids": numbered}, seed=9)
    assert torch.equal(out["input_ids"], direct[0]) and torch.equal(out["labels"], direct[1])


def test_gradients_reach_backbone_and_tied_head():
    backbone, obj = make()
    assert obj.head.weight is backbone.embeddings.word_embeddings.weight
    obj(backbone, obj.prepare(text_batch(), seed=1)).loss.backward()
    names = with_grad(backbone, obj)
    assert {"0.embeddings.word_embeddings.weight", "1.head.dense.weight", "1.head.bias"} <= names
    assert any(n.startswith("0.layers.1.") for n in names)


def test_untied_head_has_its_own_matrix():
    backbone, obj = make(tie_word_embeddings=False)
    assert obj.head.weight is not backbone.embeddings.word_embeddings.weight


def test_training_reduces_loss():
    backbone, obj = make()
    losses = train(obj, backbone, obj.prepare(text_batch(), seed=2), steps=10)
    assert losses[-1] < 0.85 * losses[0]


def test_albert_factorised_embedding_ties_the_head():
    torch.manual_seed(0)
    albert = text_encoder(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, embed_dim=16, dropout=0.0,
                          attention_dropout=0.0)
    obj = MLM.from_backbone(albert, mask_token_id=3, special_token_ids=SPECIAL)
    assert obj.head.weight is albert.embeddings.word_embeddings.weight and obj.head.weight.shape == (VOCAB, 16)
    batch = obj.prepare(text_batch(), seed=1)
    out = obj(albert, {**batch, "return_logits": True})
    h = out.last_hidden_state  # (B, S, 32) -> dense 32 -> 16, LayerNorm(16), tied (V, 16) decoder
    logits = F.linear(obj.head.layer_norm(F.gelu(obj.head.dense(h))), albert.embeddings.word_embeddings.weight,
                      obj.head.bias)
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert albert.embeddings.word_embeddings.weight.grad is not None


def test_bad_inputs_name_the_argument():
    backbone, obj = make()
    with pytest.raises(ValueError, match="mask_token_id"):
        MLM(hidden_size=32, vocab_size=VOCAB, mask_token_id=VOCAB)
    with pytest.raises(ValueError, match="mask_prob"):
        MLM(hidden_size=32, vocab_size=VOCAB, mask_token_id=3, mask_prob=1.5)
    with pytest.raises(TypeError, match="input_ids"):
        obj.prepare({"input_ids": torch.rand(2, 5)}, seed=0)
    with pytest.raises(ValueError, match="seed"):
        obj.prepare(text_batch(), seed=-1)
    with pytest.raises(KeyError, match="input_ids"):
        obj.prepare({"attention_mask": torch.ones(2, 3)}, seed=0)
    with pytest.raises(KeyError, match="input_ids"):
        obj(backbone, {"attention_mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="labels"):
        obj(backbone, {**text_batch(), "labels": torch.zeros(3, 5, dtype=torch.long)})


def test_without_labels_gives_every_positions_logits():
    """As BertForMaskedLM without labels: no loss, the head's logits at every position (inference)."""
    backbone, obj = make()
    batch = text_batch()
    out = obj(backbone, batch)
    h = backbone(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    logits = F.linear(obj.head.layer_norm(F.gelu(obj.head.dense(h))), backbone.embeddings.word_embeddings.weight,
                      obj.head.bias)
    assert out.loss is None and out.metrics == {}
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, h)


def test_head_layer_norm_eps_follows_the_backbone():
    """The head's LayerNorm eps defaults to the backbone's norm_eps (RoBERTa: 1e-5 in both, one
    layer_norm_eps in its config); an explicit one is kept."""
    backbone = text_encoder(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            max_positions=64, norm_eps=1e-5)
    for tie in (True, False):
        assert MLM.from_backbone(backbone, mask_token_id=3, tie_word_embeddings=tie).head.layer_norm.eps == 1e-5
    assert MLM.from_backbone(backbone, mask_token_id=3, layer_norm_eps=1e-7).head.layer_norm.eps == 1e-7


def test_word_starts_give_whole_words_without_word_ids():
    """Token shards carry no word_ids: set_word_starts (a bool per id: the token begins a word) groups a
    start with the non-start tokens after it, cut at special tokens, a row's start and document starts.
    The masks equal those of the equivalent word_ids."""
    _, obj = make(whole_word_masking=True)
    starts = torch.ones(VOCAB, dtype=torch.bool)
    starts[50:] = False  # ids 50.. are continuation pieces
    ids = torch.tensor([[2, 60, 10, 61, 62, 11, 12, 63, 1, 64, 13, 65, 0, 0]])  # a continuation first after [CLS]
    want = torch.tensor([[-1, 0, 1, 1, 1, 2, 3, 3, -1, 4, 5, 5, -1, -1]])
    obj.set_word_starts(starts)
    for seed in range(20):
        got = obj.prepare({"input_ids": ids, "attention_mask": (ids != 0).long()}, seed=seed)["labels"]
        ref = obj.prepare({"input_ids": ids, "attention_mask": (ids != 0).long(), "word_ids": want}, seed=seed)["labels"]
        assert torch.equal(got, ref)
    # packed: a document start begins a word even at a continuation id
    packed = {"input_ids": torch.tensor([10, 60, 61, 62, 11]), "cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32)}
    word = {**packed, "word_ids": torch.tensor([0, 0, 1, 1, 2])}
    for seed in range(20):
        assert torch.equal(obj.prepare(packed, seed=seed)["labels"], obj.prepare(word, seed=seed)["labels"])
    with pytest.raises(ValueError, match="word_starts: expected a 1-d bool tensor"):
        obj.set_word_starts(torch.ones(VOCAB - 1, dtype=torch.bool))
    obj.set_word_starts(None)
    with pytest.raises(KeyError, match="word_ids"):
        obj.prepare(text_batch(), seed=0)


def test_word_ends_begin_a_word_at_the_next_token():
    """Byte-level BPE has no space before the word after a newline or an opening bracket ("ends\nnext",
    "(word"): the word_ends table (data.tokenizer.word_boundary_tables) marks tokens ending with such a
    character, and the token after one begins a word; without it "next" joined the newline's word."""
    _, obj = make(whole_word_masking=True)
    starts = torch.zeros(VOCAB, dtype=torch.bool)
    starts[10:20] = True  # ids 10..19 begin with a space; 50.. continue a word
    ends = torch.zeros(VOCAB, dtype=torch.bool)
    ends[40] = True  # id 40: a newline token, itself a word (starts[40] set below)
    starts[40] = True
    ids = torch.tensor([[10, 50, 40, 51, 52, 11, 53]])
    want = torch.tensor([[0, 0, 1, 2, 2, 3, 3]])
    for table, expected in ((None, torch.tensor([[0, 0, 1, 1, 1, 2, 2]])), (ends, want)):
        obj.set_word_starts(starts, table)
        for seed in range(20):
            got = obj.prepare({"input_ids": ids}, seed=seed)["labels"]
            ref = obj.prepare({"input_ids": ids, "word_ids": expected}, seed=seed)["labels"]
            assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="word_ends: expected a 1-d bool tensor"):
        obj.set_word_starts(starts, torch.ones(VOCAB - 1, dtype=torch.bool))


def _bidirectional_twin(causal_backbone):
    twin = tiny_text(causal=False)
    twin.load_state_dict(causal_backbone.state_dict())
    return twin


def test_runs_bidirectionally_on_a_causal_backbone():
    """MLM on a causal TextEncoder (gpt2-small's stack: ``causal`` is only its default mask kind) ran it
    causally: a masked token's logits ignored every token after it. MLM now asks for the bidirectional mask
    as CLM asks for the causal one: loss and logits are those of the same weights built with causal=False."""
    backbone = tiny_text(causal=True)
    obj = MLM.from_backbone(backbone, mask_token_id=3, special_token_ids=SPECIAL, mask_prob=0.3)
    batch = obj.prepare(text_batch(), seed=1)
    out, ref = obj(backbone, {**batch, "return_logits": True}), obj(_bidirectional_twin(backbone), batch)
    torch.testing.assert_close(out.loss, ref.loss)
    # the right context reaches a masked token: the first masked position's logits change with it
    pos = int((batch["labels"][0] != -100).nonzero()[0])  # row 0 has no padding
    assert pos < batch["input_ids"].shape[1] - 1
    ids = batch["input_ids"].clone()
    ids[0, pos + 1:] = 7
    moved = obj(backbone, {**batch, "input_ids": ids, "return_logits": True}).logits
    assert (moved[0, pos] - out.logits[0, pos]).abs().max() > 1e-4
    assert backbone.causal  # the backbone's own default is left as it is


def test_prefix_lens_is_refused():
    """A batch's prefix_lens reached the backbone (it was one of encode_text's keys) and made the MLM's
    attention causal after the prefix: masked tokens lost their right context. Only prefix_lm takes it."""
    backbone, obj = make()
    raw = {**text_batch(), "prefix_lens": torch.tensor([4, 4, 4])}
    with pytest.raises(TypeError, match="prefix_lens: the mlm objective takes no prefix"):
        obj.prepare(raw, seed=0)
    batch = {**obj.prepare(text_batch(), seed=0), "prefix_lens": torch.tensor([4, 4, 4])}
    with pytest.raises(TypeError, match="prefix_lens"):
        obj(backbone, batch)
    assert "prefix_lens" not in obj.batch_keys
