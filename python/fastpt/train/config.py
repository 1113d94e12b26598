"""The recipe YAML of ``fastpt pretrain``: defaults, validation, ``--set a.b=v`` overrides.

``load_recipe(config, overrides)`` takes a dict or a YAML path, applies ``--set`` overrides,
fills the defaults (``DEFAULTS``; the model config's own ``defaults:`` block sits between the
two: recipe value > model default > recipe default) and validates every key. Errors name the key:
``train.lr: expected a number > 0, got 'fast'``, ``train.lrr: unknown key (did you mean 'lr'?);
valid keys: ...``. The schema is documented in ``fastpt.train``'s module docstring.
"""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .._yaml import dump as dump_yaml
from .._yaml import load as load_yaml

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
MODES = ("pack", "doc")
DEVICES = ("auto", "cpu", "cuda")

DEFAULTS: dict[str, Any] = {
    "model": None,
    "init_from": None,
    "data": {
        "path": None, "images": None, "seq_len": 128, "mode": "pack", "add_special": "auto", "shuffle": True,
        "verify": True, "image_size": None, "prefetch": None,
    },
    "train": {
        "batch_size": 32, "grad_accum": 1, "max_steps": None, "max_tokens": None, "max_time_s": None,
        "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 0,
        "schedule": "cosine", "min_lr_ratio": 0.1, "clip_grad": 1.0, "precision": "auto", "compile": False,
        "activation_checkpointing": False, "seed": 0, "device": "auto", "fsdp": False,
        "find_unused_parameters": False, "peak_tflops": None,
    },
    "output": {
        "dir": None, "save_every": 1000, "keep_last": 3, "log_every": 10, "tensorboard": True, "plot": True,
        "progress": True,
    },
}
# Keys of a model config's ``defaults:`` block and where they land in the recipe.
MODEL_DEFAULTS = {"seq_len": "data.seq_len", "mode": "data.mode", "image_size": "data.image_size",
                  **{k: f"train.{k}" for k in DEFAULTS["train"]}}


class ConfigError(ValueError):
    """A recipe key with a bad value, an unknown key, or a missing required one (the message names it)."""


# ----------------------------------------------------------------------------- validators


def _num(key, v, *, integer=False, low=None, low_ok=True, high=None, none=False):
    if v is None and none:
        return None
    if not integer and isinstance(v, str) and _looks_float(v) and any(c in v.lower() for c in ".e"):
        v = float(v)  # a quoted float ("1e-4", '0.001'), as recipes wrote them for YAML 1.1's sake
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
        raise ConfigError(f"{key}: expected {'an integer' if integer else 'a number'}"
                          f"{' or null' if none else ''}, got {v!r}")
    if low is not None and (v < low or (v == low and not low_ok)):
        raise ConfigError(f"{key}: expected a value {'>=' if low_ok else '>'} {low}, got {v!r}")
    if high is not None and v > high:
        raise ConfigError(f"{key}: expected a value <= {high}, got {v!r}")
    return v if integer else float(v)


def _choice(key, v, options):
    if v not in options:
        raise ConfigError(f"{key}: expected one of {list(options)}, got {v!r}")
    return v


def _bool(key, v):
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile(key, v):
    """false, true (torch.compile's default mode) or one of its modes by name."""
    if isinstance(v, bool) or v in COMPILE_MODES:
        return v
    raise ConfigError(f"{key}: expected true, false or a torch.compile mode {list(COMPILE_MODES)}, got {v!r}")


def _path(key, v, none=True):
    if v is None and none:
        return None
    if not isinstance(v, (str, Path)) or not str(v):
        raise ConfigError(f"{key}: expected a path{' or null' if none else ''}, got {v!r}")
    return str(v)


def _betas(key, v):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ConfigError(f"{key}: expected [beta1, beta2], got {v!r}")
    return [_num(f"{key}[{i}]", b, low=0.0, high=1.0) for i, b in enumerate(v)]


def _model(key, v):
    if v is None or isinstance(v, dict):
        return v
    if isinstance(v, (str, Path)) and str(v):
        return str(v)
    raise ConfigError(f"{key}: expected a zoo name, a YAML path or an inline {{backbone:, objective:}} mapping, "
                      f"got {v!r}")


def _add_special(key, v):
    if isinstance(v, bool) or v in ("auto", "cls_sep", "eos", "none"):
        return v
    raise ConfigError(f"{key}: expected one of ['auto', 'cls_sep', 'eos', 'none'] or true/false, got {v!r}")


