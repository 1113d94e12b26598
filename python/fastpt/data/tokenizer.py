"""Tokenizers for preprocessing: load a Hugging Face ``tokenizers`` file or model directory,
or train WordPiece / byte-level BPE on a corpus iterator.

Everything here returns a ``tokenizers.Tokenizer`` (the Rust tokenizer, no transformers
needed); ``special_token_ids`` finds its [CLS]/[SEP]/[PAD]/[MASK]/EOS/UNK ids for the
shard manifest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
KINDS = ("wordpiece", "bpe")
# the largest vocabulary train_tokenizer accepts: ids must fit the uint32 shards, and the
# tokenizers trainers allocate in proportion to vocab_size (1e9 aborts the process out of memory)
MAX_VOCAB = 1 << 24

# the names each role goes by in common tokenizers, most specific first
_ROLE_TOKENS = {
    "cls": ["[CLS]", "<s>", "<cls>"],
    "sep": ["[SEP]", "</s>", "<sep>"],
    "pad": ["[PAD]", "<pad>", "<|padding|>"],
    "mask": ["[MASK]", "<mask>"],
    "unk": ["[UNK]", "<unk>"],
    "eos": ["[EOS]", "</s>", "<|endoftext|>", "<eos>"],
    "bos": ["[BOS]", "<s>", "<|endoftext|>", "<bos>"],
    "sentinel": ["<extra_id_0>"],  # T5's first sentinel; the next ones count down from it
}


def _bert_like(vocab: dict[str, int] | str | None, *, lowercase: bool, strip_accents: bool | None = None,
               handle_chinese_chars: bool = True, unk_token: str = "[UNK]"):
    """A BERT WordPiece pipeline (normalizer, pre-tokenizer, decoder) around ``vocab``, as transformers'
    ``BertTokenizerFast`` builds it (``strip_accents=None``: strip when lowercasing)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.WordPiece.from_file(vocab, unk_token=unk_token) if isinstance(vocab, str) else \
        models.WordPiece(vocab, unk_token=unk_token) if vocab else models.WordPiece(unk_token=unk_token)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _set_template(tok, first: str, last: str) -> None:
    from tokenizers import processors

    a, b = tok.token_to_id(first), tok.token_to_id(last)
    if a is not None and b is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first} $A {last}", pair=f"{first} $A {last} $B:1 {last}:1",
            special_tokens=[(first, a), (last, b)])


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a ``tokenizers`` JSON file or a Hugging Face model directory.

    A directory is searched for ``tokenizer.json``, else ``vocab.txt`` (BERT WordPiece built as
    transformers' ``BertTokenizerFast``: ``do_lower_case`` (default True), ``strip_accents`` (default:
    as do_lower_case) and ``tokenize_chinese_chars`` (default True) from ``tokenizer_config.json``; the
    special tokens it and ``special_tokens_map.json`` name (default [UNK] [SEP] [PAD] [CLS] [MASK]) and
    their ``additional_special_tokens`` registered as special tokens, so that a literal "[SEP]" in the
    text is one id), else ``vocab.json`` + ``merges.txt`` (GPT-2 / RoBERTa byte-level BPE).
    Raises FileNotFoundError naming what was looked for, ValueError for an unreadable file.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({exc})") from exc
        tok.no_padding()  # a model's tokenizer.json may pad/truncate to its max length: ids must be whole
        tok.no_truncation()
        return tok
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer {path}: no such file or directory")
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path / "tokenizer.json")
    config = _read_json(path / "tokenizer_config.json")
    if (path / "vocab.txt").is_file():
        return _load_vocab_txt(path, config)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from tokenizers import decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()
        return tok
    raise FileNotFoundError(f"tokenizer {path}: a directory without tokenizer.json, vocab.txt or vocab.json+merges.txt")


_BERT_SPECIALS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}


