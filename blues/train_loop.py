"""Pieces of the training loop that do not depend on the framework (both trainers use them).

- `GracefulStop`: SIGINT/SIGTERM set a flag; the trainer finishes the step, checkpoints, exits 0.
- `BadStepGuard`: counts non-finite steps (skipped updates) and says when to give up.
- `SpikeDetector`: logs a warning when the loss jumps far above its running mean.
- `sample_continuations`: greedy and sampled continuations of a prompt from numpy logits, in step.
- `Progress`: the tqdm bar (loss, tokens/s); `summary_line`, `resume_command`.
- `RunDir`: creates the output directory only once work starts, removes it if the run fails
  before writing its first checkpoint (a run that failed leaves nothing half-written behind).
- `EvalAccumulator`: token-weighted validation loss and expert statistics over batches.
- `seconds_since_start`: this process's age (the trainers' time-to-first-step lines).
- `reuse_freed_host_memory`: keep glibc from returning big freed buffers to the OS (CPU speed).
"""
from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from blues.utilization import ExpertStats

# The fixed prompt continued at every evaluation (greedy and sampled), and how.
SAMPLE_PROMPT = "The old man said that"
SAMPLE_TOKENS = 24
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 50
# The continuations logged at every evaluation, (name, temperature): each is one row of every sample forward.
SAMPLES = (("greedy", 0.0), ("sampled", SAMPLE_TEMPERATURE))


def reuse_freed_host_memory() -> bool:
    """Make glibc serve large allocations from its heap and keep freed memory for reuse.

    By default glibc hands every allocation above 32 MB to mmap and unmaps it on free, so each of
    the LM head's [tokens, 200k] float32 buffers (hundreds of MB, several per step) is page-faulted
    and zero-filled afresh: measured on 2 CPU cores, about a quarter of a tiny-preset step's CPU time
    was kernel time. With a high mmap threshold (or mmap off) and no trimming the buffers are reused
    and that time nearly vanishes. The cost: peak memory stays with the process. Linux/glibc only;
    elsewhere (or if refused) a no-op. Returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 or libc.mallopt(m_mmap_max, 0) == 1
    return ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1


def log(message: str) -> None:
    """A line for the user that does not break the tqdm bar."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(message, file=sys.stderr, flush=True)


class GracefulStop:
    """Context manager: the first SIGINT/SIGTERM sets `requested`; a second SIGINT interrupts at once."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.requested: str | None = None
        self._old = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        log(f"{name} received: finishing this step, then writing a checkpoint and stopping "
            f"(press Ctrl-C again to abort without saving)")

    def __enter__(self):
        for s in self.signals:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __bool__(self) -> bool:
        return self.requested is not None


class BadStepGuard:
    """Tracks non-finite steps: `check(loss, grad_norm)` is True when the update may be applied.

    A non-finite loss or gradient norm skips the update (`skipped` counts them all); after
    `max_bad_steps` consecutive ones `should_stop` is True and the trainer stops with a checkpoint
    of the last good state (the skipped steps never touched the weights).
    """

    def __init__(self, max_bad_steps: int, skipped: int = 0, consecutive: int = 0):
        self.max_bad_steps = max_bad_steps
        self.skipped = skipped
        self.consecutive = consecutive

    def check(self, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_bad_steps

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


class SpikeDetector:
    """Warns when a loss exceeds its exponential running mean by `factor` x (after a short warm-up).

    Spikes are only logged (the update is applied); their steps are kept in `spikes`.
    """

    def __init__(self, factor: float = 1.5, beta: float = 0.9, warmup: int = 10):
        self.factor, self.beta, self.warmup = factor, beta, warmup
        self.mean: float | None = None
        self.seen = 0
        self.spikes: list[int] = []

    def update(self, step: int, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean
        if spike:
            self.spikes.append(step)
            log(f"warning: loss spike at step {step}: {loss:.4f} vs running mean {self.mean:.4f}")
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1
        return spike


def sample_next(logits: np.ndarray, *, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token id from a [V] logit vector: temperature, then top-k, then sample; T=0 is greedy."""
    logits = np.asarray(logits, dtype=np.float64)  # [V]
    if temperature == 0:
        return int(np.argmax(logits))  # argmax takes the lowest id on ties
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return int(rng.choice(logits.size, p=probs))


