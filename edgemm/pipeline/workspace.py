"""Where a compile works (scratch space owned by the bundle writer's lock) and how its errors name the
user's files rather than staged ones."""

from __future__ import annotations

import contextlib
import re
import shutil

from ..bundle import STAGING_PREFIX
from ..errors import EdgemmError


_STAGED_PATH = re.compile(r"[^\s'\"(]*" + re.escape(STAGING_PREFIX) + r"[^\s'\")]*")


def name_user_files(exc: EdgemmError, model: str) -> EdgemmError:
    """An error raised on a staged or scratch file names the user's model instead: the staging folder is
    gone by the time the user reads the message."""
    file = exc.file if exc.file and STAGING_PREFIX not in exc.file else (model if exc.file else None)
    detail = _STAGED_PATH.sub("the exported ONNX graph", exc.detail)
    fix = _STAGED_PATH.sub("the exported ONNX graph", exc.fix) if exc.fix else exc.fix
    if (file, detail, fix) == (exc.file, exc.detail, exc.fix):
        return exc
    renamed = type(exc)(detail, file=file, field=exc.field, fix=fix)
    return renamed


@contextlib.contextmanager
def work_dir(writer):
    """Scratch space beside the staging folder, owned by the same lock, so that the sweep of a later
    compile removes it if this one is killed (a TMPDIR folder would leak)."""
    path = writer.sibling("work")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
