"""A built-in text corpus that every Python installation carries: its own documentation.

No download: the ``pydoc_data.topics`` help pages (the language reference) plus the
docstrings of the standard library's modules, classes and functions, read with
``ast`` from the source files (nothing is imported or executed).
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator


def _stdlib_docstrings(min_words: int, exclude: frozenset = frozenset()) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "dist-packages") or "test" in parts or "tests" in parts:
            continue
        if parts[0].removesuffix(".py") in exclude:  # a module or package held out
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue  # a broken or non-UTF-8 file in an installation is no reason to fail
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    yield doc


_RULE_CHARS = set("*=-~^#+`'\" ")


def _clean(text: str) -> str:
    """Drop reStructuredText rules and heading underlines (lines of only ``*``, ``=``, ...)."""
    return "\n".join(line for line in text.splitlines() if not (line.strip() and set(line) <= _RULE_CHARS))


def python_docs_corpus(*, include_stdlib: bool = True, min_words: int = 8,
                       exclude_packages: tuple[str, ...] = ()) -> list[str]:
    """Documents (strings) from the running Python's documentation.

    Returns the ``pydoc_data.topics`` pages (about 65k words) and, with
    ``include_stdlib``, every standard-library docstring of at least ``min_words``
    words (several hundred thousand words more), in a deterministic order, except those of the
    top-level modules / packages in ``exclude_packages`` (``heldout_packages``: what the built-in
    ``python-docs-topics`` task is made of, so that a model pre-trained here is evaluated on texts it
    has not seen).
    """
    import pydoc_data.topics

    docs = [_clean(text) for _, text in sorted(pydoc_data.topics.topics.items())]
    if include_stdlib:
        docs.extend(_stdlib_docstrings(min_words, frozenset(exclude_packages)))
    return docs


def heldout_packages(task: str = "python-docs-topics") -> tuple[str, ...]:
    """The standard-library modules / packages the built-in ``task`` draws its texts from
    (``tasks.BUILTIN_TASKS``), to leave out of a pre-training corpus."""
    from .tasks import BUILTIN_TASKS

    return tuple(sorted({pkg for pkgs in BUILTIN_TASKS[task].values() for pkg in pkgs}))
