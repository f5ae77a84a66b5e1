"""The ``hgad`` command line: demo-data, train, test, predict, threshold, info, ablate, export.

One module per command, each with ``add_parser(subparsers)`` and ``run(args) -> int``; shared
arguments live in :mod:`hgad.cli.common`. Building the parser imports no torch, so ``--help`` and
argument errors answer at once; a command imports what it needs when it runs.

User mistakes (paths, options, corrupt files) end with one line on stderr and exit code 2; only bugs
show a traceback. Long work shows progress bars on stderr; results go to stdout and files.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from hgad.cli import ablate, demo_data, export, info, predict, test, threshold, train
from hgad.cli.common import Parser, add_config_flags, add_dataset_args, add_settings_args, resolve_config
from hgad.errors import HgadError
from hgad.version import __version__

__all__ = ["main", "build_parser", "add_config_flags", "add_dataset_args", "add_settings_args", "resolve_config"]

# in the order `hgad --help` lists them
_COMMANDS = (demo_data, train, test, predict, threshold, info, ablate, export)


def build_parser() -> argparse.ArgumentParser:
    """The ``hgad`` parser with one sub-parser per command (its ``command`` is the command's name)."""
    p = Parser(prog="hgad", description="Unified multi-class visual anomaly detection with hierarchical "
               "Gaussian-mixture normalizing flows (HGAD, ECCV 2024).")
    p.add_argument("--version", action="version", version=f"hgad {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in _COMMANDS:
        command.add_parser(sub)
    return p


def _close_progress_bars() -> None:
    """Close bars an error left open, so the error gets a line of its own (not glued to, then wiped by, a bar)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured by a test)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code says how it went (0 ok, 1 some inputs failed, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    run = {command.NAME: command.run for command in _COMMANDS}[args.command]
    try:
        rc = run(args)
        sys.stdout.flush()  # inside the try: a reader that left shows up here, not at interpreter exit
        return rc
    except BrokenPipeError:  # `hgad info RUN | head`: the reader left, nothing more to say
        _silence_stdout()
        return 0
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        _close_progress_bars()  # a write outside hgad.io failed for lack of space or a broken disk
        where = f"{err.filename}: " if err.filename else ""
        print(f"hgad {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except HgadError as err:
        _close_progress_bars()
        print(f"hgad {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"hgad {args.command}: interrupted", file=sys.stderr)
        return 130