def sample_continuations(next_logits: Callable[[list[np.ndarray]], np.ndarray], prompt_ids: Sequence[int],
                         temperatures: Sequence[float], *, max_new_tokens: int = SAMPLE_TOKENS, context: int,
                         top_k: int | None = SAMPLE_TOP_K, seed: int = 0, stop_id: int | None = None) -> list[list[int]]:
    """One continuation of `prompt_ids` per temperature, all advancing together: `next_logits(rows)`
    takes one id array per continuation (its last `context` ids) and returns their next-token logits
    [len(rows), V], so every forward has the same batch (a finished row rides along, ignored).

    No KV cache: each token re-runs the (short) windows; only for the small evaluation samples.
    Each row samples with its own private generator seeded with `seed` (so a row's tokens do not
    depend on the other rows'), and sampling never disturbs the training RNG streams.
    """
    rngs = [np.random.default_rng(seed) for _ in temperatures]
    ids = [list(prompt_ids) for _ in temperatures]
    outs: list[list[int]] = [[] for _ in temperatures]
    live = [True] * len(temperatures)
    for _ in range(max_new_tokens):
        if not any(live):
            break
        logits = next_logits([np.asarray(row[-context:], dtype=np.int32) for row in ids])  # [rows, V]
        for i, temperature in enumerate(temperatures):
            if not live[i]:
                continue
            token = sample_next(logits[i], temperature=temperature, top_k=top_k, rng=rngs[i])
            if stop_id is not None and token == stop_id:
                live[i] = False
                continue
            ids[i].append(token)
            outs[i].append(token)
    return outs


def sample_window(tokenizer, seq_len: int) -> int:
    """The width of every sample forward: SAMPLE_PROMPT plus SAMPLE_TOKENS rounded up to a power of
    two, at most seq_len. The windows are right-padded to it (the causal mask keeps the padding out
    of the last real position), so the samples' forward has one shape: compiled (JAX) it compiles
    once, and eager (PyTorch) it meets each kernel's per-shape set-up once, not once per token."""
    prompt = len(tokenizer.encode(SAMPLE_PROMPT))
    return min(seq_len, 1 << (prompt + SAMPLE_TOKENS - 1).bit_length())


def log_samples(tokenizer, next_logits, *, step: int, context: int, seed: int, metrics=None) -> dict[str, str]:
    """The SAMPLES continuations of SAMPLE_PROMPT (one batched forward a token), logged (and to
    TensorBoard); returns them by name."""
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    continuations = sample_continuations(next_logits, prompt, [t for _, t in SAMPLES], context=context,
                                         seed=seed * 1_000_003 + step, stop_id=tokenizer.eot_id)
    texts = {}
    for (name, _), ids in zip(SAMPLES, continuations):
        texts[name] = tokenizer.decode(ids)
        shown = " ".join(f"{SAMPLE_PROMPT}{texts[name]}".splitlines())  # one line of plain text
        log(f"  sample ({name}, step {step}): {shown}")
        if metrics is not None:
            metrics.text(f"sample/{name}", f"{SAMPLE_PROMPT}**{texts[name]}**", step)
    return texts


class EvalAccumulator:
    """Token-weighted mean validation loss and expert utilization over evaluation batches."""

    def __init__(self):
        self.loss_sum = 0.0
        self.tokens = 0
        self.experts = ExpertStats()

    def update(self, lm_loss: float, num_tokens: int, expert_counts=None, dropped=None) -> None:
        self.loss_sum += float(lm_loss) * num_tokens
        self.tokens += num_tokens
        if expert_counts is not None:
            self.experts.update(expert_counts, dropped)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")


class Progress:
    """tqdm bar over optimizer steps, showing loss and tokens/s (only on rank 0)."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | lr {lr:.2e}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BestExport:
    """--save_best: the weights of the best evaluation so far, as an export in `DIR/best`
    (`model.safetensors` + `config.json`, canonical names, float32; `generate.py --checkpoint DIR/best`
    and `--init_from` read it). Rewritten atomically whenever the validation loss improves; the step
    and loss ride in the file's metadata, so a resumed run picks up the same best."""

    def __init__(self, out_dir, config, *, enabled: bool, is_main: bool = True, resuming: bool = False):
        self.dir = Path(out_dir) / "best"
        self.config, self.enabled, self.is_main = config, enabled, is_main
        self.val_loss, self.step = math.inf, None
        if enabled and resuming and (self.dir / "model.safetensors").is_file():
            from blues.safetensors_io import read_safetensors

            _, meta = read_safetensors(self.dir / "model.safetensors", verify=False)
            self.val_loss, self.step = float(meta.get("blues.val_loss", "inf")), int(meta.get("blues.step", 0))

    def improved(self, val_loss: float) -> bool:
        """Same answer on every process (they share the validation loss)."""
        return self.enabled and math.isfinite(val_loss) and val_loss < self.val_loss

    def update(self, step: int, val_loss: float, canonical_arrays: Callable[[], dict]) -> bool:
        """Export if `val_loss` beats the best so far. `canonical_arrays` is called on every process
        when it does (a multi-host gather is collective); only the main process writes."""
        if not self.improved(val_loss):
            return False
        arrays = canonical_arrays()
        if self.is_main:
            from blues.safetensors_io import save_export

            save_export(self.dir, arrays, self.config,
                        metadata={"blues.step": str(step), "blues.val_loss": repr(float(val_loss))})
            log(f"step {step}: best validation loss so far; weights exported to {self.dir}")
        self.val_loss, self.step = float(val_loss), step
        return True


