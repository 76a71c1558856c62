"""Count-based baselines: what a trained model's validation perplexity should beat.

Both models are estimated on the train split's token stream and scored on every validation token
predicted from its predecessor (targets val[1:], contexts val[:-1]): the stream the model sees,
`<|endoftext|>` included. Perplexity = exp(mean negative log-likelihood) over those targets.

- unigram: add-one (Laplace) over the whole vocabulary, p(w) = (c(w) + 1) / (N + V).
- bigram: interpolated absolute discounting (D = 0.75) backing onto that unigram,
  p(w | v) = max(c(v, w) - D, 0) / c(v) + D * n(v) / c(v) * p_uni(w),
  c(v) = number of train pairs with context v, n(v) = number of distinct w seen after v;
  a context never seen in training (c(v) = 0) gets p_uni(w).

    python -m blues.baselines            # on the embedded corpus, the trainers' split
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

DISCOUNT = 0.75


def _targets(val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    val = np.asarray(val, dtype=np.int64)
    if len(val) < 2:
        raise ValueError(f"the validation stream needs at least 2 tokens to score, got {len(val)}")
    return val[:-1], val[1:]  # contexts, targets


def unigram_log_probs(train: np.ndarray, n_vocab: int) -> np.ndarray:
    """log p(w) for every w in [0, n_vocab): add-one smoothed counts of the train stream."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=n_vocab).astype(np.float64)
    return np.log(counts + 1.0) - math.log(len(train) + n_vocab)


def unigram_perplexity(train: np.ndarray, val: np.ndarray, n_vocab: int) -> float:
    _, targets = _targets(val)
    return float(np.exp(-unigram_log_probs(train, n_vocab)[targets].mean()))


def bigram_probs(train: np.ndarray, contexts: np.ndarray, targets: np.ndarray, n_vocab: int,
                 discount: float = DISCOUNT) -> np.ndarray:
    """p(targets[i] | contexts[i]) under the interpolated absolute-discounting bigram model."""
    train = np.asarray(train, dtype=np.int64)
    contexts = np.asarray(contexts, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    p_uni = np.exp(unigram_log_probs(train, n_vocab))  # [V]

    # Train pairs as single int64 keys v * V + w; unique keys are sorted, so lookup is a search.
    pair_keys, pair_counts = np.unique(train[:-1] * n_vocab + train[1:], return_counts=True)
    ctx_count = np.bincount(train[:-1], minlength=n_vocab).astype(np.float64)  # c(v)    [V]
    ctx_types = np.bincount(pair_keys // n_vocab, minlength=n_vocab).astype(np.float64)  # n(v) [V]

    query = contexts * n_vocab + targets  # [M]
    pos = np.minimum(np.searchsorted(pair_keys, query), len(pair_keys) - 1)
    c_vw = np.where(pair_keys[pos] == query, pair_counts[pos], 0).astype(np.float64)  # c(v, w) [M]
    c_v = ctx_count[contexts]  # [M]
    seen = c_v > 0
    safe = np.where(seen, c_v, 1.0)
    backoff = discount * ctx_types[contexts] / safe  # the mass taken from seen pairs, given to p_uni
    return np.where(seen, np.maximum(c_vw - discount, 0.0) / safe + backoff * p_uni[targets], p_uni[targets])


def bigram_perplexity(train: np.ndarray, val: np.ndarray, n_vocab: int, discount: float = DISCOUNT) -> float:
    contexts, targets = _targets(val)
    return float(np.exp(-np.log(bigram_probs(train, contexts, targets, n_vocab, discount)).mean()))


def baseline_perplexities(splits, *, discount: float = DISCOUNT) -> dict[str, float]:
    """{'unigram': ..., 'bigram': ...} on `splits.val`, estimated on `splits.train` (a TokenSplits)."""
    return {
        "unigram": unigram_perplexity(splits.train, splits.val, splits.n_vocab),
        "bigram": bigram_perplexity(splits.train, splits.val, splits.n_vocab, discount),
    }


def main(argv=None) -> int:
    from blues.data import prepare_data

    ap = argparse.ArgumentParser(description="Unigram and bigram validation perplexities (baselines).")
    ap.add_argument("data", nargs="*", help="data files, directories or globs (default: the embedded corpus)")
    ap.add_argument("--val_fraction", "--val-fraction", type=float, default=0.05)
    ap.add_argument("--split-seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    splits = prepare_data(args.data or None, seq_len=1, val_fraction=args.val_fraction,
                          split_seed=args.split_seed)
    ppl = baseline_perplexities(splits)
    print(f"data: {splits.source}; train {len(splits.train):,} tokens ({splits.n_train_docs} docs), "
          f"validation {len(splits.val):,} tokens ({splits.n_val_docs} docs)")
    print(f"unigram (add-one) perplexity:                {ppl['unigram']:,.1f}")
    print(f"bigram (interpolated abs. discount {DISCOUNT}) perplexity: {ppl['bigram']:,.1f}")
    print(f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    from blues.cli import run_main

    raise SystemExit(run_main(main))
