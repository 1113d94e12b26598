"""MLMCollator: same batches as transformers' DataCollatorForLanguageModeling, same mask statistics,
never touching special tokens or padding, reproducible per seed, fresh masks per call and per worker."""
import math
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformers import BertTokenizerFast, DataCollatorForLanguageModeling  # noqa: E402

from fastpt.data import MLMCollator  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_WORDS, N_PIECES = 300, 60


def _make_tokenizer(padding_side="right", with_pad=True, pieces=True):
    """A BERT WordPiece tokenizer built in code: words w0..w299, continuation pieces ##p0..##p59."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = SPECIALS + [f"w{i}" for i in range(N_WORDS)] + [f"##p{i}" for i in range(N_PIECES if pieces else 0)]
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.decoder = decoders.WordPiece()
    tok = BertTokenizerFast(tokenizer_object=tk, padding_side=padding_side, pad_token="[PAD]", unk_token="[UNK]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if not with_pad:
        tok.pad_token = None
    return tok


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


def _texts(n, seed, min_words=3, max_words=30, unk=False):
    """Random sentences; about a third of the words split into 2-3 WordPiece pieces."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(min_words, max_words)):
            pieces = rng.choice([0, 0, 1, 2])
            w = f"w{rng.randrange(N_WORDS)}" + "".join(f"p{rng.randrange(N_PIECES)}" for _ in range(pieces))
            words.append("zzz" if unk and rng.random() < 0.05 else w)  # "zzz" -> [UNK] inside the text
        out.append(" ".join(words))
    return out


def _features(tok, n=24, seed=0, **kw):
    enc = tok(_texts(n, seed), **kw)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(n)]


def _binomial_bound(n, p, sigmas=5.0):
    return sigmas * math.sqrt(max(n * p * (1 - p), 1.0))


# ------------------------------------------------------------------ same batches as Hugging Face

def _forms(tok):
    """(name, examples, collator kwargs): every input form Hugging Face's collator accepts."""
    plain = _features(tok, seed=1)
    rich = _features(tok, seed=2, return_special_tokens_mask=True, return_token_type_ids=True)
    ids = [f["input_ids"] for f in plain]
    same_len = [f[:5] for f in ids]
    return [
        ("dict-lists", plain, {}),
        ("dict-lists-rich", rich, {}),
        ("dict-int64-tensors", [{k: torch.tensor(v) for k, v in f.items()} for f in plain], {}),
        ("dict-int32-tensors", [{"input_ids": torch.tensor(f["input_ids"], dtype=torch.int32)} for f in plain], {}),
        ("dict-numpy", [{"input_ids": np.array(f["input_ids"])} for f in plain], {}),
        ("dict-multiple-of-8", rich, {"pad_to_multiple_of": 8}),
        ("dict-same-length", [{"input_ids": x} for x in same_len], {}),
        ("dict-extra-key", [{"input_ids": x, "position_ids": list(range(5))} for x in same_len], {}),
        ("lists", ids, {}),
        ("lists-same-length", same_len, {}),
        ("lists-multiple-of-16", ids, {"pad_to_multiple_of": 16}),
        ("int64-tensors", [torch.tensor(x) for x in ids], {}),
        ("int32-tensors", [torch.tensor(x, dtype=torch.int32) for x in ids], {}),  # HF's mlm=True crashes here
    ]