class TimeBudget:
    """`--max_minutes`: has this invocation trained for its wall-clock budget? (None = never.)
    Counted from construction, so start-up, compilation, evaluations and checkpoints all count."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else minutes * 60.0
        self.t0 = time.monotonic()

    def expired(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.t0 >= self.seconds


_IMPORTED = time.time()


def seconds_since_start() -> float:
    """Seconds since this process started: on Linux from its start time (/proc/self/stat), so the
    interpreter's start-up and the imports count; elsewhere since this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        if age >= 0:
            return age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return time.time() - _IMPORTED


class StepTimer:
    """tokens/s of each step read: the time since the previous step was read, or since `restart` when
    nothing was in flight (the first step, a step after an evaluation or a checkpoint, which are
    therefore not counted). With a step queued ahead, consecutive reads are one step of device time
    apart, the last step's included; the host's work after a read (logging, the next launch) overlaps
    the queued step and is not subtracted from it."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def tokens_per_s(self, tokens: int) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return tokens / dt if dt > 0 else 0.0


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def summary_line(*, first_step: int, steps: int, elapsed: float, train_loss: float | None, val_loss: float | None,
                 skipped: int, checkpoint, out_dir, best: "BestExport | None" = None) -> str:
    parts = [f"trained {steps - first_step} steps this run (steps {first_step}->{steps}) in {format_duration(elapsed)}"]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.4f}")
    if val_loss is not None and math.isfinite(val_loss):
        parts.append(f"val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 700)):.1f})")
    if skipped:
        parts.append(f"{skipped} non-finite steps skipped")
    if checkpoint is not None:
        parts.append(f"checkpoint {checkpoint}")
    if best is not None and best.step is not None:
        parts.append(f"best val loss {best.val_loss:.4f} (perplexity {math.exp(min(best.val_loss, 700)):.1f}) "
                     f"at step {best.step} in {best.dir}")
    parts.append(f"plots {Path(out_dir) / 'loss.png'}, {Path(out_dir) / 'experts.png'}")
    return "done: " + "; ".join(parts)


def settings_lines(args, *, ranks: int, rank_word: str = "rank", file_sources: dict[str, str] | None = None) -> str:
    """The batch, learning-rate schedule and precision of a run, each with where it came from: 'flag',
    the config file that set it (`file_sources`: {flag: file name}, e.g. ds_config.json) or 'default'
    (blues/train_args.py's DEFAULTS). Two indented lines that follow the trainer's `starting:` line."""
    def src(flag: str) -> str:
        return "flag" if flag in args.explicit else (file_sources or {}).get(flag, "default")

    sequences = args.batch_size * ranks * args.grad_accum
    return (f"  batch: {args.batch_size} sequences per micro-batch per {rank_word} ({src('batch_size')}) x {ranks} "
            f"{rank_word}{'s' if ranks != 1 else ''} x {args.grad_accum} micro-batches accumulated "
            f"({src('grad_accum')}) = a global batch of {sequences} sequences = {sequences * args.seq_len:,} tokens "
            f"per optimizer step\n"
            f"  schedule: lr {args.lr:g} ({src('lr')}), linear warmup over {args.warmup_steps} steps "
            f"({src('warmup_steps')}), cosine decay to {args.min_lr:g} ({src('min_lr')}) at step {args.max_steps} "
            f"({src('max_steps')}); weight decay {args.weight_decay:g} ({src('weight_decay')}), gradient clipping "
            f"{args.grad_clip:g} ({src('grad_clip')}); precision {args.precision} ({src('precision')})")


def invoked_script(script: str) -> str:
    """How to run this trainer again from the same working directory: the script path as it was
    started (`../blues/train_torch.py`), or `script` when it was started some other way."""
    started = sys.argv[0] if sys.argv else ""
    return started if os.path.basename(started) == script else script


def resume_command(script: str, argv: Sequence[str], out_dir) -> str:
    """The command that resumes this run: the same flags with --out_dir DIR --resume auto (paths as the
    user typed them: the command works from the directory the run was started in)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--out_dir"):
            skip = True
            continue
        if a.startswith(("--resume=", "--out_dir=", "--local_rank")):
            continue
        args.append(a)
    return shlex.join(["python", script, *args, "--out_dir", str(out_dir), "--resume", "auto"])


class RunDir:
    """The run's output directory: created on `create()`, removed on failure if it held no checkpoint.

    Use as a context manager around the work; a BluesError (or any exception) before the first
    checkpoint removes a directory this run created, so a failed run leaves nothing behind.
    """

    def __init__(self, path: str | os.PathLike, *, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main  # only rank 0 cleans up
        self.existed = self.path.exists()  # looked at before any rank can have created it
        self.created = False

    def create(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        self.created = self.is_main and not self.existed
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.created:
            ckpts = self.path / "checkpoints"
            if not (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
                shutil.rmtree(self.path, ignore_errors=True)
        return False
