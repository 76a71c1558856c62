"""How every entry point fails: one clear line, the right exit status, no traceback.

`run_main(main)` runs `main(argv)` and turns the project's user-facing errors into one line on
stderr with exit status 1 (2 for usage errors, as argparse does). `--debug` anywhere on the command
line lets the traceback through instead.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from blues.errors import BluesError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int = EXIT_RUNTIME, *, prog: str | None = None) -> int:
    prog = prog or _prog()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv) or EXIT_OK
    except BluesError as e:
        if debug:
            raise
        return fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        return fail("interrupted", EXIT_INTERRUPTED)
    except MemoryError:
        if debug:
            raise
        return fail("out of memory; try a smaller --batch_size or preset")


def _prog() -> str:
    import os
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "blues"
