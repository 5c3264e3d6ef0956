"""Atomic file writes: a temp file in the target's folder, renamed over the target only on success."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def _default_mode() -> int:
    # mkstemp creates 0600 files; give the result the mode a plain open() would (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Binary handle on a temp file next to ``path``; it replaces ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(payload)
