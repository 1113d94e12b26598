"""Adversarial inputs to the data pipeline and the training recipe: ``fastpt preprocess``, the shard
reader, ``fastpt pretrain`` (config, data, output directory, checkpoints) and ``fastpt eval text``.

Each case must give a clear error naming the argument / key / file and what was expected (a
ConfigError for the recipe, a CorruptShardError / CorruptCheckpointError for a damaged file; on the
command line a nonzero exit and an ``error:`` line, no traceback), or the right result; never an
abort of the interpreter, an unrelated exception (a bare KeyError, a numpy / gzip / tokenizers
error from deep inside) or a silently wrong result, and nothing already written is lost.

Cases already covered by tests/data/test_{preprocess,shards,tokenizer}.py, tests/train/test_*.py
are not repeated here. Runs that could take the interpreter down run in a subprocess.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from fastpt.data.preprocess import preprocess_main, preprocess_text, split_giant  # noqa: E402
from fastpt.data.shards import CorruptShardError, ShardDataset, read_manifest, write_shards  # noqa: E402
from fastpt.data.tokenizer import train_tokenizer  # noqa: E402
from fastpt.train import ConfigError, pretrain  # noqa: E402
from fastpt.train import checkpoint as ckpt  # noqa: E402

from ..train.pretrain_helpers import SPECIALS, env, make_shards, recipe, tiny_model  # noqa: E402

WORDS = "river stone cloud forest lantern copper meadow signal harbor orbit velvet canyon".split()
QUIET = {"tensorboard": False, "plot": False, "progress": False, "save_every": 0}
NOLOG = dict(progress=False, log=None)


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    """A tiny WordPiece tokenizer file (vocab 60)."""
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    train_tokenizer(iter(_docs(100, seed=1)), "wordpiece", 60).save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 500-line text file: several shards at shard_tokens=500."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_docs(500)) + "\n")
    return path


def _files(out):
    return {f.name: f.read_bytes() for f in sorted(Path(out).iterdir())}


def _cli(main, argv, capsys):
    """Run a ``*_main`` entry point in-process: (exit status, stderr). An exception escaping it fails
    the test: the command line must turn user errors into an ``error:`` line and a nonzero status."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    except BaseException as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} escaped the command line: {exc}")
    return rc, capsys.readouterr().err


def _assert_clean_error(rc, err, *names):
    assert rc not in (0, None), f"exit status {rc} for a user error; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert lines, f"no error line on stderr: {err[-500:]}"
    for name in names:
        assert name in err, f"the error does not name {name!r}: {err[-500:]}"


def _subprocess(args, timeout=120):
    e = env()
    e.setdefault("TRITON_INTERPRET", "1")
    return subprocess.run([sys.executable, *args], env=e, capture_output=True, text=True, timeout=timeout)


# ============================================================================ preprocess: inputs


@pytest.mark.parametrize("name,data,bad", [
    ("empty.txt", b"", {}),
    ("blank.txt", b"\n\n   \n\t\n", {"empty": 4}),
    ("j.jsonl", b'{"text": 5}\n{"text": null}\n[1]\n"s"\n{bad\n{"body": "x"}\n',
     {"missing_text": 5, "invalid_json": 1}),
], ids=["empty-file", "blank-lines", "jsonl-all-bad"])
def test_corpus_with_no_usable_document(tmp_path, tok_file, name, data, bad):
    """Nothing usable: a finished, empty manifest whose stats say why; the reader then says there is no window."""
    (tmp_path / name).write_bytes(data)
    m = preprocess_text([tmp_path / name], tmp_path / "out", tokenizer=tok_file, workers=1, **NOLOG)
    assert m["complete"] and m["num_docs"] == 0 and {k: v for k, v in m["stats"]["bad"].items() if v} == bad
    with pytest.raises(ValueError, match="fewer than one window"):
        ShardDataset(tmp_path / "out", 8)


def test_nul_bytes_invalid_utf8_and_a_giant_line(tmp_path, tok_file):
    (tmp_path / "t.txt").write_bytes(b"river\x00stone\n\x00\x00\x00\n\xff\xfe\xfd\n" + b"orbit " * 20000 + b"\n")
    m = preprocess_text([tmp_path / "t.txt"], tmp_path / "out", tokenizer=tok_file, max_chars=1000, workers=1,
                        **NOLOG)
    bad = m["stats"]["bad"]
    pieces = len(split_giant("orbit " * 20000, 1000))
    assert bad["invalid_utf8"] == 1 and bad["giant"] == 1 and m["stats"]["giant_pieces"] == pieces
    assert bad["no_tokens"] == 2 and m["num_docs"] == 1 + pieces
    assert m["stats"]["max_doc_tokens"] <= 1000


_RANDOM_TEXT = "\n".join(_docs(300, seed=5)).encode()


