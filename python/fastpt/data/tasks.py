"""Labelled text tasks: ``label<TAB>text`` files, a stratified split, and the built-in task.

``read_labelled`` reads a file of one example per line (labels are strings); ``stratified_split``
holds out the same share of every class; ``builtin_text_task()`` writes a labelled task derived
from the running Python's own documentation (which standard-library topic family a docstring comes
from), so a demo needs no download. ``fastpt eval text`` (``fastpt.train.evaluate``) uses all three.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..ops._rng import generator_seed
from .shards import write_text_atomic


# ----------------------------------------------------------------------------- labelled text files


def read_labelled(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read ``label<TAB>text`` lines: returns (labels, texts). Blank lines and lines starting
    with ``#`` are skipped; the text may itself hold tabs (only the first one splits).

    Raises FileNotFoundError naming the file; ValueError naming file and line for a line
    without a tab, an empty label or text, or invalid UTF-8; ValueError for a file with no example.
    """
    rows = read_rows(path)
    return [r[1] for r in rows], [r[2] for r in rows]


def read_rows(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """``(line number, label, text)`` of each example line (see ``read_labelled``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled text file {path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")  # a BOM is no label
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason})") from None
            if not line.strip() or line.startswith("#"):
                continue
            label, tab, text = line.partition("\t")
            if not tab:
                raise ValueError(f"{path}:{lineno}: expected 'label<TAB>text', found no tab: {line[:60]!r}")
            if not label.strip() or not text.strip():
                raise ValueError(f"{path}:{lineno}: empty {'label' if not label.strip() else 'text'}")
            rows.append((lineno, label.strip(), text.strip()))
    if not rows:
        raise ValueError(f"{path}: no examples (expected lines 'label<TAB>text')")
    return rows


def stratified_split(labels: Sequence, test_fraction: float = 0.2, seed: int = 0, *,
                     groups: Sequence | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, test), both sorted: each class sends ``round(test_fraction * n)`` of its
    ``n`` examples to the test side (at least one when ``n >= 2``), chosen by ``seed``.

    ``groups`` (one hashable key per example, e.g. the text itself) keeps examples that share a key
    on the same side, so a duplicated text cannot be trained on and then scored as "held out"
    (which would inflate the test accuracy). Groups are then the units of the split: ``n`` counts a
    class's groups, and a group belongs to the class of its first example. With every key distinct
    the split is the one without ``groups``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"groups: expected one key per label ({len(labels)}), got {len(groups)}")
    g = torch.Generator().manual_seed(generator_seed(seed))
    members: dict = {}  # group key -> its example indices, in order of first appearance
    for i, key in enumerate(range(len(labels)) if groups is None else groups):
        members.setdefault(key, []).append(i)
    units = list(members.values())
    by_class: dict = {}
    for u, idx in enumerate(units):
        by_class.setdefault(labels[idx[0]], []).append(u)
    train, test = [], []
    for y in sorted(by_class, key=str):
        idx = by_class[y]
        order = torch.randperm(len(idx), generator=g).tolist()
        n_test = min(max(round(test_fraction * len(idx)), 1 if len(idx) >= 2 else 0), len(idx) - 1)
        test += [i for j in order[:n_test] for i in units[idx[j]]]
        train += [i for j in order[n_test:] for i in units[idx[j]]]
    return sorted(train), sorted(test)


# ----------------------------------------------------------------------------- the built-in task

# topic family -> standard-library packages whose docstrings belong to it. Packages missing from an
# installation (Debian splits some out) simply contribute nothing.
PYTHON_DOCS_TOPICS = {
    "concurrency": ("asyncio", "threading", "multiprocessing", "concurrent", "queue", "subprocess", "sched"),
    "email": ("email", "mailbox", "mimetypes", "smtpd"),
    "files": ("tarfile", "zipfile", "shutil", "pathlib", "gzip", "bz2", "lzma", "glob", "fnmatch", "filecmp",
              "tempfile", "fileinput", "posixpath", "genericpath", "ntpath"),
    "imports": ("importlib", "pkgutil", "zipimport", "runpy", "modulefinder"),
    "logging": ("logging",),
    "markup": ("xml", "html", "json", "plistlib"),
    "networking": ("http", "urllib", "smtplib", "imaplib", "poplib", "ftplib", "nntplib", "xmlrpc", "wsgiref",
                   "socketserver", "ssl", "socket", "ipaddress"),
    "numbers": ("_pydecimal", "fractions", "statistics", "numbers", "random", "decimal", "cmath"),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "cProfile", "profile", "timeit"),
}
BUILTIN_TASKS = {"python-docs-topics": PYTHON_DOCS_TOPICS}
_TASK_VERSION = 1
_MAX_WORDS = 120


def _package_docstrings(root: Path, package: str, min_words: int) -> list[str]:
    """Docstrings (module, class, function) of ``root/package[.py]``, read with ``ast``, in file order."""
    files = [root / f"{package}.py"] if (root / f"{package}.py").is_file() else \
        sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []
    docs = []
    for path in files:
        if {"test", "tests"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                words = (doc or "").split()
                if len(words) >= min_words:
                    docs.append(" ".join(words[:_MAX_WORDS]))  # one line: tabs and newlines folded
    return docs


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("FASTPT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastpt"


def builtin_text_task(name: str = "python-docs-topics", seed: int = 0, *, per_class: int = 150,
                      test_fraction: float = 0.2, min_words: int = 12, cache_dir=None) -> tuple[Path, Path]:
    """Write a built-in labelled task and return ``(train_path, test_path)`` (``label<TAB>text``).

    "python-docs-topics": which topic family (concurrency, email, files, imports, logging, markup,
    networking, numbers, testing) a standard-library docstring of at least ``min_words`` words
    comes from; read from the running Python's source files, no download. Texts seen in two
    families are dropped; every family gets the same number of examples (``per_class``, or the
    smallest family's count), chosen by ``seed``, and a stratified ``test_fraction`` is held out.
    Deterministic for a Python installation and seed. Families with fewer than 20 docstrings are
    left out. Files are cached under ``cache_dir`` (default $FASTPT_CACHE, else
    ``~/.cache/fastpt``, else the temp dir when that is not writable).

    Raises ValueError for an unknown name or an installation without two usable families.
    """
    if name not in BUILTIN_TASKS:
        raise ValueError(f"task {name!r}: expected one of {sorted(BUILTIN_TASKS)}")
    root = Path(sysconfig.get_paths()["stdlib"])
    key = json.dumps([_TASK_VERSION, name, seed, per_class, test_fraction, min_words, sys.version, str(root)])
    tag = f"{name}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    for base in (_cache_dir(cache_dir), Path(tempfile.gettempdir()) / "fastpt-cache"):
        out = base / "tasks" / tag
        train_path, test_path = out / "train.tsv", out / "test.tsv"
        if train_path.is_file() and test_path.is_file():
            return train_path, test_path
        try:
            out.mkdir(parents=True, exist_ok=True)
            break
        except OSError:
            if cache_dir is not None:
                raise
    docs = {topic: [d for pkg in pkgs for d in _package_docstrings(root, pkg, min_words)]
            for topic, pkgs in BUILTIN_TASKS[name].items()}
    owners: dict[str, set] = {}
    for topic, texts in docs.items():
        for t in texts:
            owners.setdefault(t, set()).add(topic)
    docs = {topic: list(dict.fromkeys(t for t in texts if len(owners[t]) == 1)) for topic, texts in docs.items()}
    docs = {topic: texts for topic, texts in docs.items() if len(texts) >= 20}
    if len(docs) < 2:
        raise ValueError(f"task {name!r}: this Python installation ({root}) has too few standard-library "
                         "docstrings to build it")
    n = min(per_class, *(len(t) for t in docs.values()))
    g = torch.Generator().manual_seed(generator_seed(seed))
    rows = []
    for topic in sorted(docs):
        pick = torch.randperm(len(docs[topic]), generator=g)[:n].tolist()
        rows += [(topic, docs[topic][i]) for i in sorted(pick)]
    train_idx, test_idx = stratified_split([r[0] for r in rows], test_fraction, seed)
    for path, idx in ((train_path, train_idx), (test_path, test_idx)):
        write_text_atomic(path, "".join(f"{rows[i][0]}\t{rows[i][1]}\n" for i in idx))
    return train_path, test_path
