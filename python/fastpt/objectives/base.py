"""What every objective shares: its output, a small base class and a few helpers.

An objective is an ``nn.Module`` that owns its heads (and any teacher / momentum copies) and
turns a batch into a loss for a backbone passed in at each call (composition, STYLE.md 8)::

    objective = MLM.from_backbone(backbone, mask_token_id=103)   # sizes read from the backbone
    batch = objective.prepare(raw_batch, seed=step)              # masks, views, crops: on the device
    out = objective(backbone, batch)                             # ObjectiveOutput
    out.loss.backward(); optimizer.step()
    objective.on_step_end(backbone, step)                        # EMA teachers, schedules

Teacher / momentum copies and tied heads need the backbone once: ``attach(backbone)`` (called
by ``from_backbone``; ``forward`` calls it on first use otherwise, but a checkpoint can only be
loaded into an attached objective). Copies are frozen (``requires_grad=False``): build the
optimizer from parameters that require grad.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import DEFAULT_INIT_STD, init_weights
from ..nn.attention import check_padding_mask, padding_to_seqlens
from ..ops._rng import check_seed, generator_seed  # the masking ops' seed check; the objectives import it from here

# Backbone attributes that ``from_backbone`` copies into constructor arguments of the same name.
BACKBONE_SIZES = ("hidden_size", "vocab_size", "num_patches", "patch_size", "in_channels")
# Optional text-batch keys passed through to a TextEncoder when present. Not ``prefix_lens``: a prefix changes the
# attention mask (bidirectional inside it, causal after), which only the prefix-LM objective reads and passes on
# (it takes no loss inside the prefix); any other objective refuses it (``refuse_prefix_lens``).
TEXT_KEYS = ("token_type_ids", "position_ids", "cu_seqlens")
# Annotations a raw text batch may carry (fastpt's collators, Hugging Face tokenizers), read by prepare (MLM's
# special tokens, whole-word masking) or kept by it, encoded by nothing: max_seqlen, the packed collate's
# longest document, is a hint the backbone does without (it finds the longest document itself).
TEXT_NOTES = ("special_tokens_mask", "word_ids", "max_seqlen")
# The keys of a text objective's batch: encode_text's inputs, the annotations, the token labels.
TEXT_BATCH = ("input_ids", "attention_mask", *TEXT_KEYS, *TEXT_NOTES, "labels")


@dataclass
class ObjectiveOutput:
    """What ``objective(backbone, batch)`` returns.

    loss: 0-dim float tensor (the training loss, parts already summed).
    metrics: name -> detached 0-dim tensor (loss parts, accuracies, temperatures ...).
    logits: head logits when the objective computed them (e.g. ``return_logits``), else None.
    last_hidden_state: the backbone's output states for the (first) input, e.g. (B, S, D).
    """

    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class Objective(nn.Module):
    """Base of the objectives: defaults for ``prepare``, ``attach``, ``on_step_end``, ``tokens_in``.

    Subclasses set ``needs`` (batch keys ``prepare`` reads), optionally ``batch_keys`` (every key a prepared
    batch may hold: what ``forward`` reads and what ``prepare`` keeps of a raw batch; ``PretrainModel.forward``
    then refuses any other key, naming it; None, the default, for objectives whose ``prepare`` passes a raw
    batch's other keys through: only the backbone's mode switches ``causal`` / ``output_hidden_states``
    are refused there) and implement ``forward(backbone, batch)``.
    """

    needs: tuple[str, ...] = ()
    batch_keys: tuple[str, ...] | None = None
    # Heads shared with Hugging Face checkpoints: fastpt.models.from_hf's head name -> submodule path.
    hf_heads: dict[str, str] = {}
    # Other BERT-initialised heads (submodule paths) that ``init_heads`` also initialises.
    other_heads: tuple[str, ...] = ()
    # The mask a text backbone trains with under this objective (False: bidirectional, True: causal), None where
    # the objective leaves it to the backbone: ``fastpt.build`` sets the backbone's ``causal`` default to it (and
    # its saved config), so evaluation, export and direct ``model.backbone(...)`` calls see the trained mask.
    backbone_causal: bool | None = None
    # True where ``prepare`` is cheaper on the host than on the training device: the text objectives, whose work
    # is a few C++ kernels or small ops over ids that start on the host, and on a GPU would read lengths, ids
    # or boundaries back (a wait for the GPU per micro-batch; T5 / UL2 span corruption has no GPU kernel at
    # all). ``fastpt pretrain`` then prepares the collated CPU batch and moves the prepared one (pinned). The
    # result is the same (a pure function of the batch and the seed); only where the work runs differs. The
    # vision objectives augment on the device (False).
    prepare_on_host: bool = False

    def __init__(self):
        super().__init__()
        self._attached = False

    @classmethod
    def from_backbone(cls, backbone: nn.Module, **kwargs):
        """Build with the sizes (``hidden_size``, ``vocab_size``, ``patch_size`` ...) read from
        ``backbone`` where the constructor takes them and ``kwargs`` does not, then ``attach``.
        A size ``kwargs`` gives must be the backbone's: ValueError naming ``objective.<size>`` otherwise
        (``check_backbone_size``)."""
        params = inspect.signature(cls.__init__).parameters
        for name in BACKBONE_SIZES:
            if name in params and hasattr(backbone, name):
                check_backbone_size(name, kwargs, getattr(backbone, name))
        obj = cls(**kwargs)
        obj.attach(backbone)
        std = (getattr(backbone, "config", None) or {}).get("initializer_range")
        if std is not None and float(std) != DEFAULT_INIT_STD:
            obj.init_heads(float(std))
        return obj

    def init_heads(self, std: float) -> None:
        """Initialise the text heads (``hf_heads`` and ``other_heads``: MLM / LM heads, pooler, pair
        classifier) as BERT does with ``initializer_range`` ``std``: weights normal(0, std), biases 0,
        norms 1. A weight tied to the backbone's embedding is left as it is. ``from_backbone`` calls it with
        the backbone's own ``initializer_range`` when that is not the heads' default 0.02."""
        std = positive("std", std)
        with torch.no_grad():
            for head in [*self.heads().values(), *(self.get_submodule(p) for p in self.other_heads
                                                    if _has_submodule(self, p))]:
                for m in head.modules():
                    if isinstance(m, (nn.Linear, nn.LayerNorm)):
                        init_weights(m, std)
                    elif hasattr(m, "tied"):  # MLMHead / LMHead: their own (V, E) matrix and bias
                        if not m.tied:
                            m.weight.normal_(0.0, std)
                        if m.bias is not None:
                            m.bias.zero_()

    def attach(self, backbone: nn.Module) -> None:
        """Tie heads to / copy teachers from ``backbone`` (no-op here). Idempotent."""
        self._attached = True

    def _ensure_attached(self, backbone: nn.Module) -> None:
        if not self._attached:
            self.attach(backbone)

    def heads(self) -> dict[str, nn.Module]:
        """The heads a Hugging Face export writes (``fastpt.models.to_hf``), by ``from_hf``'s names."""
        return {name: self.get_submodule(path) for name, path in self.hf_heads.items()
                if _has_submodule(self, path)}

    def load_heads(self, heads: dict) -> None:
        """Copy the weights of ``from_hf``'s heads (e.g. {"mlm": MLMHead}) into this objective's;
        heads this objective does not have are ignored.

        A vocabulary head tied to the word embedding (``tied``: MLM / LM heads) never has its output matrix
        written: that matrix is the backbone's embedding, which the backbone's own weights set. A tied
        source into an untied head copies the matrix (the source's decoder is its embedding: the same
        logits); an untied source into a tied head raises ValueError naming the head (copying would
        overwrite the word embedding with the decoder, dropping it would change the logits): build the
        objective with ``tie_word_embeddings=False``, as ``from_hf`` does from the checkpoint's head. So is an
        MLM head whose transform has another ``activation`` than the target's (the same weights would compute
        other logits)."""
        for name, module in heads.items():
            path = self.hf_heads.get(name)
            if path is None or not _has_submodule(self, path):
                continue
            target, state = self.get_submodule(path), module.state_dict()
            act, want = getattr(module, "activation", None), getattr(target, "activation", None)
            if act != want and isinstance(act, str) and isinstance(want, str):
                raise ValueError(f"heads.{name}: the source head's activation is {act!r}, this objective's "
                                 f"{want!r}: build the objective with activation={act!r}")
            source_tied, target_tied = getattr(module, "tied", None), getattr(target, "tied", None)
            if target_tied and not source_tied:
                raise ValueError(f"heads.{name}: the source head has its own (untied) output matrix but this "
                                 f"objective's is tied to the word embedding (loading it would overwrite the "
                                 f"embedding): build the objective with tie_word_embeddings=False")
            if target_tied:
                state.pop("weight", None)  # the embedding, which the backbone's weights set
                missing, unexpected = target.load_state_dict(state, strict=False)
                if unexpected or set(missing) - {"weight"}:
                    raise ValueError(f"heads.{name}: the source head does not match this objective's (missing "
                                     f"{sorted(set(missing) - {'weight'})}, unexpected {sorted(unexpected)})")
            else:
                target.load_state_dict(state)

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Model inputs from a raw batch (default: the batch's keys checked, a shallow copy)."""
        check_seed(seed)
        require(batch, self.needs, f"{type(self).__name__}.prepare")
        return dict(batch)

    def on_step_end(self, backbone: nn.Module, step: int) -> None:
        """Called after each optimizer step (EMA teachers, schedules). No-op here."""

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """What one token counted by ``tokens_in`` runs through, for ``PretrainModel.flops_per_token``:
        training passes (forward + backward = 1, forward only = 1/3) through each part of the backbone
        ("backbone"; an encoder-decoder's "encoder" / "decoder"; two towers' "text" / "vision") and, as
        "heads", through the objective's trainable matrices. Default: both once."""
        return {"backbone": 1.0, "heads": 1.0}

    # constructor options only an older fastpt's checkpoints imply (upgrade_config): a recipe that does not set
    # one is not told its resumed checkpoint differs
    legacy_options: tuple[str, ...] = ()

    @classmethod
    def upgrade_config(cls, config: dict, tensor_names, prefix: str = "") -> dict:
        """This objective's build ``config`` (name and arguments) with the options a checkpoint's tensors (named
        under ``prefix``) imply, where an older fastpt saved another layout without naming it in the config.
        Here: unchanged."""
        return config

    def upgrade_state(self, state: dict, prefix: str = "") -> None:
        """Rename / drop, in place, the tensors of ``state`` (keys under ``prefix``) that an older fastpt saved
        for this objective in another layout (``from_pretrained`` and ``load_state_dict`` call it). No-op here."""

    def loss_weight(self, batch: dict) -> torch.Tensor | None:
        """How many targets the loss of a prepared ``batch`` is a mean over (a 0-dim integer tensor), or
        None when every batch weighs the same (a mean over rows or patches of fixed-size batches, or a loss
        of several parts). The recipe weighs each micro-batch and rank by it, so that ``grad_accum`` and
        several ranks give the gradient and the loss of one batch holding all of them (a token mean over
        the whole step), whatever the number of masked / target tokens in each part."""
        return None

    def tokens_in(self, batch: dict) -> int:
        """Tokens in ``batch``: the attention mask's sum, else the number of input ids."""
        if batch.get("attention_mask") is not None:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())


