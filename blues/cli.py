"""How every entry point fails: one clear line, the right exit status, no traceback.

`run_main(main)` runs `main(argv)` and turns the project's user-facing errors into one line on
stderr with exit status 1 (2 for usage errors, as argparse does). `--debug` anywhere on the command
line lets the traceback through instead. `ArgumentParser` is argparse with its usage errors turned into
that one line.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from blues.errors import BluesError, UsageError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int = EXIT_RUNTIME, *, prog: str | None = None) -> int:
    prog = prog or _prog()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line and exit 2 through `run_main`) instead of printing its
    usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None, *,
             prog: str | None = None) -> int:
    """`prog`: the name the error line starts with (default: the script's file name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv) or EXIT_OK
    except BluesError as e:
        if debug:
            raise
        return fail(str(e), e.exit_code, prog=prog)
    except KeyboardInterrupt:
        if debug:
            raise
        return fail("interrupted", EXIT_INTERRUPTED, prog=prog)
    except MemoryError:
        if debug:
            raise
        return fail("out of memory; try a smaller --batch_size or preset", prog=prog)


def _prog() -> str:
    import os
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "blues"
