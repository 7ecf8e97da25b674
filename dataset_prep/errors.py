"""Errors a user can fix (missing file, bad line, no network): shown as one line, never a traceback."""

from __future__ import annotations

from recbole_speeder.errors import UsageError


class DatasetPrepError(UsageError):
    """The dataset cannot be prepared; the message says which file to place where or what to change."""


class MalformedLineError(DatasetPrepError):
    """A raw line that cannot be parsed, raised only with ``on_error="raise"``."""