def view_area(backbone: nn.Module, size: int | None) -> float:
    """Patches of a ``size`` x ``size`` crop over the patches of the backbone's own image size (1 for None):
    what an augmented view costs against a raw image, which ``tokens_in`` counts."""
    image = (getattr(backbone, "config", None) or {}).get("image_size")
    if not size or not image:
        return 1.0
    h, w = image if isinstance(image, (list, tuple)) else (image, image)
    return size * size / (h * w)


def per_image_tokens(backbone: nn.Module) -> int:
    """Patches of one image at the backbone's size: how many counted tokens share one pooled head pass."""
    return max(1, int(getattr(backbone, "num_patches", 1)))


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- checks


def check_backbone_size(name: str, kwargs: dict, value) -> None:
    """Fill ``kwargs[name]`` with the backbone's ``value`` when absent; else it must equal it (a side ``p``
    standing for ``(p, p)``, a list for a tuple; None on either side is not compared): ValueError naming
    ``objective.<name>`` and both values otherwise (a head or position table of another size trains on
    ids or patches that do not exist, or fails deep inside forward)."""
    if name not in kwargs:
        kwargs[name] = value
        return
    given = kwargs[name]
    if given is None or value is None:
        return
    a, b = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (given, value))
    if isinstance(a, tuple) != isinstance(b, tuple):  # a square side against a pair
        a, b = (v if isinstance(v, tuple) else (v, v) for v in (a, b))
    if a != b:
        raise ValueError(f"objective.{name}: {given!r} does not match the backbone's {name} {value!r} (leave it "
                         f"out: it is read from the backbone)")


