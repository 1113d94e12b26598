"""Assemble a model from a config: a zoo name, a YAML file or a dict -> ``PretrainModel``.

    model = fastpt.build("bert-mini")                                    # zoo name (fastpt.list_configs())
    model = fastpt.build("my_model.yaml", vocab_size=8000, special_ids=special_token_ids(tok))
    model = fastpt.build("vit-mae-tiny", backbone={"image_size": 28, "in_channels": 1, "patch_size": 4})
    cfg = load_config("dino-vit-tiny", objective={"local_crop_size": 12})  # validated dict, nested merge

Config schema (YAML or dict; every key is checked: an unknown key raises ValueError naming it and
listing the valid ones, a value of the wrong type TypeError saying what was expected)::

    name: bert-base                 # optional label
    description: ...                # optional free text (the zoo says where its sizes come from)
    backbone:                       # required
      builder: text_encoder         # one of fastpt.models.BUILDERS: text_encoder, encoder_decoder, vit, two_tower
      vocab_size: 30522             # ... the builder's own keyword arguments (its signature is the schema)
      hidden_size: 768
    objective:                      # optional (null: a bare backbone)
      name: mlm                     # one of fastpt.objectives.OBJECTIVES
      mask_token_id: null           # ... the objective's constructor arguments; sizes (hidden_size,
                                    # vocab_size, patch_size ...) are read from the backbone
    special_ids: {pad: 0, unk: 100, cls: 101, sep: 102, mask: 103}   # optional: the tokenizer's ids
    defaults: {seq_len: 128, batch_size: 256, lr: 1.0e-4}            # optional training defaults
    hf: {arch: bert, hf_config: {...}}   # written by from_hf: what to_hf needs to write it back

two_tower's backbone holds two dicts, ``text`` (``text_encoder`` arguments) and ``vision`` (``vit``
arguments). Overrides merge into the config recursively (dicts merge key by key, anything else
replaces), so ``backbone={"vision": {"image_size": 28}}`` changes one size of a two-tower model.

Special-token ids: an objective argument that names a token (``mask_token_id``, ``cls_token_id``,
``sep_token_id``, ``pad_token_id`` / ``pad_id``, ``eos_id``; ``special_token_ids``, the ids never
masked, from cls / sep / pad / bos / eos) is filled when the config sets it to null, or leaves out
one the objective requires: from ``build``'s ``special_ids`` (``fastpt.data.tokenizer.
special_token_ids(tok)`` or the shard manifest's), else from the config's ``special_ids`` (the zoo
gives the published tokenizer's), and the ids used are recorded in the built model's config. An
explicit id in the config always wins. Backbone ids (``pad_token_id``) are never filled: they are
part of the architecture (RoBERTa's positions start after its pad id).

The built model's ``config`` is the resolved config: the backbone's full builder arguments, the
filled ids. ``PretrainModel.save_pretrained`` stores it; ``from_pretrained`` rebuilds from it.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
import types
import typing
import warnings
from pathlib import Path

import yaml

from ._yaml import load as load_yaml
from .models import BUILDERS, PretrainModel
from .models import from_hf as _backbone_from_hf
from .models import load_fastpt as _load_fastpt
from .models import to_hf as _backbone_to_hf
from .models.model import CONFIG_FILE, FORMAT, read_checkpoint_config
from .objectives import OBJECTIVES
from .objectives.base import BACKBONE_SIZES

ZOO = Path(__file__).parent / "configs"
SECTIONS = ("name", "description", "backbone", "objective", "special_ids", "defaults", "hf")
SPECIAL_ROLES = ("cls", "sep", "pad", "mask", "eos", "bos", "unk", "sentinel")
# Training defaults a config may carry: the recipe's data.seq_len / mode / image_size and train.* keys
# (kept equal to fastpt.train.config.MODEL_DEFAULTS, which validates their values; a test checks).
DEFAULT_KEYS = ("seq_len", "mode", "image_size", "batch_size", "grad_accum", "max_steps", "max_tokens", "max_time_s",
                "lr", "weight_decay", "betas", "eps", "warmup_steps", "schedule", "min_lr_ratio", "clip_grad",
                "precision", "compile", "activation_checkpointing", "seed", "device", "fsdp",
                "find_unused_parameters", "peak_tflops")
# objective arguments filled from each special-token role
ROLE_ARGS = {"mask": ("mask_token_id",), "cls": ("cls_token_id",), "sep": ("sep_token_id",),
             "pad": ("pad_token_id", "pad_id"), "eos": ("eos_id",), "sentinel": ("sentinel_start_id",)}
NEVER_MASKED = ("cls", "sep", "pad", "bos", "eos")
# objective arguments ``from_backbone`` reads from the backbone
FROM_BACKBONE = frozenset(BACKBONE_SIZES) | {"text_hidden_size", "vision_hidden_size", "grid_size", "cls_token"}
TOWERS = {"text": "text_encoder", "vision": "vit"}
HF_OBJECTIVES = {"bert": "mlm", "roberta": "mlm", "gpt2": "clm"}  # from_hf(objective="auto")
# the backbone builders each objective runs on (its forward reads their inputs and attributes)
OBJECTIVE_BACKBONES = {
    "mlm": ("text_encoder",), "clm": ("text_encoder",), "prefix_lm": ("text_encoder",), "nsp": ("text_encoder",),
    "sop": ("text_encoder",), "self_distill": ("text_encoder",), "span": ("encoder_decoder",),
    "ul2": ("encoder_decoder",), "mae": ("vit",), "simclr": ("vit",), "moco_v3": ("vit",), "dino": ("vit",),
    "clip": ("two_tower",),
}


# ----------------------------------------------------------------------------- configs


def list_configs() -> list[str]:
    """Names of the shipped zoo configs (``python/fastpt/configs/*.yaml``), sorted."""
    return sorted(p.stem for p in ZOO.glob("*.yaml"))


def load_config(config, **overrides) -> dict:
    """Read and validate a config.

    Args:
        config: a zoo name (``list_configs()``), a YAML / JSON file path, a ``save_pretrained``
            directory (its build config), or a dict (copied; a checkpoint's fastpt_config.json
            content is unwrapped to its build config).
        overrides: sections merged in recursively, e.g. ``backbone={"hidden_size": 64}``.

    Returns a new dict (see the module docstring for the schema). Raises ValueError (unknown name
    or key, naming it and listing the valid ones), TypeError (a value of the wrong type:
    expected vs got), FileNotFoundError.
    """
    cfg = merge(_read(config), overrides)
    validate(cfg)
    return cfg


def merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, recursively for dicts (new dicts; the inputs are not changed)."""
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(config) -> dict:
    if isinstance(config, dict):
        if config.get("format") == FORMAT and isinstance(config.get("model"), dict):
            return copy.deepcopy(config["model"])  # a checkpoint's fastpt_config.json, as read
        return copy.deepcopy(config)
    if not isinstance(config, (str, Path)):
        raise TypeError(f"config: expected a zoo name, a YAML path or a dict, got {type(config).__name__}")
    names = list_configs()
    if isinstance(config, str) and config in names:
        path = ZOO / f"{config}.yaml"
    else:
        path = Path(config)
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            return read_checkpoint_config(path)["model"]
        if not path.is_file():
            close = difflib.get_close_matches(str(config), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"config: {str(config)!r} is neither a zoo name ({', '.join(names)}) nor a file{hint}"
            if path.suffix in (".yaml", ".yml", ".json") or len(path.parts) > 1:  # meant as a path
                raise FileNotFoundError(msg)
            raise ValueError(msg)
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config: {path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping (backbone:, objective: ...), got {type(data).__name__}")
    return data


def validate(cfg: dict) -> None:
    """Check ``cfg`` against the schema, the builders' and objectives' signatures; raise on the first problem."""
    if not isinstance(cfg, dict):
        raise TypeError(f"config: expected a dict, got {type(cfg).__name__}")
    _known("config", cfg, SECTIONS)
    for key in ("name", "description"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise TypeError(f"{key}: expected a string, got {type(cfg[key]).__name__}")
    if cfg.get("backbone") is None:
        raise ValueError(f"backbone: required (a dict with builder: one of {sorted(BUILDERS)})")
    _validate_backbone(cfg["backbone"])
    if cfg.get("objective") is not None:
        _validate_objective(cfg["objective"])
    _validate_ids(cfg.get("special_ids"), "special_ids")
    defaults = cfg.get("defaults")
    if defaults is not None:
        _dict("defaults", defaults)
        _known("defaults", defaults, DEFAULT_KEYS)
    if cfg.get("hf") is not None:
        _dict("hf", cfg["hf"])
        _known("hf", cfg["hf"], ("arch", "hf_config"))


def _dict(where: str, value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _known(where: str, d: dict, valid) -> None:
    for key in d:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


def _choice(where: str, d, key: str, registry) -> tuple[str, dict]:
    """``d[key]``, checked against ``registry``, and the rest of the mapping ``d`` (its arguments)."""
    _dict(where, d)
    name = d.get(key)
    if not isinstance(name, str) or name not in registry:  # a list or dict is not even hashable
        raise ValueError(f"{where}.{key}: expected one of {sorted(registry)}, got {name!r}")
    return name, {k: v for k, v in d.items() if k != key}


def _validate_backbone(b) -> None:
    builder, args = _choice("backbone", b, "builder", BUILDERS)
    if builder == "two_tower":
        _known("backbone", args, tuple(TOWERS))
        for tower, name in TOWERS.items():
            if args.get(tower) is None:
                raise ValueError(f"backbone.{tower}: required (a dict of {name} arguments)")
            sub = {k: v for k, v in _dict(f"backbone.{tower}", args[tower]).items() if k != "builder"}
            if args[tower].get("builder", name) != name:
                raise ValueError(f"backbone.{tower}.builder: the {tower} tower is built by {name!r}, "
                                 f"got {args[tower]['builder']!r}")
            _check_args(BUILDERS[name], sub, f"backbone.{tower}", f"builder {name!r}")
    else:
        _check_args(BUILDERS[builder], args, "backbone", f"builder {builder!r}")


def _validate_objective(o) -> None:
    name, args = _choice("objective", o, "name", OBJECTIVES)
    _check_args(OBJECTIVES[name].__init__, args, "objective", f"objective {name!r}", fillable=True)


def _validate_ids(ids, where: str) -> dict:
    if ids is None:
        return {}
    _dict(where, ids)
    _known(where, ids, SPECIAL_ROLES)
    for role, value in ids.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{where}.{role}: expected a token id (int >= 0), got {value!r}")
    return dict(ids)


def _parameters(fn) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_args(fn, args: dict, where: str, what: str, fillable: bool = False) -> None:
    """Every key of ``args`` is a parameter of ``fn`` and its value fits the annotation."""
    params, hints = _parameters(fn), _hints(fn)
    for key, value in args.items():
        if key not in params:
            raise ValueError(f"{where}.{key}: unknown argument of {what}; valid keys: {', '.join(params)}")
        if value is None and fillable and _is_id_arg(key):
            continue  # filled from the special ids at build time
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise TypeError(f"{where}.{key}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")


def _is_id_arg(name: str) -> bool:
    return name == "special_token_ids" or any(name in names for names in ROLE_ARGS.values())


def _fits(value, hint) -> bool:
    """Whether a YAML / JSON value fits a type annotation (lists stand for tuples; ints for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


# ----------------------------------------------------------------------------- build


def build(config, *, vocab_size: int | None = None, special_ids: dict | None = None, **overrides) -> PretrainModel:
    """Build a ``PretrainModel`` (backbone + objective) from a config.

    Args:
        config: zoo name, YAML path, ``save_pretrained`` directory or dict (``load_config``).
        vocab_size: overrides the (text) backbone's vocabulary size (a tokenizer's size).
        special_ids: the tokenizer's ``{cls, sep, pad, mask, eos, bos, unk, sentinel}`` ids (a subset),
            used for the objective's token-id arguments the config leaves null (module docstring). The
            config's ``sentinel`` (its published tokenizer's ``<extra_id_0>``) is not mixed into another
            tokenizer's ids: without one of its own, span corruption counts down from vocab_size - 1.
        overrides: config sections merged in recursively, e.g. ``backbone={"image_size": 28,
            "in_channels": 1, "patch_size": 4}``, ``objective={"mask_ratio": 0.6}``.

    Returns the model; its ``.config`` is the resolved config. Raises ValueError / TypeError naming
    the key (config, builder and objective arguments alike).
    """
    cfg = load_config(config, **overrides)
    if vocab_size is not None:
        _set_vocab(cfg["backbone"], vocab_size)
    given = _validate_ids(special_ids, "special_ids")
    ids = {**_validate_ids(cfg.get("special_ids"), "special_ids"), **given}
    vocab = (cfg.get("backbone") or {}).get("vocab_size")
    if "sentinel" not in given and (special_ids is not None or (isinstance(vocab, int)
                                                                and ids.get("sentinel", -1) >= vocab)):
        ids.pop("sentinel", None)  # the config's tokenizer's sentinel, not this vocabulary's
    if ids:
        cfg["special_ids"] = ids
    return _assemble(cfg)


def _set_vocab(backbone: dict, vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size: expected an int > 0, got {vocab_size!r}")
    if backbone["builder"] == "two_tower":
        backbone["text"]["vocab_size"] = vocab_size
    elif backbone["builder"] == "vit":
        raise ValueError("vocab_size: a vit backbone has no vocabulary")
    else:
        backbone["vocab_size"] = vocab_size


def _assemble(cfg: dict, backbone=None, *, caller: str = "build") -> PretrainModel:
    """The model of a validated config (``backbone``: an already built one, e.g. from a checkpoint)."""
    if backbone is None:
        b = cfg["backbone"]
        builder = b["builder"]
        try:
            backbone = BUILDERS[builder](**{k: v for k, v in b.items() if k != "builder"})
        except (TypeError, ValueError) as exc:
            raise _with_context(exc, f"backbone ({builder})") from exc
    want = OBJECTIVES[cfg["objective"]["name"]].backbone_causal if cfg.get("objective") is not None else None
    if want is not None and isinstance(getattr(backbone, "causal", None), bool) and backbone.causal != want:
        # the objective's mask becomes the backbone's default (and its saved config): gpt2-small + mlm trains
        # and is then evaluated / exported as a bidirectional encoder, bert + clm as a causal one
        backbone.causal = want
        backbone.config = {**backbone.config, "causal": want}
    cfg["backbone"] = _plain(backbone.config)
    objective = None
    if cfg.get("objective") is not None:
        o = cfg["objective"]
        _check_pairing(o["name"], backbone)
        cls = OBJECTIVES[o["name"]]
        kwargs = _fill_ids({k: v for k, v in o.items() if k != "name"}, cls, cfg.get("special_ids") or {}, caller)
        cfg["objective"] = {"name": o["name"], **_plain(kwargs)}
        hints = _hints(cls.__init__)
        kwargs = {k: _as_tuples(v) if _wants_tuple(hints.get(k)) else v for k, v in kwargs.items()}
        try:
            objective = cls.from_backbone(backbone, **kwargs)
        except (TypeError, ValueError) as exc:
            raise _with_context(exc, f"objective ({o['name']})") from exc
    return PretrainModel(backbone, objective, config=cfg)


def _check_pairing(objective: str, backbone) -> None:
    """ValueError naming the objective and the backbone kind it needs when ``backbone`` (built by one
    of ``BUILDERS``, read from its config) is another kind; a backbone of no known builder is not checked.
    What an objective needs within a kind its ``attach`` checks, naming the option (NSP / SOP: two segment
    types; CLM: a tied head only on an unfactorised embedding; CLIP: no "first" text pooling on a causal
    tower); a text backbone's ``causal`` is only its default mask, which each text objective sets itself
    (MLM, NSP / SOP, self_distill bidirectional, CLM / prefix-LM causal)."""
    builder = (getattr(backbone, "config", None) or {}).get("builder")
    needs = OBJECTIVE_BACKBONES.get(objective)
    if needs and builder in BUILDERS and builder not in needs:
        raise ValueError(f"objective.name: {objective!r} needs a {' or '.join(needs)} backbone, got backbone "
                         f"builder {builder!r}")


def _with_context(exc: Exception, where: str) -> Exception:
    """The same kind of error (TypeError or ValueError), its message prefixed with ``where``."""
    return (TypeError if isinstance(exc, TypeError) else ValueError)(f"{where}: {exc}")


def _fill_ids(kwargs: dict, cls, ids: dict, caller: str = "build") -> dict:
    """Fill the token-id arguments that are null, or required and absent, from ``ids``; raise for a
    required one nobody gives (the hint says how to give it to ``caller``: build or from_hf)."""
    params = _parameters(cls.__init__)
    for role, names in ROLE_ARGS.items():
        for name in names:
            if name in params and role in ids and _wants_fill(name, kwargs, params):
                kwargs[name] = ids[role]
    if "special_token_ids" in params and kwargs.get("special_token_ids", 0) is None:
        kwargs["special_token_ids"] = sorted({ids[r] for r in NEVER_MASKED if r in ids})
    for name, p in params.items():
        required = p.default is inspect.Parameter.empty and name not in FROM_BACKBONE
        if (required and kwargs.get(name) is None) or (name in kwargs and kwargs[name] is None
                                                        and p.default is not None and _is_id_arg(name)):
            role = next((r for r, ns in ROLE_ARGS.items() if name in ns), None)
            hint = "" if not role else (f" or pass special_ids={{'{role}': id}} to build" if caller == "build"
                                        else f" or pass {name}=<id> to from_hf")
            raise ValueError(f"objective.{name}: required by {cls.__name__} and not set: give it in the config{hint}")
    return kwargs


def _wants_fill(name: str, kwargs: dict, params: dict) -> bool:
    if name in kwargs:
        return kwargs[name] is None
    return params[name].default is inspect.Parameter.empty


def _hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not evaluate: skip the type checks, not the names
        return {}


def _wants_tuple(hint) -> bool:
    if hint is None:
        return False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_wants_tuple(a) for a in typing.get_args(hint))
    return hint is tuple or typing.get_origin(hint) is tuple


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _plain(value):
    """A JSON-able copy (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


PretrainModel.builder = staticmethod(build)  # from_pretrained rebuilds through it (models/ cannot import us)


def _upgrade_config(config: dict, tensor_names: tuple) -> dict:
    """A checkpoint's build config with the options its tensors imply where an older fastpt wrote them in
    another layout (``Objective.upgrade_config``: MoCo v3's predictor bias)."""
    obj = config.get("objective") if isinstance(config, dict) else None
    cls = OBJECTIVES.get(obj.get("name")) if isinstance(obj, dict) else None
    if cls is None:
        return config
    return {**config, "objective": cls.upgrade_config(dict(obj), tensor_names, prefix="objective.")}


PretrainModel.config_upgrader = staticmethod(_upgrade_config)


# ----------------------------------------------------------------------------- Hugging Face


def from_hf(path, *, objective: str | None = "auto", **objective_kwargs) -> PretrainModel:
    """A ``PretrainModel`` around a Hugging Face BERT / RoBERTa / GPT-2 / ViT checkpoint directory
    (or a ``fastpt convert --from-hf`` output), ready to continue pre-training.

    Args:
        path: the directory (config.json + model.safetensors, with tokenizer files when present).
        objective: "auto" (MLM for BERT / RoBERTa, causal LM for GPT-2, none for ViT), any name of
            ``fastpt.objectives.OBJECTIVES``, or None (a bare backbone).
        objective_kwargs: the objective's arguments. Token ids left out (``mask_token_id`` ...) come
            from the directory's tokenizer (``fastpt.data.tokenizer.special_token_ids``), then
            config.json's ``*_token_id``; the MLM / LM head's shape options from the checkpoint's
            head, whose weights are loaded (``objective.load_heads``).

    Heads the objective has no place for (e.g. BERT's pooler under MLM, as transformers' ``BertForMaskedLM``
    drops it) are dropped with a warning, and ``to_hf`` does not write them back (``fastpt convert`` keeps every
    head of the checkpoint);
    heads of the objective the checkpoint has no weights for (e.g. the MLM head of a ``BertModel``
    checkpoint) are newly initialized, with a warning naming them.
    The Hugging Face config is kept in ``model.config["hf"]`` for ``to_hf``. Raises
    FileNotFoundError, ValueError (unsupported model, unknown objective, a token id nobody gives, an
    objective for another backbone kind), TypeError (``path`` not a str or os.PathLike).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"from_hf: path: expected a directory (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file():
        if json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT:
            raise ValueError(f"path: {path} is a fastpt checkpoint (save_pretrained): load it with "
                             f"PretrainModel.from_pretrained")
        backbone, heads, info = _load_fastpt(path)
    else:
        backbone, heads, info = _backbone_from_hf(path)
    arch, hf_config = info.get("arch"), info.get("hf_config") or {}
    if objective == "auto":
        objective = HF_OBJECTIVES.get(arch)
    okw = dict(objective_kwargs)
    if objective is not None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected 'auto', None or one of {sorted(OBJECTIVES)}, got {objective!r}")
        okw = {**_head_options(objective, heads), **okw}
        if "special_token_ids" in _parameters(OBJECTIVES[objective].__init__):
            okw.setdefault("special_token_ids", None)  # the tokenizer's specials are never masked
    cfg = {"name": f"{arch}:{path.name}", "backbone": _plain(backbone.config),
           "objective": None if objective is None else {"name": objective, **_plain(okw)},
           "hf": {"arch": arch, "hf_config": hf_config}}
    ids = _hf_special_ids(path, hf_config)
    if ids:
        cfg["special_ids"] = ids
    validate(cfg)
    model = _assemble(cfg, backbone, caller="from_hf")
    if model.objective is not None:
        model.objective.load_heads(heads)
        unused = sorted(set(heads) - set(model.objective.heads()))
    else:
        unused = sorted(heads)
    if unused:
        where = "a model without objective" if objective is None else f"the {objective!r} objective"
        warnings.warn(f"from_hf: dropped the checkpoint's {unused} head(s): {where} has no place for them, so "
                      f"to_hf will not write them back (`fastpt convert` keeps every head)")
    new = sorted(set(model.objective.heads()) - set(heads)) if model.objective is not None else []
    if new:  # e.g. a BertModel checkpoint under MLM: the first steps train a random head
        warnings.warn(f"from_hf: the checkpoint has no weights for the {objective!r} objective's {new} head(s): "
                      f"newly initialized (random), the first training steps fit them")
    return model


def _head_options(objective: str, heads: dict) -> dict:
    """Constructor arguments that make the objective's head match the checkpoint's: the MLM head's tying,
    activation and LayerNorm eps for every objective holding one (MLM, NSP / SOP's MLM part, self-distillation),
    the LM head's tying and bias for the causal ones. Without them the head would not compute the checkpoint's
    logits (another activation), and ``load_heads`` refuses an untied head into a tied one."""
    if objective in ("mlm", "nsp", "sop", "self_distill") and "mlm" in heads:
        head = heads["mlm"]
        out = dict(tie_word_embeddings=head.tied, activation=head.activation, layer_norm_eps=head.layer_norm.eps)
    elif objective in ("clm", "prefix_lm") and "lm" in heads:
        out = dict(tie_word_embeddings=heads["lm"].tied, bias=heads["lm"].bias is not None)
    else:
        return {}
    params = _parameters(OBJECTIVES[objective].__init__)
    return {k: v for k, v in out.items() if k in params}


def _hf_special_ids(path: Path, hf_config: dict) -> dict:
    """Special-token ids from the directory's tokenizer files, then config.json's ``<role>_token_id``."""
    from .data.tokenizer import load_tokenizer, special_token_ids

    ids = {}
    try:
        ids = special_token_ids(load_tokenizer(path), path)
    except (FileNotFoundError, ValueError):
        pass  # no tokenizer files: config.json's ids only
    for role in SPECIAL_ROLES:
        value = hf_config.get(f"{role}_token_id")
        if role not in ids and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            ids[role] = value
    return ids


def to_hf(model: PretrainModel, path) -> Path:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors) that
    transformers loads: BERT / RoBERTa (``*ForMaskedLM`` with an MLM objective, ``BertForPreTraining`` with
    NSP and its MLM part, ``BertForNextSentencePrediction`` with NSP alone), GPT-2
    (``GPT2LMHeadModel`` with a causal LM), ViT. The architecture and untouched config.json keys
    come from ``model.config["hf"]`` when the model came from ``from_hf``, else are inferred; the
    special token ids go in as ``<role>_token_id`` (``mask_token_id`` ...), so ``from_hf`` reads them back
    without tokenizer files. Tokenizer files are not written (``fastpt convert`` copies them). Returns
    the directory.
    Raises TypeError (not a PretrainModel), ValueError (what the architecture cannot express)."""
    if not isinstance(model, PretrainModel):
        raise TypeError(f"model: expected a PretrainModel, got {type(model).__name__}")
    hf = model.config.get("hf") or {}
    heads = model.objective.heads() if model.objective is not None else {}
    # the special ids as config.json's <role>_token_id (what _hf_special_ids reads back): without tokenizer
    # files beside it, from_hf / init_from could not tell the MLM its mask id
    ids = dict(model.config.get("special_ids") or {})
    if getattr(model.objective, "mask_token_id", None) is not None:
        ids["mask"] = model.objective.mask_token_id
    hf_config = {**(hf.get("hf_config") or {}), **{f"{role}_token_id": int(v) for role, v in sorted(ids.items())}}
    return _backbone_to_hf(model.backbone, heads, path, arch=hf.get("arch"), hf_config=hf_config)


__all__ = ["build", "load_config", "list_configs", "from_hf", "to_hf", "validate", "merge", "FORMAT"]
