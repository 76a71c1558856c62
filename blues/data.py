"""Text -> token streams -> batches, with no deep-learning framework.

CSV files with a `Text` column are read (`load_documents`), every document is encoded with
`o200k_base` and followed by `<|endoftext|>`, and the documents are split by document into a train
and a validation stream (`prepare_data`), cached on disk as uint32 memmaps. Each stream is cut into
consecutive, non-overlapping windows of `seq_len + 1` tokens (inputs = w[:-1], targets = w[1:]);
`BatchIterator` serves shuffled batches of windows, sharded by data-parallel rank and resumable
exactly; `eval_batches` serves a fixed sequence for evaluation.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import numbers
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from blues.errors import ConfigError, DataError
from blues.hashing import sha256_file

log = logging.getLogger(__name__)

# The embedded default corpus (500 Brown-corpus files; see data/README.md). Resolved from this
# file, so it works from the repository and from an editable install.
DEFAULT_CORPUS = Path(__file__).resolve().parent / "assets" / "brown.csv.gz"

TOKEN_DTYPE = np.uint32  # o200k ids reach 200018: more than uint16 holds
CACHE_FORMAT = 1  # bump when the cache layout or the tokenization recipe changes
TEXT_COLUMN = "Text"

PathLike = str | os.PathLike


# ---- reading documents ---------------------------------------------------------------------------

def _as_paths(paths: PathLike | Sequence[PathLike] | None) -> list[Path]:
    if paths is None:
        return [DEFAULT_CORPUS]
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise DataError("no data files given")
    return out


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by magic number, whatever its name)."""
    if not path.exists():
        if path == DEFAULT_CORPUS:
            raise DataError(f"the embedded corpus {path} is missing; it lives in the repository's data/ "
                            f"directory: run from a checkout or install one with pip install -e .")
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data file {path} is a directory, not a CSV file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"data file {path} is unreadable: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"data file {path} is a damaged gzip file ({e})") from None
    return raw


def _decode_text(path: Path, raw: bytes) -> str:
    if not raw.strip():
        raise DataError(f"data file {path} is empty; it needs a header line with a '{TEXT_COLUMN}' column and rows")
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"data file {path} is a binary file, not CSV text (it contains NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"re-save it as UTF-8") from None


