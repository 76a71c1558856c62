"""`python -m blues.data prepare`: tokenize data files into the token cache ahead of training.

    python -m blues.data prepare --data 'shards/*.csv.gz' more.jsonl --seq_len 256 --workers 8

One process (with `--workers` tokenizing processes) fills the cache that the trainers then map at
once; they would otherwise do the same implicitly on their first start. Prints the token counts,
the split, the cache files and the training command that uses them.
"""
from __future__ import annotations

import argparse
import shlex
from typing import Sequence

from blues.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m blues.data", description="Tokenize data files into the Blues token cache.")
    sub = p.add_subparsers(dest="command", required=True, metavar="prepare", parser_class=_Parser)
    q = sub.add_parser("prepare", help="tokenize data files into the cache (the trainers then start at once)")
    q.add_argument("--data", nargs="+", metavar="PATH",
                   help="files, directories or globs: .csv .tsv .jsonl .parquet .txt, optionally .gz/.zst "
                        "(default: the embedded corpus)")
    q.add_argument("--seq_len", type=int, default=256,
                   help="the model's max_position_embeddings: each split must hold one window of seq_len + 1 "
                        "tokens (default: 256)")
    q.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: the CPU count)")
    q.add_argument("--text_column", default=None, metavar="NAME",
                   help="column (CSV, TSV, Parquet) or field (JSONL) holding the text (default: Text; text for JSONL)")
    q.add_argument("--val_fraction", type=float, default=0.05,
                   help="chance that a document goes to the validation split (default: 0.05)")
    q.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: Sequence[str]) -> int:
    from blues.data import prepare_data

    args = build_parser().parse_args(list(argv))
    if args.seq_len <= 0:
        raise UsageError(f"--seq_len: must be a positive integer, got {args.seq_len}")
    if args.workers is not None and args.workers <= 0:
        raise UsageError(f"--workers: must be a positive integer, got {args.workers}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val_fraction: must be in (0, 1), got {args.val_fraction}")
    splits = prepare_data(args.data, seq_len=args.seq_len, val_fraction=args.val_fraction,
                          text_column=args.text_column, workers=args.workers)
    if splits.built:
        b = splits.built
        rate = (len(splits.train) + len(splits.val)) / max(b["seconds"], 1e-9)
        print(f"tokenized {splits.source} in {b['seconds']:.1f} s with {b['workers']} "
              f"worker{'s' if b['workers'] > 1 else ''}: {rate:,.0f} tokens/s, {rate / b['workers']:,.0f} per worker")
    else:
        print(f"already tokenized: {splits.source}")
    for name, split, docs in (("train", "train", splits.n_train_docs), ("validation", "val", splits.n_val_docs)):
        print(f"{name}: {len(getattr(splits, split)):,} tokens, {docs:,} documents, "
              f"{splits.windows(split):,} windows of {args.seq_len + 1}")
    print(f"cache: {splits.cache_dir}/{splits.cache_key}.{{json,train.u32,val.u32}}")
    options = []
    if args.data:
        options += ["--data", *args.data]
    if args.text_column is not None:
        options += ["--text_column", args.text_column]
    if args.val_fraction != 0.05:
        options += ["--val_fraction", repr(args.val_fraction)]
    print(f"train with: python train_jax.py {shlex.join(options)}".rstrip())
    return 0
