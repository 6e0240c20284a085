"""Atomic file writes: a crash leaves the old file or the new one, never half of one, and the
temporary files of writers killed mid-write do not pile up.

A temporary file is named ``.<name>.<pid>-<host>.<random>.tmp`` beside its target; each write
first deletes those of the same target, written on this host, whose process is dead.

Example:
    >>> import os, tempfile
    >>> from models.training.atomic import write_json
    >>> path = os.path.join(tempfile.mkdtemp(), "result.json")
    >>> write_json(path, {"auroc": 0.9})
    >>> open(path).read()
    '{"auroc": 0.9}'
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from typing import IO, Any, Callable, Iterator, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temporaries(path: PathLike) -> list[str]:
    """Deletes the temporary files of :func:`atomic_write` to ``path`` whose writer is dead.

    Only files of this writer's naming pattern for this very path, written on this host, by a
    process that no longer exists: a live writer's file is never touched. Returns their paths.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX (it kills on Windows)
        return []
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)-{re.escape(_host())}\.\w+\.tmp")
    removed = []
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another writer removed it first
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


class WriteError(OSError):
    """A file could not be written (a full disk, a file-size limit, no permission); the file it
    was to replace is left as it was. The message names the file and the cause."""


class _WatchedWriter(io.BufferedWriter):
    """A binary file that keeps its first failed write: writers such as ``torch.save`` swallow the
    ``OSError`` of a full disk into a message that names neither the file nor the cause."""

    error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write(path: PathLike, write: Callable[[IO], None], binary: bool = True) -> None:
    """Writes a file through ``write(f)`` atomically: a crash leaves the old file or the new one.

    The data goes to a temporary file in the same folder (so that ``os.replace`` is a rename
    within one file system), named ``.<name>.<pid>-<host>.<random>.tmp``, is flushed to disk,
    given the permissions a plain ``open`` would give, then replaces ``path``. Temporary files of
    killed earlier writers are removed first. A failed write raises :class:`WriteError`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}-{_host()}.",
                               suffix=".tmp", dir=folder)
    watched = _WatchedWriter(io.FileIO(fd, "w"))
    try:
        with watched if binary else io.TextIOWrapper(watched, encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(watched.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        cause = watched.error or e
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            kept = "the previous file is kept as it was" if os.path.exists(path) else "nothing was written"
            raise WriteError(cause.errno, f"cannot write {path}: {cause.strerror or cause}; {kept}") from e
        raise


def write_json(path: PathLike, payload: Any, indent: Optional[int] = None) -> None:
    """Writes ``payload`` atomically: a reader never sees half a file, a crash never loses the old one."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=indent), binary=False)


def write_bytes(path: PathLike, data: bytes) -> None:
    """``data`` as the file ``path``, written atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def write_npz(path: PathLike, **arrays: np.ndarray) -> None:
    """``arrays`` as one compressed ``.npz``, written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_folder(out: PathLike) -> Iterator[str]:
    """A folder of files written together: yields an empty temporary folder beside ``out`` to
    write into. When the block succeeds, the temporary folder becomes ``out`` in one rename, all or
    nothing. Where ``out`` exists already, its files are replaced one by one by those of the same
    names, the ``.json`` ones last, so that a reader who finds the description finds what it
    describes; a failure during those renames can leave some replaced, and files of other names
    stay. When the block fails, the temporary folder is removed and ``out`` is left as it was."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.{os.getpid()}-{_host()}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; ``out`` gets a plain mkdir's permissions
        if not os.path.exists(out):
            os.rename(tmp, out)
            return
        for name in sorted(os.listdir(tmp), key=lambda name: name.endswith(".json")):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