def check_first_pooling(name: str, pooling: str, backbone: nn.Module) -> None:
    """``pooling == "first"`` reads the cls token: ValueError naming ``objective.<name>`` when ``backbone``
    is a ViT (it has a ``patch_embed``) built without one, whose first token is the top-left patch."""
    embed = getattr(backbone, "patch_embed", None)
    if pooling == "first" and embed is not None and getattr(embed, "cls_token", None) is None:
        raise ValueError(f"objective.{name}: 'first' pools the cls token, and the ViT backbone has none "
                         f"(cls_token: false; its first token is a patch): use {name}: mean")


def require(batch, keys, where: str) -> None:
    """Raise a clear error if ``batch`` is not a dict or lacks one of ``keys``."""
    if not isinstance(batch, dict):
        raise TypeError(f"{where}: batch: expected a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if batch.get(k) is None]
    if missing:
        raise KeyError(f"{where}: batch is missing {missing} (needs {tuple(keys)}; has {sorted(batch)})")


def seeded(seed) -> torch.Generator:
    """A CPU generator seeded with ``seed``: its draws are the same whatever device the batch is on (every
    bit of a 64-bit seed moves them, folded to the generator's 32: ``_rng.generator_seed``)."""
    return torch.Generator().manual_seed(generator_seed(seed))


def check_ids(name: str, t, ndim=(2,)) -> torch.Tensor:
    """An int32/int64 tensor with one of the dims in ``ndim``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got dtype {t.dtype}")
    if t.dim() not in ndim:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in ndim)}, got shape {tuple(t.shape)}")
    return t


def check_images(name: str, t, *, min_batch: int = 0) -> torch.Tensor:
    """A floating ``(B, C, H, W)`` tensor with ``B >= min_batch``."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a float tensor (B, C, H, W), got {got}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(t.shape)}")
    if t.shape[0] < min_batch:
        raise ValueError(f"{name}: expected at least {min_batch} image(s) (B >= {min_batch}), got shape "
                         f"{tuple(t.shape)}")
    return t


