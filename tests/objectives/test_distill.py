import pytest
import torch
from safetensors.torch import save_file

from fastpt.objectives import MLM, SelfDistillation

from . import VOCAB, text_batch, tiny_text, train, with_grad

MLM_ARGS = dict(mask_token_id=3, special_token_ids=(0, 1, 2), mask_prob=0.3)


def build(tmp_path, **kw):
    """Student from seed 0; the teacher ('further pre-trained': another init) loaded from a file."""
    backbone, teacher = tiny_text(seed=0), tiny_text(seed=1)
    path = tmp_path / "teacher.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    obj = SelfDistillation.from_backbone(backbone, teacher_path=str(path), **{**MLM_ARGS, **kw})
    return backbone, teacher, obj


def masked_mse(a, b, mask):
    per_token = ((a - b) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("inputs,layers", [("masked", (-1,)), ("clean", (1, 2))])
def test_loss_is_mlm_plus_alpha_distill(tmp_path, inputs, layers):
    backbone, teacher, obj = build(tmp_path, alpha=0.5, layers=layers, distill_inputs=inputs)
    for a, b in zip(obj.teacher.parameters(), teacher.parameters()):
        assert torch.equal(a, b)  # loaded from teacher_path, not the student's weights
    raw = text_batch()
    batch = obj.prepare(raw, seed=3)
    out = obj(backbone, batch)
    mlm = MLM(hidden_size=32, vocab_size=VOCAB, **MLM_ARGS)
    mlm.attach(backbone)
    mlm.head.load_state_dict(obj.mlm.head.state_dict())
    mlm_loss = mlm(backbone, batch).loss
    ids = raw["input_ids"] if inputs == "clean" else batch["input_ids"]
    hs = backbone(ids, raw["attention_mask"], output_hidden_states=True).hidden_states
    ht = teacher(ids, raw["attention_mask"], output_hidden_states=True).hidden_states
    distill = sum(masked_mse(hs[i], ht[i], raw["attention_mask"]) for i in layers) / len(layers)
    torch.testing.assert_close(out.metrics["mlm_loss"], mlm_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["distill_loss"], distill.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, mlm_loss + 0.5 * distill, rtol=1e-5, atol=1e-5)


def test_teacher_is_frozen_and_stays_in_eval(tmp_path):
    backbone, _, obj = build(tmp_path)
    obj.train()
    assert obj.training and not obj.teacher.training
    out = obj(backbone, obj.prepare(text_batch(), seed=0))
    out.loss.backward()
    names = with_grad(backbone, obj)
    assert "0.embeddings.word_embeddings.weight" in names and "1.mlm.head.dense.weight" in names
    assert not any("teacher" in n for n in names)
    assert all(not p.requires_grad for p in obj.teacher.parameters())


def test_without_path_the_teacher_is_a_copy_and_alpha_zero_is_mlm(tmp_path):
    backbone = tiny_text()
    obj = SelfDistillation.from_backbone(backbone, alpha=0.0, **MLM_ARGS)
    batch = obj.prepare(text_batch(), seed=1)
    out = obj(backbone, batch)
    assert float(out.metrics["distill_loss"]) == 0.0  # identical copy, same inputs
    torch.testing.assert_close(out.loss, out.metrics["mlm_loss"])
    state = {k: v.clone() + 1 for k, v in backbone.state_dict().items()}
    obj.load_teacher(state)
    assert torch.equal(obj.teacher.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])


def test_training_reduces_loss(tmp_path):
    backbone, _, obj = build(tmp_path)
    losses = train(obj, backbone, obj.prepare(text_batch(), seed=2), steps=10)
    assert losses[-1] < 0.85 * losses[0]


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="layers"):
        SelfDistillation(hidden_size=32, vocab_size=VOCAB, layers=(), **MLM_ARGS)
    with pytest.raises(ValueError, match="distill_inputs"):
        SelfDistillation(hidden_size=32, vocab_size=VOCAB, distill_inputs="both", **MLM_ARGS)
    with pytest.raises(ValueError, match="alpha"):
        SelfDistillation(hidden_size=32, vocab_size=VOCAB, alpha=-1.0, **MLM_ARGS)
    with pytest.raises(FileNotFoundError, match="teacher_path"):
        SelfDistillation.from_backbone(tiny_text(), teacher_path=str(tmp_path / "none.safetensors"), **MLM_ARGS)
    backbone = tiny_text()
    obj = SelfDistillation.from_backbone(backbone, layers=(7,), **MLM_ARGS)
    with pytest.raises(ValueError, match="layers"):
        obj(backbone, obj.prepare(text_batch(), seed=0))


