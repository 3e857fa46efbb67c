"""Errors the library raises and the exit codes the CLI maps them to.

The library never prints or exits: it raises ``MedclfError`` (one line, naming the file) and the
CLI turns it into a message and an exit code.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Documented process exit codes (README, "Exit codes")."""

    OK = 0  #: everything succeeded
    ERROR = 1  #: nothing was done: bad argument, missing path, conflicting cache, ...
    USAGE = 2  #: the command line itself is wrong (Typer/Click's own code)
    PARTIAL = 3  #: the work was done, but some inputs failed (listed in errors.jsonl / on stderr)


class MedclfError(Exception):
    """A user-facing error: a one-line message, optionally naming the file it is about."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ReadError(MedclfError):
    """An input file could not be read or used (corrupt, unsupported, wrong shape, ...)."""
