"""Tokenizers for preprocessing: load a Hugging Face ``tokenizers`` file or model directory,
or train WordPiece / byte-level BPE on a corpus iterator.

Everything here returns a ``tokenizers.Tokenizer`` (the Rust tokenizer, no transformers
needed); ``special_token_ids`` finds its [CLS]/[SEP]/[PAD]/[MASK]/EOS/UNK ids for the
shard manifest.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator, Sequence

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
KINDS = ("wordpiece", "bpe")
# the largest vocabulary train_tokenizer accepts: ids must fit the uint32 shards, and the
# tokenizers trainers allocate in proportion to vocab_size (1e9 aborts the process out of memory)
MAX_VOCAB = 1 << 24
# max_input_chars_per_word of the WordPiece tokenizers train_tokenizer makes. tokenizers' (and BERT's) default,
# 100, turns every longer space-free run into one [UNK]: in Thai, Lao, Khmer or Burmese text, which BERT's
# pre-tokenizer does not cut, that lost 48% of a Thai test corpus's characters, although the trained
# vocabulary has the pieces (its training sees the whole run). WordPiece's greedy longest match (tokenizers
# tries every shorter substring) costs time growing faster than the square of the run's length, and most on
# runs of letters the vocabulary has in short pieces (a 4-letter DNA-like run, small vocabulary, 1 Xeon
# thread: 0.28 ms at 100 characters, 2.4 ms at 300, 32 ms at 1,000; 127 ms at 900 with an English
# vocabulary): 300 keeps Thai sentences (a few hundred characters) at ~10x BERT's worst case, where 1,000
# made such runs (base64, sequences, minified code) cost 100x. Longer runs stay [UNK]; preprocess counts
# them and warns. Tokenizers loaded from a model directory keep their 100, as transformers reads them.
TRAINED_MAX_WORD_CHARS = 300

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
    as do_lower_case) and ``tokenize_chinese_chars`` (default True) from ``tokenizer_config.json``), else
    ``vocab.json`` + ``merges.txt`` (GPT-2 / RoBERTa byte-level BPE, ``add_prefix_space`` from
    tokenizer_config.json). The two slow formats get the special tokens as transformers' ``AutoTokenizer``
    gives them (``_add_hf_tokens``): those tokenizer_config.json and special_tokens_map.json name (or the
    class's defaults) and their ``additional_special_tokens`` as special tokens, so that a literal "[SEP]"
    or "<|endoftext|>" in the text is one id, and the tokens added to the vocabulary (``added_tokens.json``,
    or tokenizer_config.json's ``added_tokens_decoder``) at their recorded ids.
    Raises FileNotFoundError naming what was looked for, ValueError for an unreadable file or an added
    token whose recorded id is not the one it gets.
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
        return _load_bpe_dir(path, config)
    raise FileNotFoundError(f"tokenizer {path}: a directory without tokenizer.json, vocab.txt or vocab.json+merges.txt")


_BERT_SPECIALS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
# the defaults of transformers' GPT2Tokenizer and RobertaTokenizer (BART's and Longformer's are RoBERTa's)
_GPT2_SPECIALS = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"}
_ROBERTA_SPECIALS = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "sep": "</s>", "pad": "<pad>", "cls": "<s>",
                     "mask": "<mask>"}
# transformers' byte-level BPE tokenizers by family, as tokenizer_config.json's tokenizer_class or config.json's
# model_type names them (lower case, "Tokenizer" / "TokenizerFast" dropped)
_ROBERTA_CLASSES = ("roberta", "bart", "longformer", "led", "mvp")
_GPT2_CLASSES = ("gpt2", "opt", "gpt_neo", "gptneo", "gptj", "codegen", "gpt_neox", "gptneox")
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order
_HF_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ADDED_TOKEN_KEYS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _load_vocab_txt(path: Path, config: dict):
    """``path/vocab.txt`` as transformers' ``BertTokenizerFast`` loads it (``convert_slow_tokenizer``'s
    BertConverter, then the added and special tokens: ``_add_hf_tokens``)."""
    names = _special_names(path, config)
    specials = {role: _token_text(names.get(f"{role}_token", default)) for role, default in _BERT_SPECIALS.items()}
    strip_accents = config.get("strip_accents")
    tok = _bert_like(str(path / "vocab.txt"), lowercase=bool(config.get("do_lower_case", True)),
                     strip_accents=None if strip_accents is None else bool(strip_accents),
                     handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                     unk_token=specials["unk"] or "[UNK]")
    _add_hf_tokens(tok, path, config, names, _BERT_SPECIALS)
    _set_template(tok, specials["cls"] or "[CLS]", specials["sep"] or "[SEP]")
    return tok


def _load_bpe_dir(path: Path, config: dict):
    """``path/vocab.json`` + ``merges.txt`` as transformers' ``GPT2Tokenizer`` / ``RobertaTokenizer`` load
    them: byte-level BPE, then the added and special tokens (``_add_hf_tokens``) with the defaults of the
    class tokenizer_config.json's ``tokenizer_class`` names (RoBERTa's ``<s> <pad> </s> <unk> <mask>`` for
    the RoBERTa / BART / Longformer family, else GPT-2's ``<|endoftext|>``; without a class, RoBERTa's when
    the vocabulary has ``<s>`` and no ``<|endoftext|>``), and the family's post-processor (RoBERTa:
    ``<s> $A </s>``, pairs ``<s> A </s></s> B </s>``; GPT-2: none, or ``add_bos_token`` / ``add_eos_token``).
    ``<mask>`` keeps the attributes its file gives it (RoBERTa's saved files give it ``lstrip``: " <mask>"
    is one id) and is plain otherwise, as transformers 5 reads a bare "<mask>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    prefix = bool(config.get("add_prefix_space", False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    roberta = _bpe_family(path, config)
    if roberta is None:  # no known class or model type: the vocabulary's own end-of-text token decides
        roberta = tok.token_to_id("<s>") is not None and tok.token_to_id("<|endoftext|>") is None
    defaults = _ROBERTA_SPECIALS if roberta else _GPT2_SPECIALS
    names = _special_names(path, config)
    _add_hf_tokens(tok, path, config, names, defaults)
    role = {r: _token_text(names.get(f"{r}_token", defaults.get(r))) for r in _HF_ROLES}
    if roberta:
        if role["cls"] and role["sep"]:
            tok.post_processor = processors.RobertaProcessing(
                (role["sep"], tok.token_to_id(role["sep"])), (role["cls"], tok.token_to_id(role["cls"])),
                trim_offsets=bool(config.get("trim_offsets", True)), add_prefix_space=prefix)
    else:
        first = role["bos"] if config.get("add_bos_token") else None
        last = role["eos"] if config.get("add_eos_token") else None
        if first or last:
            def seq(part: str, type_id: int) -> str:
                return " ".join(f"{t}:{type_id}" for t in (first, part, last) if t)

            ends = dict.fromkeys(t for t in (first, last) if t)
            tok.post_processor = processors.TemplateProcessing(
                single=seq("$A", 0), pair=f"{seq('$A', 0)} {seq('$B', 1)}",
                special_tokens=[(t, tok.token_to_id(t)) for t in ends])
    return tok


