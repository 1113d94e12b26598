"""Run Hugging Face BERT, RoBERTa, GPT-2 and ViT models on fastpt's fused attention and LM losses.

``patch_hf(model)`` changes one model instance (never a transformers class or module global):

* **Attention** (every layer, any head class: ``BertModel``, ``...ForSequenceClassification``,
  ``GPT2LMHeadModel``, ``ViTForImageClassification``, ...): transformers 5 looks the attention
  function up at every call in ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. fastpt
  registers its function under the name ``"fastpt"`` (plus the mask builder of ``"sdpa"`` under
  the same name: boolean ``(B, 1, S, S)`` masks, or None when there is no padding) and switches
  the model to it with ``model.set_attn_implementation("fastpt")``. This is the extension point
  transformers documents (``AttentionInterface``): it needs no copy of HF's layer code, so it
  keeps working when that code changes, and undoing it is restoring one config field. That
  field lives on the config, which transformers shares among every model built from it (a
  teacher and a student from one config object, a head and its backbone): the patched model
  and its submodules that held that config first get their own copy of it, so other models
  keep their attention. Unpickling a patched layer (a whole patched model: ``torch.load``,
  spawn) registers ``"fastpt"`` again, so it also runs in a fresh process.
  The function receives HF's ``(B, H, S, D)`` q, k, v (transposed views of the projections) and
  hands ``fastpt.ops.attention`` their ``(B, S, H, D)`` views, no copy. It reads the 4-D mask
  HF built rather than the user's 2-D one, because that mask is the ground truth of what HF
  would apply (padding, causal, packed ``position_ids``, user 4-D masks, caches): a mask that is
  exactly right padding (plus causal for GPT-2 / BERT decoders) becomes ``seqlens``, checked
  once per forward (the result is cached on the mask tensor all layers share). Everything else
  runs the model's original attention ("sdpa" or "eager"; "sdpa" for other originals) for that
  call: left padding or any other mask, ``output_attentions=True``, a ``head_mask``, query and
  key lengths that differ (generation with a cache), cross-attention, a head dim over
  ``fastpt.ops.attention.MAX_HEAD_DIM``. Attention dropout in
  training runs in the fused op (counter-based RNG seeded from torch's generator, so
  ``torch.manual_seed`` reproduces it; the masks differ from ``nn.Dropout``'s).
  Padded positions: fastpt outputs 0 attention for padded query rows where HF lets them attend
  to the real tokens, so per-position outputs (hidden states, token logits) *at padded
  positions* differ; real positions match HF. The model's own loss and pooled outputs are HF's:
  a forward that would read a padded position runs the original attention for that call, by
  what its head reads (a known transformers head whose forward is not overridden):
  masked / causal LM and token classification (``labels`` / ``shift_labels``) only where a
  label at a padded position is not -100 (GPT-2 trained on ``labels=input_ids``); sequence
  classification, multiple choice, next-sentence prediction and base models pool position 0
  and read none; ``GPT2ForSequenceClassification`` reads the position it pools (the last whose
  input id is not ``config.pad_token_id``). Every other forward runs the original attention
  whenever its ``attention_mask`` marks padding: question answering (the span loss on
  ``start_positions`` / ``end_positions`` is a softmax over every position, padded ones
  included), ``GPT2DoubleHeadsModel``, ``ViTForMaskedImageModeling`` and a subclass that
  overrides ``forward``. A loss computed outside the model from padded positions differs. The
  original attention covers the forward call only (per thread): with HF's gradient checkpointing
  the backward's recomputation of such a call runs fused, so its gradients are not HF's (reentrant
  checkpointing) or torch refuses the recomputed shapes (non-reentrant): train those heads on
  padded batches without gradient checkpointing, or unpatched.
* **Loss** (``BertForMaskedLM``, ``RobertaForMaskedLM``, ``GPT2LMHeadModel``): in training mode
  (``model.train()``) a forward with ``labels`` runs the backbone, keeps the rows whose label is
  not -100 (GPT-2: after HF's shift), applies the MLM transform to those rows only and computes
  the loss with ``fastpt.ops.linear_cross_entropy``: the ``(T, V)`` logits are never
  materialised and ``output.logits`` is None. In eval mode, or without labels, HF's own forward
  runs (full logits, HF's loss), so ``Trainer.evaluate`` and metrics see the usual outputs; so it
  does for tuple outputs (``return_dict=False``, or ``config.return_dict`` False), whose layout
  (``loss, logits, ...``) is then HF's.
  GPT-2's ``num_items_in_batch`` (gradient accumulation) and ``shift_labels`` are honoured.
  Differences: a batch whose labels are all -100 gets loss 0 (torch: NaN). Hooked by an instance
  attribute ``model.forward`` (the class is untouched) that shows HF's forward signature to
  ``inspect.signature`` (``Trainer`` drops the dataset columns it does not name).

Undo with ``unpatch_hf(model)``; ``patch_hf`` on a patched model re-patches with the new options.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import sys
import types

import torch
import torch.nn.functional as F

from .. import _native
from ..ops import _rng
from ..ops.attention import MAX_HEAD_DIM, attention
from ..ops.linear_cross_entropy import labelled_rows, linear_cross_entropy

__all__ = ["patch_hf", "unpatch_hf", "SUPPORTED"]

NAME = "fastpt"  # the attention implementation name registered with transformers
# config.model_type -> (self-attention classes, cross-attention classes) of its modeling file
_ATTENTION = {
    "bert": ({"BertSelfAttention"}, {"BertCrossAttention"}),
    "roberta": ({"RobertaSelfAttention"}, {"RobertaCrossAttention"}),
    "gpt2": ({"GPT2Attention"}, set()),  # GPT2Attention.is_cross_attention tells them apart
    "vit": ({"ViTAttention"}, set()),
}
SUPPORTED = "BERT, RoBERTa, GPT-2, ViT (config.model_type 'bert', 'roberta', 'gpt2', 'vit')"
# kwargs that change what attention computes; fused only when they are absent or None
_UNFUSABLE_KWARGS = ("head_mask", "softcap", "sliding_window", "position_bias", "s_aux")


# ----------------------------------------------------------------------------- attention


@_native.once
def _output_collector():
    """transformers 5 records attention weights through this context variable (GPT-2 even drops the
    ``output_attentions`` kwarg before its layers); imported on first use, not with fastpt (and
    first used by ``patch_hf``, so compiled code only reads the cache)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions: the kwarg is all we see
        return None
    return _active_collector


