"""``fastpt preprocess``: a text corpus -> tokenized, packed, memory-mapped shards.

Inputs: text files (one document per line, blank-line separated documents, or one per
file), JSONL with a text field, folders of such files (recursive, sorted, dot-files
skipped, links to files and folders followed), or a built-in corpus (``--corpus
python-docs``). gzip, bzip2 and xz files are decompressed on the fly, recognised by their
first bytes whatever their name; a zstd file is refused, naming it (decompress it first:
the standard library has no zstd). Text files take universal newlines: ``\\n``, ``\\r\\n`` and a
lone ``\\r`` (old Mac OS) each end a line, as in Python's ``open`` and the HF datasets text
loader (a whole-file document has each written as ``\\n``); JSONL lines end at ``\\n``.
The tokenizer is loaded (a ``tokenizers`` JSON file or a HF model directory) or trained on
the corpus (WordPiece / byte-level BPE) and saved beside the shards; the format is in
``shards.py``.

The pipeline streams: the main process reads records and hands chunks of about 1 MiB to
``--workers`` tokenizer processes (at most two chunks per worker in flight), then writes
the ids in input order, so memory stays bounded and the output does not depend on the
worker count. A shard closes at the first document boundary after ``--shard-tokens``
tokens; after each one the manifest (``complete: false``) records the shards, the input
position after the shard's last record and the counts so far, written atomically. Running
the same command again after an interruption continues from there and produces
byte-identical shards; a finished directory is left as it is. Before resuming (or reporting
a finished directory) the manifest's fields, the resume position and the committed shards'
sizes are checked: damage is an error naming the file (``--overwrite`` rebuilds). While a run
writes, it holds ``LOCK_FILE`` in the output directory (a ``flock``; the file holds its pid):
a second run into the same directory refuses instead of deleting the first one's open files.

Bad input is counted, never fatal (``stats.bad`` in the manifest, the summary line):
``invalid_utf8`` (decoded with U+FFFD replacement and kept, or skipped with
``--bad-utf8 skip``), ``empty`` (blank lines in line mode, blank texts), ``giant``
(documents over ``--max-chars`` characters: split into pieces of at most that many,
cut at whitespace where possible, or skipped with ``--giant skip``), ``oversize`` (a
record over the reader's hard limit of max(64 MiB, 4 * max_chars) bytes: skipped
without being held in memory), ``invalid_json`` / ``missing_text`` (JSONL lines), and
``no_tokens`` (texts the tokenizer maps to nothing). Beside them, ``stats.unk_tokens`` counts the
tokenizer's unknown token (``[UNK]``: characters its vocabulary lacks, or a WordPiece word longer than its
``max_input_chars_per_word``) in the shards; the summary line gives its share, and a note warns when it is
over ``UNK_WARN_SHARE`` of the tokens. A compressed input that does not decompress
(truncated, damaged, a ``.gz`` that is not gzip) is an error naming it, as an unreadable file is.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .._lock import PREPROCESS_LOCK, close_inherited, lock_preprocess_output, unlock_dir
from .shards import FORMAT, MANIFEST, TOKENIZER_FILE, VERSION, CorruptShardError, ShardWriter, dtype_for_vocab, \
    nearest_existing, read_json_object, sha256_file, write_json_atomic

BAD_KINDS = ("invalid_utf8", "empty", "giant", "oversize", "invalid_json", "missing_text", "no_tokens")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
MAX_CHARS_LIMIT = 1 << 30  # --max-chars: the reader holds up to 4 bytes per character of one record
# The files a run writes in its output directory (and their .tmp forms): all it ever deletes there.
_OURS = re.compile(r"(shard-\d+\.(bin|idx)|manifest\.json|tokenizer\.json)(\.tmp)?")
_SURROGATE = re.compile("[\ud800-\udfff]")
CHUNK_BYTES, CHUNK_RECORDS = 1 << 20, 2048
ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call (see _encode)
READ_BLOCK = 1 << 20  # bytes per read of a text / JSONL file (see _lines)
LOCK_FILE = PREPROCESS_LOCK  # in the output directory while a run writes there (fastpt._lock)
UNK_WARN_SHARE = 0.01  # the share of unknown tokens over which the run warns (see _unk_warning)


def _python_docs(stdlib: bool, heldout: bool = False) -> Callable[[], list[str]]:
    def load() -> list[str]:
        from .corpus import heldout_packages, python_docs_corpus

        return python_docs_corpus(include_stdlib=stdlib, exclude_packages=heldout_packages() if heldout else ())
    return load


# the built-in corpora: the running Python's own documentation (no download); "python-docs-heldout" leaves
# out the modules the built-in eval task python-docs-topics is made of (what the demo pre-trains on)
CORPORA = {"python-docs": _python_docs(True), "python-docs-heldout": _python_docs(True, heldout=True),
           "python-topics": _python_docs(False)}


@dataclass(frozen=True)
class Source:
    """One input: a file (``fmt`` "text" or "jsonl") or a built-in corpus (``fmt`` "corpus")."""
    path: str
    fmt: str
    size: int  # bytes on disk; documents for a corpus
    mtime_ns: int = 0
    compression: str | None = None  # "gzip", "bz2" or "xz" (``sniff_compression``); None: read as it is

    def fingerprint(self) -> list:
        """What identifies the input for resuming: its path, format, size and mtime, and its compression
        where that is not what the name alone used to give (gzip for a ``.gz``, else none): a run over a
        ``.xz`` that an older fastpt tokenized raw is then not resumed, nor reported complete."""
        legacy = "gzip" if _is_gz(self.path) else None
        return [self.path, self.fmt, self.size, self.mtime_ns] + ([self.compression] if self.compression != legacy
                                                                   else [])


def _is_gz(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gz")


COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
_BZ2_MAGIC = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")  # a block, or the end of an empty stream
_ZSTD_MAGIC = re.compile(rb"\x28\xb5\x2f\xfd|[\x50-\x5f]\x2a\x4d\x18")  # a frame, or a skippable frame


def sniff_compression(path: str | os.PathLike) -> str | None:
    """The compression of the file ``path`` from its first bytes, whatever its name: "gzip" (1f 8b),
    "bz2" (BZh), "xz" (fd 37 7a 58 5a 00), "zstd" (28 b5 2f fd); else what its suffix claims
    (``.gz``, ``.bz2``, ``.xz``: its decompressor then reports the damage), else None. A ``.zst`` whose
    bytes are no zstd frame (there is no decompressor here to say so) raises ValueError naming it.
    Text does not start with these bytes: gzip's, xz's and zstd's frame magic are not UTF-8, bzip2's
    "BZh" is followed by a level digit and a 48-bit block magic, zstd's skippable frames ("P*M" and
    the like) by a control character. Raises OSError naming the file when it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(10)
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if _BZ2_MAGIC.match(head):
        return "bz2"
    if _ZSTD_MAGIC.match(head):
        return "zstd"
    name = str(path).lower()
    kind = next((kind for suffix, kind in COMPRESSED_SUFFIXES.items() if name.endswith(suffix)), None)
    if kind == "zstd":
        raise ValueError(f"input {path}: named .zst but not zstd data (its first bytes are no zstd frame); "
                         f"rename it if it is text")
    return kind