def _bpe_family(path: Path, config: dict) -> bool | None:
    """True for a RoBERTa-family folder, False for a GPT-2-family one, None when neither
    tokenizer_config.json's ``tokenizer_class`` nor config.json's ``model_type`` (what AutoTokenizer reads
    when the class is missing: OPT ships no class) names a known one."""
    for name in (config.get("tokenizer_class"), _read_json(path / "config.json").get("model_type")):
        name = str(name or "").lower().removesuffix("fast").removesuffix("tokenizer").replace("-", "_")
        if name.startswith(_ROBERTA_CLASSES):
            return True
        if name.startswith(_GPT2_CLASSES):
            return False
    return None


def _special_names(path: Path, config: dict) -> dict:
    """tokenizer_config.json updated by special_tokens_map.json (transformers: the map wins), unless the
    config records ``added_tokens_decoder`` (transformers >= 4.34 writes it; transformers then reads
    neither special_tokens_map.json nor added_tokens.json)."""
    names = dict(config)
    if not isinstance(config.get("added_tokens_decoder"), dict):
        names.update(_read_json(path / "special_tokens_map.json"))
    return names


def _add_hf_tokens(tok, path: Path, config: dict, names: dict, defaults: dict[str, str]) -> None:
    """Add a slow-format tokenizer's added and special tokens to ``tok`` as transformers'
    ``from_pretrained`` does (``tokenization_utils_base`` / ``tokenization_utils_tokenizers``).

    First the recorded added tokens in id order: tokenizer_config.json's ``added_tokens_decoder`` (AddedToken
    objects), else ``added_tokens.json`` (``{token: id}``, written by ``add_tokens()``; a token that is also
    a special token is special and matched on the raw text, the others are matched on the normalised text).
    Each must get its recorded id (ValueError otherwise: transformers would give it another, silently).
    Then the special tokens: ``bos/eos/unk/sep/pad/cls/mask_token`` (``defaults`` for roles the files leave
    out, none for a role set to null) and ``additional_special_tokens`` (``extra_special_tokens`` in
    transformers 5), non-normalised unless their AddedToken object says otherwise; a token not in the
    vocabulary gets the next id.
    """
    from tokenizers import AddedToken

    decoder = config.get("added_tokens_decoder")
    recorded: dict[int, AddedToken] = {}
    if isinstance(decoder, dict):
        source = path / "tokenizer_config.json"
        for key, spec in decoder.items():
            token = _added_token(spec)
            if token is None or not str(key).isdigit():
                raise ValueError(f"{source}: added_tokens_decoder: expected id -> AddedToken object with a "
                                 f"'content' string, got {key!r}: {spec!r}")
            recorded[int(key)] = token
    extra = [t for key in ("additional_special_tokens", "extra_special_tokens")  # transformers 4 / 5
             for value in [names.get(key)]
             for t in (value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [])]
    roles = [names[f"{role}_token"] if f"{role}_token" in names else defaults.get(role) for role in _HF_ROLES]
    special = [spec for spec in roles + extra if _token_text(spec)]
    if not isinstance(decoder, dict):
        source = path / "added_tokens.json"
        named = {_token_text(spec) for spec in special}
        for text, i in _read_json(source).items():
            if isinstance(i, bool) or not isinstance(i, int) or not text:
                raise ValueError(f"{source}: expected {{token: id}}, got {text!r}: {i!r}")
            recorded[i] = AddedToken(text, normalized=text not in named, special=text in named)
    for i, token in sorted(recorded.items()):
        tok.add_tokens([token])
        got = tok.token_to_id(token.content)
        if got != i:
            raise ValueError(f"{source}: the added token {token.content!r} is recorded at id {i}, but the "
                             f"vocabulary ({tok.get_vocab_size(with_added_tokens=False)} tokens, then the added "
                             f"tokens before it) gives it id {got}: an added token must be either the vocabulary's "
                             f"own at that id or new, with ids following the vocabulary without gaps; fix the "
                             f"file (transformers would give the token id {got}, not {i}, silently)")
    by_text = {t.content: t for t in recorded.values()}
    for spec in special:
        text = _token_text(spec)
        token = by_text.get(text) or _added_token(spec, special=True) or AddedToken(text, normalized=False,
                                                                                     special=True)
        tok.add_special_tokens([token])