def _assert_same_layout(ours, theirs):
    assert type(ours) is type(theirs)
    assert list(ours.keys()) == list(theirs.keys())
    for k in theirs:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_same_keys_shapes_dtypes_and_unmasked_values_as_hf(padding_side):
    tok = _make_tokenizer(padding_side)
    for name, examples, kw in _forms(tok):
        ours = MLMCollator(tok, seed=0, **kw)(examples)
        if name == "int32-tensors":
            # Hugging Face's collator fails to put int64 random ids into int32 rows; fastpt keeps int32
            # ids and gives int64 labels.
            assert ours["input_ids"].dtype == torch.int32 and ours["labels"].dtype == torch.int64
        else:
            _assert_same_layout(ours, DataCollatorForLanguageModeling(tok, seed=0, **kw)(examples))
        # Hugging Face's causal-LM labels are the padded ids: the masking must leave everything
        # it did not select equal to them, and label exactly what it selected.
        padded = DataCollatorForLanguageModeling(tok, mlm=False, **kw)(examples)["labels"]
        pad_pos = padded == -100
        padded = torch.where(pad_pos, torch.full_like(padded, tok.pad_token_id), padded).to(ours["input_ids"].dtype)
        sel = ours["labels"] != -100
        assert torch.equal(ours["input_ids"][~sel], padded[~sel]), name
        assert torch.equal(ours["labels"][sel], padded[sel].long()), name
        assert not sel[pad_pos].any(), name
        for k, v in DataCollatorForLanguageModeling(tok, mlm=False, **kw)(examples).items():
            if k not in ("input_ids", "labels"):
                assert torch.equal(ours[k], v), (name, k)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mlm_false_equals_hf(padding_side):
    tok = _make_tokenizer(padding_side)
    for name, examples, kw in _forms(tok):
        theirs = DataCollatorForLanguageModeling(tok, mlm=False, **kw)(examples)
        ours = MLMCollator(tok, mlm=False, **kw)(examples)
        _assert_same_layout(ours, theirs)
        for k in theirs:
            assert torch.equal(ours[k], theirs[k]), (name, k)


def test_return_tensors_np_matches_hf(tok):
    examples = _features(tok, seed=3)
    theirs = DataCollatorForLanguageModeling(tok, return_tensors="np", seed=0)(examples)
    ours = MLMCollator(tok, return_tensors="np", seed=0)(examples)
    assert list(ours.keys()) == list(theirs.keys())
    for k in theirs:
        assert isinstance(ours[k], np.ndarray) and ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype
    assert isinstance(MLMCollator(tok, seed=0)(examples, return_tensors="np")["labels"], np.ndarray)


def test_examples_are_not_modified(tok):
    examples = _features(tok, seed=4, return_offsets_mapping=True)
    for f in examples:
        f["word_ids"] = list(range(len(f["input_ids"])))
    before = [dict(f) for f in examples]
    MLMCollator(tok, whole_word_mask=True, seed=0)(examples)
    assert examples == before


# ------------------------------------------------------------------ statistics against Hugging Face

def _split_counts(batch, original, mask_id):
    sel = batch["labels"] != -100
    m, o = batch["input_ids"][sel], original[sel]
    n_mask = int((m == mask_id).sum())
    n_keep = int((m == o).sum())
    return int(sel.sum()), n_mask, n_keep, int(sel.numel() - sel.sum())


@pytest.mark.parametrize("p,mask_p,rand_p", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.4)])
def test_statistics_match_hf(tok, p, mask_p, rand_p):
    # 1024 rows of 128: ~120k eligible tokens, so 5-sigma bounds are ~1% of the rates.
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(len(SPECIALS), len(tok), (1024, 128), generator=g)
    ids[:, 0], ids[:, 127] = tok.cls_token_id, tok.sep_token_id
    ids[::3, 100:] = tok.pad_token_id  # padding, never masked
    examples = [{"input_ids": r} for r in ids]
    eligible = int((ids >= len(SPECIALS)).sum())
    V = len(tok)
    kw = dict(mlm_probability=p, mask_replace_prob=mask_p, random_replace_prob=rand_p, seed=3)
    rates = {}
    for name, coll in (("hf", DataCollatorForLanguageModeling(tok, **kw)), ("fastpt", MLMCollator(tok, **kw))):
        batch = coll(examples)
        k, n_mask, n_keep, _ = _split_counts(batch, ids, tok.mask_token_id)
        n_rand = k - n_mask - n_keep
        # a random id may be the mask id or the original id (probability 1/V each)
        expect = {"selected": (k, eligible, p), "mask": (n_mask, k, mask_p + rand_p / V),
                  "random": (n_rand, k, rand_p * (1 - 2 / V)), "keep": (n_keep, k, 1 - mask_p - rand_p + rand_p / V)}
        for what, (count, n, q) in expect.items():
            assert abs(count - n * q) <= _binomial_bound(n, q), (name, what, count / n, q)
        rates[name] = {what: count / n for what, (count, n, q) in expect.items()}
        rand_ids = batch["input_ids"][(batch["labels"] != -100) & (batch["input_ids"] != ids)
                                      & (batch["input_ids"] != tok.mask_token_id)]
        # random ids are uniform on [0, V): mean (V-1)/2, sd V/sqrt(12)
        assert abs(float(rand_ids.double().mean()) - (V - 1) / 2) <= 5 * V / math.sqrt(12 * max(len(rand_ids), 1))
    for what in rates["hf"]:
        n = eligible if what == "selected" else eligible * p
        q = rates["hf"][what]
        assert abs(rates["fastpt"][what] - q) <= 5 * math.sqrt(2 * q * (1 - q) / n), what