def _wants_weights(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    collector = _output_collector()
    if collector is None:
        return False
    if torch.compiler.is_compiling():
        # Dynamo cannot trace ContextVar.get; under compile transformers' CompileableContextVar keeps
        # what the compiled model set in a plain attribute, which is what it reads there too.
        collected = collector.global_var if getattr(collector, "compiling", False) else None
    else:
        collected = collector.get()
    return bool(collected) and "attentions" in collected


def _right_padding_lengths(mask: torch.Tensor, causal: bool):
    """Row lengths (int32 ``(B,)``) when the boolean ``(B, 1, S, S)`` mask is exactly right padding
    (and causal when ``causal``), else None. Cached on the mask, which every layer shares.

    Under torch.compile always None (the check reads the mask on the host, a graph break per
    layer): masked layers keep the model's own attention there, which Dynamo traces."""
    if torch.compiler.is_compiling():
        return None
    key = None if mask.is_inference() else (mask._version, causal)  # inference tensors have no version
    cached = getattr(mask, "_fastpt_lengths", None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    b, _, s, _ = mask.shape
    lengths = mask[:, 0, -1].sum(-1)  # the last query sees every real key, causal or not
    expected = (torch.arange(s, device=mask.device) < lengths[:, None])[:, None, :].expand(b, s, s)
    if causal:
        expected = expected & torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    result = lengths.to(torch.int32) if torch.equal(mask[:, 0], expected) else None
    if key is not None:
        mask._fastpt_lengths = (key, result)
    return result


def _plan(module, query, key, value, mask, kwargs):
    """``(causal, seqlens)`` when the fused op computes exactly what HF would, else None."""
    _, fusable = getattr(module, "_fastpt_attn", ("sdpa", False))
    if not fusable or _wants_weights(kwargs) or any(kwargs.get(k) is not None for k in _UNFUSABLE_KWARGS):
        return None
    # this call reads padded positions (_exact_at_padding: never traced, so the compiled graph reads no ContextVar)
    if not torch.compiler.is_compiling() and id(module) in _UNFUSED.get():
        return None
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        return None  # a cache (q shorter than k) or cross shapes
    if query.shape[-1] > MAX_HEAD_DIM:
        return None
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    s = query.shape[2]
    if mask is None:
        return causal and s > 1, None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape != (query.shape[0], 1, s, s):
        return None
    lengths = _right_padding_lengths(mask, causal)
    if lengths is None:
        return None
    return causal, lengths


def _original_attention(module, query, key, value, mask, **kwargs):
    """The attention the model had before patching ("sdpa", or "eager" with its float mask)."""
    fallback, _ = getattr(module, "_fastpt_attn", ("sdpa", False))
    if fallback != "eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, **kwargs)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if mask is None and causal and query.shape[2] > 1:
        # the mask builder registered for "fastpt" is sdpa's: None without padding, leaving causality to
        # SDPA's is_causal (upper-left aligned, as this tril), which eager attention does not have
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None and mask.dtype == torch.bool:  # what transformers' eager_mask makes of it
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's eager-only variant
        return module._upcast_and_reordered_attn(query, key, value, mask)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, mask, **kwargs)


def fastpt_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: q, k, v ``(B, H, S, D)`` -> ``((B, S, H, D), None)``."""
    plan = _plan(module, query, key, value, attention_mask, kwargs)
    if plan is None:
        return _original_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   **kwargs)
    causal, seqlens = plan
    seed = _rng.fresh_seed() if dropout else 0
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                    seqlens=seqlens, dropout_p=float(dropout), scale=scaling, seed=seed)
    return out, None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, fastpt_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


class _Registration:
    """Held by every patched layer (``_fastpt_registration``): unpickling it registers ``"fastpt"`` with
    transformers, so a patched model loaded in a fresh process (``torch.load``, spawn) runs."""

    def __reduce__(self):
        return _registration, ()


def _registration() -> _Registration:
    _register()
    return _REGISTRATION


_REGISTRATION = _Registration()


# ----------------------------------------------------------------------------- padded positions


def _padded_positions(mask):
    """The positions the ``attention_mask`` argument marks as padding (bool, its shape without the 4-D
    mask's query axis), or None where the fused attention never runs with that mask."""
    if not torch.is_tensor(mask):
        return None
    if mask.dim() == 4:  # user 4-D masks fuse only when boolean: the keys the last query cannot see
        return ~mask[:, 0, -1] if mask.dtype == torch.bool else None
    return mask == 0


# What each head of transformers reads of its backbone's hidden states at padded positions, beyond the
# per-position outputs (hidden states, token logits) the module docstring says differ there:
#   "outputs": nothing. Base models (BertModel's pooler reads position 0, real in every right-padded row
#              with a token), heads pooled from position 0. A row that is all padding matches HF's sdpa
#              attention there (0), not its eager one (a uniform softmax over every key): not checked.
#   "labels": position t where labels[t] (or shift_labels[t]) is not -100: masked LM, token
#             classification, causal LM (HF shifts labels left: a padded position read means a padded
#             label that is not -100, and right padding ends every row, so a real one reads no padding).
#   "last_token": GPT-2's sequence classifier, which pools each row's last position whose input id is
#                 not config.pad_token_id (the last position when it has none): padded when the ids at
#                 padded positions are not pad_token_id.
# Any other forward (not listed, or overridden by a subclass) counts as reading every position:
# question answering (its span loss is a softmax over every position, padded ones included),
# GPT2DoubleHeadsModel (the last position by default), ViTForMaskedImageModeling (every patch).
_HEAD_READS = {
    "BertModel": "outputs", "BertForSequenceClassification": "outputs", "BertForMultipleChoice": "outputs",
    "BertForNextSentencePrediction": "outputs", "BertForPreTraining": "labels", "BertForMaskedLM": "labels",
    "BertLMHeadModel": "labels", "BertForTokenClassification": "labels",
    "RobertaModel": "outputs", "RobertaForSequenceClassification": "outputs", "RobertaForMultipleChoice": "outputs",
    "RobertaForMaskedLM": "labels", "RobertaForCausalLM": "labels", "RobertaForTokenClassification": "labels",
    "GPT2Model": "outputs", "GPT2LMHeadModel": "labels", "GPT2ForTokenClassification": "labels",
    "GPT2ForSequenceClassification": "last_token",
    "ViTModel": "outputs", "ViTForImageClassification": "outputs",
}


@functools.cache
def _head_reads(cls) -> str:
    """``_HEAD_READS`` of ``cls``, or "all" when its forward is none of those heads' (a subclass may
    override it): then any padding in a call runs the original attention."""
    for klass in cls.__mro__:
        reads = _HEAD_READS.get(klass.__name__)
        if reads and klass.__module__.startswith("transformers.") and cls.forward is klass.forward:
            return reads
    return "all"


def _reads_padding(model, args, kwargs) -> bool:
    """Whether the loss or the pooled outputs of a call ``model.forward(*args, **kwargs)`` read a position
    its ``attention_mask`` marks as padding (``_head_reads``): the fused attention computes those
    positions differently (0 attention in padded query rows), so the call must run HF's attention."""
    state = model.__dict__.get("_fastpt_patch")
    if not (state and state["attention"]) or torch.compiler.is_compiling():
        return False  # compiled, padded masks keep the original attention (_right_padding_lengths)
    reads = _head_reads(type(model))
    if reads == "outputs":
        return False
    named = dict(kwargs)
    if len(args) > 1:  # in HF's positional order (input_ids, attention_mask, ...; GPT-2: the cache second)
        named.update(zip(list(inspect.signature(type(model).forward).parameters)[1:], args))
    padded = _padded_positions(named.get("attention_mask"))
    if padded is None:
        return False
    if reads == "labels":
        for labels in (named.get("labels"), named.get("shift_labels")):
            if torch.is_tensor(labels) and labels.shape == padded.shape:
                if bool(((labels != -100) & padded.to(labels.device)).any()):
                    return True
        return False
    if reads == "last_token":  # GPT2ForSequenceClassification's pooled position, as HF finds it
        ids, pad_id = named.get("input_ids"), model.config.pad_token_id
        if pad_id is None or not torch.is_tensor(ids):
            return bool(padded[..., -1].any())
        if ids.shape == padded.shape:
            positions = torch.arange(ids.shape[-1], device=ids.device)
            last = (positions * (ids != pad_id)).argmax(-1, keepdim=True).to(padded.device)
            return bool(padded.gather(-1, last).any())
    # these decisions read the mask on the host: on CUDA one device sync per forward of such a head
    return bool(padded.any())


# ids of the patched attention modules that run their original attention in this thread / task (``_unfused``)
_UNFUSED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("fastpt_patch_hf_unfused", default=frozenset())


@contextlib.contextmanager
def _unfused(model):
    """Every patched layer of ``model`` runs its original attention inside the block, in this thread (or asyncio
    task) only: a context variable, not the modules' attributes, which threads sharing the model would see
    (another thread's call then lost HF's loss, and the last to leave restored "unfused" for good)."""
    layers = frozenset(id(m) for m in model.modules() if "_fastpt_attn" in m.__dict__)
    token = _UNFUSED.set(_UNFUSED.get() | layers)
    try:
        yield
    finally:
        _UNFUSED.reset(token)


def _exact_at_padding(forward):
    """``forward`` (of a patched model), run with the original attention for a call whose loss reads a
    padded position. The check lives in the function, not in ``_PatchedForward.__call__``: accelerate
    rebinds ``model.forward.__func__`` under mixed precision."""
    @functools.wraps(forward)
    def checked(self, *args, **kwargs):
        if _reads_padding(self, args, kwargs):
            with _unfused(self):  # eager (not traced under torch.compile): _plan reads the context variable
                return torch.compiler.disable(forward)(self, *args, **kwargs)
        return forward(self, *args, **kwargs)
    return checked


# ----------------------------------------------------------------------------- losses


def _mlm_head(model, hidden):
    """(transformed rows, decoder Linear) of BERT's ``cls.predictions`` / RoBERTa's ``lm_head``."""
    if hasattr(model, "cls"):
        return model.cls.predictions.transform(hidden), model.cls.predictions.decoder
    head = model.lm_head
    return head.layer_norm(F.gelu(head.dense(hidden))), head.decoder


# The two forwards below name only what they use (input_ids, labels and the loss options) and pass
# every other argument through by keyword, so they follow the backbone's signature in any
# transformers 5.x (the cache argument is ``cache`` in 5.24 and was ``past_key_values`` before; the
# GPT-2 loss test failed on a GPU machine with 5.17 while it passed here with 5.24, with forwards
# that spelled the 5.24 signature out). Positional arguments past input_ids are left to HF's own
# forward, which alone knows their order. So are tuple outputs (``return_dict=False``): HF's tuple
# is its output's fields without the None ones, so one without logits would shift every later
# field (GPT-2's ``out[1]`` was the cache); HF's forward and loss make its own tuple.


def _returns_dict(model, kwargs) -> bool:
    """Whether a call returns a ModelOutput rather than a tuple: its ``return_dict``, else
    ``config.return_dict``, as transformers' ``can_return_tuple`` resolves it."""
    return_dict = kwargs.get("return_dict")
    return bool(getattr(model.config, "return_dict", True) if return_dict is None else return_dict)


def _output(cls, out, **fields):
    """``cls`` (a transformers ModelOutput) from ``fields`` plus the backbone output's fields it has."""
    known = set(cls.__dataclass_fields__)
    return cls(**fields, **{k: v for k, v in out.items() if k in known and k not in fields})


@_exact_at_padding
def _masked_lm_forward(self, input_ids=None, *args, labels=None, **kwargs):
    from transformers.modeling_outputs import MaskedLMOutput
    if labels is None or not self.training or args or not _returns_dict(self, kwargs):
        return type(self).forward(self, input_ids, *args, labels=labels, **kwargs)
    kwargs.pop("return_dict", None)
    out = getattr(self, self.base_model_prefix)(input_ids, return_dict=True, **kwargs)
    hidden, targets = labelled_rows(out[0], labels)
    hidden, decoder = _mlm_head(self, hidden)
    loss = linear_cross_entropy(hidden, decoder.weight, targets, bias=decoder.bias)
    return _output(MaskedLMOutput, out, loss=loss, logits=None)


@_exact_at_padding
def _causal_lm_forward(self, input_ids=None, *args, labels=None, logits_to_keep=0, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
    if (labels is None or not self.training or args or not _returns_dict(self, kwargs)
            or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)):
        return type(self).forward(self, input_ids, *args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("return_dict", None)
    out = self.transformer(input_ids, return_dict=True, **kwargs)
    if shift_labels is None:  # as transformers' ForCausalLMLoss: tokens < n predict n
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    hidden, targets = labelled_rows(out.last_hidden_state, shift_labels)
    head = self.lm_head
    if num_items is None:
        loss = linear_cross_entropy(hidden, head.weight, targets, bias=head.bias)
    else:
        loss = linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, reduction="sum")
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return _output(CausalLMOutputWithCrossAttentions, out, loss=loss, logits=None)


@_exact_at_padding
def _checked_forward(self, *args, **kwargs):
    """HF's own forward behind the padding check: heads whose loss or pooled outputs may read a padded
    position (``_head_reads``) and no fused loss (or ``loss=False``)."""
    return type(self).forward(self, *args, **kwargs)


_LOSS_FORWARDS = {"BertForMaskedLM": _masked_lm_forward, "RobertaForMaskedLM": _masked_lm_forward,
                  "GPT2LMHeadModel": _causal_lm_forward}
_FORWARDS_BY_NAME = {f.__name__: f for f in (_masked_lm_forward, _causal_lm_forward, _checked_forward)}
_FORWARDS_BY_NAME["_labelled_forward"] = _checked_forward  # its name in models pickled by earlier fastpt


class _PatchedForward:
    """A patched model's ``forward``: one of the forwards above, bound to the model. An object rather than
    a ``types.MethodType`` so that the model pickles (a bound method pickles as ``getattr(model, its
    name)``, which no model has): it pickles as the model and the forward's name. ``inspect.signature``
    shows HF's forward (``__signature__``, on ``__func__`` too, which accelerate rebinds): ``Trainer``
    keeps only the dataset columns named there (attention_mask, ...); the forwards above take every
    one of them, by position or keyword. Tuples (``return_dict=False``) are the forwards' own doing."""

    def __init__(self, model, name: str):
        self._name = name
        forward = _FORWARDS_BY_NAME[name]

        @functools.wraps(forward)
        def func(self, *args, **kwargs):  # a new function per model: it carries the signature
            return forward(self, *args, **kwargs)

        func.__signature__ = inspect.signature(type(model).forward)
        self.__wrapped__ = types.MethodType(func, model)
        self.__self__, self.__func__ = model, func
        self.__signature__ = inspect.signature(self.__wrapped__)

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)

    def __reduce__(self):
        return _PatchedForward, (self.__self__, self._name)


def _loss_forward(model):
    """The fused-loss forward for ``model``'s class, if it is one of (or inherits the forward of) the heads above."""
    for klass in type(model).__mro__:
        forward = _LOSS_FORWARDS.get(klass.__name__)
        if forward and klass.__module__.startswith("transformers.") and type(model).forward is klass.forward:
            return forward
    return None


def _may_read_padding(model) -> bool:
    """Whether ``model``'s forward takes an ``attention_mask`` and its loss or pooled outputs may read a
    padded position (``_head_reads``): such a forward runs behind the padding check."""
    return "attention_mask" in inspect.signature(type(model).forward).parameters and \
        _head_reads(type(model)) != "outputs"


def _own_config(model):
    """Give ``model`` and its submodules that share its config object a copy of it (only ``model`` is
    patched, and ``set_attn_implementation`` writes the config)."""
    shared, own = model.config, copy.deepcopy(model.config)
    for m in model.modules():
        if m.__dict__.get("config") is shared:
            m.config = own


# ----------------------------------------------------------------------------- public API


def patch_hf(model, *, attention: bool = True, loss: bool = True):
    """Swap the attention (and the MLM / LM loss) of a Hugging Face model for fastpt's fused ops.

    Args:
        model: a transformers ``PreTrainedModel`` of type BERT, RoBERTa, GPT-2 or ViT (any head).
        attention: route every self-attention layer through ``fastpt.ops.attention``.
        loss: for ``BertForMaskedLM``, ``RobertaForMaskedLM`` and ``GPT2LMHeadModel``, compute the
            training loss with ``fastpt.ops.linear_cross_entropy`` on the labelled rows only
            (``output.logits`` is then None; with ``return_dict=False`` HF's forward and loss run,
            so the tuple is HF's; see the module docstring).

    Returns:
        ``model`` itself, patched in place. Patching twice is the same as patching once (a patched
        model is first unpatched, so new options replace the old ones). With ``attention``, ``model``
        (and its submodules holding the same config) gets its own copy of ``model.config``, and a
        call whose loss or pooled outputs would read a padded position runs the original attention
        (labels not -100 there; any padding for question answering and heads fastpt does not
        know; see the module docstring).

    Raises:
        TypeError naming the model class and the supported architectures when ``model`` is not a
        transformers model of a supported type (never a silent no-op).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_hf: model: expected a transformers model (torch.nn.Module), got "
                        f"{type(model).__name__}; supported: {SUPPORTED}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ATTENTION or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"patch_hf: {type(model).__name__} (model_type {model_type!r}) is not supported; "
                        f"supported: {SUPPORTED}")
    self_attn, cross_attn = _ATTENTION[model_type]
    layers = [m for m in model.modules() if type(m).__name__ in self_attn | cross_attn]
    if not layers:
        raise TypeError(f"patch_hf: {type(model).__name__} has no {'/'.join(sorted(self_attn))} layer to patch; "
                        f"supported: {SUPPORTED}")
    unpatch_hf(model)
    original = config._attn_implementation
    if attention:
        _register()
        _output_collector()  # resolved now, in eager code: compiled layers only read the cache
        _own_config(model)
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:  # transformers only warns when a model refuses
            raise TypeError(f"patch_hf: {type(model).__name__} does not accept a registered attention function")
        fallback = original if original in ("eager", "sdpa") else "sdpa"
        for m in layers:
            fusable = type(m).__name__ in self_attn and not getattr(m, "is_cross_attention", False)
            m._fastpt_attn = (fallback, fusable)
            m._fastpt_registration = _REGISTRATION
    forward = _loss_forward(model) if loss else None
    if forward is None and attention and _may_read_padding(model):
        forward = _checked_forward
    if forward is not None:
        model.forward = _PatchedForward(model, forward.__name__)
    model._fastpt_patch = {"attn_implementation": original, "attention": attention, "forward": forward is not None}
    return model


def unpatch_hf(model):
    """Undo ``patch_hf``: the original attention implementation and forward. Returns ``model``;
    a model that is not patched is returned unchanged. Raises TypeError when ``model`` is not a
    torch.nn.Module."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch_hf: model: expected a transformers model (torch.nn.Module), got "
                        f"{type(model).__name__}")
    state = model.__dict__.pop("_fastpt_patch", None)
    if state is None:
        return model
    if state["attention"]:
        model.set_attn_implementation(state["attn_implementation"])
        for m in model.modules():
            m.__dict__.pop("_fastpt_attn", None)
            m.__dict__.pop("_fastpt_registration", None)
    if state["forward"]:
        model.__dict__.pop("forward", None)
    return model
