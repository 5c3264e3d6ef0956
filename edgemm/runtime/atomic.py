"""Atomic file writes that leave nothing behind. Standard library only (runs on devices).

A file is written to a temp file in its own folder, then renamed over the target (os.replace), so a
reader sees the old file or the whole new one, never half of it. The temp file is removed on any
exception (SIGTERM is turned into one by the CLI). A SIGKILL cannot be caught, so the writer also holds
an exclusive ``flock`` on its temp file while it writes: the next atomic write into the same folder
removes every edgemm temp file whose lock it can take, which proves that its writer is gone (a live
writer in another process, container or PID namespace holds its lock). Process ids are not used to
decide anything: they are reused, and two containers sharing a volume see different ones.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, so nothing is ever swept (a stale temp file is only clutter)
    fcntl = None

# ".<target name>.<pid>-<8 hex>.tmp": the pid only makes names unique and tells a reader who wrote it.
TEMP_NAME = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def create_temp_beside(path: Path) -> tuple[int, Path]:
    """A new, uniquely named temp file in ``path``'s folder, opened for writing and locked: (fd, path).
    Created exclusively (never an existing file or link) with the mode open() would give (0666 minus
    the umask), so a rename over ``path`` keeps files as readable as a plain write would. The lock lasts
    until the descriptor is closed; keep it open until the temp file has been renamed or removed."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        # A sweep in another process may have locked and removed the file between open and flock:
        # then the name no longer leads to this descriptor's file, and a fresh name is tried.
        if _try_lock(fd) and _same_file(tmp, fd):
            return fd, tmp
        os.close(fd)
    raise FileExistsError(f"no free temp name beside {path}")


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def sweep_abandoned_temps(folder: Path) -> list[Path]:
    """Remove edgemm temp files in ``folder`` whose writer is gone (their lock can be taken); returns
    what was removed. Files of live writers, other names, links and folders are left alone."""
    removed = []
    if fcntl is None:
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    for entry in entries:
        if not TEMP_NAME.match(entry.name):
            continue
        try:
            fd = os.open(entry.path, flags)
        except OSError:  # gone already, a link (ELOOP), no permission
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and _try_lock(fd) and _same_file(Path(entry.path), fd):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextmanager
def atomic_open(path: os.PathLike, *, mode: int | None = None, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary handle on a locked temp file beside ``path``; when the block succeeds the file replaces
    ``path`` (a symbolic link at ``path`` is replaced itself, never its target). On any failure the temp
    file is removed. ``mode``: permission bits for the result (default: what open() would give);
    ``fsync``: flush to the disk before the rename (files a device must find whole after a power loss)."""
    path = Path(path)
    sweep_abandoned_temps(path.parent)
    fd, tmp = create_temp_beside(path)
    handle = os.fdopen(fd, "wb")
    try:
        try:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        handle.close()  # releases the lock, after the rename: a sweep never sees an unlocked temp file


def write_bytes_atomic(path: os.PathLike, data: bytes, *, mode: int | None = None, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path, mode=mode, fsync=fsync) as f:
        f.write(data)


def write_text_atomic(path: os.PathLike, text: str, *, mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_json_atomic(path: os.PathLike, data: dict) -> None:
    write_bytes_atomic(Path(path), (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))
