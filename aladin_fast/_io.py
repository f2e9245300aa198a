"""Small file helpers shared by the modules that write results."""
from __future__ import annotations

import os
import uuid
from typing import BinaryIO, Callable

__all__ = ["fsync_path", "write_atomic", "write_text_atomic"]


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: ``write(handle)`` fills a temporary file in the same folder (binary), which is
    fsynced and then ``os.replace``d over ``path``, and the folder fsynced, so a crash or an interrupt leaves the
    previous file or the new one, never a truncated one. Creates the folder. The temporary name is unique and
    opened with "x" (not mkstemp: its 0600 mode would make the file unreadable to the rest of a team)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_path(folder, directory=True)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """:func:`write_atomic` of ``text`` (UTF-8). A symlink is written through (its target replaced), as
    ``open(path, "w")`` did."""
    data = text.encode("utf-8")
    write_atomic(os.path.realpath(os.fspath(path)), lambda handle: handle.write(data))


def fsync_path(path: str, directory: bool = False) -> None:
    """fsync a file, or with ``directory`` a folder (so a rename in it is durable); best effort where refused."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
