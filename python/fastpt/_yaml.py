"""The YAML reader of recipes, model configs and ``--set`` values: PyYAML's safe loader, plus two rules.

- Floats as YAML 1.2 (and every user) writes them: PyYAML follows YAML 1.1, whose float needs a dot,
  so ``lr: 1e-4`` was the string "1e-4". An unquoted ``1e-4`` / ``1E-4`` / ``.5`` is a float here; a
  quoted ``'1e-4'`` stays a string (a run directory may be called ``2024``).
- A key given twice in one mapping is an error naming it and both lines: PyYAML keeps the last one, so
  a recipe with two ``train:`` blocks silently trained with the second alone.
"""
from __future__ import annotations

import re

import yaml


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats and duplicate keys refused (module docstring)."""


class Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes the strings ``Loader`` would read as floats (``"1e3"``): a run's
    config.yaml reads back as the recipe it was written from."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
                     |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""", re.X)
for _cls, _base in ((Loader, yaml.SafeLoader), (Dumper, yaml.SafeDumper)):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _base.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML's own error follows
            continue
        if first is not None:  # also within one line: {lr: 1.0, lr: 2.0}
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first.line + 1}, column {first.column + 1}; "
                            "PyYAML would keep only the last)", key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(text: str):
    """``text`` parsed with ``Loader``; raises ``yaml.YAMLError`` (with the line) for bad YAML or a key twice."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


def dump(data, **kwargs) -> str:
    """``data`` as YAML text (``Dumper``; keyword arguments as ``yaml.dump``'s)."""
    return yaml.dump(data, Dumper=Dumper, **kwargs)
