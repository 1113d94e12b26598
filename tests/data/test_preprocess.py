"""fastpt preprocess: text -> shards gives exactly the tokenizer's ids, for every input kind (\r, \r\n
and \n line ends; linked folders); bad lines counted; interrupted runs (an exception, a kill -9, a full
disk, a killed worker) end in an error line and resume to byte-identical output; giant records are
encoded in bounded batches."""
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from fastpt.data.preprocess import (find_inputs, preprocess_main, preprocess_text, read_records,  # noqa: E402
                                    split_giant)
from fastpt.data import preprocess as P  # noqa: E402
from fastpt.data.shards import ShardDataset  # noqa: E402
from fastpt.data.tokenizer import train_tokenizer  # noqa: E402

WORDS = ("river stone cloud forest lantern copper meadow signal harbor orbit velvet canyon "
         "whisper marble tunnel ember glacier quartz").split()


def _doc(rng, lo=1, hi=40):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    """A tiny WordPiece tokenizer saved as a tokenizers JSON file."""
    rng = np.random.default_rng(1)
    tok = train_tokenizer(iter([_doc(rng) for _ in range(200)]), "wordpiece", 90)
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    tok.save(str(path))
    return path, tok


@pytest.fixture()
def corpus(tmp_path):
    """A folder: a.txt (400 lines), sub/b.txt (200 lines), c.jsonl (60 records); and the expected docs."""
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    a = [_doc(rng) for _ in range(400)]
    b = [_doc(rng) for _ in range(200)]
    c = [_doc(rng) for _ in range(60)]
    (tmp_path / "in" / "a.txt").write_text("\n".join(a) + "\n")
    (tmp_path / "in" / "sub" / "b.txt").write_text("\n".join(b) + "\n")
    (tmp_path / "in" / "c.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(c)))
    (tmp_path / "in" / ".hidden.txt").write_text("never read\n")
    return tmp_path / "in", a + c + b  # sorted: a.txt, c.jsonl, sub/b.txt


def _rows(out):
    """Every stored document, in order, as a list of ids."""
    ds = ShardDataset(out, 4096, mode="doc", shuffle=False, add_special="none")
    rows = []
    for d in range(ds.num_docs):
        s = ds.document(d)
        rows.append(s["input_ids"][: int(s["attention_mask"].sum())].tolist())
    return rows


def _files(out):
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


def test_round_trip_folder(tmp_path, corpus, tok_file):
    folder, docs = corpus
    path, tok = tok_file
    manifest = preprocess_text([folder], tmp_path / "out", tokenizer=path, shard_tokens=500, workers=1, progress=False,
                               log=None)
    want = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    assert _rows(tmp_path / "out") == want
    assert manifest["num_docs"] == len(docs) and manifest["num_tokens"] == sum(map(len, want))
    assert manifest["stats"]["max_doc_tokens"] == max(map(len, want))
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 3 and manifest["inputs"]["count"] == 3
    assert manifest["special_tokens"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert all(v == 0 for v in manifest["stats"]["bad"].values())
    # pack windows carry [CLS] doc [SEP] in corpus order
    ds = ShardDataset(tmp_path / "out", 29, shuffle=False)
    stream = [t for ids in want for t in [2] + ids + [3]]
    assert ds.window(5)["input_ids"].tolist() == stream[5 * 29:6 * 29]


def test_workers_give_identical_shards(tmp_path, corpus, tok_file):
    folder, _ = corpus
    kw = dict(tokenizer=tok_file[0], shard_tokens=500, progress=False, log=None)
    preprocess_text([folder], tmp_path / "one", workers=1, **kw)
    preprocess_text([folder], tmp_path / "two", workers=2, **kw)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_blank_line_docs_file_docs_and_gzip(tmp_path, tok_file):
    path, tok = tok_file
    text = "river stone\ncloud forest\n\n\n  \nlantern copper\n\nmeadow\nsignal harbor\n"
    (tmp_path / "blank.txt").write_text(text)
    with gzip.open(tmp_path / "blank.txt.gz", "wt") as f:
        f.write(text)
    docs = ["river stone\ncloud forest", "lantern copper", "meadow\nsignal harbor"]
    want = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    for name in ("blank.txt", "blank.txt.gz"):
        preprocess_text([tmp_path / name], tmp_path / f"out-{name}", tokenizer=path, docs="blank", workers=1,
                        progress=False, log=None)
        assert _rows(tmp_path / f"out-{name}") == want
    preprocess_text([tmp_path / "blank.txt"], tmp_path / "out-file", tokenizer=path, docs="file", workers=1,
                    progress=False, log=None)
    assert _rows(tmp_path / "out-file") == [tok.encode(text, add_special_tokens=False).ids]


def test_bad_lines_counted(tmp_path, tok_file):
    path, tok = tok_file
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.txt").write_bytes(b"river stone\n\n   \n\xff\xfe copper meadow\n" + b"orbit " * 50 + b"\n"
                                            + b"ember\r\n")
    (tmp_path / "in" / "j.jsonl").write_text('{"text": "quartz"}\n{broken\n{"body": "x"}\n["list"]\n\n')
    m = preprocess_text([tmp_path / "in"], tmp_path / "out", tokenizer=path, max_chars=100, workers=1, progress=False,
                        log=None)
    assert m["stats"]["bad"] == {"invalid_utf8": 1, "empty": 3, "giant": 1, "oversize": 0, "invalid_json": 1,
                                 "missing_text": 2, "no_tokens": 0}
    pieces = split_giant("orbit " * 50, 100)
    assert len(pieces) == 4 and all(len(p) <= 100 and p.endswith(" ") for p in pieces)  # cut at spaces
    assert "".join(pieces) == "orbit " * 50 and m["stats"]["giant_pieces"] == 4
    rows = _rows(tmp_path / "out")
    want = [tok.encode(d, add_special_tokens=False).ids for d in
            ["quartz", "river stone", "\ufffd\ufffd copper meadow"] + pieces + ["ember"]]
    assert rows == want
    m = preprocess_text([tmp_path / "in"], tmp_path / "skip", tokenizer=path, max_chars=100, giant="skip",
                        bad_utf8="skip", workers=1, progress=False, log=None)
    assert m["num_docs"] == 3 and m["stats"]["bad"]["giant"] == 1 and m["stats"]["bad"]["invalid_utf8"] == 1


def test_split_giant_cuts_at_any_whitespace(tok_file):
    """Giant documents were cut at " " / "\n" only: tab- or U+3000-separated words were cut in half
    ("\tcoro" | "utine"), so the pieces' ids differed from the whole text's."""
    _, tok = tok_file
    rng = np.random.default_rng(3)
    for sep in ("\t", "\u3000", "\u00a0", "\r", "\u2003", "\u2028"):
        text = sep.join(rng.choice(WORDS, size=80))
        pieces = split_giant(text, 50)
        assert "".join(pieces) == text and all(len(p) <= 50 for p in pieces)
        assert all(p.endswith(sep) for p in pieces[:-1]), sep
        ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
        assert ids == tok.encode(text, add_special_tokens=False).ids, sep

    def old(text, n):  # the former rule, still right where only " " and "\n" separate words
        pieces, start = [], 0
        while len(text) - start > n:
            hi = start + n
            cut = max(text.rfind(" ", start + n // 2, hi), text.rfind("\n", start + n // 2, hi))
            cut = cut + 1 if cut > start else hi
            pieces.append(text[start:cut])
            start = cut
        return pieces + [text[start:]]

    for n in (1, 2, 7, 50):
        text = "".join(w + rng.choice([" ", "\n", "  "]) for w in rng.choice(WORDS + ["x" * 60], size=200))
        assert split_giant(text, n) == old(text, n), n
    assert split_giant("y" * 30, 10) == ["y" * 10] * 3  # no whitespace: mid-word
    # control characters are whitespace to str.isspace but deleted inside words by BERT: no cut there
    assert split_giant("river\x0bstone\x1fember " * 8, 40) == ["river\x0bstone\x1fember " * 2] * 4


def test_reader_oversize_and_positions(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"short\n" + b"y" * 50 + b"\nlast")
    src = find_inputs([tmp_path / "t.txt"])
    recs = list(read_records(src, "line", cap=20))
    assert [(p, e) for p, e, _ in recs] == [(b"short", (0, 6)), (None, (0, 57)), (b"last", (0, 61))]
    assert list(read_records(src, "line", cap=20, start=(0, 57)))[0][0] == b"last"  # resume mid-file
    (tmp_path / "b.txt").write_bytes(b"a\nb\n\n" + b"z\n" * 30 + b"\nc\n")
    recs = list(read_records(find_inputs([tmp_path / "b.txt"]), "blank", cap=20))
    assert [p for p, _, _ in recs] == [b"a\nb", None, b"c"]


def test_interrupted_run_resumes_byte_identical(tmp_path, corpus, tok_file):
    folder, _ = corpus
    kw = dict(tokenizer=tok_file[0], shard_tokens=300, workers=2, progress=False, log=None)
    full = preprocess_text([folder], tmp_path / "full", **kw)

    def crash(index, record):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_text([folder], tmp_path / "cut", on_shard=crash, **kw)
    partial = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 3 and partial["resume"]["position"][1] > 0
    with pytest.raises(ValueError, match="did not finish"):
        ShardDataset(tmp_path / "cut", 8)
    seen = []
    resumed = preprocess_text([folder], tmp_path / "cut", on_shard=lambda i, r: seen.append(i), **kw)
    assert seen[0] == 3  # finished shards were not redone
    assert resumed == full and _files(tmp_path / "cut") == _files(tmp_path / "full")
    # a finished directory is left alone; other options need --overwrite
    assert preprocess_text([folder], tmp_path / "cut", **kw) == full
    with pytest.raises(ValueError, match="overwrite"):
        preprocess_text([folder], tmp_path / "cut", **{**kw, "shard_tokens": 301})
    assert preprocess_text([folder], tmp_path / "cut", overwrite=True, **{**kw, "shard_tokens": 301})["complete"]


def test_kill_9_then_resume(tmp_path, corpus, tok_file):
    folder, _ = corpus
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from fastpt.data.preprocess import preprocess_text
        def die(index, record):
            if index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        preprocess_text([{str(folder)!r}], {str(out)!r}, tokenizer={str(tok_file[0])!r}, shard_tokens=300,
                        workers=2, progress=False, on_shard=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    kw = dict(tokenizer=tok_file[0], shard_tokens=300, workers=1, progress=False, log=None)
    preprocess_text([folder], out, **kw)
    preprocess_text([folder], tmp_path / "full", **kw)
    assert _files(out) == _files(tmp_path / "full")


def test_train_tokenizer_and_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    (tmp_path / "t.txt").write_text("w1 w69999 w65536\nw3 nothere\n")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 70000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(tmp_path / "big.json"))
    m = preprocess_text([tmp_path / "t.txt"], tmp_path / "out32", tokenizer=tmp_path / "big.json", workers=1,
                        progress=False, log=None)
    assert m["dtype"] == "uint32" and m["special_tokens"] == {"unk": 0}
    assert _rows(tmp_path / "out32") == [[1, 69999, 65536], [3, 0]]
    m = preprocess_text([tmp_path / "t.txt"], tmp_path / "trained", train_tokenizer="bpe", vocab_size=300,
                        min_frequency=1, workers=1, progress=False, log=None)
    assert m["dtype"] == "uint16" and m["tokenizer"]["train"] == "bpe" and m["special_tokens"]["eos"] == 2
    saved = Tokenizer.from_file(str(tmp_path / "trained" / "tokenizer.json"))
    assert _rows(tmp_path / "trained") == [saved.encode(d, add_special_tokens=False).ids
                                           for d in ["w1 w69999 w65536", "w3 nothere"]]


def test_cli_builtin_corpus(tmp_path, capsys):
    out = tmp_path / "out"
    rc = preprocess_main(["--corpus", "python-topics", str(out), "--train-tokenizer", "wordpiece", "--vocab-size",
                          "300", "--shard-tokens", "100000", "--workers", "2", "--no-progress"])
    assert rc == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("preprocess: ") and "tokens/s" in summary and "bad lines" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_tokens"] > 100_000 and len(manifest["shards"]) >= 2
    assert ShardDataset(out, 128).sample(0)["input_ids"].shape == (128,)
    assert preprocess_main(["--corpus", "python-topics", str(tmp_path / "in"), str(tmp_path / "x"),
                            "--train-tokenizer", "bpe"]) == 1
    assert "not both" in capsys.readouterr().err


# -- interrupted runs, full disks and killed workers end in an error line and resume exactly -----
def test_interrupted_run_over_an_upper_case_gz_resumes(tmp_path, corpus, tok_file):
    """The resume check bounded a ``.GZ`` input's position (decompressed bytes) by its compressed size:
    the test for ".gz" there was case-sensitive, and the run refused to resume ("past the end")."""
    folder, _ = corpus
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "A.TXT.GZ", "wb") as f:
        f.write((folder / "a.txt").read_bytes())
    kw = dict(tokenizer=tok_file[0], shard_tokens=3000, workers=1, progress=False, log=None)

    def crash(index, record):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_text([tmp_path / "gz"], tmp_path / "cut", on_shard=crash, **kw)
    position = json.loads((tmp_path / "cut" / "manifest.json").read_text())["resume"]["position"][1]
    assert position > (tmp_path / "gz" / "A.TXT.GZ").stat().st_size  # what the old check refused
    preprocess_text([tmp_path / "gz"], tmp_path / "cut", **kw)
    preprocess_text([tmp_path / "gz"], tmp_path / "full", **kw)
    assert _files(tmp_path / "cut") == _files(tmp_path / "full")


def _cli_args(inputs, out, tok_path, *extra):
    return [*map(str, inputs), str(out), "--tokenizer", str(tok_path), "--no-progress", *extra]


def _error_line(rc, err, *names):
    assert rc == 1 and "Traceback" not in err and err.startswith("fastpt preprocess: error: "), err[-2000:]
    for name in names:
        assert name in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write fails with ENOSPC)")
def test_disk_full_while_writing_a_shard(tmp_path, corpus, tok_file, capsys, monkeypatch):
    """ENOSPC while writing a shard: an error line naming the file, the open shard's .tmp files
    removed (they used to stay, holding the space), and the same command resumes once there is room."""
    from fastpt.data import shards

    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):  # a .bin.tmp is created, but its data never fits
        if str(path).endswith(".bin.tmp"):
            real_open(path, "wb").close()
            path = "/dev/full"
        return real_open(path, mode, *args, **kwargs)

    folder, _ = corpus
    argv = _cli_args([folder], tmp_path / "out", tok_file[0], "--shard-tokens", "300", "--workers", "1")
    monkeypatch.setattr(shards, "open", full_disk, raising=False)
    _error_line(preprocess_main(argv), capsys.readouterr().err, "No space left on device", "shard-00000.bin.tmp")
    assert not [f.name for f in (tmp_path / "out").iterdir() if f.name.endswith(".tmp")]
    monkeypatch.undo()
    assert preprocess_main(argv) == 0
    preprocess_text([folder], tmp_path / "full", tokenizer=tok_file[0], shard_tokens=300, workers=1, progress=False,
                    log=None)
    assert _files(tmp_path / "out") == _files(tmp_path / "full")