pos_int = lambda **kw: (lambda k, v: _num(k, v, integer=True, low=1, **kw))  # noqa: E731
CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "model": _model,
    "init_from": _path,
    "data.path": _path,
    "data.images": _path,
    "data.seq_len": pos_int(),
    "data.mode": lambda k, v: _choice(k, v, MODES),
    "data.add_special": _add_special,
    "data.shuffle": _bool,
    "data.verify": _bool,
    "data.image_size": pos_int(none=True),
    "data.prefetch": lambda k, v: _num(k, v, integer=True, low=0, none=True),
    "train.batch_size": pos_int(),
    "train.grad_accum": pos_int(),
    "train.max_steps": pos_int(none=True),
    "train.max_tokens": pos_int(none=True),
    "train.max_time_s": lambda k, v: _num(k, v, low=0.0, low_ok=False, none=True),
    "train.lr": lambda k, v: _num(k, v, low=0.0, low_ok=False),
    "train.weight_decay": lambda k, v: _num(k, v, low=0.0),
    "train.betas": _betas,
    "train.eps": lambda k, v: _num(k, v, low=0.0, low_ok=False),
    "train.warmup_steps": lambda k, v: _num(k, v, integer=True, low=0),
    "train.schedule": lambda k, v: _choice(k, v, SCHEDULES),
    "train.min_lr_ratio": lambda k, v: _num(k, v, low=0.0, high=1.0),
    "train.clip_grad": lambda k, v: _num(k, v, low=0.0, low_ok=False, none=True),
    "train.precision": lambda k, v: _choice(k, v, PRECISIONS),
    "train.compile": _compile,
    "train.activation_checkpointing": _bool,
    "train.seed": lambda k, v: _num(k, v, integer=True, low=0, high=2**63 - 1),
    "train.device": lambda k, v: _choice(k, v, DEVICES),
    "train.fsdp": _bool,
    "train.find_unused_parameters": _bool,
    "train.peak_tflops": lambda k, v: _num(k, v, low=0.0, low_ok=False, none=True),
    "output.dir": _path,
    "output.save_every": lambda k, v: _num(k, v, integer=True, low=0),
    "output.keep_last": pos_int(none=True),
    "output.log_every": pos_int(),
    "output.tensorboard": _bool,
    "output.plot": _bool,
    "output.progress": _bool,
}


# ----------------------------------------------------------------------------- loading


