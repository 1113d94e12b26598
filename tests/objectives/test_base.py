import inspect
import math

import pytest
import torch
from torch import nn

from fastpt.objectives import OBJECTIVES, MLM, ObjectiveOutput
from fastpt.objectives.base import (check_seed, cosine_schedule, ema_update, frozen_copy, head_accuracy, pool, require,
                                    seeded, top1_accuracy)

from . import tiny_text


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_constructors_take_flat_typed_keywords(name):
    """What the YAML builder relies on: keyword-only, annotated arguments, and the protocol methods."""
    cls = OBJECTIVES[name]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params and all(p.kind is p.KEYWORD_ONLY and p.annotation is not p.empty for p in params)
    assert isinstance(cls.needs, tuple) and cls.needs
    for method in ("prepare", "forward", "on_step_end", "tokens_in", "attach"):
        assert callable(getattr(cls, method))


def test_from_backbone_reads_sizes():
    backbone = tiny_text()
    obj = MLM.from_backbone(backbone, mask_token_id=3)
    assert obj.hidden_size == 32 and obj.vocab_size == backbone.vocab_size and obj._attached
    assert obj.tokens_in({"input_ids": torch.ones(2, 5, dtype=torch.long)}) == 10
    assert obj.tokens_in({"input_ids": torch.ones(2, 5, dtype=torch.long),
                          "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1] * 5])}) == 7


def test_sizes_given_must_be_the_backbones():
    """from_backbone filled a size only when it was not given and never compared a given one: an untied head of
    vocab_size 60 on a 50-token backbone softmaxed over ids that do not exist; a hidden_size, patch_size or
    in_channels of another value died deep in forward with a raw shape error."""
    from fastpt.objectives import CausalLM
    from fastpt.models.vision import vit

    backbone = tiny_text(vocab_size=50)
    for cls in (MLM, CausalLM):
        kw = dict(mask_token_id=3) if cls is MLM else {}
        with pytest.raises(ValueError, match=r"objective\.vocab_size: 60 .*backbone's vocab_size 50"):
            cls.from_backbone(backbone, vocab_size=60, tie_word_embeddings=False, **kw)
        with pytest.raises(ValueError, match=r"objective\.hidden_size: 48 .*backbone's hidden_size 32"):
            cls.from_backbone(backbone, hidden_size=48, **kw)
        assert cls.from_backbone(backbone, vocab_size=50, hidden_size=32, **kw).vocab_size == 50  # equal: fine
    image = vit(image_size=16, patch_size=4, in_channels=1, hidden_size=32, num_layers=1, num_heads=4)
    small = dict(proj_dim=8, proj_hidden_dim=8)
    for key, value in (("patch_size", 8), ("in_channels", 3), ("hidden_size", 16), ("num_patches", 4)):
        with pytest.raises(ValueError, match=f"objective\\.{key}: {value} .*backbone's {key}"):
            OBJECTIVES["mae"].from_backbone(image, decoder_hidden_size=8, decoder_layers=1, decoder_heads=2,
                                            **{key: value})
    with pytest.raises(ValueError, match=r"objective\.hidden_size: 16 .*backbone's hidden_size 32"):
        OBJECTIVES["simclr"].from_backbone(image, hidden_size=16, **small)
    assert OBJECTIVES["simclr"].from_backbone(image, patch_size=[4, 4], **small).patch_size == [4, 4]  # (4, 4) is 4


@pytest.mark.parametrize("name, key, kw", [
    ("simclr", "pooling", dict(proj_dim=8, proj_hidden_dim=8)),
    ("moco_v3", "pooling", dict(proj_dim=8, proj_hidden_dim=8, pred_hidden_dim=8)),
    ("dino", "pooling", dict(out_dim=8, head_hidden_dim=8, bottleneck_dim=8, num_local_crops=0)),
    ("clip", "vision_pooling", dict(embed_dim=8)),
])
def test_first_pooling_needs_a_cls_token(name, key, kw):
    """pooling "first" (the default: "CLS token") on a ViT built with cls_token=False pooled the top-left
    patch's state without a word: ValueError naming the key and suggesting "mean"."""
    from fastpt.models.vision import vit

    def backbone(cls_token):
        torch.manual_seed(0)
        v = vit(image_size=8, patch_size=4, in_channels=1, hidden_size=16, num_layers=1, num_heads=2,
                cls_token=cls_token)
        return nn.ModuleDict({"text": tiny_text(hidden_size=16), "vision": v}) if name == "clip" else v

    with pytest.raises(ValueError, match=f"objective\\.{key}: 'first' pools the cls token.*{key}: mean"):
        OBJECTIVES[name].from_backbone(backbone(False), **kw)
    OBJECTIVES[name].from_backbone(backbone(False), **kw, **{key: "mean"})
    OBJECTIVES[name].from_backbone(backbone(True), **kw)  # "first" with a cls token


def test_clip_sizes_given_must_be_the_towers():
    """CLIP's from_backbone took a given text / vision width or patch size over the towers' (setdefault)."""
    from fastpt.models.vision import vit

    towers = nn.ModuleDict({"text": tiny_text(hidden_size=16),
                            "vision": vit(image_size=8, patch_size=4, in_channels=1, hidden_size=24, num_layers=1,
                                          num_heads=2)})
    for key, value, theirs in (("text_hidden_size", 32, 16), ("vision_hidden_size", 16, 24), ("patch_size", 2, 4)):
        with pytest.raises(ValueError, match=f"objective\\.{key}: {value} .*backbone's {key} {theirs}"):
            OBJECTIVES["clip"].from_backbone(towers, embed_dim=8, **{key: value})


def test_output_defaults():
    out = ObjectiveOutput(torch.tensor(1.0))
    assert out.metrics == {} and out.logits is None and out.last_hidden_state is None


def test_ema_and_schedule():
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    old = [p.clone() for p in dst.parameters()]
    ema_update(dst, src, 0.75)
    for o, n, s in zip(old, dst.parameters(), src.parameters()):
        torch.testing.assert_close(n, 0.75 * o + 0.25 * s)
    twin = frozen_copy(src)
    assert all(not p.requires_grad for p in twin.parameters()) and all(p.requires_grad for p in src.parameters())
    assert cosine_schedule(0.9, 1.0, 0, 100) == pytest.approx(0.9)
    assert cosine_schedule(0.9, 1.0, 100, 100) == pytest.approx(1.0)
    assert cosine_schedule(0.9, 1.0, 50, 100) == pytest.approx(0.95)
    assert cosine_schedule(0.9, 1.0, 500, None) == 0.9
    assert cosine_schedule(0.9, 1.0, 25, 100) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_accuracies_and_pooling():
    torch.manual_seed(0)  # unseeded, ~1.6% of draws put two of the 7 random 4-d rows within 0.01 of each other
    q = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    k = q + 0.01 * torch.randn(7, 4)
    k[3] = -q[3]
    assert float(top1_accuracy(q, k, chunk=3)) == pytest.approx(6 / 7)
    h, w = torch.randn(9, 4), torch.randn(11, 4)
    labels = (h @ w.T).argmax(1)
    labels[:2] = (labels[:2] + 1) % 11
    assert float(head_accuracy(h, w, None, labels, chunk=4)) == pytest.approx(7 / 9)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pool(x, "last", mask), torch.stack([x[0, 2], x[1, 4]]))
    torch.testing.assert_close(pool(x, "mean", mask)[0], x[0, :3].mean(0))
    torch.testing.assert_close(pool(x, "first"), x[:, 0])


def test_checks_name_the_argument():
    with pytest.raises(TypeError, match="seed"):
        check_seed(1.5)
    with pytest.raises(ValueError, match="seed"):
        check_seed(2**64)
    with pytest.raises(KeyError, match="pixel_values"):
        require({"input_ids": 1}, ("pixel_values",), "X.prepare")
    with pytest.raises(TypeError, match="batch"):
        require([1, 2], ("input_ids",), "X.prepare")


def _cases():
    from fastpt.objectives import (DINO, MAE, NSP, SOP, UL2, CausalLM, MoCoV3, PrefixLM, SelfDistillation, SimCLR,
                                   T5SpanCorruption)

    from . import images, text_batch, tiny_seq2seq, tiny_vit

    small = dict(proj_dim=8, proj_hidden_dim=16)
    text = lambda: text_batch(4, 19, low=10)  # noqa: E731
    pix = lambda: {"pixel_values": images(4)}  # noqa: E731
    return {
        "mlm": (tiny_text, MLM, dict(mask_token_id=3, special_token_ids=(0,)), text),
        "clm": (tiny_text, CausalLM, {}, text),
        "prefix_lm": (tiny_text, PrefixLM, {}, text),
        "span": (tiny_seq2seq, T5SpanCorruption, {}, text),
        "ul2": (tiny_seq2seq, UL2, dict(mode_token_ids={"R": 2, "X": 3, "S": 4}), text),
        "nsp": (tiny_text, NSP, dict(cls_token_id=1, sep_token_id=2, mask_token_id=3), text),
        "sop": (tiny_text, SOP, dict(cls_token_id=1, sep_token_id=2, mask_token_id=3), text),
        "mae": (tiny_vit, MAE, dict(decoder_hidden_size=16, decoder_layers=1, decoder_heads=2), pix),
        "simclr": (tiny_vit, SimCLR, small, pix),
        "moco_v3": (tiny_vit, MoCoV3, dict(small, pred_hidden_dim=16), pix),
        "dino": (tiny_vit, DINO, dict(out_dim=24, head_hidden_dim=16, bottleneck_dim=8, num_local_crops=2), pix),
        "self_distill": (tiny_text, SelfDistillation, dict(mask_token_id=3), text),
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mlm", "clm", "prefix_lm", "span", "ul2", "nsp", "sop", "mae", "simclr", "moco_v3",
                                  "dino", "self_distill"])