class _TokenizerOnAFullDisk:
    """A tokenizer whose save fails the way ``tokenizers`` reports ENOSPC: a bare Exception."""

    def __init__(self, tok):
        self._tok = tok

    def save(self, path, pretty=True):
        with open(path, "w") as f:
            f.write("{")
        raise Exception("No space left on device (os error 28)")

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_tokenizer_save_failure_is_an_error_line(tmp_path, corpus, tok_file, capsys, monkeypatch):
    """A bare Exception from tokenizers' save used to escape as a traceback (leaving tokenizer.json.tmp)."""
    from fastpt.data import tokenizer

    load = tokenizer.load_tokenizer
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path: _TokenizerOnAFullDisk(load(path)))
    rc = preprocess_main(_cli_args([corpus[0]], tmp_path / "out", tok_file[0], "--workers", "1"))
    _error_line(rc, capsys.readouterr().err, "[Errno 28] No space left on device", "tokenizer.json.tmp")
    assert not (tmp_path / "out" / "tokenizer.json.tmp").exists()
    # the message format this relies on, from a real failed save
    with pytest.raises(Exception, match=r"\(os error 2\)$") as info:
        tok_file[1].save(str(tmp_path / "no-such-dir" / "t.json"))
    exc = P._tokenizers_os_error(info.value, tmp_path / "t.json")
    assert isinstance(exc, FileNotFoundError) and exc.filename == str(tmp_path / "t.json")