@pytest.mark.parametrize("kind,data", [
    ("truncated", gzip.compress(_RANDOM_TEXT)[: len(gzip.compress(_RANDOM_TEXT)) // 2]),
    ("not-gzip", b"river stone\n"),
    ("bad-stream", b"\x1f\x8b\x08\x00garbage"),
], ids=["truncated", "not-gzip", "bad-stream"])
def test_damaged_gzip_input_is_named(tmp_path, tok_file, capsys, kind, data):
    """A .gz that does not decompress: either counted as bad input, or an error naming the file (not a bare
    EOFError / BadGzipFile traceback)."""
    src = tmp_path / f"in-{kind}.txt.gz"
    src.write_bytes(data)
    rc, err = _cli(preprocess_main, [str(src), str(tmp_path / "out"), "--tokenizer", str(tok_file), "--workers", "1",
                                     "--no-progress"], capsys)
    if rc != 0:
        _assert_clean_error(rc, err, src.name)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_unreadable_input_is_named(tmp_path, tok_file, capsys):
    src = tmp_path / "secret.txt"
    src.write_text("river stone\n")
    src.chmod(0)
    rc, err = _cli(preprocess_main, [str(src), str(tmp_path / "out"), "--tokenizer", str(tok_file), "--no-progress"],
                   capsys)
    _assert_clean_error(rc, err, "secret.txt")


def test_symlink_loops_and_dangling_links_in_a_folder(tmp_path, tok_file):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("river stone\n")
    os.symlink(tmp_path / "in", tmp_path / "in" / "self")  # a directory loop
    os.symlink(tmp_path / "in" / "y", tmp_path / "in" / "x")  # a link loop
    os.symlink(tmp_path / "in" / "x", tmp_path / "in" / "y")
    m = preprocess_text([tmp_path / "in"], tmp_path / "out", tokenizer=tok_file, workers=1, **NOLOG)
    assert m["num_docs"] == 1


@pytest.mark.parametrize("case", ["out-under-a-file", "out-is-a-file", "tokenizer-missing", "tokenizer-corrupt",
                                  "tokenizer-empty", "folder-without-files"])
def test_paths_named_on_the_command_line(tmp_path, corpus, tok_file, capsys, case):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "nofiles" / ".hidden").mkdir(parents=True)
    src, out, tok, named = str(corpus), str(tmp_path / "out"), str(tok_file), None
    if case == "out-under-a-file":
        out = named = str(tmp_path / "afile" / "sub")
    elif case == "out-is-a-file":
        out = named = str(tmp_path / "afile")
    elif case == "tokenizer-missing":
        tok = named = str(tmp_path / "nope.json")
    elif case == "tokenizer-corrupt":
        tok = named = str(tmp_path / "bad.json")
    elif case == "tokenizer-empty":
        tok = named = str(tmp_path / "empty.json")
    else:
        src = named = str(tmp_path / "nofiles")
    rc, err = _cli(preprocess_main, [src, out, "--tokenizer", tok, "--no-progress"], capsys)
    _assert_clean_error(rc, err, named)


# ============================================================================ preprocess: tokenizer training


@pytest.mark.parametrize("kw,name", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(vocab_size=100, min_frequency=-1), "min_frequency"),
    (dict(vocab_size=100, sentinels=-3), "sentinels"),
    (dict(vocab_size=100, train_docs=0), "train_docs"),
    (dict(vocab_size=100, train_docs=-1), "train_docs"),
])
def test_train_tokenizer_arguments(tmp_path, corpus, kw, name):
    """min_frequency -1 raised tokenizers' OverflowError; sentinels -3 gave a vocabulary over vocab_size;
    train_docs 0 / -1 trained on no document: a tokenizer of the 5 specials, every word [UNK]."""
    with pytest.raises(ValueError, match=name):
        preprocess_text([corpus], tmp_path / "out", train_tokenizer="wordpiece", workers=1, **kw, **NOLOG)


def test_train_tokenizer_on_a_corpus_without_text(tmp_path):
    """Training on blank lines gave a tokenizer of only the specials (and an empty output): it has nothing
    to learn from, which must be said."""
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"(?i)no (usable )?(text|document)"):
        preprocess_text([tmp_path / "blank.txt"], tmp_path / "out", train_tokenizer="wordpiece", vocab_size=100,
                        workers=1, **NOLOG)


@pytest.mark.parametrize("vocab", [2**33, 10**9])
def test_huge_vocab_size_does_not_abort(tmp_path, corpus, vocab):
    """--vocab-size 1e9 made the tokenizers trainer allocate 70 GB and abort the process (Rust OOM);
    a vocabulary beyond uint32 ids cannot be stored at all."""
    r = _subprocess(["-m", "fastpt", "preprocess", str(corpus), str(tmp_path / "out"), "--train-tokenizer",
                     "wordpiece", "--vocab-size", str(vocab), "--workers", "1", "--no-progress"])
    assert r.returncode in (0, 1, 2), f"exit status {r.returncode}: {r.stderr[-1500:]}"
    assert "Traceback" not in r.stderr and "memory allocation" not in r.stderr, r.stderr[-1500:]
    if vocab > 2**32 or r.returncode:
        assert r.returncode != 0 and "vocab" in r.stderr.replace("-", "_").lower(), r.stderr[-1500:]


# ============================================================================ preprocess: resume / output dir


@pytest.fixture()
def interrupted(tmp_path, corpus, tok_file):
    """A run cut after its second shard (manifest complete: false), and the clean run's files."""
    kw = dict(tokenizer=tok_file, shard_tokens=500, workers=1, **NOLOG)
    preprocess_text([corpus], tmp_path / "ref", **kw)

    def crash(index, record):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_text([corpus], tmp_path / "cut", on_shard=crash, **kw)
    return tmp_path / "cut", _files(tmp_path / "ref"), kw


def _resume_named_or_exact(out, ref, corpus, kw, names=("manifest.json",)):
    try:
        m = preprocess_text([corpus], out, **kw)
    except ValueError as exc:
        assert any(n in str(exc) for n in names), f"the error does not name {names}: {exc}"
        return
    assert m["complete"] and _files(out) == ref, "the resumed run does not match an uninterrupted one"


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "a-list", "no-resume", "stats-null",
                                    "position-past-the-end", "manifest-deleted", "tokenizer-deleted"])
