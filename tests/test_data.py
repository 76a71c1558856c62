"""blues.data: reading every format (and every bad-input message), files/directories/globs, the
hash split, the token cache and its faults (malformed records, disk full, kill -9), 1 vs N workers,
`python -m blues.data prepare`, window cutting, and the batch iterator (rank sharding, exact
resumption). All on small generated files; Parquet and zstd cases need pyarrow / zstandard
(project dependencies) and are skipped where they are not installed."""
import errno
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blues import data as bd
from blues import data_sources as ds
from blues.cli import run_main
from blues.data import (DEFAULT_CORPUS, BatchIterator, TokenSplits, check_vocab, eval_batches,
                        load_documents, num_windows, prepare_data)
from blues.data_prepare import main as prepare_main
from blues.data_tokenize import is_validation
from blues.errors import DataError, UsageError
from blues.tokenizer import load_tokenizer

TOK = load_tokenizer()
ROOT = Path(__file__).resolve().parent.parent


def write_csv(path: Path, texts, column="Text", sep=",") -> Path:
    import pandas as pd

    pd.DataFrame({column: texts, "Other": range(len(texts))}).to_csv(path, index=False, sep=sep)
    return path


def sentences(n_docs, words=60, seed=0):
    rng = np.random.default_rng(seed)
    vocab = "the a cat dog sat ran on under mat tree quickly slowly red blue and but".split()
    return [" ".join(rng.choice(vocab, size=words)) + f" document {i}." for i in range(n_docs)]


def cache_files(cache: Path) -> list[str]:
    """What a cache directory holds besides lock files and the source-hash index."""
    return sorted(f.name for f in cache.iterdir() if not f.name.endswith(".lock") and f.name != "sources.json")


class CountingTokenizer:
    """The real tokenizer, counting how many documents it was asked to encode."""

    def __init__(self):
        self.encoded = 0
        self.name, self.n_vocab, self.eot_id, self.fingerprint = TOK.name, TOK.n_vocab, TOK.eot_id, TOK.fingerprint

    def encode(self, text):
        self.encoded += 1
        return TOK.encode(text)


# ---- every format reads the same documents -------------------------------------------------------

DOCS = ["first doc", "  ", "second, with \"quotes\"\tand a tab\nand a newline", "NA", "caf\u00e9 \u2603"]
KEPT = [d for d in DOCS if d.strip()]