# ------------------------------------------------------------------ what must never be masked

def test_specials_and_padding_never_masked(tok):
    enc = tok(_texts(64, seed=5, unk=True), return_special_tokens_mask=True)
    rows = [{"input_ids": enc["input_ids"][i]} for i in range(64)]
    # the mask id inside the text is a special id too: never selected
    rows[0]["input_ids"] = rows[0]["input_ids"][:2] + [tok.mask_token_id] + rows[0]["input_ids"][2:]
    coll = MLMCollator(tok, mlm_probability=1.0, seed=1)
    for _ in range(3):
        batch = coll(rows)
        ids = MLMCollator(tok, mlm=False)(rows)["labels"]
        ids = torch.where(ids == -100, torch.full_like(ids, tok.pad_token_id), ids)
        special = torch.isin(ids, torch.tensor(tok.all_special_ids))
        assert (ids == tok.unk_token_id).any() and (ids == tok.pad_token_id).any()
        # with mlm_probability=1 every other token is selected: the mask is exact, not statistical
        assert torch.equal(batch["labels"] != -100, ~special)


def test_special_tokens_mask_replaces_special_ids_like_hf(tok):
    # Hugging Face uses the examples' special_tokens_mask alone when it is given: [UNK] inside the
    # text is then maskable, [CLS]/[SEP]/padding are not.
    examples = _features(tok, n=32, seed=6, return_special_tokens_mask=True)
    batch = MLMCollator(tok, mlm_probability=1.0, seed=0)(examples)
    stm = torch.zeros_like(batch["labels"])
    for i, f in enumerate(examples):
        stm[i, :len(f["special_tokens_mask"])] = torch.tensor(f["special_tokens_mask"])
        stm[i, len(f["special_tokens_mask"]):] = 1
    assert "special_tokens_mask" not in batch
    assert torch.equal(batch["labels"] != -100, stm == 0)


def _padded_ids(tok, examples):
    """The padded input_ids of ``examples`` (what the masked batch holds where nothing was selected)."""
    ids = MLMCollator(tok, mlm=False)(examples)["labels"]
    return torch.where(ids == -100, torch.full_like(ids, tok.pad_token_id), ids)


def test_more_than_64_special_tokens_never_masked():
    """A tokenizer with more than 64 special ids (many added special tokens) made every call raise:
    the collator passed them all to mlm_mask, which took at most 64."""
    tok = _make_tokenizer()
    tags = [f"<tag_{i}>" for i in range(70)]
    tok.add_special_tokens({"additional_special_tokens": tags})
    assert len(tok.all_special_ids) > 64
    texts = [t + " " + " ".join(random.Random(i).sample(tags, 3)) for i, t in enumerate(_texts(16, seed=14))]
    examples = [{"input_ids": x} for x in tok(texts)["input_ids"]]
    ids = _padded_ids(tok, examples)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(tags))).sum() == 48
    for wwm in (False, True):
        batch = MLMCollator(tok, mlm_probability=1.0, whole_word_mask=wwm, seed=0)(examples)
        assert torch.equal(batch["labels"] != -100, ~special), wwm