def test_resume_with_a_damaged_manifest(interrupted, corpus, damage):
    """An unreadable manifest gave a bare JSONDecodeError (not naming the file), a KeyError,
    TypeError or AttributeError; a resume position past the end finished silently with 37 of 500 documents."""
    out, ref, kw = interrupted
    mpath = out / "manifest.json"
    text = mpath.read_text()
    m = json.loads(text)
    if damage == "garbage":
        mpath.write_text("{garbage")
    elif damage == "empty":
        mpath.write_text("")
    elif damage == "truncated":
        mpath.write_text(text[: len(text) // 2])
    elif damage == "a-list":
        mpath.write_text("[1, 2]")
    elif damage == "no-resume":
        del m["resume"]
        mpath.write_text(json.dumps(m))
    elif damage == "stats-null":
        m["stats"] = None
        mpath.write_text(json.dumps(m))
    elif damage == "position-past-the-end":
        m["resume"]["position"] = [99, -5]
        mpath.write_text(json.dumps(m))
    elif damage == "manifest-deleted":
        mpath.unlink()
    else:
        (out / "tokenizer.json").unlink()
    _resume_named_or_exact(out, ref, corpus, kw)


def test_resume_after_a_committed_shard_was_truncated(interrupted, corpus):
    """The resumed run trusted the damaged shard and marked the directory complete; the reader then said
    'rerun fastpt preprocess', which did nothing (see the next test)."""
    out, ref, kw = interrupted
    victim = out / "shard-00000.bin"
    victim.write_bytes(victim.read_bytes()[:10])
    _resume_named_or_exact(out, ref, corpus, kw, names=("shard-00000.bin",))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_rerun_on_a_finished_dir_with_a_damaged_shard(tmp_path, corpus, tok_file, damage):
    """ShardDataset says '...shard-00001.bin: missing; rerun fastpt preprocess', and the rerun said
    'already complete; nothing to do': the user is sent round in a loop."""
    kw = dict(tokenizer=tok_file, shard_tokens=500, workers=1, **NOLOG)
    out = tmp_path / "out"
    preprocess_text([corpus], out, **kw)
    ref = _files(out)
    victim = out / "shard-00001.bin"
    victim.unlink() if damage == "deleted" else victim.write_bytes(victim.read_bytes()[:6])
    with pytest.raises(CorruptShardError, match="shard-00001.bin"):
        read_manifest(out)
    _resume_named_or_exact(out, ref, corpus, kw, names=("shard-00001.bin",))


def test_two_runs_into_the_same_output(tmp_path, corpus, tok_file):
    """A second run started while the first is mid-shard 'resumed' it, deleting the first one's open
    .tmp files: the first died with "[Errno 2] No such file or directory: '...shard-00003.bin.tmp'".
    The second run must refuse (naming the directory) or wait; the first must finish intact."""
    out, flag = tmp_path / "out", tmp_path / "paused"
    kw = dict(tokenizer=tok_file, shard_tokens=500, workers=1, **NOLOG)
    preprocess_text([corpus], tmp_path / "ref", **kw)
    script = textwrap.dedent(f"""
        import pathlib, time
        import fastpt.data.shards as S
        from fastpt.data.preprocess import preprocess_text
        add_many, paused = S.ShardWriter.add_many, [False]
        def slow_add_many(self, ids, lengths):
            add_many(self, ids, lengths)
            if self.index == 2 and not paused[0]:  # in shard 2: its .tmp files are open
                paused[0] = True
                pathlib.Path({str(flag)!r}).write_text("x")
                time.sleep(4)
        S.ShardWriter.add_many = slow_add_many
        preprocess_text([{str(corpus)!r}], {str(out)!r}, tokenizer={str(tok_file)!r}, shard_tokens=500, workers=1,
                        progress=False, log=None)
    """)
    e = env()
    first = subprocess.Popen([sys.executable, "-c", script], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert first.poll() is None, first.communicate()[1][-1500:]
            assert time.monotonic() < deadline, "the first run never reached its pause"
            time.sleep(0.05)
        try:
            preprocess_text([corpus], out, **kw)
        except (ValueError, RuntimeError, OSError) as exc:
            assert str(out) in str(exc), f"the refusal does not name the directory: {exc}"
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, f"the first run failed: {err[-1500:]}"
    read_manifest(out)
    assert _files(out) == _files(tmp_path / "ref")


# ============================================================================ shards: tampered manifests


@pytest.fixture()
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 97, size=int(rng.integers(3, 20))) for _ in range(30)]
    write_shards(tmp_path / "s", docs, vocab_size=97, shard_tokens=100, special_tokens=SPECIALS)
    return tmp_path / "s"


def _edit_manifest(root, fn):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m = fn(m) or m
    path.write_text(json.dumps(m))


def _set(*keys, value=KeyError):
    def fn(m):
        node = m
        for k in keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return fn


@pytest.mark.parametrize("edit", [
    _set("dtype", value="bogus"), _set("dtype"), _set("shards"), _set("shards", value=None), _set("num_docs"),
    _set("shards", 0, "bin"), _set("shards", 0, "tokens", value="12"), _set("special_tokens", value={"cls": "x"}),
    _set("special_tokens", value=None), _set("vocab_size"), lambda m: [m],
], ids=["dtype-bogus", "dtype-missing", "shards-missing", "shards-null", "num_docs-missing", "shard-bin-missing",
        "tokens-str", "special-str", "special-null", "vocab_size-missing", "not-a-mapping"])
@pytest.mark.parametrize("verify", [True, False])
def test_edited_manifest_is_named(shard_dir, edit, verify):
    """These gave TypeError / KeyError / AttributeError / int() ValueErrors not naming the manifest."""
    _edit_manifest(shard_dir, edit)
    with pytest.raises(ValueError, match="manifest.json"):  # CorruptShardError is a ValueError
        ShardDataset(shard_dir, 8, verify=verify)


@pytest.mark.parametrize("role,tid", [("sep", 5000), ("cls", -1)])
def test_special_ids_outside_the_vocabulary(shard_dir, role, tid):
    """The samples silently held ids outside [0, vocab_size) (an embedding IndexError later, or garbage)."""
    _edit_manifest(shard_dir, _set("special_tokens", role, value=tid))
    with pytest.raises(ValueError, match=rf"{role}|special"):
        ShardDataset(shard_dir, 8)


def test_non_monotonic_idx_without_verify(shard_dir):
    """verify=False skips checksums, but an offset table that goes backwards gave a numpy broadcast error
    (or silently empty / wrong documents); checking it is O(docs) reading 8 bytes per document."""
    idx = shard_dir / "shard-00000.idx"
    a = np.fromfile(idx, "<i8")
    a[2] = -50
    a.tofile(idx)
    with pytest.raises(CorruptShardError, match="shard-00000.idx"):
        ds = ShardDataset(shard_dir, 8, verify=False)
        for i in range(ds.num_samples):
            ds.window(i)


# ============================================================================ shards: arguments


def _raises_naming(exc_types, name, fn):
    with pytest.raises(exc_types, match=name):
        fn()


def test_seq_len_one_and_huge(shard_dir):
    ds = ShardDataset(shard_dir, 1)
    assert ds.window(0)["input_ids"].tolist() == [SPECIALS["cls"]] and ds.num_samples > 100
    assert ShardDataset(shard_dir, 1, mode="doc", add_special="none").document(0)["attention_mask"].tolist() == [1]
    with pytest.raises(ValueError, match="seq_len=1 leaves no room"):
        ShardDataset(shard_dir, 1, mode="doc")
    with pytest.raises(ValueError, match="fewer than one window of seq_len=1000000000"):
        ShardDataset(shard_dir, 10**9)


@pytest.mark.parametrize("kw,name", [
    (dict(seq_len=2.5), "seq_len"),  # silently became 2
    (dict(world_size=2.0), "world_size"),  # TypeError: 'float' object cannot be interpreted as an integer
    (dict(rank=0.5, world_size=2), "rank"),
    (dict(num_epochs=-1), "num_epochs"),  # silently no sample at all
], ids=["seq_len-2.5", "world_size-2.0", "rank-0.5", "num_epochs-neg"])
def test_dataset_argument_types(shard_dir, kw, name):
    kw = {"seq_len": 8, **kw}
    _raises_naming((TypeError, ValueError), name, lambda: next(ShardDataset(shard_dir, **kw).batches(2)))


@pytest.mark.parametrize("world", [(0, 0), (-1, 2), (2, 2)])
def test_rank_out_of_range(shard_dir, world):
    rank, world_size = world
    _raises_naming(ValueError, "rank", lambda: ShardDataset(shard_dir, 8, rank=rank, world_size=world_size))


def test_more_ranks_than_samples(shard_dir):
    """Every rank still gets one sample per epoch (wrapping), each a valid window."""
    ds = ShardDataset(shard_dir, 200, rank=999, world_size=1000)
    assert len(ds) == 1 and ds.sample(0)["input_ids"].shape == (200,)


@pytest.mark.parametrize("batch", [0, -2])
def test_batches_of_no_rows(shard_dir, batch):
    """Gave 'collate: no samples', not naming batch_size."""
    _raises_naming(ValueError, "batch_size", lambda: next(ShardDataset(shard_dir, 8).batches(batch)))


@pytest.mark.parametrize("mode,i", [("pack", 10**6), ("pack", -1), ("doc", 10**6), ("doc", -1)])
def test_window_and_document_out_of_range(shard_dir, mode, i):
    """Gave 'list index out of range', a numpy broadcast error or a numpy IndexError about axis 0."""
    ds = ShardDataset(shard_dir, 8, mode=mode)
    fn = ds.window if mode == "pack" else ds.document
    _raises_naming(IndexError, str(i), lambda: fn(i))


@pytest.mark.parametrize("state", [None, "no-consumed", {"consumed": -5}, {"consumed": "x"}])
def test_load_state_dict_bad_position(shard_dir, state):
    """None: AttributeError; no consumed: KeyError; -5: accepted (a negative position); 'x': int() error."""
    ds = ShardDataset(shard_dir, 8)
    good = ds.state_dict()
    if state == "no-consumed":
        state = {k: v for k, v in good.items() if k != "consumed"}
    elif isinstance(state, dict):
        state = {**good, **state}
    _raises_naming((ValueError, TypeError), r"consumed|state", lambda: ds.load_state_dict(state))


# ============================================================================ pretrain: recipe and data


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "s", n_docs=40, max_len=20)