def _added_token(spec, special: bool | None = None):
    """A ``tokenizers.AddedToken`` from an AddedToken object as transformers saves it (``content``, the
    strip / normalisation flags, ``special``; ``__type`` ignored), ``special`` forced when given; None for
    anything else."""
    from tokenizers import AddedToken

    if not isinstance(spec, dict) or not _token_text(spec):
        return None
    kwargs = {k: spec[k] for k in _ADDED_TOKEN_KEYS if k in spec}
    if special is not None:
        kwargs["special"] = special
    return AddedToken(**kwargs)


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


# BERT's BasicTokenizer word boundaries (transformers' tokenization_bert, tokenizers' BertPreTokenizer): each
# CJK ideograph of _is_chinese_char's blocks (Unified, Extensions A-E, Compatibility Ideographs and their
# Supplement: kana and hangul are not among them, BERT leaves those to spaces) and each punctuation character
# (_is_punctuation: Unicode P*, and every ASCII symbol) is a word of its own; whitespace separates words
_CJK_BLOCKS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# str.isspace less the control characters BERT's text cleaning deletes ("a\x0bb" is one word to it)
_NOT_SPACE = frozenset("\x0b\x0c\x1c\x1d\x1e\x1f\x85")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece / Llama byte tokens


def _is_cjk(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in _CJK_BLOCKS)


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or \
        unicodedata.category(char).startswith("P")


def _is_space(char: str) -> bool:
    return char.isspace() and char not in _NOT_SPACE


@functools.lru_cache(maxsize=None)
def _is_boundary(code: int) -> bool:
    """A character BERT's pre-tokenizer cuts around: a CJK ideograph, punctuation or whitespace."""
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        return False
    char = chr(code)
    return _is_cjk(code) or _is_punctuation(char) or _is_space(char)