def test_special_tokens_added_after_construction_are_never_masked():
    """The collator read the tokenizer's special ids once, at construction: a special token added
    afterwards was selected and labelled (Hugging Face reads them at every call)."""
    tok = _make_tokenizer()
    colls = [MLMCollator(tok, mlm_probability=1.0, whole_word_mask=wwm, seed=0) for wwm in (False, True)]
    w5, w10 = tok.convert_tokens_to_ids(["w5", "w10"])
    for c in colls:
        assert c([[tok.cls_token_id, w5, w10, tok.sep_token_id]])["labels"].tolist() == [[-100, w5, w10, -100]]
    tok.add_special_tokens({"additional_special_tokens": ["<ent>"]})  # a new id
    ent = tok.convert_tokens_to_ids("<ent>")
    for c in colls:
        labels = c([[tok.cls_token_id, ent, w10, ent, tok.sep_token_id]])["labels"]
        assert labels.tolist() == [[-100, -100, w10, -100, -100]]
    tok.add_special_tokens({"additional_special_tokens": ["<ent>", "w5"]})  # an existing id made special
    assert w5 in tok.all_special_ids and len(tok) == ent + 1
    for c in colls:
        assert c([[tok.cls_token_id, w5, w10, tok.sep_token_id]])["labels"].tolist() == [[-100, -100, w10, -100]]


def test_whole_word_tokens_added_after_first_call_start_words():
    """The WordPiece "##" table was built on the first whole-word call and never grown: a token added
    to the tokenizer afterwards was looked up as the table's last entry (a "##" piece) and tied to
    the word before it."""
    tok = _make_tokenizer()
    coll = MLMCollator(tok, whole_word_mask=True, mlm_probability=0.5, seed=0)
    coll([[tok.cls_token_id, 7, tok.sep_token_id]])
    tok.add_tokens(["newword"])
    new = tok.convert_tokens_to_ids("newword")
    n = 400
    sel = coll([[tok.cls_token_id, 7, new, tok.sep_token_id]] * n)["labels"][:, 1:3] != -100
    assert abs(int((sel[:, 0] != sel[:, 1]).sum()) - n / 2) <= _binomial_bound(n, 0.5)