_ORIGINAL_TOKENIZE_CHUNK = P._tokenize_chunk
_KILL_MARKER = b"river KILL-THIS-WORKER"


def _tokenize_chunk_or_die(payloads, source_ids):
    """_tokenize_chunk, except that the worker given the marker line dies as under the OOM killer."""
    if _KILL_MARKER in payloads:
        os.kill(os.getpid(), signal.SIGKILL)
    return _ORIGINAL_TOKENIZE_CHUNK(payloads, source_ids)


@pytest.mark.skipif(sys.platform != "linux", reason="forked workers inherit the patched function")
def test_killed_worker_is_an_error_line_and_the_run_resumes(tmp_path, tok_file, capsys, monkeypatch):
    """A worker killed mid-run used to end the command with a BrokenProcessPool traceback."""
    rng = np.random.default_rng(3)
    lines = [_doc(rng) for _ in range(5000)]
    lines[4500] = _KILL_MARKER.decode()  # in the third chunk of 2048 records
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    argv = _cli_args([tmp_path / "t.txt"], tmp_path / "out", tok_file[0], "--shard-tokens", "2000", "--workers", "2")
    monkeypatch.setattr(P, "_tokenize_chunk", _tokenize_chunk_or_die)
    _error_line(preprocess_main(argv), capsys.readouterr().err, "tokenizer worker process died",
                "rerun the same command")
    monkeypatch.undo()
    assert preprocess_main(argv) == 0
    preprocess_text([tmp_path / "t.txt"], tmp_path / "full", tokenizer=tok_file[0], shard_tokens=2000, workers=1,
                    progress=False, log=None)
    assert _files(tmp_path / "out") == _files(tmp_path / "full")


