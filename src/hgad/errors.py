"""Errors that the CLI turns into one line on stderr and exit code 2.

Anything a user can fix (a bad path, a corrupt image, an impossible option) is raised as an
:class:`HgadError`; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["HgadError", "InputError", "ConfigError", "TrainingError", "brief"]

_WORKER_MARK = "in DataLoader worker process"


def brief(err: BaseException, limit: int = 120) -> str:
    """A foreign exception as a short clause of a one-line message: its first non-blank line (or its
    type when it says nothing), cut to ``limit`` characters."""
    lines = [" ".join(ln.split()) for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _worker_line(text: str) -> str | None:
    """The original one-line message inside the traceback text that a DataLoader worker sends back.

    torch re-raises a worker's exception as ``type(err)(text)``, ``text`` being "Caught X in
    DataLoader worker process N. Original Traceback ...", whose last line is "module.X: message".
    """
    if _WORKER_MARK not in text.split("\n", 1)[0]:
        return None
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    head, sep, message = last.partition(": ")
    return message if sep and head.rsplit(".", 1)[-1].endswith("Error") else last


class HgadError(Exception):
    """Base class of user-facing errors; ``str(err)`` is the whole one-line message."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):  # one line even when re-raised from a worker
            args = (_worker_line(args[0]) or args[0],)
        super().__init__(*args)


class InputError(HgadError):
    """A file or folder given by the user is missing, unreadable or malformed."""

    def __init__(self, path: str | PathLike[str], problem: str | None = None) -> None:
        if problem is None:  # re-raised from a DataLoader worker: keep its one line (see _worker_line)
            text = _worker_line(str(path)) or str(path)
            self.path, _, self.problem = text.partition(": ")
            super().__init__(text)
            return
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(HgadError):
    """An option or config value is out of range or inconsistent."""

    def __init__(self, option: str, problem: str | None = None) -> None:
        if problem is None:  # re-raised from a DataLoader worker: keep its one line (see _worker_line)
            text = _worker_line(option) or option
            self.option, _, self.problem = text.partition(": ")
            super().__init__(text)
            return
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")


class TrainingError(HgadError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""
