"""``train.compile``: every zoo backbone, in training mode with dropout on, compiles as one graph.

``fastpt pretrain`` compiles ``model.backbone``. A graph break there splits the step into several
graphs with eager code between them, which on a GPU costs most of what compiling buys (no fusion
across the break, a host round trip at each one). What used to break: the attention layers drew a
host seed (``.item()``) on every call for their counter-based dropout, the CPU dropout attention
read document lengths on the host, and dispatch imported the Triton kernel module through
importlib. Dynamo runs here with ``backend="aot_eager"`` (the graphs and the autograd split, no
Inductor code generation: seconds, not minutes) and ``fullgraph=True``, which raises on any break.
"""
from __future__ import annotations

import pytest
import torch

import importlib

import fastpt.assemble as asm
from tests.test_zoo import IDS, VOCAB, ZOO, raw_batch, reduced

attention_module = importlib.import_module("fastpt.ops.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through TRITON_INTERPRET=1

DROPOUT = dict(dropout=0.1, attention_dropout=0.1)


def _with_dropout(name: str) -> dict:
    over = reduced(name)
    b = over["backbone"]
    if "text" in b:  # two towers
        b["text"] = {**b["text"], **DROPOUT}
    elif asm.load_config(name)["backbone"]["builder"] != "vit":
        b.update(DROPOUT)
    return over


def _build(name: str):
    torch.manual_seed(0)
    text = asm.load_config(name)["backbone"]["builder"] != "vit"
    model = asm.build(name, vocab_size=VOCAB if text else None, special_ids=IDS if text else None,
                      **_with_dropout(name))
    return model.train()


@pytest.mark.parametrize("name", ZOO)
def test_backbone_compiles_as_one_graph_in_training(name):
    model = _build(name)
    batch = model.prepare(raw_batch(model), seed=3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them
    model.backbone.compile(fullgraph=True, backend="aot_eager")  # raises on a graph break
    out = model(**batch)
    assert torch.isfinite(out.loss), name
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2, name
    compiled = [m for m in model.backbone.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled, f"{name}: nothing was compiled"
    # what the objective ran went through the compiled module(s): Dynamo traced at least one frame
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, name


def test_alibi_backbone_compiles_as_one_graph():
    """No zoo config uses ALiBi: its slopes went through a float tensor's .tolist() (a graph break per layer)."""
    from fastpt.models.encoder import text_encoder

    torch.manual_seed(0)
    backbone = text_encoder(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, position="alibi",
                            dropout=0.1).train()
    ids = torch.randint(5, VOCAB, (2, 11))
    eager = backbone(ids).last_hidden_state
    torch._dynamo.reset()
    compiled = torch.compile(backbone, fullgraph=True, backend="aot_eager")  # raises on a graph break
    torch.manual_seed(1)
    out = compiled(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == eager.shape and torch.isfinite(out).all()


def test_two_tower_compile_compiles_the_towers():
    """CLIP calls the towers, not the two-tower module: ``compile`` must reach them."""
    model = _build("clip-tiny")
    model.backbone.compile(backend="aot_eager")
    assert model.backbone.text._compiled_call_impl is not None
    assert model.backbone.vision._compiled_call_impl is not None


TRITON = pytest.mark.skipif(
    attention_module.OP.backends["triton"].available() is not None
    or attention_module.OP.backends["triton"].supports(**attention_module.OP.probe(DEVICE)) is not None,
    reason="the Triton backend cannot run here (no triton, or TRITON_INTERPRET unset on a CPU machine)")


@TRITON
@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-small"])
def test_triton_attention_path_compiles_as_one_graph(name):
    """The path a GPU takes: attention forced to the Triton kernels (the interpreter on a CPU), whose
    dropout key comes from a seed drawn inside the graph and is read in the custom op."""
    model = _build(name).to(DEVICE)
    layers = [m for m in model.backbone.modules() if hasattr(m, "backend") and hasattr(m, "dropout")]
    assert layers
    for m in layers:
        m.backend = "triton"
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
             for k, v in model.prepare(raw_batch(model), seed=3).items()}
    torch._dynamo.reset()
    model.backbone.compile(fullgraph=True, backend="aot_eager")
    first = model(**batch)
    first.loss.backward()
    assert torch.isfinite(first.loss)
    assert model(**batch).loss != first.loss  # fresh dropout masks each step
