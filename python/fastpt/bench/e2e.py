"""End to end: tokens/s of one training step (forward + backward + AdamW), fastpt against
transformers, measured in one run, for two pairs: a BERT MLM step against ``BertForMaskedLM`` and a
GPT-2 causal-LM step against ``GPT2LMHeadModel``, both transformers models with
``attn_implementation="sdpa"``.

Both sides of a pair get the same model size, the same batches, the same precision (float32, and
bfloat16 autocast over float32 weights where the CPU has native bf16 products, on the CPU;
bfloat16 autocast on CUDA), the same optimizer (``torch.optim.AdamW``, lr 1e-4, weight decay 0.01,
``fused=True`` as ``fastpt pretrain`` uses it on CUDA and the CPU) and tied input/output
embeddings. Timed steps alternate between the two models (fastpt, transformers, fastpt, ...) so
that a disturbance on a shared machine hits both alike (``_time_pair``, shared by both pairs).
On the CPU every pair is timed twice: under glibc's malloc as it comes, and with freed memory
kept for reuse (``fastpt._cpu_malloc``, what ``fastpt pretrain`` sets on the CPU; the case name
says ", malloc keeps freed memory"), both sides under the same setting each time. transformers
gains far more from the second (its logits are fresh 100 MiB blocks every step), so that is the
fair comparison; the first is what a plain PyTorch script gets.

**BERT MLM.** The BERT family of Turc et al.: bert-tiny L2/H128 ... bert-base L12/H768,
vocabulary 30522, 512 positions, dropout 0.1 on hidden states and attention probabilities.
Batches: random word ids between ``[CLS]`` and ``[SEP]``, masked once by ``fastpt.ops.mlm_mask``
before timing (identical ``input_ids`` and ``labels`` for both). The sizes come from the fastpt
zoo config of that name (``fastpt/configs/bert-tiny.yaml`` ...) when ``fastpt.assemble`` has one,
and transformers' ``BertConfig`` is written from the same dict. The fastpt side is
``fastpt.assemble.build`` on it (else ``fastpt.models.text_encoder`` + ``fastpt.objectives.MLM``
directly: the same modules). Its MLM head runs only on the masked rows, through the fused linear
cross-entropy; transformers' runs the head on every token.

MFU of the MLM step counts the FLOPs the objective needs, per token: ``6 * (L * (4 D^2 + 2 D I))``
for the encoder's matrix products, ``12 * L * D * S`` for attention scores and context, and
``mask_prob * 6 * (D^2 + D V)`` for the MLM head on the masked share of tokens (PaLM's appendix B
convention, the head restricted to the tokens that have a label). The same count is used for
both sides, so transformers' head on unlabelled tokens is work it does but is not credited with.

**GPT-2 causal LM.** The fastpt side is ``fastpt.assemble.build("gpt2-small", backbone=...)``
(pre-norm, ``gelu_tanh``, learned positions up to 1024, vocabulary 50257, LM head tied to the
token embedding, dropout 0.1 on hidden states, attention probabilities and embeddings; objective
``clm``) with the sizes of ``GPT2_SIZES`` (gpt2-mini: 4 layers, 256 wide, 4 heads on the CPU;
gpt2-small: 12 x 768 on CUDA). transformers' ``GPT2Config`` is written from the same dict
(``gelu_new``, ``layer_norm_epsilon`` = ``norm_eps``, resid / attn / embd dropout from the
config, ``use_cache=False`` as for training); a fastpt config that is not GPT-2-like is refused.
Batches: random token ids, ``labels = input_ids`` (no padding; both sides shift inside and
predict ``S - 1`` tokens per row). fastpt's head goes through the fused linear cross-entropy (no
``(B, S, V)`` logits); transformers' materialises the logits.

MFU of the CLM step counts, per token: ``6 * (L * (4 D^2 + 2 D I))`` for the decoder's matrix
products, ``12 * L * D * S`` for attention scores and context, the causal mask counted in full
as PaLM's appendix B does (the work a causal kernel skips is still credited: the figure is
comparable with PaLM's and nanoGPT's MFU, and about twice the useful attention FLOPs), and
``6 * D * V`` for the LM head on every token.

**torch.compile** (``bench_e2e(..., compile=True)``, ``fastpt bench --suite e2e --compile``): each
pair again, both sides compiled with Inductor's defaults, as a case of its own (", torch.compile"
in the case name; the baseline is transformers compiled, measured in the same run; transformers
eager is timed in the same rounds as a third side, ``transformers-eager``, so that compiled fastpt
against eager transformers, what issue 6's goal compares, is a same-run ratio too). Each side
compiles what its own training path compiles: fastpt the backbone, in place
(``model.backbone.compile()``, what ``fastpt pretrain`` does with ``train.compile: true``; the
objective stays eager, since the MLM head runs on a data-dependent number of masked rows through
the fused linear cross-entropy), transformers its whole model with the head and the loss
(``model.compile()``, what HF Trainer's ``torch_compile`` does through accelerate). Forward and
backward of what is compiled go through Inductor; AdamW stays the eager fused one on both sides.
Dynamo's caches are reset before each compiled pair, so neither side reuses graphs of an earlier
one (Inductor's on-disk cache may still be warm from an earlier process: a second run on the same
machine compiles faster), and the compiler's one-time start in the process is paid on a toy graph
before the first pair (logged), not by whichever side compiles first. Compiled sides get one more
untimed warm-up step than eager ones (at least 2: Dynamo may compile again on the second call), and
each row reports the seconds its warm-up took (``warmup_s``; the note: each step's seconds) and the
graphs and graph breaks Dynamo made for it (``dynamo_graphs``, ``graph_breaks``: a graph break is
not an error, the code between graphs runs eager). The note says when Dynamo compiled again during
the timed steps.
"""
from __future__ import annotations

