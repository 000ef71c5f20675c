"""The exceptions cdka raises; the CLI maps each to one line on stderr and an exit code."""

from __future__ import annotations


def first_line(text: str, limit: int = 200) -> str:
    """The first line of ``text``, at most ``limit`` characters."""
    text = text.strip()
    first = text.splitlines()[0].strip() if text else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a third-party exception's message, at most ``limit`` characters, for the
    one ``error:`` line cdka prints (many libraries put a whole explanation in their messages)."""
    first = first_line(str(exc), limit)
    return first_line(f"{exc.__class__.__name__}: {first}", limit) if first else exc.__class__.__name__


class CdkaError(Exception):
    """Base of every error cdka reports to a user. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BudgetError(CdkaError, ValueError):
    """A budget that cannot be parsed or cannot be met."""

    exit_code = 2


class ModelSourceError(CdkaError, ValueError):
    """A model name, folder or file that cannot be read into a ModelSpec."""

    exit_code = 3


class TargetError(CdkaError, ValueError):
    """A target selection that matches nothing, or a shape no adapter fits."""

    exit_code = 4


class PlanError(CdkaError, ValueError):
    """A plan document that is malformed or does not match its model."""

    exit_code = 5


class ReferenceFileError(CdkaError, ValueError):
    """A reference-update file or probe input that is missing, corrupt or mismatched."""

    exit_code = 6


class SweepError(CdkaError, RuntimeError):
    """A sweep that cannot start or continue (storage, study, task)."""

    exit_code = 7


class ExportError(CdkaError, ValueError):
    """A plan that the chosen export target cannot express."""

    exit_code = 8


class DataError(CdkaError, ValueError):
    """A local data file (.txt, .jsonl, .json) that is missing, empty, too large or malformed, or a record in it."""

    exit_code = 9


class OutputError(CdkaError, OSError):
    """An output file that cannot be written (a folder, a missing or read-only location)."""

    exit_code = 10


class ArgumentError(CdkaError, ValueError):
    """A command-line option or API argument outside its documented range (a seed, --top, --batches)."""

    exit_code = 11


class ConfigError(ModelSourceError):
    """A config.json field that is missing, of the wrong type, out of range, or not understood."""


class CdkaWarning(UserWarning):
    """A diagnostic that does not stop the work (an adapter that will not train); the CLI prints it as
    one ``warning:`` line on stderr."""
