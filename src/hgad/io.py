"""Atomic file writes: a reader never sees a half-written checkpoint, cache or report.

Every writer goes through a temporary file in the destination folder followed by ``os.replace``,
which is atomic on POSIX and Windows for paths on the same file system.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from hgad.errors import InputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_save_tensors", "write_error", "in_final_place", "is_hgad_temporary", "whole_folder",
           "folder_beside", "replace_folder", "FolderLock", "check_writable", "check_output_folder"]


def write_error(path: str | os.PathLike[str], err: OSError) -> InputError:
    """A one-line error for a failed write (disk full, read-only, quota...), naming the file."""
    reason = err.strerror or (errno.errorcode.get(err.errno, "") if err.errno else "") or str(err)
    return InputError(path, f"cannot write: {reason}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions a plain open() would
    except OSError as err:
        raise write_error(dest, err) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except OSError as err:  # disk full, quota, I/O error: one line naming the file, the old file kept
        raise write_error(dest, err) from None
    finally:
        try:
            tmp_path.unlink(missing_ok=True)
        except OSError:
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Sorted, indented JSON written with :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors (never pickle), atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def in_final_place(err: InputError, work: str | os.PathLike[str], dest: str | os.PathLike[str]) -> InputError:
    """``err`` about a file in the temporary folder ``work``, reworded to name the file in ``dest``."""
    try:
        rel = Path(err.path).relative_to(Path(work))
    except ValueError:
        return err
    return InputError(Path(dest) / rel, err.problem)


def is_hgad_temporary(name: str) -> bool:
    """Names of what an interrupted hgad write leaves behind: ``.X.tmp`` files, ``.X.tmp-*`` folders."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def folder_beside(dest: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A new empty hidden folder next to ``dest`` (same file system, so it can be renamed onto it)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{tag}-", dir=dest.parent))
    except OSError as err:
        raise write_error(dest, err) from None


def replace_folder(new: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Put the complete folder ``new`` at ``dest``: the old ``dest`` is renamed aside, ``new`` renamed in,
    then the old one deleted. A reader sees the old folder or the new one, never a mix of both."""
    new, dest = Path(new), Path(dest)
    old = None
    try:
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / dest.name)
        os.rename(new, dest)
    except OSError as err:
        if old is not None and (old / dest.name).exists() and not dest.exists():
            os.rename(old / dest.name, dest)  # put the old folder back
        raise write_error(dest, err) from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def whole_folder(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new folder beside ``dest`` to write into; on success it replaces ``dest`` as a whole.

    On any failure the partial folder is removed and ``dest`` stays as it was; an error about a file
    in the partial folder is reworded to name the file's final place.
    """
    work = folder_beside(dest)
    try:
        yield work
        replace_folder(work, dest)
    except InputError as err:
        shutil.rmtree(work, ignore_errors=True)
        raise in_final_place(err, work, dest) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


class FolderLock:
    """An advisory lock (``fcntl.flock``) on ``.NAME.lock`` next to the folder ``NAME``.

    Beside the folder, not in it, so that replacing the whole folder (``replace_folder``) keeps it
    locked. The file holds the holder's pid; it is removed on release. The kernel drops the lock of a
    killed process, so a stale file never blocks anyone. Where flock is unavailable (Windows) nothing
    is locked.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise InputError at once when another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path, err) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise write_error(self.path, err) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise InputError(self.folder, f"in use by {who} (lock {self.path}); wait for it to finish "
                                              "or stop it") from None
            try:  # the previous holder may have removed the file between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (a no-op when it is not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a newcomer creates a new file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_writable(folder: str | os.PathLike[str]) -> None:
    """InputError unless ``folder`` is, or can be created as, a folder we can write in (creates nothing)."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(probe, "is a file, not a folder" if probe == Path(folder)
                         else "is a file, cannot create the output folder in it")
    try:  # a real write (an unnamed temporary file): permission bits say nothing for root or /proc
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise InputError(probe, f"output folder is not writable ({err.strerror or type(err).__name__})") from None


def check_output_folder(out: str | os.PathLike[str], known: frozenset[str], what: str) -> None:
    """An existing output folder is replaced only when it is empty or holds nothing but ``known`` entries
    (what hgad writes there, and hidden temporary files): never a folder of the user's."""
    out = Path(out)
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if entry.name not in known and not is_hgad_temporary(entry.name):
            raise InputError(out, f"exists and is not a {what} folder (it holds {entry.name!r}); it would be "
                                  "replaced as a whole: choose another --out or empty it")
