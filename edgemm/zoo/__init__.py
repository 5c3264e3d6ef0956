"""Reference model zoo: three small fused multimodal models with synthetic data and shipped weights.

- ``dual-encoder``  (late fusion)      image + caption -> embeddings; metric image->text ``recall@1``
- ``cross-attention`` (VQA)            image + question -> answer logits; metric ``top1``
- ``early-fusion``  (audio + image)    log-mel + image -> class logits; metric ``top1``

Importing this package is cheap (numpy only); torch is imported by ``build``/``write_example``.
Retrain with ``python -m edgemm.zoo.train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from . import registry
from . import datasets
from .datasets import DEFAULT_SIZES, SPLITS
from .registry import ZooModel, build

__all__ = ["ZooModel", "names", "get", "build", "make_data", "write_example"]


def names() -> list[str]:
    """Names of the zoo models."""
    return registry.names()


def get(name: str) -> ZooModel:
    """The model card of ``name``; InputError listing the known names if there is none."""
    return registry.card(name)


def make_data(name: str, split: str, n: int | None = None) -> dict[str, np.ndarray]:
    """Seeded synthetic data: model inputs keyed by input name (axis 0 = samples), plus int64 ``labels``
    for the ``train`` and ``eval`` splits. ``n`` defaults to 8192 / 128 / 512 for train / calib / eval."""
    registry.check_name(name)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}", field="split", fix=f"use one of {', '.join(SPLITS)}")
    if n is None:
        n = DEFAULT_SIZES[split]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"sample count must be a positive integer, got {n!r}", field="n",
                         fix="pass n >= 1 or leave it out for the split's default")
    return datasets.make(name, split, int(n))


def write_example(name: str, out_dir: str | Path, *, calib_size: int | None = None) -> dict[str, Path]:
    """Write ``model.pt`` (TorchScript), ``model.pt2`` (ExportedProgram, dynamic batch), ``calib.npz``
    (``calib_size`` samples, default 128) and ``eval.npz`` (with ``labels``) under ``out_dir``. Returns
    {"torchscript", "exported_program", "calib", "eval"} -> path."""
    from .example import write_example as _write

    if calib_size is not None and (isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1):
        raise InputError(f"calib_size must be a positive integer, not {calib_size!r}", field="calib_size",
                         fix="e.g. calib_size=1024")
    return _write(registry.check_name(name), Path(out_dir), calib_size=calib_size)