import contextlib
import itertools
import time

import torch

from .. import _cpu_malloc
from .harness import Timing, peak_memory, synchronize, time_fn
from .peaks import dtype_name, native_bf16
from .report import make_row

__all__ = ["BERT_SIZES", "GPT2_SIZES", "backbone_config", "gpt2_backbone_config", "mlm_flops_per_token",
           "clm_flops_per_token", "make_batches", "make_clm_batches", "build_fastpt", "build_transformers",
           "build_fastpt_gpt2", "build_transformers_gpt2", "gpt2_config", "train_step", "bench_e2e",
           "COMPILE_CASE", "EAGER_SIDE"]

# name: (layers, hidden, heads, intermediate); vocabulary 30522, 512 positions, 2 token types
BERT_SIZES = {
    "bert-tiny": (2, 128, 2, 512),
    "bert-mini": (4, 256, 4, 1024),
    "bert-small": (4, 512, 8, 2048),
    "bert-medium": (8, 512, 8, 2048),
    "bert-base": (12, 768, 12, 3072),
}
VOCAB, MASK_ID, CLS_ID, SEP_ID, MASK_PROB = 30522, 103, 101, 102, 0.15
# name: (layers, hidden, heads, intermediate); the rest (vocabulary 50257, 1024 positions, ...) is
# fastpt/configs/gpt2-small.yaml's
GPT2_SIZES = {
    "gpt2-tiny": (2, 128, 2, 512),
    "gpt2-mini": (4, 256, 4, 1024),
    "gpt2-small": (12, 768, 12, 3072),
    "gpt2-medium": (24, 1024, 16, 4096),
}


def backbone_config(size: str, *, dropout: float | None = None) -> dict:
    """The ``text_encoder`` arguments of ``size``: the zoo's config (``fastpt.assemble``) when it has
    one, else BERT's published sizes; ``dropout`` (when given) sets hidden and attention dropout."""
    import fastpt.assemble as assemble

    cfg = dict(assemble.load_config(size)["backbone"]) if size in assemble.list_configs() else None
    if cfg is None:
        layers, d, heads, inter = BERT_SIZES[size]
        cfg = dict(builder="text_encoder", vocab_size=VOCAB, hidden_size=d, num_layers=layers, num_heads=heads,
                   intermediate_size=inter, max_positions=512, type_vocab_size=2, dropout=0.1, attention_dropout=0.1)
    if dropout is not None:
        cfg.update(dropout=dropout, attention_dropout=dropout)
    return cfg


