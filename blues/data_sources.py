"""Documents out of data files of any size, streamed in bounded batches.

`expand_inputs` turns what the user typed (files, directories, globs) into a sorted list of files;
`read_documents` yields each file's non-blank documents in batches of about `BATCH_CHARS`
characters, so memory stays bounded however large the file is. Formats, by the name's suffix
(before an optional `.gz` / `.zst`; compression itself is recognised by its magic bytes):

- `.csv`, `.tsv`: pyarrow's streaming CSV reader (C++), in blocks of about `BATCH_CHARS` bytes;
  the `Text` column, or `text_column`;
- `.jsonl` / `.ndjson`: one JSON object per line (stdlib `json`), its `text` field, or `text_column`;
- `.parquet`: pyarrow record batches of the `Text`/`text` column, or `text_column`;
- `.txt`: the whole file is one document.

A column or field matched only case-insensitively is used with a one-line note. Every problem is
a `DataError` naming the file (and the line or record where there is one). `pyarrow` and
`zstandard` are imported when a file needs them, so importing this module stays cheap.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Sequence

from blues.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("blues.data")

BATCH_CHARS = 2 << 20  # characters per batch of documents: bounds memory, keeps workers busy
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".text": "txt"}
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
DEFAULT_COLUMN = {"csv": "Text", "tsv": "Text", "parquet": "Text", "jsonl": "text"}


class InputError(DataError):
    """A record of a data file that cannot be read (malformed line, wrong type): exit status 2."""

    exit_code = 2


@dataclass(frozen=True)
class Source:
    path: Path
    format: str  # one of FORMATS' values

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def source_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(f"data file {path} has no known format suffix; name it .csv, .tsv, .jsonl, .parquet "
                        f"or .txt (optionally followed by .gz or .zst)")
    return fmt


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """Files as given, every data file under a directory (recursively, sorted), the matches of a glob
    (sorted); each file once, in that order."""
    out: list[Path] = []
    for given in paths:
        text = os.path.expanduser(str(given))
        if glob.has_magic(text) and not os.path.exists(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"data pattern {given} matches no files")
            out += matches
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _has_format(p))
            if not found:
                raise DataError(f"data directory {path} holds no .csv, .tsv, .jsonl, .parquet or .txt files")
            out += found
        elif not path.exists():
            raise DataError(f"data file {path} does not exist")
        else:
            out.append(path)
    unique = list(dict.fromkeys(out))
    return [Source(p, source_format(p)) for p in unique]


def _has_format(path: Path) -> bool:
    try:
        source_format(path)
        return True
    except DataError:
        return False


# ---- opening: decompression, emptiness, binary content -------------------------------------------

@contextlib.contextmanager
def open_stream(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(raw file, decompressed buffered stream): gzip and zstd by their magic bytes."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"data file {path} is unreadable: {e.strerror or e}") from None
    with raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif magic == ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError:
                raise DataError(f"data file {path} is zstd-compressed; reading it needs the zstandard package "
                                f"(pip install zstandard)") from None
            stream = io.BufferedReader(_ZstdReader(raw, zstandard), buffer_size=1 << 20)
        else:
            stream = raw
        with _decompression_errors(path):
            yield raw, stream


class _ZstdReader(io.RawIOBase):
    """zstd frames (one or several) as a readable stream; a stream cut inside a frame is an error
    (zstandard's own stream_reader ends quietly there)."""

    def __init__(self, raw: BinaryIO, zstandard):
        self._raw, self._zstd = raw, zstandard
        self._dobj, self._in_frame = zstandard.ZstdDecompressor().decompressobj(), False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._raw.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise self._zstd.ZstdError("the stream ends inside a frame")
                return 0
            out = []
            while data:
                out.append(self._dobj.decompress(data))
                self._in_frame = not self._dobj.eof
                data = b""
                if self._dobj.eof:  # a frame ended: the rest is the next frame, for a fresh decompressor
                    data = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
            self._out, self._pos = b"".join(out), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n


@contextlib.contextmanager
def _decompression_errors(path: Path):
    zstd_error: type = ()  # type: ignore[assignment]
    with contextlib.suppress(ImportError):
        import zstandard
        zstd_error = zstandard.ZstdError
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"data file {path} is a damaged gzip file ({e})") from None
    except zstd_error as e:
        raise DataError(f"data file {path} is a damaged zstd file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                        f"re-save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"data file {path} is unreadable: {e.strerror or e}") from None


