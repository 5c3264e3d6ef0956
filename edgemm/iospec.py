"""Tensor specs: the names, dtypes and (possibly symbolic) shapes of a model's inputs and outputs.

Pure Python + numpy, shared by the compiler and the runtime. A dimension is an ``int`` or a symbolic
name (``"batch"``, ``"seq"``); symbolic dims carry optional (min, opt, max) ranges for TensorRT
optimization profiles.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence, Union

import numpy as np

from .errors import InputError

Dim = Union[int, str]

# dtypes a bundle may expose; names follow numpy.
SUPPORTED_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise InputError(f"dimension range {self.min}:{self.opt}:{self.max} must satisfy 1 <= MIN <= OPT <= MAX",
                             field="--dynamic")

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]
    # symbolic dim name -> range, only for symbolic dims of this tensor
    ranges: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.ranges:
            d["ranges"] = {k: v.to_list() for k, v in self.ranges.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "manifest") -> "TensorSpec":
        try:
            name, dtype, shape = d["name"], d["dtype"], d["shape"]
            if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
                raise TypeError
            for dim in shape:
                if not (isinstance(dim, str) or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)):
                    raise TypeError
            ranges = {k: DimRange(*v) for k, v in (d.get("ranges") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:   # AttributeError: ranges not an object
            raise InputError(f"malformed tensor spec {d!r}", file=source, field="inputs/outputs",
                             fix="regenerate the bundle with `edgemm compile`") from exc
        return cls(name, dtype, tuple(shape), ranges)

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """A runnable shape: the batch dim (axis 0, when symbolic) takes ``batch`` within its range, other
        symbolic dims their `opt` value (or ``batch`` when they have no range)."""
        out = []
        for axis, dim in enumerate(self.shape):
            if isinstance(dim, int):
                out.append(dim)
            elif axis == 0 and dim in self.ranges:
                r = self.ranges[dim]
                out.append(min(max(batch, r.min), r.max))
            elif dim in self.ranges:
                out.append(self.ranges[dim].opt)
            else:
                out.append(batch)
        return tuple(out)

    def with_dims(self, shape: Sequence[Dim]) -> "TensorSpec":
        return replace(self, shape=tuple(shape))


def describe_shape(shape: Iterable[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# Digit runs are bounded: int() raises ValueError past Python's 4300-digit limit, and no size needs 19 digits.
_INPUT_RE = re.compile(r"^(?P<name>[^:]+):(?P<shape>[0-9]{1,18}(?:x[0-9]{1,18})*|scalar):(?P<dtype>[a-z0-9]+)$")


def parse_input_flag(text: str) -> TensorSpec:
    """``NAME:1x3x224x224:float32`` -> TensorSpec (first dim becomes symbolic ``batch``)."""
    m = _INPUT_RE.match(text.strip())
    if not m:
        raise InputError(f"cannot parse {text!r}", field="--input",
                         fix="write NAME:SHAPE:DTYPE, e.g. image:1x3x224x224:float32")
    dtype = m["dtype"]
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"unsupported dtype {dtype!r} in {text!r}", field="--input",
                         fix=f"use one of {', '.join(SUPPORTED_DTYPES)}")
    shape = () if m["shape"] == "scalar" else tuple(int(x) for x in m["shape"].split("x"))
    if any(d == 0 for d in shape):
        raise InputError(f"zero-sized dimension in {text!r}", field="--input", fix="use sizes >= 1")
    if len(shape) > MAX_RANK or math.prod(shape) > MAX_SAMPLE_ELEMENTS:  # dummy inputs of this shape get made
        raise InputError(f"shape of {text!r} is larger than any model input ({MAX_RANK} axes, "
                         f"{MAX_SAMPLE_ELEMENTS} elements at most)", field="--input", fix="check the sizes")
    return TensorSpec(m["name"], dtype, shape)


MAX_RANK = 32
MAX_SAMPLE_ELEMENTS = 1 << 31
# Upper bounds of --max-batch / a --dynamic range (and their --config keys). Past them a value is a typo, not
# an edge workload: TensorRT reserves activation memory for the profile's largest shape, and
# `edgemm export triton` would promise Triton clients that batch.
MAX_BATCH = 65536
MAX_DIM = 1 << 22   # 4,194,304: over four minutes of 16 kHz audio samples, far past any context length


_DYNAMIC_RE = re.compile(r"^(?P<name>[^:=]+):(?P<axis>[0-9]{1,18})=(?P<min>[0-9]{1,18}):(?P<opt>[0-9]{1,18}):"
                         r"(?P<max>[0-9]{1,18})$")


@dataclass(frozen=True)
class DynamicAxis:
    input: str
    axis: int
    range: DimRange


def parse_dynamic_flag(text: str) -> DynamicAxis:
    """``input_ids:1=1:77:128`` -> DynamicAxis."""
    m = _DYNAMIC_RE.match(text.strip())
    if not m:
        raise InputError(f"cannot parse {text!r}", field="--dynamic",
                         fix="write NAME:AXIS=MIN:OPT:MAX, e.g. input_ids:1=1:77:128")
    axis, top = int(m["axis"]), int(m["max"])
    bound = MAX_BATCH if axis == 0 else MAX_DIM
    if top > bound:
        raise InputError(f"{text.strip()!r}: MAX {top} is past {bound:,}, the largest {'batch' if axis == 0 else 'dimension'} "
                         "edgemm builds for", field="--dynamic",
                         fix=f"give a MAX up to {bound}, e.g. {m['name']}:{axis}={m['min']}:{m['opt']}:"
                             f"{max(int(m['opt']), min(bound, 4 * int(m['opt'])))}")
    return DynamicAxis(m["name"], axis, DimRange(int(m["min"]), int(m["opt"]), top))


def dynamic_batch_input(specs: Sequence[TensorSpec]) -> str | None:
    """The first input whose axis 0 is symbolic (a dynamic batch), or None when every batch is fixed."""
    return next((s.name for s in specs if s.shape and isinstance(s.shape[0], str)), None)


def dim_name(spec_name: str, axis: int) -> str:
    return "batch" if axis == 0 else f"{spec_name}_dim{axis}"


def apply_dynamic_axes(specs: Sequence[TensorSpec], dynamic: Sequence[DynamicAxis], *,
                       dynamic_batch: bool = True, max_batch: int = 64) -> list[TensorSpec]:
    """Mark axis 0 of every input as symbolic ``batch`` (unless disabled) and apply ``--dynamic`` flags."""
    by_name = {s.name: s for s in specs}
    for d in dynamic:
        if d.input not in by_name:
            raise InputError(f"unknown input {d.input!r}", field="--dynamic",
                             fix=f"use one of {', '.join(by_name)}")
        if d.axis >= len(by_name[d.input].shape):
            raise InputError(f"input {d.input!r} has rank {len(by_name[d.input].shape)}, no axis {d.axis}",
                             field="--dynamic", fix="count axes from 0")
    out = []
    batch_range = next((d.range for d in dynamic if d.axis == 0), DimRange(1, 1, max_batch))
    for spec in specs:
        shape = list(spec.shape)
        ranges = dict(spec.ranges)
        if dynamic_batch and shape:
            shape[0] = "batch"
            ranges["batch"] = batch_range
        for d in dynamic:
            if d.input == spec.name:
                name = dim_name(spec.name, d.axis)
                shape[d.axis] = name
                ranges[name] = d.range
        out.append(TensorSpec(spec.name, spec.dtype, tuple(shape), ranges))
    return out


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(name)


def max_batch(specs) -> int | None:
    """The largest batch the specs' ranges allow (the runtime refuses more); None when unbounded."""
    bounds = [s.ranges[s.shape[0]].max for s in specs
              if s.shape and isinstance(s.shape[0], str) and s.shape[0] in s.ranges]
    return min(bounds) if bounds else None


