"""Errors that mean "the user asked for something that cannot work": shown as one line, no traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(ValueError):
    """Bad input from the user (a name, a path, a config value); the message says how to fix it."""


class RunFailed(RuntimeError):
    """A run the user asked for failed after it started (a model of a comparison); its reports say why."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``error:`` line and exit status 2, like every other usage error.

    argparse's own ``error`` prints the whole usage block first, which buries the line that matters.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