def _check_text(path: Path, stream: BinaryIO, what: str) -> None:
    head = stream.peek(1 << 20)[:1 << 20] if hasattr(stream, "peek") else b""
    if not head.strip():
        raise DataError(f"data file {path} is empty; it needs {what}")
    if b"\x00" in head:
        raise DataError(f"data file {path} is a binary file, not text (it contains NUL bytes)")


def pick_column(path: Path, names: Sequence[str], wanted: str, hint: bool, kind: str = "column") -> str:
    """`wanted` if present, else its one case-insensitive match (with a note), else a DataError
    (advising --text_column when `hint`)."""
    names = [str(n) for n in names]
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    if len(folded) == 1:
        log.warning("data file %s has no '%s' %s; using its '%s' %s", path, wanted, kind, folded[0], kind)
        return folded[0]
    found = ", ".join(repr(n) for n in names)
    advice = "; pick one with --text_column NAME" if hint else ""
    raise DataError(f"data file {path} has no '{wanted}' {kind} ({kind}s found: {found}){advice}")


# ---- readers: each yields (documents, raw bytes consumed so far) --------------------------------

def _read_delimited(src: Source, column: str | None, hint: bool) -> Iterator[tuple[list[str], int]]:
    import pyarrow as pa

    wanted = column or DEFAULT_COLUMN[src.format]
    name, block, rows, n_docs = None, BATCH_CHARS, 0, 0
    while True:  # a record longer than a block: read again with larger blocks, past the rows done
        try:
            if name is None:
                name = pick_column(src.path, _csv_names(src, wanted, block), wanted, hint)
            for texts, pos in _csv_column(src, name, block, skip=rows):
                texts = _utf8(src, texts, rows).to_pylist()
                rows += len(texts)
                docs = [t for t in texts if t.strip()]
                n_docs += len(docs)
                yield docs, pos
            break
        except pa.ArrowInvalid as e:
            if "straddling" not in str(e):
                reason = (str(e).replace("CSV parse error: ", "").strip().splitlines() or [type(e).__name__])[0]
                raise InputError(f"data file {src.path} is not a valid {src.format.upper()} file: {reason}") from None
            block *= 4
    if rows == 0:
        raise DataError(f"data file {src.path} has a header but no rows")
    if n_docs == 0:
        raise DataError(f"data file {src.path} has only blank texts in its '{name}' column ({rows} rows)")


def _csv_options(src: Source, block: int) -> dict:
    import pyarrow.csv as pcsv

    # One thread: a parse error then names its row ("Row #N", the header being row 1).
    return {"read_options": pcsv.ReadOptions(block_size=block, use_threads=False),
            "parse_options": pcsv.ParseOptions(delimiter="\t" if src.format == "tsv" else ",",
                                               newlines_in_values=True)}


def _csv_names(src: Source, wanted: str, block: int) -> list[str]:
    import pyarrow.csv as pcsv

    with open_stream(src.path) as (raw, stream):
        _check_text(src.path, stream, f"a header line with a '{wanted}' column and rows")
        with pcsv.open_csv(stream, **_csv_options(src, block)) as reader:
            return reader.schema.names


