"""Timers and peak-memory readers for both frameworks.

Device work is asynchronous, so every timed region is bracketed by a device synchronisation
(`torch.cuda.synchronize` / `jax.block_until_ready`) and read on the host clock. Warm-up steps
(compilation, autotuning, allocator growth, cuBLAS handle creation) are run first and excluded; the
reported time is the median of the timed steps, which a single slow step (a GC pause, a page
fault) does not move.

Peak memory: PyTorch's caching allocator keeps a resettable high-water mark
(`torch.cuda.max_memory_allocated`). JAX's `device.memory_stats()['peak_bytes_in_use']` cannot be
reset within a process, so `PeakMemory` for JAX remembers the peak at `reset()` and reports a
section's peak exactly only when the section raised it (otherwise it reports an upper bound and
says so). The bench runs each section in its own process on the GPU (scripts/gpu_bench.sh), where
the two are the same. On a CPU neither framework reports device memory: the reader returns None.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GIB = 1024 ** 3

_T0 = time.perf_counter()


def log(message: str) -> None:
    """Progress line with the seconds since the bench started; flushed so a partial log is useful."""
    print(f"[bench +{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


# ---- synchronisation -------------------------------------------------------------------------------

def torch_sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def jax_sync(tree) -> None:
    import jax
    jax.block_until_ready(tree)


# ---- step timing -----------------------------------------------------------------------------------

@dataclass
class StepTimes:
    warmup_s: list[float] = field(default_factory=list)  # per warm-up step (compile included)
    times_s: list[float] = field(default_factory=list)  # per timed step

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed steps: how much to trust a difference between runs."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.times_s else float("nan")

    def summary(self) -> str:
        return (f"median {self.median_s * 1e3:.2f} ms over {len(self.times_s)} steps "
                f"(spread {self.spread:.1%}; first warm-up {self.warmup_s[0]:.2f} s)" if self.warmup_s else
                f"median {self.median_s * 1e3:.2f} ms over {len(self.times_s)} steps (spread {self.spread:.1%})")


def time_steps(step: Callable[[], object], sync: Callable[[object], None], *, warmup: int, steps: int,
               label: str = "", after_warmup: Callable[[], None] | None = None, reps: int = 1) -> StepTimes:
    """Run `step` warmup + steps times; each call is timed on the host clock between two syncs.

    `step()` returns whatever must be complete before the step counts as done (a loss tensor,
    a pytree of arrays); `sync(result)` waits for it; `after_warmup()` runs once between warm-up
    and timing. Syncing every step costs one launch latency per step (microseconds against the
    tens of milliseconds of a training step) and makes the time of each step its own, so the
    median means something. For kernels of a millisecond or so that latency is a few percent:
    `reps` > 1 runs `step` that many times back to back per timed sample (the device queue stays
    full) and records the mean of the sample.
    """
    if steps < 1 or reps < 1:
        raise ValueError("steps and reps must be at least 1")
    out = StepTimes()
    sync(None)
    for i in range(warmup + steps):
        if i == warmup and after_warmup is not None:
            after_warmup()
        n = 1 if i < warmup else reps
        t0 = time.perf_counter()
        for _ in range(n):
            result = step()
        sync(result)
        dt = (time.perf_counter() - t0) / n
        (out.warmup_s if i < warmup else out.times_s).append(dt)
        if label and (i < warmup or i == warmup + steps - 1):
            log(f"  {label}: {'warm-up' if i < warmup else 'timed'} step {i + 1}/{warmup + steps}: {dt * 1e3:.1f} ms"
                + (f" (mean of {n} back to back)" if n > 1 else ""))
    return out


# ---- peak memory -----------------------------------------------------------------------------------

@dataclass
class MemoryReading:
    peak_bytes: int | None  # None: the device reports no memory statistics (CPU)
    exact: bool  # False: an upper bound (JAX, when the section did not raise the process peak)
    source: str

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / GIB


class PeakMemory:
    """Peak device memory of one section. `reset()` at its start, `read()` at its end."""

    def __init__(self, framework: str, device=None):
        self.framework = framework
        self.device = device
        self._floor: int | None = None
        self._base: int | None = None

    def _jax_stats(self) -> dict | None:
        import jax
        dev = self.device if self.device is not None else jax.devices()[0]
        try:
            return dev.memory_stats()
        except Exception:  # some backends raise instead of returning None
            return None

    def current_bytes(self) -> int | None:
        if self.framework == "torch":
            import torch
            if self.device is None or torch.device(self.device).type != "cuda":
                return None
            return torch.cuda.memory_allocated(self.device)
        stats = self._jax_stats()
        return None if not stats else stats.get("bytes_in_use")

    def reset(self) -> None:
        if self.framework == "torch":
            import torch
            if self.device is not None and torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            stats = self._jax_stats()
            self._floor = None if not stats else stats.get("peak_bytes_in_use")
        self._base = self.current_bytes()

    @property
    def base_bytes(self) -> int | None:
        """Bytes in use at reset(): what the section found already allocated."""
        return self._base

    def read(self) -> MemoryReading:
        if self.framework == "torch":
            import torch
            if self.device is None or torch.device(self.device).type != "cuda":
                return MemoryReading(None, False, "cpu: not measured")
            torch.cuda.synchronize(self.device)
            return MemoryReading(torch.cuda.max_memory_allocated(self.device), True, "torch.cuda.max_memory_allocated")
        stats = self._jax_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return MemoryReading(None, False, "cpu: not measured")
        peak = stats["peak_bytes_in_use"]
        exact = self._floor is None or peak > self._floor
        return MemoryReading(peak, exact, "jax peak_bytes_in_use" + ("" if exact else " (upper bound: set earlier in this process)"))


def xla_memory_bytes(compiled) -> int | None:
    """XLA's own plan for one compiled function: arguments + outputs + temporaries - aliased
    (donated) bytes. Available on every backend, CPU included; a planning figure, not a reading."""
    try:
        ma = compiled.memory_analysis()
    except Exception:
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)


def xla_temp_bytes(compiled) -> int | None:
    """XLA's scratch plan for one compiled function (arguments and outputs excluded): the working
    memory it needs beyond what goes in and comes out."""
    try:
        ma = compiled.memory_analysis()
    except Exception:
        return None
    return None if ma is None else int(ma.temp_size_in_bytes)