# -- memory: a giant record is encoded in bounded batches, with the same ids ----------------------
def test_giant_record_is_encoded_in_bounded_batches(monkeypatch):
    """One encode_batch over a whole chunk kept every piece's Encoding alive (~38 bytes per byte of
    text: 1.9 GB for a 50 MB line); batches now hold at most ENCODE_BATCH_CHARS characters."""
    calls = []

    class Spy:
        def encode_batch(self, texts, add_special_tokens):
            calls.append([len(t) for t in texts])
            return [SimpleNamespace(ids=[len(t) % 1000, ord(t[0])]) for t in texts]

    opts = P.TextOptions(max_chars=200_000)
    monkeypatch.setattr(P, "_WORKER", {"tok": Spy(), "opts": opts, "jsonl": (False,)})
    giant = "orbit " * 500_000  # 3 MB: 15 pieces
    ids, lens, per_record, _ = P._tokenize_chunk([b"river stone", giant.encode(), b"ember"], [0, 0, 0])
    pieces = ["river stone", *split_giant(giant, 200_000), "ember"]
    assert per_record.tolist() == [1, len(pieces) - 2, 1] and lens.tolist() == [2] * len(pieces)
    assert ids.tolist() == [v for t in pieces for v in (len(t) % 1000, ord(t[0]))]
    assert sum(map(len, calls)) == len(pieces) and len(calls) > 1
    assert all(sum(c) <= P.ENCODE_BATCH_CHARS or len(c) == 1 for c in calls), calls


def test_giant_line_shards_do_not_depend_on_the_encode_batch(tmp_path, tok_file, monkeypatch):
    path, tok = tok_file
    rng = np.random.default_rng(4)
    giant = " ".join(_doc(rng, 40, 41) for _ in range(200))
    (tmp_path / "t.txt").write_text("\n".join([_doc(rng), giant, _doc(rng), giant[:5000]]) + "\n")
    kw = dict(tokenizer=path, max_chars=1000, shard_tokens=2000, workers=1, progress=False, log=None)
    for name, batch in (("one", 1 << 30), ("small", 2500)):  # one batch per chunk (the old way); 2-3 pieces
        monkeypatch.setattr(P, "ENCODE_BATCH_CHARS", batch, raising=False)
        m = preprocess_text([tmp_path / "t.txt"], tmp_path / name, **kw)
    assert _files(tmp_path / "one") == _files(tmp_path / "small")
    docs = [p for d in (tmp_path / "t.txt").read_text().splitlines() for p in split_giant(d, 1000)]
    assert m["stats"]["bad"]["giant"] == 2 and _rows(tmp_path / "small") == [
        tok.encode(d, add_special_tokens=False).ids for d in docs]


