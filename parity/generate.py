"""Generate text with a trained Blues model, or score text (perplexity and expert utilization).

    python generate.py --checkpoint runs/demo --prompt "Once upon a time"
    python generate.py --checkpoint checkpoints/model_iter_1000.pt --prompt "The future of AI is" \\
        --max_length 200 --temperature 0.9 --top_p 0.95 --top_k 40
    python generate.py --checkpoint runs/demo --eval_text "This is a test sentence."
    python generate.py --checkpoint runs/demo --eval_file blues/assets/brown.csv.gz --json

`--checkpoint` takes a run directory (its newest good checkpoint), a checkpoint directory of either
trainer, a safetensors export, a `.pt` state dict, or the seed's `DIR/model_iter_N.pt` name for
step N (parity/checkpoint_read.py reads them all; only the weights, not the optimizer state).
`--backend auto` runs the framework that wrote the checkpoint (torch for a neutral export); either
backend runs any checkpoint through the canonical tensors.

Generation: every prompt is preceded by `<|endoftext|>` (the document boundary of training), so the
model continues a fresh document; it stops after `--max_length` new tokens or at `<|endoftext|>`.
Sampling follows blues/sampling.py (temperature, top-k, top-p, sample; temperature 0 = greedy);
the same `--seed` gives the same samples, on any device and batch split. A prompt that does not fit
the context with `--max_length` new tokens is refused (exit 2), never truncated. Decoding uses a
KV cache (blues_torch/generation.py, blues_jax/generation.py): JAX compiles the whole loop; torch
replays a CUDA graph of the decode step on a GPU (`--compile` adds torch.compile, a one-time cost
of ~10-20 s for a ~2x faster step). `--dtype bfloat16` runs the matmuls in bf16 on a GPU.

Evaluation: perplexity over the `<|endoftext|>` + text tokens, with a sliding window of `--stride`
tokens beyond the context (blues/evaluation.py explains the guarantee), plus a per-layer
expert-utilization table. Windows are scored in batches, longest first and right-padded (padding is
not scored), with a progress bar on stderr. `--json`: one object per sample with `text`, `completion`,
`completion_ids`; one object for an evaluation with `tokens`, `nll`, `perplexity` and
`expert_utilization`.

The command is `python generate.py` in a checkout (a shim re-exporting this module),
`blues-generate` or `python -m parity.generate` when installed.

Python API (as in the seed README; `from generate import ...` works in a checkout):

    from parity.generate import load_model, sample_text, sample_texts
    model = load_model("runs/demo")
    text = sample_text(model, prompt="Write a story about", max_length=200, temperature=0.8, top_p=0.9, top_k=50)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from blues.cli import run_main
from blues.config import BluesConfig
from blues.errors import BluesError, UsageError
from blues.evaluation import RoutingStats, format_utilization, nll_summary, plan_windows
from blues.sampling import SamplingParams

__all__ = ["LoadedModel", "load_model", "wrap_model", "generate_ids", "generate_records", "sample_text",
           "sample_texts", "evaluate_text", "evaluate_texts", "evaluate_ids", "main"]

BACKENDS = ("auto", "torch", "jax")
DTYPES = ("float32", "bfloat16")
# The seed README's generation defaults.
DEFAULTS = dict(max_length=100, temperature=0.8, top_p=0.9, top_k=50)
GENERATION_BATCH = 64  # prompts decoded together (more are split; results do not change)
# float32 logits one evaluation forward may hold (sets its batch size): CPU RAM is shared, a GPU's is not.
EVAL_LOGITS_BYTES = {"cpu": 1 << 29, "accelerator": 1 << 32}


# ---- loading ---------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready for inference: the framework module plus what generation needs around it."""

    model: Any  # blues_torch.BluesModel or blues_jax.BluesModel, in eval mode
    config: BluesConfig
    backend: str  # "torch" or "jax"
    tokenizer: Any
    source: str = ""  # what was loaded (path and kind), for messages
    device: str = ""
    compile: bool = False  # torch on CUDA: torch.compile the decode step

    @property
    def context(self) -> int:
        return self.config.max_position_embeddings


