"""Helpers of the reliability suite: run the CLI, read what a terminal would show, snapshot folders,
and write the kinds of broken files users actually feed a tool.

Kept free of pytest fixtures on purpose (a second conftest.py here would shadow ``tests/conftest.py``
under pytest's default import mode); test modules import these functions directly.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SRC", "run_cli", "run_process", "command", "process_env", "visible_lines", "assert_user_error",
           "snapshot", "changes", "Booby", "write_booby_pickle", "write_corrupt", "write_truncated",
           "write_zero_byte", "write_text_as", "rgb_array"]

SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(argv: Sequence[object], capsys) -> tuple[int, str, str]:
    """``hgad ARGV`` in this process: (exit code, stderr, stdout); argparse errors come back as their code."""
    from hgad.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage errors exit with 2
        rc = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def run_process(argv: Sequence[object], *, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m hgad ARGV`` as a separate process; stdout/stderr decoded with carriage returns kept
    (``text=True`` would turn a progress bar's ``\\r`` into line breaks)."""
    proc = subprocess.run(command(argv), capture_output=True, timeout=timeout, env=process_env())
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def command(argv: Sequence[object]) -> list[str]:
    return [sys.executable, "-m", "hgad", *map(str, argv)]


def process_env() -> dict[str, str]:
    """This environment with ``src`` importable (the suite also runs from a checkout without an install)."""
    paths = [str(SRC), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def visible_lines(stderr: str) -> list[str]:
    """The non-blank lines a terminal would show: in each line, what follows its last carriage return."""
    return [seg.rsplit("\r", 1)[-1] for seg in stderr.split("\n") if seg.rsplit("\r", 1)[-1].strip()]


def assert_user_error(rc: int, stderr: str, mentions: Sequence[object]) -> str:
    """Exit code 2, exactly one visible line on stderr, no traceback, every ``mentions`` item named in it."""
    lines = visible_lines(stderr)
    assert "Traceback" not in stderr, stderr
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("hgad") and ": error: " in line, line
    for item in mentions:
        assert str(item) in line, (str(item), line)
    return line


def snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``roots`` (the roots included) -> (is folder, size, modification time)."""
    state: dict[str, tuple[bool, int, int]] = {}
    for root in map(Path, roots):
        if not root.exists():
            continue
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            state[str(p)] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return state


def changes(before: dict, after: dict) -> list[str]:
    """Paths created, removed or modified between two snapshots (folder mtimes ignored: reads touch none,
    but a created-then-removed temp file does)."""
    out = [f"new {p}" for p in after if p not in before] + [f"gone {p}" for p in before if p not in after]
    out += [f"changed {p}" for p in before if p in after and not after[p][0] and before[p] != after[p]]
    return sorted(out)


class Booby:
    """Unpickling this creates ``marker``: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_booby_pickle(path: Path, marker: Path) -> Path:
    """A torch-style pickle (zip archive, like ``torch.save``) of a state dict holding a :class:`Booby`."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": Booby(marker)}, path)
    return path


def rgb_array(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb_array(seed)).save(buf, format="PNG")
    return buf.getvalue()


def write_corrupt(path: Path) -> Path:
    """A PNG signature followed by garbage."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(7).bytes(600))
    return path


def write_truncated(path: Path) -> Path:
    """A valid PNG cut in the middle of its pixel data."""
    data = _png_bytes(3)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text_as(path: Path) -> Path:
    """A text file with an image extension."""
    path.write_text("this is a note, not a picture\n")
    return path
