"""Checking a baseline .json in depth before the gate reads it: every field the gate uses, with its type
and bounds, so that a hand-edited or hostile file gives one line naming the field (not an internal error,
a field the user never passed, or a verdict computed from NaN). Hand-written because the checks include
bounds and cross-field rules a plain JSON schema does not say (numbers finite, the anchor width within
what the gate may allocate), and the project avoids a jsonschema dependency for one file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ...errors import InputError

_FIX = "re-record it with --save-baseline (never edit a baseline by hand)"
MAX_BATCHES = 1_000_000
MAX_BATCH_SIZE = 1_000_000


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, what: str):
        raise InputError(what, file=self.path, field=field, fix=_FIX)

    def obj(self, value, field: str, *, optional: bool = False) -> Mapping | None:
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, not {_kind(value)}")
        return value

    def string(self, value, field: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(field, f"must be a string, not {_kind(value)}")
        return value

    def integer(self, value, field: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(field, f"must be an integer from {lo} to {hi}, not {_show(value)}")
        return value

    def number(self, value, field: str, *, lo: float = -math.inf, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
            bound = "" if lo == -math.inf else f" >= {lo:g}"
            self.fail(field, f"must be a finite number{bound}, not {_show(value)}")
        return float(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_baseline(doc: Mapping, path: Path, *, golden_modes, anchor_width_range: tuple[int, int]) -> None:
    """Raise a one-line InputError at the first field of ``doc`` the gate could not use safely."""
    c = _Checker(path)
    context = c.obj(doc.get("context"), "context")
    for key in ("backend", "target", "precision"):
        c.string(context.get(key), f"context.{key}", optional=True)
    for key in ("bundle", "compiled_with", "runtime_versions", "host"):
        c.obj(context.get(key), f"context.{key}", optional=True)
    host = context.get("host") or {}
    c.obj(host.get("cpu"), "context.host.cpu", optional=True)
    if host.get("gpu") is not None and not isinstance(host.get("gpu"), list):
        c.fail("context.host.gpu", f"must be a list, not {_kind(host.get('gpu'))}")

    data = c.obj(doc.get("data"), "data")
    c.integer(data.get("batch_size"), "data.batch_size", 1, MAX_BATCH_SIZE)
    c.string(data.get("sha256"), "data.sha256", optional=True)
    c.string(data.get("path"), "data.path", optional=True)

    golden = c.obj(doc.get("golden"), "golden")
    if golden.get("mode") not in golden_modes:
        c.fail("golden.mode", f"must be one of {', '.join(golden_modes)}, not {_show(golden.get('mode'))}")
    c.string(golden.get("sha256"), "golden.sha256", optional=True)

    outputs = c.obj(doc.get("outputs"), "outputs")
    for name, entry in outputs.items():
        where = f"outputs.{name}"
        c.obj(entry, where)
        c.string(entry.get("sha256"), f"{where}.sha256")
        c.string(entry.get("dtype"), f"{where}.dtype")
        c.string(entry.get("golden_dtype"), f"{where}.golden_dtype", optional=True)
        c.number(entry.get("golden_error", 0.0), f"{where}.golden_error", lo=0.0)
        shapes = entry.get("batch_shapes")
        if not isinstance(shapes, list) or not shapes or len(shapes) > MAX_BATCHES:
            c.fail(f"{where}.batch_shapes", f"must be a non-empty list of at most {MAX_BATCHES} shapes")
        for i, shape in enumerate(shapes):
            if not isinstance(shape, list) or len(shape) > 32 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40 for d in shape):
                c.fail(f"{where}.batch_shapes[{i}]", f"must be a list of at most 32 sizes, not {_show(shape)}")
        stats = c.obj(entry.get("stats"), f"{where}.stats")
        for key, value in stats.items():
            c.number(value, f"{where}.stats.{key}")

    task = c.obj(doc.get("task"), "task", optional=True)
    if task is not None:
        c.string(task.get("metric"), "task.metric")
        if not isinstance(task.get("outputs"), list) or not all(isinstance(o, str) for o in task["outputs"]):
            c.fail("task.outputs", f"must be a list of output names, not {_show(task.get('outputs'))}")
        c.number(task.get("value"), "task.value")

    latency = c.obj(doc.get("latency"), "latency", optional=True)
    if latency is not None:
        anchor = c.obj(latency.get("anchor"), "latency.anchor")
        c.string(anchor.get("name"), "latency.anchor.name")
        c.integer(anchor.get("width"), "latency.anchor.width", *anchor_width_range)
        pct = c.number(latency.get("percentile"), "latency.percentile", lo=0.0)
        if pct > 100:
            c.fail("latency.percentile", f"must be at most 100, not {_show(latency.get('percentile'))}")
        c.number(latency.get("ratio"), "latency.ratio", lo=0.0)
        key = f"bundle_p{latency['percentile']}_ms"
        c.number(latency.get(key), f"latency.{key}", lo=0.0)
