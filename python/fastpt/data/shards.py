"""The on-disk token shard format: a writer (used by ``fastpt preprocess``) and a reader.

A shard directory holds::

    manifest.json       format, version, dtype, counts, tokenizer file + sha256, special ids,
                        per-shard sha256 checksums, preprocessing stats (see ``read_manifest``)
    tokenizer.json      the tokenizer the ids came from (a Hugging Face ``tokenizers`` file)
    shard-00000.bin     token ids of whole documents, back to back, raw little-endian
                        uint16 (vocab <= 65536) or uint32: ``numpy.memmap(path, dtype)``
    shard-00000.idx     int64 little-endian document offsets into the .bin, (docs + 1,),
                        starting at 0 and ending at the shard's token count
    ...

Documents are stored without special tokens and the sequence length is not frozen:
``ShardDataset`` cuts training samples at run time, either packed windows of documents
joined by separators (with ``cu_seqlens`` boundaries for packed-document attention) or
one document per row (truncated / padded, with an attention mask). Its sample order is a
pure function of ``(seed, epoch, rank, world_size)`` and its position is one integer, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import mmap
import numbers
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

FORMAT = "fastpt-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_MODES = ("auto", "cls_sep", "eos", "none")


class CorruptShardError(ValueError):
    """A shard directory that does not match its manifest (missing file, wrong size or checksum)."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype for ``vocab_size`` ids: little-endian uint16 up to 65536, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def named_os_error(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` naming ``path``: a failed ``write`` / ``flush`` / ``fsync`` (disk full, quota, I/O error)
    raises an OSError without a file name ("[Errno 28] No space left on device"), which tells a user
    of the command line nothing about where. Returns ``exc`` itself when it names a file already."""
    if exc.filename is not None:
        return exc
    if exc.errno is None:
        return OSError(f"{path}: {exc}")
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def unlink_quietly(path: str | os.PathLike) -> None:
    """Remove a temporary file after a failed write, if it is there; an error removing it (a read-only
    directory, where it was never created) is dropped: the error that brought us here is the one to report."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old or the new file, never half of one.

    Raises OSError naming the ``.tmp`` file when it cannot be written (disk full...); the ``.tmp`` is
    removed then and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        unlink_quietly(tmp)  # e.g. a directory in the way: the error about writing is the one to report
        raise named_os_error(exc, tmp) from exc
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: never half a file.

    When the write fails (a full disk, an interrupt) the temporary file is removed and the error re-raised,
    an OSError without a file name (a full disk's) naming the temporary file; ``path`` is left as it was.
    """
    path = Path(path)
    with replacing(path, path.with_name(f".{path.name}.{os.getpid()}.tmp")) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def replacing(path: Path, tmp: Path):
    """The body writes ``tmp`` (yielded); then ``os.replace(tmp, path)``: readers see the old file or the whole
    new one. When the body or the rename fails (a full disk, an interrupt) ``tmp`` is removed and the error
    re-raised, an OSError without a file name (a full disk's) naming ``tmp``; ``path`` is left as it was."""
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        unlink_quietly(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise named_os_error(exc, tmp) from exc
        raise


def nearest_existing(path: str | os.PathLike) -> Path | None:
    """``path`` itself or its nearest ancestor that exists (a broken link counts): what decides whether
    ``path`` is, or can become, a directory; None when nothing up to the root exists."""
    for p in (Path(path), *Path(path).parents):
        if p.exists() or p.is_symlink():
            return p
    return None


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError, hint: str = "") -> dict:
    """The JSON object in the file ``path``; ``error`` naming the file when it is not UTF-8 JSON or
    holds something other than an object (``hint``: what to do about it, appended to the message)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}){hint}") from exc
    if not isinstance(obj, dict):
        raise error(f"{path}: not a JSON object (got a {type(obj).__name__}){hint}")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int when it is an integer (not a bool) in [low, high]; else TypeError /
    ValueError naming ``name``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value} outside [{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}]")
    return value


def check_offsets(path: Path, offsets: np.ndarray, tokens: int) -> None:
    """Raise CorruptShardError naming ``path`` unless ``offsets`` (an .idx table) starts at 0, ends at
    ``tokens`` and never goes backwards. O(docs): 8 bytes read per document."""
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != tokens or np.any(np.diff(offsets) < 0):
        raise CorruptShardError(f"{path}: not a valid document offset table (offsets must rise from 0 to "
                                f"the shard's {tokens} tokens; rerun fastpt preprocess)")


def check_file_name(where: str | os.PathLike, key: str, name: str, error: type[Exception] = CorruptShardError) -> None:
    """Raise ``error`` naming ``where``, ``key`` and ``name`` unless ``name`` is a plain file name of
    the directory its record lives in: not empty, '.' or '..', not absolute, no '/' or '\\'.

    A manifest (or weight index) is data from whoever shipped the directory: a name such as
    ``../x`` or ``/home/u/.ssh/id_rsa`` would make the reader open files outside the directory
    the user pointed it at (the rule ``train.checkpoint.verify_checkpoint`` applies to its file
    list). The check is on the name only: a symlink the directory holds is followed, as the
    Hugging Face hub cache (snapshots link to ../../blobs) and git-annex / DVC stores need.
    """
    if (not name or name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name)
            or Path(name).name != name):  # the last catches what this OS also treats as a path (C:x)
        raise error(f"{where}: {key}={name!r} is not a file name of the directory (absolute, or with '/', "
                    f"'\\' or '..'); refusing to read files outside it (damaged or edited)")


def check_manifest_schema(mpath: Path, manifest: Any) -> None:
    """Check the types of the keys ``read_manifest`` and ``ShardDataset`` use.

    Raises CorruptShardError naming ``mpath`` and the key (the manifest was edited or damaged).
    """
    def bad(key: str, want: str, got: Any = KeyError) -> CorruptShardError:
        what = "missing" if got is KeyError else f"{got!r}"
        return CorruptShardError(f"{mpath}: {key} must be {want}, got {what} (damaged or edited manifest; "
                                 "rerun fastpt preprocess)")

    if not isinstance(manifest, dict):
        raise CorruptShardError(f"{mpath}: not a JSON object (got {type(manifest).__name__}); "
                                "damaged or edited manifest, rerun fastpt preprocess")
    vocab = manifest.get("vocab_size", KeyError)
    if not _is_int(vocab) or vocab <= 0:
        raise bad("vocab_size", "a positive integer", vocab)
    dt = manifest.get("dtype", KeyError)
    try:
        dtype = np.dtype(dt) if isinstance(dt, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind != "u" or dtype.itemsize not in (2, 4):
        raise bad("dtype", "'uint16' or 'uint32'", dt)
    if vocab - 1 > np.iinfo(dtype).max:
        raise CorruptShardError(f"{mpath}: dtype {dt} cannot hold the ids of vocab_size={vocab}")
    for key in ("num_docs", "num_tokens"):
        v = manifest.get(key, KeyError)
        if not _is_int(v) or v < 0:
            raise bad(key, "a non-negative integer", v)
    shards = manifest.get("shards", KeyError)
    if not isinstance(shards, list):
        raise bad("shards", "a list of shard records", shards)
    for i, rec in enumerate(shards):
        if not isinstance(rec, dict):
            raise bad(f"shards[{i}]", "a shard record (object)", rec)
        for key in ("bin", "idx", "bin_sha256", "idx_sha256"):
            v = rec.get(key, KeyError)
            if not isinstance(v, str) or not v:
                raise bad(f"shards[{i}].{key}", "a non-empty string", v)
            if key in ("bin", "idx"):
                check_file_name(mpath, f"shards[{i}].{key}", v)
        for key in ("docs", "tokens"):
            v = rec.get(key, KeyError)
            if not _is_int(v) or v < 0:
                raise bad(f"shards[{i}].{key}", "a non-negative integer", v)
    special = manifest.get("special_tokens", {})
    if not isinstance(special, dict):
        raise bad("special_tokens", "an object of token name -> id", special)
    for name, tid in special.items():
        if not _is_int(tid):
            raise bad(f"special_tokens.{name}", "an integer token id", tid)
        if not 0 <= tid < vocab:
            raise CorruptShardError(f"{mpath}: special_tokens.{name}={tid} outside the vocabulary "
                                    f"[0, vocab_size={vocab})")
    tok = manifest.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise bad("tokenizer", "null or an object", tok)
        for key in ("file", "sha256"):
            if tok.get(key) is not None and not isinstance(tok[key], str):
                raise bad(f"tokenizer.{key}", "a string or null", tok[key])
        if tok.get("file"):
            check_file_name(mpath, "tokenizer.file", tok["file"])


def verify_file(root: Path, name: str, *, size: int | None, sha256: str | None) -> Path:
    """Check that ``root/name`` exists with the recorded size and sha256; returns its path.

    Raises CorruptShardError naming the file, or the manifest and ``name`` when ``name`` is not a
    file name inside ``root`` (``check_file_name``).
    """
    check_file_name(root / MANIFEST, "file", name)
    path = root / name
    if not path.is_file():
        raise CorruptShardError(f"{path}: missing (listed in {root / MANIFEST})")
    if size is not None and path.stat().st_size != size:
        raise CorruptShardError(f"{path}: {path.stat().st_size} bytes, the manifest says {size} "
                                "(truncated or overwritten; rerun fastpt preprocess)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CorruptShardError(f"{path}: sha256 differs from the manifest (corrupt; rerun fastpt preprocess)")
    return path


class ShardWriter:
    """Appends documents to numbered shards ``shard-NNNNN.bin/.idx`` in ``out_dir``.

    ``add(ids)`` appends one document (1-D integer array), ``add_many(ids, lengths)`` several at
    once; ``close_if_full()`` closes the open shard once it holds at least ``shard_tokens`` tokens
    (call it only at a point where the caller can record a resume position); ``close()`` closes a
    non-empty open shard: fsync, rename the ``.tmp`` files into place, and return the shard's
    manifest record ``{"bin", "idx", "docs", "tokens", "bin_sha256", "idx_sha256"}``; ``abort()``
    drops the open shard's ``.tmp`` files (also after a failed write). A failed write, flush or
    fsync (disk full) raises OSError naming the ``.tmp`` file.
    Memory: O(1) beyond the ids given; tokens and offsets stream to the ``.tmp`` files, hashed on the way.
    """

    def __init__(self, out_dir: str | os.PathLike, dtype: np.dtype, shard_tokens: int, start_index: int = 0):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir, self.dtype = Path(out_dir), np.dtype(dtype)
        self.shard_tokens, self.index = shard_tokens, start_index
        self._files = None  # (bin, idx) open .tmp files of the open shard
        self._hashes = None
        self._docs = self._tokens = 0

    @staticmethod
    def names(index: int) -> tuple[str, str]:
        return f"shard-{index:05d}.bin", f"shard-{index:05d}.idx"

    def _tmp(self, k: int) -> Path:
        return self.out_dir / (self.names(self.index)[k] + ".tmp")

    def _write(self, k: int, data: bytes) -> None:
        try:
            self._files[k].write(data)
        except OSError as exc:
            raise named_os_error(exc, self._tmp(k)) from exc
        self._hashes[k].update(data)

    @property
    def open_tokens(self) -> int:
        """Tokens in the open shard (0 when none is open): it is full once this reaches ``shard_tokens``."""
        return self._tokens

    def _check_fits(self, ids: np.ndarray) -> None:
        if len(ids) and ids.dtype.itemsize > self.dtype.itemsize and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"ids: token id {int(ids.max())} does not fit the shards' {self.dtype.name}")

    def _open_shard(self) -> None:
        if self._files is None:
            files: list = []
            try:
                for k in range(2):
                    files.append(open(self._tmp(k), "wb"))
            except OSError:  # the .bin opened, the .idx did not: leave nothing behind
                for f in files:
                    f.close()
                self._tmp(0).unlink(missing_ok=True)
                raise
            self._files = tuple(files)
            self._hashes = (hashlib.sha256(), hashlib.sha256())
            self._write(1, np.zeros(1, "<i8").tobytes())

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids (1-D, values must fit the shard dtype: ValueError otherwise)."""
        self._check_fits(ids)
        self._open_shard()
        self._write(0, np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._docs += 1
        self._tokens += len(ids)
        self._write(1, np.array([self._tokens], "<i8").tobytes())

    def add_many(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose token ids lie back to back in ``ids`` (1-D, ``lengths.sum()``
        of them; values must fit the shard dtype: ValueError otherwise), all into the open shard.

        The same bytes, counts and checksums as ``add`` of each document in turn, in one write to each
        file instead of two per document: ``add`` costs ~5 us a document, which on short documents
        capped the main process of ``fastpt preprocess`` at ~4 tokenizer workers' output. Like ``add``
        it never closes the shard: a caller that closes shards at ``shard_tokens`` splits its documents
        where ``open_tokens`` reaches it (``close_if_full`` in between)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or (len(lengths) and int(lengths.min()) < 0) or int(lengths.sum()) != len(ids):
            raise ValueError(f"lengths: expected non-negative document lengths summing to len(ids)={len(ids)}, "
                             f"got {len(lengths)} lengths summing to {int(lengths.sum())}")
        if not len(lengths):
            return
        self._check_fits(ids)
        self._open_shard()
        self._write(0, np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        ends = np.cumsum(lengths, dtype=np.int64)
        ends += self._tokens
        self._docs += len(lengths)
        self._tokens = int(ends[-1])
        self._write(1, ends.astype("<i8", copy=False).tobytes())

    def close_if_full(self) -> dict | None:
        return self.close() if self._tokens >= self.shard_tokens else None

    def close(self) -> dict | None:
        if self._files is None:
            return None
        names = self.names(self.index)
        for k, f in enumerate(self._files):
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
            except OSError as exc:
                raise named_os_error(exc, self._tmp(k)) from exc
        for name in names:
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        record = {"bin": names[0], "idx": names[1], "docs": self._docs, "tokens": self._tokens,
                  "bin_sha256": self._hashes[0].hexdigest(), "idx_sha256": self._hashes[1].hexdigest()}
        self.index += 1
        self._files, self._hashes, self._docs, self._tokens = None, None, 0, 0
        return record

    def abort(self) -> None:
        """Drop the open shard (its .tmp files); closed shards stay. Never raises for the open
        files: after a failed write on a full disk, closing flushes the buffered rest and fails
        again, and the .tmp files must go all the same (they hold the space the user needs)."""
        if self._files is not None:
            for f in self._files:
                try:
                    f.close()  # the file is closed even when the final flush raises
                except OSError:
                    pass
            for k in range(2):
                self._tmp(k).unlink(missing_ok=True)
            self._files, self._hashes, self._docs, self._tokens = None, None, 0, 0


def write_shards(out_dir: str | os.PathLike, docs, *, vocab_size: int, shard_tokens: int = 50_000_000,
                 special_tokens: dict[str, int] | None = None, tokenizer_file: str | os.PathLike | None = None,
                 extra: dict | None = None) -> dict:
    """Write already tokenized documents (an iterable of 1-D int sequences) as a shard directory.

    The minimal writer behind ``fastpt preprocess`` for ids produced elsewhere: empty
    documents are skipped; ``tokenizer_file`` is copied in as tokenizer.json; ``extra``
    keys are merged into the manifest. Returns the manifest (also written to manifest.json).
    Raises ValueError for an id outside [0, vocab_size).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    writer, shards = ShardWriter(out, dtype, shard_tokens), []
    for doc in docs:
        ids = np.asarray(doc, dtype=np.int64)
        if len(ids) == 0:
            continue
        if ids.min() < 0 or ids.max() >= vocab_size:
            writer.abort()
            raise ValueError(f"token id {int(ids.min() if ids.min() < 0 else ids.max())} outside [0, {vocab_size})")
        writer.add(ids)
        if (record := writer.close_if_full()) is not None:
            shards.append(record)
    if (record := writer.close()) is not None:
        shards.append(record)
    tokenizer = None
    if tokenizer_file is not None:
        data = Path(tokenizer_file).read_bytes()
        (out / TOKENIZER_FILE).write_bytes(data)
        tokenizer = {"file": TOKENIZER_FILE, "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "version": VERSION, "kind": "text", "complete": True, "dtype": dtype.name,
                "byteorder": "little", "vocab_size": vocab_size, "tokenizer": tokenizer,
                "special_tokens": dict(special_tokens or {}), "shards": shards,
                "num_docs": sum(s["docs"] for s in shards), "num_tokens": sum(s["tokens"] for s in shards),
                **(extra or {})}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """Load and validate ``path/manifest.json`` of a text shard directory.

    Always checks the format, version, completeness, the types of the keys (special token ids
    inside the vocabulary), and that every listed file exists with the size its counts imply;
    with ``verify`` also the sha256 of every shard and of the tokenizer file, and that each .idx
    is a valid offset table (without it ``ShardDataset`` checks each table when it first opens it).
    Raises FileNotFoundError (no manifest), ValueError (not a finished fastpt shard dir),
    CorruptShardError (a file that does not match, a file name that is not one of the directory's
    (``check_file_name``), or a key missing / of the wrong type, named in the message).
    """
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath}: no manifest; is {root} the output of fastpt preprocess?")
    manifest = read_json_object(mpath, CorruptShardError, "; damaged or edited manifest, rerun fastpt preprocess")
    if manifest.get("format") != FORMAT or manifest.get("kind") != "text":
        raise ValueError(f"{mpath}: not a fastpt text shard manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{mpath}: format version {manifest.get('version')}, this fastpt reads {VERSION}")
    if not manifest.get("complete"):
        raise ValueError(f"{mpath}: preprocessing did not finish; rerun the same fastpt preprocess command to resume")
    check_manifest_schema(mpath, manifest)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards = manifest["shards"]
    if sum(s["docs"] for s in shards) != manifest["num_docs"] or \
            sum(s["tokens"] for s in shards) != manifest["num_tokens"]:
        raise CorruptShardError(f"{mpath}: shard counts do not add up to num_docs / num_tokens")
    tok = manifest.get("tokenizer") or {}
    if tok.get("file"):
        verify_file(root, tok["file"], size=None, sha256=tok.get("sha256") if verify else None)
    for s in shards:
        verify_file(root, s["bin"], size=s["tokens"] * dtype.itemsize, sha256=s["bin_sha256"] if verify else None)
        idx_path = verify_file(root, s["idx"], size=(s["docs"] + 1) * 8, sha256=s["idx_sha256"] if verify else None)
        if verify:
            check_offsets(idx_path, np.memmap(idx_path, dtype="<i8", mode="r"), s["tokens"])
    return manifest


def resolve_special(add_special: str | bool, special_ids: dict) -> tuple[list[int], list[int]]:
    """Prefix and suffix ids wrapped around each document.

    ``"cls_sep"``: [CLS] doc [SEP]; ``"eos"``: doc [EOS]; ``"none"``; ``"auto"`` (or True):
    cls_sep when the tokenizer has both, else eos when it has one, else none.
    Raises ValueError for an unknown mode or one whose tokens the tokenizer lacks.
    """
    if add_special is True:
        add_special = "auto"
    elif add_special is False:
        add_special = "none"
    if add_special not in SPECIAL_MODES:
        raise ValueError(f"add_special must be one of {SPECIAL_MODES} or a bool, got {add_special!r}")
    if add_special == "auto":
        add_special = "cls_sep" if "cls" in special_ids and "sep" in special_ids else \
            "eos" if "eos" in special_ids else "none"
    needed = {"cls_sep": ("cls", "sep"), "eos": ("eos",), "none": ()}[add_special]
    missing = [n for n in needed if n not in special_ids]
    if missing:
        raise ValueError(f"add_special={add_special!r}: the tokenizer has no {'/'.join(missing)} token")
    if add_special == "cls_sep":
        return [special_ids["cls"]], [special_ids["sep"]]
    return ([], [special_ids["eos"]]) if add_special == "eos" else ([], [])


def open_shard_limit() -> int:
    """How many shards a ``ShardDataset`` keeps memory-mapped by default: an eighth of the process's
    soft limit on open files (each shard holds two descriptors, so a quarter of them), at least 16 and
    at most 8192 (16384 maps: Linux allows a process 65530 by default); 64 where the limit cannot be
    read. 128 under the usual limit of 1024."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    if soft == resource.RLIM_INFINITY or soft < 0:
        return 8192
    return min(max(soft // 8, 16), 8192)


def map_array(path: str | os.PathLike, dtype: np.dtype) -> np.ndarray:
    """The file ``path`` as a read-only 1-D array of ``dtype``, memory-mapped: a plain ndarray over an
    ``mmap`` (an empty file: an empty array, which ``mmap`` cannot map).

    Not an ``np.memmap``: indexing one goes through its subclass hooks (a scalar read cost ~8 us,
    20 of them per document search in ``ShardDataset.window``), and constructing one costs twice
    this. The map (and the descriptor it holds) is released when the last array using it is gone."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, dtype)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(buf, dtype=dtype, count=size // dtype.itemsize)


def _last_start_at_or_before(idx: np.ndarray, ns: int, rel: int, lo: int | None = None, hi: int | None = None) -> int:
    """The last document ``k`` of a shard whose wrapped start ``idx[k] + k * ns`` (its tokens and the
    ``ns`` separators of each document before it) is at most ``rel`` (>= 0); ``idx``: the offset table.
    ``lo`` / ``hi`` (optional): a document known to qualify / one known to be at least the answer.

    np.searchsorted on the offsets bounds ``k`` from both sides: the answer has ``idx[k] <= rel - lo * ns``
    (``lo`` qualifying, the answer is at least ``lo``), and every ``k <= hi`` with ``idx[k] <= rel - hi * ns``
    qualifies. Searching again from each new bound shrinks the bracket by about ns / (mean document
    length) a side a round (``_NARROW`` rounds: a bracket of 60k short documents closes in two or three);
    a bisection over the starts closes the rest, which is all of it when documents are no longer than
    their separators. O(log docs) either way."""
    starts = idx[:-1]
    if ns == 0:
        return int(starts.searchsorted(rel, side="right")) - 1
    if lo is None:
        top = int(starts.searchsorted(rel, side="right")) - 1
        hi = top if hi is None else min(hi, top)
        lo = max(min(int(starts.searchsorted(rel - hi * ns, side="right")) - 1, hi), 0)  # (past hi: hi qualifies)
    elif hi is None:
        hi = len(starts) - 1
    for _ in range(_NARROW):
        if hi - lo <= 1:  # (a position among a document's closing separators stays at width 1)
            break
        hi = min(hi, int(starts.searchsorted(rel - lo * ns, side="right")) - 1)
        if hi - lo <= 1:
            break
        lo = max(lo, min(int(starts.searchsorted(rel - hi * ns, side="right")) - 1, hi))
    if hi - lo <= 1:
        return hi if hi > lo and int(idx[hi]) + hi * ns <= rel else lo
    return lo + bisect.bisect_right(range(lo, hi + 1), rel, key=lambda k: int(idx[k]) + k * ns) - 1


_NARROW = 4  # searchsorted rounds narrowing a document search before the bisection / 64-ary rounds
_FEW_QUERIES = 8  # below this many queries, one scalar search each beats the vectorised rounds


def _last_starts_at_or_before(idx: np.ndarray, ns: int, rel: np.ndarray, lo: np.ndarray | None = None,
                              hi: np.ndarray | None = None) -> np.ndarray:
    """``_last_start_at_or_before`` of each of ``rel`` (int64 (Q,), each >= 0), optional bounds ``lo`` /
    ``hi`` likewise: int64 (Q,).

    The same searchsorted rounds over all queries at once, then rounds of up to 64-ary search (up to 63
    starts gathered a query, ceil(log64(bracket)) rounds, 3 for a million documents) instead of a Python
    bisection each."""
    if len(rel) < _FEW_QUERIES:
        bounds = [[None] * len(rel) if b is None else b.tolist() for b in (lo, hi)]
        return np.array([_last_start_at_or_before(idx, ns, r, a, b) for r, a, b in zip(rel.tolist(), *bounds)],
                        dtype=np.int64)
    starts = idx[:-1]
    if ns == 0:
        return starts.searchsorted(rel, side="right") - 1
    if lo is None:
        top = starts.searchsorted(rel, side="right") - 1
        hi = top if hi is None else np.minimum(hi, top)
        lo = np.maximum(np.minimum(starts.searchsorted(rel - hi * ns, side="right") - 1, hi), 0)
    elif hi is None:
        hi = np.full(len(rel), len(starts) - 1)
    for _ in range(_NARROW):
        if (hi - lo <= 1).all():
            break
        hi = np.minimum(hi, starts.searchsorted(rel - lo * ns, side="right") - 1)
        if (hi - lo <= 1).all():
            break
        lo = np.maximum(lo, np.minimum(starts.searchsorted(rel - hi * ns, side="right") - 1, hi))
    while (span := hi - lo).any():
        n = min(int(span.max()), 63)
        step = (span + n - 1) // n  # n candidates lo + step * j cover (lo, hi]
        cand = lo[:, None] + step[:, None] * np.arange(1, n + 1)
        inside = cand <= hi[:, None]
        cand = np.minimum(cand, hi[:, None])
        ok = (idx[cand] + cand * ns <= rel[:, None]) & inside  # a prefix of each row: the starts rise
        lo = lo + step * ok.sum(1)
        hi = np.minimum(hi, lo + np.maximum(step, 1) - 1)  # the next candidate failed (or lies past hi)
    return lo


class ShardDataset:
    """Training samples cut at run time from a shard directory.

    mode="pack": documents (each wrapped in ``add_special`` separators) are concatenated in
    corpus order into one stream, cut into ``seq_len`` windows (the last partial window is
    dropped); a sample is ``{"input_ids": (seq_len,) int64, "cu_seqlens": (n+1,) int32}``
    where cu_seqlens marks the document pieces inside the window (0 first, seq_len last).
    mode="doc": one document per sample, ``[prefix] ids[: seq_len - specials] [suffix]``
    right-padded with the pad id (0 without one): ``{"input_ids": (seq_len,) int64,
    "attention_mask": (seq_len,) int64}``.

    Order: one stream of epochs; epoch ``e`` visits all samples in
    ``numpy.random.default_rng([seed, e])`` permutation order (corpus order with ``shuffle=False``).
    Ranks interleave in that stream: rank r's k-th sample is global position ``k * world_size + r``
    (position ``g % samples`` of epoch ``g // samples``), so the ranks' batches at every step
    together are the next world_size * batch positions, the samples one process sees with the
    combined batch, in every epoch. An epoch is ``samples`` positions whatever the rank count:
    each rank gets ceil(samples / world_size) or one fewer of them (``len(self)`` is the
    former). torch's DistributedSampler instead pads each rank's epoch to ceil(samples /
    world_size) by wrapping around: with samples % world_size != 0 the ranks' order then drifts
    from one process's from the second epoch on.
    Position: ``consumed`` samples of this rank; ``state_dict()`` / ``load_state_dict()``
    save and restore it. Iterate in the main process (a sample is a copy of a few memmap slices;
    DataLoader workers would each hold their own position).
    Files: the shards are memory-mapped on first use, at most ``max_open_shards`` at a time (two
    file descriptors each; by default ``open_shard_limit()``: 128 under the usual limit of 1024
    descriptors), the least recently used dropped first (see ``_shard``).

    Raises FileNotFoundError / ValueError / CorruptShardError from ``read_manifest`` on
    open, ValueError for a seq_len too small or a corpus with no full window, TypeError /
    ValueError naming seq_len, seed, rank, world_size or num_epochs when it is not an int in range.
    """

    max_open_shards: int | None = None  # shards kept mapped (None: open_shard_limit() when first needed)

    def __init__(self, path: str | os.PathLike, seq_len: int, *, mode: str = "pack", seed: int = 0,
                 rank: int = 0, world_size: int = 1, add_special: str | bool = "auto", shuffle: bool = True,
                 num_epochs: int | None = None, verify: bool = True):
        if mode not in ("pack", "doc"):
            raise ValueError(f"mode must be 'pack' or 'doc', got {mode!r}")
        seq_len, seed = check_int("seq_len", seq_len, 1), check_int("seed", seed, 0)
        world_size, rank = check_int("world_size", world_size), check_int("rank", rank)  # range: below
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if num_epochs is not None:
            num_epochs = check_int("num_epochs", num_epochs, 1)
        self.path, self.seq_len, self.mode, self.seed = Path(path), seq_len, mode, seed
        self.rank, self.world_size, self.shuffle, self.num_epochs = rank, world_size, shuffle, num_epochs
        self.manifest = read_manifest(self.path, verify=verify)
        self.special_ids = {k: int(v) for k, v in self.manifest.get("special_tokens", {}).items()}
        self._verified = verify  # read_manifest checked every .idx table; else _shard checks each on first use
        self.prefix, self.suffix = resolve_special(add_special, self.special_ids)
        self.pad_id = self.special_ids.get("pad", 0)
        n_special = len(self.prefix) + len(self.suffix)
        if self.seq_len < (n_special + 1 if mode == "doc" else 1):
            raise ValueError(f"seq_len={seq_len} leaves no room for a token next to {n_special} special tokens")
        self._dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = self.manifest["shards"]
        # (tokens, offsets) of the shards used last, least recently used first (see _shard)
        self._maps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._checked: set[int] = set()  # shards whose .idx table _shard has checked (without verify)
        self._doc_start = np.cumsum([0] + [s["docs"] for s in shards])  # global doc index of shard starts
        # stream position of each shard's first document (tokens + separators before it)
        self._stream_start = np.cumsum([0] + [s["tokens"] + s["docs"] * n_special for s in shards])
        self._n_special = n_special
        self.num_docs = int(self._doc_start[-1])
        if mode == "pack":
            self.num_samples = int(self._stream_start[-1]) // self.seq_len
            if self.num_samples == 0:
                raise ValueError(f"{self.path}: {int(self._stream_start[-1])} tokens with separators, "
                                 f"fewer than one window of seq_len={seq_len}")
        else:
            self.num_samples = self.num_docs
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    def mean_sample_tokens(self) -> float:
        """Tokens (special tokens included) of an average sample: ``seq_len`` when packing; with
        ``mode="doc"`` the mean over documents of ``min(length + specials, seq_len)`` (one pass over the
        shards' offset tables). What a run that stops at a token count takes per row."""
        if self.mode == "pack":
            return float(self.seq_len)
        total = 0
        for shard in range(len(self.manifest["shards"])):
            lengths = np.diff(np.asarray(self._shard(shard)[1], dtype=np.int64)) + self._n_special
            total += int(np.minimum(lengths, self.seq_len).sum())
        return total / max(self.num_docs, 1)

    # -- order and position ---------------------------------------------------------------
    def __len__(self) -> int:
        """Samples per epoch on this rank, at most: ceil(num_samples / world_size)."""
        return -(-self.num_samples // self.world_size)

    def _limit(self, take: int) -> bool:
        """Whether the next ``take`` samples of this rank lie within ``num_epochs`` (always, without it). The
        same answer on every rank: a round of ``take`` samples on each rank is kept only when all of it
        fits, so every rank gets the same number of samples, the last global positions that do not fill a
        round dropped (DistributedSampler's drop_last)."""
        return self.num_epochs is None or \
            (self.consumed + take) * self.world_size <= self.num_epochs * self.num_samples

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def sample_index(self, k: int) -> int:
        """The window (pack) or document (doc) index of this rank's k-th sample (k counts across epochs):
        global position ``k * world_size + rank`` of the stream of epochs."""
        epoch, pos = divmod(k * self.world_size + self.rank, self.num_samples)
        order = self._order(epoch)
        return int(order[pos]) if order is not None else pos

    def sample_indices(self, k: int, n: int) -> np.ndarray:
        """``sample_index`` of this rank's samples ``k .. k + n - 1``: int64 (n,), one permutation lookup per
        epoch the range touches instead of one Python call per sample."""
        epoch, pos = np.divmod(np.arange(k, k + n, dtype=np.int64) * self.world_size + self.rank, self.num_samples)
        if not self.shuffle or n == 0:
            return pos
        if epoch[0] == epoch[-1]:
            return self._order(int(epoch[0]))[pos]
        out = np.empty(n, dtype=np.int64)
        for e in range(int(epoch[0]), int(epoch[-1]) + 1):  # ascending, as sample_index walks them
            where = epoch == e
            out[where] = self._order(e)[pos[where]]
        return out

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """This rank's k-th sample (does not move the position)."""
        i = self.sample_index(k)
        return self.window(i) if self.mode == "pack" else self.document(i)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Samples from the current position on, advancing it; endless unless num_epochs was given (then
        floor(num_epochs * num_samples / world_size) samples in all on every rank)."""
        while self._limit(1):
            out = self.sample(self.consumed)
            self.consumed += 1
            yield out

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """``collate`` of each next ``batch_size`` samples (see ``collate`` for the keys), assembled a batch
        at a time by ``batch``.

        Raises TypeError / ValueError (now, not on the first ``next``) unless batch_size >= 1.
        """
        return self._batches(check_int("batch_size", batch_size, 1))

    def _batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        while self._limit(batch_size):
            out = self.batch(self.sample_indices(self.consumed, batch_size))
            self.consumed += batch_size
            yield out

    def _fingerprint(self) -> str:
        return hashlib.sha256("".join(s["bin_sha256"] for s in self.manifest["shards"]).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """The position plus what it is only valid for (JSON-serialisable)."""
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len, "mode": self.mode,
                "world_size": self.world_size, "rank": self.rank, "shuffle": self.shuffle,
                "special": [self.prefix, self.suffix], "data": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by ``state_dict``; raises ValueError if it was saved for other
        data, seq_len, mode, seed, separators or world size (the samples would differ), TypeError /
        ValueError for a state that is not a dict or whose ``consumed`` is not a non-negative int."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict: state must be a dict from state_dict(), got {type(state).__name__}")
        if "consumed" not in state:
            raise ValueError("load_state_dict: state has no 'consumed' (the position); not from state_dict()")
        consumed = check_int("load_state_dict: state['consumed']", state["consumed"], 0)
        mine = self.state_dict()
        for key in ("seed", "seq_len", "mode", "world_size", "shuffle", "special", "data"):
            if json.dumps(state.get(key)) != json.dumps(mine[key]):  # JSON: tuples and lists compare equal
                raise ValueError(f"load_state_dict: saved {key}={state.get(key)!r}, this dataset has {mine[key]!r}")
        self.consumed = consumed

    # -- sample assembly ------------------------------------------------------------------
    def _locate(self, doc: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._doc_start, doc, side="right")) - 1
        return shard, doc - int(self._doc_start[shard])

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) of one shard, memory-mapped (``map_array``).

        At most ``max_open_shards`` shards stay mapped, the least recently used one dropped first: each
        map holds a file descriptor, and a shuffled run touches every shard, so keeping them all failed
        with "Too many open files" at ~510 shards under the usual limit of 1024 (hours into a 25B-token
        corpus). A dropped map closes once nothing uses it; what ``window`` / ``document`` / ``batch`` return
        are copies, never views of a map."""
        maps = self._maps
        if shard in maps:
            maps.move_to_end(shard)
            return maps[shard]
        if self.max_open_shards is None:
            self.max_open_shards = open_shard_limit()
        s = self.manifest["shards"][shard]
        offsets = map_array(self.path / s["idx"], np.dtype("<i8"))
        if not self._verified and shard not in self._checked:  # O(docs of the shard), once
            check_offsets(self.path / s["idx"], offsets, s["tokens"])
            self._checked.add(shard)
        while len(maps) >= max(self.max_open_shards, 1):
            maps.popitem(last=False)
        maps[shard] = (map_array(self.path / s["bin"], self._dtype), offsets)
        return maps[shard]

    def _doc_tokens(self, shard: int, local: int) -> np.ndarray:
        tokens, idx = self._shard(shard)
        return tokens[int(idx[local]):int(idx[local + 1])]

    def _piece(self, ids: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Stream positions [start, stop) of one wrapped document ``prefix + ids + suffix`` (a copy)."""
        p, n = len(self.prefix), len(ids)
        parts = []
        if start < p:
            parts.append(np.asarray(self.prefix[start:min(stop, p)], dtype=np.int64))
        if stop > p and start < p + n:
            parts.append(ids[max(start - p, 0):min(stop - p, n)].astype(np.int64))
        if stop > p + n:
            parts.append(np.asarray(self.suffix[max(start - p - n, 0):stop - p - n], dtype=np.int64))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def window(self, i: int) -> dict[str, torch.Tensor]:
        """Packed window ``i``: stream positions [i * seq_len, (i + 1) * seq_len) (copied out of the shards).

        Raises IndexError unless 0 <= i < num_samples."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"window {i} outside [0, num_samples={self.num_samples})")
        L, ns = self.seq_len, self._n_special
        pos = i * L
        shard = int(self._stream_start.searchsorted(pos, side="right")) - 1
        tokens, idx = self._shard(shard)
        rel = pos - int(self._stream_start[shard])
        local = _last_start_at_or_before(idx, ns, rel)
        offset = rel - (int(idx[local]) + local * ns)
        out = np.empty(L, dtype=np.int64)
        cu, filled = [0], 0
        while filled < L:
            start, stop = int(idx[local]), int(idx[local + 1])
            take = min(stop - start + ns - offset, L - filled)
            if take > 0:  # (an empty document without separators adds nothing)
                if ns:
                    out[filled:filled + take] = self._piece(tokens[start:stop], offset, offset + take)
                else:
                    out[filled:filled + take] = tokens[start + offset:start + offset + take]
                filled += take
                cu.append(filled)
            offset, local = 0, local + 1
            while filled < L and local == len(idx) - 1:  # the shard's last document: on to the next shard
                shard, local = shard + 1, 0
                tokens, idx = self._shard(shard)
        return {"input_ids": torch.from_numpy(out), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}

    def document(self, d: int) -> dict[str, torch.Tensor]:
        """Document ``d`` (global index) as one padded row. Raises IndexError unless 0 <= d < num_docs."""
        if not 0 <= d < self.num_docs:
            raise IndexError(f"document {d} outside [0, num_docs={self.num_docs})")
        shard, local = self._locate(d)
        ids = self._doc_tokens(shard, local)  # a view of the map: copied below (astype)
        body = ids[: self.seq_len - self._n_special].astype(np.int64)
        row = np.concatenate([np.asarray(self.prefix, np.int64), body, np.asarray(self.suffix, np.int64)])
        out = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        out[: len(row)] = row
        mask = np.zeros(self.seq_len, dtype=np.int64)
        mask[: len(row)] = 1
        return {"input_ids": torch.from_numpy(out), "attention_mask": torch.from_numpy(mask)}

    # -- batch assembly: the samples of a batch in a few numpy calls --------------------------------------
    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor | int]:
        """``collate([self.window(i) for i in indices])`` (pack) or ``collate([self.document(i) ...])`` (doc):
        the same keys, values and dtypes, assembled for the whole batch at once.

        ``window`` + ``collate`` spend Python calls per sample and per document piece (a bisection with a
        Python key, a slice and a concatenate for each piece: ~40 us of CPU a 128-token window of short
        documents), holding the GIL for all of it; on a GPU the batches are made on a prefetch thread
        beside the one launching kernels, so that time slows the training step. Here the work is a fixed
        number of numpy calls per batch plus a few per shard the batch touches (the document searches and
        the gathers from its maps, which ``_shard`` keeps mapped as before; with fewer than
        ``_FEW_QUERIES`` samples in a shard, scalar searches and slices, cheaper than numpy calls on
        a few elements): 4-10x less time on one shard, 2.5-6x with a shard per sample.
        ``window`` / ``document`` / ``collate`` stay the per-sample reference the tests compare this with.

        ``indices``: window (pack) or document (doc) indices, 1-D, at least one. Raises IndexError naming the
        first one outside [0, num_samples), ValueError for an empty or non-1-D ``indices``.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not (idx.dtype.kind in "iu"):
            raise ValueError(f"indices: expected a non-empty 1-D sequence of integers, got shape {idx.shape} "
                             f"of {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        bad = (idx < 0) | (idx >= self.num_samples)
        if bad.any():
            what = "window" if self.mode == "pack" else "document"
            raise IndexError(f"{what} {int(idx[bad][0])} outside [0, num_samples={self.num_samples})")
        return self._pack_batch(idx) if self.mode == "pack" else self._doc_batch(idx)

    @staticmethod
    def _groups(shard_of: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
        """(shard, rows of ``shard_of`` in that shard) for each shard in ``shard_of``, ascending."""
        if (shard_of == shard_of[0]).all():
            return [(int(shard_of[0]), slice(None))]
        order = np.argsort(shard_of, kind="stable")
        sorted_ = shard_of[order]
        cuts = [0, *(np.flatnonzero(sorted_[1:] != sorted_[:-1]) + 1).tolist(), len(order)]
        return [(int(sorted_[a]), order[a:b]) for a, b in itertools.pairwise(cuts)]

    def _pack_batch(self, windows: np.ndarray) -> dict[str, torch.Tensor | int]:
        """``batch`` in pack mode.

        A window [i * L, (i + 1) * L) of the stream is cut at shard boundaries into segments, in output
        order; a segment covers the wrapped documents k0..k1 of one shard (the searches of its first and
        last position, run per shard over all of its segments). The pieces ``window`` emits are the
        (segment, document) pairs with at least one position there, in the same order, so ``cu_seqlens``
        is the running sum of their lengths; every position reads the shard's token at its offset inside
        its document (one gather per run of segments in one shard), then the separators are written over
        the positions that hold one (a handful per piece)."""
        L, ns, p = self.seq_len, self._n_special, len(self.prefix)
        ss = self._stream_start
        B = len(windows)
        first = windows * L
        s_lo = ss.searchsorted(first, side="right") - 1
        s_hi = ss.searchsorted(first + (L - 1), side="right") - 1
        if (s_lo == s_hi).all():  # no window crosses a shard boundary
            seg_win, seg_shard = np.arange(B), s_lo
        else:
            per = s_hi - s_lo + 1
            seg_win = np.repeat(np.arange(B), per)
            seg_shard = np.arange(len(seg_win)) - np.repeat(np.cumsum(per) - per, per) + s_lo[seg_win]
        base = ss[seg_shard]
        r_lo = np.maximum(first[seg_win], base) - base  # [r_lo, r_hi): the segment in its shard's stream
        r_hi = np.minimum(first[seg_win] + L, ss[seg_shard + 1]) - base
        if not (keep := r_hi > r_lo).all():  # a shard with an empty stream inside a window
            seg_shard, r_lo, r_hi = seg_shard[keep], r_lo[keep], r_hi[keep]
        nseg = len(seg_shard)
        k0, k1 = np.empty(nseg, np.int64), np.empty(nseg, np.int64)
        rows = []  # (segments, idx[k0 .. k1 + 1] of each) of the shards searched together
        one, one_k0, one_k1, one_rows = [], [], [], []  # the same of the segments searched one by one
        r_lo_list, r_hi_list = r_lo.tolist(), r_hi.tolist()
        for shard, sel in self._groups(seg_shard):
            _, idx = self._shard(shard)
            if not isinstance(sel, slice) and len(sel) < _FEW_QUERIES:  # over many shards: Python ints
                for i in sel.tolist():
                    lo, last = r_lo_list[i], r_hi_list[i] - 1
                    a = _last_start_at_or_before(idx, ns, lo)
                    # a segment of n positions holds at most n wrapped documents when each has a separator
                    b = _last_start_at_or_before(idx, ns, last, a, a + last - lo if ns else None)
                    # a copy: a view would keep the map (and its descriptor) open past _shard's limit
                    one.append(i), one_k0.append(a), one_k1.append(b), one_rows.append(idx[a:b + 2].copy())
                continue
            lo, last = r_lo[sel], r_hi[sel] - 1
            a = _last_starts_at_or_before(idx, ns, lo)
            b = _last_starts_at_or_before(idx, ns, last, a, a + (last - lo) if ns else None)
            k0[sel], k1[sel] = a, b
            rows.append((sel, idx[np.minimum(a[:, None] + np.arange(int((b - a).max()) + 2), (b + 1)[:, None])]))
        if one:
            k0[one], k1[one] = one_k0, one_k1
        width = int((k1 - k0).max()) + 2
        off = np.empty((nseg, width), np.int64)
        for sel, r in rows:  # each segment's offsets, padded by repeating its last
            off[sel, :r.shape[1]] = r
            off[sel, r.shape[1]:] = r[:, -1:]
        if one:
            count = np.asarray(one_k1) - np.asarray(one_k0) + 2
            ends = np.cumsum(count)
            off[one] = np.concatenate(one_rows)[np.minimum((ends - count)[:, None] + np.arange(width), (ends - 1)[:, None])]
        # documents k0 + j of each segment: wrapped start and end in the shard's stream, the part in the segment
        j = np.arange(width - 1)
        k = k0[:, None] + j
        doc_lo, doc_hi = off[:, :-1], off[:, 1:]
        w_lo = doc_lo + k * ns
        start = np.maximum(w_lo, r_lo[:, None])
        length = np.minimum(doc_hi + (k + 1) * ns, r_hi[:, None]) - start
        piece = (j <= (k1 - k0)[:, None]) & (length > 0)  # an empty document without separators: no piece
        lengths = length[piece]
        cu = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=cu[1:])
        inside = (start - w_lo)[piece]  # wrapped-document offset of each piece's first position
        pos = np.arange(B * L)
        position_ids = pos - np.repeat(cu[:-1], lengths)
        # the shard token at each position's offset inside its document (a separator's: a neighbour, clipped)
        token = pos + np.repeat(doc_lo[piece] + inside - p - cu[:-1], lengths)
        run = np.flatnonzero(np.append(seg_shard[1:] != seg_shard[:-1], True))  # runs of segments in one shard
        ends = np.cumsum(r_hi - r_lo)[run].tolist()
        spans = sorted(zip(seg_shard[run].tolist(), [0] + ends[:-1], ends), key=lambda r: -r[0])
        ids = np.empty(B * L, np.int64)
        # shard by shard, the last searched first: past max_open_shards the searches above evicted the first ones
        # from the LRU, so the shards still mapped are used before any is mapped again (each at most twice a batch)
        tokens, current = None, None
        for shard, a, b in spans:
            if shard != current:
                (tokens, _), current = self._shard(shard), shard
            if len(tokens):  # (a shard of empty documents only: all its positions are separators)
                ids[a:b] = tokens.take(token[a:b], mode="clip")
        if ns:
            doc_len = (doc_hi - doc_lo)[piece]
            for t, sid in enumerate(self.prefix + self.suffix):  # wrapped offset t, or doc_len + t past the ids
                at = t if t < p else doc_len + t
                hit = (at >= inside) & (at < inside + lengths)
                ids[(cu[:-1] + (at - inside))[hit]] = sid
        return {"input_ids": torch.from_numpy(ids.reshape(B, L)), "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
                "max_seqlen": int(lengths.max()), "position_ids": torch.from_numpy(position_ids.reshape(B, L))}

    def _doc_batch(self, docs: np.ndarray) -> dict[str, torch.Tensor]:
        """``batch`` in doc mode: each document's start and length from its shard's offsets and its row's
        tokens gathered (per shard), then the separators and padding set around them."""
        L, ns, p = self.seq_len, self._n_special, len(self.prefix)
        B = len(docs)
        shard_of = self._doc_start.searchsorted(docs, side="right") - 1
        local = docs - self._doc_start[shard_of]
        j = np.arange(L)
        ids = np.empty((B, L), np.int64)
        length = np.empty(B, np.int64)
        for shard, sel in self._groups(shard_of):
            tokens, idx = self._shard(shard)
            if not isinstance(sel, slice) and len(sel) < _FEW_QUERIES:  # over many shards: a slice each
                for i in sel.tolist():
                    start = int(idx[local[i]])
                    n = length[i] = min(int(idx[local[i] + 1]) - start, L - ns)
                    ids[i, p:p + n] = tokens[start:start + n]
                continue
            start = idx[local[sel]]
            length[sel] = np.minimum(idx[local[sel] + 1] - start, L - ns)
            if len(tokens):  # positions past a document's end read its neighbours (clipped): overwritten below
                ids[sel] = tokens.take(start[:, None] + (j - p), mode="clip")
        ids[(j < p) | (j >= (p + length)[:, None])] = self.pad_id
        if p:
            ids[:, :p] = self.prefix
        for t, sid in enumerate(self.suffix):
            ids[np.arange(B), p + length + t] = sid
        mask = (j < (length + ns)[:, None]).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """Stack samples of one ``ShardDataset`` mode into a batch.

    doc samples -> ``input_ids``, ``attention_mask`` (B, S) int64.
    pack samples -> ``input_ids`` (B, S) int64; ``cu_seqlens`` (N+1,) int32 over the B*S
    flattened tokens (row b's boundaries shifted by b*S; what the packed attention and
    ``TextEncoder(cu_seqlens=...)`` take); ``max_seqlen`` (int, longest piece);
    ``position_ids`` (B, S) int64 restarting at 0 at each document piece (a model whose positions start
    elsewhere, RoBERTa's ``position_offset`` 2, adds its offset: pass ``cu_seqlens`` without them and
    its embedding does).
    """
    if not samples:
        raise ValueError("collate: no samples")
    ids = torch.stack([s["input_ids"] for s in samples])
    if "attention_mask" in samples[0]:
        return {"input_ids": ids, "attention_mask": torch.stack([s["attention_mask"] for s in samples])}
    B, S = ids.shape
    cus = [s["cu_seqlens"].long() + b * S for b, s in enumerate(samples)]
    cu = torch.cat([cus[0]] + [c[1:] for c in cus[1:]])
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    position_ids = (torch.arange(B * S) - starts).view(B, S)
    return {"input_ids": ids, "cu_seqlens": cu.to(torch.int32), "max_seqlen": int(lengths.max()),
            "position_ids": position_ids}
