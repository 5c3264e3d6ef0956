"""The bundle manifest: schema, hashing and verification. Standard library only (runs on devices)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import BundleError
from .atomic import create_temp_beside, write_bytes_atomic, write_json_atomic  # noqa: F401 (re-exported)

MANIFEST_NAME = "manifest.json"
FORMAT = "edgemm-bundle"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "name", "inputs", "outputs", "precision", "target", "backend",
                 "files")
# Files a bundle may hold that are not covered by hashes (they are derived from the others or are
# reports that verification rewrites).
# The signature (bundle.sig, edgemm.runtime.signing) covers every file but itself, these included.
UNHASHED = frozenset({MANIFEST_NAME, "report.json", "report.md", "report.html", "bundle.sig"})
# Types of the backend fields the sessions read (checked here once, so no session trips over them).
BACKEND_FIELD_TYPES = {"model": str, "onnx": str, "engine": str, "built": dict, "options": dict, "providers": list,
                       "build_script": str, "disabled_optimizers": list}
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


def _read_manifest_text(path: Path, bundle_dir: Path) -> str:
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


def read_manifest(bundle_dir: os.PathLike) -> dict:
    """Parse and structurally validate manifest.json (no hash check)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError("not a bundle directory", file=bundle_dir,
                          fix="pass the folder `edgemm compile` wrote (e.g. engines/<name>)")
    text = _read_manifest_text(path, bundle_dir)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"invalid JSON ({exc.msg})", file=path, field=f"line {exc.lineno} column {exc.colno}",
                          fix="recompile the bundle") from exc
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer longer than Python's digit limit; RecursionError: deep nesting
        raise BundleError(f"cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})", file=path,
                          fix="recompile the bundle") from exc
    if not isinstance(manifest, dict):
        raise BundleError("top level is not an object", file=path, fix="recompile the bundle")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise BundleError("missing key", file=path, field=key, fix="recompile the bundle")
    if manifest["format"] != FORMAT:
        raise BundleError(f"format is {manifest['format']!r}, expected {FORMAT!r}", file=path, field="format",
                          fix="pass an edgemm bundle")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise BundleError(f"format_version {version!r} is not supported by this edgemm (reads 1..{FORMAT_VERSION})",
                          file=path, field="format_version", fix="upgrade edgemm or recompile the bundle")
    files = manifest["files"]
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
        raise BundleError("must map relative paths to sha256 hex digests", file=path, field="files",
                          fix="recompile the bundle")
    for key in ("inputs", "outputs"):
        if not isinstance(manifest[key], list) or not manifest[key]:
            raise BundleError("must be a non-empty list", file=path, field=key, fix="recompile the bundle")
    for key in ("precision", "target", "backend"):
        if not isinstance(manifest[key], dict):
            raise BundleError("must be an object", file=path, field=key, fix="recompile the bundle")
    if not isinstance(manifest["backend"].get("name"), str):
        raise BundleError("missing backend name", file=path, field="backend.name", fix="recompile the bundle")
    for key, kind in BACKEND_FIELD_TYPES.items():
        value = manifest["backend"].get(key)
        if value is not None and not isinstance(value, kind):
            raise BundleError(f"must be a {kind.__name__}, not {type(value).__name__}", file=path,
                              field=f"backend.{key}", fix="recompile the bundle")
    _check_sections(manifest, path)
    return manifest


# The optional sections verify and the reports read, field by field: (type, required). "number" is a finite
# int or float, "count" an int >= 0; a dict value is a nested section, a 1-tuple (spec,) a map of names to it.
_NUMBER_OR_NULL = ("number", False)
_PRUNE_SPEC = {
    "comparison": ({
        "branches": (({"params_before": ("number", True), "params_after": ("number", True),
                       "flops_before": ("number", True), "flops_after": ("number", True),
                       "ms_before": _NUMBER_OR_NULL, "ms_after": _NUMBER_OR_NULL},), False),
        "latency": ({"batch": ("count", False), "total_ms_before": ("number", True),
                     "total_ms_after": ("number", True)}, False),
        "onnx_latency": ({"note": ("str", False), "device": ("str", False),
                          "batches": (({"ms_before": ("number", True), "ms_after": ("number", True),
                                        "ratio": ("number", True)},), False)}, False),
        "task": ({"metric": ("str", True), "samples": ("count", True), "before": ("number", True),
                  "after": ("number", True), "drop": ("number", True)}, False),
    }, False),
}


def _check_value(value, spec, field: str, path: Path) -> None:
    def bad(what: str) -> BundleError:
        return BundleError(what, file=path, field=field, fix="recompile the bundle; never edit a manifest by hand")

    if isinstance(spec, tuple):  # a map of names to entries of spec[0]
        if not isinstance(value, dict):
            raise bad(f"must be an object, not {type(value).__name__}")
        for key, item in value.items():
            _check_value(item, spec[0], f"{field}.{key}", path)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise bad(f"must be an object, not {type(value).__name__}")
        for key, (kind, required) in spec.items():
            if value.get(key) is None:
                if required:
                    raise bad(f"{key!r} is missing")
                continue
            _check_value(value[key], kind, f"{field}.{key}", path)
    elif spec == "str":
        if not isinstance(value, str):
            raise bad(f"must be a string, not {type(value).__name__}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (spec == "count" and (not isinstance(value, int) or value < 0)):
            raise bad(f"must be {'a count' if spec == 'count' else 'a finite number'}, not {str(value)[:40]!r}")


def _check_sections(manifest: dict, path: Path) -> None:
    """``task`` and ``prune`` checked in depth (verify and the reports read them), naming the field."""
    task = manifest.get("task")
    if task is not None:
        if not isinstance(task, dict) or not isinstance(task.get("metric"), str):
            raise BundleError("must be an object with a metric name", file=path, field="task",
                              fix="recompile the bundle; never edit a manifest by hand")
        names = {o.get("name") for o in manifest["outputs"] if isinstance(o, dict)}
        outs = task.get("outputs")
        if not isinstance(outs, list) or not outs or not all(isinstance(o, str) and o in names for o in outs):
            raise BundleError(f"must list outputs of the bundle, not {str(outs)[:60]}", file=path,
                              field="task.outputs", fix="recompile the bundle; never edit a manifest by hand")
    prune = manifest.get("prune")
    if prune is not None:
        _check_value(prune, _PRUNE_SPEC, "prune", path)


def verify_files(bundle_dir: os.PathLike, manifest: dict) -> None:
    """Every listed file exists with its hash; no unlisted file sits in the bundle."""
    bundle_dir = Path(bundle_dir)
    source = str(bundle_dir / MANIFEST_NAME)
    for rel, digest in manifest["files"].items():
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
    listed = set(manifest["files"]) | UNHASHED
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if rel not in listed:
            raise BundleError(f"unexpected file {rel!r} not listed in the manifest", file=bundle_dir,
                              field="files", fix="remove it, or recompile the bundle")


def load_manifest(bundle_dir: os.PathLike, *, verify: bool = True) -> dict:
    manifest = read_manifest(bundle_dir)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest
