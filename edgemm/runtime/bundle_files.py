"""A bundle's files: hashing, paths that must stay inside the bundle, reading manifest.json safely, and
checking every listed file against its sha256. Standard library only (runs on devices)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Mapping

from ..errors import BundleError

MANIFEST_NAME = "manifest.json"
# Files a bundle may hold that are not covered by hashes (they are derived from the others or are
# reports that verification rewrites).
# The signature (bundle.sig, edgemm.runtime.signing) covers every file but itself, these included.
UNHASHED = frozenset({MANIFEST_NAME, "report.json", "report.md", "report.html", "bundle.sig"})
MAX_MANIFEST_BYTES = 16 << 20   # real manifests are a few KiB; refuse to parse anything huge


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths) -> str:
    """One digest over several files' bytes, in order (a model with its weights, a folder of .npz)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def safe_relpath(bundle_dir: Path, rel: str, *, source: str, field: str = "files") -> Path:
    """Resolve a manifest path, refusing anything that escapes the bundle (.., absolute, symlinks)."""
    if not isinstance(rel, str):
        raise BundleError(f"file path {rel!r} is not a string", file=source, field=field,
                          fix="rebuild the bundle; never edit manifest paths by hand")
    pure = PurePosixPath(rel)
    if (not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or ":" in rel
            or any(ord(c) < 32 for c in rel)):  # control characters (NUL) make the OS calls raise
        raise BundleError(f"file path {rel!r} escapes the bundle", file=source, field=field,
                          fix="rebuild the bundle; never edit manifest paths by hand")
    path = bundle_dir / pure
    try:
        if path.is_symlink():
            raise BundleError(f"{rel!r} is a symbolic link", file=source, field=field,
                              fix="bundles hold plain files only; rebuild the bundle")
        resolved = path.resolve()
        inside = bundle_dir.resolve() in resolved.parents
    except OSError as exc:  # name too long, symlink loop in a parent, ...
        raise BundleError(f"file path {rel!r} cannot be resolved ({exc.strerror or exc})", file=source,
                          field=field, fix="rebuild the bundle") from exc
    if not inside:
        raise BundleError(f"file path {rel!r} escapes the bundle", file=source, field=field,
                          fix="rebuild the bundle")
    return path


def read_manifest_text(path: Path, bundle_dir: Path) -> str:
    """manifest.json's text, only if it is a regular file of the bundle: a symbolic link (which could
    point anywhere), a FIFO or a device is refused. Opened without following links, then checked on
    the open descriptor, so it cannot be swapped between the check and the read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BundleError(f"cannot read the manifest ({exc.strerror or exc})", file=path,
                          fix="check the bundle folder's permissions") from exc
    if st is None:
        raise BundleError("no manifest.json", file=bundle_dir,
                          fix="pass a folder written by `edgemm compile`, or recompile")
    if stat.S_ISLNK(st.st_mode):
        raise BundleError("is a symbolic link; a bundle's manifest must be a regular file", file=path,
                          fix="copy the bundle with its files (e.g. cp -rL), or recompile")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError("is not a regular file", file=path, fix="recompile the bundle")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:  # ELOOP: swapped for a link since the lstat
        raise BundleError(f"cannot be opened ({exc.strerror or exc})", file=path,
                          fix="check the file's permissions, or recompile the bundle") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError("is not a regular file", file=path, fix="recompile the bundle")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest", file=path,
                              fix="recompile the bundle")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"cannot be read ({exc.strerror or exc})", file=path,
                          fix="check the file's permissions, or recompile the bundle") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest", file=path,
                          fix="recompile the bundle")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"cannot be parsed (UnicodeDecodeError: {str(exc)[:200]})", file=path,
                          fix="recompile the bundle") from exc


def verify_files(bundle_dir: os.PathLike, files: Mapping[str, str]) -> None:
    """Every listed file exists with its hash; no unlisted file sits in the bundle."""
    bundle_dir = Path(bundle_dir)
    source = str(bundle_dir / MANIFEST_NAME)
    for rel, digest in files.items():
        path = safe_relpath(bundle_dir, rel, source=source)
        if not path.is_file():
            raise BundleError(f"listed file {rel!r} is missing", file=bundle_dir, field=f"files.{rel}",
                              fix="copy the whole bundle folder, or recompile")
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"listed file {rel!r} cannot be read ({exc.strerror or exc})", file=path,
                              field=f"files.{rel}", fix="check the file's permissions, or recopy the bundle") from exc
        if actual != digest:
            raise BundleError(f"{rel!r} does not match its sha256 in the manifest (modified or corrupted)",
                              file=path, field=f"files.{rel}", fix="recopy or recompile the bundle")
    listed = set(files) | UNHASHED
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if rel not in listed:
            raise BundleError(f"unexpected file {rel!r} not listed in the manifest", file=bundle_dir,
                              field="files", fix="remove it, or recompile the bundle")
