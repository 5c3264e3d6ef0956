"""Input-spec resolution and the data the stages feed: which inputs the model takes (the format's own
specs, the calibration data, or --input), sample/synthetic feeds, the calibration/judging split, and the
token-id checks before anything runs on the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import CompileConfig
from ..data import Dataset, hold_out, specs_from_dataset
from ..errors import InputError
from ..frontends import LoadedModel
from ..iospec import DimRange, TensorSpec, apply_dynamic_axes, dynamic_batch_input, parse_dynamic_flag, parse_input_flag
from ..onnx_io import load_graph


GENERIC_STEMS = {"model", "module", "net", "network", "checkpoint", "weights", "export", "traced"}


def default_name(loaded: LoadedModel) -> str:
    path = Path(loaded.source)
    if loaded.format == "factory":
        return loaded.name
    stem = path.stem
    if stem.lower() in GENERIC_STEMS and path.parent.name not in ("", "."):
        stem = path.parent.resolve().name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-") or "model"


DEFAULT_MAX_BATCH = 64


def resolve_input_specs(loaded: LoadedModel, cfg: CompileConfig, calib: Dataset | None) -> list[TensorSpec]:
    """In order of preference: the format's own specs (.pt2, .onnx), the calibration data, --input.
    A --dla build pins every range to its opt value, as its engine does (backends/tensorrt/options.py):
    the bundle then promises only the shapes the DLA runs, and the runtime refuses others in one line
    instead of TensorRT failing on the device (a --split part placed on a DLA pins the batch)."""
    specs = _resolve_input_specs(loaded, cfg, calib)
    if cfg.dla:
        return [_pinned(s, lambda dim: True) for s in specs]
    if cfg.split and cfg.place and "dla" in cfg.place.lower():
        return [_pinned(s, lambda dim, s=s: bool(s.shape) and dim == s.shape[0]) for s in specs]
    return specs


def _pinned(spec: TensorSpec, which) -> TensorSpec:
    ranges = {dim: (DimRange(r.opt, r.opt, r.opt) if which(dim) else r) for dim, r in spec.ranges.items()}
    return TensorSpec(spec.name, spec.dtype, spec.shape, ranges)


def _resolve_input_specs(loaded: LoadedModel, cfg: CompileConfig, calib: Dataset | None) -> list[TensorSpec]:
    flags = [parse_input_flag(t) for t in cfg.inputs]
    dynamic = [parse_dynamic_flag(t) for t in cfg.dynamic]
    if loaded.input_specs:
        specs = loaded.input_specs
        if flags:
            raise InputError(f"{loaded.format} models carry their own input specs", field="--input",
                             fix="drop --input")
        dynamic_batch = dynamic_batch_input(specs)
        if not cfg.dynamic_batch and dynamic_batch:
            # The program's (or ONNX graph's) own dims decide; silently keeping a dynamic batch would
            # ignore the flag.
            raise InputError(f"axis 0 of {dynamic_batch!r} is dynamic in the model file itself",
                             file=loaded.source, field="--static-batch",
                             fix="drop --static-batch, or export the model with a fixed batch")
        return _apply_ranges(specs, dynamic, cfg.max_batch, loaded.source)
    if flags:
        specs = flags
    elif calib is not None:
        specs = specs_from_dataset(calib)
    else:
        raise InputError("cannot tell the model's input names, shapes and dtypes", file=loaded.source,
                         fix="pass --calib data.npz or --input NAME:SHAPE:DTYPE for every input")
    where = "--input" if flags else (str(calib.path) if calib else "--input")
    if loaded.signature is not None:
        # Required parameters plus the optional ones the data names; defaults stay defaults.
        by_name = {s.name: s for s in specs}
        specs = [by_name[n] for n in loaded.signature.select(by_name, where=where)]
    elif loaded.input_names:
        by_name = {s.name: s for s in specs}
        names = loaded.input_names
        missing = [n for n in names if n not in by_name]
        extra = [n for n in by_name if n not in names]
        if missing or extra:
            raise InputError(f"model inputs are ({', '.join(names)}) but got ({', '.join(by_name)})", file=where,
                             field=(missing or extra)[0], fix="name the data keys / --input after forward()'s arguments")
        specs = [by_name[n] for n in names]
    return apply_dynamic_axes(specs, dynamic, dynamic_batch=cfg.dynamic_batch,
                              max_batch=cfg.max_batch or DEFAULT_MAX_BATCH)


def _apply_ranges(specs, dynamic, max_batch, source):
    """Formats with their own symbolic dims: give them ranges; --dynamic may only refine those, and an
    explicit --max-batch lowers the model's own batch bound (never raises it: the program may not run)."""
    from ..iospec import DimRange

    out = []
    for spec in specs:
        ranges = dict(spec.ranges)
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and dim not in ranges:
                ranges[dim] = DimRange(1, 1, max_batch or DEFAULT_MAX_BATCH) if axis == 0 else DimRange(1, 1, 4096)
        if max_batch is not None and spec.shape and isinstance(spec.shape[0], str):
            own = ranges[spec.shape[0]]
            if not own.min <= max_batch <= own.max:
                raise InputError(f"the model's own batch range for {spec.name!r} is {own.min}..{own.max}", file=source,
                                 field="--max-batch", fix=f"give a value from {own.min} to {own.max}, or leave it out")
            ranges[spec.shape[0]] = DimRange(own.min, min(own.opt, max_batch), max_batch)
        for d in dynamic:
            if d.input != spec.name:
                continue
            if d.axis >= len(spec.shape) or not isinstance(spec.shape[d.axis], str):
                raise InputError(f"axis {d.axis} of {spec.name!r} is static in the model", field="--dynamic",
                                 fix="re-export the model with that axis dynamic")
            ranges[spec.shape[d.axis]] = d.range
        out.append(TensorSpec(spec.name, spec.dtype, spec.shape, ranges))
    return out


