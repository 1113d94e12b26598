"""Training checkpoints: written atomically, verified on load, the newest good one found on resume.

A run's ``checkpoints/`` directory holds one directory per save::

    step-00001000/
        model.safetensors      the weights (``PretrainModel.save_pretrained``: the directory is
        fastpt_config.json     also a model directory for ``from_pretrained`` / ``init_from``)
        optimizer.pt           ``optimizer.state_dict()`` (``torch.load(weights_only=True)``)
        rng.safetensors        torch CPU / CUDA generator states of every rank
        trainer_state.json     step, tokens, data position, grad scaler, python / numpy RNG states,
                               elapsed time, the recipe
        checkpoint.json        written last: format, step, and every file's size and sha256

Every file gets the mode a new file gets under the umask (0644 under umask 022), the safetensors files
too (``models.hf.save_safetensors``; safetensors alone writes 0600): a checkpoint is readable wherever
its JSON files are.

A save writes ``.tmp-step-N-PID/``, fsyncs each file and the directory, then renames it to
``step-N`` (``rename`` is atomic), so a kill at any moment leaves either the complete new
checkpoint or a ``.tmp-*`` leftover that ``clean_partial`` removes. ``latest_checkpoint``
verifies sizes and checksums against ``checkpoint.json`` and falls back to the previous
checkpoint, with a warning naming the damaged file, when the newest one is torn or corrupt.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.shards import read_json_object, sha256_file
from ..models.hf import save_safetensors
from ..models.model import CONFIG_FILE, WEIGHTS_FILE

FORMAT, VERSION = "fastpt-checkpoint", 1
MANIFEST = "checkpoint.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
NAME = re.compile(r"^step-(\d{8,})$")
REQUIRED = (WEIGHTS_FILE, CONFIG_FILE, STATE, RNG)  # written by every save


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only directory ...): names it."""


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not match its ``checkpoint.json`` (the message names the file)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states: (tensors: torch CPU and CUDA, JSON: python and numpy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Restore what ``rng_state`` returned (CUDA states only for the devices present)."""
    torch.set_rng_state(tensors["torch_cpu"].cpu())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"].cpu(), i)
    v, keys, gauss = plain["python"]
    random.setstate((v, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- save


def save_checkpoint(root: str | os.PathLike, step: int, *, write_model: Callable[[Path], None],
                    optimizer_state: dict | None, trainer_state: dict, rng_tensors: dict[str, torch.Tensor],
                    keep_last: int | None = None) -> Path:
    """Write checkpoint ``root/step-NNNNNNNN`` atomically and keep the newest ``keep_last``.

    Args:
        write_model: writes the model files into the directory it is given
            (``PretrainModel.save_pretrained``).
        optimizer_state: ``optimizer.state_dict()`` (None: not saved).
        trainer_state: JSON-serialisable state (step, tokens, data position, RNG, ...).
        rng_tensors: name -> tensor (generator states), stored as safetensors.
    Returns the checkpoint directory. An existing checkpoint of the same step is replaced.
    ``keep_last`` prunes only checkpoints older than this one (never this one, nor newer ones an
    earlier run left: a resume that fell back past a corrupt newest checkpoint must not lose the new
    ones to it). Raises CheckpointWriteError (an OSError) naming the checkpoint when it cannot be
    written (a full disk ...); the partial directory is removed and earlier checkpoints stay.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_model(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in rng_tensors.items()}, tmp / RNG)
        _write_json(tmp / STATE, {**trainer_state, "step": step})
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                _fsync(p)
                files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "step": step, "files": files})
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
    except Exception as exc:  # noqa: BLE001 - torch.save (RuntimeError) and safetensors (SafetensorError, an
        # Exception of its own) report a full disk their own ways: each is this save's failure
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            usage = shutil.disk_usage(root)
            full = " (the disk looks full)" if usage.free < max(64 << 20, usage.total // 100) else ""
            free = f"; {usage.free / 2**20:,.0f} MiB free there once the partial save was removed{full}"
        except OSError:
            free = ""
        earlier = "the earlier checkpoints are intact" if find_checkpoints(root) else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"checkpoint {final}: could not be written ({type(exc).__name__}: {exc}){free}; "
                                   f"{earlier}") from exc
    trash = None
    if final.exists():  # a torn or older save of this step: replace it, the rename stays atomic
        trash = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync(root)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    if keep_last:
        older = [p for s, p in find_checkpoints(root) if s < step]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


_TMP = re.compile(r"\.tmp-(old-)?(step-\d+)-\d+")


