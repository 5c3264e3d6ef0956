"""Writing bundles atomically: everything goes into a hidden staging folder beside the destination,
the manifest (with every file's sha256) is written last, and the folder is renamed into place. A
killed compile leaves only a staging folder, which never loads as a bundle and is swept next time."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from .errors import InputError

try:
    import fcntl
except ImportError:  # no flock (Windows): staging folders are never swept, only left behind
    fcntl = None
from .paths import is_within, missing_folders, remove_made_folders
from .runtime.manifest import (FORMAT, MANIFEST_NAME, MAX_MANIFEST_BYTES, UNHASHED, Manifest, manifest_document,
                               sha256_file, write_json_atomic)

STAGING_PREFIX = ".edgemm-staging-"
LOCK_SUFFIX = ".lock"
# "<prefix><pid>-<8 hex>" is a compile's staging folder; "<that>-work" its scratch folder and
# "<that>-old-<name>" the bundle it sets aside while committing; "<that>.lock" the lock they share. The pid
# is only informative: who owns a folder is whoever holds the flock on its lock file.
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+-[0-9a-f]{8})(?:-.+|\.lock)?$")


def _lock_path(parent: Path, base: str) -> Path:
    return parent / f"{base}{LOCK_SUFFIX}"


def _take_lock(path: Path, *, create: bool) -> int | None:
    """An exclusive flock on ``path`` without waiting: the open descriptor (closing it releases the lock),
    or None when another process holds it, or the file is gone, a link or not a regular file."""
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, now = os.fstat(fd), os.lstat(path)
        # Still the file at that name (a sweep may have removed it between our open and our flock)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def sweep_stale_staging(parent: Path) -> None:
    """Remove staging, scratch and set-aside folders of compiles that are gone: those whose lock file can
    be locked, or that have none (a compile makes its lock before its folders and removes it after them).
    A live compile holds its lock for its whole run, in whatever process or PID namespace it runs."""
    if fcntl is None or not parent.is_dir():
        return
    for entry in sorted(parent.glob(STAGING_PREFIX + "*")):
        match = _STAGING_NAME.match(entry.name)
        if match is None or entry.is_symlink():
            continue
        lock = _lock_path(parent, STAGING_PREFIX + match.group(1))
        if entry == lock:
            if not any(p != lock for p in parent.glob(STAGING_PREFIX + match.group(1) + "*")):
                fd = _take_lock(lock, create=False)  # a lock file whose folders are all gone
                if fd is not None:
                    lock.unlink(missing_ok=True)
                    os.close(fd)
            continue
        if not entry.is_dir():
            continue
        if not os.path.lexists(lock):
            shutil.rmtree(entry, ignore_errors=True)
            continue
        fd = _take_lock(lock, create=False)
        if fd is None:
            continue  # its compile is alive
        try:
            for owned in parent.glob(STAGING_PREFIX + match.group(1) + "*"):
                if owned != lock and owned.is_dir() and not owned.is_symlink():
                    shutil.rmtree(owned, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _new_staging(parent: Path) -> tuple[str, int]:
    """A fresh staging name and its lock, held: (base name, lock descriptor)."""
    for _ in range(100):
        base = f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        if any(parent.glob(base + "*")):
            continue
        fd = _take_lock(_lock_path(parent, base), create=True)
        if fd is not None:
            return base, fd
    raise FileExistsError(f"no free staging name in {parent}")


_CHOOSE_ANOTHER = "choose another -o folder"
_NOT_REPLACED = "choose another -o folder, or move or delete it yourself"


def check_output_location(destination, protect: Mapping[str, object] | None = None) -> None:
    """Refuse an output folder that --force could never safely replace, whatever is there now: the
    current folder or one of its parents, or a folder that is or holds one of the inputs (``protect``
    maps a flag, e.g. "--calib", to the path given with it)."""
    shown = destination
    try:
        dest = Path(destination).resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte, cwd deleted
        raise InputError(f"cannot be resolved ({exc})", file=shown, field="-o", fix=_CHOOSE_ANOTHER) from exc
    if is_within(cwd, dest):
        what = "the current folder" if dest == cwd else "a parent of the current folder"
        raise InputError(f"is {what}; a bundle needs a folder of its own", file=shown, field="-o",
                         fix="choose a new folder, e.g. -o engines/my-model")
    for flag, given in (protect or {}).items():
        if not given:
            continue
        try:
            source = Path(str(given)).resolve()
        except (OSError, RuntimeError, ValueError):
            continue  # not a usable path (a package.module:function factory, say); its own check reports it
        if is_within(source, dest):
            what = "is" if source == dest else "contains"
            raise InputError(f"{what} the {flag} input {given}; writing the bundle there would destroy it",
                             file=shown, field="-o", fix=_CHOOSE_ANOTHER)


def check_destination(destination, *, force: bool, protect: Mapping[str, object] | None = None) -> None:
    """The checks a compile can make on its -o before any work: ``check_output_location``, and with
    ``force``, that what is there may be replaced. (A missing --force is reported by BundleWriter.)"""
    check_output_location(destination, protect)
    if force and os.path.lexists(destination):
        reason = replace_refusal(Path(destination))
        if reason is not None:
            raise InputError(reason, file=destination, field="-o", fix=_NOT_REPLACED)


def replace_refusal(destination: Path) -> str | None:
    """Why --force may not replace ``destination`` (None: it may). Only an empty folder or an edgemm
    bundle (manifest.json with the bundle format marker, and nothing but the files it lists, the reports
    and edgemm's own temporary files) is replaced: anything else may be the user's data."""
    if destination.is_symlink():
        return "is a symbolic link, not a bundle folder"
    if not destination.is_dir():
        return "exists and is not a folder"
    try:
        entries = list(os.scandir(destination))
    except OSError as exc:
        return f"cannot be listed ({exc.strerror or exc})"
    if not entries:
        return None
    not_bundle = "is not an edgemm bundle (no manifest.json from edgemm compile), so --force will not delete it"
    manifest_path = destination / MANIFEST_NAME
    try:
        if manifest_path.is_symlink() or not manifest_path.is_file() \
                or manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return not_bundle
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8, huge integers
        return not_bundle
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return not_bundle
    listed = manifest.get("files")
    known = set(UNHASHED) | (set(k for k in listed if isinstance(k, str)) if isinstance(listed, dict) else set())
    known_names = {Path(k).name for k in known}
    for dirpath, dirnames, filenames in os.walk(destination):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]  # os.walk lists links to folders as folders
        for name in filenames + links:
            rel = (here / name).relative_to(destination).as_posix()
            if rel in known or _is_edgemm_temp(name, known_names):
                continue
            return (f"is an edgemm bundle but also holds {rel!r}, which is not part of it, so --force will not "
                    f"delete it")
    return None


def _is_edgemm_temp(name: str, known_names: set[str]) -> bool:
    """Leftovers of edgemm's atomic writes: ".<file>.tmp-<pid>" or ".<file>.<random>.tmp"."""
    return name.startswith(".") and ".tmp" in name and any(name.startswith(f".{k}.") for k in known_names)


class BundleWriter:
    """Context manager: ``with BundleWriter(dest, force) as w: w.stage / files...; w.commit(manifest)``.

    ``protect`` maps flags to input paths (model, --calib, ...) that the destination must not be or
    contain. An existing destination is only replaced with ``force``, and only when it is an empty folder
    or an edgemm bundle (see ``replace_refusal``). Subclasses writing other folders (a Triton model
    repository) set ``MARKER``, the file written last, and ``refusal``, what --force may replace."""

    MARKER = MANIFEST_NAME

    def __init__(self, destination: Path, *, force: bool = False, protect: Mapping[str, object] | None = None):
        self.given = Path(destination)
        self.force = force
        self.protect = dict(protect or {})
        self.stage: Path | None = None
        self.committed = False
        self._base: str | None = None       # the staging name; its lock file is held while we run
        self._lock_fd: int | None = None
        self._made_parents: list[Path] = []
        check_output_location(self.given, self.protect)
        # Absolute, with the parent's links resolved but not a link in the last component: "." and ".."
        # have no name to stage beside, and a link named by -o is refused rather than followed.
        absolute = Path(os.path.abspath(self.given))
        self.destination = absolute.parent.resolve() / absolute.name

    def _exists(self) -> bool:
        return os.path.lexists(self.destination)

    def refusal(self, destination: Path) -> str | None:
        return replace_refusal(destination)

    def _check_replaceable(self) -> None:
        reason = self.refusal(self.destination)
        if reason is not None:
            raise InputError(reason, file=self.given, field="-o", fix=_NOT_REPLACED)

    def __enter__(self) -> "BundleWriter":
        if self._exists() and not self.force:
            raise InputError("already exists", file=self.given,
                             fix="pass --force to replace it, or choose another -o")
        if self._exists():
            self._check_replaceable()
        parent = self.destination.parent
        blocker = next((p for p in [parent, *parent.parents] if os.path.lexists(p)), None)
        if blocker is not None and not blocker.is_dir():
            raise InputError(f"lies under {blocker}, which is not a folder", file=self.given, field="-o",
                             fix=_CHOOSE_ANOTHER)
        # Remember the folders made here, so a failed compile leaves nothing behind (not even them).
        self._made_parents = missing_folders(parent)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_staging(parent)
            self._base, self._lock_fd = _new_staging(parent)
            self.stage = self.sibling()
        except OSError as exc:  # a file where a folder should be, no permission, read-only file system
            self._release()
            remove_made_folders(self._made_parents)
            raise InputError(f"cannot create the bundle's folder ({exc.strerror or exc})", file=self.given,
                             field="-o", fix=_CHOOSE_ANOTHER) from exc
        return self

    def _appeared(self) -> InputError:
        return InputError("appeared while compiling (another compile wrote there?); nothing was replaced",
                          file=self.given, field="-o", fix="pass --force to replace it, or choose another -o")

    def sibling(self, tag: str | None = None) -> Path:
        """A new private folder beside the destination, owned by this compile's lock: the staging folder
        itself (no tag) or scratch space (e.g. "work"). A later compile's sweep removes it if this one is
        killed, never while it runs."""
        path = self.destination.parent / (self._base + (f"-{tag}" if tag else ""))
        path.mkdir(mode=0o700)
        return path

    def _release(self) -> None:
        """Remove what this compile left beside the destination (except the committed bundle), then its
        lock file, then let the lock go (in this order, so a sweep never finds a folder without a lock)."""
        if self._base is None:
            return
        parent = self.destination.parent
        lock = _lock_path(parent, self._base)
        for owned in parent.glob(self._base + "*"):
            if owned != lock and owned.is_dir() and not owned.is_symlink():
                shutil.rmtree(owned, ignore_errors=True)
        lock.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._base, self._lock_fd = None, None

    def __exit__(self, exc_type, exc, tb):
        self._release()
        if not self.committed and self.stage is not None:
            remove_made_folders(self._made_parents)
        return False

    def hashes(self) -> dict[str, str]:
        files = {}
        for path in sorted(self.stage.rglob("*")):
            rel = path.relative_to(self.stage).as_posix()
            if path.is_file() and rel not in UNHASHED:
                files[rel] = sha256_file(path)
        return files

    def write_manifest(self, manifest: dict) -> Manifest:
        """Write the staged bundle's manifest (format, version, creation time and file hashes added) after
        validating it as a reader will; returns the typed ``Manifest``."""
        document = manifest_document({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      **manifest, "files": self.hashes()})
        document = json.loads(json.dumps(document))   # exactly what a reader will parse (tuples -> lists)
        typed = Manifest.from_dict(document, source=self.stage / MANIFEST_NAME)
        write_json_atomic(self.stage / MANIFEST_NAME, document)
        return typed

    def commit(self) -> Path:
        """Swap the staged folder into place (the old bundle, if any, is moved aside first)."""
        if not (self.stage / self.MARKER).is_file():
            raise RuntimeError(f"commit() before {self.MARKER} was written")
        _fsync_tree(self.stage)
        os.chmod(self.stage, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        old = None
        if self._exists():
            if not self.force:  # another compile (or someone) created it after __enter__ checked
                raise self._appeared()
            self._check_replaceable()  # it may have changed since __enter__ looked
            old = self.destination.with_name(f"{self._base}-old-{self.destination.name}")
            os.replace(self.destination, old)
        try:
            # rename(2) onto an existing non-empty folder fails, so a bundle committed by another compile
            # since the check above is never replaced; (an empty folder made in that instant would be).
            os.rename(self.stage, self.destination)
        except OSError as exc:
            if old is not None:  # put the old bundle back
                try:
                    os.rename(old, self.destination)
                except OSError:
                    pass
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise self._appeared() from exc
            raise
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