def check_token_id(name: str, v, vocab_size: int | None = None) -> int:
    """A token id: an int >= 0, and ``< vocab_size`` when the vocabulary size is known."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (vocab_size is not None and v >= vocab_size):
        where = f"in [0, vocab_size={vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name}: expected a token id {where}, got {v!r}")
    return v


def row_lengths(name: str, mask, ids: torch.Tensor) -> torch.Tensor:
    """Valid length of each row (int64 ``(B,)`` on the host) of a right-padded ``mask`` for ``ids (B, S)``;
    every row full when ``mask`` is None. TypeError / ValueError naming ``name`` for a mask of another
    shape or one that is not right padding (what the length-based kernels express)."""
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64)
    check_padding_mask(name, mask, ids)
    return padding_to_seqlens(mask, name).to("cpu", torch.int64)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` for a loss's arithmetic: half precision (and integers) as float32, float32 / float64 as they are
    (a float64 model's losses were computed in float32)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def positive(name: str, v, *, integer: bool = False, allow_zero: bool = False):
    """A finite number > 0 (>= 0 with ``allow_zero``); ints only with ``integer``."""
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or (v < 0 if allow_zero else v <= 0):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{name}: expected {kind} {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return v


def fraction(name: str, v, *, low: float = 0.0, high: float = 1.0):
    """A number in ``[low, high]``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {v!r}")
    return float(v)


