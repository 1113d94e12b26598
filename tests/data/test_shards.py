"""The shard format and ShardDataset: exact windows and document boundaries for odd sequence
lengths, doc rows, seeded order, rank sharding, exact resume, corruption detection; a full disk
while writing (named, nothing left behind)."""
import errno
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from fastpt.data.shards import (CorruptShardError, ShardDataset, ShardWriter, collate, dtype_for_vocab, read_manifest,
                                write_json_atomic, write_shards)

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "eos": 5}
VOCAB = 97


def _docs(n=41, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(6, VOCAB, size=int(rng.integers(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """41 documents of 1..29 tokens over several shards (shard_tokens=97)."""
    out = tmp_path_factory.mktemp("shards")
    docs = _docs()
    manifest = write_shards(out, docs, vocab_size=VOCAB, shard_tokens=97, special_tokens=SPECIALS)
    assert len(manifest["shards"]) >= 4 and manifest["num_docs"] == len(docs)
    return out, docs


def _wrap(doc, mode):
    prefix, suffix = {"cls_sep": ([2], [3]), "eos": ([], [5]), "none": ([], [])}[mode]
    return prefix + list(doc) + suffix


def test_dtype_for_vocab():
    assert dtype_for_vocab(100) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32 and dtype_for_vocab(250_000) == np.uint32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


@pytest.mark.parametrize("seq_len", [1, 7, 17, 64])
@pytest.mark.parametrize("special", ["cls_sep", "eos", "none"])
def test_pack_windows_and_boundaries(shard_dir, seq_len, special):
    out, docs = shard_dir
    ds = ShardDataset(out, seq_len, add_special=special, shuffle=False)
    wrapped = [_wrap(d, special) for d in docs]
    stream = np.concatenate(wrapped)
    starts = np.cumsum([0] + [len(w) for w in wrapped])
    assert ds.num_samples == len(stream) // seq_len
    for i in range(ds.num_samples):
        s = ds.window(i)
        lo, hi = i * seq_len, (i + 1) * seq_len
        assert s["input_ids"].dtype == torch.int64 and s["input_ids"].tolist() == stream[lo:hi].tolist()
        inner = [int(b) - lo for b in starts if lo < b < hi]
        assert s["cu_seqlens"].dtype == torch.int32 and s["cu_seqlens"].tolist() == [0] + inner + [seq_len]


def test_doc_rows(shard_dir):
    out, docs = shard_dir
    ds = ShardDataset(out, 9, mode="doc", shuffle=False)
    assert ds.num_samples == len(docs)
    for i, doc in enumerate(docs):
        s = ds.document(i)
        row = [2] + list(doc[:7]) + [3]  # truncated body, [SEP] kept last
        assert s["input_ids"].tolist() == row + [0] * (9 - len(row))
        assert s["attention_mask"].tolist() == [1] * len(row) + [0] * (9 - len(row))
    with pytest.raises(ValueError, match="no room"):
        ShardDataset(out, 2, mode="doc")


def test_seeded_order(shard_dir):
    out, _ = shard_dir
    a, b, c = (ShardDataset(out, 7, seed=s) for s in (3, 3, 4))
    n = len(a)
    order_a = [a.sample_index(k) for k in range(2 * n)]
    assert order_a == [b.sample_index(k) for k in range(2 * n)]
    assert order_a[:n] != [c.sample_index(k) for k in range(n)]
    assert sorted(order_a[:n]) == list(range(n)) and sorted(order_a[n:]) == list(range(n))
    assert order_a[:n] != order_a[n:]  # a fresh permutation each epoch


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_rank_sharding(shard_dir, world, mode):
    """Rank r's k-th sample is one process's sample k * world + r, in every epoch. Each rank's epoch was
    padded to ceil(samples / world) by wrapping around: with samples % world != 0 the ranks' order drifted
    from one process's from the second epoch on (2 ranks, 33 windows: steps past the first epoch
    differed), and the README's equality with one process on the combined batch held for one epoch only."""
    out, _ = shard_dir
    ranks = [ShardDataset(out, 9, mode=mode, seed=1, rank=r, world_size=world) for r in range(world)]
    single = ShardDataset(out, 9, mode=mode, seed=1)
    n = single.num_samples  # 73 windows of 9, 41 documents
    assert n % world != 0  # the case the padding got wrong
    epochs = 3
    for k in range(epochs * n // world):
        for r, d in enumerate(ranks):
            assert d.sample_index(k) == single.sample_index(k * world + r), (k, r)
    # each epoch is exactly n positions over the ranks: every sample once
    per_position = [ranks[g % world].sample_index(g // world) for g in range(epochs * n)]
    for e in range(epochs):
        assert sorted(per_position[e * n:(e + 1) * n]) == list(range(n))
    # one process: the concatenated permutations of epochs 0, 1, 2 (the order as it always was)
    want = np.concatenate([np.random.default_rng([1, e]).permutation(n) for e in range(epochs)]).tolist()
    assert [single.sample_index(k) for k in range(epochs * n)] == want


def test_rank_sharding_num_epochs(shard_dir):
    """With num_epochs every rank yields the same number of batches (a rank with a batch more than another
    would hang a collective), the global positions of the epochs less the last round that does not fill."""
    out, _ = shard_dir
    world, batch = 3, 4
    ranks = [ShardDataset(out, 5, seed=1, rank=r, world_size=world, num_epochs=2) for r in range(world)]
    n = ranks[0].num_samples
    counts = [sum(1 for _ in d.batches(batch)) for d in ranks]
    assert counts == [2 * n // (world * batch)] * world
    singles = [len(list(ShardDataset(out, 5, seed=1, rank=r, world_size=world, num_epochs=2))) for r in range(world)]
    assert singles == [2 * n // world] * world
    assert len(list(ShardDataset(out, 5, seed=1, num_epochs=2))) == 2 * n  # one process: every sample twice


def test_state_dict_resume_on_a_rank_across_epochs(shard_dir):
    """Rank 1 of 2 (41 documents: its epochs hold 20 or 21 of them) saved mid-run and resumed continues
    with the batches of the uninterrupted rank, across the epoch boundaries."""
    out, _ = shard_dir
    ds = ShardDataset(out, 11, mode="doc", seed=7, rank=1, world_size=2)
    batches = ds.batches(3)
    for _ in range(6):  # position 18 of 21: the next batches cross into epochs 1 and 2
        next(batches)
    state = json.loads(json.dumps(ds.state_dict()))
    expected = [next(batches) for _ in range(12)]
    resumed = ShardDataset(out, 11, mode="doc", seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, resumed.batches(3), strict=False):
        for key in want:
            assert torch.equal(want[key], got[key])
    with pytest.raises(ValueError, match="world_size"):
        ShardDataset(out, 11, mode="doc", seed=7, rank=1, world_size=3).load_state_dict(state)


def test_state_dict_resume(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, 11, seed=7)
    batches = ds.batches(3)
    for _ in range(len(ds) // 3 - 1):  # stop just before an epoch boundary
        next(batches)
    state = json.loads(json.dumps(ds.state_dict()))
    expected = [next(batches) for _ in range(4)]  # crosses into epoch 1
    resumed = ShardDataset(out, 11, seed=7)
    resumed.load_state_dict(state)
    for want, got in zip(expected, resumed.batches(3)):
        assert set(want) == set(got)
        for key in want:
            assert torch.equal(torch.as_tensor(want[key]), torch.as_tensor(got[key]))
    with pytest.raises(ValueError, match="seq_len"):
        ShardDataset(out, 12, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShardDataset(out, 11, seed=8).load_state_dict(state)


def test_collate_pack_and_doc(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, 13, shuffle=False)
    samples = [ds.window(i) for i in range(3)]
    batch = collate(samples)
    assert batch["input_ids"].shape == (3, 13)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 39 and bool((cu[1:] > cu[:-1]).all())
    expected = [int(b) + 13 * r for r, s in enumerate(samples) for b in s["cu_seqlens"][1:]]
    assert cu[1:].tolist() == expected
    assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    pos = batch["position_ids"].flatten()
    assert bool((pos[cu[:-1].long()] == 0).all()) and pos.max() < batch["max_seqlen"]
    docs = collate([ShardDataset(out, 6, mode="doc").sample(k) for k in range(3)])
    assert set(docs) == {"input_ids", "attention_mask"} and docs["attention_mask"].shape == (3, 6)


def test_uint32_round_trip(tmp_path):
    docs = [[0, 65535, 65536, 70000, 5], [69999]]
    manifest = write_shards(tmp_path, docs, vocab_size=70001)
    assert manifest["dtype"] == "uint32"
    assert (tmp_path / "shard-00000.bin").stat().st_size == 6 * 4
    ds = ShardDataset(tmp_path, 8, mode="doc", shuffle=False, add_special="none")
    assert [ds.document(i)["input_ids"].tolist()[:len(d)] for i, d in enumerate(docs)] == docs
    with pytest.raises(ValueError, match="outside"):
        write_shards(tmp_path / "bad", [[70001]], vocab_size=70001)


def test_corruption_detected(tmp_path):
    write_shards(tmp_path, _docs(20), vocab_size=VOCAB, shard_tokens=50, special_tokens=SPECIALS)
    ShardDataset(tmp_path, 8)  # clean
    victim = tmp_path / "shard-00001.bin"
    data = bytearray(victim.read_bytes())
    data[3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-00001.bin.*sha256"):
        ShardDataset(tmp_path, 8)
    ShardDataset(tmp_path, 8, verify=False)  # sizes still match: only a checksum finds it
    victim.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptShardError, match="shard-00001.bin.*bytes"):
        ShardDataset(tmp_path, 8, verify=False)
    victim.unlink()
    with pytest.raises(CorruptShardError, match="shard-00001.bin: missing"):
        read_manifest(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="did not finish"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ShardDataset(tmp_path / "nowhere", 8)


@pytest.mark.parametrize("key", ["bin", "idx", "tokenizer"])
@pytest.mark.parametrize("name", ["../outside", "ABS", "sub/x", "sub\\x", ".."])
def test_manifest_file_names_outside_the_directory_are_refused(tmp_path, key, name):
    """A shipped manifest must not make the reader open files outside its directory (../x, /abs):
    before, a shard or tokenizer named ../outside (with its sha256) was read from outside."""
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    d = tmp_path / "shipped"
    write_shards(d, [list(range(10, 20))], vocab_size=VOCAB, special_tokens=SPECIALS, tokenizer_file=tok)
    manifest = json.loads((d / "manifest.json").read_text())
    record, field = (manifest["tokenizer"], "file") if key == "tokenizer" else (manifest["shards"][0], key)
    name = str(tmp_path / "outside") if name == "ABS" else name
    if name != "..":  # the same bytes where the name points: only the name is wrong
        (d / "sub").mkdir()
        shutil.copy(d / record[field], d / name.replace("\\", "/"))
    record[field] = name
    (d / "manifest.json").write_text(json.dumps(manifest))
    where = "tokenizer.file" if key == "tokenizer" else f"shards[0].{key}"
    for verify in (True, False):
        with pytest.raises(CorruptShardError, match=re.escape(f"{where}={name!r}") + ".*outside it"):
            ShardDataset(d, 5, verify=verify)


def test_seq_len_longer_than_corpus(tmp_path):
    write_shards(tmp_path, [[7, 8, 9]], vocab_size=VOCAB, special_tokens=SPECIALS)
    with pytest.raises(ValueError, match="fewer than one window"):
        ShardDataset(tmp_path, 6)
    assert ShardDataset(tmp_path, 5).window(0)["input_ids"].tolist() == [2, 7, 8, 9, 3]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write fails with ENOSPC)")
def test_writer_on_a_full_disk_names_the_file_and_abort_removes_it(tmp_path):
    """A write failing with ENOSPC used to raise a bare "[Errno 28] No space left on device", and abort()
    closed the files first (which flushes, and failed again) so the .tmp files stayed on the full disk."""
    os.symlink("/dev/full", tmp_path / "shard-00000.bin.tmp")  # the .bin's writes fail, as on a full disk
    writer = ShardWriter(tmp_path, np.dtype("<u2"), 10**9)
    with pytest.raises(OSError, match="shard-00000.bin.tmp") as info:
        for _ in range(20):  # 40 KB: more than the 8 KiB write buffer holds
            writer.add(np.arange(1000))
    assert info.value.errno == errno.ENOSPC
    writer.abort()  # closing flushes the buffered rest and fails again: abort must not raise
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write fails with ENOSPC)")
def test_write_json_atomic_on_a_full_disk(tmp_path):
    (tmp_path / "m.json").write_text('{"old": 1}')
    os.symlink("/dev/full", tmp_path / "m.json.tmp")
    with pytest.raises(OSError, match="m.json.tmp") as info:
        write_json_atomic(tmp_path / "m.json", {"new": 2})
    assert info.value.errno == errno.ENOSPC
    assert json.loads((tmp_path / "m.json").read_text()) == {"old": 1}
    assert not os.path.lexists(tmp_path / "m.json.tmp")


# -- ShardWriter.add_many: a chunk of documents in one write, the bytes of add() --------------------
def test_add_many_writes_exactly_what_add_writes(tmp_path):
    """add_many (one write per file for many documents) gives the files, counts and checksums of add() of
    each document, also when the caller splits its chunks where shards fill (closing in between), with
    empty documents and ids wider than the shard dtype."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 40, size=600)
    lengths[rng.integers(0, 600, size=30)] = 0
    ids = rng.integers(0, 1 << 16, size=int(lengths.sum())).astype(np.uint32)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one, many = (ShardWriter(tmp_path / name, np.dtype("<u2"), 500) for name in ("one", "many"))
    records_one, records_many = [], []
    for d in range(len(lengths)):
        one.add(ids[ends[d]:ends[d + 1]])
        if (r := one.close_if_full()) is not None:
            records_one.append(r)
    records_one.append(one.close())
    d = 0
    while d < len(lengths):  # random chunks, each cut after the document that fills the open shard
        stop = min(d + int(rng.integers(1, 200)), len(lengths))
        room = many.shard_tokens - many.open_tokens
        fills = int(np.searchsorted(ends[d + 1:stop + 1] - ends[d], room, side="left"))
        stop = min(stop, d + fills + 1)
        many.add_many(ids[ends[d]:ends[stop]], lengths[d:stop])
        if (r := many.close_if_full()) is not None:
            records_many.append(r)
        d = stop
    records_many.append(many.close())
    assert len(records_one) > 20 and records_many == records_one
    assert _dir_bytes(tmp_path / "many") == _dir_bytes(tmp_path / "one")
    with pytest.raises(ValueError, match="lengths"):
        many.add_many(ids[:10], [4, 5])
    with pytest.raises(ValueError, match="does not fit"):
        many.add_many(np.array([1, 70000], dtype=np.uint32), [2])


def _dir_bytes(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


# -- ShardDataset: a bounded number of open shards; the document search ------------------------------
def _fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_open_shards_are_bounded(tmp_path, mode):
    """Every shard a run touched stayed mapped (two descriptors each): a shuffled epoch over more than
    ~510 shards died with "Too many open files". At most max_open_shards stay open now, least recently
    used dropped, with the same samples; a sample taken before its shard was dropped is unchanged."""
    write_shards(tmp_path, _docs(300, seed=2), vocab_size=VOCAB, shard_tokens=60, special_tokens=SPECIALS)
    ref = ShardDataset(tmp_path, 11, mode=mode, seed=1, verify=False)
    ref.max_open_shards = 10**6
    want = [ref.sample(k) for k in range(ref.num_samples)]
    before = _fds()
    ds = ShardDataset(tmp_path, 11, mode=mode, seed=1, verify=False)
    ds.max_open_shards = 4
    n_shards = len(ds.manifest["shards"])
    first = ds.sample(0)
    kept = {k: v.clone() for k, v in first.items()}
    got = [ds.sample(k) for k in range(ds.num_samples)]
    assert n_shards > 60 and len(ds._maps) == 4 and _fds() - before <= 2 * 4
    assert all(torch.equal(first[k], kept[k]) for k in kept)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_a_shuffled_epoch_over_many_shards_under_a_low_open_file_limit(tmp_path):
    """The failure as it happened, in small: 80 shards under a limit of 48 more open files than the process
    has (the old reader wanted 160 more); the default max_open_shards follows the limit (open_shard_limit)."""
    resource = pytest.importorskip("resource")
    write_shards(tmp_path, _docs(400, seed=3), vocab_size=VOCAB, shard_tokens=60, special_tokens=SPECIALS)
    ds = ShardDataset(tmp_path, 13, seed=0, verify=False)
    assert len(ds.manifest["shards"]) >= 80
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = _fds() + 48
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for _ in ds.batches(16):  # the old reader: OSError "Too many open files"
            if ds.consumed >= ds.num_samples:
                break
        from fastpt.data.shards import open_shard_limit

        assert ds.max_open_shards == open_shard_limit() == max(limit // 8, 16) and len(ds._maps) == ds.max_open_shards
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_document_search_and_plain_array_maps(shard_dir):
    """window() found a window's first document by bisecting over np.memmap scalars (~8 us each: 163 us a
    window on a 1M-document shard); the maps are plain ndarrays now, the search numpy's, with the same
    answer as a scan, separators or not, empty documents included."""
    from fastpt.data.shards import _last_start_at_or_before

    out, _ = shard_dir
    ds = ShardDataset(out, 7, verify=False)
    tokens, idx = ds._shard(0)
    assert type(tokens) is np.ndarray and type(idx) is np.ndarray and not tokens.flags.writeable
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 6, size=300)
    lengths[:3] = 0
    idx = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    for ns in (0, 1, 2):
        starts = idx[:-1] + np.arange(len(lengths)) * ns
        for rel in range(int(idx[-1] + len(lengths) * ns)):
            assert _last_start_at_or_before(idx, ns, rel) == int(np.flatnonzero(starts <= rel)[-1])


# -- ShardDataset.batch: a batch in a few numpy calls, exactly window / document + collate ----------------
def _write_raw_shards(out, shard_docs, vocab_size):
    """A shard directory with one shard per list of ``shard_docs``, empty documents kept (``write_shards``
    skips them; ``ShardWriter`` writes them, and a shard may hold nothing else)."""
    from fastpt.data.shards import FORMAT, MANIFEST, VERSION

    out.mkdir(parents=True)
    writer = ShardWriter(out, dtype_for_vocab(vocab_size), 10**9)
    records = []
    for docs in shard_docs:
        for doc in docs:
            writer.add(np.asarray(doc, dtype=np.int64))
        records.append(writer.close())
    write_json_atomic(out / MANIFEST, {
        "format": FORMAT, "version": VERSION, "kind": "text", "complete": True, "dtype": writer.dtype.name,
        "byteorder": "little", "vocab_size": vocab_size, "tokenizer": None, "special_tokens": SPECIALS,
        "shards": records, "num_docs": sum(r["docs"] for r in records),
        "num_tokens": sum(r["tokens"] for r in records)})


# name -> (documents of (min, max) tokens, how many, vocab (uint16 / uint32 ids), shard_tokens; or empty-doc shards)
CORPORA = {"short-many": ((1, 12), 400, VOCAB, 90), "long-many-u32": ((20, 300), 60, 70_001, 700),
           "short-one": ((1, 12), 400, VOCAB, 10**9), "empty-docs": None}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root, rng, out = tmp_path_factory.mktemp("corpora"), np.random.default_rng(11), {}
    for name, spec in CORPORA.items():
        if spec is None:  # empty documents here and there, a shard of nothing else, uint16
            shards = [[rng.integers(6, VOCAB, size=int(n)) for n in rng.integers(0, 6, size=30) * (s != 2)]
                      for s in range(6)]
            _write_raw_shards(root / name, shards, VOCAB)
        else:
            (lo, hi), n, vocab, shard_tokens = spec
            docs = [rng.integers(6, vocab, size=int(rng.integers(lo, hi + 1))) for _ in range(n)]
            write_shards(root / name, docs, vocab_size=vocab, shard_tokens=shard_tokens, special_tokens=SPECIALS)
        out[name] = root / name
    return out


def _assert_same_batch(want, got):
    assert want.keys() == got.keys()
    for key in want:
        a, b = want[key], got[key]
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
        else:
            assert type(a) is type(b) and a == b, key


def _per_sample_batches(ds, batch_size, n):
    """What ``batches`` yielded before ``batch``: ``collate`` of ``sample`` (window / document) k by k."""
    for _ in range(n):
        yield collate([ds.sample(ds.consumed + b) for b in range(batch_size)])
        ds.consumed += batch_size


@pytest.mark.parametrize("corpus", list(CORPORA))
@pytest.mark.parametrize("special", ["cls_sep", "eos", "none"])
@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_batch_equals_window_or_document_and_collate(corpora, corpus, special, mode):
    """``batches`` (``batch`` of a whole batch at once) gives the tensors, dtypes and ints that ``collate`` of
    the per-sample ``window`` / ``document`` gave, over many shards or one, short and long documents
    (windows crossing several shards), uint16 and uint32 ids, empty documents and a shard of nothing else,
    each separator mode, through three epochs (batches wrapping around the epoch end, num_samples not a
    multiple of the batch); and for random index batches, small and large (both ways of searching)."""
    seq_len = 13 if mode == "doc" else {"long-many-u32": 97, "short-one": 64}.get(corpus, 13)
    new, ref = (ShardDataset(corpora[corpus], seq_len, mode=mode, add_special=special, seed=3) for _ in range(2))
    batch = 7 if new.num_samples % 7 else 8
    n = 3 * new.num_samples // batch + 1
    assert n * batch > 3 * new.num_samples and new.num_samples % batch
    for want, got in zip(_per_sample_batches(ref, batch, n), new.batches(batch), strict=False):
        _assert_same_batch(want, got)
    assert new.consumed == ref.consumed == n * batch
    rng = np.random.default_rng(5)
    for size in (1, 5, 40, 200):
        ii = rng.integers(0, new.num_samples, size=size)
        one = new.window if mode == "pack" else new.document
        _assert_same_batch(collate([one(int(i)) for i in ii]), new.batch(ii))
    _assert_same_batch(collate([one(i) for i in range(new.num_samples)]), new.batch(np.arange(new.num_samples)))


@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_batches_resume_from_a_state_dict_mid_epoch(corpora, mode):
    """A run saved mid-epoch (rank 1 of 3) and resumed continues with the batches the per-sample path of an
    uninterrupted run gives, across the epoch end; the position advances by the batch as before."""
    path = corpora["short-many"]
    ds = ShardDataset(path, 11, mode=mode, seed=2, rank=1, world_size=3)
    batches = ds.batches(6)
    for _ in range(len(ds) // 6 - 1):
        next(batches)
    state = json.loads(json.dumps(ds.state_dict()))
    ref = ShardDataset(path, 11, mode=mode, seed=2, rank=1, world_size=3)
    ref.load_state_dict(state)
    resumed = ShardDataset(path, 11, mode=mode, seed=2, rank=1, world_size=3)
    resumed.load_state_dict(state)
    for want, got in zip(_per_sample_batches(ref, 6, 5), resumed.batches(6), strict=False):
        _assert_same_batch(want, got)
    assert resumed.state_dict() == ref.state_dict() and resumed.consumed == state["consumed"] + 5 * 6


def test_sample_indices_are_sample_index(shard_dir):
    out, _ = shard_dir
    for kw in ({"seed": 4}, {"shuffle": False}, {"seed": 1, "rank": 2, "world_size": 3}):
        ds = ShardDataset(out, 9, **kw)
        for k, n in ((0, 1), (0, 73), (60, 30), (5, 400)):  # within an epoch, across one, several
            assert ds.sample_indices(k, n).tolist() == [ds.sample_index(k + b) for b in range(n)]


def test_batch_is_a_fixed_number_of_calls_not_one_per_sample(corpora):
    """The old batches() went through window() per sample and a slice + concatenate per document piece
    (~40 us of CPU, under the GIL, a 128-token window of short documents; on a GPU that ran on the prefetch
    thread beside the one launching kernels). On one shard the Python / C calls of a batch now hardly grow
    with its size: 256 windows cost less than twice the calls of 16 (window() + collate: 16x)."""
    import sys

    ds = ShardDataset(corpora["short-one"], 64, seed=0)
    rng = np.random.default_rng(0)

    def calls(size):
        ii = rng.integers(0, ds.num_samples, size=size)
        count = [0]

        def hook(frame, event, arg):
            if event in ("call", "c_call"):
                count[0] += 1
        sys.setprofile(hook)
        try:
            ds.batch(ii)
        finally:
            sys.setprofile(None)
        return count[0]

    assert calls(256) < 2 * calls(16)
    for name in ("window", "document", "_piece"):  # never the per-sample path
        assert name not in ds.batch.__code__.co_names + ds._pack_batch.__code__.co_names


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_batch_keeps_the_open_shard_bound(tmp_path, mode):
    """A batch touching many more shards than max_open_shards leaves at most that many mapped (nothing it
    returns or keeps is a view of a map) and equals the per-sample path."""
    write_shards(tmp_path, _docs(300, seed=2), vocab_size=VOCAB, shard_tokens=60, special_tokens=SPECIALS)
    ds = ShardDataset(tmp_path, 11, mode=mode, seed=1, verify=False)
    ds.max_open_shards = 4
    before = _fds()
    ii = np.random.default_rng(0).permutation(ds.num_samples)[:64]
    got = ds.batch(ii)
    assert len(ds.manifest["shards"]) > 60 and len(ds._maps) == 4 and _fds() - before <= 2 * 4
    ref = ShardDataset(tmp_path, 11, mode=mode, seed=1, verify=False)
    _assert_same_batch(collate([(ref.window if mode == "pack" else ref.document)(int(i)) for i in ii]), got)
    # each shard mapped at most twice: the token gather reuses the shards the offset searches left mapped
    # first (it went in output order: past the limit, nearly every shard was mapped a second time)
    import fastpt.data.shards as shards_module

    calls = []
    real = shards_module.map_array
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards_module, "map_array", lambda *a, **k: calls.append(a) or real(*a, **k))
        fresh = ShardDataset(tmp_path, 11, mode=mode, seed=1, verify=False)
        fresh.max_open_shards = 4
        calls.clear()
        fresh.batch(ii)
    touched = len({c[0] for c in calls})
    assert len(calls) <= 2 * touched - 2 * 4 + 2 * 2  # a map per token file and offset file: 2 per shard


def test_batch_refuses_bad_indices(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, 9)
    with pytest.raises(IndexError, match=f"window {ds.num_samples} outside"):
        ds.batch([0, ds.num_samples])
    with pytest.raises(IndexError, match="document -1 outside"):
        ShardDataset(out, 9, mode="doc").batch([-1])
    for bad in ([], [[1, 2]], [0.5]):
        with pytest.raises(ValueError, match="indices"):
            ds.batch(bad)


@pytest.mark.parametrize("ns", [0, 1, 2, 3])
def test_vectorised_document_search_equals_a_scan(ns):
    """_last_starts_at_or_before (searchsorted rounds, then 64-ary rounds, for a batch of queries) and
    _last_start_at_or_before with bounds give the scan's answer: documents shorter than their separators
    (where the rounds stall), empty ones, long ones, with and without lo / hi bounds."""
    from fastpt.data import shards

    rng = np.random.default_rng(ns)
    lengths = np.concatenate([rng.integers(0, 3, size=3000), rng.integers(0, 400, size=300),
                              rng.integers(20, 40, size=3000)])
    idx = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    wrapped = idx[:-1] + np.arange(len(lengths)) * ns
    rel = rng.integers(0, int(idx[-1] + len(lengths) * ns), size=500)
    want = np.searchsorted(wrapped, rel, side="right") - 1
    assert shards._last_starts_at_or_before(idx, ns, rel).tolist() == want.tolist()
    lo = np.maximum(want - rng.integers(0, 50, size=len(rel)), 0)
    lo = np.searchsorted(wrapped, wrapped[lo], side="right") - 1  # (a qualifying lo: the last of equal starts)
    hi = want + rng.integers(0, 50, size=len(rel))
    for q in (len(rel), shards._FEW_QUERIES - 1):  # vectorised, and one scalar search a query
        got = shards._last_starts_at_or_before(idx, ns, rel[:q], lo[:q], hi[:q])
        assert got.tolist() == want[:q].tolist()
    assert [shards._last_start_at_or_before(idx, ns, int(r), int(a)) for r, a in zip(rel[:50], lo[:50])] == \
        want[:50].tolist()