def _compress(raw: bytes, how: str) -> bytes:
    if how == "gz":
        return gzip.compress(raw)
    if how == "zst":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def _write_format(tmp: Path, fmt: str, docs, compression: str = "") -> list[Path]:
    """`docs` as files of one format (txt: one file per document), optionally compressed."""
    import pandas as pd

    frame = pd.DataFrame({"Text": docs, "n": range(len(docs))})
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        raws = {"d.parquet": buf.getvalue()}
    elif fmt == "jsonl":
        raws = {"d.jsonl": "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()}
    elif fmt == "txt":
        raws = {f"doc{i:02d}.txt": d.encode() for i, d in enumerate(docs) if d.strip()}
    else:
        raws = {f"d.{fmt}": frame.to_csv(index=False, sep="\t" if fmt == "tsv" else ",").encode()}
    out = []
    for name, raw in raws.items():
        path = tmp / (name + (f".{compression}" if compression else ""))
        path.write_bytes(_compress(raw, compression))
        out.append(path)
    return out


@pytest.mark.parametrize("compression", ["", "gz", "zst"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "txt"])
def test_every_format_reads_the_same_documents(tmp_path, fmt, compression):
    paths = _write_format(tmp_path, fmt, DOCS, compression)
    assert load_documents(paths) == KEPT
    if fmt == "txt":  # a directory of text files: one document per file, in name order
        assert load_documents(tmp_path) == KEPT


def test_csv_records_longer_than_a_block(tmp_path, monkeypatch):
    """The CSV reader reads in blocks of about BATCH_CHARS bytes; a record longer than that (here
    one in the middle and one first) is read all the same, every document once, in order."""
    monkeypatch.setattr(ds, "BATCH_CHARS", 2_000)
    docs = sentences(200, words=20)
    docs[120] = "\n".join(sentences(60, words=20, seed=1))  # ~7 KB, with newlines inside the field
    docs[0] = "x" * 30_000
    assert load_documents(write_csv(tmp_path / "long.csv", docs)) == docs


def test_blank_texts_are_what_python_calls_whitespace(tmp_path):
    docs = ["kept", "\u3000\x1c\x85 \t", "", "\u200b", "also kept"]  # U+200B is no whitespace to Python
    for fmt in ("csv", "parquet", "jsonl"):
        (path,) = _write_format(tmp_path, fmt, docs)
        assert load_documents(path) == [d for d in docs if d.strip()] == ["kept", "\u200b", "also kept"]


def test_directories_and_globs(tmp_path):
    (tmp_path / "shards" / "deep").mkdir(parents=True)
    write_csv(tmp_path / "shards" / "b.csv", ["b"])
    write_csv(tmp_path / "shards" / "a.csv", ["a"])
    write_csv(tmp_path / "shards" / "deep" / "c.csv", ["c"])
    (tmp_path / "shards" / "notes.md").write_text("not data")  # unknown suffix: skipped in a directory
    gz = tmp_path / "shards" / "z.csv.gz"
    gz.write_bytes(gzip.compress(b"Text\nz\n"))
    assert load_documents(tmp_path / "shards") == ["a", "b", "c", "z"]  # recursive, sorted by path
    assert load_documents(str(tmp_path / "shards" / "*.csv*")) == ["a", "b", "z"]
    assert load_documents(str(tmp_path / "**" / "*.csv")) == ["a", "b", "c"]
    # each file once, in the order given
    assert load_documents([tmp_path / "shards" / "b.csv", str(tmp_path / "shards" / "*.csv")]) == ["b", "a"]
    with pytest.raises(DataError, match=r"data pattern .*\*\.jsonl matches no files"):
        load_documents(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match=r"data file .*notes\.md has no known format suffix; name it \.csv"):
        load_documents(tmp_path / "shards" / "notes.md")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"data directory .*empty_dir holds no \.csv, \.tsv, \.jsonl"):
        load_documents(tmp_path / "empty_dir")


def test_text_column(tmp_path, caplog):
    p = write_csv(tmp_path / "cols.csv", ["x", "y"], column="body")
    assert load_documents(p, text_column="body") == ["x", "y"]
    with pytest.raises(DataError, match=r"cols\.csv has no 'Text' column \(columns found: 'body', 'Other'\)$"):
        load_documents(p)  # generate.py --eval_file, parity.check: no --text_column to advise
    with pytest.raises(DataError, match=r"cols\.csv has no 'Text' column \(columns found: 'body', 'Other'\); "
                                        r"pick one with --text_column NAME$"):
        prepare_data(p, seq_len=8, cache_dir=tmp_path / "c")
    lower = write_csv(tmp_path / "lower.csv", ["x"], column="text")
    with caplog.at_level("WARNING", logger="blues.data"):
        assert load_documents(lower) == ["x"]
    assert caplog.messages == [f"data file {lower} has no 'Text' column; using its 'text' column"]
    j = tmp_path / "d.jsonl"
    j.write_text('{"content": "a"}\n{"content": "b"}\n')
    assert load_documents(j, text_column="content") == ["a", "b"]
    with pytest.raises(DataError, match=r"d\.jsonl has no 'text' field \(fields found: 'content'\)"):
        load_documents(j)


# ---- bad input: one line naming the file (and the line or record) --------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"^data file .*nope\.csv does not exist$"):
        load_documents(tmp_path / "nope.csv")


def test_unreadable(tmp_path, monkeypatch):
    # Root ignores file modes, so simulate the OS refusing the read.
    p = write_csv(tmp_path / "locked.csv", ["x"])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ds, "open", refuse, raising=False)
    with pytest.raises(DataError, match=r"data file .*locked\.csv is unreadable: Permission denied"):
        load_documents(p)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.csv"
    p.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.csv is empty; it needs a header line with a 'Text' column"):
        load_documents(p)


