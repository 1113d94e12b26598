"""The output dataclasses are pytree nodes: ``torch.export`` takes fastpt backbones and ``PretrainModel`` as they
are (unregistered, it refused them: "Found BackboneOutput in output, which is not a known type"), with dynamic
batch and sequence sizes; ONNX export goes through ``fastpt.nn.attention_backend(model, "reference")``."""
import io

import pytest
import torch

import fastpt
from fastpt.models.outputs import BackboneOutput, ModelOutput
from fastpt.nn import attention_backend

IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def _bert():
    torch.manual_seed(0)
    return fastpt.build("bert-tiny", vocab_size=100, special_ids=IDS).eval()


def _inputs(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[0, s // 2:] = 0
    return ids, mask


def test_backbones_and_models_export_with_dynamic_shapes():
    model = _bert()
    dims = ({0: torch.export.Dim("b"), 1: torch.export.Dim("s", max=128)},) * 2
    program = torch.export.export(model.backbone, _inputs(2, 9), dynamic_shapes=dims)
    ids, mask = _inputs(3, 13, seed=1)
    out, ref = program.module()(ids, mask), model.backbone(ids, mask)
    assert isinstance(out, BackboneOutput)
    torch.testing.assert_close(out.last_hidden_state[mask.bool()], ref.last_hidden_state[mask.bool()])
    buffer = io.BytesIO()  # saving needs the classes' serialized names
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()(ids, mask)
    torch.testing.assert_close(loaded.last_hidden_state, out.last_hidden_state)
    batch = model.prepare(dict(zip(("input_ids", "attention_mask"), _inputs(2, 9))), seed=0)
    program = torch.export.export(model, (), kwargs=batch)
    out = program.module()(**batch)
    assert isinstance(out, ModelOutput)
    torch.testing.assert_close(out.loss, model(**batch).loss)


def test_attention_backend_switches_every_layer_and_restores():
    model = _bert()
    layers = [m for m in model.modules() if isinstance(m, fastpt.nn.MultiheadSelfAttention)]
    layers[0].backend = "cpu"
    with attention_backend(model, "reference"):
        assert {m.backend for m in layers} == {"reference"}
        ids, mask = _inputs(2, 9)
        got = model.backbone(ids, mask).last_hidden_state
    assert [m.backend for m in layers] == ["cpu"] + [None] * (len(layers) - 1)
    torch.testing.assert_close(got[mask.bool()], model.backbone(ids, mask).last_hidden_state[mask.bool()])
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        with attention_backend(model, "onnx"):
            pass


def test_onnx_export_under_the_reference_attention_matches_eager():
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _bert()
    ids, mask = _inputs(2, 9)
    with attention_backend(model, "reference"):
        program = torch.onnx.export(model.backbone, (ids, mask), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))[0]
    ref = model.backbone(ids, mask).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(got)[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-5)