def call_batch(specs, preferred: int = 16) -> int:
    """Samples per call when the user gave none: ``preferred``, lowered to the bundle's range; a bundle
    whose batch is fixed (a .pt2 exported at batch 1) takes exactly its batch per call."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if specs and len(fixed) == 1 and all(s.shape and isinstance(s.shape[0], int) for s in specs):
        return fixed.pop()
    top = max_batch(specs)
    return min(preferred, top) if top else preferred


def token_id_outside(array: np.ndarray, rows: int) -> int | None:
    """The first token id of ``array`` that indexes no row of an embedding table of ``rows`` rows (an
    id < 0 or >= rows), else None. Negative ids matter as much as large ones: ONNX Runtime's Gather
    takes -rows..-1 as Python-style indices and answers with another token's row, silently."""
    if array.dtype.kind not in "iu" or not array.size:
        return None
    low, high = int(array.min()), int(array.max())
    return low if low < 0 else high if high >= rows else None


def check_graph_values(spec: TensorSpec, value: np.ndarray, token_rows: int | None) -> None:
    """What a model input's values must hold beyond its shape, on every path into a bundle (``run``, a
    split bundle's ``part(name).run``): no NaN/Inf, and token ids inside the embedding table."""
    if value.size and value.dtype.kind == "f" and not np.isfinite(value).all():
        raise InputError("contains NaN or Inf", field=spec.name, fix="clean the input data")
    bad = None if token_rows is None else token_id_outside(value, token_rows)
    if bad is not None:
        raise InputError(f"token id {bad} is outside the model's embedding table of {token_rows} rows; ids "
                         f"must be 0..{token_rows - 1}", field=spec.name,
                         fix="tokenize with the model's own vocabulary")


