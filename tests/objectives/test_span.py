import pytest
import torch
import torch.nn.functional as F

from fastpt import ops
from fastpt.objectives import UL2, T5SpanCorruption

from . import VOCAB, text_batch, tiny_seq2seq, train, with_grad

EOS, PAD = 1, 0
MODES = {"R": 2, "X": 3, "S": 4}


def make(cls=T5SpanCorruption, **kw):
    backbone = tiny_seq2seq()
    return backbone, cls.from_backbone(backbone, eos_id=EOS, pad_id=PAD, **kw)


def reference_loss(backbone, batch):
    h = backbone(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                 batch["decoder_attention_mask"]).last_hidden_state
    logits = h @ backbone.shared.weight.T
    return logits, F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)


def test_t5_prepare_builds_teacher_forcing_batch():
    _, obj = make()
    raw = text_batch(4, 41, low=10)  # several spans per row
    batch = obj.prepare(raw, seed=3)
    seqlens = raw["attention_mask"].sum(1)
    inputs, targets = ops.span_corrupt(raw["input_ids"], seqlens, sentinel_start_id=VOCAB - 1, eos_id=EOS,
                                       pad_id=PAD, seed=3)
    in_len, tgt_len = ops.span_corrupt_lengths(seqlens)
    assert torch.equal(batch["input_ids"], inputs)
    assert torch.equal(batch["attention_mask"].sum(1), in_len)
    assert torch.equal(batch["decoder_attention_mask"].sum(1), tgt_len)
    assert torch.equal(batch["decoder_input_ids"][:, 0], torch.full((4,), PAD))  # T5 starts with pad
    assert torch.equal(batch["decoder_input_ids"][:, 1:], targets[:, :-1])
    valid = batch["decoder_attention_mask"].bool()
    assert torch.equal(batch["labels"][valid], targets[valid].long())
    assert batch["labels"][~valid].eq(-100).all()
    assert torch.equal(batch["labels"][torch.arange(4), tgt_len - 1], torch.full((4,), EOS))
    again, other = obj.prepare(raw, seed=3), obj.prepare(raw, seed=4)
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    assert not torch.equal(other["input_ids"], batch["input_ids"])


def test_t5_loss_matches_reference_and_grads_flow():
    backbone, obj = make(log_accuracy=True)
    batch = obj.prepare(text_batch(low=10), seed=0)
    out = obj(backbone, {**batch, "return_logits": True})
    logits, ref = reference_loss(backbone, batch)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    sel = batch["labels"] != -100
    torch.testing.assert_close(out.metrics["accuracy"], (logits[sel].argmax(-1) == batch["labels"][sel]).float().mean())
    assert obj.head.weight is backbone.shared.weight
    out.loss.backward()
    names = with_grad(backbone)
    assert "0.encoder.embeddings.word_embeddings.weight" in names
    assert any(n.startswith("0.encoder.layers.0.") for n in names) and any("decoder_layers.1." in n for n in names)


def test_ul2_mode_tokens_and_per_mode_losses():
    backbone, obj = make(UL2, mode_token_ids=MODES)
    raw = text_batch(6, 21, low=10)
    batch = obj.prepare(raw, seed=11)
    modes = [obj.denoisers[i].mode for i in batch["denoiser"].tolist()]
    assert batch["input_ids"][:, 0].tolist() == [MODES[m] for m in modes]
    out = obj(backbone, batch)
    logits, ref = reference_loss(backbone, batch)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    token_ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    for mode in set(modes):
        rows = torch.tensor([m == mode for m in modes])
        sel = (batch["labels"] != -100) & rows[:, None]
        torch.testing.assert_close(out.metrics[f"loss_{mode}"], token_ce[sel].mean(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(obj.prepare(raw, seed=12)["labels"], batch["labels"])


def test_ul2_training_reduces_loss():
    backbone, obj = make(UL2, denoisers=[("R", 3.0, 0.15), ("S", None, None)], weights=[1, 1])
    losses = train(obj, backbone, obj.prepare(text_batch(low=10), seed=0), steps=10)
    assert losses[-1] < 0.85 * losses[0]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="eos_id"):
        T5SpanCorruption(hidden_size=32, vocab_size=VOCAB, eos_id=VOCAB)
    with pytest.raises(ValueError, match="noise_density"):
        T5SpanCorruption(hidden_size=32, vocab_size=VOCAB, noise_density=2.0)
    with pytest.raises(ValueError, match="mean_span_len"):
        T5SpanCorruption(hidden_size=32, vocab_size=VOCAB, mean_span_len=0.5)
    with pytest.raises(ValueError, match="denoisers"):
        UL2(hidden_size=32, vocab_size=VOCAB, denoisers=[("Q", 3.0, 0.15)])
    with pytest.raises(ValueError, match="weights"):
        UL2(hidden_size=32, vocab_size=VOCAB, weights=[1.0])
    with pytest.raises(ValueError, match="mode_token_ids"):
        UL2(hidden_size=32, vocab_size=VOCAB, mode_token_ids={"R": 2})
    backbone, obj = make()
    with pytest.raises(KeyError, match="decoder_input_ids"):
        obj(backbone, text_batch())
    with pytest.raises(ValueError, match="input_ids"):
        obj.prepare({"input_ids": torch.ones(5, dtype=torch.long)}, seed=0)


@pytest.mark.parametrize("cls", [T5SpanCorruption, UL2])
def test_untied_head_follows_the_backbones_initializer_range(cls):
    """The untied LM head of span / ul2 was not among the heads init_heads draws again: it kept std 0.02 under a
    backbone built with initializer_range 0.2 (its embedding 0.2). A tied head stays the shared table."""
    from fastpt.models.encoder_decoder import encoder_decoder

    for std in (0.02, 0.2):
        torch.manual_seed(0)
        backbone = encoder_decoder(vocab_size=512, hidden_size=64, num_encoder_layers=1, num_heads=4,
                                   initializer_range=std)
        table = backbone.shared.weight.detach().clone()
        untied = cls.from_backbone(backbone, tie_word_embeddings=False)
        assert abs(untied.head.weight.std().item() / std - 1) < 0.05, std
        tied = cls.from_backbone(backbone)
        assert tied.head.weight is backbone.shared.weight and torch.equal(backbone.shared.weight, table)