def _folder_files(root: Path, skip: Path | None) -> list[Path]:
    """The files under ``root``, recursively, sorted by their path relative to it.

    Dot-files and dot-folders are skipped, and so is anything that resolves into ``skip``. Links
    are followed, to files and to folders alike (``Path.rglob`` before Python 3.13 does not enter a
    linked folder, which dropped its files without a word). Each folder is read once, however
    often it is reached (a loop such as ``sub/up -> ..``, two links to one folder): at its own
    path when that lies in the tree, else through the first link met (links are entered after
    the tree, breadth first in name order). Folders that cannot be listed are skipped, as
    ``rglob`` does.
    """
    seen: set[Path] = set()
    files: list[Path] = []
    tree, links = deque([root]), deque()
    while tree or links:
        folder = tree.popleft() if tree else links.popleft()
        real = folder.resolve()
        if real in seen or (skip is not None and real.is_relative_to(skip)):
            continue
        seen.add(real)
        try:
            entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
        except PermissionError:
            continue
        for e in entries:
            if e.is_dir():
                (links if e.is_symlink() else tree).append(e)
            elif e.is_file() and (skip is None or not e.resolve().is_relative_to(skip)):
                files.append(e)
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def find_inputs(paths: Sequence[str | os.PathLike], fmt: str = "auto",
                exclude: str | os.PathLike | None = None) -> list[Source]:
    """Files named by ``paths``, folders expanded recursively in sorted order (dot-files and the
    folder ``exclude``, the run's output directory, skipped; linked files and folders followed, each
    folder read once: see ``_folder_files``).

    ``fmt`` "auto" reads ``.jsonl/.json/.ndjson`` (optionally ``.gz``, ``.bz2``, ``.xz``; any letter case)
    as JSONL, the rest as text. Each file's compression is read from its first bytes
    (``sniff_compression``): gzip, bzip2 and xz are decompressed with the standard library.
    Raises FileNotFoundError for a missing path or when no file is found, ValueError naming a
    zstd-compressed file (decompress it first), OSError naming a file that cannot be read.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(_folder_files(p, skip))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"no input files in {', '.join(map(str, paths))}")
    out = []
    for f in files:
        name = f.name.lower()
        name = next((name.removesuffix(s) for s in COMPRESSED_SUFFIXES if name.endswith(s)), name)
        kind = fmt if fmt != "auto" else "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"
        compression = sniff_compression(f)
        if compression == "zstd":
            raise ValueError(f"input {f}: zstd-compressed, which fastpt preprocess does not read (the standard "
                             f"library has no zstd); decompress it first (zstd -d {f.name}) and pass the result")
        st = f.stat()
        out.append(Source(str(f.resolve()), kind, st.st_size, st.st_mtime_ns, compression))
    return out


# -- reading: records with resume positions -------------------------------------------------
_DECOMPRESS = {"gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"), "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}
_COMPRESSION_NAMES = {"gzip": "gzip", "bz2": "bzip2", "xz": "xz"}


@contextmanager
def _open(src: Source):
    """``(reader, raw)``: the file's (decompressed) bytes, and the file on disk under a decompressor (None
    when ``src`` is not compressed). Offsets and seeks are in decompressed bytes; progress counts the
    bytes read from disk (``_disk_pos``)."""
    with open(src.path, "rb") as raw:
        if src.compression is None:
            yield raw, None
        else:
            with _DECOMPRESS[src.compression](raw) as f:
                yield f, raw


def _disk_pos(raw, off: int) -> int:
    return raw.tell() if raw is not None else off


def _lines(f, off: int, cap: int, cr: bool = True, block: int | None = None) -> Iterator[tuple[bytes | None, int]]:
    """(line without its line break, or None for a line over ``cap`` bytes; the offset after the break).

    ``cr`` (text files): ``\\n``, ``\\r\\n`` and a lone ``\\r`` each end a line (universal newlines, as
    Python's ``open`` and HF datasets' text loader read them; old Mac OS files end lines with ``\\r``
    only). Without it (JSONL) only ``\\n`` does, and trailing ``\\r`` are dropped: a raw ``\\r`` in a
    JSON text is whitespace between tokens. A ``\\r\\n`` split across two reads is one break, so an
    offset never falls between its two bytes and a resumed run reads exactly the same lines.
    Reads ``block`` (default ``READ_BLOCK``) bytes at a time; memory: a line of up to ``cap`` bytes
    plus a block.
    """
    block = block or READ_BLOCK
    buf, pos, base, eof = b"", 0, off, False  # base: the file offset of buf[0]
    parts, size, over = [], 0, False  # the current line's bytes before buf[pos:] (dropped once over cap)
    next_cr = -1  # the first \r in buf at or after pos (len(buf): none); -1: not searched since buf changed
    while True:
        start = buf.find(b"\n", pos)  # bytes.find: a regex search made the reader 5x slower
        end = start + 1
        if cr:
            if next_cr < pos:
                next_cr = buf.find(b"\r", pos)
                next_cr = len(buf) if next_cr < 0 else next_cr
            if next_cr < len(buf) and (start < 0 or next_cr < start):
                if next_cr + 1 == len(buf) and not eof:  # a \r ends the block: is the next byte \n?
                    more = f.read(block)
                    if more:
                        base, buf, pos, next_cr = base + pos, buf[pos:] + more, 0, -1
                    eof = not more
                    continue
                start = next_cr
                end = start + 2 if buf[start + 1:start + 2] == b"\n" else start + 1
        if start < 0:
            size += len(buf) - pos
            if size > cap:
                over, parts = True, []
            elif pos < len(buf):
                parts.append(buf[pos:])
            more = b"" if eof else f.read(block)
            if not more:
                if size:  # a last line without a line break
                    yield (None if over else b"".join(parts).rstrip(b"\r")), base + len(buf)
                return
            base, buf, pos, next_cr = base + len(buf), more, 0, -1
            continue
        size += start - pos
        if over or size > cap:
            line = None
        else:
            line = b"".join(parts) + buf[pos:start] if parts else buf[pos:start]
            if not cr:
                line = line.rstrip(b"\r")
        yield line, base + end
        parts, size, over, pos = [], 0, False, end


def _read_capped(f, cap: int, block: int = 1 << 22) -> bytes:
    """The rest of ``f``, or its first ``cap + 1`` bytes when longer; in blocks (``f.read(n)`` sets
    aside n bytes first, whatever the file's size)."""
    parts, size = [], 0
    while size <= cap and (part := f.read(min(block, cap + 1 - size))):
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def read_records(sources: Sequence[Source], docs: str, cap: int, start: tuple[int, int] = (0, 0),
                 corpus: Sequence[str] | None = None) -> Iterator[tuple[bytes | str | None, tuple[int, int], int]]:
    """Yield ``(payload, end position, progress units)`` per record from ``start`` on.

    payload: raw bytes of one document / JSONL line, a str for a corpus document, or None
    for an oversize record. The position ``(source index, byte offset or corpus index)``
    after a record is where a resumed run starts reading. ``docs``: "line", "blank", "file".
    """
    first, first_off = start
    for i in range(first, len(sources)):
        src, off = sources[i], first_off if i == first else 0
        if src.fmt == "corpus":
            for j in range(off, len(corpus)):
                yield corpus[j], (i, j + 1), 1
            continue
        mode = "line" if src.fmt == "jsonl" else docs
        if mode == "file" and off > 0:
            continue  # the file was finished before the interruption
        try:
            yield from _file_records(src, i, off, mode, cap, cr=src.fmt != "jsonl")
        # truncated or damaged compressed data: gzip raises EOFError, BadGzipFile or zlib.error; bz2 EOFError or
        # an OSError without errno ("Invalid data stream"), lzma EOFError or LZMAError
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            if src.compression is None or (isinstance(exc, OSError) and exc.errno is not None):
                raise  # an I/O error, named by open / read
            raise ValueError(f"input {src.path}: damaged {_COMPRESSION_NAMES[src.compression]} data, or not "
                             f"{_COMPRESSION_NAMES[src.compression]} data at all ({exc}); repair, remove or rename "
                             "the file (a text file read as text needs a name without that suffix)") from exc


# A blank line in UTF-8 bytes: only characters str.isspace() holds (str.strip() strips them, as the line
# mode's record_texts and BERT's create_pretraining_data do), without decoding the line: ASCII whitespace
# and \x1c-\x1f, U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
_BLANK_LINE = re.compile(rb"(?:[\t\n\x0b\x0c\r\x1c-\x20]|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]"
                         rb"|\xe2\x81\x9f|\xe3\x80\x80)*")


def _file_records(src: Source, i: int, off: int, mode: str, cap: int, cr: bool):
    """read_records for one file from byte offset ``off`` (``cr``: a lone \\r ends a line, see ``_lines``; a
    whole-file document has its \\r\\n and lone \\r written as \\n, its position stays the raw file's size)."""
    with _open(src) as (f, raw):
        disk = _disk_pos(raw, off)  # before the seek: a compressed resume counts the bytes its seek decompresses
        f.seek(off)
        if mode == "file":
            data = _read_capped(f, cap)
            end = off + len(data)  # the raw bytes: resume positions are offsets in the file
            if len(data) > cap:
                data = None
            elif b"\r" in data:  # universal newlines, as the line and blank modes read (UTF-8 safe: ASCII)
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            yield data, (i, max(end, 1)), _disk_pos(raw, end) - disk
        elif mode == "line":
            for line, off in _lines(f, off, cap, cr):
                now = _disk_pos(raw, off)
                yield line, (i, off), now - disk
                disk = now
        else:  # blank-line separated: a document is a run of non-blank lines
            buf, size, over, doc_end = [], 0, False, off
            for line, off in _lines(f, off, cap, cr):
                if line is not None and _BLANK_LINE.fullmatch(line):
                    if buf or over:
                        now = _disk_pos(raw, doc_end)
                        yield (None if over else b"\n".join(buf)), (i, doc_end), now - disk
                        disk = now
                    buf, size, over = [], 0, False
                    continue
                doc_end = off
                if line is None or over or size + len(line) > cap:
                    buf, over = [], True
                else:
                    buf.append(line)
                    size += len(line) + 1
            if buf or over:
                yield (None if over else b"\n".join(buf)), (i, doc_end), _disk_pos(raw, doc_end) - disk


def _chunks(records, cap_bytes: int = CHUNK_BYTES, cap_records: int = CHUNK_RECORDS):
    """Group records into (payloads, ends, progress units) chunks of about ``cap_bytes``."""
    payloads, ends, units, size = [], [], 0, 0
    for payload, end, unit in records:
        payloads.append(payload)
        ends.append(end)
        units += unit
        size += len(payload) if payload is not None else 0
        if size >= cap_bytes or len(payloads) >= cap_records:
            yield payloads, ends, units
            payloads, ends, units, size = [], [], 0, 0
    if payloads:
        yield payloads, ends, units


# -- decoding and tokenizing (runs in the worker processes) -----------------------------------
@dataclass(frozen=True)
class TextOptions:
    text_key: str = "text"
    max_chars: int = 1_000_000
    giant: str = "split"
    bad_utf8: str = "replace"


# str.isspace (" ", "\n", tabs, U+3000, U+00A0...) less the control characters other than \t \n \r:
# BERT's text cleaning deletes those ("a\x0bb" is one word to it), so they do not separate words
_SPACE = re.compile(r"[^\S\x0b\x0c\x1c-\x1f\x85]")


def split_giant(text: str, max_chars: int) -> list[str]:
    """Pieces of at most ``max_chars`` characters, cut after the last whitespace character
    (``str.isspace``, control characters other than tab / newline / carriage return aside) in each
    piece's second half when there is one (else mid-word)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        hi = start + max_chars
        lo = start + max_chars // 2
        found = _SPACE.search(text[lo:hi][::-1])  # the last one: the first of the reversed half
        cut = hi - found.start() - 1 if found else -1
        cut = cut + 1 if cut > start else hi
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def record_texts(payload: bytes | str | None, jsonl: bool, opts: TextOptions) -> tuple[list[str], list[str]]:
    """Decode one record: ``(texts to tokenize, bad kinds)``. See the module doc for the kinds."""
    if payload is None:
        return [], ["oversize"]
    kinds = []
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            kinds.append("invalid_utf8")
            if opts.bad_utf8 == "skip":
                return [], kinds
            text = payload.decode("utf-8", "replace")
    else:
        text = payload
    text = text.removeprefix("\ufeff")
    if jsonl:
        if not text.strip():
            return [], kinds + ["empty"]
        try:
            obj = json.loads(text)
        except ValueError:
            return [], kinds + ["invalid_json"]
        text = obj.get(opts.text_key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            return [], kinds + ["missing_text"]
        if _SURROGATE.search(text):  # a JSON escape of half a UTF-16 pair ("\\ud83d"): no UTF-8 for it
            kinds.append("invalid_utf8")
            if opts.bad_utf8 == "skip":
                return [], kinds
            text = _SURROGATE.sub("\ufffd", text)
    if not text.strip():
        return [], kinds + ["empty"]
    if len(text) > opts.max_chars:
        kinds.append("giant")
        return ([] if opts.giant == "skip" else split_giant(text, opts.max_chars)), kinds
    return [text], kinds


_WORKER: dict = {}


def _init_worker(tokenizer_json: str, opts: TextOptions, jsonl_flags: tuple[bool, ...], watch: bool = False) -> None:
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), opts=opts, jsonl=jsonl_flags)
    if watch:
        close_inherited()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process cleans up
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker's watchdog: a killed (kill -9) main process cannot stop its pool, and forked
    workers hold the task pipe open themselves, so they would wait forever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode(tok, texts: list[str], batch_chars: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids uint32 (T,), lengths int64 (len(texts),))`` of ``texts`` encoded without special tokens.

    In batches of at most ``batch_chars`` (default ``ENCODE_BATCH_CHARS``) characters, or one longer
    text, each turned into numpy before the next is encoded: an ``Encoding`` holds ids, type ids,
    tokens, offsets, masks and word ids, so one ``encode_batch`` over a chunk holding a 50 MB record
    (its giant pieces) raised the peak memory by 1.9 GB, 38 bytes per byte of text (0.4 GB in
    batches). Texts are encoded independently: the ids do not depend on the batching.
    """
    batch_chars = batch_chars or ENCODE_BATCH_CHARS
    ids, lo = [], 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size + len(texts[hi]) <= batch_chars):
            size += len(texts[hi])
            hi += 1
        # no loop variable: it would keep the last Encoding alive while the next batch is encoded
        encs = tok.encode_batch(texts[lo:hi], add_special_tokens=False)
        ids.extend([np.asarray(e.ids, dtype=np.uint32) for e in encs])
        del encs
        lo = hi
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return (np.concatenate(ids) if ids else np.zeros(0, np.uint32)), lens