def test_header_without_rows(tmp_path):
    p = tmp_path / "header.csv"
    p.write_text("Text,Other\n")
    with pytest.raises(DataError, match=r"header\.csv has a header but no rows"):
        load_documents(p)


def test_only_blank_texts(tmp_path):
    p = write_csv(tmp_path / "blank.csv", ["", "   ", "\n"])
    with pytest.raises(DataError, match=r"blank\.csv has only blank texts in its 'Text' column \(3 rows\)"):
        load_documents(p)


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("Text\nfine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv is not UTF-8 text \(byte 0xe9 in row 3\); re-save it as UTF-8"):
        load_documents(p)


def test_binary_file(tmp_path):
    p = tmp_path / "image.csv"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=r"image\.csv is a binary file, not text"):
        load_documents(p)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_damaged_compressed_file(tmp_path, compression):
    p = tmp_path / f"cut.csv.{compression}"
    whole = _compress(("Text\n" + "\n".join(sentences(500))).encode(), compression)
    p.write_bytes(whole[:len(whole) // 2])
    name = {"gz": "gzip", "zst": "zstd"}[compression]
    with pytest.raises(DataError, match=rf"cut\.csv\.{compression} is a damaged {name} file"):
        load_documents(p)


def test_malformed_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('Text,Other\n"unterminated quote,1\n')
    with pytest.raises(ds.InputError, match=r"bad\.csv is not a valid CSV file: Row #2: Expected 2 columns, got 1"):
        load_documents(p)


def _assert_no_cache_entry(cache: Path) -> None:
    assert cache_files(cache) == [], "a failed build left files behind"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_malformed_record_deep_in_a_big_file(tmp_path, fmt, monkeypatch):
    """One line naming the file and the line, exit status 2, no cache entry; the batches before the
    bad record were tokenized already (the file streams), and all of that is thrown away."""
    monkeypatch.setattr(bd, "BATCH_CHARS", 200_000)
    monkeypatch.setattr(ds, "BATCH_CHARS", 200_000)
    n, bad = 60_000, 54_321  # ~5 MB: the reader is many batches in when it meets the bad record
    docs = sentences(n, words=12)
    if fmt == "csv":
        lines = ["Text,Other"] + [f"{d},{i}" for i, d in enumerate(docs)]
        lines[bad] = "one,two,three"
        want = rf"data file .*big\.csv is not a valid CSV file: Row #{bad + 1}: Expected 2 columns, got 3"
    else:
        lines = [json.dumps({"text": d}) for d in docs]
        lines[bad] = '{"text": "cut'
        want = rf"data file .*big\.jsonl line {bad + 1} is not valid JSON"
    p = tmp_path / f"big.{fmt}"
    p.write_text("\n".join(lines) + "\n")
    tok = CountingTokenizer()
    with pytest.raises(ds.InputError, match=want) as e:
        prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c")
    assert e.value.exit_code == 2 and tok.encoded > 0
    _assert_no_cache_entry(tmp_path / "c")


def test_malformed_record_from_the_command_line(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("Text\tOther\nfine\t1\nnot\tfine\tat all\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), BLUES_CACHE=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-m", "blues.data", "prepare", "--data", "bad.tsv"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "data.py: error: data file bad.tsv is not a valid TSV file: Row #3: Expected 2 columns, got 3: "
        "not\tfine\tat all"]
    _assert_no_cache_entry(tmp_path / "c")


# ---- prepare_data: the streams, the split, the cache ---------------------------------------------

def _stream(docs):
    return [t for d in docs for t in TOK.encode(d) + [TOK.eot_id]]


def test_streams_are_documents_plus_eot(tmp_path):
    docs = sentences(20) + ["a literal <|endoftext|> in text"]
    p = write_csv(tmp_path / "d.csv", docs)
    s = prepare_data(p, seq_len=8, cache_dir=tmp_path / "cache", val_fraction=0.3, split_seed=3)
    assert isinstance(s, TokenSplits) and s.train.dtype == np.uint32 and isinstance(s.train, np.memmap)
    is_val = [is_validation(d, 0.3, 3) for d in docs]
    assert (s.n_train_docs, s.n_val_docs) == (is_val.count(False), is_val.count(True))
    assert 0 < s.n_val_docs < 21
    assert s.train.tolist() == _stream([d for d, v in zip(docs, is_val) if not v])
    assert s.val.tolist() == _stream([d for d, v in zip(docs, is_val) if v])
    # Only the document ends are eot: the literal special-token string stayed text.
    assert int((s.train == TOK.eot_id).sum()) + int((s.val == TOK.eot_id).sum()) == 21
    assert s.n_vocab == 200019 and s.eot_id == 199999 and "d.csv (21 documents)" in s.source


def test_split_is_by_document_hash_and_stable_when_files_are_added(tmp_path):
    a = write_csv(tmp_path / "a.csv", sentences(200))
    first = prepare_data(a, seq_len=8, cache_dir=tmp_path / "c")
    assert 0 < first.n_val_docs < 30  # about 5% of 200
    b = write_csv(tmp_path / "b.csv", sentences(150, seed=1))
    both = prepare_data([b, a], seq_len=8, cache_dir=tmp_path / "c")
    b_only = prepare_data(b, seq_len=8, cache_dir=tmp_path / "c")
    # a's documents kept their split: the new file's documents come first, a's follow unchanged
    assert both.val.tolist() == b_only.val.tolist() + first.val.tolist()
    assert both.train.tolist() == b_only.train.tolist() + first.train.tolist()
    other_seed = prepare_data(a, seq_len=8, cache_dir=tmp_path / "c", split_seed=1)
    assert not np.array_equal(other_seed.val, first.val)


def test_too_few_documents_for_the_split(tmp_path):
    docs = sentences(40, words=200)
    val = [d for d in docs if is_validation(d, 0.05, 0)]
    train = [d for d in docs if not is_validation(d, 0.05, 0)]
    one = write_csv(tmp_path / "one.csv", train[:1])
    with pytest.raises(DataError, match=r"^none of the 1 documents of .*one\.csv fell in the validation split "
                                        r"\(each document goes there with probability --val_fraction 0\.05, "
                                        r"chosen by a hash of its text\); add documents or raise --val_fraction$"):
        prepare_data(one, seq_len=8, cache_dir=tmp_path / "c")
    only_val = write_csv(tmp_path / "val.csv", val[:1])
    with pytest.raises(DataError, match=r"^all 1 documents of .*val\.csv fell in the validation split .*"
                                        r"lower --val_fraction$"):
        prepare_data(only_val, seq_len=8, cache_dir=tmp_path / "c")
    _assert_no_cache_entry(tmp_path / "c")
    s = prepare_data(one, seq_len=8, cache_dir=tmp_path / "c", val_fraction=0.0)
    assert s.n_val_docs == 0 and len(s.val) == 0


def test_too_few_tokens_for_a_window(tmp_path):
    tiny = next(f"tiny {i}" for i in range(10_000) if is_validation(f"tiny {i}", 0.05, 0))
    docs = [d for d in sentences(40, words=400) if not is_validation(d, 0.05, 0)] + [tiny]  # the one val doc
    p = write_csv(tmp_path / "short.csv", docs)
    s = prepare_data(p, seq_len=1, cache_dir=tmp_path / "c")
    assert 0 < len(s.val) < 257 < len(s.train)
    with pytest.raises(DataError) as e:
        prepare_data(p, seq_len=256, cache_dir=tmp_path / "c")
    assert str(e.value) == (
        f"validation split of {p} ({s.n_val_docs} documents) has {len(s.val)} tokens, fewer than one window "
        f"of 257; use a bigger file or a smaller max_position_embeddings")


def test_cache_is_reused(tmp_path, monkeypatch):
    p = write_csv(tmp_path / "d.csv", sentences(30))
    monkeypatch.setenv("BLUES_CACHE", str(tmp_path / "envcache"))
    tok = CountingTokenizer()
    a = prepare_data(p, seq_len=8, tokenizer=tok, val_fraction=0.2)
    assert tok.encoded == 30 and a.built["workers"] == 1
    b = prepare_data(p, seq_len=8, tokenizer=tok, val_fraction=0.2)
    assert tok.encoded == 30 and b.built == {}  # nothing re-tokenized
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert cache_files(tmp_path / "envcache") == sorted(f"{a.cache_key}{ext}" for ext in (".json", ".train.u32", ".val.u32"))


def _damage_truncate(meta):
    f = meta.parent / f"{meta.stem}.train.u32"
    f.write_bytes(f.read_bytes()[:-4])


def _damage_flip(meta):
    f = meta.parent / f"{meta.stem}.train.u32"
    raw = bytearray(f.read_bytes())
    raw[10] ^= 1  # same size, different content (and mtime): only the recorded hash catches it
    f.write_bytes(bytes(raw))


def _damage_dtype(meta):
    rec = json.loads(meta.read_text())
    rec["splits"]["val"]["dtype"] = "uint16"
    meta.write_text(json.dumps(rec))


def _damage_meta(meta):
    meta.write_text("{not json")


def _damage_delete(meta):
    (meta.parent / f"{meta.stem}.val.u32").unlink()


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_dtype, _damage_meta, _damage_delete])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    p = write_csv(tmp_path / "d.csv", sentences(30))
    tok = CountingTokenizer()
    good = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.2)
    want_train, want_val, key = np.array(good.train), np.array(good.val), good.cache_key
    del good
    damage(tmp_path / "c" / f"{key}.json")
    again = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.2)
    assert tok.encoded == 60  # re-tokenized once
    assert np.array_equal(again.train, want_train) and np.array_equal(again.val, want_val)
    prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.2)
    assert tok.encoded == 60  # and the rebuilt cache is good