# -- universal newlines ---------------------------------------------------------------------------
@pytest.mark.parametrize("eol", ["\r", "\r\n", "\n"], ids=["cr", "crlf", "lf"])
def test_a_lone_cr_ends_a_line(tmp_path, tok_file, eol):
    """Old Mac OS files (\\r line ends) were read as one document."""
    path, tok = tok_file
    (tmp_path / "t.txt").write_bytes(eol.join(["river stone", "cloud forest", "", "lantern", ""]).encode())
    kw = dict(tokenizer=path, workers=1, progress=False, log=None)
    m = preprocess_text([tmp_path / "t.txt"], tmp_path / "line", **kw)
    ids = [tok.encode(d, add_special_tokens=False).ids for d in ("river stone", "cloud forest", "lantern")]
    assert _rows(tmp_path / "line") == ids and m["stats"]["bad"]["empty"] == 1
    preprocess_text([tmp_path / "t.txt"], tmp_path / "blank", docs="blank", **kw)
    assert _rows(tmp_path / "blank") == [tok.encode("river stone\ncloud forest", add_special_tokens=False).ids, ids[2]]


def test_jsonl_lines_end_at_lf_only(tmp_path, tok_file):
    """A raw \\r inside a JSONL line is JSON whitespace, not a line break."""
    (tmp_path / "t.jsonl").write_bytes(b'{"text":\r"river stone"}\r\n{"text": "cloud"}\r\r\n')
    m = preprocess_text([tmp_path / "t.jsonl"], tmp_path / "out", tokenizer=tok_file[0], workers=1, progress=False,
                        log=None)
    assert m["num_docs"] == 2 and not any(m["stats"]["bad"].values())


def test_universal_newline_reader_across_read_blocks():
    """Lines and offsets as re.split on \\r\\n|\\r|\\n gives them, for any read block size (a \\r\\n split
    across two reads is one break); reading on from any offset gives the remaining lines."""
    rng = np.random.default_rng(5)
    for _ in range(400):
        data = bytes(rng.choice(list(b"ab\r\n"), size=int(rng.integers(0, 24))))
        cap, block = int(rng.integers(0, 6)), int(rng.integers(1, 5))
        want, off, parts = [], 0, re.split(rb"(\r\n|\r|\n)", data)
        for line, eol in zip(parts[::2], parts[1::2] + [b""]):
            if line or eol:
                off += len(line) + len(eol)
                want.append((None if len(line) > cap else line, off))
        got = list(P._lines(io.BytesIO(data), 0, cap, True, block))
        assert got == want, (data, cap, block)
        for k, (_, start) in enumerate(got):
            f = io.BytesIO(data)
            f.seek(start)
            assert list(P._lines(f, start, cap, True, block)) == got[k + 1:], (data, start)


def test_interrupted_run_over_a_cr_file_resumes_byte_identical(tmp_path, tok_file, monkeypatch):
    """Resume positions stay exact byte offsets with \\r and \\r\\n line ends, also where a \\r\\n
    straddles two reads (7-byte reads here)."""
    path, tok = tok_file
    rng = np.random.default_rng(6)
    docs = [_doc(rng) for _ in range(300)]
    eols = rng.choice(["\r", "\r\n", "\r\r\n"], size=len(docs))  # \r\r\n: a line, then an empty one
    (tmp_path / "t.txt").write_bytes("".join(d + e for d, e in zip(docs, eols)).encode())
    monkeypatch.setattr(P, "READ_BLOCK", 7, raising=False)
    kw = dict(tokenizer=path, shard_tokens=300, workers=1, progress=False, log=None)
    full = preprocess_text([tmp_path / "t.txt"], tmp_path / "full", **kw)
    assert _rows(tmp_path / "full") == [tok.encode(d, add_special_tokens=False).ids for d in docs]
    assert full["stats"]["bad"]["empty"] == sum(e == "\r\r\n" for e in eols)

    def crash(index, record):
        if index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_text([tmp_path / "t.txt"], tmp_path / "cut", on_shard=crash, **kw)
    assert preprocess_text([tmp_path / "t.txt"], tmp_path / "cut", **kw) == full
    assert _files(tmp_path / "cut") == _files(tmp_path / "full")


# -- folders --------------------------------------------------------------------------------------
def test_linked_folders_are_followed_each_read_once(tmp_path, tok_file):
    """A linked folder inside an input folder was skipped without a word (linked files were read)."""
    path, tok = tok_file
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "in" / "a.txt").write_text("river stone\n")
    (tmp_path / "in" / "sub" / "b.txt").write_text("cloud forest\n")
    (tmp_path / "elsewhere" / "c.txt").write_text("lantern copper\n")
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "linked")  # followed
    os.symlink(tmp_path / "in" / "sub", tmp_path / "in" / "again")  # sub is read once, as sub/
    os.symlink(tmp_path / "in", tmp_path / "in" / "sub" / "up")  # a loop
    sources = find_inputs([tmp_path / "in"])
    assert [s.path for s in sources] == [str(tmp_path / p) for p in ("in/a.txt", "elsewhere/c.txt", "in/sub/b.txt")]
    preprocess_text([tmp_path / "in"], tmp_path / "out", tokenizer=path, workers=1, progress=False, log=None)
    assert _rows(tmp_path / "out") == [tok.encode(d, add_special_tokens=False).ids
                                       for d in ("river stone", "lantern copper", "cloud forest")]