def _build_model(backbone: dict, objective: dict):
    import fastpt

    return fastpt.build({"backbone": backbone, "objective": objective})


SHARED = dict(builder="text_encoder", vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4,
              intermediate_size=48, embed_dim=16, share_layers=True, dropout=0.0, attention_dropout=0.0)


def test_teacher_from_a_share_layers_checkpoint(tmp_path):
    """load_teacher did a strict load_state_dict, while save_pretrained stores ALBERT's shared layer once
    (layers.0): a share_layers teacher failed with 'Missing key(s): layers.1...'."""
    torch.manual_seed(1)
    teacher = _build_model(SHARED, {"name": "mlm", "mask_token_id": 3})
    teacher.save_pretrained(tmp_path / "teacher")
    torch.manual_seed(0)
    student = _build_model(SHARED, {"name": "self_distill", "teacher_path": str(tmp_path / "teacher"), **MLM_ARGS})
    got, want = student.objective.teacher.state_dict(), teacher.backbone.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert student.objective.teacher.layers[2] is student.objective.teacher.layers[0]  # still one shared layer
    with pytest.raises(ValueError, match="teacher_path.*no place for.*extra"):
        student.objective.load_teacher({**want, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="teacher_path.*no weights for"):
        student.objective.load_teacher({k: v for k, v in want.items() if "layers" not in k})


def test_saved_student_loads_without_its_teacher_path(tmp_path):
    """attach re-read teacher_path while from_pretrained rebuilt the student, although the checkpoint holds every
    objective.teacher.* tensor: once the teacher directory was gone, the checkpoint no longer loaded."""
    import shutil

    from fastpt.models import PretrainModel

    bb = {**SHARED, "share_layers": False, "embed_dim": None}
    torch.manual_seed(1)
    _build_model(bb, {"name": "mlm", "mask_token_id": 3}).save_pretrained(tmp_path / "teacher")
    torch.manual_seed(0)
    student = _build_model(bb, {"name": "self_distill", "teacher_path": str(tmp_path / "teacher"), **MLM_ARGS})
    student.save_pretrained(tmp_path / "student")
    shutil.rmtree(tmp_path / "teacher")
    back = PretrainModel.from_pretrained(tmp_path / "student")
    want = student.state_dict()
    assert back.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    assert back.config["objective"]["teacher_path"] == str(tmp_path / "teacher")  # the record is kept
    with pytest.raises(FileNotFoundError, match="teacher_path"):  # a fresh build still needs the teacher
        _build_model(bb, {"name": "self_distill", "teacher_path": str(tmp_path / "teacher"), **MLM_ARGS})


def test_the_mlm_part_takes_the_heads_activation_and_eps(tmp_path):
    """SelfDistillation built its MLM head with MLM's defaults only: from_hf of a relu / eps 1e-5 BERT gave
    the student other logits than the checkpoint's. The options reach the head."""
    _, _, obj = build(tmp_path, activation="relu", layer_norm_eps=1e-5)
    assert (obj.mlm.head.activation, obj.mlm.head.layer_norm.eps, obj.mlm.head.tied) == ("relu", 1e-5, True)
    _, _, default = build(tmp_path)
    assert default.mlm.head.activation == "gelu"


def test_student_and_teacher_run_bidirectionally_on_a_causal_backbone(tmp_path):
    """self_distill's MLM ran a causal backbone (causal: its default mask kind) causally, student and teacher:
    masked tokens without right context. Both now run with causal=False: the loss is the one the same weights
    give built bidirectional."""
    losses = []
    for causal in (True, False):
        backbone, teacher = tiny_text(causal=causal, seed=0), tiny_text(causal=causal, seed=1)
        obj = SelfDistillation.from_backbone(backbone, distill_inputs="clean", **MLM_ARGS)
        obj.load_teacher(teacher.state_dict())
        batch = obj.prepare(text_batch(), seed=3)
        losses.append(obj(backbone, batch))
    torch.testing.assert_close(losses[0].loss, losses[1].loss)
    torch.testing.assert_close(losses[0].metrics["distill_loss"], losses[1].metrics["distill_loss"])
    assert losses[0].metrics["distill_loss"] > 0
    with pytest.raises(TypeError, match="prefix_lens: the self_distill objective"):
        obj.prepare({**text_batch(), "prefix_lens": torch.tensor([3, 3, 3])}, seed=0)
