"""Check that a checkpoint computes the same thing in PyTorch and in JAX.

    python -m parity.check --checkpoint PATH [--text TEXT [TEXT ...] | --data CSV [CSV ...]]
                           [--dtype float32|bfloat16] [--rows N]

PATH is anything parity.convert_checkpoint reads (either trainer's checkpoint or run directory, a
DeepSpeed ZeRO checkpoint, an export). The weights are loaded into a blues_torch and a blues_jax
model (CUDA / the default JAX backend when present, else CPU), the same token windows run through
both in eval mode (no router noise, no dropout), and the script prints, per layer, the routing
agreement, the largest router-probability difference and the largest difference of the block's
output hidden state, then overall: max |logit difference|, mean and max per-token KL(torch || jax),
routing agreement and the relative differences of the losses. Exit status 0 means every check of
the dtype's column passed, 1 that one failed (or an error: one line).

Tolerances (judged on what float32 and bfloat16 can deliver for two independent implementations):

| check                         | float32 (strict)  | bfloat16                       |
| ----------------------------- | ----------------- | ------------------------------ |
| max per-token KL              | <= 1e-7           | <= 0.015 (MaxText's checker)   |
| mean per-token KL             | <= 1e-9           | reported                       |
| max abs logit difference      | <= 1e-4           | reported                       |
| routing agreement             | 100%              | reported                       |
| lm_loss relative difference   | <= 1e-5           | reported                       |

float32: both frameworks run full-precision matmuls (no TF32); float32 carries ~7 significant
digits and the two round differently through every layer, so O(10) logits of a trained model agree
to ~1e-5 and the test suite's 1e-5 (small random models, O(1) logits) becomes 1e-4 here; the
per-token KL, which is scale-free, stays tight. bf16 (bf16 matmuls in both, torch autocast and
the JAX model's compute dtype) rounds to 3 significant digits: logits differ by ~1e-2 and near-tied
experts may route differently, so, like MaxText's logit checker, only the KL divergence decides.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blues.cli import run_main
from blues.config import BluesConfig
from blues.errors import DataError, UsageError
from parity import suite

DTYPES = ("float32", "bfloat16")
DEFAULT_ROWS = 4


@dataclass(frozen=True)
class Tolerance:
    max_kl: float
    mean_kl: float | None  # None: reported, not judged
    max_logit_diff: float | None
    routing_agreement: float | None
    lm_loss_rel: float | None


TOLERANCES = {
    "float32": Tolerance(max_kl=1e-7, mean_kl=1e-9, max_logit_diff=1e-4, routing_agreement=1.0, lm_loss_rel=1e-5),
    "bfloat16": Tolerance(max_kl=0.015, mean_kl=None, max_logit_diff=None, routing_agreement=None, lm_loss_rel=None),
}


# ---- tokens ----------------------------------------------------------------------------------------

def token_windows(config: BluesConfig, *, texts: Sequence[str] | None, data: Sequence[str] | None,
                  rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [rows', T'] from texts or CSV files (default: the embedded corpus), tokenized
    as in training (each document + <|endoftext|>, one stream, windows of T + 1 tokens)."""
    from blues.data import load_documents
    from blues.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    if config.vocab_size < tokenizer.n_vocab:
        raise UsageError(f"the checkpoint's vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer.n_vocab}): its model cannot read tokenized text")
    if texts is not None:
        docs = [t for t in texts if t.strip()]
        if not docs:
            raise UsageError("--text: every text is blank; give some words to check")
    else:
        docs = load_documents(data)  # DataError naming the file for a missing column, empty file, ...
    t = config.max_position_embeddings
    need = rows * (t + 1)
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc) + [tokenizer.eot_id]
        if len(stream) >= need:
            break
    if len(stream) < 2:
        raise DataError("the text is too short: it must hold at least one token")
    if len(stream) < t + 1:  # shorter than one window: one row of what there is
        ids = np.asarray(stream, np.int64)[None]
        return ids[:, :-1], ids[:, 1:]
    n = min(rows, len(stream) // (t + 1))
    windows = np.asarray(stream[:n * (t + 1)], np.int64).reshape(n, t + 1)
    return windows[:, :-1], windows[:, 1:]


# ---- the models ------------------------------------------------------------------------------------

def build_models(arrays, config: BluesConfig, dtype: str):
    """(torch model on CUDA if available else CPU, jax model on JAX's default device)."""
    import jax
    import jax.numpy as jnp
    import torch

    from parity.convert import from_canonical

    jax.config.update("jax_default_matmul_precision", "highest" if dtype == "float32" else "default")
    if dtype == "float32":  # no TF32 anywhere: float32 means float32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tm = from_canonical(arrays, config, "torch").to("cuda" if torch.cuda.is_available() else "cpu")
    jm = from_canonical(arrays, config, "jax", dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    return tm, jm


def run(arrays, config: BluesConfig, ids: np.ndarray, targets: np.ndarray, dtype: str) -> suite.Comparison:
    """Both frameworks on the same windows, one row at a time (bounded memory at a 200k vocabulary)."""
    import torch

    tm, jm = build_models(arrays, config, dtype)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    parts = []
    for row in range(ids.shape[0]):
        x, y = ids[row:row + 1], targets[row:row + 1]
        a = suite.run_torch(tm, x, y, hidden=True, autocast_dtype=autocast)
        b = suite.run_jax(jm, x, y, hidden=True)
        parts.append(suite.compare(a, b))
    return suite.merge(parts)


# ---- judging and printing ----------------------------------------------------------------------------

def judge(cmp: suite.Comparison, dtype: str) -> list[tuple[str, str, str, bool | None]]:
    """Rows (check, measured, tolerance, passed or None when only reported)."""
    tol = TOLERANCES[dtype]

    def row(name, value, limit, fmt, higher_is_better=False):
        if limit is None:
            return (name, fmt.format(value), "reported", None)
        ok = value >= limit if higher_is_better else value <= limit
        return (name, fmt.format(value), ((">= " if higher_is_better else "<= ") + fmt.format(limit)), ok)

    return [
        row("max per-token KL", cmp.max_kl, tol.max_kl, "{:.3e}"),
        row("mean per-token KL", cmp.mean_kl, tol.mean_kl, "{:.3e}"),
        row("max |logit difference|", cmp.max_logit_diff, tol.max_logit_diff, "{:.3e}"),
        row("routing agreement", cmp.routing_agreement, tol.routing_agreement, "{:.4%}", higher_is_better=True),
        row("lm_loss relative difference", cmp.loss_diffs.get("lm_loss", 0.0), tol.lm_loss_rel, "{:.3e}"),
        row("aux_loss relative difference", cmp.loss_diffs["aux_loss"], None, "{:.3e}"),
        row("z_loss relative difference", cmp.loss_diffs["z_loss"], None, "{:.3e}"),
    ]


def report(cmp: suite.Comparison, dtype: str, source: str, shape: tuple[int, int]) -> tuple[str, bool]:
    lines = [f"parity check of {source}: {shape[0]} window(s) x {shape[1]} tokens, {dtype}, torch vs jax", "",
             "layer  routing agreement  max |router prob diff|  max |hidden diff| (relative)"]
    for lc in cmp.layers:
        hidden = "-" if lc.hidden_max_diff is None else f"{lc.hidden_max_diff:.3e} ({lc.hidden_rel_diff:.1e})"
        lines.append(f"{lc.layer:>5}  {lc.routing_agreement:>17.4%}  {lc.router_prob_max_diff:>22.3e}  {hidden}")
    lines += ["", f"{'check':<30} {'measured':>12}  {'tolerance':<14} result"]
    rows = judge(cmp, dtype)
    for name, value, limit, ok in rows:
        lines.append(f"{name:<30} {value:>12}  {limit:<14} {'-' if ok is None else ('pass' if ok else 'FAIL')}")
    passed = all(ok is not False for *_, ok in rows)
    verdict = "PASS" if passed else "FAIL"
    if not passed and cmp.routing_agreement < 1.0:
        first = next(lc for lc in cmp.layers if lc.routing_agreement < 1.0)
        verdict += (f": routing first differs at layer {first.layer}; a near-tie between two experts flips "
                    f"with rounding, everything after it then differs for that token")
    lines += ["", verdict]
    return "\n".join(lines), passed


# ---- the command -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m parity.check",
                description="Load one checkpoint into PyTorch and JAX and compare what they compute.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint, run directory, DeepSpeed checkpoint or export")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", metavar="TEXT", help="text(s) to run through both models")
    src.add_argument("--data", nargs="+", metavar="CSV", help="CSV file(s) with a 'Text' column (default: the "
                                                              "embedded corpus)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, metavar="N",
                   help=f"windows of max_position_embeddings tokens to compare (default {DEFAULT_ROWS})")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rows <= 0:
        raise UsageError(f"--rows: must be a positive integer, got {args.rows}")
    from parity.convert_checkpoint import read_source

    src = read_source(args.checkpoint, with_optimizer=False)
    ids, targets = token_windows(src.config, texts=args.text, data=args.data, rows=args.rows)
    cmp = run(src.arrays, src.config, ids, targets, args.dtype)
    text, passed = report(cmp, args.dtype, str(src.path), ids.shape)
    print(text, flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
