"""The `o200k_base` tokenizer, built offline from the rank file shipped in `blues/assets/`.

`tiktoken.get_encoding("o200k_base")` downloads its rank file on first use; a training box may have
no network and an empty HOME, so we build the `tiktoken.Encoding` ourselves from the bundled,
hash-checked ranks, the o200k pattern string and the two special tokens. The result is the exact
tokenizer tiktoken would give (same ranks, pattern and specials), so ids match everywhere.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import os
import threading
from importlib import resources
from typing import Iterable, Sequence

from blues.errors import BluesError

NAME = "o200k_base"
# sha256 of the plain (uncompressed) official o200k_base.tiktoken, as pinned by tiktoken itself.
RANKS_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
RANKS_FILE = "o200k_base.tiktoken.gz"  # inside blues/assets/ (pyproject package-data: "assets/*.gz")

ENDOFTEXT = "<|endoftext|>"
ENDOFPROMPT = "<|endofprompt|>"
SPECIAL_TOKENS = {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}
N_VOCAB = 200019  # max token id + 1; ids 199998 and 200000..200017 are unassigned

# The o200k_base pre-tokenizer pattern, verbatim from tiktoken_ext/openai_public.py.
PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def _ranks_path() -> str:
    return str(resources.files("blues").joinpath("assets", RANKS_FILE))


def load_ranks(path: str | None = None) -> dict[bytes, int]:
    """Read a gzipped .tiktoken rank file, check its sha256, return {token bytes: rank}."""
    path = path or _ranks_path()
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise BluesError(f"tokenizer rank file {path} is missing; reinstall the blues package") from None
    except (OSError, EOFError) as e:
        raise BluesError(f"tokenizer rank file {path} is unreadable ({e}); reinstall the blues package") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256:
        raise BluesError(
            f"tokenizer rank file {path} has sha256 {digest}, expected {RANKS_SHA256} "
            f"(the official {NAME}.tiktoken); reinstall the blues package")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """A thin wrapper over `tiktoken.Encoding` with the few calls the project uses."""

    def __init__(self, encoding, *, fingerprint: str):
        self._enc = encoding
        self.name: str = encoding.name
        self.n_vocab: int = encoding.n_vocab
        self.eot_id: int = encoding.eot_token
        # Identifies the exact tokenizer in data-cache keys (ranks, pattern and specials).
        self.fingerprint: str = fingerprint

    def encode(self, text: str) -> list[int]:
        """Ordinary encoding: special-token strings such as '<|endoftext|>' stay plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int | None = None) -> list[list[int]]:
        """`encode` over many texts; tiktoken's Rust core releases the GIL, so threads scale."""
        if num_threads is None:
            num_threads = max(1, min(16, os.cpu_count() or 1))
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for token ids; bytes that are not valid UTF-8 on their own become U+FFFD.

        Ids with no token (the unassigned 199998 and 200000..200017, which an untrained model can
        sample) decode to U+FFFD instead of failing; ids outside [0, n_vocab) are an error.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise BluesError(f"token id {bad[0]} is outside the {self.name} vocabulary [0, {self.n_vocab})")
        try:
            return self._enc.decode(ids, errors="replace")
        except KeyError:  # an unassigned id somewhere: decode token by token
            return b"".join(self._token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def _token_bytes(self, i: int) -> bytes:
        try:
            return self._enc.decode_single_token_bytes(i)
        except KeyError:
            return "\ufffd".encode()

    @property
    def encoding(self):
        """The underlying `tiktoken.Encoding` (for callers that need more)."""
        return self._enc

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


_CACHE: Tokenizer | None = None
_LOCK = threading.Lock()


def load_tokenizer() -> Tokenizer:
    """The o200k_base tokenizer, built once per process from the bundled rank file (no network)."""
    global _CACHE
    with _LOCK:
        if _CACHE is None:
            import tiktoken

            encoding = tiktoken.Encoding(
                NAME, pat_str=PAT_STR, mergeable_ranks=load_ranks(), special_tokens=dict(SPECIAL_TOKENS))
            if encoding.n_vocab != N_VOCAB or encoding.eot_token != SPECIAL_TOKENS[ENDOFTEXT]:
                raise BluesError(
                    f"tokenizer {NAME} built with n_vocab {encoding.n_vocab}, expected {N_VOCAB}")
            spec = f"{NAME}|{RANKS_SHA256}|{PAT_STR}|{sorted(SPECIAL_TOKENS.items())}"
            _CACHE = Tokenizer(encoding, fingerprint=hashlib.sha256(spec.encode()).hexdigest()[:16])
        return _CACHE