def _tokenize_chunk(payloads: list, source_ids: list[int]):
    """Tokenize one chunk: ``(ids uint32 (T,), piece lengths (P,), pieces per record (R,), {record: kinds})``."""
    opts, jsonl = _WORKER["opts"], _WORKER["jsonl"]
    texts, owner, events = [], [], {}
    for r, (payload, src) in enumerate(zip(payloads, source_ids)):
        pieces, kinds = record_texts(payload, jsonl[src], opts)
        texts.extend(pieces)
        owner.extend([r] * len(pieces))
        if kinds:
            events[r] = kinds
    ids, lens = _encode(_WORKER["tok"], texts)
    per_record = np.zeros(len(payloads), dtype=np.int64)
    kept = np.zeros(len(payloads), dtype=np.int64)
    for r, n in zip(owner, lens):
        per_record[r] += 1
        kept[r] += n > 0
    for r in np.flatnonzero((per_record > 0) & (kept == 0)):
        events.setdefault(int(r), []).append("no_tokens")
    return ids, lens, per_record, events


class WorkerDiedError(RuntimeError):
    """A tokenizer worker process died (killed: the kernel's out-of-memory killer, kill -9)."""


_WORKER_DIED = ("a tokenizer worker process died (killed, out of memory?); the shards committed so far are kept: "
                "rerun the same command to resume (with fewer --workers or a smaller --max-chars if memory is short)")


