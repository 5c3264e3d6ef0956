"""Files a command writes for the user (run -o, verify --junit/--markdown/--html/--save-baseline, ...):
checked against the command's inputs before any work, written atomically, and reported in one line when
the place cannot be written. Standard library only (`edgemm run` uses it on devices).

An output never replaces an input: not the same path, not a hard link or symbolic link to the same file,
not a file inside an input folder (a bundle, a folder of .npz), and two outputs of one command never
share a file."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping

from .errors import InputError
from .paths import is_within, missing_folders, remove_made_folders
from .runtime.atomic import atomic_open


def _identity(path: Path):
    """(device, inode) of what ``path`` leads to, or None when it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved(path) -> Path | None:
    try:
        return Path(os.fspath(path)).resolve()
    except (OSError, RuntimeError, ValueError, TypeError):
        return None


def check_output_file(path, *, field: str, inputs: Mapping[str, object] | None = None,
                      outputs: Mapping[str, object] | None = None) -> Path:
    """Refuse (one-line InputError naming ``field``) an output file that is or would overwrite one of
    ``inputs`` (flag -> path: the same file under any name, or a path inside an input folder), that is
    the same file as another of the command's ``outputs`` (flag -> path), or that is a folder."""
    path = Path(path)
    target = _resolved(path)
    if target is None:
        raise InputError("cannot be resolved", file=path, field=field, fix="choose another output path")
    if path.is_dir():
        raise InputError("is a folder; name the file to write", file=path, field=field,
                         fix=f"e.g. {field} {path / 'out'}")
    blocker = next((p for p in path.absolute().parents if os.path.lexists(p)), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"lies under {blocker}, which is not a folder", file=path, field=field,
                         fix="choose a path in a folder")
    ident = _identity(path)
    for flag, given in (inputs or {}).items():
        if not given:
            continue
        source = _resolved(given)
        if source is None:
            continue  # not a path (a package.module:function factory): its own check reports it
        same = (ident is not None and ident == _identity(given)) or source == target
        if same:
            raise InputError(f"is the {flag} input {given}; writing there would destroy it", file=path,
                             field=field, fix="write the output to another file")
        if source.is_dir() and is_within(target, source):
            raise InputError(f"lies inside the {flag} input {given}; writing there would change it",
                             file=path, field=field, fix="write the output outside that folder")
    for flag, given in (outputs or {}).items():
        if not given or flag == field:
            continue
        other = _resolved(given)
        if other == target or (ident is not None and ident == _identity(given)):
            raise InputError(f"is also the {flag} output", file=path, field=field,
                             fix="give each output its own file")
    return path


def check_outputs(outputs: Mapping[str, object], inputs: Mapping[str, object]) -> None:
    """``check_output_file`` for every output given (flag -> path or None)."""
    for flag, given in outputs.items():
        if given:
            check_output_file(given, field=flag, inputs=inputs, outputs=outputs)


@contextmanager
def output_file(path, *, field: str) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` atomically when the block succeeds. Missing parent
    folders are made (and removed again on failure); an OSError (no permission, disk full, read-only
    file system, a file where a folder should be) becomes one line naming ``field``."""
    path = Path(path)
    made = missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as handle:
            yield handle
    except OSError as exc:
        remove_made_folders(made)
        raise InputError(f"cannot be written ({exc.strerror or exc})", file=path, field=field,
                         fix="choose a writable path with free space") from exc
    except BaseException:
        remove_made_folders(made)
        raise


def write_output_text(path, text: str, *, field: str) -> Path:
    with output_file(path, field=field) as f:
        f.write(text.encode("utf-8"))
    return Path(path)