def mlm_flops_per_token(cfg: dict, seq_len: int, *, mask_prob: float = MASK_PROB) -> float:
    """Training FLOPs (forward + backward) per token that a BERT MLM step needs (module docstring);
    ``cfg``: the ``text_encoder`` arguments."""
    d = cfg["hidden_size"]
    return _stack_flops_per_token(cfg, seq_len) + mask_prob * 6 * (d * d + d * cfg["vocab_size"])


def _stack_flops_per_token(cfg: dict, seq_len: int) -> float:
    """The layers' matrix products ``6 L (4 D^2 + 2 D I)`` and attention ``12 L D S``, per token."""
    layers, d = cfg["num_layers"], cfg["hidden_size"]
    inter = cfg.get("intermediate_size") or 4 * d
    return 6 * layers * (4 * d * d + 2 * d * inter) + 12 * layers * d * seq_len


def gpt2_backbone_config(size: str = "gpt2-mini", *, dropout: float | None = None, **overrides) -> dict:
    """The ``text_encoder`` arguments of a GPT-2 of ``size`` (``GPT2_SIZES``, or any zoo config
    name): fastpt/configs/gpt2-small.yaml's backbone with that depth and width; ``dropout`` (when
    given) sets hidden, attention and embedding dropout; ``overrides`` set any other argument
    (``vocab_size=1000`` ...)."""
    import fastpt.assemble as assemble

    if size in GPT2_SIZES:
        layers, d, heads, inter = GPT2_SIZES[size]
        cfg = dict(assemble.load_config("gpt2-small")["backbone"])
        cfg.update(num_layers=layers, hidden_size=d, num_heads=heads, intermediate_size=inter)
    elif size in assemble.list_configs():
        cfg = dict(assemble.load_config(size)["backbone"])
    else:
        raise ValueError(f"size: expected one of {sorted(GPT2_SIZES)} or a zoo config, got {size!r}")
    if dropout is not None:
        cfg.update(dropout=dropout, attention_dropout=dropout, embedding_dropout=None)
    cfg.update(overrides)
    return cfg


def clm_flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a GPT causal-LM step (module docstring: the
    causal attention counted in full, the head on every token); ``cfg``: the ``text_encoder``
    arguments."""
    return _stack_flops_per_token(cfg, seq_len) + 6 * cfg["hidden_size"] * cfg["vocab_size"]


def make_batches(n: int, batch: int, seq: int, device: str, *, seed: int = 0) -> list[dict]:
    """``n`` MLM batches ``{"input_ids", "attention_mask", "labels"}`` (B, S) on ``device``: random
    word ids between [CLS] and [SEP], 15% masked (80/10/10) by ``fastpt.ops.mlm_mask``."""
    from fastpt.ops import mlm_mask

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1000, VOCAB, (batch, seq), generator=g)
        ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
        masked, labels = mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, mask_prob=MASK_PROB,
                                  special_token_ids=[0, CLS_ID, SEP_ID, MASK_ID], seed=seed + i)
        out.append({k: v.to(device) for k, v in dict(input_ids=masked, attention_mask=torch.ones_like(ids),
                                                        labels=labels).items()})
    return out


def make_clm_batches(n: int, batch: int, seq: int, device: str, *, vocab_size: int, seed: int = 0) -> list[dict]:
    """``n`` causal-LM batches ``{"input_ids", "labels"}`` (B, S) on ``device``: random token ids in
    ``[0, vocab_size)``, ``labels`` equal to them (no padding; the models shift inside)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
        out.append(dict(input_ids=ids.to(device), labels=ids.clone().to(device)))
    return out


def _unique(params) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in params if p.requires_grad}.values())  # tied weights once


COMPILE_CASE = ", torch.compile"
EAGER_SIDE = "transformers-eager"  # in the compiled case: transformers not compiled, same run
FASTPT_COMPILES = "as fastpt pretrain's train.compile; the objective (head and fused linear cross-entropy) eager"
HF_COMPILES = "the whole model with its head and loss, as HF Trainer's torch_compile"