def _ordered_results(chunks, workers: int, initargs):
    """Yield (chunk, result) in input order; at most 2 chunks per worker in flight. Raises
    WorkerDiedError when a worker process dies (``BrokenProcessPool``, whose traceback says nothing
    about what to do)."""
    if workers <= 1:
        _init_worker(*initargs)
        for chunk in chunks:
            yield chunk, _tokenize_chunk(chunk[0], chunk[3])
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork-after-rayon warning
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker, initargs=(*initargs, True))
    pending: deque = deque()
    try:
        try:
            pool.submit(int).result()  # start the workers now, while the variable is set
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        for chunk in chunks:
            pending.append((chunk, pool.submit(_tokenize_chunk, chunk[0], chunk[3])))
            if len(pending) >= 2 * workers:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()
    except BrokenProcessPool as exc:
        raise WorkerDiedError(_WORKER_DIED) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- the pipeline ---------------------------------------------------------------------------
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _make_out_dir(out: Path) -> None:
    """Create the output directory; ValueError naming it when that is impossible."""
    blocker = nearest_existing(out)
    if blocker == out and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"output {out}: cannot create the directory, {blocker} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output {out}: cannot create the directory ({exc.strerror or exc})") from exc


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_manifest(out: Path, manifest: dict, options: dict, run: "_Run") -> None:
    """Check a matching manifest before it is resumed or reported complete: its fields, the resume
    position, the committed shards' sizes and the tokenizer. Raises ValueError naming manifest.json,
    CorruptShardError naming a shard / the tokenizer."""
    mpath = out / MANIFEST

    def bad(what: str):
        raise ValueError(f"{mpath}: {what}; the output cannot be resumed or reused: pass --overwrite to rebuild it")

    shards = manifest.get("shards")
    if not isinstance(shards, list):
        bad("'shards' is not a list")
    for k, s in enumerate(shards):
        if not isinstance(s, dict) or (s.get("bin"), s.get("idx")) != ShardWriter.names(k) or \
                not _is_int(s.get("docs"), 1) or not _is_int(s.get("tokens")):
            bad(f"shard record {k} is malformed")
    if manifest.get("dtype") not in ("uint16", "uint32"):
        bad(f"dtype {manifest.get('dtype')!r} is not uint16 or uint32")
    if manifest.get("options") != options:
        bad("'options' do not match the run's fingerprint")
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("sha256"), str):
        bad("'tokenizer' has no sha256")
    complete = manifest.get("complete")
    if complete not in (True, False):
        bad(f"'complete' is {complete!r}, not true or false")
    stats = manifest.get("stats")
    if not complete:
        if not isinstance(stats, dict) or not all(_is_int(stats.get(k)) for k in _STAT_KEYS) or \
                not _is_int(stats.get("unk_tokens", 0)) or not isinstance(stats.get("bad"), dict) or \
                not all(_is_int(stats["bad"].get(k)) for k in BAD_KINDS):  # older runs: no unk_tokens
            bad("'stats' is missing or malformed")
        if stats["docs"] != sum(s["docs"] for s in shards) or stats["tokens"] != sum(s["tokens"] for s in shards):
            bad("'stats' do not add up to the committed shards")
        resume = manifest.get("resume")
        pos = resume.get("position") if isinstance(resume, dict) else None
        if not isinstance(pos, list) or len(pos) != 2 or not all(_is_int(v) for v in pos):
            bad(f"'resume.position' is {pos!r}, not a position in the inputs")
        i, off = pos
        sources = run.sources
        if i < len(sources):
            src = sources[i]
            # a compressed input's position counts decompressed bytes: no bound from the file's size
            limit = src.size if src.fmt == "corpus" else None if src.compression else max(src.size, 1)
        else:
            limit = 0 if i == len(sources) else -1
        if limit is not None and off > limit:
            bad(f"resume position {pos} is past the end of the inputs")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for s in shards:  # sizes only: a sha256 of every committed shard would read them all again
        for name, size in ((s["bin"], s["tokens"] * itemsize), (s["idx"], (s["docs"] + 1) * 8)):
            path = out / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise CorruptShardError(
                    f"{path}: {'missing' if actual is None else f'{actual:,} bytes'}, {mpath.name} records {size:,} "
                    "(deleted, truncated or overwritten); pass --overwrite to rebuild the output")
    if complete:
        path = out / TOKENIZER_FILE
        if not path.is_file() or sha256_file(path) != tok["sha256"]:
            raise CorruptShardError(f"{path}: {'missing' if not path.is_file() else 'sha256 differs from'} "
                                    f"{mpath.name}; pass --overwrite to rebuild the output")


