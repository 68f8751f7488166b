"""Errors that mean "the user asked for something that cannot be done": the CLI prints them
as one line (no traceback unless --debug)."""


class FeatcacheError(Exception):
    """A user-facing error; its message names the file or option and the reason."""