def test_changed_source_or_split_is_a_new_key(tmp_path):
    p = write_csv(tmp_path / "d.csv", sentences(30))
    tok = CountingTokenizer()
    a = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.2)
    b = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.3)
    write_csv(p, sentences(30, seed=1))  # same size, new content
    c = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.2)
    assert tok.encoded == 90 and len({a.cache_key, b.cache_key, c.cache_key}) == 3
    assert not np.array_equal(a.train, c.train)


def test_failed_tokenization_leaves_no_files(tmp_path):
    p = write_csv(tmp_path / "d.csv", sentences(30))

    class Broken(CountingTokenizer):
        def encode(self, text):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prepare_data(p, seq_len=8, tokenizer=Broken(), cache_dir=tmp_path / "c")
    _assert_no_cache_entry(tmp_path / "c")


@pytest.mark.parametrize("good_writes, workers", [(0, 1), (5, 2)])
def test_disk_full_leaves_nothing_half_written(tmp_path, monkeypatch, good_writes, workers):
    """A token-file write fails (disk full) on the writer thread, at the first write or mid-stream
    with batches queued for it and the pool busy: the one-line error, no cache entry, and the
    reading stops within the few batches in flight instead of running on to the end of the file."""
    monkeypatch.setattr(bd, "BATCH_CHARS", 2_000)
    monkeypatch.setattr(ds, "BATCH_CHARS", 2_000)
    p = write_csv(tmp_path / "d.csv", sentences(1000))  # ~140 batches
    real_open, real_batches = open, bd._batches
    writes, batches_read = [], []

    class FullDisk(io.FileIO):
        def write(self, b):
            writes.append(len(b))
            if len(writes) > good_writes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    def open_full(path, mode="r", *args, **kwargs):  # the token files' writes fail, as on a full disk
        return FullDisk(path, "wb") if str(path).endswith(".tmp") and "w" in mode else real_open(path, mode, *args, **kwargs)

    def counted_batches(*args):
        for batch in real_batches(*args):
            batches_read.append(len(batch))
            yield batch

    monkeypatch.setattr(bd, "open", open_full, raising=False)
    monkeypatch.setattr(bd, "_batches", counted_batches)
    with pytest.raises(DataError, match=r"^no space left on device while writing the token cache in .*c; "
                                        r"nothing was kept: free space or set BLUES_CACHE to a larger disk$"):
        prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", val_fraction=0.2, workers=workers)
    _assert_no_cache_entry(tmp_path / "c")
    failed_batch = good_writes // 2 + 1  # two writes (train, val) per batch
    assert len(batches_read) <= failed_batch + bd.WRITE_AHEAD + 2 * workers + 1, len(batches_read)


