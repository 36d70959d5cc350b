"""The errors this project raises on purpose: a bad config, file, data set or workdir.

`launch.py` prints an `Error` as one line (set ENCODER_JAX_TRACEBACK=1 for the
traceback); any other exception is a bug somewhere and keeps its traceback. Each
class also derives from the builtin a caller would catch, so `except ValueError`,
`except KeyError` or `except FileNotFoundError` keep working in notebooks.
"""

from __future__ import annotations


class Error(Exception):
    """Base of the errors that name a bad field, file or value in one line."""


class ConfigError(Error, ValueError):
    """A config value out of range, inconsistent with another, or of an unknown choice."""


class ConfigKeyError(Error, KeyError):
    """An unknown config key."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(Error, TypeError):
    """A config value of the wrong type."""


class DataError(Error, ValueError):
    """Unreadable, empty or inconsistent data (records, labels, vocabularies, tokenizers)."""


class MissingFileError(Error, FileNotFoundError):
    """A file or directory named by the config or the command line does not exist."""


class NotWritableError(Error, PermissionError):
    """The workdir (or a file in it) cannot be written."""


class NonFiniteError(Error, FloatingPointError):
    """Training produced a non-finite loss, gradient, update or parameter."""


class StorageError(Error, OSError):
    """The disk filled (or a quota was hit) while writing a run's files."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (KeyError's quoting removed)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split("\n"))