def clean_partial(root: str | os.PathLike) -> list[Path]:
    """Remove the ``.tmp-*`` directories an interrupted save left in ``root``; returns them. A save that
    replaces a checkpoint of the same step renames the old one aside, then the new one into place: killed
    between the two, neither has its name. The new one, complete (its manifest is written last), is put
    in place, else the old one back; verification on load judges them as any checkpoint."""
    root = Path(root)
    leftovers = sorted(p for p in root.glob(".tmp-*") if p.is_dir()) if root.is_dir() else []
    for new_first in (True, False):
        for p in leftovers:
            m = _TMP.fullmatch(p.name)
            final = root / m.group(2) if m else None
            if final is None or final.exists() or not p.exists() or bool(m.group(1)) == new_first:
                continue
            if not new_first or (p / MANIFEST).is_file():
                os.rename(p, final)
    gone = [p for p in leftovers if p.exists()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------- find and load


def find_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-*`` directories in ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := NAME.match(p.name))]
    return sorted(found)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint directory against its ``checkpoint.json``; returns that manifest.

    Raises CorruptCheckpointError naming the missing, truncated or corrupt file.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpointError(f"{mpath}: missing (the save did not finish)")
    manifest = read_json_object(mpath, CorruptCheckpointError)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CorruptCheckpointError(f"{mpath}: not a fastpt checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CorruptCheckpointError(f"{mpath}: format version {manifest.get('version')}, this fastpt reads {VERSION}")
    # every save writes these (optimizer.pt unless saved without one): a manifest that leaves one out, or a
    # file of the checkpoint's own names beside it that it does not list, is not what the save wrote
    unlisted = sorted(n for n in REQUIRED if n not in manifest["files"])
    if unlisted:
        raise CorruptCheckpointError(f"{mpath}: does not list {', '.join(unlisted)}, which every checkpoint holds "
                                     "(damaged or edited)")
    extra = sorted(n for n in (*REQUIRED, OPTIMIZER) if n not in manifest["files"] and (path / n).exists())
    if extra:
        raise CorruptCheckpointError(f"{path / extra[0]}: not listed in {mpath} (damaged or edited)")
    for name, rec in manifest["files"].items():
        if not isinstance(rec, dict) or not _is_int(rec.get("bytes")) or not isinstance(rec.get("sha256"), str):
            raise CorruptCheckpointError(f"{mpath}: files.{name}: expected {{bytes: integer, sha256: string}}, "
                                         f"got {rec!r} (damaged or edited)")
        p = path / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CorruptCheckpointError(f"{mpath}: files.{name}: not a file name of the checkpoint directory")
        if not p.is_file():
            raise CorruptCheckpointError(f"{p}: missing (listed in {mpath})")
        if p.stat().st_size != rec["bytes"]:
            raise CorruptCheckpointError(f"{p}: {p.stat().st_size} bytes, {MANIFEST} says {rec['bytes']} (truncated)")
        if sha256_file(p) != rec["sha256"]:
            raise CorruptCheckpointError(f"{p}: sha256 differs from {MANIFEST} (corrupt)")
    _check_step(path, manifest)
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_step(path: Path, manifest: dict) -> None:
    """The step in the directory name (``step-N``), in ``checkpoint.json`` and in ``trainer_state.json``
    must agree: a renamed or edited checkpoint would otherwise resume at another step than its name says."""
    mpath = path / MANIFEST
    step = manifest.get("step")
    if not _is_int(step) or step < 0:
        raise CorruptCheckpointError(f"{mpath}: step: expected a non-negative integer, got {step!r}")
    m = NAME.match(path.name)
    if m and int(m.group(1)) != step:
        raise CorruptCheckpointError(f"{path}: the directory name says step {int(m.group(1))}, {MANIFEST} says "
                                     f"step {step} (renamed or edited checkpoint)")
    spath = path / STATE
    if spath.is_file():
        state = read_json_object(spath, CorruptCheckpointError)
        if state.get("step") != step or not _is_int(state.get("step")):
            raise CorruptCheckpointError(f"{spath}: step {state.get('step')!r}, {mpath} says step {step} "
                                         "(edited checkpoint)")


def checkpoints_dir(path: str | os.PathLike) -> Path:
    """``path/checkpoints`` for a run directory, else ``path`` itself."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def latest_checkpoint(path: str | os.PathLike, *, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies, in a run directory or its ``checkpoints/``; None if
    there is none at all. Newer ones that fail verification are skipped with a warning
    (``warn``, default ``warnings.warn``) naming the damaged file and the fallback.

    Raises CorruptCheckpointError when checkpoints exist but none verifies.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    found = find_checkpoints(checkpoints_dir(path))
    errors = []
    for _, ckpt in reversed(found):
        try:
            verify_checkpoint(ckpt)
        except CorruptCheckpointError as exc:
            errors.append(str(exc))
            warn(f"checkpoint {ckpt.name} is unusable: {exc}; trying the previous one")
            continue
        if errors:
            warn(f"resuming from {ckpt.name} instead")
        return ckpt
    if errors:
        raise CorruptCheckpointError("no usable checkpoint in " + str(checkpoints_dir(path)) + ": " + "; ".join(errors))
    return None


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu", verify: bool = True) -> dict:
    """Read a checkpoint: ``{"path", "state" (trainer_state.json), "optimizer" (state dict or None),
    "rng" (name -> tensor)}``. The model weights are read by ``PretrainModel.from_pretrained`` / the
    recipe from ``path`` itself. Raises CorruptCheckpointError (``verify``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    optimizer = None
    if (path / OPTIMIZER).is_file():
        optimizer = torch.load(path / OPTIMIZER, map_location=map_location, weights_only=True)
    rng = load_file(str(path / RNG)) if (path / RNG).is_file() else {}
    return {"path": path, "state": state, "optimizer": optimizer, "rng": rng}