def check_feed(spec: TensorSpec, value, *, where: str, enforce_ranges: bool) -> None:
    """A value fed to a bundle (or a split bundle's part): a numpy array that fits ``spec`` (one line)."""
    if not isinstance(value, np.ndarray):
        raise InputError(f"expected a numpy array, got {type(value).__name__}", field=spec.name,
                         fix="wrap it with numpy.asarray(...)")
    check_array_against_spec(spec, value, where=where, enforce_ranges=enforce_ranges)


def check_array_against_spec(spec: TensorSpec, array: np.ndarray, *, where: str,
                             fix: str | None = None, enforce_ranges: bool = False) -> None:
    """Raise InputError naming the tensor when dtype or rank/static dims disagree."""
    if array.dtype != np.dtype(spec.dtype):
        raise InputError(f"dtype {array.dtype} but expected {spec.dtype}", file=where, field=spec.name,
                         fix=fix or f"cast it with .astype('{spec.dtype}')")
    if len(array.shape) != len(spec.shape):
        raise InputError(f"shape {list(array.shape)} has rank {array.ndim} but expected "
                         f"{describe_shape(spec.shape)}", file=where, field=spec.name, fix=fix)
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if isinstance(want, int) and got != want:
            raise InputError(f"shape {list(array.shape)} but expected {describe_shape(spec.shape)} "
                             f"(axis {axis} must be {want})", file=where, field=spec.name, fix=fix)
        # Ranges are the bundle's contract: TensorRT profiles need them, and nothing outside was compiled for.
        if enforce_ranges and isinstance(want, str) and want in spec.ranges:
            r = spec.ranges[want]
            if not (r.min <= got <= r.max):
                how = (f"pass at most {r.max} samples per call (--batch-size {r.max}), or recompile with "
                       f"--max-batch {got}" if axis == 0 else "recompile with a wider --dynamic range")
                raise InputError(f"axis {axis} ({want}) is {got}, outside the compiled range {r.min}..{r.max}",
                                 file=where, field=spec.name, fix=fix or how)