def test_a_second_run_into_the_same_output_is_refused(tmp_path, corpus, tok_file):
    """One preprocess run per output directory (fastpt._lock, shared with pretrain): another process holding
    it is named by pid; once it is gone (its lock goes with it) the directory is free."""
    folder, _ = corpus
    path, _ = tok_file
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; from fastpt._lock import lock_dir; "
                               f"lock_dir({str(out)!r}, {P.LOCK_FILE!r}, 'x'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"output .*out is in use by another fastpt preprocess run \(pid "
                                             rf"{holder.pid}"):
            preprocess_text([folder], out, tokenizer=path, shard_tokens=500, workers=1, progress=False, log=None)
    finally:
        holder.kill()
        holder.wait()
    assert preprocess_text([folder], out, tokenizer=path, shard_tokens=500, workers=1, progress=False,
                           log=None)["num_docs"] > 0


def test_tokenizer_directory_hash_covers_added_tokens(tmp_path):
    # load_tokenizer reads added_tokens.json: a resumed run must see it change (it was not hashed)
    from fastpt.data.preprocess import _path_sha

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    before = _path_sha(tmp_path)
    (tmp_path / "added_tokens.json").write_text('{"covid19": 6}')
    assert _path_sha(tmp_path) != before


def test_blank_mode_takes_unicode_whitespace_lines_as_blank(tmp_path):
    # A line of only U+00A0 / U+3000 separates documents, as line mode (str.strip) and BERT's reader call
    # it blank; bytes.strip() kept it as text, merging the documents around it
    import sys

    from fastpt.data.preprocess import _BLANK_LINE

    (tmp_path / "b.txt").write_text("gamma one\n\xa0\ndelta one\n\u3000 \u2028\nepsilon\n\x1c\nzeta\n", encoding="utf-8")
    recs = list(read_records(find_inputs([tmp_path / "b.txt"]), "blank", cap=1000))
    assert [p for p, _, _ in recs] == [b"gamma one", b"delta one", b"epsilon", b"zeta"]
    # the byte pattern is exactly str.isspace, over every code point
    for c in range(sys.maxunicode + 1):
        if 0xD800 <= c <= 0xDFFF:
            continue
        ch = chr(c)
        assert bool(_BLANK_LINE.fullmatch(ch.encode())) == ch.isspace(), hex(c)


# -- compressed inputs: gzip, bzip2 and xz by their first bytes; zstd refused -----------------------
def _shard_files(out):
    return {n: b for n, b in _files(out).items() if n.startswith("shard-")}


@pytest.mark.parametrize("kind", ["bz2", "xz", "gzip-unnamed"])
def test_bzip2_xz_and_unnamed_gzip_inputs_are_decompressed(tmp_path, corpus, tok_file, kind):
    """Only a ``.gz`` name was decompressed: a .jsonl.bz2 / .jsonl.xz (or gzip data under another name) was
    tokenized as text, binary garbage with exit 0. Each is read by its first bytes now, JSONL by the name
    under the compression suffix, and an interrupted run over one resumes byte-identical."""
    import bz2
    import lzma

    folder, _ = corpus
    compress, suffix, compression = {"bz2": (bz2.compress, ".bz2", "bz2"), "xz": (lzma.compress, ".xz", "xz"),
                                     "gzip-unnamed": (gzip.compress, "", "gzip")}[kind]
    (tmp_path / "z").mkdir()
    for name in ("a.txt", "c.jsonl"):
        (tmp_path / "z" / (name + suffix)).write_bytes(compress((folder / name).read_bytes()))
    (tmp_path / "plain").mkdir()
    for name in ("a.txt", "c.jsonl"):
        (tmp_path / "plain" / name).write_bytes((folder / name).read_bytes())
    srcs = find_inputs([tmp_path / "z"])
    assert [(s.fmt, s.compression) for s in srcs] == [("text", compression), ("jsonl", compression)]
    kw = dict(tokenizer=tok_file[0], shard_tokens=1500, workers=1, progress=False, log=None)
    preprocess_text([tmp_path / "plain"], tmp_path / "ref", **kw)

    def crash(index, record):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_text([tmp_path / "z"], tmp_path / "cut", on_shard=crash, **kw)
    position = json.loads((tmp_path / "cut" / "manifest.json").read_text())["resume"]["position"]
    assert position[0] == 0 and position[1] > (tmp_path / "z" / ("a.txt" + suffix)).stat().st_size
    resumed = preprocess_text([tmp_path / "z"], tmp_path / "cut", **kw)
    full = preprocess_text([tmp_path / "z"], tmp_path / "full", **kw)
    assert resumed == full and _files(tmp_path / "cut") == _files(tmp_path / "full")
    assert _shard_files(tmp_path / "full") == _shard_files(tmp_path / "ref") and len(full["shards"]) > 3
    assert all(v == 0 for v in full["stats"]["bad"].values())