@functools.lru_cache(maxsize=None)
def _opens_boundary(head: bytes) -> bool:
    """Whether the UTF-8 bytes ``head`` (a lead byte, perhaps some continuation bytes, possibly all of a
    character) begin a boundary character whatever bytes complete it. A byte-level token can hold part of a
    character (BPE splits rare ones into bytes); it starts a word only when its bytes already say which kind
    of character it starts. Continuation bytes or an invalid lead byte begin no character."""
    lead = head[0]
    if lead < 0x80:
        return _is_boundary(lead)
    n = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    if not n or len(head) > n or any(b & 0xC0 != 0x80 for b in head[1:]):
        return False
    code = lead & (0x7F >> n)
    for b in head[1:]:
        code = code << 6 | b & 0x3F
    free = 6 * (n - len(head))  # the bits the missing continuation bytes hold
    lo = code << free
    return all(_is_boundary(c) for c in range(lo, lo + (1 << free)))


def _char_bounds(data: bytes) -> tuple[bool, bool]:
    """(the token's bytes ``data`` begin with a boundary character, they end with one that is not a plain
    space); ``data`` may leave out the token's middle (``_edge_bytes``).

    The first: ``_opens_boundary`` of the first character's bytes present; for a token beginning inside a
    character (byte-level BPE merges the last bytes of one ideograph with the first of the next: "Ĺä¸"),
    of the first character that begins in it: a token holding the start of a CJK ideograph begins that
    ideograph's word (the previous character's last bytes riding along). The second needs the whole last
    character: a token ending inside a character, or made of continuation bytes only, ends no word. A plain
    space (``Ġ``, ``▁``) does not end one: byte-level and SentencePiece tokenizers write a word's space at
    its front, so a lone ``Ġ`` / ``▁`` token (its merge with the next piece missing) belongs to the word after."""
    if not data:
        return False, False
    first = 0
    while first < len(data) - 1 and first < 3 and data[first] & 0xC0 == 0x80:  # a previous character's bytes
        first += 1
    lead = data[first]
    n = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    starts = _opens_boundary(data[first:first + n])
    k = len(data) - 1
    while k > 0 and k > len(data) - 4 and data[k] & 0xC0 == 0x80:
        k -= 1
    try:
        last = data[k:].decode("utf-8")
    except UnicodeDecodeError:
        return starts, False
    return starts, len(last) == 1 and last != " " and _is_boundary(ord(last))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the character a byte-level token writes -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@functools.lru_cache(maxsize=1)
def _byte_translation() -> dict[int, int]:
    """``str.translate`` table: a byte-level character -> the code point of its byte (then latin-1 bytes)."""
    return {ord(c): b for c, b in _byte_decoder().items()}


def _edge_bytes(token: str, byte_level: bool) -> bytes:
    """The text bytes at both ends of the one a vocabulary entry stands for (all of a short one's), enough
    to hold its first and last characters: byte-level characters mapped back to their bytes (any other
    character as its UTF-8), or SentencePiece text with ``▁`` for a space and ``<0xNN>`` byte tokens.
    Only the ends decide (``_char_bounds``): over 200,000 entries, whole tokens took seconds."""
    if byte_level:
        # a character is at most 4 bytes: the tail's last one, and the head's first one after up to 3 bytes of
        # the character before (_char_bounds skips them) fit these edges
        edges = token if len(token) <= 12 else token[:8] + token[-4:]
        try:
            return edges.translate(_byte_translation()).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte-level alphabet
            table = _byte_decoder()
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in edges)
    m = _BYTE_FALLBACK.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return (token[:1] + token[-1:]).replace("\u2581", " ").encode("utf-8", "replace")


