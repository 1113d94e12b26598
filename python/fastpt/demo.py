"""``fastpt demo``: the masking kernels on a real corpus, with no download.

Builds a corpus from the Python installation's own documentation, trains a
WordPiece tokenizer on it, packs the token stream into rows, then runs BERT MLM
masking (token and whole-word), T5 span corruption, the UL2 mixture of
denoisers and MAE patch masking, printing examples and throughput next to the
baselines a user would otherwise run (transformers' collator, plain torch).
"""
from __future__ import annotations

import statistics
import time

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UL2_MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}  # the UL2 paper's paradigm tokens
NUM_SENTINELS = 100
MAX_BATCH_TOKENS = 2**24  # batch x seq_len: the timed tensors and the collator's Python lists stay a few GB
MAX_SEED = 2**63 - 1


class MaskingDemoError(ValueError):
    """A bad ``fastpt demo-masking`` argument; the message names the flag and its valid range."""


def check_args(*, batch: int, seq_len: int, vocab_size: int, seed: int) -> None:
    """Raise MaskingDemoError naming the first bad flag, before the corpus and tokenizer are built."""
    from fastpt.data.tokenizer import MAX_VOCAB

    # pack_rows writes [CLS] body [SEP]: a row needs one token of text beside them
    # the tokenizer trainer gets vocab_size - NUM_SENTINELS ids, which must leave room beside its specials
    low_vocab = NUM_SENTINELS + len(SPECIALS) + len(UL2_MODE_TOKENS) + 1
    for flag, value, low, high in (("--batch", batch, 1, MAX_BATCH_TOKENS), ("--seq-len", seq_len, 3, MAX_BATCH_TOKENS),
                                   ("--vocab-size", vocab_size, low_vocab, MAX_VOCAB), ("--seed", seed, 0, MAX_SEED)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            why = {"--seq-len": " ([CLS], at least one token, [SEP])",
                   "--vocab-size": f" (room for {len(SPECIALS) + len(UL2_MODE_TOKENS)} special tokens, "
                                   f"{NUM_SENTINELS} T5 sentinels and one more)"}.get(flag, "")
            raise MaskingDemoError(f"{flag}: expected an integer in [{low}, {high}]{why}, got {value!r}")
    if batch * seq_len > MAX_BATCH_TOKENS:
        raise MaskingDemoError(f"--batch x --seq-len: {batch} x {seq_len} = {batch * seq_len:,} tokens per batch, over "
                               f"the demo's limit of {MAX_BATCH_TOKENS:,}; lower --batch or --seq-len")


def _timeit(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_tokenizer(docs: list[str], vocab_size: int):
    """A BERT-style uncased WordPiece tokenizer trained on ``docs``, with T5 sentinels.

    The sentinels ``<extra_id_0> .. <extra_id_99>`` take the highest ids, ``<extra_id_0>``
    the very highest, so sentinel ids count down as T5's do.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size - NUM_SENTINELS,
                                        special_tokens=SPECIALS + list(UL2_MODE_TOKENS.values()),
                                        show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(NUM_SENTINELS))])
    return tok


def pack_rows(tok, docs: list[str], seq_len: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the corpus into ``rows`` rows of ``[CLS] tokens.. [SEP]`` (documents run on).

    Returns ``(ids (rows, seq_len) int64, word_ids (rows, seq_len) int64)``; word_ids number
    the words of each row (a ``##`` piece continues the previous word), -1 on [CLS]/[SEP].
    """
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    stream: list[int] = []
    cont: list[bool] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        stream.extend(enc.ids)
        cont.extend(t.startswith("##") for t in enc.tokens)
        if len(stream) >= rows * (seq_len - 2):
            break
    body = seq_len - 2
    n = min(rows, len(stream) // body)
    if n == 0:
        raise MaskingDemoError(f"--seq-len: the corpus has {len(stream):,} tokens, too few for one row of {seq_len}; "
                               f"lower --seq-len to {len(stream) + 2} or less")
    ids = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    starts = ~torch.tensor(cont[: n * body], dtype=torch.bool).view(n, body)
    starts[:, 0] = True
    words = starts.to(torch.int64).cumsum(1) - 1
    ids = torch.cat([torch.full((n, 1), cls), ids, torch.full((n, 1), sep)], 1)
    words = torch.cat([torch.full((n, 1), -1), words, torch.full((n, 1), -1)], 1)
    if n < rows:  # a small corpus: repeat rows to fill the batch
        reps = -(-rows // n)
        ids, words = ids.repeat(reps, 1)[:rows], words.repeat(reps, 1)[:rows]
    return ids.contiguous(), words.contiguous()


def _show(tok, ids: torch.Tensor, n: int = 48) -> str:
    pieces = [tok.id_to_token(int(i)) for i in ids[:n]]
    return " ".join(pieces)


def run_demo(*, batch: int = 256, seq_len: int = 512, vocab_size: int = 8000, seed: int = 0) -> dict:
    """Run the demo and print what it does; returns the measured throughputs (tokens/s).

    Raises MaskingDemoError (a ValueError naming the flag) for a bad argument, before any work."""
    check_args(batch=batch, seq_len=seq_len, vocab_size=vocab_size, seed=seed)
    from fastpt._info import info as fastpt_info
    from fastpt.data.corpus import python_docs_corpus
    from fastpt.ops import mlm_mask, random_masking, span_corrupt, ul2_denoise

    info = fastpt_info()
    usable = [b for b, why in info["backends"].items() if why is None]
    print(f"fastpt {info['version']} | torch {info['torch']} | usable backends: {', '.join(usable)}")

    t = time.perf_counter()
    docs = python_docs_corpus()
    print(f"corpus: {len(docs)} documents, {sum(len(d.split()) for d in docs):,} words of Python documentation "
          f"({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    tok = train_tokenizer(docs, vocab_size)
    print(f"tokenizer: WordPiece, {tok.get_vocab_size()} ids, trained in {time.perf_counter() - t:.1f} s")
    ids, words = pack_rows(tok, docs, seq_len, batch)
    n_tok = ids.numel()
    specials = [tok.token_to_id(s) for s in SPECIALS]
    mask_id, V = tok.token_to_id("[MASK]"), tok.get_vocab_size()
    print(f"batch: {tuple(ids.shape)} = {n_tok:,} tokens")
    results: dict[str, float] = {}

    print("\n-- BERT MLM masking (15%, 80/10/10), never on [CLS]/[SEP]/[PAD]")
    for backend in ("cpu", "reference"):
        if info["backends"].get(backend) is None:
            sec = _timeit(lambda: mlm_mask(ids, mask_token_id=mask_id, vocab_size=V, special_token_ids=specials,
                                           seed=seed, backend=backend))
            results[f"mlm_mask[{backend}]"] = n_tok / sec
            print(f"   fastpt mlm_mask backend={backend:<10} {n_tok / sec / 1e6:9.1f} M tokens/s")
    masked, labels = mlm_mask(ids, mask_token_id=mask_id, vocab_size=V, special_token_ids=specials, seed=seed)
    print(f"   masked {int((labels != -100).sum()):,} of {n_tok:,} tokens; row 0:\n   {_show(tok, masked[0])} ...")
    masked_w, labels_w = mlm_mask(ids, mask_token_id=mask_id, vocab_size=V, word_ids=words, seed=seed)
    print(f"   whole-word masking, row 0:\n   {_show(tok, masked_w[0])} ...")

    try:
        from fastpt.data import MLMCollator
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                         cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        examples = [{"input_ids": row} for row in ids.tolist()]
        hf = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
        ours = MLMCollator(hf_tok, mlm_probability=0.15, seed=seed)
        sec_hf = _timeit(lambda: hf(examples), repeats=3)
        sec_ours = _timeit(lambda: ours(examples), repeats=3)
        results["hf_collator"], results["mlm_collator"] = n_tok / sec_hf, n_tok / sec_ours
        print(f"   transformers DataCollatorForLanguageModeling {n_tok / sec_hf / 1e6:7.2f} M tokens/s"
              f" | fastpt MLMCollator (drop-in) {n_tok / sec_ours / 1e6:7.2f} M tokens/s"
              f" ({sec_hf / sec_ours:.1f}x, both from Python lists)")
        if "mlm_mask[cpu]" in results:
            print(f"   mlm_mask[cpu] on the tensor batch vs the HF collator: "
                  f"{results['mlm_mask[cpu]'] / results['hf_collator']:.0f}x")
    except ImportError as exc:
        print(f"   (transformers comparison skipped: {exc})")

    print("\n-- T5 span corruption (15% noise, mean span 3)")
    sentinel = tok.token_to_id("<extra_id_0>")
    eos, pad = tok.token_to_id("[SEP]"), tok.token_to_id("[PAD]")
    sec = _timeit(lambda: span_corrupt(ids, noise_density=0.15, mean_span_len=3.0, sentinel_start_id=sentinel,
                                       eos_id=eos, pad_id=pad, seed=seed))
    results["span_corrupt"] = n_tok / sec
    inputs, targets = span_corrupt(ids, noise_density=0.15, mean_span_len=3.0, sentinel_start_id=sentinel,
                                   eos_id=eos, pad_id=pad, seed=seed)
    print(f"   {n_tok / sec / 1e6:.1f} M tokens/s; inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)}")
    print(f"   inputs : {_show(tok, inputs[0], 40)} ...\n   targets: {_show(tok, targets[0], 24)} ...")

    print("\n-- UL2 mixture of denoisers (R, X, S), mode tokens prepended")
    modes = {mode: tok.token_to_id(token) for mode, token in UL2_MODE_TOKENS.items()}
    out = ul2_denoise(ids, sentinel_start_id=sentinel, eos_id=eos, pad_id=pad, mode_token_ids=modes, seed=seed)
    sec = _timeit(lambda: ul2_denoise(ids, sentinel_start_id=sentinel, eos_id=eos, pad_id=pad,
                                      mode_token_ids=modes, seed=seed))
    results["ul2_denoise"] = n_tok / sec
    from fastpt.ops import UL2_DENOISERS

    used = torch.bincount(out.denoiser, minlength=len(UL2_DENOISERS)).tolist()
    mix = ", ".join(f"{d.mode}{'' if d.mode == 'S' else f'(mu={d.mean_span_len:g}, r={d.noise_density:g})'}: {n}"
                    for d, n in zip(UL2_DENOISERS, used))
    print(f"   {n_tok / sec / 1e6:.1f} M tokens/s; rows per denoiser: {mix}")
    print(f"   row 0 inputs: {_show(tok, out.inputs[0], 24)} ...")

    print("\n-- MAE random patch masking (75%), 256 images x 196 patches")
    B, L = 256, 196
    sec = _timeit(lambda: random_masking(B, L, mask_ratio=0.75, seed=seed))

    def torch_mae():
        noise = torch.rand(B, L)
        shuffle = noise.argsort(1)
        restore = shuffle.argsort(1)
        keep = shuffle[:, : L // 4]
        mask = torch.ones(B, L)
        mask[:, : L // 4] = 0
        return keep, torch.gather(mask, 1, restore), restore

    sec_torch = _timeit(torch_mae)
    results["random_masking"], results["torch_mae_masking"] = B * L / sec, B * L / sec_torch
    keep, mask, restore = random_masking(B, L, mask_ratio=0.75, seed=seed)
    print(f"   fastpt {B * L / sec / 1e6:.1f} M patches/s vs torch rand+argsort {B * L / sec_torch / 1e6:.1f} M patches/s "
          f"({sec_torch / sec:.1f}x); kept {keep.shape[1]} of {L} per image, exactly")
    print("\nsummary: " + ", ".join(f"{k} {v / 1e6:.1f}M/s" for k, v in results.items()))
    return results
