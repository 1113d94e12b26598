"""One writer per output directory: an exclusive ``flock`` on a lock file that holds the owner's pid.

``fastpt preprocess`` holds one on its shard directory, ``fastpt pretrain`` on its run directory:
a second run into the same place (a scheduler's requeue while the first job still runs, a command
started twice) is refused with the holder's pid, instead of both writing the same files. The
kernel drops the lock with its process, so the file a killed run leaves behind is simply taken
over. Where there is no ``flock`` (Windows, or a filesystem that refuses it) there is no lock (with a warning
for the filesystem).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_HELD: dict[str, int] = {}  # lock path -> fd, in this process


def lock_dir(directory: str | os.PathLike, name: str, what: str) -> str | None:
    """Take ``directory/name`` for this process; ValueError naming ``directory`` and the holder's pid while
    another process (or this one) holds it. ``what`` names the kind of run in the message. Returns the lock
    path for ``unlock_dir`` (None where there is no flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    directory = Path(directory)
    path = str(directory / name)
    if path in _HELD:
        raise ValueError(f"{directory} is in use by another {what} run in this process")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"{directory} is in use by another {what} run (pid {holder}, lock file {path}); wait "
                             f"for it to finish or choose another directory") from None
        except OSError as exc:  # no flock on this filesystem (Lustre without -o flock, some FUSE mounts)
            os.close(fd)
            warnings.warn(f"{what}: {directory}: cannot lock {path} ({exc.strerror or exc}); running without the "
                          "one-run-per-directory lock", stacklevel=2)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # released (and removed) by its holder meanwhile
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[path] = fd
    return path


PREPROCESS_LOCK = ".fastpt-preprocess.lock"  # in a preprocess output directory while a run writes there


def lock_preprocess_output(out: str | os.PathLike) -> str | None:
    """Take ``out/PREPROCESS_LOCK`` for a ``fastpt preprocess`` run, text or images (``lock_dir``); ValueError
    naming ``out`` and the holder's pid while another run holds it. Returns the lock path (None without flock)."""
    try:
        return lock_dir(out, PREPROCESS_LOCK, "fastpt preprocess")
    except ValueError as exc:
        raise ValueError(f"output {exc}") from None


def unlock_dir(path: str | None) -> None:
    """Release a ``lock_dir`` lock (None, or one not held: nothing)."""
    if path is not None and path in _HELD:
        Path(path).unlink(missing_ok=True)  # while still holding it: a waiting run reopens the new file
        os.close(_HELD.pop(path))


def close_inherited() -> None:
    """In a forked worker: drop the inherited lock descriptors, so that only the main process holds
    the lock (a killed main process must release it at once, not when its workers notice)."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