def _load_vocab_txt(path: Path, config: dict):
    """``path/vocab.txt`` as transformers' ``BertTokenizerFast`` loads it (``convert_slow_tokenizer``'s
    BertConverter, then the special tokens added as non-normalised special tokens)."""
    from tokenizers import AddedToken

    names = dict(config)
    names.update(_read_json(path / "special_tokens_map.json"))  # transformers: the map wins
    # a role set to null has no token (transformers: mask_token=None), an absent one BERT's default
    specials = {role: _token_text(names[f"{role}_token"]) if f"{role}_token" in names else default
                for role, default in _BERT_SPECIALS.items()}
    strip_accents = config.get("strip_accents")
    tok = _bert_like(str(path / "vocab.txt"), lowercase=bool(config.get("do_lower_case", True)),
                     strip_accents=None if strip_accents is None else bool(strip_accents),
                     handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                     unk_token=specials["unk"] or "[UNK]")
    extra = [t for key in ("additional_special_tokens", "extra_special_tokens")  # transformers 4 / 5
             for t in (names.get(key) if isinstance(names.get(key), list) else [])]
    tokens = list(specials.values()) + [_token_text(t) for t in extra]
    tokens = list(dict.fromkeys(t for t in tokens if t))  # once each, in order
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])
    _set_template(tok, specials["cls"] or "[CLS]", specials["sep"] or "[SEP]")
    return tok


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string, or an
    AddedToken dict with its ``content``; None for anything else."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def special_token_ids(tok, model_dir: str | Path | None = None) -> dict[str, int]:
    """Ids of the special-token roles the tokenizer has: a subset of
    ``{"cls", "sep", "pad", "mask", "unk", "eos", "bos", "sentinel"}`` (sentinel: ``<extra_id_0>``, the
    first T5 sentinel).

    A HF model directory's ``special_tokens_map.json`` / ``tokenizer_config.json`` names
    the tokens first (``cls_token``...); roles they leave out are found by common names
    (``[CLS]`` / ``<s>``, ``[SEP]`` / ``</s>``, ``<|endoftext|>``...).
    """
    named: dict[str, str] = {}
    if model_dir is not None and Path(model_dir).is_dir():
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins
            for role in _ROLE_TOKENS:
                value = _read_json(Path(model_dir) / name).get(f"{role}_token")
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    named[role] = value
    out = {}
    for role, candidates in _ROLE_TOKENS.items():
        for token in ([named[role]] if role in named else []) + candidates:
            tid = tok.token_to_id(token)
            if tid is not None:
                out[role] = int(tid)
                break
    return out