def _compile(model: torch.nn.Module, part: str | None, why: str) -> str:
    """Compile ``model.<part>`` (None: ``model`` itself) in place with ``nn.Module.compile``;
    returns what is compiled as the modules say it (``model.backbone``), and ``why``, for the note."""
    (model if part is None else getattr(model, part)).compile()
    names = [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    return f"torch.compile: {', '.join(f'model.{n}' if n else 'model' for n in names)} ({why})"


def build_fastpt(size: str, cfg: dict, *, device: str = "cpu", compile: bool = False):
    """``(loss_fn(batch) -> loss, parameters, how)`` for fastpt's MLM model with backbone ``cfg``;
    ``compile``: its backbone compiled in place, as ``fastpt pretrain`` does (module docstring)."""
    import fastpt.assemble as assemble

    objective_cfg = dict(mask_token_id=MASK_ID, special_token_ids=[0, CLS_ID, SEP_ID])
    model = assemble.build({"name": size, "backbone": cfg, "objective": {"name": "mlm", **objective_cfg}}).to(device)
    how = "fastpt.assemble.build" + (f"; {_compile(model, 'backbone', FASTPT_COMPILES)}" if compile else "")
    return (lambda batch: model(**batch).loss), _unique(model.parameters()), how


def build_transformers(size: str, cfg: dict, *, device: str = "cpu", compile: bool = False):
    """``(loss_fn(batch) -> loss, parameters, how)`` for transformers' BertForMaskedLM (sdpa
    attention) with the sizes, dropout and epsilon of the fastpt backbone ``cfg``; ``compile``: the
    whole model compiled, as HF Trainer does."""
    from transformers import BertConfig, BertForMaskedLM

    bert_like = dict(pre_norm=False, position="learned", norm="layernorm", activation="gelu", causal=False)
    differs = {k: cfg.get(k) for k, v in bert_like.items() if cfg.get(k, v) != v}
    if differs:
        raise ValueError(f"{size}: not a BERT architecture ({differs}); transformers' BertForMaskedLM cannot match it")
    config = BertConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
                        intermediate_size=cfg.get("intermediate_size") or 4 * cfg["hidden_size"],
                        max_position_embeddings=cfg.get("max_positions", 512),
                        type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("norm_eps", 1e-12),
                        hidden_dropout_prob=cfg.get("dropout", 0.1),
                        attention_probs_dropout_prob=cfg.get("attention_dropout", 0.1),
                        pad_token_id=cfg.get("pad_token_id", 0), tie_word_embeddings=True)
    return _transformers_side(BertForMaskedLM._from_config(config, attn_implementation="sdpa").to(device), compile)


def _transformers_side(model, compile: bool = False):
    """``(loss_fn, parameters, how)`` of a transformers model built with sdpa attention, after
    checking that it runs sdpa; ``compile``: the whole model compiled in place (``model.compile()``)."""
    name = type(model).__name__
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise RuntimeError(f"{name}: asked for sdpa attention, got {impl!r}")
    how = f"transformers.{name} (sdpa)" + (f"; {_compile(model, None, HF_COMPILES)}" if compile else "")
    return (lambda batch: model(**batch).loss), _unique(model.parameters()), how


# what GPT2LMHeadModel is, in text_encoder's arguments (None: "the same as num_heads / hidden_size")
GPT2_LIKE = dict(pre_norm=True, causal=True, position="learned", position_offset=0, norm="layernorm",
                 activation="gelu_tanh", embedding_norm=False, final_norm=True, type_vocab_size=0, bias=True,
                 num_kv_heads=None, embed_dim=None, share_layers=False)


def _gpt2_differences(cfg: dict) -> dict:
    """``{key: (value, GPT-2's)}`` for each ``text_encoder`` argument of ``cfg`` (defaults filled
    in) that GPT2LMHeadModel cannot express."""
    import inspect

    from fastpt.models import text_encoder

    full = {k: p.default for k, p in inspect.signature(text_encoder).parameters.items()
            if p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in cfg.items() if k != "builder"})
    if full["embedding_norm"] is None:
        full["embedding_norm"] = not full["pre_norm"]
    if full["final_norm"] is None:
        full["final_norm"] = bool(full["pre_norm"])
    if full["num_kv_heads"] == full.get("num_heads"):
        full["num_kv_heads"] = None
    if full["embed_dim"] == full.get("hidden_size"):
        full["embed_dim"] = None
    return {k: (full[k], v) for k, v in GPT2_LIKE.items() if full[k] != v}


