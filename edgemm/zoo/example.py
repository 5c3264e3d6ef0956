"""``write_example``: a zoo model as the files a user hands to ``edgemm compile``.

``model.pt`` is a traced TorchScript module, ``model.pt2`` a ``torch.export`` ExportedProgram whose batch
dimension is dynamic (1..1024); ``calib.npz`` holds model inputs only, ``eval.npz`` inputs plus ``labels``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import datasets, registry
from ._atomic import atomic_open

MAX_BATCH = 1024
# Trace/export with a batch of 2: a batch of 1 invites exporters to specialise the dimension to 1.
_EXAMPLE_BATCH = 2


def example_inputs(name: str, batch: int = _EXAMPLE_BATCH) -> tuple[torch.Tensor, ...]:
    data = datasets.make(name, "calib", batch)
    return tuple(torch.from_numpy(data[key]) for key in registry.card(name).input_names)


def export_program(name: str, model: torch.nn.Module) -> "torch.export.ExportedProgram":
    """``torch.export`` with a dynamic batch dimension shared by every input."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    card = registry.card(name)
    dynamic_shapes = {key: {0: batch} for key in card.input_names}
    return torch.export.export(model, example_inputs(name), dynamic_shapes=dynamic_shapes)


def trace(name: str, model: torch.nn.Module) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.trace(model, example_inputs(name))


def write_example(name: str, out_dir: Path, *, calib_size: int | None = None) -> dict[str, Path]:
    """``calib_size``: calibration samples to write (default ``datasets.DEFAULT_SIZES["calib"]``; pruning
    recovery wants ~1000, INT8 calibration a few hundred at most)."""
    from .registry import build

    out_dir.mkdir(parents=True, exist_ok=True)
    model = build(name)
    paths = {"torchscript": out_dir / "model.pt", "exported_program": out_dir / "model.pt2",
             "calib": out_dir / "calib.npz", "eval": out_dir / "eval.npz"}
    with atomic_open(paths["torchscript"]) as handle:
        torch.jit.save(trace(name, model), handle)
    with atomic_open(paths["exported_program"]) as handle:
        torch.export.save(export_program(name, model), handle)
    sizes = dict(datasets.DEFAULT_SIZES, **({"calib": calib_size} if calib_size else {}))
    for split in ("calib", "eval"):
        with atomic_open(paths[split]) as handle:
            np.savez(handle, **datasets.make(name, split, sizes[split]))
    return paths
