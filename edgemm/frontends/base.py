"""What every frontend returns."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..iospec import TensorSpec

log = logging.getLogger("edgemm")


@dataclass
class LoadOptions:
    weights: str | None = None          # for factories: .safetensors or a state_dict .pt
    trust_pickle: bool = False          # allow unpickling a full nn.Module (runs code from the file)


@dataclass
class LoadedModel:
    source: str                         # path or package.module:function, as given
    format: str                         # torchscript | exported_program | onnx | factory | pickle
    sha256: str                         # of the model file (and weights file, for factories)
    name: str                           # default bundle name
    module: Any = None                  # a callable torch module (None for ONNX)
    onnx_path: Path | None = None       # for ONNX inputs
    input_names: list[str] | None = None
    input_specs: list[TensorSpec] | None = None   # when the format itself carries them
    example_inputs: tuple | None = None           # .pt2 example inputs
    notes: list[str] = field(default_factory=list)

    @property
    def is_torch(self) -> bool:
        return self.module is not None


def sha256_of(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def ensure_eval(module, loaded: LoadedModel) -> None:
    """Models always run in eval mode; say so when one arrived in training mode."""
    training = getattr(module, "training", False)
    if training:
        msg = f"{loaded.source}: model arrived in training mode; switched to eval() (dropout/batch-norm frozen)"
        log.warning(msg)
        loaded.notes.append(msg)
    if hasattr(module, "eval"):
        module.eval()
    if hasattr(module, "modules"):
        stragglers = [n for n, m in module.named_modules() if getattr(m, "training", False)]
        if stragglers:
            raise RuntimeError(f"submodules still in training mode after eval(): {stragglers[:3]}")