def test_zstd_input_is_refused_and_damaged_bzip2_xz_are_named(tmp_path, tok_file, capsys):
    """zstd (the stdlib has no decompressor) is an error naming the file and saying to decompress it, before
    anything is tokenized; truncated bzip2 / xz data is an error naming the file, not garbage or a traceback."""
    import bz2
    import lzma

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("river stone\n")
    (tmp_path / "in" / "data.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd\x24\x00\x00\x00garbage")
    rc = preprocess_main(_cli_args([tmp_path / "in"], tmp_path / "out", tok_file[0], "--workers", "1"))
    _error_line(rc, capsys.readouterr().err, "data.jsonl.zst", "zstd-compressed", "zstd -d")
    assert not (tmp_path / "out").exists()  # refused when the inputs are listed: before any work
    text = "\n".join(_doc(np.random.default_rng(2)) for _ in range(500)).encode()
    for name, data in (("t.txt.bz2", bz2.compress(text)), ("t.txt.xz", lzma.compress(text))):
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        rc = preprocess_main(_cli_args([tmp_path / name], tmp_path / f"out-{name}", tok_file[0], "--workers", "1"))
        _error_line(rc, capsys.readouterr().err, name, "damaged")


def test_input_fingerprint_of_plain_and_gz_files_is_unchanged(tmp_path):
    """Runs started before compression sniffing resume: a plain file's and a .gz's fingerprint are what
    they were; a .xz's (once tokenized raw) names its compression, so such a run is not resumed."""
    import lzma

    (tmp_path / "a.txt").write_text("river\n")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"stone\n"))
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(b"cloud\n"))
    a, b, c = find_inputs([tmp_path])
    for s in (a, b):
        assert s.fingerprint() == [s.path, s.fmt, s.size, s.mtime_ns]
    assert c.fingerprint() == [c.path, c.fmt, c.size, c.mtime_ns, "xz"]


# -- the main process writes a chunk's documents at once, as adding them one at a time did -----------
def test_main_loop_writes_what_adding_records_one_at_a_time_writes(tmp_path, tok_file, monkeypatch):
    """ShardWriter.add and the counting per document (~5 us) capped --workers at ~4 processes on short
    documents; a chunk is now written with add_many between the shard closes, in a handful of writes.
    The shards, and each commit's resume position and stats, are those of adding every record's pieces
    in turn and closing a full shard after a record (never inside a giant record's pieces)."""
    from fastpt.data import shards as S

    path, tok = tok_file
    rng = np.random.default_rng(11)
    lines = [_doc(rng, 1, 12) for _ in range(3000)]
    for i in range(0, 3000, 97):
        lines[i] = _doc(rng, 150, 151)  # giant: 3-8 pieces of max_chars
    for i in range(5, 3000, 131):
        lines[i] = ""
    for i in range(7, 3000, 173):
        lines[i] = "\x00\x00"  # no tokens
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    opts = P.TextOptions(max_chars=200)
    (tmp_path / "ref").mkdir()
    writer, want, counts = S.ShardWriter(tmp_path / "ref", np.dtype("<u2"), 700), [], {"docs": 0, "tokens": 0}
    offset = 0
    for n, line in enumerate(lines):
        offset += len(line) + 1
        for text in P.record_texts(line.encode(), False, opts)[0]:
            ids = tok.encode(text, add_special_tokens=False).ids
            if ids:
                writer.add(np.array(ids, dtype=np.uint32))
                counts["docs"] += 1
                counts["tokens"] += len(ids)
        if (record := writer.close_if_full()) is not None:
            want.append((record, [0, offset], n + 1, counts["docs"], counts["tokens"]))
    want.append((writer.close(), [0, offset], len(lines), counts["docs"], counts["tokens"]))

    writes, write = [0], S.ShardWriter._write

    def counted(self, k, data):
        writes[0] += 1
        write(self, k, data)

    def seen(index, record):
        m = json.loads((tmp_path / "out" / "manifest.json").read_text())
        st = m["stats"]
        got.append((record, m["resume"]["position"], st["records"], st["docs"], st["tokens"]))

    got = []
    monkeypatch.setattr(S.ShardWriter, "_write", counted)
    m = preprocess_text([tmp_path / "t.txt"], tmp_path / "out", tokenizer=path, max_chars=200, shard_tokens=700,
                        workers=1, progress=False, log=None, on_shard=seen)
    assert got == want and m["shards"] == [w[0] for w in want] and len(want) > 30
    assert _shard_files(tmp_path / "out") == _shard_files(tmp_path / "ref")
    assert m["stats"]["bad"]["giant"] == 31 and m["stats"]["bad"]["no_tokens"] == 18
    assert m["stats"]["giant_pieces"] == sum(len(split_giant(lines[i], 200)) for i in range(0, 3000, 97))
    # one write per file per shard opened, per chunk and per shard close: not two per document
    assert writes[0] <= 3 * (len(m["shards"]) + 2) < counts["docs"] // 10


