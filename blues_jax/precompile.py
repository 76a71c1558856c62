"""Compiling jitted programs ahead, in a background thread, while other work runs.

train_jax.py compiles its training step here from the train state's shapes while the weights are
drawn (blues_jax.training.plan_train_state), so that tracing, lowering and compiling (or loading
from the persistent cache) overlap the initialisation. It evaluates with two more programs: the
evaluation forward and the one-device forward of the sample continuations. Compiled at the first
evaluation, they would stop training for as long as XLA takes on them (tens of seconds at `bench`
on a GPU); compiled here, beside the first training steps (XLA compiles without holding the GIL),
the first evaluation finds them ready. `jit(f).lower(*abstract).compile()` fills the jitted
function's own cache, so the real call with arrays of those shapes, dtypes and shardings runs the
executable directly (and the persistent compilation cache keeps it for the next run as usual).
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence


class BackgroundCompile:
    """Compiles each (jitted function, abstract arguments) in one background thread, in order.

    A failure here (out of memory during autotuning, say) is dropped: the real call compiles the
    program again in the foreground and reports what is wrong there. `wait()` before the first real
    call, so that a program is never compiled twice at once, and before the process exits (leaving
    a `with` block waits too).
    """

    def __init__(self, jobs: Sequence[tuple[Callable, tuple]]):
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(list(jobs),), name="blues-precompile", daemon=True)
        self._thread.start()

    def _run(self, jobs) -> None:
        for jitted, arguments in jobs:
            try:
                jitted.lower(*arguments).compile()
            except Exception as e:  # noqa: BLE001  (the foreground compile raises it properly)
                first_line = str(e).splitlines()[0] if str(e) else ""
                self.failures.append(f"{getattr(jitted, '__name__', 'a program')}: {type(e).__name__}: {first_line}")

    def wait(self) -> None:
        self._thread.join()

    def __enter__(self) -> "BackgroundCompile":
        return self

    def __exit__(self, *exc) -> None:
        self.wait()