def choice(name: str, v, options):
    if v not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {v!r}")
    return v


# ----------------------------------------------------------------------------- helpers


def refuse_prefix_lens(batch: dict, where: str) -> None:
    """TypeError naming ``prefix_lens`` when ``batch`` carries one (as ``PretrainModel`` refuses a key its
    objective does not take): only the prefix-LM objective reads it. Given to the backbone, a prefix makes
    attention bidirectional inside it and causal after it, whatever the objective: a causal LM's tokens
    would see the next tokens they are scored on (its labels keep the prefix), an MLM's masked tokens
    past the prefix would lose their right context."""
    if isinstance(batch, dict) and batch.get("prefix_lens") is not None:
        raise TypeError(f"prefix_lens: {where} takes no prefix lengths (they would change its attention mask: "
                        f"bidirectional inside the prefix, causal after it); only the prefix_lm objective reads "
                        f"them: leave prefix_lens out of the batch, or train with objective prefix_lm")


def encode_text(backbone: nn.Module, batch: dict, *, objective: str = "this objective", **overrides):
    """Run a TextEncoder on ``batch``: input_ids, attention_mask and the optional keys present (``TEXT_KEYS``);
    ``overrides`` are further backbone arguments (``causal``, ``prefix_lens``, ``output_hidden_states``).
    TypeError naming ``prefix_lens`` and ``objective`` (the caller, e.g. "the mlm objective") for a batch
    carrying one that ``overrides`` does not pass (``refuse_prefix_lens``)."""
    if "prefix_lens" not in overrides:
        refuse_prefix_lens(batch, objective)
    kwargs = {k: batch[k] for k in TEXT_KEYS if batch.get(k) is not None}
    kwargs.update(overrides)
    return backbone(batch["input_ids"], batch.get("attention_mask"), **kwargs)


def want_logits(batch: dict, default: bool) -> bool:
    """The batch's ``return_logits`` flag, else the objective's default."""
    flag = batch.get("return_logits")
    return default if flag is None else bool(flag)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere (teacher / momentum encoder)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source``, parameter by parameter."""
    t = [p for p in target.parameters()]
    s = [p.detach() for p in source.parameters()]
    if len(t) != len(s):
        raise ValueError(f"ema_update: target has {len(t)} parameters, source {len(s)}")
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def cosine_schedule(base: float, final: float, step: int, total_steps: int | None) -> float:
    """``base`` at step 0 rising (or falling) to ``final`` at ``total_steps`` on a half cosine;
    ``base`` throughout when ``total_steps`` is None (MoCo v3 / BYOL / DINO momentum)."""
    if not total_steps:
        return base
    t = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * t) + 1) / 2


def pool(h: torch.Tensor, how: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, S, D)`` -> ``(B, D)``: "first" (CLS token), "mean" (over valid tokens) or "last" valid token."""
    if how == "first":
        return h[:, 0]
    if attention_mask is None:
        return h.mean(1) if how == "mean" else h[:, -1]
    m = attention_mask.to(h.dtype)
    if how == "mean":
        return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    last = (attention_mask.long().sum(1) - 1).clamp(min=0)
    return h[torch.arange(h.shape[0], device=h.device), last]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 2, norm: str | None = "batch",
        activation: str = "relu", last_norm: bool = False, last_bias: bool | None = None) -> nn.Sequential:
    """``num_layers`` Linear layers with norm + activation between them (SimCLR / MoCo v3 / DINO MLPs).

    norm: "batch" (BatchNorm1d), "layer" or None. last_norm: an affine-free BatchNorm after the
    last layer (MoCo v3's projector). last_bias: whether the last Linear has a bias (default: not
    before ``last_norm``; MoCo v3's ``_build_mlp`` has none on any layer, its predictor's last included).
    """
    for name, v in (("num_layers", num_layers), ("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        positive(name, v, integer=True)
    act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=norm is None))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(hidden_dim))
        elif norm == "layer":
            layers.append(nn.LayerNorm(hidden_dim))
        layers.append(act())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=(not last_norm) if last_bias is None else bool(last_bias)))
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def top1_accuracy(query: torch.Tensor, key: torch.Tensor, *, target_offset: int = 0, exclude_self: bool = False,
                  chunk: int = 1024, key_offset: int | None = None) -> torch.Tensor:
    """Fraction of rows ``i`` of ``query (N, D)`` whose most similar row of ``key (M, D)`` is row
    ``(i + target_offset) % M`` (``exclude_self`` drops column ``i``: NT-Xent). Rows are taken
    ``chunk`` at a time, so at most ``(chunk, M)`` scores exist at once.

    ``key_offset``: ``key`` holds the keys of every rank (``gathered_keys``) and this rank's own N keys are
    its rows ``key_offset .. key_offset + N``: row i's target is key ``key_offset + (i + target_offset) % N``
    and its self column ``key_offset + i``, every other rank's key a candidate."""
    n, m = query.shape[0], key.shape[0]
    base, period = (0, m) if key_offset is None else (key_offset, max(n, 1))
    hits = torch.zeros((), device=query.device)
    for lo in range(0, n, chunk):
        s = query[lo:lo + chunk].float() @ key.float().T
        rows = torch.arange(lo, lo + s.shape[0], device=s.device)
        if exclude_self:
            s[rows - lo, base + rows % period] = float("-inf")
        hits += (s.argmax(1) == base + (rows + target_offset) % period).sum()
    return hits / max(n, 1)


