"""Errors shared by every stage, each with the exit code the `greymesh` command gives it.

A message always says what was wrong and what to do; the CLI prints it as it is.
"""

from __future__ import annotations


class GreymeshError(Exception):
    """Something could not be done at run time (exit code 1)."""

    exit_code = 1
    prefix = "error"


class InputError(GreymeshError):
    """Input was refused: a file, field or value is wrong (exit code 2); nothing changed."""

    exit_code = 2
    prefix = "refused"


class NotRunning(GreymeshError):
    """The component asked for is not running in that data dir."""
