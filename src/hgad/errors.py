"""Errors that the CLI turns into one line on stderr and exit code 2.

Anything a user can fix (a bad path, a corrupt image, an impossible option) is raised as an
:class:`HgadError`; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["HgadError", "InputError", "ConfigError", "TrainingError"]


class HgadError(Exception):
    """Base class of user-facing errors; ``str(err)`` is the whole one-line message."""

    exit_code = 2


class InputError(HgadError):
    """A file or folder given by the user is missing, unreadable or malformed."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(HgadError):
    """An option or config value is out of range or inconsistent."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")


class TrainingError(HgadError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""