_STAT_KEYS = ("records", "docs", "tokens", "max_doc_tokens", "giant_pieces")


def unknown_token_id(tok) -> int | None:
    """The id of the unknown token ``tok``'s model emits (WordPiece / BPE ``unk_token``, Unigram ``unk_id``),
    or None when it has none (byte-level BPE: every byte is a token)."""
    model = json.loads(tok.to_str()).get("model") or {}
    if model.get("type") == "Unigram":
        return model.get("unk_id") if _is_int(model.get("unk_id")) else None
    name = model.get("unk_token")
    return tok.token_to_id(name) if isinstance(name, str) else None


def _count_in_shards(out: Path, manifest: dict, token: int | None) -> int:
    """How often ``token`` occurs in the manifest's committed shards (0 for None)."""
    if token is None:
        return 0
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return sum(int(np.count_nonzero(np.fromfile(out / s["bin"], dtype=dtype) == token)) for s in manifest["shards"])


def _prepare_out_dir(out: Path, fingerprint: str, overwrite: bool, options: dict, run: "_Run") -> dict | None:
    """The manifest to resume from (None for a fresh start); clears our files with ``overwrite``.
    ``out`` exists (``_make_out_dir``) and is locked."""
    mpath = out / MANIFEST
    manifest = None
    if mpath.is_file() and not overwrite:
        manifest = read_json_object(mpath, ValueError, "; pass --overwrite to rebuild the output")
        if manifest.get("format") == FORMAT and manifest.get("fingerprint") == fingerprint:
            _check_manifest(out, manifest, options, run)
            return manifest
    entries = [f for f in out.iterdir() if f.name != LOCK_FILE]
    ours = [f for f in entries if _OURS.fullmatch(f.name)]
    if not overwrite and (manifest is not None or len(ours) < len(entries)):
        raise ValueError(f"output {out} is not empty and holds no resumable run of this command "
                         "(different inputs or options); pass --overwrite or choose another directory")
    for f in ours:  # --overwrite, or leftovers of a run interrupted before its first manifest
        f.unlink()
    return None


def _summary(manifest: dict, out: Path, seconds: float, tokenize_seconds: float, new_tokens: int) -> str:
    stats = manifest["stats"]
    bad = ", ".join(f"{k} {v:,}" for k, v in stats["bad"].items() if v) or "none"
    unk = stats.get("unk_tokens", 0)
    return (f"preprocess: {manifest['num_docs']:,} docs, {manifest['num_tokens']:,} tokens in "
            f"{len(manifest['shards'])} shards ({manifest['dtype']}) -> {out}; {seconds:.1f} s, "
            f"{new_tokens / max(tokenize_seconds, 1e-9):,.0f} tokens/s; bad lines: {bad}; unknown tokens: "
            f"{unk:,}" + (f" ({unk / max(stats['tokens'], 1):.2%})" if unk else ""))


def _unk_warning(manifest: dict, tok) -> str | None:
    """A note when over ``UNK_WARN_SHARE`` of the tokens are the unknown token: text the model never sees."""
    unk, tokens = manifest["stats"].get("unk_tokens", 0), manifest["stats"]["tokens"]
    if not tokens or unk <= UNK_WARN_SHARE * tokens:
        return None
    model = json.loads(tok.to_str()).get("model") or {}
    name = tok.id_to_token(unknown_token_id(tok))
    why = "characters its vocabulary lacks"
    if model.get("type") == "WordPiece":
        why += f", or words (runs without spaces or punctuation) over its max_input_chars_per_word " \
               f"({model.get('max_input_chars_per_word')}) characters, each one {name}"
    return (f"preprocess: warning: {unk:,} of {tokens:,} tokens ({unk / tokens:.1%}) are the unknown token {name}: "
            f"the tokenizer maps that text to nothing the model can learn from ({why}); check the tokenizer "
            f"fits the corpus's languages")


