"""Errors that mean "the user asked for something that cannot work": shown as one line, no traceback."""


class UsageError(ValueError):
    """Bad input from the user (a name, a path, a config value); the message says how to fix it."""
