"""Count-based baselines: a hand computation on a tiny stream, and sanity on the real corpus."""
import math
import time

import numpy as np
import pytest

from blues.baselines import (baseline_perplexities, bigram_perplexity, bigram_probs, unigram_perplexity)
from blues.data import prepare_data

# V = 4; train = 0 1 0 1 2 0; validation = 0 1 2 3 (targets 1, 2, 3 from contexts 0, 1, 2).
TRAIN = np.array([0, 1, 0, 1, 2, 0], dtype=np.uint32)
VAL = np.array([0, 1, 2, 3], dtype=np.uint32)


def test_unigram_by_hand():
    # counts 3, 2, 1, 0 of N = 6; add-one over V = 4: p = (c + 1) / 10 -> p(1)=.3, p(2)=.2, p(3)=.1
    want = (0.3 * 0.2 * 0.1) ** (-1 / 3)
    assert unigram_perplexity(TRAIN, VAL, 4) == pytest.approx(want, rel=1e-12)


def test_bigram_by_hand():
    # Train pairs: (0,1) x2, (1,0), (1,2), (2,0).  c(0)=2 n(0)=1; c(1)=2 n(1)=2; c(2)=1 n(2)=1.
    # p(1|0) = (2 - .75)/2 + .75 * 1/2 * .3 = .625 + .1125 = .7375
    # p(2|1) = (1 - .75)/2 + .75 * 2/2 * .2 = .125 + .15   = .275
    # p(3|2) = 0           + .75 * 1/1 * .1               = .075
    want = (0.7375 * 0.275 * 0.075) ** (-1 / 3)
    assert bigram_perplexity(TRAIN, VAL, 4) == pytest.approx(want, rel=1e-12)
    # Token 3 never occurs in training, so as a context it falls back to the add-one unigram.
    assert bigram_probs(TRAIN, [3], [1], 4)[0] == pytest.approx(0.3, rel=1e-12)


def test_bigram_is_a_distribution():
    rng = np.random.default_rng(0)
    V = 12
    train = rng.integers(0, V - 2, size=500)  # ids 10 and 11 never occur: zero counts
    for v in range(V):
        p = bigram_probs(train, np.full(V, v), np.arange(V), V)
        assert p.min() > 0
        assert p.sum() == pytest.approx(1.0, abs=1e-12)  # float64 sums of 12 terms


def test_real_corpus_baselines(tmp_path):
    splits = prepare_data(seq_len=256, cache_dir=tmp_path, show_progress=False)
    assert (splits.n_train_docs, splits.n_val_docs) == (477, 23)
    t0 = time.time()
    ppl = baseline_perplexities(splits)
    assert time.time() - t0 < 10
    assert all(math.isfinite(v) for v in ppl.values())
    # Measured 1,793 and 534 on this split.
    assert 1000 < ppl["unigram"] < 4000
    assert 300 < ppl["bigram"] < 1000
    assert ppl["bigram"] < 0.5 * ppl["unigram"]
