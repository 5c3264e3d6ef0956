"""Calibration and evaluation data: ``.npz`` files (or a folder of them), keys = model input names,
axis 0 = samples. Evaluation files may also carry ``labels``. Loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import InputError
from .iospec import TensorSpec, describe_shape, token_id_outside
from .paths import require_regular_file

LABELS_KEY = "labels"


@dataclass
class Dataset:
    path: Path
    arrays: dict[str, np.ndarray]       # model inputs only
    labels: np.ndarray | None
    sha256: str

    @property
    def num_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.num_samples, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}

    def subset(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.arrays.items()}


HOLDOUT_MAX = 64   # samples held out for judging when no --eval is given


@dataclass(frozen=True)
class Holdout:
    """Which samples calibrate and which judge: never the same ones (unless there is only one)."""
    calibrate: slice
    judge: slice
    note: str = ""

    def describe(self, source: str) -> str:
        if self.note:
            return self.note
        return (f"{self.judge.stop - self.judge.start} held-out samples {self.judge.start}..{self.judge.stop - 1} "
                f"of {source} (not used for calibration)")


def hold_out(n: int, *, cap: int | None = None, max_judge: int = HOLDOUT_MAX, multiple: int = 1) -> Holdout:
    """Split ``n`` samples: calibrate on the head (at most ``cap``), judge on up to ``max_judge`` samples
    after it. Samples beyond ``cap`` are judged first; otherwise the tail is held out (at most half).
    ``multiple``: a model's static batch (both parts stay whole batches). Used by compile's parity report,
    the accuracy-aware search and the CPU INT8 recipe search."""
    cap = n if cap is None else max(1, min(cap, n))
    multiple = max(1, multiple)
    spare = (n - cap) // multiple * multiple
    if spare >= multiple:
        k = min(spare, max(max_judge // multiple, 1) * multiple)
        return Holdout(slice(0, cap), slice(cap, cap + k))
    k = min(max_judge, n // 2) // multiple * multiple
    if k < 1 or n - k < 1:
        return Holdout(slice(0, n), slice(0, n), f"only {n} sample(s): judged on the calibration samples themselves")
    return Holdout(slice(0, n - k), slice(n - k, n))


def _npz_files(path: Path, role: str | None = None) -> list[Path]:
    # Regular files only: opening a FIFO (or reading a device) would block or never end.
    require_regular_file(path, field=role, allow_dir=True,
                         fix="pass an .npz file or a folder of them (not a pipe, device or socket)")
    if path.is_dir():
        try:
            entries = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        except OSError as exc:
            raise InputError(f"cannot list the folder ({exc.strerror or exc})", file=path, field=role,
                             fix="check the folder's permissions") from exc
        files = []
        for entry in entries:
            if entry.is_dir():  # a folder named *.npz is not data: skipped, as before
                continue
            files.append(require_regular_file(entry, field=role,
                                              fix="keep only regular .npz files in the folder"))
        if not files:
            raise InputError("folder holds no .npz files", file=path,
                             fix="point --calib/--data at an .npz file or a folder of them")
        return files
    return [path]


_DEFLATE_MAX_RATIO = 1100   # deflate cannot shrink data by more than ~1032:1; a bigger claim is forged


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _read_npy_header(f):
    """(shape, fortran_order, dtype) of an .npy stream, read with numpy's own header parser (it reads
    at most the header, never the data)."""
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    if version == (1, 0):
        return npy.read_array_header_1_0(f)
    if version == (2, 0):
        return npy.read_array_header_2_0(f)
    from numpy.lib import _format_impl  # 3.0 (utf-8 names): no public reader

    return _format_impl._read_array_header(f, version)


def check_npz_sizes(path: Path, *, fix: str = "write it with numpy.savez(path, **{input_name: array})") -> None:
    """Before numpy allocates anything: every member's .npy header must declare exactly as many bytes as
    the member holds, no member may claim a compression ratio deflate cannot reach, and all arrays
    together must fit in this machine's memory. numpy allocates what a header declares before reading,
    so a 2 MB file declaring 2.4 GB would otherwise be a memory bomb."""
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.compress_type != zipfile.ZIP_STORED and \
                        info.file_size > _DEFLATE_MAX_RATIO * max(info.compress_size, 1) + 4096:
                    raise InputError(f"member claims {info.file_size} bytes from {info.compress_size} compressed, "
                                     f"more than deflate can produce (forged sizes)", file=path, field=key, fix=fix)
                with zf.open(info) as f:
                    if f.read(6) != b"\x93NUMPY":
                        continue  # not an .npy member: _read_npz names it
                with zf.open(info) as f:
                    try:
                        shape, _, dtype = _read_npy_header(f)
                    except Exception as exc:  # noqa: BLE001 - numpy's header parser (ast/tokenize) on
                        # forged bytes raises ValueError, SyntaxError, tokenize.TokenError, ...: all mean "bad file"
                        raise InputError(f"unreadable .npy header ({type(exc).__name__}: {str(exc)[:200]})",
                                         file=path, field=key, fix=fix) from exc
                    header = f.tell()
                if dtype.hasobject:
                    continue  # refused by numpy itself (allow_pickle=False), with a clear message
                declared = dtype.itemsize * math.prod(int(d) for d in shape)
                held = info.file_size - header
                if declared != held:
                    raise InputError(f"declares shape {tuple(shape)} {dtype} ({declared} bytes) but holds {held} "
                                     f"bytes of data", file=path, field=key, fix=fix)
                total += declared
    except InputError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError):
        return  # not a readable zip: _read_npz reports it, naming the failure
    memory = _physical_memory()
    if memory and total > memory:
        raise InputError(f"its arrays need {total / 2**30:.1f} GiB, more than this machine's "
                         f"{memory / 2**30:.1f} GiB of memory", file=path,
                         fix="split the data into several smaller files, or use fewer samples")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(6)
    # numpy treats any file that is neither zip nor .npy as a pickle; say what it really is.
    if not (magic.startswith(b"PK") or magic.startswith(b"\x93NUMPY")):
        raise InputError("not a readable .npz file (no zip/npy header)", file=path,
                         fix="write it with numpy.savez(path, **{input_name: array})")
    if magic.startswith(b"\x93NUMPY"):
        # Refused before numpy parses its header: a forged one raises IndexError, AttributeError, ... there.
        raise InputError("is a single .npy array, not an .npz of named inputs", file=path,
                         fix="save with numpy.savez(path, **{input_name: array})")
    check_npz_sizes(path)
    key = None  # the member being read, to name it in errors
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = {}
        with loaded as npz:
            for key in npz.files:
                value = npz[key]
                if not isinstance(value, np.ndarray):  # numpy hands back raw bytes for non-.npy members
                    raise InputError("is not a .npy array", file=path, field=key,
                                     fix="write the file with numpy.savez(path, **{input_name: array})")
                arrays[key] = value
        return arrays
    except InputError:
        raise
    except ValueError as exc:
        # numpy raises ValueError for object arrays when pickles are disallowed, and for bad headers.
        raise InputError(f"cannot read it safely ({exc})", file=path, field=key,
                         fix="save plain numeric arrays with numpy.savez, without object dtype") from exc
    except MemoryError as exc:  # a header may declare any shape
        raise InputError(f"declares an array larger than this machine's memory ({exc})", file=path, field=key,
                         fix="split the data into several .npz files in a folder") from exc
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, zlib.error, NotImplementedError,
            RuntimeError, SyntaxError, tokenize.TokenError) as exc:  # zlib.error: corrupted deflate data;
        # Runtime/NotImplemented: zip features; Syntax/TokenError: numpy parses a forged .npy header with ast
        raise InputError(f"not a readable .npz file ({type(exc).__name__}: {exc})", file=path, field=key,
                         fix="write it with numpy.savez(path, **{input_name: array})") from exc


def _hash_files(files: Sequence[Path]) -> str:
    from .runtime.manifest import sha256_files

    return sha256_files(files)


def load_dataset(path, *, specs: Sequence[TensorSpec] | None = None, allow_labels: bool = True,
                 role: str = "--calib", allow_nonfinite: bool = False) -> Dataset:
    """Read and validate. With ``specs``, keys must match the inputs exactly (plus optional labels).
    ``allow_nonfinite``: keep NaN/Inf values (only `edgemm monitor`, which counts them, wants that)."""
    path = Path(path)
    files = _npz_files(path, role)
    merged: dict[str, list[np.ndarray]] = {}
    for f in files:
        arrays = _read_npz(f)
        if not arrays:
            raise InputError("holds no arrays", file=f, fix="save one array per model input")
        if merged and set(arrays) != set(merged):
            raise InputError(f"keys {sorted(arrays)} differ from the other files' {sorted(merged)}", file=f,
                             fix="give every .npz in the folder the same keys")
        for k, v in arrays.items():
            merged.setdefault(k, []).append(v)
    arrays = {}
    for k, parts in merged.items():
        if any(p.ndim == 0 for p in parts):  # checked here because scalars cannot be concatenated
            raise InputError("is a scalar; axis 0 must index samples", file=path, field=k,
                             fix="stack samples along a new first axis")
        first = parts[0]
        for p in parts[1:]:
            if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
                raise InputError(f"shape/dtype differs across files ({first.shape}/{first.dtype} vs "
                                 f"{p.shape}/{p.dtype})", file=path, field=k, fix="make every file agree")
        arrays[k] = np.concatenate(parts, axis=0) if len(parts) > 1 else first
    # `labels` holds labels only when the model has no input of that name (then it is the input's data)
    labels_is_input = specs is not None and any(s.name == LABELS_KEY for s in specs)
    labels = arrays.pop(LABELS_KEY, None) if allow_labels and not labels_is_input else None
    where = str(files[0]) if len(files) == 1 else str(path)
    _validate(arrays, labels, specs, where, allow_nonfinite=allow_nonfinite)
    return Dataset(path, arrays, labels, _hash_files(files))


def _validate(arrays: dict[str, np.ndarray], labels, specs, where: str, *, allow_nonfinite: bool = False) -> None:
    if not arrays:
        raise InputError("holds no model inputs", file=where, fix="save one array per model input name")
    for k, v in arrays.items():
        if v.ndim == 0:
            raise InputError("is a scalar; axis 0 must index samples", file=where, field=k,
                             fix="stack samples along a new first axis")
        if v.shape[0] == 0:
            raise InputError("has no samples (axis 0 is empty)", file=where, field=k,
                             fix="provide at least one sample")
        if v.dtype.kind not in "fiub":
            raise InputError(f"dtype {v.dtype} is not numeric", file=where, field=k,
                             fix="save numeric arrays (float32, int64, ...)")
        if not allow_nonfinite and v.dtype.kind == "f" and not np.isfinite(v).all():
            bad = int((~np.isfinite(v)).sum())
            raise InputError(f"contains {bad} NaN/Inf value(s)", file=where, field=k,
                             fix="drop or repair those samples")
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise InputError(f"inputs have different sample counts {counts}", file=where, field="axis 0",
                         fix="every input needs the same number of samples")
    if labels is not None and labels.shape[:1] != (next(iter(counts.values())),):
        raise InputError(f"labels shape {labels.shape} does not match {next(iter(counts.values()))} samples",
                         file=where, field=LABELS_KEY, fix="one label per sample along axis 0")
    if specs is None:
        return
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing:
        raise InputError(f"missing input {missing[0]!r}", file=where, field=missing[0],
                         fix=f"keys must be the model's input names: {', '.join(names)}")
    if extra:
        raise InputError(f"unexpected key {extra[0]!r}", file=where, field=extra[0],
                         fix=f"keys must be the model's input names ({', '.join(names)}) plus optional 'labels'")
    for spec in specs:
        v = arrays[spec.name]
        if v.dtype != np.dtype(spec.dtype):
            raise InputError(f"dtype {v.dtype} but the model expects {spec.dtype}", file=where, field=spec.name,
                             fix=f"save it as {spec.dtype}")
        per_sample = spec.shape[1:]
        if len(v.shape) - 1 != len(per_sample) or any(
                isinstance(d, int) and d != g for d, g in zip(per_sample, v.shape[1:])):
            raise InputError(f"sample shape {list(v.shape[1:])} but the model expects "
                             f"{describe_shape(per_sample)} (axis 0 = samples)", file=where, field=spec.name,
                             fix="reshape it to [samples, ...model shape without batch]")


def specs_from_dataset(ds: Dataset) -> list[TensorSpec]:
    """Input specs from data: per-sample shape + a batch dim. Order = order in the file."""
    return [TensorSpec(k, str(v.dtype), (1,) + tuple(v.shape[1:])) for k, v in ds.arrays.items()]


def check_token_ids(dataset: "Dataset", vocab: dict[str, int], *, largest: bool = False) -> None:
    """Token ids must index a row of the embedding they feed: an id < 0 or >= its rows makes torch raise
    mid-export and ONNX Runtime fail every calibration run (which would read as "no recipe is accurate
    enough"). ``vocab``: input name -> rows (``onnx_graph.embedding_sizes``); ``largest``: the rows are
    only the largest table of the model (which one an input feeds is not known yet)."""
    for name, rows in vocab.items():
        array = dataset.arrays.get(name)
        bad = None if array is None else token_id_outside(array, rows)
        if bad is not None:
            table = (f"every embedding table of the model (the largest has {rows} rows)" if largest
                     else f"the model's embedding table of {rows} rows")
            raise InputError(f"token id {bad} is outside {table}; ids must be 0..{rows - 1}",
                             file=dataset.path, field=name,
                             fix="tokenize with the model's own vocabulary, or pass the matching model")