def gpt2_config(cfg: dict, *, size: str = "model"):
    """transformers' ``GPT2Config`` with the sizes, dropout and epsilon of the fastpt backbone
    ``cfg`` (``text_encoder`` arguments). Raises ValueError naming each argument GPT-2 cannot
    express (``size`` labels the message)."""
    from transformers import GPT2Config

    differs = _gpt2_differences(cfg)
    if differs:
        what = ", ".join(f"{k}={got!r} (GPT-2: {want!r})" for k, (got, want) in differs.items())
        raise ValueError(f"{size}: not a GPT-2 architecture ({what}); transformers' GPT2LMHeadModel cannot match it")
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    dropout = cfg.get("dropout", 0.1)
    embd = cfg.get("embedding_dropout")
    return GPT2Config(vocab_size=vocab, n_positions=cfg.get("max_positions", 1024), n_embd=d,
                      n_layer=cfg["num_layers"], n_head=cfg["num_heads"],
                      n_inner=cfg.get("intermediate_size") or 4 * d, activation_function="gelu_new",
                      layer_norm_epsilon=cfg.get("norm_eps", 1e-5), resid_pdrop=dropout,
                      embd_pdrop=dropout if embd is None else embd, attn_pdrop=cfg.get("attention_dropout", 0.1),
                      initializer_range=cfg.get("initializer_range", 0.02), bos_token_id=vocab - 1,
                      eos_token_id=vocab - 1, tie_word_embeddings=True, use_cache=False)


def build_fastpt_gpt2(size: str, cfg: dict, *, device: str = "cpu", compile: bool = False):
    """``(loss_fn(batch) -> loss, parameters, how)`` for fastpt's GPT-2 causal LM:
    ``fastpt.assemble.build("gpt2-small", backbone=cfg)`` (objective ``clm``, tied head);
    ``compile``: its backbone compiled in place, as ``fastpt pretrain`` does."""
    import fastpt.assemble as assemble

    model = assemble.build("gpt2-small", name=size, backbone=cfg).to(device)
    how = "fastpt.assemble.build (gpt2-small, clm)" + (
        f"; {_compile(model, 'backbone', FASTPT_COMPILES)}" if compile else "")
    return (lambda batch: model(**batch).loss), _unique(model.parameters()), how


def build_transformers_gpt2(size: str, cfg: dict, *, device: str = "cpu", compile: bool = False):
    """``(loss_fn(batch) -> loss, parameters, how)`` for transformers' GPT2LMHeadModel (sdpa
    attention) with ``gpt2_config(cfg)``; ValueError for a config that is not GPT-2-like;
    ``compile``: the whole model compiled, as HF Trainer does."""
    from transformers import GPT2LMHeadModel

    return _transformers_side(GPT2LMHeadModel._from_config(gpt2_config(cfg, size=size),
                                                          attn_implementation="sdpa").to(device), compile)