def test_a_compression_suffix_on_text_is_named_as_such(tmp_path):
    """Only the name said zstd / xz: the error said "zstd-compressed" (advising zstd -d, which fails on text)
    or "damaged xz data"; it now says the bytes are not that format and how to read the file as text."""
    from fastpt.data.preprocess import find_inputs

    (tmp_path / "notes.zst").write_text("hello world\nagain\n")
    with pytest.raises(ValueError, match=r"notes\.zst: named \.zst but not zstd data .*rename it if it is text"):
        find_inputs([str(tmp_path / "notes.zst")], "auto")


@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_file_mode_takes_universal_newlines(tmp_path, eol):
    """--docs file kept \\r\\n and lone \\r (a byte-level BPE gave other ids than for the same file with \\n
    line ends) while line and blank modes read universal newlines; its resume position stays the raw file's
    size in bytes."""
    text = "river stone\ncloud \u4e2d\u6587 forest\n\n\nlantern\n"
    tok = train_tokenizer([text] * 5, "bpe", 300, min_frequency=1)
    path = tmp_path / "tok.json"
    tok.save(str(path))
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "a.txt").write_bytes(text.encode())
    (tmp_path / "other").mkdir()
    raw = text.replace("\n", eol).encode()
    (tmp_path / "other" / "a.txt").write_bytes(raw)
    kw = dict(tokenizer=path, docs="file", workers=1, progress=False, log=None)
    preprocess_text([tmp_path / "lf"], tmp_path / "out-lf", **kw)
    preprocess_text([tmp_path / "other"], tmp_path / "out-other", **kw)
    want = [tok.encode(text, add_special_tokens=False).ids]
    assert _rows(tmp_path / "out-lf") == want and _rows(tmp_path / "out-other") == want
    sources = find_inputs([tmp_path / "other"])
    assert list(read_records(sources, "file", 1 << 20)) == [(text.encode(), (0, len(raw)), len(raw))]


def test_unknown_tokens_are_counted_and_warned_about(tmp_path, tok_file):
    """[UNK] tokens went uncounted (a WordPiece tokenizer silently dropped 48% of a Thai corpus's text):
    stats.unk_tokens counts them, the summary line gives their share, and a note warns over 1%; a run an
    older fastpt interrupted (no unk_tokens in its manifest) counts its committed shards' on resuming."""
    path, tok = tok_file
    rng = np.random.default_rng(3)
    docs = [_doc(rng) + (" \u65e5\u672c \u2603x" if i % 5 == 0 else "") for i in range(300)]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n")
    unk = tok.token_to_id("[UNK]")
    n_unk = sum(tok.encode(d, add_special_tokens=False).ids.count(unk) for d in docs)
    n_tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    assert n_unk > 0.01 * n_tokens
    lines = []
    kw = dict(tokenizer=path, shard_tokens=400, workers=1, progress=False)
    full = preprocess_text([tmp_path / "t.txt"], tmp_path / "full", log=lines.append, **kw)
    assert full["stats"]["unk_tokens"] == n_unk and P.unknown_token_id(tok) == unk
    assert f"; unknown tokens: {n_unk:,} ({n_unk / n_tokens:.2%})" in lines[-2]
    assert lines[-1].startswith(f"preprocess: warning: {n_unk:,} of {n_tokens:,} tokens") and "[UNK]" in lines[-1]

    def crash(index, record):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_text([tmp_path / "t.txt"], tmp_path / "cut", on_shard=crash, log=None, **kw)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert 0 < manifest["stats"].pop("unk_tokens") < n_unk
    (tmp_path / "cut" / "manifest.json").write_text(json.dumps(manifest))
    assert preprocess_text([tmp_path / "t.txt"], tmp_path / "cut", log=None, **kw) == full

    clean = []
    (tmp_path / "clean.txt").write_text("\n".join(_doc(rng) for _ in range(50)) + "\n")
    m = preprocess_text([tmp_path / "clean.txt"], tmp_path / "clean", log=clean.append, **kw)
    assert m["stats"]["unk_tokens"] == 0 and clean[-1].endswith("; unknown tokens: 0")


def test_trained_wordpiece_keeps_long_unspaced_thai_words(tmp_path):
    """--train-tokenizer wordpiece turned every space-free run over 100 characters into one [UNK] (Thai: 48% of
    the characters lost, nothing reported); the trained tokenizer now splits them, and none is [UNK]."""
    from tokenizers import Tokenizer

    rng = np.random.default_rng(0)
    syllables = ["\u0e2a\u0e27\u0e31\u0e2a", "\u0e14\u0e35", "\u0e0a\u0e32\u0e27", "\u0e42\u0e25\u0e01",
                 "\u0e20\u0e32\u0e29\u0e32", "\u0e44\u0e17\u0e22", "\u0e40\u0e02\u0e35\u0e22\u0e19", "\u0e21\u0e35"]
    docs = [" ".join("".join(rng.choice(syllables, size=int(rng.integers(3, 50)))) for _ in range(3))
            for _ in range(200)]
    assert sum(len(w) > 100 for d in docs for w in d.split()) > 100
    (tmp_path / "th.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    m = preprocess_text([tmp_path / "th.txt"], tmp_path / "out", train_tokenizer="wordpiece", vocab_size=600,
                        lowercase=False, workers=1, progress=False, log=None)
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert m["stats"]["unk_tokens"] == 0
    assert [tok.decode(r).replace(" ", "") for r in _rows(tmp_path / "out")] == [d.replace(" ", "") for d in docs]