def test_kill_during_tokenization_leaves_no_usable_cache(tmp_path):
    """kill -9 mid-build: no record (nothing a later run would use); the next run builds it again
    and clears the dead builder's temporary files."""
    p = write_csv(tmp_path / "d.csv", sentences(20_000, words=40))  # ~5 MB: about a second to tokenize
    cache = tmp_path / "c"
    script = f"from blues.data import prepare_data; prepare_data({str(p)!r}, seq_len=8, cache_dir={str(cache)!r}, workers=1)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 60
    while not list(cache.glob("*.train.u32.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)  # into the tokenization
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("*.tmp"))  # the dead builder's partial token files
    assert not [f for f in cache.iterdir() if f.suffix == ".json" and f.name != "sources.json"]  # no record
    s = prepare_data(p, seq_len=8, cache_dir=cache, workers=1)
    assert s.built and s.n_train_docs + s.n_val_docs == 20_000
    assert not list(cache.glob("*.tmp"))


def test_one_and_several_workers_give_identical_output(tmp_path, monkeypatch):
    """Batches tokenized by 1 process or a pool of 2: the same ids, order and split. Small batches
    (monkeypatched) give the pool many batches to reorder, were it to."""
    monkeypatch.setattr(bd, "BATCH_CHARS", 5_000)
    monkeypatch.setattr(ds, "BATCH_CHARS", 5_000)
    paths = [write_csv(tmp_path / "a.csv", sentences(300, seed=1)),
             *_write_format(tmp_path, "jsonl", sentences(200, seed=2), "gz")]
    one = prepare_data(paths, seq_len=8, cache_dir=tmp_path / "c1", workers=1)
    two = prepare_data(paths, seq_len=8, cache_dir=tmp_path / "c2", workers=2)
    assert (one.built["workers"], two.built["workers"]) == (1, 2)
    assert one.cache_key == two.cache_key
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)
    assert (one.n_train_docs, one.n_val_docs) == (two.n_train_docs, two.n_val_docs)
    docs = load_documents(paths)
    assert two.val.tolist() == _stream([d for d in docs if is_validation(d, 0.05, 0)])


