"""The counter-based random bits (``ops/_rng.py``): independent along the column counter.

With ``bits = mix32(row_key ^ col)`` (one mix32 round over a small counter) columns a fixed distance apart
were correlated: dropout keep masks over (tokens, 4096 features) correlated at lags of whole tokens
(z = -60 at 3 tokens), MLM selection at 12288 positions (z = -21). ``colmix`` multiplies the counter by an
odd constant first; the same scans now look like independent draws."""
import math

import numpy as np
import torch

from fastpt.ops import _rng, dropout, mlm_mask


def _lag_z(masks: np.ndarray, lag: int) -> float:
    """z-score of the correlation between entries ``lag`` apart along the last axis (0 for independence)."""
    a, b = masks[:, :-lag].ravel(), masks[:, lag:].ravel()
    return float(np.corrcoef(a, b)[0, 1] * math.sqrt(a.size))


def test_dropout_masks_are_uncorrelated_a_hidden_size_apart():
    hidden, tokens = 4096, 256
    x = torch.ones(tokens, hidden)
    keep = np.concatenate([(dropout(x, 0.1, seed=1000 + s) != 0).numpy().T for s in range(8)]).astype(np.float64)
    for lag in (1, 2, 3, 5):  # tokens: the flat counter moves by lag * 4096
        assert abs(_lag_z(keep, lag)) < 5, lag


def test_mlm_selection_is_uncorrelated_at_long_lags():
    ids = torch.full((8, 16384), 5, dtype=torch.int64)
    picked = np.concatenate([(mlm_mask(ids, mask_token_id=1, vocab_size=100, seed=s)[1] != -100).numpy()
                             for s in range(6)]).astype(np.float64)
    for lag in (192, 4096, 12288):
        assert abs(_lag_z(picked, lag)) < 5, lag


def test_colmix_is_a_bijection_of_the_column_within_a_row():
    """random_masking relies on distinct bits within a row (no ties to break)."""
    b = _rng.bits(_rng.stream_key(3, _rng.STREAM_MAE), torch.tensor(7), torch.arange(1 << 16))
    assert b.unique().numel() == 1 << 16
    assert _rng.colmix_int(12345) == int(_rng.colmix(torch.tensor(12345))) == (12345 * 0x61C88647) % 2**32


def test_attention_dropout_heads_are_not_permuted_copies():
    """The query index reached the row key bare (mix32(head_key ^ i)): two heads whose keys differed by d < L
    shared every dropout row, permuted (row i of one = row i ^ d of the other; seed 71 at BERT-base's 32 x 12
    heads of 512 queries: heads (doc 1, h 1) and (doc 30, h 5), d = 45). colmix(i) spreads it too."""
    from fastpt.ops import attention_cpu

    key = _rng.stream_key(71, _rng.STREAM_ATTN_DROPOUT)
    docs, heads, length = torch.tensor([1, 30]), 12, 512
    keep = attention_cpu._drop_probs_torch(torch.ones(2, heads, length, length), docs, key, 0.1) != 0
    a, b = keep[0, 1], keep[1, 5]
    assert not torch.equal(a, b[torch.arange(length) ^ 45])
    assert abs(float((a == b[torch.arange(length) ^ 45]).float().mean()) - (0.9 ** 2 + 0.1 ** 2)) < 0.01