def _torch_device(device: str | None):
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: '{device}' is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: '{device}' is not supported; use cpu or cuda[:N]")
    return dev


def _jax_device(device: str | None):
    import jax
    if device is None:
        return jax.devices()[0]
    kind, _, index = device.partition(":")
    platform = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(kind)
    if platform is None or (index and not index.isdigit()):
        raise UsageError(f"--device: '{device}' is not a JAX device (cpu, gpu, gpu:N)")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise UsageError(f"--device {device}: JAX has no {platform} device here; use --device cpu") from None
    i = int(index or 0)
    if i >= len(devices):
        raise UsageError(f"--device {device}: JAX sees only {len(devices)} {platform} device(s)")
    return devices[i]


def load_model(path: str, backend: str = "auto", device: str | None = None, dtype: str = "float32",
               compile: bool = False) -> LoadedModel:
    """Load a checkpoint of either trainer or an export; `backend` auto follows its format.

    `dtype` "bfloat16" runs the matmuls in bf16 (torch: bf16 weights; JAX: bf16 compute, float32
    weights); norms, softmaxes and sampling stay float32. "float32" (default) is the parity setting.
    `compile` (torch on CUDA): torch.compile the decode step: a one-time cost, then faster decoding."""
    from blues.tokenizer import load_tokenizer
    from parity.checkpoint_read import read_source
    from parity.convert import from_canonical

    if backend not in BACKENDS:
        raise UsageError(f"--backend: unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    ckpt = read_source(os.path.expanduser(path), with_optimizer=False)
    if backend == "auto":
        backend = ckpt.framework or "torch"
    tokenizer = load_tokenizer()
    ckpt.config.check_tokenizer(tokenizer.n_vocab)
    if backend == "torch":
        dev = _torch_device(device)
        import torch
        model = from_canonical(ckpt.arrays, ckpt.config, "torch").to(dev).eval()
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx
        dev = _jax_device(device)
        model = from_canonical(ckpt.arrays, ckpt.config, "jax", dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        nnx.update(model, jax.device_put(nnx.state(model), dev))
        model.eval()
    return LoadedModel(model, ckpt.config, backend, tokenizer, source=f"{ckpt.path} ({ckpt.kind})", device=str(dev),
                       compile=compile)


def wrap_model(model, tokenizer=None) -> LoadedModel:
    """A LoadedModel around a model object already in memory (either framework)."""
    from blues.tokenizer import load_tokenizer
    from parity.convert import framework_of

    backend = framework_of(model)
    if backend == "torch":
        device = str(model.embed.device)
    else:
        device = str(next(iter(model.embed[...].devices())))
    return LoadedModel(model, model.config, backend, tokenizer or load_tokenizer(), source="in-memory model",
                       device=device)


def _as_loaded(model) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else wrap_model(model)


def _engine(loaded: LoadedModel):
    if loaded.backend == "torch":
        from blues_torch import generation
    else:
        from blues_jax import generation
    return generation


# ---- generation ------------------------------------------------------------------------------------

def check_length(loaded: LoadedModel, num_prompt_ids: int, max_length: int) -> None:
    """Refuse (exit 2) a prompt that does not fit the context together with `max_length` new tokens."""
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= 0:
        raise UsageError(f"--max_length must be a positive number of new tokens, got {max_length}")
    needed = 1 + num_prompt_ids + max_length
    if needed > loaded.context:
        raise UsageError(
            f"the prompt ({num_prompt_ids} tokens, after the <|endoftext|> that starts it) plus --max_length "
            f"{max_length} needs {needed} positions, but the model's context length is {loaded.context} "
            f"(max_position_embeddings); shorten the prompt or lower --max_length to at most "
            f"{max(loaded.context - 1 - num_prompt_ids, 0)}")


def generate_ids(model, prompts: Sequence[Sequence[int]], max_length: int, params: SamplingParams, *,
                 stop_at_eot: bool = True, on_token=None, row_offset: int = 0) -> list[list[int]]:
    """New token ids for prompts given as token ids (`<|endoftext|>` is prepended to each)."""
    loaded = _as_loaded(model)
    eot = loaded.tokenizer.eot_id
    for p in prompts:
        check_length(loaded, len(p), max_length)
    engine = _engine(loaded)
    extra = {"compile": loaded.compile} if loaded.backend == "torch" else {}
    out: list[list[int]] = []
    for lo in range(0, len(prompts), GENERATION_BATCH):
        batch = [[eot, *p] for p in prompts[lo:lo + GENERATION_BATCH]]
        out += engine.generate(loaded.model, batch, max_length, params, eot_id=eot, stop_at_eot=stop_at_eot,
                               on_token=on_token, row_offset=row_offset + lo, **extra)
    return out


def sample_texts(model, prompts: Sequence[str], max_length: int = DEFAULTS["max_length"],
                 temperature: float = DEFAULTS["temperature"], top_p: float = DEFAULTS["top_p"],
                 top_k: int = DEFAULTS["top_k"], *, seed: int | None = None, num_samples: int = 1) -> list[str]:
    """Prompt + continuation for each prompt (`num_samples` each, prompt-major), batched. `seed`
    None draws fresh randomness each call; an integer makes the samples reproducible."""
    return [r["text"] for r in generate_records(model, prompts, max_length, temperature, top_p, top_k,
                                                seed=seed, num_samples=num_samples)]


def sample_text(model, prompt: str, max_length: int = DEFAULTS["max_length"],
                temperature: float = DEFAULTS["temperature"], top_p: float = DEFAULTS["top_p"],
                top_k: int = DEFAULTS["top_k"], *, seed: int | None = None) -> str:
    """The seed README's call: the prompt followed by up to `max_length` generated tokens (a fresh
    sample each call; give `seed` to reproduce one)."""
    return sample_texts(model, [prompt], max_length, temperature, top_p, top_k, seed=seed)[0]


def generate_records(model, prompts: Sequence[str], max_length: int, temperature: float, top_p: float,
                     top_k: int, *, seed: int | None = None, num_samples: int = 1, on_token=None) -> list[dict]:
    """{"text", "completion", "completion_ids"} per sample (the --json objects); `seed` None: fresh."""
    loaded = _as_loaded(model)
    seed = secrets.randbits(32) if seed is None else seed  # the sampler's counters use 32 bits of it
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UsageError(f"--num_samples must be a positive integer, got {num_samples}")
    tok = loaded.tokenizer
    prompt_ids = [tok.encode(p) for p in prompts]
    rows = [ids for ids in prompt_ids for _ in range(num_samples)]
    texts = [p for p in prompts for _ in range(num_samples)]
    completions = generate_ids(loaded, rows, max_length, params, on_token=on_token)
    records = []
    for prompt, ids in zip(texts, completions):
        completion = tok.decode(ids)
        records.append({"text": prompt + completion, "completion": completion, "completion_ids": ids})
    return records


class _Streamer:
    """Prints one sample's text as its tokens arrive (holding back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer, prompt: str, eot_id: int):
        self.tok, self.eot, self.ids, self.shown, self.done = tokenizer, eot_id, [], "", False
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, step: int, ids: np.ndarray) -> None:
        if self.done:
            return
        if int(ids[0]) == self.eot:
            self.done = True
            return
        self.ids.append(int(ids[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # maybe the first bytes of a character: wait for the rest
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        sys.stdout.write(text[len(self.shown):] + "\n")
        sys.stdout.flush()


# ---- evaluation ------------------------------------------------------------------------------------

def evaluate_texts(model, texts: Sequence[str], stride: int | None = None, *, progress: bool = False) -> dict:
    """Perplexity over texts (each scored as its own document, after `<|endoftext|>`) and the
    expert-utilization report: {"tokens", "nll", "perplexity", "expert_utilization"}, where nll is
    the token-weighted mean NLL in nats."""
    loaded = _as_loaded(model)
    tok = loaded.tokenizer
    return evaluate_ids(loaded, [[tok.eot_id, *tok.encode(text)] for text in texts], stride, progress=progress)


def evaluate_ids(model, sequences: Sequence[Sequence[int]], stride: int | None = None, *,
                 progress: bool = False) -> dict:
    """`evaluate_texts` on token ids: in each sequence s[0..N] every s[i], i >= 1, is scored.
    `progress`: a tqdm bar of the scored tokens on stderr."""
    loaded = _as_loaded(model)
    cfg = loaded.config
    context = cfg.max_position_embeddings
    windows = []  # (inputs, targets) per window, unpadded
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for w in plan_windows(len(seq) - 1, context, stride):
            tgt = seq[w.begin + 1:w.end + 1].copy()
            tgt[:w.score_from - w.begin] = -100  # owned by an earlier window
            windows.append((seq[w.begin:w.end], tgt))
    if not windows:
        raise BluesError("nothing to evaluate: the text has no tokens")
    engine = _engine(loaded)
    stats = RoutingStats(cfg.num_layers, cfg.tot_num_experts)
    total, count = 0.0, 0
    budget = EVAL_LOGITS_BYTES["cpu" if loaded.device.startswith("cpu") else "accelerator"]
    max_tokens = max(1, budget // (cfg.vocab_size * 4))  # positions per forward
    bar = tqdm(total=sum(int((t != -100).sum()) for _, t in windows), unit="tok", desc="evaluating",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for rows, width, batch in plan_batches([len(i) for i, _ in windows], context, max_tokens, loaded.backend):
        # Right padding changes nothing for the real tokens (a causal model never looks right);
        # padded positions and rows have target -100, so they are not scored.
        ids = np.zeros((rows, width), dtype=np.int64)
        tgt = np.full((rows, width), -100, dtype=np.int64)
        for r, w in enumerate(batch):
            i, t = windows[w]
            ids[r, :len(i)], tgt[r, :len(t)] = i, t
        nll, idx, ent = engine.score(loaded.model, ids, tgt)
        scored = tgt != -100  # [B, T]
        total += float(nll[scored].astype(np.float64).sum())
        count += int(scored.sum())
        stats.add(idx[:, scored], ent[:, scored])
        bar.update(int(scored.sum()))
    bar.close()
    return {**nll_summary(total, count), "expert_utilization": stats.report()}


def plan_batches(lengths: Sequence[int], context: int, max_tokens: int, backend: str):
    """(rows, width, window indices) per forward: windows longest first, so each batch holds windows
    of similar length and little padding; rows * width <= max_tokens (at least one row). torch pads a
    batch to a multiple of 8 positions; JAX compiles each shape, so it pads widths and partial row
    counts to powers of two (a few shapes, a few compiles)."""
    order = sorted(range(len(lengths)), key=lambda w: -lengths[w])
    lo = 0
    while lo < len(order):
        longest = lengths[order[lo]]
        width = -(-longest // 8) * 8 if backend == "torch" else max(32, 1 << (longest - 1).bit_length())
        width = min(width, context)
        fit = max(1, max_tokens // width)
        batch = order[lo:lo + fit]
        rows = len(batch) if backend == "torch" else min(fit, 1 << (len(batch) - 1).bit_length())
        yield rows, width, batch
        lo += len(batch)


def evaluate_text(model, text: str, stride: int | None = None) -> dict:
    return evaluate_texts(model, [text], stride)


# ---- command line ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (run_main), not argparse's usage dump
        raise UsageError(f"{message} (see --help)")


def build_parser() -> _Parser:
    p = _Parser(description="Generate text with a Blues model, or measure perplexity.",
                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run directory, checkpoint directory, safetensors export or .pt file")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text to continue (repeat for a batch)")
    p.add_argument("--max_length", type=int, default=DEFAULTS["max_length"], metavar="N",
                   help=f"new tokens to generate (default {DEFAULTS['max_length']})")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                   help=f"softmax temperature, 0 = greedy (default {DEFAULTS['temperature']})")
    p.add_argument("--top_p", type=float, default=DEFAULTS["top_p"],
                   help=f"nucleus sampling mass in (0, 1], 1 = off (default {DEFAULTS['top_p']})")
    p.add_argument("--top_k", type=int, default=DEFAULTS["top_k"],
                   help=f"keep the k most likely tokens, 0 = off (default {DEFAULTS['top_k']})")
    p.add_argument("--num_samples", type=int, default=1, metavar="N", help="samples per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed (default 0: the same command prints the same samples)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--eval_text", metavar="TEXT", help="text to measure perplexity and expert utilization on")
    p.add_argument("--eval_file", metavar="CSV", help="CSV file whose 'Text' column to evaluate")
    p.add_argument("--stride", type=int, metavar="N",
                   help="sliding-window stride for texts longer than the context (default: context / 2)")
    p.add_argument("--backend", default="auto", help="auto (the checkpoint's framework), torch or jax")
    p.add_argument("--device", help="torch: cpu, cuda, cuda:N; jax: cpu, gpu, gpu:N (default: best available)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16 matmuls (faster on GPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch on CUDA: torch.compile the decode step (slower start, faster decoding)")
    p.add_argument("--json", action="store_true", help="machine-readable output, one JSON object per line")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def check_args(args) -> SamplingParams:
    """Every flag checked before anything is loaded; UsageError (exit 2) names the flag."""
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend: unknown backend '{args.backend}'; choose one of {', '.join(BACKENDS)}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype '{args.dtype}'; choose one of {', '.join(DTYPES)}")
    if not (args.prompt or args.eval_text is not None or args.eval_file):
        raise UsageError("nothing to do: give --prompt, --eval_text or --eval_file")
    if args.max_length <= 0:
        raise UsageError(f"--max_length must be a positive number of new tokens, got {args.max_length}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.stride is not None and args.stride < 1:
        raise UsageError(f"--stride must be at least 1, got {args.stride}")
    if args.stream and args.json:
        raise UsageError("--stream and --json cannot be combined (--json prints whole samples)")
    if args.eval_text is not None and not args.eval_text.strip():
        raise UsageError("--eval_text is empty; give some text to evaluate")
    if not math.isfinite(args.temperature) or not math.isfinite(args.top_p):
        raise UsageError("--temperature and --top_p must be finite numbers")
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    params = check_args(args)
    texts = None
    if args.eval_file:
        from blues.data import load_documents
        texts = load_documents(os.path.expanduser(args.eval_file))  # DataError names the file and the problem
    loaded = load_model(args.checkpoint, backend=args.backend, device=args.device, dtype=args.dtype,
                        compile=args.compile)

    if args.prompt:
        prompt_ids = [loaded.tokenizer.encode(p) for p in args.prompt]
        for ids in prompt_ids:  # refuse before generating anything
            check_length(loaded, len(ids), args.max_length)
        if args.stream:
            index = 0
            for prompt in args.prompt:
                for _ in range(args.num_samples):
                    if index:
                        print("---")
                    streamer = _Streamer(loaded.tokenizer, prompt, loaded.tokenizer.eot_id)
                    # One sample per call, with its own row index: the same samples as a batch.
                    generate_ids(loaded, [loaded.tokenizer.encode(prompt)], args.max_length, params,
                                 on_token=streamer, row_offset=index)
                    streamer.finish()
                    index += 1
        else:
            records = generate_records(loaded, args.prompt, args.max_length, args.temperature, args.top_p,
                                       args.top_k, seed=args.seed, num_samples=args.num_samples)
            for i, rec in enumerate(records):
                if args.json:
                    print(json.dumps(rec, ensure_ascii=False))
                else:
                    if i:
                        print("---")
                    print(rec["text"])

    for name, batch in (("--eval_text", [args.eval_text] if args.eval_text is not None else None),
                        ("--eval_file", texts)):
        if batch is None:
            continue
        if args.stride is not None and args.stride > loaded.context:
            raise UsageError(f"--stride must be between 1 and the context length {loaded.context}, got {args.stride}")
        result = evaluate_texts(loaded, batch, args.stride, progress=True)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{name}: {result['tokens']} tokens, nll {result['nll']:.4f} nats/token, "
                  f"perplexity {result['perplexity']:.2f}")
            print(format_utilization(result["expert_utilization"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