def multi_rank() -> bool:
    """Whether torch.distributed runs with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gathered_keys(key: torch.Tensor, gather: bool) -> tuple[torch.Tensor, int | None]:
    """``(every rank's rows of key in rank order, this rank's first row in them)`` when ``gather`` and
    torch.distributed runs with several ranks (no gradient; ranks may hold different counts), else
    ``(key, None)``: ``top1_accuracy(..., key_offset=)``'s inputs, so a gathered loss's accuracy is found
    among the candidates of the loss (every rank's), as one process on the combined batch finds it."""
    if not gather or not multi_rank():
        return key, None
    from ..ops.contrastive import _gather_rows, _sizes

    group = torch.distributed.group.WORLD
    sizes = _sizes(key.shape[0], group, key.device)
    return _gather_rows(key.detach().contiguous(), sizes, group), sum(sizes[: torch.distributed.get_rank()])


def global_gradient(loss: torch.Tensor, gather: bool) -> torch.Tensor:
    """A loss of ``fastpt.ops``' contrastive losses with ``gather=True`` (the global batch's value, this
    rank's share of its gradient: the shares sum over ranks to the global gradient) with its gradient
    multiplied by the world size, its value unchanged: DDP and FSDP average gradients over ranks, so N
    ranks then train with the gradient one process computes on the combined batch (else 1/N of it).
    ``loss`` itself without gather or on one rank."""
    if not gather or not multi_rank():
        return loss
    extra = loss * (torch.distributed.get_world_size() - 1)
    return loss + (extra - extra.detach())  # value: loss + 0 exactly; gradient: world_size x


@torch.no_grad()
def head_accuracy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  chunk: int = 2048) -> torch.Tensor:
    """Fraction of rows of ``hidden (T, D)`` whose top logit ``hidden @ weight.T + bias`` is ``labels (T,)``;
    ``chunk`` rows at a time, so the (T, V) logits never exist at once. 0 for T == 0."""
    hits = torch.zeros((), device=hidden.device)
    for lo in range(0, hidden.shape[0], chunk):
        pred = F.linear(hidden[lo:lo + chunk], weight, bias).argmax(-1)
        hits += (pred == labels[lo:lo + chunk]).sum()
    return hits / max(hidden.shape[0], 1)