def synth_feeds(specs: list[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Shape-only inputs for tracing when no data is given (never used for calibration)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = s.concrete_shape(batch)
        if np.dtype(s.dtype).kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype == "bool":
            feeds[s.name] = np.ones(shape, dtype=bool)
        else:
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
    return feeds


def sample_feeds(data: Dataset | None, specs, n: int) -> dict[str, np.ndarray]:
    """``n`` samples of ``data`` as one batch; a model whose batch is fixed (a .pt2 exported at batch 1)
    gets its own batch, as synth_feeds gives it (its program guards the batch size)."""
    if data is None:
        return synth_feeds(specs, n)
    if specs and specs[0].shape and isinstance(specs[0].shape[0], int):
        n = batch_of(specs)
    feeds = {s.name: data.arrays[s.name][:n] for s in specs}
    have = next(iter(feeds.values())).shape[0]
    if have < n:  # tile to reach batch n (torch.export specializes batch 1)
        reps = -(-n // have)
        feeds = {k: np.concatenate([v] * reps)[:n] for k, v in feeds.items()}
    return {k: np.ascontiguousarray(v) for k, v in feeds.items()}


def batch_of(specs) -> int:
    first = specs[0].shape[0] if specs and specs[0].shape else 1
    return first if isinstance(first, int) and first > 0 else 1


def timing_batches(specs) -> tuple[int, ...]:
    """The batch sizes choices are timed at: the fixed batch, or 1 and 8 within the declared batch range
    (the winner changes with batch: issue #20)."""
    first = specs[0] if specs else None
    if first is None or not first.shape or isinstance(first.shape[0], int):
        return (batch_of(specs),)
    rng = first.ranges.get(first.shape[0])
    low, high = (rng.min, rng.max) if rng is not None else (1, 8)
    return tuple(sorted({max(low, 1), max(min(8, high), 1)}))


def split_calib(calib: Dataset | None, evald: Dataset | None, cfg: CompileConfig, specs):
    """(calibration arrays, held-out Dataset or None, what judges the bundle): without --eval, compile
    calibrates on part of --calib and judges on samples it did not calibrate on (edgemm.data.hold_out)."""
    judged_on = None
    if evald is not None:
        judged_on = {"source": "--eval", "samples": evald.num_samples,
                     "description": f"{evald.num_samples} samples of {Path(cfg.eval).name} (--eval)"}
    if calib is None:
        return None, None, judged_on
    if evald is not None:
        return {s.name: calib.arrays[s.name][:cfg.calib_samples] for s in specs}, None, judged_on
    split = hold_out(calib.num_samples, cap=cfg.calib_samples, multiple=batch_of(specs))
    labels = calib.labels[split.judge] if calib.labels is not None else None
    judge = Dataset(calib.path, {s.name: calib.arrays[s.name][split.judge] for s in specs}, labels, calib.sha256)
    judged_on = {"source": "--calib", "samples": judge.num_samples, "range": [split.judge.start, split.judge.stop],
                 "description": split.describe(Path(cfg.calib).name)}
    return {s.name: calib.arrays[s.name][split.calibrate] for s in specs}, judge, judged_on


def check_token_ids_onnx(onnx_path: Path, datasets) -> None:
    """Every integer input that indexes an embedding holds ids within its table (data.check_token_ids)."""
    from ..data import check_token_ids
    from ..onnx_graph import embedding_sizes

    datasets = [d for d in datasets if d is not None]
    if not datasets:
        return
    vocab = embedding_sizes(load_graph(onnx_path))
    for ds in datasets:
        check_token_ids(ds, vocab)


def check_token_ids_torch(loaded, specs, datasets) -> None:
    """Before the model runs (export runs it on the first samples): an integer input's ids must be below
    the largest embedding table in the module, or no embedding can take them. The exact table each
    input feeds is checked on the exported graph (check_token_ids_onnx)."""
    module = loaded.module
    modules = getattr(module, "modules", None)
    if modules is None:
        return
    rows = []
    for m in modules():
        if type(m).__name__ == "Embedding" or getattr(m, "original_name", None) == "Embedding":
            weight = getattr(m, "weight", None)
            if weight is not None and getattr(weight, "ndim", 0) == 2:
                rows.append(int(weight.shape[0]))
    if not rows:
        return
    from ..data import check_token_ids

    from ..modality import input_modality, is_mask

    # Only integer inputs that are text (token ids), never masks or uint8 images: those may hold values
    # above every table's size legitimately.
    integer = {s.name: max(rows) for s in specs if s.dtype.startswith(("int", "uint"))
               and not is_mask(s.name, s.dtype) and input_modality(s.name, s.dtype, s.shape) == "text"}
    for ds in (d for d in datasets if d is not None):
        check_token_ids(ds, integer, largest=True)