def _recipe(shards, out, **sections):
    sections["output"] = {**QUIET, **sections.get("output", {})}
    sections["train"] = {"max_steps": 1, **sections.get("train", {})}
    return recipe(shards, out, **sections)


@pytest.mark.parametrize("case", ["not-shards", "missing", "a-file", "seq-too-long", "eos-missing", "doc-seq-1"])
def test_data_errors_are_config_errors(shards, tmp_path, case):
    """These raised FileNotFoundError / ValueError from the shard reader: right words, but not a ConfigError,
    so `fastpt pretrain` printed a traceback (it catches ConfigError and CorruptCheckpointError)."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("hello\n")
    data, key = {}, "data.path"
    if case == "not-shards":
        data["path"] = str(tmp_path / "plain")
    elif case == "missing":
        data["path"] = str(tmp_path / "nowhere")
    elif case == "a-file":
        data["path"] = str(tmp_path / "plain" / "a.txt")
    elif case == "seq-too-long":
        data["seq_len"], key = 100000, "data.seq_len"
    elif case == "eos-missing":
        data["add_special"], key = "eos", "data.add_special"
    else:
        data.update(seq_len=1, mode="doc")
        key = "data.seq_len"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pretrain(_recipe(shards, tmp_path / "run", data=data), log=lambda m: None)


@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_seq_len_beyond_the_models_positions(tmp_path, mode):
    """Pack mode with documents longer than max_positions=64 died with a bare 'IndexError: index out of range
    in self' from the position embedding; doc mode with a ValueError during the first step."""
    long = make_shards(tmp_path / "long", n_docs=12, min_len=100, max_len=150)
    cfg = _recipe(long, tmp_path / "run", data={"seq_len": 128, "mode": mode})
    with pytest.raises(ConfigError, match=r"seq_len|max_positions"):
        pretrain(cfg, log=lambda m: None)


