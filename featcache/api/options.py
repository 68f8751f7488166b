"""What the command-line options become in the API: option values set, exclude files, name lists."""
from __future__ import annotations

import os


def exclude_file(exclude):
    """The --exclude file's paths left out of every feature set while a command runs."""
    from ..cache.exclude import excluding, read_exclude

    return excluding(read_exclude(os.fspath(exclude)) if exclude is not None else ())

def name_list(value) -> list[str]:
    """Comma-separated text or a list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]

# Options whose False is a choice (--no-standardize), not a flag left off.
SWITCHES = ("standardize",)

def given_options(**options) -> dict:
    """The options that were set: None (the head's default) and False (a flag off) are dropped."""
    return {k: v for k, v in options.items() if v is not None and (v is not False or k in SWITCHES)}
