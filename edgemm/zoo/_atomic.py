"""Atomic file writes for the zoo: the runtime's (a locked temp file in the target's folder, renamed over
the target only on success; abandoned temp files of killed writers are swept by the next write)."""

from __future__ import annotations

from ..runtime.atomic import atomic_open, write_bytes_atomic

__all__ = ["atomic_open", "atomic_write_bytes"]

atomic_write_bytes = write_bytes_atomic
