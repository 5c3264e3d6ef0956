"""Writing bundles atomically: everything goes into a hidden staging folder beside the destination,
the manifest (with every file's sha256) is written last, and the folder is renamed into place. A
killed compile leaves only a staging folder, which never loads as a bundle and is swept next time."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import InputError
from .runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, UNHASHED, sha256_file, write_json_atomic

STAGING_PREFIX = ".edgemm-staging-"
_STAGING_PID = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(parent: Path) -> None:
    """Remove staging folders left by compiles that were killed."""
    if not parent.is_dir():
        return
    for entry in parent.glob(STAGING_PREFIX + "*"):
        # Staging folders are "<prefix><pid>-<random>" and old bundles set aside "<prefix><pid>-old-<name>".
        match = _STAGING_PID.match(entry.name)
        if match is None:
            continue
        if not _pid_alive(int(match.group(1))) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


class BundleWriter:
    """Context manager: ``with BundleWriter(dest, force) as w: w.stage / files...; w.commit(manifest)``."""

    def __init__(self, destination: Path, *, force: bool = False):
        self.destination = Path(destination)
        self.force = force
        self.stage: Path | None = None
        self.committed = False
        self._made_parents: list[Path] = []

    def __enter__(self) -> "BundleWriter":
        if self.destination.exists() and not self.force:
            raise InputError("already exists", file=self.destination,
                             fix="pass --force to replace it, or choose another -o")
        if self.destination.exists() and not self.destination.is_dir():
            raise InputError("exists and is not a folder", file=self.destination, fix="choose another -o")
        parent = self.destination.parent
        # Remember the folders made here, so a failed compile leaves nothing behind (not even them).
        self._made_parents = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_staging(parent)
        self.stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.committed and self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            for folder in self._made_parents:  # innermost first; stops at the first one not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        return False

    def hashes(self) -> dict[str, str]:
        files = {}
        for path in sorted(self.stage.rglob("*")):
            rel = path.relative_to(self.stage).as_posix()
            if path.is_file() and rel not in UNHASHED:
                files[rel] = sha256_file(path)
        return files

    def write_manifest(self, manifest: dict) -> dict:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **manifest}
        manifest["files"] = self.hashes()
        write_json_atomic(self.stage / MANIFEST_NAME, manifest)
        return manifest

    def commit(self) -> Path:
        """Swap the staged folder into place (the old bundle, if any, is moved aside first)."""
        for f in (self.stage / MANIFEST_NAME,):
            if not f.is_file():
                raise RuntimeError("commit() before write_manifest()")
        _fsync_tree(self.stage)
        os.chmod(self.stage, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        old = None
        if self.destination.exists():
            old = self.destination.with_name(f"{STAGING_PREFIX}{os.getpid()}-old-{self.destination.name}")
            os.replace(self.destination, old)
        os.replace(self.stage, self.destination)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.destination


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename makes the bundle visible (power loss on a device)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
