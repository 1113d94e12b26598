"""fastpt preprocess: text -> shards gives exactly the tokenizer's ids, for every input kind;
bad lines counted; interrupted runs (an exception, a kill -9) resume to byte-identical output."""
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from fastpt.data.preprocess import (find_inputs, preprocess_main, preprocess_text, read_records,  # noqa: E402
                                    split_giant)
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
