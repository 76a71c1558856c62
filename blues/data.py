"""Text -> token streams -> batches, with no deep-learning framework.

Data files of any size and format (`blues.data_sources`: CSV/TSV, JSONL, Parquet, plain text;
gzip or zstd; files, directories, globs) are streamed in bounded batches; every document is
encoded with `o200k_base`, followed by `<|endoftext|>`, assigned to the train or validation split
by a hash of its text, by one process or a pool of them (`blues.data_tokenize`), and appended to
that split's uint32 token file as it goes, by a writer thread; `prepare_data` does this once and
caches the result (`python -m blues.data prepare` does it ahead of training). Each stream is cut
into consecutive, non-overlapping windows of `seq_len + 1` tokens (inputs = w[:-1], targets = w[1:]);
`BatchIterator` serves shuffled batches of windows, sharded by data-parallel rank and resumable
exactly; `eval_batches` serves a fixed sequence for evaluation.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import numbers
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from blues.data_sources import BATCH_CHARS, Source, expand_inputs, read_documents
from blues.data_tokenize import TOKEN_DTYPE, Encoded, default_workers, encode_batches, in_order
from blues.errors import ConfigError, DataError
from blues.hashing import sha256_file

log = logging.getLogger(__name__)

# The embedded default corpus (500 Brown-corpus files; see data/README.md). Resolved from this
# file, so it works from the repository and from an editable install.
DEFAULT_CORPUS = Path(__file__).resolve().parent / "assets" / "brown.csv.gz"

CACHE_FORMAT = 2  # bump when the cache layout or the tokenization recipe changes
# Without an explicit worker count, inputs smaller than this are tokenized in this process:
# starting a pool (each worker builds the tokenizer, ~1.5 s) costs more than it saves.
SMALL_INPUT_BYTES = 16 << 20
# Encoded batches (~2 MB of tokens each) waiting for the thread that writes and hashes the token
# files, at most: the reading thread never runs further ahead than this.
WRITE_AHEAD = 4

PathLike = str | os.PathLike


# ---- reading documents ---------------------------------------------------------------------------

def _sources(paths: PathLike | Sequence[PathLike] | None) -> list[Source]:
    if paths is None:
        if not DEFAULT_CORPUS.exists():
            raise DataError(f"the embedded corpus {DEFAULT_CORPUS} is missing; it lives in the repository's data/ "
                            f"directory: run from a checkout or install one with pip install -e .")
        paths = [DEFAULT_CORPUS]
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    return expand_inputs(paths)


def _describe(sources: Sequence[Source]) -> str:
    if len(sources) <= 3:
        return ", ".join(str(s.path) for s in sources)
    return f"{sources[0].path} and {len(sources) - 1} more files"


def load_documents(paths: PathLike | Sequence[PathLike] | None = None, *,
                   text_column: str | None = None) -> list[str]:
    """The non-blank documents of the data files (default: the embedded corpus), in file order."""
    return [doc for src in _sources(paths) for docs, _ in read_documents(src, text_column) for doc in docs]


# ---- token splits and their cache ----------------------------------------------------------------

@dataclass
class TokenSplits:
    """The tokenized train and validation streams (uint32, memmap-backed when non-empty)."""

    train: np.ndarray
    val: np.ndarray
    n_train_docs: int
    n_val_docs: int
    source: str  # e.g. "data/brown.csv.gz (500 documents)"
    n_vocab: int  # the tokenizer's vocabulary: every id is below it
    eot_id: int
    seq_len: int
    cache_key: str = ""
    files: tuple[str, ...] = field(default_factory=tuple)
    cache_dir: str = ""
    # How the cache entry was made by this call: {"seconds", "bytes", "workers"}; empty when reused.
    built: dict = field(default_factory=dict)

    def windows(self, split: str) -> int:
        """Number of windows of seq_len + 1 tokens in 'train' or 'val'."""
        return num_windows(getattr(self, split), self.seq_len)


def default_cache_dir() -> Path:
    env = os.environ.get("BLUES_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blues"


def _atomic_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache should stay readable
    return Path(tmp)


def _write_json_atomic(path: Path, data) -> None:
    tmp = _atomic_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _source_digests(sources: Sequence[Source], cache: Path) -> list[str]:
    """sha256 of each file's bytes (as stored), remembered in `cache/sources.json` by (path, size,
    mtime, inode): a file hashed before and not touched since is not read again."""
    index_path = cache / "sources.json"
    try:
        index = json.loads(index_path.read_text())
        assert isinstance(index, dict)
    except (OSError, ValueError, AssertionError):
        index = {}
    digests, changed = [], False
    for src in sources:
        try:
            st = src.path.stat()
            name, stamp = str(src.path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
            rec = index.get(name)
            if not (isinstance(rec, dict) and rec.get("stat") == stamp):
                rec = index[name] = {"stat": stamp, "sha256": sha256_file(src.path)}
                changed = True
        except OSError as e:
            raise DataError(f"data file {src.path} is unreadable: {e.strerror or e}") from None
        digests.append(rec["sha256"])
    if changed:
        _write_json_atomic(index_path, index)
    return digests


def _load_cached(meta_path: Path, key: str) -> dict | None:
    """The cache record if it and its token files are intact, else None (and why, logged). A token
    file whose size and mtime are as recorded is trusted; any other is checked against its sha256."""
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            raise ValueError("its key or format does not match")
        for split in ("train", "val"):
            rec = meta["splits"][split]
            path = meta_path.parent / rec["file"]
            if rec["dtype"] != np.dtype(TOKEN_DTYPE).name:
                raise ValueError(f"{path.name} has dtype {rec['dtype']}, expected {np.dtype(TOKEN_DTYPE).name}")
            want = rec["tokens"] * np.dtype(TOKEN_DTYPE).itemsize
            st = path.stat() if path.exists() else None
            if st is None or st.st_size != want:
                raise ValueError(f"{path.name} has {st and st.st_size} bytes, expected {want}")
            if st.st_mtime_ns != rec["mtime_ns"] and sha256_file(path) != rec["sha256"]:
                raise ValueError(f"{path.name} does not match its recorded sha256")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("token cache %s is stale or damaged (%s); rebuilding it", meta_path, e)
        return None


def _open_tokens(path: Path, n: int) -> np.ndarray:
    if n == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,))


def _show_bar(show_progress: bool) -> bool:
    return bool(show_progress) and sys.stderr.isatty()


def _batches(sources: Sequence[Source], text_column: str | None, bar) -> Iterator[list[str]]:
    """The documents of every source, in order, regrouped into batches of about BATCH_CHARS
    characters; `bar` advances by the on-disk bytes read."""
    done, pending, chars = 0, [], 0
    for src in sources:
        for docs, pos in read_documents(src, text_column, hint=True):
            pending += docs
            chars += sum(map(len, docs))
            if chars >= BATCH_CHARS:
                yield pending
                pending, chars = [], 0
            bar.update(done + pos - bar.n)
        done += src.size
    if pending:
        yield pending


def _split_problem(names: str, n_train: int, n_val: int, val_fraction: float) -> str | None:
    n = n_train + n_val
    how = (f"each document goes there with probability --val_fraction {val_fraction:g}, chosen by a hash "
           f"of its text")
    if val_fraction > 0 and n_val == 0:
        return (f"none of the {n} documents of {names} fell in the validation split ({how}); add documents "
                f"or raise --val_fraction")
    if n_train == 0:
        return (f"all {n} documents of {names} fell in the validation split ({how}); add documents "
                f"or lower --val_fraction")
    return None


def _append_tokens(outs: dict, hashes: dict, enc: Encoded) -> Encoded:
    for s, arr in (("train", enc.train), ("val", enc.val)):
        buf = memoryview(arr).cast("B")
        outs[s].write(buf)
        hashes[s].update(buf)
    return enc


def _write_all(encoded: Iterable[Encoded], outs: dict, hashes: dict) -> tuple[dict, dict]:
    """Append every batch's tokens to the split files `outs` and their sha256 `hashes`, in order, on
    one writer thread (file writes and hashlib release the GIL: this thread goes on reading and
    dispatching meanwhile), with at most WRITE_AHEAD batches waiting for it; a failed write is
    raised here. Returns the tokens and documents written per split."""
    tokens, docs = dict.fromkeys(outs, 0), dict.fromkeys(outs, 0)
    with ThreadPoolExecutor(1, thread_name_prefix="blues-token-writer") as writer:
        append = functools.partial(_append_tokens, outs, hashes)
        for enc in in_order(writer, append, encoded, limit=WRITE_AHEAD):
            for s, arr, n in (("train", enc.train, enc.n_train_docs), ("val", enc.val, enc.n_val_docs)):
                tokens[s] += len(arr)
                docs[s] += n
    return tokens, docs


def _tokenize_to_cache(sources: Sequence[Source], tokenizer, cache_dir: Path, key: str, *, names: str,
                       text_column: str | None, workers: int, val_fraction: float, split_seed: int,
                       show_progress: bool) -> dict:
    """Stream every document into train/val .u32 files, written atomically, and record them."""
    from tqdm.auto import tqdm

    short_name = names if len(names) <= 40 else "..." + names[-37:]
    finals = {s: cache_dir / f"{key}.{s}.u32" for s in ("train", "val")}
    tmps = {s: _atomic_path(p) for s, p in finals.items()}
    hashes = {s: hashlib.sha256() for s in finals}
    total = sum(src.size for src in sources)
    try:
        with open(tmps["train"], "wb") as f_train, open(tmps["val"], "wb") as f_val, \
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"tokenizing {short_name}",
                     disable=not _show_bar(show_progress)) as bar, \
                contextlib.closing(encode_batches(_batches(sources, text_column, bar), tokenizer, workers=workers,
                                                  val_fraction=val_fraction, split_seed=split_seed)) as encoded:
            tokens, docs = _write_all(encoded, {"train": f_train, "val": f_val}, hashes)
        problem = _split_problem(names, docs["train"], docs["val"], val_fraction)
        if problem:
            raise DataError(problem)
        for s in finals:
            os.replace(tmps[s], finals[s])
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "source": names,
            "splits": {s: {"file": finals[s].name, "tokens": tokens[s], "dtype": np.dtype(TOKEN_DTYPE).name,
                           "sha256": hashes[s].hexdigest(), "mtime_ns": finals[s].stat().st_mtime_ns,
                           "docs": docs[s]}
                       for s in finals},
        }
        _write_json_atomic(cache_dir / f"{key}.json", meta)  # written last: the record commits the token files
        return meta
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DataError(f"no space left on device while writing the token cache in {cache_dir}; nothing "
                            f"was kept: free space or set BLUES_CACHE to a larger disk") from None
        raise
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _cache_lock(path: Path):
    """An exclusive advisory lock (fcntl) on `path`; a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders only duplicate work (writes are atomic)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_data(paths: PathLike | Sequence[PathLike] | None = None, *, seq_len: int, tokenizer=None,
                 val_fraction: float = 0.05, split_seed: int = 0, cache_dir: PathLike | None = None,
                 show_progress: bool = True, text_column: str | None = None,
                 workers: int | None = None) -> TokenSplits:
    """Tokenize the data files (default: the embedded corpus) into train/val streams, via the cache.

    `paths`: files, directories and globs (`blues.data_sources`). The cache key covers the files'
    bytes and formats, the text column, the tokenizer and the split parameters, so a second call
    with the same inputs maps the cached token files without re-tokenizing. `workers`: tokenizing
    processes (default: the CPU count, or this process alone for inputs under 16 MiB); the output
    does not depend on it. `seq_len` only sets the size check: each split must hold at least one
    window of seq_len + 1 tokens.
    """
    if not (isinstance(seq_len, numbers.Integral) and seq_len > 0):
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    seq_len = int(seq_len)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if workers is not None and not (isinstance(workers, numbers.Integral) and workers > 0):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if tokenizer is None:
        from blues.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    sources = _sources(paths)
    names = _describe(sources)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    built: dict = {}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        key_spec = {
            "format": CACHE_FORMAT,
            "sources": [[d, s.format] for d, s in zip(_source_digests(sources, cache), sources)],
            "text_column": text_column,
            "tokenizer": [tokenizer.name, getattr(tokenizer, "fingerprint", ""), tokenizer.eot_id],
            "val_fraction": float(val_fraction),
            "split_seed": int(split_seed),
        }
        key = hashlib.sha256(json.dumps(key_spec, sort_keys=True).encode()).hexdigest()[:32]
        # One process tokenizes; the others (data-parallel ranks started together) wait for it and
        # then find a valid cache.
        with _cache_lock(cache / f"{key}.lock"):
            meta = _load_cached(cache / f"{key}.json", key)
            if meta is None:
                for stale in cache.glob(f"{key}.*.tmp"):  # left by a builder that was killed
                    stale.unlink(missing_ok=True)
                total = sum(s.size for s in sources)
                n_workers = workers or (default_workers() if total >= SMALL_INPUT_BYTES else 1)
                log.info("tokenizing %s into %s (%d workers)", names, cache, n_workers)
                started = time.perf_counter()
                meta = _tokenize_to_cache(sources, tokenizer, cache, key, names=names, text_column=text_column,
                                          workers=n_workers, val_fraction=val_fraction, split_seed=split_seed,
                                          show_progress=show_progress)
                built = {"seconds": time.perf_counter() - started, "bytes": total, "workers": n_workers}
            else:
                log.info("reusing tokenized %s from %s", names, cache)
    except PermissionError as e:
        raise DataError(f"cannot write to the data cache directory {cache} ({e.strerror}); "
                        f"set BLUES_CACHE to a writable directory") from None
    except OSError as e:
        raise DataError(f"cannot use the data cache directory {cache} ({e.strerror or e}); "
                        f"set BLUES_CACHE to a writable directory") from None

    rec = meta["splits"]
    n_docs = rec["train"]["docs"] + rec["val"]["docs"]
    splits = TokenSplits(
        train=_open_tokens(cache / rec["train"]["file"], rec["train"]["tokens"]),
        val=_open_tokens(cache / rec["val"]["file"], rec["val"]["tokens"]),
        n_train_docs=rec["train"]["docs"], n_val_docs=rec["val"]["docs"], source=f"{names} ({n_docs} documents)",
        n_vocab=tokenizer.n_vocab, eot_id=tokenizer.eot_id, seq_len=seq_len, cache_key=key,
        files=tuple(str(s.path) for s in sources), cache_dir=str(cache), built=built)
    window = seq_len + 1
    checks = [("training", splits.train, splits.n_train_docs)]
    if val_fraction > 0:
        checks.append(("validation", splits.val, splits.n_val_docs))
    for name, tokens, n in checks:
        if len(tokens) < window:
            raise DataError(
                f"{name} split of {names} ({n} documents) has {len(tokens)} tokens, fewer than "
                f"one window of {window}; use a bigger file or a smaller max_position_embeddings")
    return splits