def _unknown(key: str, valid: Sequence[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; valid keys: {', '.join(valid)}")


def _zoo_hint(name: str) -> str:
    """For a missing recipe path that names (or nearly names) a zoo model: where zoo names go."""
    from ..assemble import list_configs

    names = list_configs()
    close = [name] if name in names else difflib.get_close_matches(name, names, n=1)
    if not close:
        return ""
    return (f" (--config takes a recipe YAML with model:, data:, train:, output:; the zoo model {close[0]!r} "
            f"goes under it as `model: {close[0]}`)")


def read_yaml(path: str | Path) -> dict:
    """A YAML file as a dict; ConfigError for a missing file, bad YAML or a non-mapping document."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {p} does not exist{_zoo_hint(str(path))}")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must hold a mapping (model:, data:, train:, output:), "
                          f"got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML (numbers, bools, lists;
    ``1e-4`` is a float, a quoted ``'2024'`` a string: ``fastpt._yaml``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def apply_override(cfg: dict, parts: list[str], value: Any) -> None:
    """Set ``cfg[a][b]... = value``; ``model.*`` keys reach into an inline model mapping."""
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node.get(p), dict):
            if parts[0] != "model" and ".".join(parts[:i + 1]) in CHECKS:
                raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a mapping")
            node[p] = {} if node.get(p) is None else node[p]
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = node[p]
    node[parts[-1]] = value


def load_recipe(config: dict | str | Path, overrides: Sequence[str] = (), *, model_defaults: dict | None = None,
                resolve_model: Callable[[Any], dict] | None = None) -> dict:
    """The validated recipe as a plain nested dict (every key present).

    Args:
        config: a dict or a YAML path.
        overrides: ``"a.b=v"`` strings (``--set``), applied in order before validation, except that a
            whole ``model=X`` goes first (``model.*`` edits then apply to X).
        model_defaults: the model config's ``defaults:`` block (keys in ``MODEL_DEFAULTS``);
            None: read through ``resolve_model`` when given.
        resolve_model: turns ``model`` (zoo name / path / dict) into the model config dict
            (``fastpt.assemble.load_config``); used for ``defaults:`` and for ``--set model.*``.

    Raises ConfigError naming the key.
    """
    raw = read_yaml(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping or a YAML path, got {type(raw).__name__}")
    parsed = [(item, *parse_override(item)) for item in overrides]
    # a whole-model override (--set model=X) first, whatever its place: the --set model.* edits apply to X
    # (after them it replaced the model and dropped them silently)
    parsed.sort(key=lambda p: p[1] != ["model"])
    for item, parts, value in parsed:
        if parts[0] == "model" and len(parts) > 1 and not isinstance(raw.get("model"), dict):
            if raw.get("model") is None or resolve_model is None:
                raise ConfigError(f"--set {item}: model is not set; set model: first")
            raw["model"] = resolve_model(raw["model"])  # a zoo name becomes its mapping, then is edited
        apply_override(raw, parts, value)

    for key in raw:
        if key not in DEFAULTS:
            raise _unknown(key, list(DEFAULTS))
    cfg = copy.deepcopy(DEFAULTS)
    if model_defaults is None and resolve_model is not None and raw.get("model") is not None:
        model_defaults = (resolve_model(raw["model"]) or {}).get("defaults") or {}
    from_model = set()
    for name, value in (model_defaults or {}).items():
        if name not in MODEL_DEFAULTS:
            raise _unknown(f"model.defaults.{name}", list(MODEL_DEFAULTS))
        section, key = MODEL_DEFAULTS[name].split(".")
        cfg[section][key] = value
        from_model.add(MODEL_DEFAULTS[name])
    for key, value in raw.items():
        if isinstance(DEFAULTS[key], dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            for sub, v in value.items():
                if sub not in DEFAULTS[key]:
                    raise _unknown(f"{key}.{sub}", list(DEFAULTS[key]))
                cfg[key][sub] = v
                from_model.discard(f"{key}.{sub}")
        else:
            cfg[key] = value
    for dotted, check in CHECKS.items():
        section, _, sub = dotted.partition(".")
        try:
            if sub:
                cfg[section][sub] = check(dotted, cfg[section][sub])
            else:
                cfg[section] = check(dotted, cfg[section])
        except ConfigError as exc:
            raise ConfigError(f"{exc}{_origin(dotted, from_model)}") from None
    try:
        _check_together(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_origin(str(exc).split(':')[0], from_model)}") from None
    return cfg


def _origin(key: str, from_model: set) -> str:
    return f" (the value comes from the model config's defaults: block; set {key} in the recipe)" \
        if key in from_model else ""


def _check_together(cfg: dict) -> None:
    d, t = cfg["data"], cfg["train"]
    if cfg["model"] is None and cfg["init_from"] is None:
        raise ConfigError("model: required (a zoo name such as bert-mini, a YAML path or an inline mapping), "
                          "unless init_from names a checkpoint")
    if (d["path"] is None) == (d["images"] is None):
        raise ConfigError("data: set exactly one of data.path (a `fastpt preprocess` shard directory) and "
                          "data.images (fashion-mnist, an image folder or a preprocessed image directory)")
    if t["max_steps"] is None and t["max_tokens"] is None and t["max_time_s"] is None:
        raise ConfigError("train.max_steps: set at least one of train.max_steps, train.max_tokens, train.max_time_s")
    if t["max_steps"] is None and t["max_tokens"] is None and t["schedule"] != "constant":
        raise ConfigError(f"train.schedule: {t['schedule']!r} needs a length (train.max_steps or train.max_tokens); "
                          "with only train.max_time_s use schedule: constant")
    if t["max_steps"] is not None and t["warmup_steps"] > t["max_steps"]:
        raise ConfigError(f"train.warmup_steps: {t['warmup_steps']} exceeds train.max_steps={t['max_steps']}")
    if t["fsdp"] and t["find_unused_parameters"]:
        raise ConfigError("train.find_unused_parameters: DDP only, not with train.fsdp")


def to_yaml(cfg: dict) -> str:
    """The resolved recipe as YAML (the run directory's config.yaml)."""
    return dump_yaml(cfg, sort_keys=False, default_flow_style=None)
