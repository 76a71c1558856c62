"""Batches of documents -> train/validation token arrays, in one process or a pool of processes.

Each document goes to the validation split when a keyed hash of its text falls below
`val_fraction` (`is_validation`): the choice depends on the document alone, so adding, removing or
reordering files moves no other document between the splits, and a duplicated document lands in
one split only. `encode_batch` encodes a batch (each document + `<|endoftext|>`) and splits it;
`encode_batches` maps it over batches with `workers` processes, keeping at most two batches per
worker in flight (bounded memory) and yielding the results in input order (`in_order`), so the
output is the same for any number of workers.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

TOKEN_DTYPE = np.uint32  # o200k ids reach 200018: more than uint16 holds
_HASH_SCALE = float(1 << 64)


def is_validation(text: str, val_fraction: float, split_seed: int) -> bool:
    """Whether a document belongs to the validation split: blake2b(text, keyed by the seed) as a
    fraction of 2**64, below val_fraction."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(split_seed).encode()).digest()
    return int.from_bytes(digest, "little") / _HASH_SCALE < val_fraction


@dataclass
class Encoded:
    """One batch's tokens (documents in order, each ending in eot), by split."""

    train: np.ndarray  # [n] uint32
    val: np.ndarray  # [m] uint32
    n_train_docs: int
    n_val_docs: int


def _encode(tokenizer, text: str) -> np.ndarray:
    encoding = getattr(tokenizer, "encoding", None)
    if encoding is not None:  # the Rust core straight into a uint32 array: no Python list
        return encoding.encode_to_numpy(text, disallowed_special=())
    return np.asarray(tokenizer.encode(text), dtype=TOKEN_DTYPE)


def encode_batch(tokenizer, texts: Sequence[str], val_fraction: float, split_seed: int) -> Encoded:
    eot = np.array([tokenizer.eot_id], dtype=TOKEN_DTYPE)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for text in texts:
        parts[is_validation(text, val_fraction, split_seed)] += [_encode(tokenizer, text), eot]

    def join(arrays):
        return np.concatenate(arrays).astype(TOKEN_DTYPE, copy=False) if arrays else np.zeros(0, TOKEN_DTYPE)

    return Encoded(join(parts[False]), join(parts[True]), len(parts[False]) // 2, len(parts[True]) // 2)


# ---- the worker pool -----------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(fingerprint: str) -> None:
    global _WORKER_TOKENIZER
    from blues.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer()
    if _WORKER_TOKENIZER.fingerprint != fingerprint:
        raise RuntimeError("a tokenization worker built a different tokenizer than its parent")


def _work(texts: list[str], val_fraction: float, split_seed: int) -> Encoded:
    return encode_batch(_WORKER_TOKENIZER, texts, val_fraction, split_seed)


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encode_batches(batches: Iterable[list[str]], tokenizer, *, workers: int, val_fraction: float,
                   split_seed: int) -> Iterator[Encoded]:
    """encode_batch over `batches`, in order. workers > 1: that many spawned processes, each building
    the project tokenizer itself (only `blues.tokenizer.Tokenizer` can be rebuilt there; any other
    tokenizer object is used in this process)."""
    from blues.tokenizer import Tokenizer

    if workers <= 1 or not isinstance(tokenizer, Tokenizer):
        for texts in batches:
            yield encode_batch(tokenizer, texts, val_fraction, split_seed)
        return
    # spawn, not fork: the trainers call this with JAX/torch threads running.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(tokenizer.fingerprint,)) as pool:
        work = functools.partial(_work, val_fraction=val_fraction, split_seed=split_seed)
        yield from in_order(pool, work, batches, limit=2 * workers)


def in_order(executor: Executor, fn: Callable, items: Iterable, *, limit: int) -> Iterator:
    """fn(item) for each item, run on `executor`, the results yielded in input order, with at most
    `limit` calls submitted and not yet collected (bounded memory). The first failure is raised here;
    calls not yet started then, or when the caller stops early, are cancelled."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