def _read_file(path: Path) -> list[str]:
    import pandas as pd

    text = _decode_text(path, _read_bytes(path))
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {path} is empty; it needs a header line with a '{TEXT_COLUMN}' column and rows") from None
    except (pd.errors.ParserError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data file {path} is not a valid CSV file: {reason}") from None
    if TEXT_COLUMN not in frame.columns:
        found = ", ".join(repr(str(c)) for c in frame.columns)
        raise DataError(f"data file {path} has no '{TEXT_COLUMN}' column (columns found: {found})")
    if len(frame) == 0:
        raise DataError(f"data file {path} has a header but no rows")
    texts = [t for t in frame[TEXT_COLUMN].tolist() if t.strip()]
    if not texts:
        raise DataError(f"data file {path} has only blank texts in its '{TEXT_COLUMN}' column ({len(frame)} rows)")
    return texts


def load_documents(paths: PathLike | Sequence[PathLike] | None = None) -> list[str]:
    """The non-blank `Text` values of the CSV files (gzip allowed), in file and row order."""
    docs: list[str] = []
    for path in _as_paths(paths):
        docs.extend(_read_file(path))
    return docs


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

    def windows(self, split: str) -> int:
        """Number of windows of seq_len + 1 tokens in 'train' or 'val'."""
        return num_windows(getattr(self, split), self.seq_len)


def default_cache_dir() -> Path:
    env = os.environ.get("BLUES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "blues"


def _split_documents(n_docs: int, val_fraction: float, split_seed: int, source: str) -> np.ndarray:
    """Indices (sorted) of the validation documents: the first round(val_fraction * n_docs) of a
    permutation seeded by split_seed, at least one, and never all of them."""
    if val_fraction == 0:
        return np.zeros(0, dtype=np.int64)
    if n_docs < 2:
        raise DataError(
            f"{source} holds {n_docs} document; the validation split is chosen by document, so at "
            f"least 2 are needed (add documents, or set val_fraction to 0)")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    perm = np.random.default_rng(split_seed).permutation(n_docs)
    return np.sort(perm[:n_val])


def _atomic_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache should stay readable
    return Path(tmp)


def _load_cached(meta_path: Path, key: str) -> dict | None:
    """The cache record if it and its token files are intact, else None (and why, logged)."""
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
            size = path.stat().st_size if path.exists() else None
            if size != want:
                raise ValueError(f"{path.name} has {size} bytes, expected {want}")
            if sha256_file(path) != rec["sha256"]:
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


def _tokenize_to_cache(docs: list[str], val_idx: np.ndarray, tokenizer, cache_dir: Path, key: str,
                       description: str, show_progress: bool) -> dict:
    """Encode every document (+ eot) into train/val .u32 files, written atomically, and record them."""
    from tqdm.auto import tqdm

    short_name = description if len(description) <= 40 else "..." + description[-37:]
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[val_idx] = True
    finals = {s: cache_dir / f"{key}.{s}.u32" for s in ("train", "val")}
    tmps = {s: _atomic_path(p) for s, p in finals.items()}
    hashes = {s: hashlib.sha256() for s in finals}
    counts = {s: 0 for s in finals}
    eot = np.array([tokenizer.eot_id], dtype=TOKEN_DTYPE)
    chunk = 256  # documents per encode_batch call: enough to keep the threads busy
    try:
        with open(tmps["train"], "wb") as f_train, open(tmps["val"], "wb") as f_val, \
                tqdm(total=len(docs), unit="doc", desc=f"tokenizing {short_name}",
                     disable=not _show_bar(show_progress)) as bar:
            outs = {"train": f_train, "val": f_val}
            for start in range(0, len(docs), chunk):
                for i, ids in enumerate(tokenizer.encode_batch(docs[start:start + chunk]), start):
                    split = "val" if is_val[i] else "train"
                    arr = np.concatenate([np.asarray(ids, dtype=TOKEN_DTYPE), eot])
                    buf = arr.tobytes()
                    outs[split].write(buf)
                    hashes[split].update(buf)
                    counts[split] += len(arr)
                bar.update(min(chunk, len(docs) - start))
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "source": description,
            "splits": {s: {"file": finals[s].name, "tokens": counts[s], "dtype": np.dtype(TOKEN_DTYPE).name,
                           "sha256": hashes[s].hexdigest(), "docs": int(is_val.sum() if s == "val" else (~is_val).sum())}
                       for s in finals},
        }
        for s in finals:
            os.replace(tmps[s], finals[s])
        meta_path = cache_dir / f"{key}.json"
        tmp_meta = _atomic_path(meta_path)
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, meta_path)  # written last: the record commits the token files
        return meta
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def _source_sha256(path: Path) -> str:
    """sha256 of a data file's bytes (as stored: a gzip file hashes its compressed bytes)."""
    if not path.is_file():
        _read_bytes(path)  # raises the 'does not exist' / 'is a directory' message
    try:
        return sha256_file(path)
    except OSError as e:
        raise DataError(f"data file {path} is unreadable: {e.strerror or e}") from None


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
                 show_progress: bool = True) -> TokenSplits:
    """Tokenize the CSV files (default: the embedded corpus) into train/val streams, via the cache.

    The cache key covers the files' bytes, the tokenizer and the split parameters, so a second
    call with the same inputs reads the memmaps without re-tokenizing. `seq_len` only sets the
    size check: each split must hold at least one window of seq_len + 1 tokens.
    """
    if not (isinstance(seq_len, numbers.Integral) and seq_len > 0):
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    seq_len = int(seq_len)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if tokenizer is None:
        from blues.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    files = _as_paths(paths)
    names = ", ".join(str(p) for p in files)
    key_spec = {
        "format": CACHE_FORMAT,
        "sources": [_source_sha256(p) for p in files],
        "tokenizer": [tokenizer.name, getattr(tokenizer, "fingerprint", ""), tokenizer.eot_id],
        "val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
    }
    key = hashlib.sha256(json.dumps(key_spec, sort_keys=True).encode()).hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # One process tokenizes; the others (data-parallel ranks started together) wait for it and
        # then find a valid cache.
        with _cache_lock(cache / f"{key}.lock"):
            meta = _load_cached(cache / f"{key}.json", key)
            if meta is None:
                docs_per_file = [_read_file(p) for p in files]  # validates every file before any work
                docs = [d for ds in docs_per_file for d in ds]
                val_idx = _split_documents(len(docs), val_fraction, split_seed, names)
                log.info("tokenizing %s (%d documents) into %s", names, len(docs), cache)
                meta = _tokenize_to_cache(docs, val_idx, tokenizer, cache, key,
                                          f"{names} ({len(docs)} documents)", show_progress)
            else:
                log.info("reusing tokenized %s from %s", names, cache)
    except PermissionError as e:
        raise DataError(f"cannot write to the data cache directory {cache} ({e.strerror}); "
                        f"set BLUES_CACHE to a writable directory") from None
    except OSError as e:
        raise DataError(f"cannot use the data cache directory {cache} ({e.strerror or e}); "
                        f"set BLUES_CACHE to a writable directory") from None

    n_docs = meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"]
    description = f"{names} ({n_docs} documents)"
    rec = meta["splits"]
    splits = TokenSplits(
        train=_open_tokens(cache / rec["train"]["file"], rec["train"]["tokens"]),
        val=_open_tokens(cache / rec["val"]["file"], rec["val"]["tokens"]),
        n_train_docs=rec["train"]["docs"], n_val_docs=rec["val"]["docs"], source=description,
        n_vocab=tokenizer.n_vocab, eot_id=tokenizer.eot_id, seq_len=seq_len, cache_key=key,
        files=tuple(str(p) for p in files))
    window = seq_len + 1
    checks = [("training", splits.train, splits.n_train_docs)]
    if val_fraction > 0:
        checks.append(("validation", splits.val, splits.n_val_docs))
    for name, tokens, n_docs in checks:
        if len(tokens) < window:
            raise DataError(
                f"{name} split of {names} ({n_docs} documents) has {len(tokens)} tokens, fewer than "
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
