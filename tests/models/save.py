"""Save a ModelCase the ways its author would, and write its calibration and held-out evaluation data.

Formats:
- ``torchscript``: ``torch.jit.trace(model, args, strict=False)`` (``example_kwarg_inputs`` for a
  keyword-only forward), ``torch.jit.save``;
- ``script``: ``torch.jit.script(model)``;
- ``pt2``: ``torch.export.export(model, args)`` with a dynamic batch;
- ``pt2-kw``: ``torch.export.export(model, (), kwargs=...)`` with a dynamic batch (the Hugging Face way);
- ``factory``: ``tests.models.<module>:<factory>`` + ``--weights`` (a ``state_dict`` saved with torch.save).

Where torch itself cannot save a model in a format, the format is recorded as not saved with torch's own
first error line; the matrix shows it as n/a with that reason.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ModelCase

FORMATS = ("torchscript", "script", "pt2", "pt2-kw", "factory")
EXAMPLE_BATCH = 2
MAX_BATCH = 64
CALIB_SAMPLES = 64
EVAL_SAMPLES = 32


@dataclass
class Saved:
    format: str
    model: str | None  # what `edgemm compile` takes (a path or a factory reference); None: not saved
    weights: str | None = None
    reason: str = ""  # why torch could not save it
    notes: list[str] = field(default_factory=list)

    @property
    def compile_args(self) -> list[str]:
        return [self.model] + (["--weights", self.weights] if self.weights else [])

    @property
    def reference_args(self) -> list[str]:
        return ["--reference", self.model] + (["--weights", self.weights] if self.weights else [])


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = re.sub(r" at 0x[0-9a-f]+", "", text[0] if text else "")  # object addresses change every run
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # torch colours some messages
    return f"{type(exc).__name__}: {line}"[:240]


def write_data(case: ModelCase, folder: Path) -> dict[str, Path]:
    """calib.npz (seed 1) and eval.npz (seed 2, held out: never seen by calibration)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"calib": folder / "calib.npz", "eval": folder / "eval.npz"}
    np.savez(paths["calib"], **case.data(CALIB_SAMPLES, seed=1))
    np.savez(paths["eval"], **case.data(EVAL_SAMPLES, seed=2))
    return paths


def _example(case: ModelCase):
    import torch

    return {k: torch.from_numpy(v) for k, v in case.data(EXAMPLE_BATCH, seed=123).items()}


def _batch_dims(case: ModelCase):
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {name: {0: batch} for name in case.input_names}


def _save_torchscript(case, model, example, path: Path, notes):
    import torch

    def trace():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.keyword_only:
                return torch.jit.trace(model, example_kwarg_inputs=example, strict=False, check_trace=False)
            return torch.jit.trace(model, tuple(example.values()), strict=False, check_trace=False)

    try:
        traced = trace()
    except RuntimeError as exc:
        config = getattr(model, "config", None)
        if config is None or "Tracer cannot infer type" not in str(exc):
            raise
        # Hugging Face's TorchScript recipe: ModelOutput objects cannot be traced, tuples can.
        config.return_dict = False
        try:
            traced = trace()
        finally:
            config.return_dict = True
        notes.append("traced with config.return_dict=False (the Hugging Face TorchScript recipe)")
    torch.jit.save(traced, str(path))


def _save_script(case, model, example, path: Path, notes):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))


def _export(model, args, kwargs, dims, notes):
    """torch.export with a dynamic batch; where torch specializes the batch, a static export (noted)."""
    import torch

    try:
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dims)
    except Exception as exc:  # torch refuses the dynamic batch: the author would export a static one
        notes.append(f"static batch {EXAMPLE_BATCH} (dynamic batch refused by torch.export: {first_line(exc)})")
        return torch.export.export(model, args, kwargs=kwargs)


def _save_pt2(case, model, example, path: Path, notes):
    import torch

    if case.keyword_only:
        raise TypeError("forward() takes keyword-only arguments: there is no positional export")
    dims = tuple(_batch_dims(case).values())
    torch.export.save(_export(model, tuple(example.values()), None, dims, notes), str(path))


def _save_pt2_kw(case, model, example, path: Path, notes):
    import torch

    torch.export.save(_export(model, (), example, _batch_dims(case), notes), str(path))


_SAVERS = {"torchscript": (_save_torchscript, "model.pt"), "script": (_save_script, "model_script.pt"),
           "pt2": (_save_pt2, "model.pt2"), "pt2-kw": (_save_pt2_kw, "model_kw.pt2")}


def save_case(case: ModelCase, folder: Path, formats=FORMATS) -> dict[str, Saved]:
    """Write ``case`` in ``formats`` under ``folder``; returns format -> Saved."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model = case.build().eval()  # authors save in eval mode; the factory hands it over untouched
    example = _example(case)
    out: dict[str, Saved] = {}
    for fmt in formats:
        notes: list[str] = []
        if fmt == "factory":
            weights = folder / "weights.pt"
            torch.save(model.state_dict(), str(weights))
            out[fmt] = Saved(fmt, case.factory_ref, weights=str(weights))
            continue
        saver, filename = _SAVERS[fmt]
        path = folder / filename
        try:
            with torch.no_grad():
                saver(case, model, example, path, notes)
        except Exception as exc:
            path.unlink(missing_ok=True)
            out[fmt] = Saved(fmt, None, reason=f"torch cannot save it: {first_line(exc)}")
            continue
        out[fmt] = Saved(fmt, str(path), notes=notes)
    return out