def train_tokenizer(docs: Iterable[str], kind: str = "wordpiece", vocab_size: int = 8000, *,
                    min_frequency: int = 2, lowercase: bool = True, num_sentinels: int = 0,
                    extra_special_tokens: Sequence[str] = (), show_progress: bool = False):
    """Train a tokenizer on an iterator of documents (streamed, never held in memory).

    kind="wordpiece": BERT uncased-style (``lowercase``), specials [PAD] [UNK] [CLS] [SEP]
    [MASK] at ids 0..4, post-processor ``[CLS] $A [SEP]``.
    kind="bpe": byte-level BPE (GPT-2 / RoBERTa style, no unknown bytes), specials
    <s> <pad> </s> <unk> <mask> at ids 0..4, post-processor ``<s> $A </s>``.
    ``extra_special_tokens`` follow the specials; ``num_sentinels`` T5 sentinels
    ``<extra_id_0..N-1>`` take the highest ids, ``<extra_id_0>`` the very highest.
    The total vocabulary is at most ``vocab_size`` (sentinels included), or, for a tiny ``vocab_size``, the
    special tokens plus the corpus's alphabet (every character is kept). Deterministic for
    the same documents and arguments.
    Raises ValueError for an unknown kind, a vocab_size too small for the specials or over
    ``MAX_VOCAB``, a negative min_frequency / num_sentinels, or documents without any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_train_args(vocab_size=vocab_size, min_frequency=min_frequency, num_sentinels=num_sentinels)
    specials = (WORDPIECE_SPECIALS if kind == "wordpiece" else BPE_SPECIALS) + list(extra_special_tokens)
    budget = vocab_size - num_sentinels
    if kind == "bpe" and budget < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size}: byte-level BPE needs room for 256 bytes, {len(specials)} specials "
                         f"and {num_sentinels} sentinels")
    if budget <= len(specials):
        raise ValueError(f"vocab_size={vocab_size} leaves no room beside {len(specials)} specials "
                         f"and {num_sentinels} sentinels")
    seen = [0]  # documents with text: training on none gives a tokenizer of only the specials
    docs = _count_text(docs, seen)
    if kind == "wordpiece":
        tok = _bert_like(None, lowercase=lowercase)
        tok.model = models.WordPiece(_train_wordpiece(docs, tok, budget, specials, min_frequency, show_progress),
                                     unk_token="[UNK]")
        tok.add_special_tokens(specials)
        first, last = "[CLS]", "[SEP]"
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        first, last = "<s>", "</s>"
        tok.train_from_iterator(_batched(docs, 1000), trainer=trainer)
    if not seen[0]:
        raise ValueError("no text to train the tokenizer on: the documents are all empty or blank")
    if num_sentinels:
        tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(num_sentinels))])
    _set_template(tok, first, last)
    return tok


def check_train_args(**values) -> None:
    """Raise ValueError naming the first bad training argument: ``vocab_size`` (1..MAX_VOCAB),
    ``min_frequency`` and ``num_sentinels`` / ``sentinels`` (integers >= 0)."""
    for name, value in values.items():
        low = 1 if name == "vocab_size" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if name == "vocab_size" and value > MAX_VOCAB:
            raise ValueError(f"vocab_size={value:,} is over the limit of {MAX_VOCAB:,} (2**24) tokens")


def _count_text(docs: Iterable[str], seen: list[int]) -> Iterator[str]:
    for doc in docs:
        if isinstance(doc, str) and doc.strip():
            seen[0] += 1
        yield doc


class _Continuation(dict):
    """``str.translate`` table: a character inside a word -> its private-use twin.

    BMP characters map into plane 15, plane-1 characters into plane 16 (BERT's
    pre-tokenizer makes every CJK ideograph, the only common characters beyond, a word of
    its own, so they never continue a word).
    """

    def __missing__(self, code: int) -> int:
        self[code] = code + 0xF0000 if code < 0x10000 else code + 0xF0000 if code < 0x20000 else code
        return self[code]


_CONT = _Continuation()


def _uncontinue(token: str) -> str:
    return "".join(chr(ord(c) - 0xF0000) if ord(c) >= 0xF0000 else c for c in token)


def _train_wordpiece(docs: Iterable[str], tok, budget: int, specials: list[str], min_frequency: int,
                     show_progress: bool) -> dict[str, int]:
    """WordPiece vocabulary learned with BPE merges, deterministically.

    tokenizers' WordPieceTrainer (BPE with a ``##`` prefix) numbers the ``##`` alphabet in
    hash-map order, and merge ties are broken by id, so each run learns a different
    vocabulary. Here every character after a word's first becomes a private-use twin: the
    prefix-free BPE trainer (sorted alphabet, ties broken by id) then learns word-initial
    and continuation pieces apart, and a twin-led token maps back to ``##`` + text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def words(doc: str) -> str:
        pieces = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(doc))
        return " ".join(w[0] + w[1:].translate(_CONT) for w, _ in pieces)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency, special_tokens=specials,
                                  show_progress=show_progress)
    bpe.train_from_iterator(([words(d) for d in batch] for batch in _batched(docs, 1000)), trainer=trainer)
    vocab = {}
    for token, i in sorted(bpe.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        cont = token not in specials and ord(token[0]) >= 0xF0000
        vocab[("##" if cont else "") + _uncontinue(token)] = i
    return vocab


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