def word_boundary_tables(tok):
    """``(starts, ends)``: two bools per id of ``tok`` (a ``tokenizers.Tokenizer``) for whole-word masking on
    token ids alone. A token begins a word where ``starts[id]`` is True or the token before it has
    ``ends[id]`` True (``ops.mlm_mask.word_starts``), besides the objective's own rule: a row's first token and a token
    after a special one begin words whatever they are.

    WordPiece (and BPE with a ``continuing_subword_prefix``): every token but the continuation pieces
    (``##``), BERT's rule; ``ends`` is all False (BERT's pre-tokenizer already cut at every boundary, so a
    token after one is no ``##`` piece). Byte-level BPE (GPT-2, RoBERTa, Llama 3) and SentencePiece-style
    BPE / Unigram (a ``Metaspace`` pre-tokenizer, or Llama's normalizer writing ``▁`` for spaces) mark the
    words BERT's BasicTokenizer makes, as far as the tokens allow: a token begins a word when it begins
    with a space (``Ġ``, ``▁``) or with one of the characters BERT cuts around (each a word of its own):
    a CJK ideograph of BERT's ``_is_chinese_char`` blocks, punctuation (Unicode P*, and every ASCII symbol,
    BERT's ``_is_punctuation``), or other whitespace (a newline); and the token after one ending with such
    a character (not a plain space, which such tokenizers write at the front of the next word) begins a
    word too. So "你好，世界" is five words as BERT makes them, "ends\\nnext" two (the newline token a word
    of its own), "Hello," two ("Hello" and ","; before, without a space, it was one word and a whole
    unspaced Chinese or Japanese document was one word). A token holding characters of several words
    (GPT-2's '."', two ideographs merged) stays one word. Kana and hangul follow BERT: not cut around
    (BERT leaves them to spaces, as Thai), so that the words are those of fastpt's WordPiece tokenizers
    (BERT's pre-tokenizer) whatever the tokenizer; Japanese kana after a kanji begin a word (the kanji
    ends one) and run on to the next kanji or punctuation. Tokens are read as their bytes (the byte-level
    alphabet mapped back, ``<0xNN>`` byte-fallback tokens as that byte): a token holding the first bytes
    of a character begins a word only when the bytes it has make that character a boundary character
    whatever follows (``_opens_boundary``); one made of a character's last bytes continues it.
    Added and special tokens, and ids the vocabulary does not name, are words of their own.
    Returns two bool tensors of shape (max id + 1,). Raises ValueError for a tokenizer none of these
    rules fits."""
    import torch

    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

    def parts(node) -> list[dict]:  # a normalizer / pre-tokenizer / decoder and the members of a Sequence
        if not isinstance(node, dict):
            return []
        members = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
        return [node] + [p for child in members for p in parts(child)]

    nodes = [p for key in ("normalizer", "pre_tokenizer", "decoder") for p in parts(spec.get(key))]
    steps = {p.get("type") for p in nodes}
    # SentencePiece converted as Llama / Mistral are: no Metaspace, a normalizer writing ▁ for spaces
    # (Prepend("▁") + Replace(" ", "▁")) and a decoder reading it back
    if any("\u2581" in json.dumps({k: v for k, v in p.items() if k != "type"}, ensure_ascii=False) for p in nodes
           if p.get("type") in ("Replace", "Prepend")):
        steps.add("Metaspace")
    prefix = model.get("continuing_subword_prefix")
    if kind == "WordPiece" or (kind == "BPE" and prefix):
        def bounds(t: str) -> tuple[bool, bool]:
            return not t.startswith(prefix or "##"), False
    elif (kind == "BPE" and "ByteLevel" in steps) or (kind in ("BPE", "Unigram") and "Metaspace" in steps):
        byte_level = kind == "BPE" and "ByteLevel" in steps

        def bounds(t: str) -> tuple[bool, bool]:  # a leading Ġ / ▁ is a space: whitespace begins a word
            return _char_bounds(_edge_bytes(t, byte_level))
    else:
        raise ValueError(f"tokenizer: cannot tell where words begin in a {kind} model without a ## prefix, a "
                         f"byte-level or a Metaspace pre-tokenizer (normalizer / pre-tokenizer / decoder steps: "
                         f"{sorted(s for s in steps if s)}); whole-word masking needs the batches' word_ids")
    starts, ends = [True] * size, [True] * size  # ids the vocabulary does not name: words of their own
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    for text, i in vocab.items():
        if text not in added:
            starts[i], ends[i] = bounds(text)
    return torch.tensor(starts, dtype=torch.bool), torch.tensor(ends, dtype=torch.bool)


def word_start_table(tok):
    """``word_boundary_tables(tok)[0]``: True per id where the token begins a word whatever comes before it
    (``objectives.MLM.set_word_starts``). Without the ``ends`` table a token after one ending with a
    boundary character (the "next" of "ends\\nnext", the "word" of "(word") stays in that token's word."""
    return word_boundary_tables(tok)[0]


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
    [MASK] at ids 0..4, post-processor ``[CLS] $A [SEP]``; words (BERT's pre-tokenizer's) of up to
    ``TRAINED_MAX_WORD_CHARS`` characters are split into pieces (BERT's 100 made a longer one [UNK]).
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
                                     unk_token="[UNK]", max_input_chars_per_word=TRAINED_MAX_WORD_CHARS)
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