# ---- windows and batches -------------------------------------------------------------------------

def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Consecutive non-overlapping windows of seq_len + 1 tokens; the ragged tail is dropped."""
    return len(tokens) // (seq_len + 1)


def check_vocab(tokens: np.ndarray, vocab_size: int) -> None:
    """Every id needs an embedding row: an id >= vocab_size is an error, never clamped."""
    if len(tokens) == 0:
        return
    top = int(np.max(tokens))
    if top >= vocab_size:
        raise DataError(
            f"token id {top} is >= the model's vocab_size {vocab_size}; the data was tokenized with a "
            f"larger vocabulary than config field 'vocab_size' allows (o200k_base needs 200019)")


def _gather(tokens: np.ndarray, window_idx: np.ndarray, seq_len: int,
            vocab_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    width = seq_len + 1
    rows = window_idx[:, None] * width + np.arange(width)  # [B, T+1] token positions
    w = np.asarray(tokens[rows])  # [B, T+1]
    if vocab_size is not None:
        check_vocab(w, vocab_size)
    w = w.astype(np.int32)
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])  # [B, T], [B, T]


class BatchIterator:
    """Infinite batches of windows: each epoch a permutation of all windows drawn from
    (seed, epoch); a step takes the next batch_size * world_size of them (the global batch) and
    rank r keeps rows [r * batch_size, (r + 1) * batch_size). Windows left over at the end of an
    epoch (fewer than a global batch) are skipped that epoch; the next permutation differs.

    All ranks share one position, so the state of any rank resumes every rank.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, vocab_size: int | None = None,
                 name: str = "training data"):
        if batch_size <= 0 or seq_len <= 0:
            raise ConfigError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        # Plain ints/bools so state_dict() stays JSON-able whatever the caller passed.
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), bool(shuffle)
        self.vocab_size = vocab_size
        self.n_windows = num_windows(tokens, seq_len)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.n_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{name} has {self.n_windows} windows of {seq_len + 1} tokens ({len(tokens)} tokens), "
                f"fewer than one global batch of {batch_size} x {world_size} ranks; use more data or "
                f"a smaller batch size")
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                self._perm = np.arange(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        perm = self._permutation(self.epoch)
        start = self.step * self.global_batch + self.rank * self.batch_size
        batch = _gather(self.tokens, perm[start:start + self.batch_size], self.seq_len, self.vocab_size)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch  # inputs [B, T], targets [B, T], int32

    # ---- resumption ----
    def state_dict(self) -> dict:
        """The position, plus what must match for it to mean the same thing (JSON-able)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "n_windows": self.n_windows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the global batch may be split over a different number of ranks."""
        try:
            saved_global = int(state["batch_size"]) * int(state["world_size"])
            mismatch = [(k, state[k], getattr(self, k)) for k in ("seed", "seq_len", "n_windows", "shuffle")
                        if state[k] != getattr(self, k)]
            if saved_global != self.global_batch:
                mismatch.append(("global batch (batch_size x world_size)", saved_global, self.global_batch))
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data position in the checkpoint is malformed ({e!r})") from None
        if mismatch:
            what = "; ".join(f"{k} saved {a}, now {b}" for k, a, b in mismatch)
            raise DataError(f"the checkpoint's data position does not fit this run's data: {what}")
        if not (epoch >= 0 and 0 <= step < self.steps_per_epoch):
            raise DataError(f"data position in the checkpoint is out of range (epoch {epoch}, step {step})")
        self.epoch, self.step = epoch, step


# Evaluation samples its windows with this fixed seed, whatever the training seed: every run, and
# both frameworks, evaluate on the same windows.
EVAL_SEED = 1234


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None, *,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None,
                 name: str = "validation split") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A fixed sequence of evaluation batches, the same at every call: the windows of one seeded
    permutation (not stream order: the first windows of a split are its first documents, and a
    few batches of them would estimate the split's loss with a bias), global batch i holding
    permuted windows [i * B * W, (i + 1) * B * W), rank r its slice; at most `max_batches` batches."""
    # Built here, not inside a generator, so a too-small split fails at the call, not at first use.
    it = BatchIterator(tokens, seq_len=seq_len, batch_size=batch_size, rank=rank, world_size=world_size,
                       seed=EVAL_SEED, shuffle=True, vocab_size=vocab_size, name=name)
    n = it.steps_per_epoch if max_batches is None else min(max_batches, it.steps_per_epoch)
    return (next(it) for _ in range(n))


if __name__ == "__main__":  # python -m blues.data prepare ...
    from blues.cli import run_main
    from blues.data_prepare import main

    raise SystemExit(run_main(main))