@pytest.mark.parametrize("train,key", [
    ({"max_steps": 0}, "train.max_steps"), ({"grad_accum": 0}, "train.grad_accum"),
    ({"grad_accum": 1.5}, "train.grad_accum"), ({"grad_accum": True}, "train.grad_accum"),
    ({"batch_size": -1}, "train.batch_size"), ({"lr": float("nan")}, "train.lr"),
])
def test_recipe_values(shards, tmp_path, train, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pretrain(_recipe(shards, tmp_path / "run", train=train), log=lambda m: None)


def test_batch_larger_than_the_data_and_odd_grad_accum(shards, tmp_path):
    """More rows per step than windows in the corpus: the stream wraps into the next epochs."""
    s = pretrain(_recipe(shards, tmp_path / "run", train={"batch_size": 64, "grad_accum": 3}), log=lambda m: None)
    assert s["steps"] == 1 and np.isfinite(s["final_loss"]) and s["tokens"] == 64 * 3 * 17


@pytest.mark.parametrize("case", ["dir-is-a-file", "dir-under-a-file", "checkpoints-is-a-file"])
def test_unusable_output_dir_fails_before_training(shards, tmp_path, case):
    """output.dir a file: FileExistsError / NotADirectoryError (a traceback on the command line);
    output.dir/checkpoints a file: the run trained to the end and then died saving, losing the work."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if case == "dir-is-a-file" else \
        tmp_path / "afile" / "sub" if case == "dir-under-a-file" else tmp_path / "run"
    if case == "checkpoints-is-a-file":
        out.mkdir()
        (out / "checkpoints").write_text("x")
    logged = []
    with pytest.raises(ConfigError, match=r"output\.dir|checkpoints"):
        pretrain(_recipe(shards, out, train={"max_steps": 2}), log=logged.append)
    assert not any("steps" in m and "tokens" in m for m in logged), "it trained before failing"


# ============================================================================ pretrain: checkpoints


def _save(root, step):
    def write_model(d):  # the two files of a model directory (not read here)
        (d / "fastpt_config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"weights")

    return ckpt.save_checkpoint(root, step, write_model=write_model, optimizer_state=None,
                                trainer_state={"tokens": 0}, rng_tensors={"cpu": torch.zeros(1)})


@pytest.mark.parametrize("damage", ["a-list", "files-a-list", "record-not-a-dict", "record-without-bytes",
                                    "format-missing"])
def test_malformed_checkpoint_json(tmp_path, damage):
    """A checkpoint.json of the wrong shape gave AttributeError / TypeError / KeyError instead of
    CorruptCheckpointError (so no fallback to the previous checkpoint)."""
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    mpath = bad / "checkpoint.json"
    m = json.loads(mpath.read_text())
    if damage == "a-list":
        m = [m]
    elif damage == "files-a-list":
        m["files"] = list(m["files"])
    elif damage == "record-not-a-dict":
        m["files"]["trainer_state.json"] = 5
    elif damage == "record-without-bytes":
        del m["files"]["trainer_state.json"]["bytes"]
    else:
        del m["format"]
    mpath.write_text(json.dumps(m))
    with pytest.raises(ckpt.CorruptCheckpointError, match="step-00000002"):
        ckpt.verify_checkpoint(bad)
    warned = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warned.append).name == "step-00000001"
    assert warned and "step-00000002" in warned[0]


@pytest.mark.parametrize("damage", ["dir-renamed", "manifest-step-edited", "state-step-edited"])
def test_checkpoint_step_numbering_must_agree(tmp_path, damage):
    """step-00000005 holding the state of step 2 (or a checkpoint.json / trainer_state.json saying another
    step) was accepted: a resume restarted at step 2 and kept picking that directory as the newest."""
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    if damage == "dir-renamed":
        bad = bad.rename(tmp_path / "step-00000005")
    elif damage == "manifest-step-edited":
        _edit_manifest_file(bad / "checkpoint.json", "step", 7)
    else:
        _edit_manifest_file(bad / "trainer_state.json", "step", 7)
        m = json.loads((bad / "checkpoint.json").read_text())  # a consistent edit: checksums updated
        from fastpt.data.shards import sha256_file
        m["files"]["trainer_state.json"] = {"bytes": (bad / "trainer_state.json").stat().st_size,
                                            "sha256": sha256_file(bad / "trainer_state.json")}
        (bad / "checkpoint.json").write_text(json.dumps(m))
    with pytest.raises(ckpt.CorruptCheckpointError, match=bad.name):
        ckpt.verify_checkpoint(bad)
    assert ckpt.latest_checkpoint(tmp_path, warn=lambda m: None).name == "step-00000001"


def _edit_manifest_file(path, key, value):
    m = json.loads(path.read_text())
    m[key] = value
    path.write_text(json.dumps(m))


# ============================================================================ the command lines, in subprocesses


def test_pretrain_cli_data_path_not_shards(shards, tmp_path):
    """A data.path without a manifest printed a FileNotFoundError traceback (exit 1)."""
    import yaml

    (tmp_path / "plain").mkdir()
    cfg = _recipe(shards, tmp_path / "run", data={"path": str(tmp_path / "plain")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    r = _subprocess(["-m", "fastpt", "pretrain", "--config", str(tmp_path / "r.yaml")])
    _assert_clean_error(r.returncode, r.stderr, "data.path", str(tmp_path / "plain"))


def test_pretrain_cli_bad_yaml_and_output_file(shards, tmp_path):
    import yaml

    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    r = _subprocess(["-m", "fastpt", "pretrain", "--config", str(tmp_path / "bad.yaml")])
    _assert_clean_error(r.returncode, r.stderr, "bad.yaml", "not valid YAML")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(shards, tmp_path / "afile")))
    r = _subprocess(["-m", "fastpt", "pretrain", "--config", str(tmp_path / "r.yaml")])
    _assert_clean_error(r.returncode, r.stderr, "output.dir")


def test_preprocess_cli_bad_argument_values(tmp_path, corpus):
    """--min-frequency -1 printed tokenizers' OverflowError traceback."""
    r = _subprocess(["-m", "fastpt", "preprocess", str(corpus), str(tmp_path / "out"), "--train-tokenizer",
                     "wordpiece", "--vocab-size", "100", "--min-frequency", "-1", "--no-progress"])
    _assert_clean_error(r.returncode, r.stderr, "min")


def test_preprocess_cli_options_that_would_be_ignored_or_crash(tmp_path, corpus, tok_file, capsys):
    """Training options without --train-tokenizer were ignored; --workers 0 accepted; a huge
    --max-chars (to turn splitting off) raised MemoryError / OverflowError from the reader."""
    out = str(tmp_path / "out")
    for extra, name in ((["--vocab-size", "500"], "--vocab-size: only with --train-tokenizer"),
                        (["--cased"], "--cased: only with --train-tokenizer"),
                        (["--workers", "0"], "workers"),
                        (["--max-chars", "100000000000"], "max_chars: expected an integer in [1,"),
                        (["--max-chars", "99999999999999999999"], "max_chars")):
        rc, err = _cli(preprocess_main, [str(corpus), out, "--tokenizer", str(tok_file), "--no-progress", *extra],
                       capsys)
        _assert_clean_error(rc, err, name)


def test_lone_surrogates_in_jsonl_are_invalid_utf8(tmp_path, tok_file):
    """A JSON escape of half a UTF-16 pair ("\\ud83d") decodes to a lone surrogate, which no tokenizer
    can encode: the run died on that record, resume after resume. It is invalid UTF-8: replaced (U+FFFD)
    or skipped with --bad-utf8 skip, and counted."""
    path = tmp_path / "sur.jsonl"
    path.write_text('{"text": "river stone"}\n{"text": "broken \\ud83d cloud"}\n{"text": "forest"}\n')
    for bad, docs in (("replace", 3), ("skip", 2)):
        m = preprocess_text([path], tmp_path / bad, tokenizer=tok_file, bad_utf8=bad, workers=1, **NOLOG)
        assert m["num_docs"] == docs and m["stats"]["bad"]["invalid_utf8"] == 1
    m = preprocess_text([path], tmp_path / "trained", train_tokenizer="bpe", vocab_size=300, workers=1, **NOLOG)
    assert m["num_docs"] == 3


def test_vocabulary_with_gaps_sizes_the_dtype_by_its_largest_id(tmp_path):
    """A vocabulary of 101 entries whose largest id is 70000 needs uint32: counted by entries it was
    stored as uint16 and 70000 wrapped to 4464, silently."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)} | {"far": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "in.txt").write_text("w5 far w6\n")
    m = preprocess_text([tmp_path / "in.txt"], tmp_path / "out", tokenizer=tmp_path / "tok.json", workers=1, **NOLOG)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70001
    ds = ShardDataset(tmp_path / "out", 8, mode="doc", shuffle=False, add_special="none")
    assert ds.document(0)["input_ids"][:3].tolist() == [5, 70000, 6]
    from fastpt.data.shards import ShardWriter

    with pytest.raises(ValueError, match="token id 70000 does not fit the shards' uint16"):
        ShardWriter(tmp_path / "w", np.dtype("<u2"), 100).add(np.array([1, 70000], dtype=np.uint32))


def test_output_directory_files_the_run_did_not_write_are_kept(tmp_path, corpus, tok_file):
    """Only the run's own files (shard-N.bin/.idx, manifest.json, tokenizer.json and their .tmp) count as
    leftovers: a directory holding the user's notes.tmp was emptied, and a --tokenizer inside the output
    directory was deleted before it was read."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        preprocess_text([corpus], out, tokenizer=tok_file, **NOLOG)
    assert (out / "notes.tmp").read_text() == "mine"
    inside = tmp_path / "out2"
    inside.mkdir()
    (inside / "tokenizer.json").write_bytes(tok_file.read_bytes())
    with pytest.raises(ValueError, match="tokenizer: .* is inside the output directory"):
        preprocess_text([corpus], inside, tokenizer=inside / "tokenizer.json", **NOLOG)
    assert (inside / "tokenizer.json").read_bytes() == tok_file.read_bytes()


def test_output_directory_inside_an_input_folder_is_not_read(tmp_path, tok_file):
    """``fastpt preprocess corpus corpus/out``: the run's own manifest and tokenizer were read back as
    corpus text on a rerun (and the rerun of a finished run found different inputs)."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.TXT").write_text("\n".join(_docs(50)) + "\n")
    (tmp_path / "corpus" / "b.JSONL").write_text('{"text": "river stone"}\n')  # any letter case is JSONL
    out = tmp_path / "corpus" / "out"
    first = preprocess_text([tmp_path / "corpus"], out, tokenizer=tok_file, **NOLOG)
    assert first["num_docs"] == 51
    again = preprocess_text([tmp_path / "corpus"], out, tokenizer=tok_file, **NOLOG)  # already complete
    assert again["fingerprint"] == first["fingerprint"]
    assert preprocess_text([tmp_path / "corpus"], out, tokenizer=tok_file, overwrite=True, **NOLOG)["num_docs"] == 51


# ============================================================================ eval text


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tok_file):
    import yaml

    d = tmp_path_factory.mktemp("eval")
    model = tiny_model()
    model["backbone"]["vocab_size"] = 64
    (d / "tiny.yaml").write_text(yaml.safe_dump(model))
    (d / "train.tsv").write_text("".join(f"{'a' if i % 2 else 'b'}\triver stone {'cloud' if i % 2 else 'forest'}\n"
                                         for i in range(12)))
    return d


def test_label_file_with_a_byte_order_mark(tmp_path):
    """A UTF-8 BOM made the first label '\\ufeffa', a class of its own (preprocess strips the BOM)."""
    from fastpt.data.tasks import read_rows

    (tmp_path / "bom.tsv").write_text("a\triver\nb\tstone\na\tcloud\n", encoding="utf-8-sig")
    assert [r[1] for r in read_rows(tmp_path / "bom.tsv")] == ["a", "b", "a"]


@pytest.mark.parametrize("extra,name", [
    (["--max-len", "0"], "max"),  # trained and scored on empty rows
    (["--max-len", "-3"], "max"),  # OverflowError traceback from tokenizers
    (["--batch-size", "0"], "batch"),  # silently used 32
    (["--lr", "-1"], "lr"),  # gradient ascent
    (["--head-lr", "0"], "lr"),
    (["--epochs", "-1"], "epochs"),
    (["--test-fraction", "0"], "test_fraction"),
], ids=["max-len-0", "max-len-neg", "batch-size-0", "lr-neg", "head-lr-0", "epochs-neg", "test-fraction-0"])
def test_eval_text_argument_values(eval_setup, tok_file, capsys, extra, name):
    from fastpt.train.evaluate import eval_main

    argv = ["text", "--config", str(eval_setup / "tiny.yaml"), "--from-scratch", "--tokenizer", str(tok_file),
            "--train", str(eval_setup / "train.tsv"), "--epochs", "1", "--device", "cpu", "--precision", "fp32"]
    rc, err = _cli(eval_main, argv + extra, capsys)
    _assert_clean_error(rc, err)
    assert name in err.replace("-", "_").lower(), err[-500:]


@pytest.mark.parametrize("label_file,named", [
    ("", "empty.tsv"), ("a river\n", "notab.tsv:1"), ("c\triver\n", "unknown.tsv:1"),
], ids=["empty", "missing-tab", "unknown-label"])
def test_eval_text_bad_test_file(eval_setup, tok_file, capsys, tmp_path, label_file, named):
    from fastpt.train.evaluate import eval_main

    path = tmp_path / named.split(":")[0]
    path.write_text(label_file)
    argv = ["text", "--config", str(eval_setup / "tiny.yaml"), "--from-scratch", "--tokenizer", str(tok_file),
            "--train", str(eval_setup / "train.tsv"), "--test", str(path), "--epochs", "1", "--device", "cpu"]
    rc, err = _cli(eval_main, argv, capsys)
    _assert_clean_error(rc, err, named)


def test_eval_out_under_a_file(eval_setup, tok_file, capsys, tmp_path):
    """--out below a file raised FileExistsError after the whole evaluation (outside the error handling)."""
    from fastpt.train.evaluate import eval_main

    (tmp_path / "afile").write_text("x")
    argv = ["text", "--config", str(eval_setup / "tiny.yaml"), "--from-scratch", "--tokenizer", str(tok_file),
            "--train", str(eval_setup / "train.tsv"), "--epochs", "1", "--device", "cpu",
            "--out", str(tmp_path / "afile" / "r.json")]
    rc, err = _cli(eval_main, argv, capsys)
    _assert_clean_error(rc, err, "afile")


# ============================================================================ images


@pytest.fixture()
def image_folder(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "src" / c / f"{i}.pgm").write_bytes(b"P5\n4 4\n255\n" + bytes(range(16)))
    return tmp_path / "src"


@pytest.mark.parametrize("kw,name", [(dict(image_size=0), "image_size"), (dict(image_size=-2), "image_size"),
                                     (dict(channels=0), "channels")], ids=["size-0", "size-neg", "channels-0"])
def test_image_arguments_are_named(tmp_path, image_folder, kw, name):
    """Gave '<folder>: no readable image' (every image counted unreadable), blaming the data."""
    from fastpt.data.images import preprocess_images

    with pytest.raises(ValueError, match=name):
        preprocess_images(image_folder, tmp_path / "out", progress=False, log=None, **kw)


def test_image_dataset_with_a_corrupt_manifest(tmp_path, image_folder):
    """A bare JSONDecodeError, not naming the file (the text reader says '...manifest.json: not valid JSON')."""
    from fastpt.data.images import open_image_dataset, preprocess_images

    preprocess_images(image_folder, tmp_path / "out", progress=False, log=None)
    (tmp_path / "out" / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="manifest.json"):
        open_image_dataset(tmp_path / "out")


# ============================================================================ pretrain: image folders


def _pnm(path, h, w, channels=1, seed=0):
    """A binary PGM (1 channel) / PPM (3) of random pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, h * w * channels, dtype=np.uint8)
    path.write_bytes(b"%s\n%d %d\n255\n" % (b"P5" if channels == 1 else b"P6", w, h) + pixels.tobytes())