def _csv_column(src: Source, name: str, block: int, skip: int) -> Iterator[tuple["pa.Array", int]]:
    """Column `name` as UTF-8 bytes in record batches of about `block` bytes of the file, less the
    first `skip` rows, with the raw bytes consumed so far."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(include_columns=[name], column_types={name: pa.large_binary()})
    seen = 0
    # The reader is closed with the file, also on an error: one left to the interpreter's final garbage
    # collection can abort its exit ("terminate called without an active exception").
    with open_stream(src.path) as (raw, stream), \
            pcsv.open_csv(stream, convert_options=convert, **_csv_options(src, block)) as reader:
        for batch in reader:
            texts = batch.column(0).slice(max(0, skip - seen))
            seen += batch.num_rows
            if len(texts):
                yield texts, raw.tell()


def _utf8(src: Source, texts: "pa.Array", rows_before: int) -> "pa.Array":
    """A batch of CSV fields as strings; a field that is not UTF-8 is an error naming its row."""
    import pyarrow as pa

    try:
        return texts.cast(pa.large_string())
    except pa.ArrowInvalid:
        for i, value in enumerate(texts.to_pylist()):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data file {src.path} is not UTF-8 text (byte 0x{value[e.start]:02x} in row "
                                f"{rows_before + i + 2}); re-save it as UTF-8") from None
        raise


def _read_jsonl(src: Source, column: str | None, hint: bool) -> Iterator[tuple[list[str], int]]:
    wanted = column or DEFAULT_COLUMN["jsonl"]
    docs, chars, n_records, n_docs, name = [], 0, 0, 0, None
    with open_stream(src.path) as (raw, stream):
        _check_text(src.path, stream, f"one JSON object a line with a '{wanted}' field")
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                if isinstance(e, UnicodeDecodeError):
                    raise DataError(f"data file {src.path} line {lineno} is not UTF-8 text; re-save it as UTF-8") from None
                raise InputError(f"data file {src.path} line {lineno} is not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise InputError(f"data file {src.path} line {lineno} is not a JSON object")
            if name is None:
                name = pick_column(src.path, list(record), wanted, hint, kind="field")
            if name not in record:
                raise InputError(f"data file {src.path} line {lineno} has no '{name}' field")
            text = record[name]
            if not isinstance(text, str):
                raise InputError(f"data file {src.path} line {lineno}: field '{name}' is "
                                 f"{type(text).__name__}, not a string")
            n_records += 1
            if text.strip():
                docs.append(text)
                chars += len(text)
            if chars >= BATCH_CHARS:
                n_docs += len(docs)
                yield docs, raw.tell()
                docs, chars = [], 0
        n_docs += len(docs)
        yield docs, raw.tell()
    if n_docs == 0:
        raise DataError(f"data file {src.path} has only blank texts in its '{name}' field ({n_records} records)")


def _read_parquet(src: Source, column: str | None, hint: bool) -> Iterator[tuple[list[str], int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"data file {src.path} is Parquet; reading it needs the pyarrow package "
                        f"(pip install pyarrow)") from None
    wanted = column or DEFAULT_COLUMN["parquet"]
    size = src.size
    with open_stream(src.path) as (raw, stream), contextlib.ExitStack() as stack:
        if stream is not raw:  # a compressed Parquet file: Parquet needs random access
            plain = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(stream, plain, 1 << 20)
            plain.seek(0)
            stream = plain
        try:
            pf = pq.ParquetFile(stream)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"data file {src.path} is not a valid Parquet file ({e})") from None
        name = pick_column(src.path, pf.schema_arrow.names, wanted, hint)
        field_type = pf.schema_arrow.field(name).type
        if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
            raise DataError(f"data file {src.path}: column '{name}' holds {field_type}, not strings")
        total, done, n_docs = max(1, pf.metadata.num_rows), 0, 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[name]):
                texts = batch.column(0).to_pylist()
                docs = [t for t in texts if t is not None and t.strip()]
                done += len(texts)
                n_docs += len(docs)
                yield docs, size * done // total
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"data file {src.path}: Parquet rows {done}..{done + 1024} are unreadable ({e})") from None
    if n_docs == 0:
        raise DataError(f"data file {src.path} has only blank texts in its '{name}' column ({done} rows)")


def _read_txt(src: Source, column: str | None, hint: bool) -> Iterator[tuple[list[str], int]]:
    with open_stream(src.path) as (raw, stream):
        _check_text(src.path, stream, "some text")
        text = stream.read().decode("utf-8-sig")
        yield [text], raw.tell()


READERS = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl, "parquet": _read_parquet,
           "txt": _read_txt}


def read_documents(src: Source, text_column: str | None = None, *,
                   hint: bool = False) -> Iterator[tuple[list[str], int]]:
    """(non-blank documents, bytes of the file consumed so far) in batches, in file order. `hint`:
    a missing text column's message advises --text_column (for commands that have it)."""
    return READERS[src.format](src, text_column, hint)
