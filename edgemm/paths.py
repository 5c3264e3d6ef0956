"""Checks on the paths users hand to edgemm. Standard library only (the runtime's data loading uses it).

Every input file is opened only after ``require_regular_file`` has checked that it is a regular file:
opening a named pipe (FIFO) blocks until a writer appears, so ``--calib fifo.npz`` would hang forever,
and character devices (``/dev/zero``) never end."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def describe_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def require_regular_file(path, *, field: str | None = None, allow_dir: bool = False,
                         fix: str | None = None) -> Path:
    """Return ``path`` if it names (after following symbolic links) a regular file, or a folder when
    ``allow_dir``; otherwise raise a one-line InputError naming the file and ``field``."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows symbolic links: a link to a FIFO is a FIFO
    except FileNotFoundError:
        raise InputError("no such file" + (" or folder" if allow_dir else ""), file=path, field=field,
                         fix="check the path") from None
    except (OSError, ValueError) as exc:  # permission denied, a link loop, a name too long, a NUL byte
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"cannot be read ({reason})", file=path, field=field,
                         fix="check the path and its permissions") from exc
    if stat.S_ISREG(st.st_mode) or (allow_dir and stat.S_ISDIR(st.st_mode)):
        return path
    what = "a regular file or a folder" if allow_dir else "a regular file"
    raise InputError(f"is {describe_kind(st.st_mode)}, not {what}", file=path, field=field,
                     fix=fix or "pass a regular file (not a pipe, device or socket)")


def is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (both already resolved)."""
    return path == folder or folder in path.parents


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, innermost first (to remove again on failure)."""
    return [p for p in [folder, *folder.parents] if not os.path.lexists(p)]


def remove_made_folders(folders) -> None:
    """Remove folders ``missing_folders`` listed, innermost first; stops at the first one not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break