def train_step(loss_fn, params, batches: list[dict], device: str, dtype: torch.dtype):
    """A no-argument training step over ``batches`` in turn: forward (autocast to ``dtype`` when it
    is not float32), backward, AdamW, zero_grad."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    cycle = itertools.cycle(batches)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if dtype != torch.float32 else (
        contextlib.nullcontext)

    def step():
        batch = next(cycle)
        with autocast():
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


MODELS = ("bert", "gpt2")


def bench_e2e(ctx, *, size: str | None = None, batch: int | None = None, seq: int | None = None,
              dropout: float | None = None, dtypes: list[torch.dtype] | None = None, gpt_size: str | None = None,
              models=MODELS, compile: bool = False) -> list[dict]:
    """tokens/s of fastpt vs transformers on one BERT MLM step and one GPT-2 causal-LM step; rows
    for ``report`` (BERT's first, then GPT-2's; within each, one pair per dtype).

    ``size``: the BERT size, ``gpt_size``: the GPT-2 one (``GPT2_SIZES``); ``batch``, ``seq``,
    ``dropout`` (when given) apply to both; ``models``: which pairs ("bert", "gpt2"); ``compile``:
    both sides under torch.compile instead of eager (module docstring; the case names end in
    ``COMPILE_CASE``), the compiled case only.
    Defaults: bert-base, 32 x 512 and gpt2-small, 16 x 1024, bf16 autocast on CUDA; bert-tiny,
    32 x 128 and gpt2-mini, 16 x 128 on the CPU, in float32 and, where the CPU multiplies bf16
    natively (``peaks.native_bf16``), again under bf16 autocast (``ctx.quick``: bert-tiny and
    gpt2-tiny at 8 x 64, float32, few steps).
    """
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"models: unknown {bad}; expected some of {list(MODELS)}")
    if dtypes is None:
        dtypes = [torch.bfloat16] if ctx.cuda else [torch.float32] + (
            [torch.bfloat16] if not ctx.quick and native_bf16("cpu") else [])
    rows = []
    if compile and models and ctx.device not in _COMPILER_STARTED:
        _COMPILER_STARTED[ctx.device] = _start_compiler(ctx.device)
        ctx.log(f"e2e torch.compile: Dynamo and Inductor started in {_COMPILER_STARTED[ctx.device]:.1f} s "
                "(a toy graph; counted in neither side's warm-up)")
    for model in (m for m in MODELS if m in models):  # BERT's rows first
        for dtype in dtypes:
            sides, batches, kw = PAIRS[model](ctx, gpt_size if model == "gpt2" else size, batch, seq, dropout, dtype,
                                              compile=compile)
            rows += _time_pair(ctx, sides, batches, compile=compile, **kw)
    return rows


def bert_pair(ctx, size=None, batch=None, seq=None, dropout=None, dtype=torch.bfloat16, *, compile=False):
    """``(sides, batches, row keywords)`` of the BERT MLM pair (defaults: ``bench_e2e``'s):
    sides maps "fastpt" and "transformers" to ``() -> (loss_fn, params, how)``, each side compiled
    when ``compile``."""
    cuda = ctx.cuda
    size = size or ("bert-tiny" if ctx.quick or not cuda else "bert-base")
    batch = batch or (8 if ctx.quick else 32)
    seq = seq or (64 if ctx.quick else 512 if cuda else 128)
    cfg = backbone_config(size, dropout=dropout)
    note = (f"same config and batches, {dtype_name(dtype)}, AdamW, dropout {cfg['dropout']} / "
            f"{cfg['attention_dropout']} (hidden / attention); MFU counts the "
            f"FLOPs the objective needs (head on the {MASK_PROB:.0%} masked tokens)")
    sides = {"fastpt": lambda: build_fastpt(size, cfg, device=ctx.device, compile=compile),
             "transformers": lambda: build_transformers(size, cfg, device=ctx.device, compile=compile)}
    if compile:  # the eager baseline in the same run too (issue 6 compares against it)
        sides[EAGER_SIDE] = lambda: build_transformers(size, cfg, device=ctx.device)
    return sides, make_batches(4, batch, seq, ctx.device), dict(
        op=f"{size} MLM train step", size=size, batch=batch, seq=seq, dtype=dtype,
        flops=mlm_flops_per_token(cfg, seq) * batch * seq, note=note)


def gpt2_pair(ctx, size=None, batch=None, seq=None, dropout=None, dtype=torch.bfloat16, *, compile=False):
    """``(sides, batches, row keywords)`` of the GPT-2 causal-LM pair, as ``bert_pair``."""
    cuda = ctx.cuda
    size = size or ("gpt2-tiny" if ctx.quick else "gpt2-small" if cuda else "gpt2-mini")
    batch = batch or (8 if ctx.quick else 16)
    seq = seq or (64 if ctx.quick else 1024 if cuda else 128)
    cfg = gpt2_backbone_config(size, dropout=dropout)
    embd = cfg["dropout"] if cfg.get("embedding_dropout") is None else cfg["embedding_dropout"]
    note = (f"same config and batches (labels = input_ids), {dtype_name(dtype)}, AdamW, dropout {cfg['dropout']} / "
            f"{cfg['attention_dropout']} / {embd} (hidden / attention / embedding); MFU counts the LM head on every "
            f"token and causal attention in full (PaLM)")
    sides = {"fastpt": lambda: build_fastpt_gpt2(size, cfg, device=ctx.device, compile=compile),
             "transformers": lambda: build_transformers_gpt2(size, cfg, device=ctx.device, compile=compile)}
    if compile:
        sides[EAGER_SIDE] = lambda: build_transformers_gpt2(size, cfg, device=ctx.device)
    batches = make_clm_batches(4, batch, seq, ctx.device, vocab_size=cfg["vocab_size"])
    return sides, batches, dict(op=f"{size} CLM train step", size=size, batch=batch, seq=seq, dtype=dtype,
                                flops=clm_flops_per_token(cfg, seq) * batch * seq, note=note)


PAIRS = {"bert": bert_pair, "gpt2": gpt2_pair}


# CPU: each pair is timed under glibc's malloc as it comes and again with freed memory kept for
# reuse (fastpt._cpu_malloc, what fastpt pretrain sets on the CPU): both sides under the same
# setting in each row group. Peak memory is measured once, under glibc's own behaviour.
MALLOC_KEPT_CASE = ", malloc keeps freed memory"
MALLOC_NOTES = {False: "glibc malloc as it comes (large blocks mmapped and unmapped every step)",
                True: "glibc malloc keeps freed memory for reuse (M_MMAP_MAX 0; as fastpt pretrain on the CPU)"}


def _malloc_settings(ctx) -> list:
    """[False, True] on the CPU (both allocator settings), [None] (as it is) on CUDA, in quick
    runs, and where ``fastpt._cpu_malloc`` cannot act (not glibc, FASTPT_CPU_MALLOC=default)."""
    if ctx.cuda or ctx.quick or _cpu_malloc.refusal() is not None:
        return [None]
    return [False, True]


_COMPILER_STARTED: dict[str, float] = {}  # device -> seconds the first compilation in this process took


def _start_compiler(device: str) -> float:
    """Seconds to compile a toy function and its gradient: what the first compilation in a process
    pays once (imports, Inductor's compile workers, the C++ or Triton toolchain), paid here so that
    it lands in neither side's warm-up (else the side compiled first would carry it)."""
    t0 = time.perf_counter()
    x = torch.ones(8, device=device, requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()
    synchronize(device)
    return time.perf_counter() - t0


def _dynamo_counts() -> tuple[int, int]:
    """(graphs Dynamo compiled, graph breaks it met) so far in this process: its own counters,
    which ``torch._dynamo.reset`` does not clear; a bench takes differences."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _time_pair(ctx, sides: dict, batches: list[dict], *, op: str, size: str, batch: int, seq: int,
               dtype: torch.dtype, flops: float, note: str, compile: bool = False) -> list[dict]:
    """Build each side (``sides``: provider -> ``() -> (loss_fn, params, how)``; "transformers" is
    the baseline), warm it up, time the training steps alternately, one row per side. A side that
    fails to build or run gets an error row and the other is still measured. ``compile``: the
    sides build compiled models (the case name says so); one more warm-up step, and Dynamo's
    graphs and graph breaks counted per side."""
    warmup, repeats = (1, 2) if ctx.quick else ((3, 10) if ctx.cuda else (2, 6))
    if compile:
        # Dynamo compiles on the first call and may again on the second (a shape it then marks
        # dynamic); start each pair from empty caches, so neither side runs an earlier pair's graphs
        warmup = max(2, warmup + 1)
        torch._dynamo.reset()
    tokens = batch * seq
    p = ctx.peak(dtype)
    common = dict(suite="e2e", op=op, case=f"{size} B{batch} S{seq}" + (COMPILE_CASE if compile else ""),
                  mode="fwd+bwd+AdamW", shape=(batch, seq), dtype=dtype_name(dtype), baseline="transformers")
    steps, hows, warm, dynamo, rows = {}, {}, {}, {}, []

    def fail(name: str, exc: Exception, stage: str) -> None:
        """An error row for a side that failed (the other is still measured); it leaves the rounds."""
        msg = str(exc).strip().splitlines()
        rows.append(make_row(**common, provider=name, status=f"error ({stage}): {type(exc).__name__}: "
                             f"{msg[0][:200] if msg else ''}"))
        ctx.log(f"e2e {name}: {rows[-1]['status']}")
        steps.pop(name, None)

    for name, build in sides.items():
        try:
            torch.manual_seed(0)
            before = _dynamo_counts()
            loss_fn, params, hows[name] = build()
            steps[name] = train_step(loss_fn, params, batches, ctx.device, dtype)
            warm[name] = []
            for _ in range(warmup):  # untimed (compilation, allocator); each step's seconds reported
                t0 = time.perf_counter()
                steps[name]()
                synchronize(ctx.device)
                warm[name].append(time.perf_counter() - t0)
            dynamo[name] = tuple(a - b for a, b in zip(_dynamo_counts(), before))
        except Exception as exc:  # noqa: BLE001 - report the side that failed, measure the other
            fail(name, exc, "build / warm-up")
    mems = {}
    for name, step in list(steps.items()):
        try:
            mems[name] = peak_memory(step, device=ctx.device)
        except Exception as exc:  # noqa: BLE001
            fail(name, exc, "memory step")
    compiled_before = _dynamo_counts()[0]
    for keep in _malloc_settings(ctx):
        timings = {name: Timing() for name in steps}
        with contextlib.nullcontext() if keep is None else _cpu_malloc.tuned(keep):
            for name, step in list(steps.items()) if keep is not None else ():
                try:
                    step()  # one step under this allocator before timing
                except Exception as exc:  # noqa: BLE001
                    fail(name, exc, "allocator step")
            for _ in range(repeats):  # alternate: a disturbance on a shared machine hits both sides alike
                for name, step in list(steps.items()):
                    try:
                        timings[name].times += time_fn(step, device=ctx.device, warmup=0, repeats=1).times
                    except Exception as exc:  # noqa: BLE001
                        fail(name, exc, "timed steps")
        case = common["case"] + (MALLOC_KEPT_CASE if keep else "")
        how_malloc = "" if keep is None else f"; {MALLOC_NOTES[keep]}"
        recompiled = _dynamo_counts()[0] - compiled_before
        for name in steps:
            how_compile = ""
            if compile and name == EAGER_SIDE:
                how_compile = "; not compiled: the eager baseline, timed in the same rounds as the compiled sides"
            elif compile:
                graphs, breaks = dynamo[name]
                how_compile = (f"; compile warm-up {sum(warm[name]):.1f} s over {len(warm[name])} untimed steps "
                               f"({', '.join(f'{t:.2f}' for t in warm[name])} s); Dynamo: {graphs} "
                               f"graph{'s' * (graphs != 1)}, {breaks} graph break{'s' * (breaks != 1)}")
                if recompiled:
                    how_compile += (f"; Dynamo compiled {recompiled} more graph(s) during the timed steps, in their "
                                    f"times (the warm-up did not absorb compilation)")
            rows.append(make_row(**{**common, "case": case}, provider=name, timing=timings[name], mem_bytes=mems[name],
                                 flops=flops, units=tokens, unit="tokens", peak=p,
                                 note=f"{hows[name]}; {note}{how_malloc}{how_compile}"))
            r = rows[-1]
            # not report.COLUMNS (the CSV leaves them out); in the JSON rows
            r["warmup_s"] = sum(warm[name])
            if compile:
                r["dynamo_graphs"], r["graph_breaks"] = dynamo[name]
            ctx.log(f"e2e {case} {dtype_name(dtype)} {name:<13} {r['time_ms']:9.1f} ms/step  {r['rate']:10,.0f} tokens/s"
                    + (f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "")
                    + (f"  warm-up {r['warmup_s']:.1f} s, {r['graph_breaks']} graph breaks" if compile else ""))
    return rows
