"""User-facing errors: every entry point prints one line for these and exits non-zero."""


class BluesError(Exception):
    """A problem the user can fix (bad input, bad flag, bad file). Printed as one line."""

    exit_code = 1


class UsageError(BluesError):
    """A bad command-line value; exit status 2 like argparse."""

    exit_code = 2


class ConfigError(BluesError):
    """An invalid configuration value; the message names the field."""


class DataError(BluesError):
    """Unreadable or unusable training/evaluation data; the message names the file."""


class CheckpointError(BluesError):
    """A checkpoint that is missing, damaged, of the wrong kind or of another config."""


class NotACheckpoint(CheckpointError):
    """A path that names no Blues checkpoint at all (missing, or something else): bad input, exit 2."""

    exit_code = 2
