"""User-facing errors.

Every problem caused by the user's input (a file, a flag, a bundle) raises an
``EdgemmError``: the CLI prints its one-line message and exits non-zero, with no
traceback unless ``--verbose``. Anything else escaping is an internal bug and is
shown as such.
"""

from __future__ import annotations


class EdgemmError(Exception):
    """An error the user can fix. ``str()`` is one line: where, what, and the fix."""

    exit_code = 2

    def __init__(self, message: str, *, file: object = None, field: str | None = None,
                 fix: str | None = None):
        self.file = None if file is None else str(file)
        self.field = field
        self.fix = fix
        self.detail = message
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = ""
        if self.file and self.field:
            where = f"{self.file}: {self.field}: "
        elif self.file:
            where = f"{self.file}: "
        elif self.field:
            where = f"{self.field}: "
        text = where + self.detail
        if self.fix:
            text += f" (fix: {self.fix})"
        # One line, always: messages may embed multi-line library errors, and names from input files
        # may hold terminal escapes or other controls (shown escaped, never sent to the terminal).
        from .display import printable

        return printable(" ".join(text.split()))


class InputError(EdgemmError):
    """Bad model file, data file, flag combination or bundle. Exit 2."""


class SecurityError(InputError):
    """The input would run untrusted code or escape its folder."""


class BundleError(InputError):
    """A bundle is incomplete, tampered with, or made for another platform."""


class DependencyError(EdgemmError):
    """An optional dependency (TensorRT, CUDA, modelopt...) is missing here."""


class ParityError(EdgemmError):
    """The compiled artefact does not match its reference. Exit 1."""

    exit_code = 1


def first_line(exc: BaseException, limit: int | None = 300, default: str | None = None) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters, for one-line errors and notes
    (third-party messages often run to many lines); ``default`` (the exception's type name when None)
    for an empty message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else (type(exc).__name__ if default is None else default)
    return text[:limit] if limit is not None else text



class StorageError(InputError):
    """The disk refused a write (full, quota, read-only, I/O error): not the model's or the data's fault."""


_STORAGE_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exceeded",
                   "EROFS": "the file system is read-only", "EIO": "an I/O error occurred", "EFBIG": "a file is too large"}
# Libraries (ONNX Runtime, protobuf, torch) wrap OS errors in their own types; their text keeps strerror.
_STORAGE_TEXTS = {"no space left on device": "the disk is full", "disk quota exceeded": "the disk quota is exceeded",
                  "read-only file system": "the file system is read-only", "input/output error": "an I/O error occurred"}


def storage_error(exc: BaseException) -> StorageError | None:
    """A StorageError when ``exc`` (or what it was raised from) is a failed write to the disk, else None.
    Code that treats a failure as a result ("this recipe does not apply") must re-raise these: a full
    disk is not an inaccurate recipe."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return exc
        what = None
        if isinstance(exc, OSError) and exc.errno is not None:
            what = next((text for name, text in _STORAGE_ERRNOS.items()
                         if getattr(errno, name, None) == exc.errno), None)
        if what is None:
            lowered = str(exc).lower()
            what = next((text for key, text in _STORAGE_TEXTS.items() if key in lowered), None)
        if what is not None:
            where = getattr(exc, "filename", None)
            return StorageError(f"{what} ({first_line(exc, 200)})", file=where,
                                fix="free space (or fix the disk) where the output and TMPDIR live, then rerun")
        exc = exc.__cause__ or exc.__context__
    return None
