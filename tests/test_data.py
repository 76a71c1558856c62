"""blues.data: reading CSVs (every bad-input message), the document split, the token cache,
window cutting, and the batch iterator (rank sharding, exact resumption)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from blues import data as bd
from blues.data import (DEFAULT_CORPUS, BatchIterator, TokenSplits, check_vocab, eval_batches,
                        load_documents, num_windows, prepare_data)
from blues.errors import DataError
from blues.tokenizer import load_tokenizer

TOK = load_tokenizer()


def write_csv(path: Path, texts, column="Text") -> Path:
    import pandas as pd

    pd.DataFrame({column: texts, "Other": range(len(texts))}).to_csv(path, index=False)
    return path


def sentences(n_docs, words=60, seed=0):
    rng = np.random.default_rng(seed)
    vocab = "the a cat dog sat ran on under mat tree quickly slowly red blue and but".split()
    return [" ".join(rng.choice(vocab, size=words)) + f" document {i}." for i in range(n_docs)]


class CountingTokenizer:
    """The real tokenizer, counting how many documents it was asked to encode."""

    def __init__(self):
        self.encoded = 0
        self.name, self.n_vocab, self.eot_id, self.fingerprint = TOK.name, TOK.n_vocab, TOK.eot_id, TOK.fingerprint

    def encode(self, text):
        self.encoded += 1
        return TOK.encode(text)

    def encode_batch(self, texts):
        self.encoded += len(texts)
        return TOK.encode_batch(texts)


# ---- load_documents: every bad input names the file and the problem --------------------------------

def test_reads_text_column_csv_and_gzip(tmp_path):
    p = write_csv(tmp_path / "a.csv", ["first doc", "  ", "second, with \"quotes\"\nand a newline", "NA"])
    assert load_documents(p) == ["first doc", "second, with \"quotes\"\nand a newline", "NA"]
    gz = tmp_path / "b.csv.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert load_documents([p, gz]) == load_documents(p) * 2


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"^data file .*nope\.csv does not exist$"):
        load_documents(tmp_path / "nope.csv")


def test_directory(tmp_path):
    with pytest.raises(DataError, match=r"data file .* is a directory, not a CSV file"):
        load_documents(tmp_path)


def test_unreadable(tmp_path, monkeypatch):
    # Root ignores file modes, so simulate the OS refusing the read.
    p = write_csv(tmp_path / "locked.csv", ["x"])

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(DataError, match=r"data file .*locked\.csv is unreadable: Permission denied"):
        load_documents(p)


def test_no_text_column_lists_columns(tmp_path):
    p = write_csv(tmp_path / "cols.csv", ["x", "y"], column="text")
    with pytest.raises(DataError, match=r"cols\.csv has no 'Text' column \(columns found: 'text', 'Other'\)"):
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
    p.write_bytes("Text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv is not UTF-8 text \(byte 0xe9 at offset 8\)"):
        load_documents(p)


def test_binary_file(tmp_path):
    p = tmp_path / "image.csv"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=r"image\.csv is a binary file, not CSV text"):
        load_documents(p)


def test_damaged_gzip(tmp_path):
    p = tmp_path / "cut.csv.gz"
    p.write_bytes(gzip.compress(b"Text\n" + b"hello world\n" * 1000)[:40])
    with pytest.raises(DataError, match=r"cut\.csv\.gz is a damaged gzip file"):
        load_documents(p)


def test_malformed_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('Text,Other\n"unterminated quote,1\n')
    with pytest.raises(DataError, match=r"bad\.csv is not a valid CSV file: "):
        load_documents(p)


def test_default_corpus():
    assert DEFAULT_CORPUS.name == "brown.csv.gz" and DEFAULT_CORPUS.exists()
    docs = load_documents()
    assert len(docs) == 500 and all(len(d) > 5000 for d in docs)
    assert docs[0].startswith("The Fulton County Grand Jury said Friday")


# ---- prepare_data: the streams, the split, the cache ---------------------------------------------

def test_streams_are_documents_plus_eot(tmp_path):
    docs = sentences(20) + ["a literal <|endoftext|> in text"]
    p = write_csv(tmp_path / "d.csv", docs)
    s = prepare_data(p, seq_len=8, cache_dir=tmp_path / "cache", val_fraction=0.2, split_seed=3)
    assert isinstance(s, TokenSplits) and s.train.dtype == np.uint32 and isinstance(s.train, np.memmap)
    assert (s.n_train_docs, s.n_val_docs) == (17, 4)  # round(0.2 * 21) = 4
    val_idx = set(np.random.default_rng(3).permutation(21)[:4].tolist())

    def stream(indices):
        return [t for i in indices for t in TOK.encode(docs[i]) + [TOK.eot_id]]

    assert s.train.tolist() == stream([i for i in range(21) if i not in val_idx])
    assert s.val.tolist() == stream(sorted(val_idx))
    # Only the document ends are eot: the literal special-token string stayed text.
    assert int((s.train == TOK.eot_id).sum()) + int((s.val == TOK.eot_id).sum()) == 21
    assert s.n_vocab == 200019 and s.eot_id == 199999 and "d.csv (21 documents)" in s.source


def test_split_is_by_document_and_seeded(tmp_path):
    p = write_csv(tmp_path / "d.csv", sentences(40))
    a = prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", split_seed=0)
    b = prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", split_seed=0)
    c = prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", split_seed=1)
    assert (a.n_train_docs, a.n_val_docs) == (38, 2)
    assert np.array_equal(a.val, b.val) and not np.array_equal(a.val, c.val)


def test_two_documents_give_one_each_and_one_is_refused(tmp_path):
    p = write_csv(tmp_path / "two.csv", sentences(2, words=200))
    s = prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", val_fraction=0.05)
    assert (s.n_train_docs, s.n_val_docs) == (1, 1)
    one = write_csv(tmp_path / "one.csv", sentences(1, words=200))
    with pytest.raises(DataError, match=r"one\.csv holds 1 document; the validation split is chosen by document"):
        prepare_data(one, seq_len=8, cache_dir=tmp_path / "c")
    s = prepare_data(one, seq_len=8, cache_dir=tmp_path / "c", val_fraction=0.0)
    assert s.n_val_docs == 0 and len(s.val) == 0


def test_too_few_tokens_for_a_window(tmp_path):
    docs = sentences(20, words=400)
    docs[int(np.random.default_rng(0).permutation(20)[0])] = "tiny"  # the one validation document
    p = write_csv(tmp_path / "short.csv", docs)
    with pytest.raises(DataError) as e:
        prepare_data(p, seq_len=256, cache_dir=tmp_path / "c", val_fraction=0.05, split_seed=0)
    n_val = len(prepare_data(p, seq_len=1, cache_dir=tmp_path / "c").val)
    assert str(e.value) == (
        f"validation split of {p} (1 documents) has {n_val} tokens, fewer than one window of 257; "
        f"use a bigger file or a smaller max_position_embeddings")


def test_cache_is_reused(tmp_path, monkeypatch):
    p = write_csv(tmp_path / "d.csv", sentences(30))
    monkeypatch.setenv("BLUES_CACHE", str(tmp_path / "envcache"))
    tok = CountingTokenizer()
    a = prepare_data(p, seq_len=8, tokenizer=tok)
    assert tok.encoded == 30
    b = prepare_data(p, seq_len=8, tokenizer=tok)
    assert tok.encoded == 30  # nothing re-tokenized
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    files = sorted(f.name for f in (tmp_path / "envcache").iterdir())
    assert files == sorted(f"{a.cache_key}{ext}" for ext in (".json", ".lock", ".train.u32", ".val.u32"))


def _damage_truncate(meta):
    f = meta.parent / f"{meta.stem}.train.u32"
    f.write_bytes(f.read_bytes()[:-4])


def _damage_flip(meta):
    f = meta.parent / f"{meta.stem}.train.u32"
    raw = bytearray(f.read_bytes())
    raw[10] ^= 1  # same size, different content: only the recorded hash catches it
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
    good = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c")
    want_train, want_val = np.array(good.train), np.array(good.val)
    del good
    damage(tmp_path / "c" / f"{prepare_data(p, seq_len=8, cache_dir=tmp_path / 'c').cache_key}.json")
    again = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c")
    assert tok.encoded == 60  # re-tokenized once
    assert np.array_equal(again.train, want_train) and np.array_equal(again.val, want_val)
    prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c")
    assert tok.encoded == 60  # and the rebuilt cache is good


def test_changed_source_or_split_is_a_new_key(tmp_path):
    p = write_csv(tmp_path / "d.csv", sentences(30))
    tok = CountingTokenizer()
    a = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c")
    b = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.1)
    write_csv(p, sentences(30, seed=1))
    c = prepare_data(p, seq_len=8, tokenizer=tok, cache_dir=tmp_path / "c")
    assert tok.encoded == 90 and len({a.cache_key, b.cache_key, c.cache_key}) == 3
    assert not np.array_equal(a.train, c.train)


def test_failed_tokenization_leaves_no_files(tmp_path):
    p = write_csv(tmp_path / "d.csv", sentences(30))

    class Broken(CountingTokenizer):
        def encode_batch(self, texts):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prepare_data(p, seq_len=8, tokenizer=Broken(), cache_dir=tmp_path / "c")
    # temp files removed, nothing half-written (only the lock file stays)
    assert [f.name for f in (tmp_path / "c").iterdir() if not f.name.endswith(".lock")] == []


def test_concurrent_processes_tokenize_once(tmp_path):
    """Data-parallel ranks start together: the cache lock lets exactly one of them tokenize."""
    import os
    import subprocess
    import sys

    p = write_csv(tmp_path / "d.csv", sentences(3000, words=80))
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
              "from blues.data import prepare_data\n"
              f"prepare_data({str(p)!r}, seq_len=8, cache_dir={str(tmp_path / 'c')!r})\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
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
    prepare_data(p, seq_len=8, cache_dir=tmp_path / "c", show_progress=True)
    assert capsys.readouterr().err == ""


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