def _path_sha(path: Path) -> str:
    """sha256 of a tokenizer file, or of a model directory's tokenizer files."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json"):  # what load_tokenizer reads
        if (path / name).is_file():
            h.update(name.encode() + sha256_file(path / name).encode())
    return h.hexdigest()


@dataclass
class _Run:
    """What one preprocessing run reads and how (everything but the tokenizer and the output)."""
    sources: list[Source]
    corpus_docs: list[str] | None
    docs: str
    opts: TextOptions
    cap: int  # the reader's hard limit on one record, bytes

    @property
    def jsonl(self) -> tuple[bool, ...]:
        return tuple(s.fmt == "jsonl" for s in self.sources)

    def records(self, start=(0, 0)):
        return read_records(self.sources, self.docs, self.cap, start, self.corpus_docs)

    def texts(self) -> Iterator[str]:
        """Decoded document texts in order (for tokenizer training)."""
        jsonl = self.jsonl
        for payload, end, _ in self.records():
            yield from record_texts(payload, jsonl[end[0]], self.opts)[0]


def _get_tokenizer(run: _Run, out: Path, manifest: dict | None, tokenizer, train_tokenizer: str | None,
                   train_args: dict, progress: bool, log):
    """The run's tokenizer, saved as out/tokenizer.json: reused when resuming, else loaded or trained.
    Returns (tokenizer, reused)."""
    from .tokenizer import load_tokenizer, train_tokenizer as train

    path = out / TOKENIZER_FILE
    if manifest is not None and path.is_file() and sha256_file(path) == manifest["tokenizer"]["sha256"]:
        return load_tokenizer(path), True
    if train_tokenizer:
        texts = run.texts()
        if train_args["train_docs"] is not None:
            texts = (t for _, t in zip(range(train_args["train_docs"]), texts))
        if log:
            log(f"preprocess: training a {train_tokenizer} tokenizer (vocab {train_args['vocab_size']}) on the corpus")
        tok = train(texts, train_tokenizer, train_args["vocab_size"], min_frequency=train_args["min_frequency"],
                    lowercase=train_args["lowercase"], num_sentinels=train_args["sentinels"], show_progress=progress)
    else:
        tok = load_tokenizer(tokenizer)
    tmp = out / (TOKENIZER_FILE + ".tmp")
    try:
        tok.save(str(tmp))
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception for an I/O error
        tmp.unlink(missing_ok=True)
        raise _tokenizers_os_error(exc, tmp) from exc
    os.replace(tmp, path)
    return tok, False


def _tokenizers_os_error(exc: Exception, path: Path) -> OSError:
    """The OSError naming ``path`` for an error of the Rust ``tokenizers`` library, which reports a
    failed write as a bare ``Exception("No space left on device (os error 28)")``."""
    m = re.fullmatch(r"(.*) \(os error (\d+)\)", str(exc), re.S)
    if m:
        return OSError(int(m.group(2)), m.group(1), str(path))
    return OSError(f"{path}: cannot write the tokenizer ({exc})")


def _write_chunk(writer: ShardWriter, stats: dict, ends: list, ids: np.ndarray, lens: np.ndarray,
                 per_record: np.ndarray, events: dict, commit: Callable[[dict, tuple], None],
                 unk: int | None = None) -> tuple:
    """Write one tokenized chunk (``_tokenize_chunk``'s ids, piece lengths, pieces per record and bad
    kinds of its records, whose end positions are ``ends``) and count it in ``stats`` (``unk_tokens``: the
    ids equal to ``unk``, the tokenizer's unknown token; None: it has none); returns the position after it.

    A shard closes at the end of the first record that fills it (never between the pieces of a giant
    record) and is committed with the position after that record, and the stats then count the records
    up to it: the shards, manifests and resume points of adding the records one at a time. The
    documents between two such points go to ``ShardWriter.add_many`` at once and the per-record counts
    are numpy: per document, ``ShardWriter.add`` and the counting cost ~5 us of this (main) process,
    which capped ``--workers`` at ~4 tokenizer processes' output on short documents."""
    n = len(per_record)
    piece_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_record, out=piece_start[1:])
    token_start = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=token_start[1:])
    record_end = token_start[piece_start[1:]]  # the chunk's tokens up to the end of each record
    bad, e = sorted(events.items()), 0  # (record, kinds), few: walked along
    r0 = 0
    while r0 < n:
        room = writer.shard_tokens - writer.open_tokens
        fills = int(record_end.searchsorted(record_end[r0 - 1] + room if r0 else room, side="left"))
        r1 = min(max(fills + 1, r0 + 1), n)  # records [r0, r1): up to the one that fills the shard
        p0, p1 = int(piece_start[r0]), int(piece_start[r1])
        kept = lens[p0:p1][lens[p0:p1] > 0]  # a text the tokenizer maps to nothing is no document
        if len(kept):
            written = ids[token_start[p0]:token_start[p1]]
            writer.add_many(written, kept)
            if unk is not None:
                stats["unk_tokens"] += int(np.count_nonzero(written == unk))
            stats["docs"] += len(kept)
            stats["tokens"] += int(kept.sum())
            stats["max_doc_tokens"] = max(stats["max_doc_tokens"], int(kept.max()))
        stats["records"] += r1 - r0
        while e < len(bad) and bad[e][0] < r1:
            r, kinds = bad[e]
            for kind in kinds:
                stats["bad"][kind] += 1
            if "giant" in kinds:
                stats["giant_pieces"] += int(per_record[r])
            e += 1
        record = writer.close_if_full()
        if record is not None:
            commit(record, ends[r1 - 1])
        r0 = r1
    return ends[-1]


def _stream_to_shards(run: _Run, out: Path, manifest: dict, tok, *, workers: int, progress: bool,
                      on_shard: Callable[[int, dict], None] | None) -> None:
    """Tokenize from the manifest's resume position to the end, committing each shard to the manifest."""
    start = tuple(manifest["resume"]["position"])
    done = len(manifest["shards"])
    for f in out.iterdir():  # an interrupted run's partial shard, or shards past the last commit
        if _OURS.fullmatch(f.name) and (f.name.endswith(".tmp") or (f.name.startswith("shard-") and
                                                                    int(f.name[6:].split(".")[0]) >= done)):
            f.unlink()
    stats = manifest["stats"]
    unk = unknown_token_id(tok)
    if "unk_tokens" not in stats:  # a run an older fastpt started: count the committed shards' own
        stats["unk_tokens"] = _count_in_shards(out, manifest, unk)
    writer = ShardWriter(out, np.dtype(manifest["dtype"]).newbyteorder("<"), manifest["options"]["shard_tokens"],
                         start_index=done)
    sources = run.sources
    total = sum(s.size for s in sources)
    # the current input's offset is in its progress units, except when compressed (the reader counts those)
    units_done = sum(s.size for s in sources[:start[0]]) + \
        (start[1] if start[0] < len(sources) and not sources[start[0]].compression else 0)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=min(units_done, total), unit="doc" if run.corpus_docs is not None else "B",
               unit_scale=True, desc="preprocess", disable=not progress)

    def commit(record: dict | None, position) -> None:
        if record is not None:
            manifest["shards"].append(record)
        manifest["resume"] = {"position": list(position)}
        manifest["num_docs"] = sum(s["docs"] for s in manifest["shards"])
        manifest["num_tokens"] = sum(s["tokens"] for s in manifest["shards"])
        write_json_atomic(out / MANIFEST, manifest)
        if record is not None and on_shard is not None:
            on_shard(len(manifest["shards"]) - 1, record)

    chunks = ((p, e, u, [end[0] for end in e]) for p, e, u in _chunks(run.records(start)))
    results = _ordered_results(chunks, workers, (tok.to_str(), run.opts, run.jsonl))
    position = start
    try:
        for (_, ends, units, _), (ids, lens, per_record, events) in results:
            position = _write_chunk(writer, stats, ends, ids, lens, per_record, events, commit, unk)
            bar.update(units)
            bar.set_postfix(docs=f"{stats['docs']:,}", tokens=f"{stats['tokens']:,}", refresh=False)
        commit(writer.close(), position)
    finally:
        results.close()  # shuts the worker pool down now, also when a callback raised
        writer.abort()
        bar.close()