def test_cuda_prepares_the_same_batch_and_loss_as_cpu(name):
    """A resumed or moved run reproduces its batches: prepare is a pure function of (data, seed) on
    any device, and the loss on CUDA (fused kernels) matches the CPU's."""
    make_backbone, cls, kwargs, data = _cases()[name]
    backbone = make_backbone()
    obj = cls.from_backbone(backbone, **kwargs)
    backbone.eval(), obj.eval()  # no center / BatchNorm statistics updates between the two runs
    raw = data()
    cpu = obj.prepare(raw, seed=5)
    loss_cpu = obj(backbone, cpu).loss
    backbone.cuda(), obj.cuda()
    gpu = obj.prepare({k: v.cuda() for k, v in raw.items()}, seed=5)
    assert sorted(gpu) == sorted(cpu)
    for k, v in cpu.items():
        assert v.device == torch.device("cpu") and gpu[k].is_cuda, k
        if v.is_floating_point():  # views / crops: grid_sample may round differently
            torch.testing.assert_close(gpu[k].cpu(), v, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(gpu[k].cpu(), v), k
    out = obj(backbone, gpu)
    out.loss.backward()
    torch.testing.assert_close(out.loss.cpu(), loss_cpu.detach(), rtol=2e-3, atol=2e-3)


def test_heads_round_trip_with_hf_names():
    from fastpt.models import MLMHead, Pooler
    from fastpt.objectives import NSP

    backbone = tiny_text()
    obj = NSP.from_backbone(backbone, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    assert set(obj.heads()) == {"pooler", "nsp", "mlm"} and obj.heads()["mlm"] is obj.mlm.head
    assert set(NSP.from_backbone(backbone, cls_token_id=1, sep_token_id=2).heads()) == {"pooler", "nsp"}
    given = {"mlm": MLMHead(32, backbone.vocab_size, tied_weight=backbone.embeddings.word_embeddings.weight),
             "pooler": Pooler(32), "nsp": nn.Linear(32, 2), "lm": nn.Linear(1, 1)}
    obj.load_heads(given)  # "lm" is not NSP's: ignored
    for name, module in given.items():
        if name != "lm":
            for k, v in module.state_dict().items():
                assert torch.equal(obj.heads()[name].state_dict()[k], v), (name, k)


def test_top1_accuracy_among_gathered_keys():
    """A rank's rows against every rank's keys (key_offset: where its own keys start) give that rank's part
    of the accuracy of one process on the combined batch (it searched this rank's keys only)."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    k = q + 0.6 * torch.randn(12, 5, generator=g)
    hits = lambda a, b, **kw: float(top1_accuracy(a, b, **kw)) * a.shape[0]  # noqa: E731
    whole = hits(q, k)
    assert hits(q[:5], k, key_offset=0) + hits(q[5:], k, key_offset=5) == pytest.approx(whole)
    # NT-Xent's layout: each rank holds its first views then its second views, self excluded
    z = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=1)
    z = torch.cat([z, z + 0.5 * torch.randn(8, 5, generator=g)])  # views 0..7, then their second views
    whole = hits(z, z, target_offset=8, exclude_self=True)
    ranks = [torch.cat([z[r * 4:(r + 1) * 4], z[8 + r * 4: 8 + (r + 1) * 4]]) for r in range(2)]
    gathered = torch.cat(ranks)
    parts = [hits(ranks[r], gathered, target_offset=4, exclude_self=True, key_offset=8 * r) for r in range(2)]
    assert sum(parts) == pytest.approx(whole) and 0 < whole < 16


@pytest.mark.parametrize("name", ["mlm", "clm", "nsp", "sop"])
def test_heads_follow_the_backbones_initializer_range(name):
    """A backbone built with its own initializer_range gets heads initialised with it (BERT inits every
    Linear of BertForPreTraining with the config's std); the NSP / SOP pair classifier is BERT-initialised
    too (it kept torch's default Linear init); a weight tied to the embedding is not drawn again."""
    from fastpt.models import text_encoder
    kw = {"mlm": dict(mask_token_id=3), "clm": {}}.get(name, dict(cls_token_id=1, sep_token_id=2, mask_token_id=3))
    for std in (0.02, 0.3):
        torch.manual_seed(0)
        backbone = text_encoder(vocab_size=4000, hidden_size=96, num_layers=1, num_heads=2, initializer_range=std)
        table = backbone.embeddings.word_embeddings.weight.detach().clone()
        obj = OBJECTIVES[name].from_backbone(backbone, **kw)
        assert torch.equal(backbone.embeddings.word_embeddings.weight, table)
        mats = {n: p for n, p in obj.named_parameters() if p.dim() == 2}
        assert mats
        for n, p in mats.items():
            assert abs(p.std().item() / std - 1) < 0.1 or p is backbone.embeddings.word_embeddings.weight, (n, std)
        for n, p in obj.named_parameters():
            if p.dim() == 1 and "layer_norm" not in n:
                assert not p.any(), n  # biases start at 0


@pytest.mark.parametrize("kind", ["mlm", "lm"])
def test_load_heads_never_writes_into_the_word_embedding(kind):
    """load_heads copied an untied checkpoint head into a head tied to the backbone's embedding: its decoder
    overwrote the word embedding, silently (from_hf of an untied BertForPreTraining under NSP). An untied
    source into a tied head is refused; a tied one leaves the embedding alone; an untied target takes a copy."""
    from fastpt.models import LMHead, MLMHead
    from fastpt.objectives import CausalLM

    backbone = tiny_text()
    table = backbone.embeddings.word_embeddings.weight
    before = table.detach().clone()
    v = backbone.vocab_size
    make = (lambda **kw: MLMHead(32, v, **kw)) if kind == "mlm" else (lambda **kw: LMHead(32, v, bias=True, **kw))
    build = ((lambda tie: MLM.from_backbone(backbone, mask_token_id=3, tie_word_embeddings=tie)) if kind == "mlm"
             else (lambda tie: CausalLM.from_backbone(backbone, tie_word_embeddings=tie, bias=True)))
    untied, other_table = make(), nn.Parameter(torch.randn(v, 32))
    with torch.no_grad():
        untied.bias.normal_()
    with pytest.raises(ValueError, match=rf"heads\.{kind}: .*untied.*tie_word_embeddings=False"):
        build(True).load_heads({kind: untied})
    assert torch.equal(table, before)
    tied = build(True)
    tied.load_heads({kind: make(tied_weight=other_table)})  # tied elsewhere: the target's embedding stays
    assert torch.equal(table, before) and tied.heads()[kind].weight is table
    free = build(False)
    free.load_heads({kind: untied})
    assert torch.equal(free.heads()[kind].weight, untied.weight) and torch.equal(free.heads()[kind].bias, untied.bias)
    free.load_heads({kind: make(tied_weight=table)})  # a tied source: its decoder is its embedding
    assert torch.equal(free.heads()[kind].weight, table) and free.heads()[kind].weight is not table
    assert torch.equal(table, before)
    if kind == "mlm":  # another transform: the same weights would give other logits
        with pytest.raises(ValueError, match=r"heads\.mlm: the source head's activation is 'relu'.*activation='relu'"):
            free.load_heads({kind: MLMHead(32, v, activation="relu")})


def test_every_bit_of_a_seed_counts():
    """torch's CPU generator keeps a seed's low 32 bits: SimCLR / MoCo views, DINO crops, prefix-LM splits and
    NSP / SOP pairs drew the same for seeds s and s + k * 2**32 (e.g. (epoch << 32) | step)."""
    from fastpt.ops._rng import generator_seed
    from fastpt.train.recipe import seed_everything

    draws = {s: torch.rand(4, generator=seeded(s)) for s in (5, 6, 2**32 + 5, 2**40 + 5, 2**63 + 5, 2**64 - 1)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)
    assert torch.equal(draws[5], torch.rand(4, generator=torch.Generator().manual_seed(5)))  # small seeds as before
    assert [generator_seed(s) for s in (0, 2**32 - 1)] == [0, 2**32 - 1]
    assert all(0 <= generator_seed(s) < 2**32 for s in draws)
    weights = []
    for s in (0, 2**32):
        seed_everything(s)
        weights.append(torch.nn.Linear(3, 3).weight.detach().clone())
    assert not torch.equal(*weights)
    with pytest.raises(ValueError, match="seed"):
        seeded(2**64)