def test_concurrent_processes_tokenize_once(tmp_path):
    """Data-parallel ranks start together: the cache lock lets exactly one of them tokenize."""
    p = write_csv(tmp_path / "d.csv", sentences(3000, words=80))
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
              "from blues.data import prepare_data\n"
              f"prepare_data({str(p)!r}, seq_len=8, cache_dir={str(tmp_path / 'c')!r})\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
    logs = "".join(out for out, _ in outs)
    assert logs.count("INFO:blues.data:tokenizing") == 1 and logs.count("INFO:blues.data:reusing") == 2


def test_unusable_cache_dir(tmp_path):
    p = write_csv(tmp_path / "d.csv", sentences(5))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DataError, match=r"cannot use the data cache directory .*file/c .*set BLUES_CACHE"):
        prepare_data(p, seq_len=8, cache_dir=tmp_path / "file" / "c")


def test_missing_embedded_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(bd, "DEFAULT_CORPUS", tmp_path / "data" / "brown.csv.gz")
    with pytest.raises(DataError, match=r"the embedded corpus .*brown\.csv\.gz is missing; .*pip install -e \."):
        prepare_data(seq_len=8, cache_dir=tmp_path / "c")


def test_no_progress_bar_when_not_a_tty(tmp_path, capsys):
    p = write_csv(tmp_path / "d.csv", sentences(30))
    prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", show_progress=True, val_fraction=0.2)
    assert capsys.readouterr().err == ""


# ---- python -m blues.data prepare, and the trainers' data flags -----------------------------------