def preprocess_text(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, corpus: str | None = None,
                    tokenizer: str | os.PathLike | None = None, train_tokenizer: str | None = None,
                    vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True, sentinels: int = 0,
                    train_docs: int | None = None, fmt: str = "auto", docs: str = "line", text_key: str = "text",
                    max_chars: int = 1_000_000, giant: str = "split", bad_utf8: str = "replace",
                    shard_tokens: int = 50_000_000, workers: int | None = None, overwrite: bool = False,
                    progress: bool = True, on_shard: Callable[[int, dict], None] | None = None,
                    log: Callable[[str], None] | None = print) -> dict:
    """Tokenize a corpus into a shard directory; returns the final manifest (see shards.py).

    inputs: files / folders (or empty with ``corpus``, a name in ``CORPORA``). tokenizer: a
    tokenizers JSON file or HF model dir; or train_tokenizer "wordpiece" / "bpe" with
    vocab_size, min_frequency, lowercase (WordPiece), sentinels (T5 ``<extra_id_i>``) and
    train_docs (a cap on documents read for training). workers: tokenizer processes
    (default min(4, cpus); 1 tokenizes in this process). ``on_shard(index, record)`` is
    called after each shard is committed (tests interrupt a run by raising there).
    Resumes an interrupted run of the same inputs and options found in ``out_dir``; a
    finished one is returned as it is. ``log`` gets the progress notes and the summary line.
    Raises ValueError (bad arguments; ``out_dir`` holding something else, or in use by another
    run; a damaged manifest), CorruptShardError (a committed shard missing or truncated),
    FileNotFoundError, OSError naming the file (an unreadable input; a full disk: the open
    shard's ``.tmp`` files are removed), WorkerDiedError (a tokenizer process was killed). After
    the last two the committed shards stay, and the same call resumes.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if (corpus is None) == (not inputs):
        raise ValueError("give input files/folders or --corpus, not both and not neither")
    if (tokenizer is None) == (train_tokenizer is None):
        raise ValueError("give --tokenizer or --train-tokenizer (exactly one)")
    for name, value, allowed in (("docs", docs, ("line", "blank", "file")), ("fmt", fmt, ("auto", "text", "jsonl")),
                                 ("giant", giant, ("split", "skip")), ("bad_utf8", bad_utf8, ("replace", "skip"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not _is_int(max_chars, 1) or max_chars > MAX_CHARS_LIMIT:
        raise ValueError(f"max_chars: expected an integer in [1, {MAX_CHARS_LIMIT:,}], got {max_chars!r}")
    if not _is_int(shard_tokens, 1):
        raise ValueError(f"shard_tokens: expected a positive integer, got {shard_tokens!r}")
    if workers is not None and not _is_int(workers, 1):
        raise ValueError(f"workers: expected a positive number of tokenizer processes, got {workers!r}")
    if train_tokenizer is not None:
        from .tokenizer import check_train_args

        check_train_args(vocab_size=vocab_size, min_frequency=min_frequency, sentinels=sentinels)
        if train_docs is not None and not _is_int(train_docs, 1):
            raise ValueError(f"train_docs must be a positive number of documents (or None for all), got {train_docs!r}")
    if corpus is not None and corpus not in CORPORA:
        raise ValueError(f"corpus {corpus!r}: choose one of {sorted(CORPORA)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    if corpus is not None:
        corpus_docs = CORPORA[corpus]()
        sources = [Source(f"corpus:{corpus}", "corpus", len(corpus_docs))]
    else:
        corpus_docs, sources = None, find_inputs(inputs, fmt, exclude=out_dir)
    run = _Run(sources, corpus_docs, docs, TextOptions(text_key, max_chars, giant, bad_utf8),
               cap=max(64 << 20, 4 * max_chars))
    train_args = {"train": train_tokenizer, "vocab_size": vocab_size, "min_frequency": min_frequency,
                  "lowercase": lowercase, "sentinels": sentinels, "train_docs": train_docs}
    if tokenizer is not None and Path(tokenizer).resolve().is_relative_to(out.resolve()):
        raise ValueError(f"tokenizer: {tokenizer} is inside the output directory {out}, where the run writes its own "
                         f"{TOKENIZER_FILE}; keep the input tokenizer elsewhere")
    tok_spec = train_args if train_tokenizer else \
        {"source": str(Path(tokenizer).resolve()), "source_sha256": _path_sha(Path(tokenizer))}
    options = {"docs": docs, "text_key": text_key, "max_chars": max_chars, "giant": giant, "bad_utf8": bad_utf8,
               "shard_tokens": shard_tokens, "tokenizer": tok_spec, "corpus": corpus}
    inputs_fp = _fingerprint([s.fingerprint() for s in sources])
    fingerprint = _fingerprint([options, inputs_fp])
    _make_out_dir(out)
    lock = lock_preprocess_output(out)
    try:
        return _run_locked(run, out, options, inputs_fp, fingerprint, overwrite, tokenizer, train_tokenizer,
                           train_args, tok_spec, workers, progress, on_shard, log, t0)
    finally:
        unlock_dir(lock)


def _run_locked(run: _Run, out: Path, options: dict, inputs_fp: str, fingerprint: str, overwrite: bool,
                tokenizer, train_tokenizer: str | None, train_args: dict, tok_spec: dict, workers: int | None,
                progress: bool, on_shard, log, t0: float) -> dict:
    """preprocess_text once ``out`` exists and is locked."""
    from .tokenizer import special_token_ids

    sources = run.sources
    manifest = _prepare_out_dir(out, fingerprint, overwrite, options, run)
    if manifest is not None and manifest.get("complete"):
        if log:
            log(f"preprocess: {out} is already complete (same inputs and options); nothing to do")
        return manifest

    tok, reused = _get_tokenizer(run, out, manifest, tokenizer, train_tokenizer, train_args, progress, log)
    if not reused:  # a fresh start
        # max id + 1, not the number of entries: a vocabulary may have gaps
        vocab = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        model_dir = Path(tokenizer) if tokenizer is not None and Path(tokenizer).is_dir() else None
        manifest = {"format": FORMAT, "version": VERSION, "kind": "text", "complete": False,
                    "dtype": dtype_for_vocab(vocab).name, "byteorder": "little", "vocab_size": vocab,
                    "num_docs": 0, "num_tokens": 0,
                    "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(out / TOKENIZER_FILE), **tok_spec},
                    "special_tokens": special_token_ids(tok, model_dir), "shards": [],
                    "inputs": {"count": len(sources), "bytes": sum(s.size for s in sources), "sha256": inputs_fp},
                    "options": options, "fingerprint": fingerprint,
                    "stats": {"records": 0, "docs": 0, "tokens": 0, "max_doc_tokens": 0, "giant_pieces": 0,
                              "unk_tokens": 0, "bad": dict.fromkeys(BAD_KINDS, 0)},
                    "resume": {"position": [0, 0]}}
        write_json_atomic(out / MANIFEST, manifest)
    elif log:
        i, off = manifest["resume"]["position"]
        log(f"preprocess: resuming {out}: {len(manifest['shards'])} shards done, "
            f"input {min(i + 1, len(sources))}/{len(sources)} at {off:,}")

    t1, tokens_before = time.perf_counter(), manifest["stats"]["tokens"]
    _stream_to_shards(run, out, manifest, tok, workers=workers or min(4, os.cpu_count() or 1), progress=progress,
                      on_shard=on_shard)
    manifest["complete"] = True
    del manifest["resume"]
    write_json_atomic(out / MANIFEST, manifest)
    if log:
        now = time.perf_counter()
        log(_summary(manifest, out, now - t0, now - t1, manifest["stats"]["tokens"] - tokens_before))
        warning = _unk_warning(manifest, tok)
        if warning:
            log(warning)
    return manifest


# -- the command line -------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``fastpt preprocess`` arguments (added to ``parser`` when given, e.g. a subparser)."""
    p = parser or argparse.ArgumentParser(
        prog="fastpt preprocess", description="Tokenize a corpus (text, JSONL, folders or a built-in one) into "
        "packed, memory-mapped token shards, or write an image dataset (--images).")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="INPUT... OUT: text/JSONL files or folders, then the output directory "
                        "(only OUT with --corpus or --images)")
    g = p.add_argument_group("text input")
    g.add_argument("--corpus", choices=sorted(CORPORA), help="a built-in corpus instead of files (no download)")
    g.add_argument("--format", dest="fmt", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format (auto: .jsonl/.json/.ndjson, also with .gz/.bz2/.xz, are JSONL, the rest "
                        "text; gzip/bzip2/xz are decompressed, recognised by their first bytes)")
    g.add_argument("--docs", choices=("line", "blank", "file"), default="line",
                   help="text files: one document per line (default), blank-line separated, or one per file "
                        "(a line ends at \\n, \\r\\n or a lone \\r)")
    g.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    g.add_argument("--max-chars", type=int, default=1_000_000, help="documents longer than this are giant")
    g.add_argument("--giant", choices=("split", "skip"), default="split",
                   help="split giant documents (default) or skip them")
    g.add_argument("--bad-utf8", choices=("replace", "skip"), default="replace",
                   help="invalid UTF-8: keep with U+FFFD replacement (default) or skip the record")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", help="a tokenizers JSON file or a Hugging Face model directory")
    g.add_argument("--train-tokenizer", choices=("wordpiece", "bpe"), help="train a tokenizer on the corpus")
    # The training options default to None so that one given without --train-tokenizer is an error, not ignored.
    g.add_argument("--vocab-size", type=int, help="vocabulary to train (default 8000)")
    g.add_argument("--min-frequency", type=int, help="training: minimum pair frequency (default 2)")
    g.add_argument("--cased", action="store_true", default=None,
                   help="WordPiece training: keep case (default lowercases)")
    g.add_argument("--sentinels", type=int, help="training: add N T5 sentinels <extra_id_i> (default 0)")
    g.add_argument("--train-docs", type=int, help="training: read at most N documents")
    g = p.add_argument_group("output")
    g.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard (default 50M)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    g.add_argument("--overwrite", action="store_true", help="replace a different run's output in OUT")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("images (writes images.npy + labels.npy + manifest.json)")
    g.add_argument("--images", metavar="DIR|fashion-mnist", help="an image folder (class subfolders) or fashion-mnist")
    g.add_argument("--split", choices=("train", "test"), default="train", help="fashion-mnist split (default train)")
    g.add_argument("--image-size", type=int, help="resize folder images to SIZE x SIZE (needs Pillow)")
    return p


def _or(value, default):
    return default if value is None else value


def run_args(args: argparse.Namespace) -> int:
    """Run ``fastpt preprocess`` from parsed arguments; prints errors, returns the exit status."""
    *inputs, out = args.paths
    try:
        if args.images:
            from .images import preprocess_images

            if inputs:
                raise ValueError("--images takes its source as its value; give only OUT as a path")
            preprocess_images(args.images, out, split=args.split, image_size=args.image_size,
                              overwrite=args.overwrite, progress=not args.no_progress)
            return 0
        training = {"--vocab-size": args.vocab_size, "--min-frequency": args.min_frequency,
                    "--sentinels": args.sentinels, "--train-docs": args.train_docs, "--cased": args.cased}
        given = [flag for flag, value in training.items() if value is not None]
        if given and not args.train_tokenizer:
            raise ValueError(f"{', '.join(given)}: only with --train-tokenizer (a --tokenizer is used as it is)")
        preprocess_text(inputs, out, corpus=args.corpus, tokenizer=args.tokenizer,
                        train_tokenizer=args.train_tokenizer, vocab_size=_or(args.vocab_size, 8000),
                        min_frequency=_or(args.min_frequency, 2), lowercase=not args.cased,
                        sentinels=_or(args.sentinels, 0),
                        train_docs=args.train_docs, fmt=args.fmt, docs=args.docs, text_key=args.text_key,
                        max_chars=args.max_chars, giant=args.giant, bad_utf8=args.bad_utf8,
                        shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite,
                        progress=not args.no_progress)
    # OSError: unreadable input, disk full (the error names the file); WorkerDiedError: a worker was killed
    except (ValueError, OSError, ImportError, WorkerDiedError) as exc:
        print(f"fastpt preprocess: error: {exc}", file=sys.stderr)
        return 1
    return 0


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """``fastpt preprocess`` entry point: parse ``argv`` and run; returns the exit status."""
    return run_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(preprocess_main())