def test_torch_mask_tokens_takes_lists_like_hf(tok):
    """torch_mask_tokens refused a list special_tokens_mask (TypeError), which Hugging Face's method
    converts; the whole-word path needed tensors for it and for offset_mapping too."""
    enc = tok(_texts(8, seed=15), padding=True, return_special_tokens_mask=True, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    stm, offsets = enc["special_tokens_mask"], enc["offset_mapping"]
    assert isinstance(stm, list) and isinstance(offsets, list)
    assert DataCollatorForLanguageModeling(tok).torch_mask_tokens(ids.clone(), stm)[1].shape == ids.shape
    for wwm in (False, True):
        expect = MLMCollator(tok, whole_word_mask=wwm, mlm_probability=0.5, seed=1).torch_mask_tokens(
            ids, torch.tensor(stm), torch.tensor(offsets) if wwm else None)
        for form in (list, np.array):
            out = MLMCollator(tok, whole_word_mask=wwm, mlm_probability=0.5, seed=1).torch_mask_tokens(
                ids, form(stm), form(offsets) if wwm else None)
            assert torch.equal(out[0], expect[0]) and torch.equal(out[1], expect[1]), (wwm, form)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        MLMCollator(tok, seed=0).torch_mask_tokens(ids, [[0, 1], [0]])


# ------------------------------------------------------------------ seeds

def test_seed_reproducible_and_every_call_differs(tok):
    examples = _features(tok, n=16, seed=8)
    a, b, c = MLMCollator(tok, seed=123), MLMCollator(tok, seed=123), MLMCollator(tok, seed=124)
    runs_a = [a(examples) for _ in range(4)]
    runs_b = [b(examples) for _ in range(4)]
    for x, y in zip(runs_a, runs_b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    masks = [r["labels"] for r in runs_a] + [c(examples)["labels"]]
    assert len({m.numpy().tobytes() for m in masks}) == len(masks)


def test_unseeded_follows_torch_manual_seed(tok):
    examples = _features(tok, n=16, seed=9)
    coll = MLMCollator(tok)
    torch.manual_seed(0)
    first = coll(examples)["labels"]
    second = coll(examples)["labels"]
    torch.manual_seed(0)
    assert torch.equal(coll(examples)["labels"], first) and not torch.equal(first, second)


class _Repeated(torch.utils.data.Dataset):
    """The same example n times, so any difference between batches comes from the masks."""

    def __init__(self, example, n):
        self.example, self.n = example, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return dict(self.example)


def _loader_masks(coll, example, epochs=2):
    loader = torch.utils.data.DataLoader(_Repeated(example, 32), batch_size=4, num_workers=2, collate_fn=coll,
                                         multiprocessing_context="fork")
    return [b["labels"] for _ in range(epochs) for b in loader]


def test_dataloader_workers_get_distinct_reproducible_masks(tok):
    example = _features(tok, n=1, seed=10, min_words=60, max_words=60)[0]
    masks = _loader_masks(MLMCollator(tok, seed=5), example)
    assert len(masks) == 16
    # batches of the two workers, and of the re-created workers of the second epoch, all differ
    assert len({m.numpy().tobytes() for m in masks}) == 16
    again = _loader_masks(MLMCollator(tok, seed=5), example)
    assert all(torch.equal(x, y) for x, y in zip(masks, again))
    unseeded = _loader_masks(MLMCollator(tok), example, epochs=1)
    assert len({m.numpy().tobytes() for m in unseeded}) == 8


# ------------------------------------------------------------------ whole words

def test_whole_word_mask_keeps_words_together(tok):
    texts = _texts(128, seed=11)
    enc = tok(texts, return_offsets_mapping=True)
    plain = [{"input_ids": enc["input_ids"][i]} for i in range(len(texts))]
    by_offsets = [{"input_ids": i, "offset_mapping": o} for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
    by_word_ids = [{"input_ids": enc["input_ids"][i], "word_ids": enc.word_ids(i)} for i in range(len(texts))]
    outs = [MLMCollator(tok, whole_word_mask=True, mlm_probability=0.3, seed=2)(x)
            for x in (plain, by_offsets, by_word_ids)]
    for o in outs[1:]:  # the three sources of word boundaries agree on these texts
        assert list(o.keys()) == list(outs[0].keys())
        assert torch.equal(o["input_ids"], outs[0]["input_ids"]) and torch.equal(o["labels"], outs[0]["labels"])
    sel = outs[0]["labels"] != -100
    n_words = n_selected = 0
    split_words = 0
    for i in range(len(texts)):
        words = {}
        for pos, w in enumerate(enc.word_ids(i)):
            if w is not None:
                words.setdefault(w, []).append(pos)
        for positions in words.values():
            s = sel[i, positions]
            assert bool(s.all()) or not bool(s.any()), (i, positions)
            n_words += 1
            n_selected += bool(s[0])
            split_words += len(positions) > 1
    assert split_words > 200
    assert abs(n_selected - 0.3 * n_words) <= _binomial_bound(n_words, 0.3)


def test_whole_word_mask_of_a_byte_level_bpe_takes_berts_words():
    """Without word_ids or offsets, whole-word masking needed WordPiece '##' pieces (a byte-level BPE raised
    ValueError). A fast tokenizer's vocabulary now gives BERT's words, as fastpt pretrain masks shards: every
    CJK ideograph and punctuation mark a word of its own, so unspaced Chinese rows mask about mlm_probability
    of their tokens (with offset_mapping, Hugging Face's rule makes such a row one word, masked whole or not)."""
    from transformers import PreTrainedTokenizerFast

    from fastpt.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(300)] + ["，", "。"]
    docs = ["".join(rng.choice(chars) for _ in range(rng.randint(40, 90))) for _ in range(300)]
    backend = train_tokenizer(docs, "bpe", 600)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", mask_token="<mask>")
    examples = [{"input_ids": fast(d, add_special_tokens=False)["input_ids"][:64]} for d in docs[:64]]
    out = MLMCollator(fast, whole_word_mask=True, mlm_probability=0.15, seed=0)(examples)
    labelled = (out["labels"] != -100).float()
    rows = labelled.sum(1) / torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.float32)
    assert int((rows == 0).sum()) <= 2 and float(rows.max()) < 0.5
    assert abs(float(labelled.sum()) / sum(len(e["input_ids"]) for e in examples) - 0.15) < 0.03


def test_whole_word_mask_with_a_custom_pre_tokenizer_falls_back_to_wordpiece_pieces():
    """A fast tokenizer with a Python pre-tokenizer (RoFormer's Chinese tokenizer installs jieba's) cannot be
    serialised, which the vocabulary's word tables read: the collator raised tokenizers' bare Exception where it
    used to take the ## pieces. It still does."""
    from tokenizers.pre_tokenizers import PreTokenizer

    class Words:
        def pre_tokenize(self, pretok):
            pretok.split(lambda i, s: [s])

    custom = _make_tokenizer()
    ids = custom("w1 w2 w3")["input_ids"]
    custom.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(Words())
    out = MLMCollator(custom, whole_word_mask=True, seed=0)([ids])
    assert out["labels"].shape == (1, len(ids))


def test_whole_word_pairs_do_not_tie_words_of_both_sequences(tok):
    # In a pair, Encoding.word_ids() restarts at 0 in the second sequence: word 0 of each sequence
    # must still be drawn independently.
    n = 400
    enc = tok(_texts(n, seed=12, min_words=1, max_words=1), _texts(n, seed=13, min_words=1, max_words=1))
    examples = [{"input_ids": enc["input_ids"][i], "word_ids": enc.word_ids(i)} for i in range(n)]
    out = MLMCollator(tok, whole_word_mask=True, mlm_probability=0.5, seed=4)(examples)
    first = [bool(out["labels"][i, 1] != -100) for i in range(n)]
    second = [bool(out["labels"][i, enc["input_ids"][i].index(tok.sep_token_id) + 1] != -100) for i in range(n)]
    agree = sum(a == b for a, b in zip(first, second))
    assert abs(agree - n / 2) <= _binomial_bound(n, 0.5)


# ------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("kwargs,match", [
    ({"mlm_probability": 1.5}, "mlm_probability"),
    ({"mlm_probability": -0.1}, "mlm_probability"),
    ({"mlm_probability": None}, "mlm_probability"),
    ({"mask_replace_prob": 1.2}, "mask_replace_prob"),
    ({"random_replace_prob": -0.5, "mask_replace_prob": 0.5}, "random_replace_prob"),
    ({"mask_replace_prob": 0.7, "random_replace_prob": 0.4}, "mask_replace_prob \\+ random_replace_prob"),
    ({"mlm": False, "whole_word_mask": True}, "whole_word_mask"),
    ({"return_tensors": "tf"}, "return_tensors"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_constructor_arguments(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLMCollator(tok, **kwargs)


def test_bad_inputs(tok):
    no_mask = _make_tokenizer()
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="mask token"):
        MLMCollator(no_mask)
    coll = MLMCollator(tok, seed=0)
    with pytest.raises(ValueError, match="empty"):
        coll([])
    for c in (coll, MLMCollator(tok, whole_word_mask=True)):
        with pytest.raises(ValueError, match="input_ids"):
            c([{"input_ids": [2, 5, len(tok) + 3, 3]}])
    with pytest.raises(ValueError, match="word_ids"):
        coll([{"input_ids": [2, 5, 6, 3], "word_ids": [None, 0, None]}])
    with pytest.raises(ValueError, match="pad token"):
        MLMCollator(_make_tokenizer(with_pad=False), seed=0)([[2, 5, 3], [2, 5, 6, 3]])
    with pytest.raises(ValueError, match="pad token"):
        MLMCollator(_make_tokenizer(with_pad=False), seed=0)([{"input_ids": [2, 5, 3]}, {"input_ids": [2, 3]}])
    # a vocabulary whose words no rule tells apart: BPE over whitespace words, no ## pieces, no byte level
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["a", "b", "ab"])}
    bare = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=bare, pad_token="[PAD]", mask_token="[MASK]")
    with pytest.raises(ValueError, match="whole_word_mask"):
        MLMCollator(bare, whole_word_mask=True)([[2, 5, 3]])
    # a WordPiece vocabulary without ## pieces: every token a word of its own
    assert MLMCollator(_make_tokenizer(pieces=False), whole_word_mask=True, seed=0)([[2, 5, 3]])["labels"].shape == (1, 3)