@pytest.fixture()
def mixed_folder(tmp_path):
    """Classes a and b of 3 images each: grey 8x8 and 12x12, and one 8x8 RGB image among them."""
    for k, c in enumerate("ab"):
        for i in range(3):
            _pnm(tmp_path / "mixed" / c / f"{i}.{'ppm' if (k, i) == (0, 1) else 'pgm'}", 12 if i == 2 else 8,
                 12 if i == 2 else 8, 3 if (k, i) == (0, 1) else 1, seed=3 * k + i)
    return tmp_path / "mixed"


def _image_recipe(folder, out, **data):
    return {"model": {"backbone": {"builder": "vit", "image_size": 8, "patch_size": 4, "in_channels": 1,
                                   "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
                      "objective": {"name": "mae", "decoder_hidden_size": 16, "decoder_layers": 1,
                                    "decoder_heads": 2}},
            "data": {"images": str(folder), **data},
            "train": {"batch_size": 4, "max_steps": 1, "lr": 1e-3, "precision": "fp32"},
            "output": {"dir": str(out), "log_every": 1, **QUIET}}


def test_image_folder_resized_on_load_with_an_exact_resume(mixed_folder):
    """With data.image_size, torch.stack of the decoded images came before the resize: 'stack expects
    each tensor to be equal size'. Folder images are now read at that size (and the first image's
    channels); the sample order and the resumed position stay exact."""
    pytest.importorskip("PIL")
    from fastpt.train.data import ImageStream

    stream = ImageStream(str(mixed_folder), image_size=8, seed=3)
    assert stream.image_shape == (1, 8, 8)
    it = stream.batches(4)
    first = next(it)["pixel_values"]
    state = stream.state_dict()
    rest = [next(it)["pixel_values"] for _ in range(2)]  # across the epoch boundary (6 images)
    assert first.shape == (4, 1, 8, 8) and first.dtype == torch.uint8  # the model's floats made on its device
    again = ImageStream(str(mixed_folder), image_size=8, seed=3)
    assert torch.equal(next(again.batches(4))["pixel_values"], first)
    resumed = ImageStream(str(mixed_folder), image_size=8, seed=3)
    resumed.load_state_dict(state)
    it = resumed.batches(4)
    assert all(torch.equal(next(it)["pixel_values"], x) for x in rest)
    assert pretrain(_image_recipe(mixed_folder, mixed_folder.parent / "run", image_size=8),
                    log=lambda m: None)["steps"] == 1


def test_image_stream_resumes_by_content_not_by_path(mixed_folder, tmp_path, monkeypatch):
    """The resume check compared the folder's path as a string: a folder regenerated under the same name
    (other pixels) resumed silently, and the same folder named by a relative path or with a trailing slash
    was refused. It compares the images' fingerprint (each file's path in the folder and bytes)."""
    pytest.importorskip("PIL")
    import shutil

    from fastpt.train.data import ImageStream

    state = ImageStream(str(mixed_folder), image_size=8, seed=3).state_dict()
    monkeypatch.chdir(mixed_folder.parent)
    for same in (mixed_folder.name, f"{mixed_folder}/"):
        ImageStream(same, image_size=8, seed=3).load_state_dict(state)
    moved = tmp_path / "moved"
    shutil.copytree(mixed_folder, moved)
    ImageStream(str(moved), image_size=8, seed=3).load_state_dict(state)  # the same images elsewhere
    victim = sorted(p for p in moved.rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"fingerprint.*the images' content changed"):
        ImageStream(str(moved), image_size=8, seed=3).load_state_dict(state)


def test_image_folder_sizes_and_unreadable_files_fail_before_training(mixed_folder, tmp_path, capsys):
    """Without data.image_size mixed sizes failed at the first batch holding two sizes, and an
    unreadable file (PIL.UnidentifiedImageError) at the batch reading it: mid-run, as a traceback."""
    pytest.importorskip("PIL")
    from fastpt.train import pretrain_main

    with pytest.raises(ConfigError, match=r"data\.images: .*differ in size.*data\.image_size"):
        pretrain(_image_recipe(mixed_folder, tmp_path / "sizes"), log=lambda m: None)
    (mixed_folder / "b" / "zz_broken.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"data\.images: 1 of 7 images .*zz_broken\.png"):
        pretrain(_image_recipe(mixed_folder, tmp_path / "broken", image_size=8), log=lambda m: None)
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_image_recipe(mixed_folder, tmp_path / "cli", image_size=8)))
    rc, err = _cli(pretrain_main, ["--config", str(tmp_path / "r.yaml")], capsys)
    _assert_clean_error(rc, err, "zz_broken.png", "data.images")
    assert not (tmp_path / "cli" / "checkpoints").exists() or not any((tmp_path / "cli" / "checkpoints").iterdir())