class _Symbols:
    """The one-character symbols ``_train_wordpiece`` writes words with, for the BPE trainer.

    A word's first character stands for itself; every later character (WordPiece's ``##`` pieces) gets a
    twin in the private-use planes 15-16: a Basic Multilingual Plane character its fixed twin in plane 15
    (``code + U+F0000``, as before, so the vocabulary of a corpus does not depend on its documents' order:
    the trainer sorts its alphabet by code point and breaks merge ties by id), and a character past
    U+FFFF (or a word-initial one from planes 15-16, which would collide with twins) one of plane 16
    handed out in order of first appearance, so any code point works (characters past U+1FFFF once
    continued a word as themselves: a word of CJK Extension F-I ideographs, which BERT's pre-tokenizer
    does not split, was always [UNK]). Only those rare characters' ids can depend on document order.
    ``meaning`` maps a twin back to (character, continues a word). ``fresh`` collects the characters
    first seen inside a word, whose word-initial form must join the alphabet too.
    Raises ValueError past 65,536 plane-16 twins.
    """

    PLANE15, PLANE16 = 0xF0000, 0x100000

    def __init__(self):
        self.meaning: dict[str, tuple[str, bool]] = {}
        self.fresh: list[str] = []
        self.next16 = self.PLANE16
        self.first, self.inside = _SymbolTable(self, False), _SymbolTable(self, True)

    def _twin(self, char: str, inside: bool) -> int:
        code = ord(char)
        if inside and code < 0x10000:
            twin = code + self.PLANE15
        else:
            twin, self.next16 = self.next16, self.next16 + 1
            if twin > 0x10FFFF:
                raise ValueError("the documents hold more than 65,536 distinct characters past U+FFFF inside "
                                 "words (plus word-initial characters of planes 15-16): too many for a WordPiece "
                                 "alphabet")
        self.meaning[chr(twin)] = (char, inside)
        if inside:
            self.fresh.append(char)
        return twin

    def word(self, word: str) -> str:
        return word[:1].translate(self.first) + word[1:].translate(self.inside)

    def text(self, token: str) -> str:
        """The WordPiece token a BPE token of symbols stands for (``##`` + text for a continuation)."""
        cont = token[0] in self.meaning and self.meaning[token[0]][1]
        return ("##" if cont else "") + "".join(self.meaning[c][0] if c in self.meaning else c for c in token)


class _SymbolTable(dict):
    """``str.translate`` table of ``_Symbols``: a code point -> its symbol's, for a word's first
    character (itself below plane 15) or for the characters inside a word (``inside``: a twin)."""

    def __init__(self, symbols: _Symbols, inside: bool):
        super().__init__()
        self.symbols, self.inside = symbols, inside

    def __missing__(self, code: int) -> int:
        own = code < _Symbols.PLANE15 and not self.inside
        self[code] = code if own else self.symbols._twin(chr(code), self.inside)
        return self[code]


def _train_wordpiece(docs: Iterable[str], tok, budget: int, specials: list[str], min_frequency: int,
                     show_progress: bool) -> dict[str, int]:
    """WordPiece vocabulary learned with BPE merges, deterministically.

    tokenizers' WordPieceTrainer (BPE with a ``##`` prefix) numbers the ``##`` alphabet in
    hash-map order, and merge ties are broken by id, so each run learns a different
    vocabulary. Here every character after a word's first becomes a private-use twin
    (``_Symbols``): the prefix-free BPE trainer (sorted alphabet, ties broken by id) then learns
    word-initial and continuation pieces apart, and a twin-led token maps back to ``##`` + text.
    As WordPieceTrainer, the alphabet holds every character of the corpus in its word-initial form
    (a character seen only inside words is added as a one-character word, which no merge uses):
    without it a word starting with that character would be [UNK].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    symbols = _Symbols()

    def words(doc: str) -> str:
        pieces = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(doc))
        out = " ".join(symbols.word(w) for w, _ in pieces)
        if symbols.fresh:  # once each: the alphabet takes every character, however rare
            out += " " + " ".join(symbols.word(c) for c in symbols.fresh)
            symbols.fresh.clear()
        return out

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency, special_tokens=specials,
                                  show_progress=show_progress)
    bpe.train_from_iterator(([words(d) for d in batch] for batch in _batched(docs, 1000)), trainer=trainer)
    vocab = {}
    for token, i in sorted(bpe.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        vocab[token if token in specials else symbols.text(token)] = i
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