def test_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BLUES_CACHE", str(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    _write_format(tmp_path, "jsonl", [d.replace("document", "page") for d in sentences(60)])
    argv = ["prepare", "--data", "d.jsonl", "--seq_len", "16", "--workers", "1", "--val_fraction", "0.2"]
    assert run_main(prepare_main, argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tokenized d.jsonl (60 documents) in ") and "with 1 worker: " in out[0]
    s = prepare_data("d.jsonl", seq_len=16, val_fraction=0.2)
    assert out[1:3] == [f"train: {len(s.train):,} tokens, {s.n_train_docs:,} documents, {s.windows('train'):,} windows of 17",
                        f"validation: {len(s.val):,} tokens, {s.n_val_docs:,} documents, {s.windows('val'):,} windows of 17"]
    assert out[3] == f"cache: {tmp_path / 'c'}/{s.cache_key}.{{json,train.u32,val.u32}}"
    assert out[4] == "train with: python train_jax.py --data d.jsonl --val_fraction 0.2"
    assert run_main(prepare_main, argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == "already tokenized: d.jsonl (60 documents)"
    assert run_main(prepare_main, ["prepare", "--workers", "0"]) == 2
    assert "--workers: must be a positive integer" in capsys.readouterr().err


def test_trainer_data_flags(tmp_path):
    from blues.train_args import parse_args

    write_csv(tmp_path / "a.csv", ["x"])
    args = parse_args(["--data", str(tmp_path), "--text_column", "body", "--workers", "3", "--val_fraction", "0.1",
                       "--out_dir", str(tmp_path / "run")], "jax")
    assert (args.data, args.text_column, args.workers, args.val_fraction) == ((str(tmp_path),), "body", 3, 0.1)
    assert parse_args(["--out_dir", str(tmp_path / "run")], "torch").val_fraction == 0.05
    for argv, text in [(["--val_fraction", "0"], "--val_fraction: must be in (0, 1)"),
                       (["--workers", "0"], "--workers: must be a positive integer"),
                       (["--data", str(tmp_path / "*.jsonl")], "--data: data pattern"),
                       (["--data", str(tmp_path / "missing.csv")], "--data: data file")]:
        with pytest.raises(UsageError) as e:
            parse_args(argv + ["--out_dir", str(tmp_path / "run")], "torch")
        assert text in str(e.value)


def test_default_corpus():
    assert DEFAULT_CORPUS.name == "brown.csv.gz" and DEFAULT_CORPUS.exists()
    docs = load_documents()
    assert len(docs) == 500 and all(len(d) > 5000 for d in docs)
    assert docs[0].startswith("The Fulton County Grand Jury said Friday")


# ---- windows, vocab check, batches --------------------------------------------------------------

def test_window_cutting_and_eval_batches():
    tokens = np.arange(23, dtype=np.uint32)
    assert num_windows(tokens, 4) == 4  # windows of 5; the ragged tail 20..22 is dropped
    batches = list(eval_batches(tokens, 4, 2))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.dtype == np.int32 and x.shape == (2, 4) and y.shape == (2, 4)
    assert np.array_equal(y, x + 1)  # targets are the inputs shifted by one token
    # Every window exactly once, each a whole window [5w, 5w + 4), in one fixed seeded order
    # (spread over the split, not its first documents), the same at every call.
    seen = [row.tolist() for bx, _ in batches for row in bx]
    assert sorted(seen) == [[5 * w + i for i in range(4)] for w in range(4)]
    again = [row.tolist() for bx, _ in eval_batches(tokens, 4, 2) for row in bx]
    assert again == seen
    assert len(list(eval_batches(tokens, 4, 1, max_batches=3))) == 3
    # Two ranks of one: rank r takes window r of each global batch of the same order.
    r0 = next(eval_batches(tokens, 4, 1, rank=0, world_size=2))[0].tolist()
    r1 = next(eval_batches(tokens, 4, 1, rank=1, world_size=2))[0].tolist()
    assert r0 + r1 == seen[:2]


def test_too_small_for_a_global_batch():
    with pytest.raises(DataError, match=r"validation split has 4 windows of 5 tokens \(23 tokens\), fewer than "
                                        r"one global batch of 4 x 2 ranks"):
        eval_batches(np.arange(23, dtype=np.uint32), 4, 4, world_size=2)


def test_check_vocab_is_an_error_not_a_clamp():
    tokens = np.array([1, 5, 511, 3], dtype=np.uint32)
    check_vocab(tokens, 512)
    with pytest.raises(DataError, match=r"token id 511 is >= the model's vocab_size 511"):
        check_vocab(tokens, 511)
    it = BatchIterator(np.arange(40, dtype=np.uint32), seq_len=3, batch_size=2, vocab_size=30)
    with pytest.raises(DataError, match=r"token id 3\d is >= the model's vocab_size 30"):
        for _ in range(5):
            next(it)


def _windows_of(x, y, width):
    """Window index of each row (tokens are arange, so the first input identifies the window)."""
    return (x[:, 0] // width).tolist()


def test_epochs_are_seeded_permutations():
    T, B = 3, 2
    tokens = np.arange(4 * 11, dtype=np.uint32)  # 11 windows: 5 steps of 2, one window left over
    it = BatchIterator(tokens, seq_len=T, batch_size=B, seed=7)
    assert it.steps_per_epoch == 5
    seen = [w for _ in range(5) for w in _windows_of(*next(it), T + 1)]
    assert len(set(seen)) == 10 and seen != sorted(seen)
    assert seen == np.random.default_rng([7, 0]).permutation(11)[:10].tolist()
    x, y = next(it)  # epoch 1 starts: a different permutation
    assert it.epoch == 1 and _windows_of(x, y, T + 1) == np.random.default_rng([7, 1]).permutation(11)[:2].tolist()
    assert np.array_equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one


def test_rank_sharding_is_disjoint_and_covers_the_global_batch():
    T, B, W = 4, 3, 4
    tokens = np.arange(5 * 100, dtype=np.uint32)
    single = BatchIterator(tokens, seq_len=T, batch_size=B * W, seed=1)
    ranks = [BatchIterator(tokens, seq_len=T, batch_size=B, seed=1, rank=r, world_size=W) for r in range(W)]
    for _ in range(20):  # crosses an epoch boundary (8 steps per epoch)
        gx, gy = next(single)
        parts = [next(it) for it in ranks]
        ids = [_windows_of(x, y, T + 1) for x, y in parts]
        flat = [w for part in ids for w in part]
        assert len(set(flat)) == B * W  # no window on two ranks in one step
        assert np.array_equal(np.concatenate([x for x, _ in parts]), gx)
        assert np.array_equal(np.concatenate([y for _, y in parts]), gy)


def test_resume_is_exact():
    tokens = np.arange(9 * 50, dtype=np.uint32)
    it = BatchIterator(tokens, seq_len=8, batch_size=4, seed=3)
    for _ in range(17):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # survives a JSON checkpoint
    expected = [next(it) for _ in range(30)]
    resumed = BatchIterator(tokens, seq_len=8, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(30))):
        assert np.array_equal(x, rx) and np.array_equal(y, ry)

    # The same global batch split over two ranks resumes from one rank's state.
    halves = [BatchIterator(tokens, seq_len=8, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    x0, x1 = next(halves[0])[0], next(halves[1])[0]
    assert np.array_equal(np.concatenate([x0, x1]), expected[0][0])


def test_resume_refuses_a_different_run():
    tokens = np.arange(9 * 50, dtype=np.uint32)
    state = BatchIterator(tokens, seq_len=8, batch_size=4, seed=3).state_dict()
    other = BatchIterator(tokens, seq_len=8, batch_size=4, seed=4)
    with pytest.raises(DataError, match=r"does not fit this run's data: seed saved 3, now 4"):
        other.load_state_dict(state)
    bigger = BatchIterator(tokens, seq_len=8, batch_size=8, seed=3)
    with pytest.raises(DataError, match=r"global batch \(batch_size x world_size\) saved 4, now 8"):
        bigger.load_state_dict(state)
    with pytest.raises(DataError, match=r"data position in the checkpoint is malformed"):
        other.load_state_dict({"epoch": 0})
