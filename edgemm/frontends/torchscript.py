"""TorchScript archives (torch.jit.save). TorchScript code is a restricted language, not pickle."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, first_line
from ..signature import from_torchscript
from .base import LoadedModel, LoadOptions, ensure_eval, sha256_of


def load(spec: str, options: LoadOptions) -> LoadedModel:
    import torch

    path = Path(spec)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError/etc. for corrupt archives
        raise InputError(f"cannot load TorchScript archive ({first_line(exc, None)})", file=path,
                         fix="re-save it with torch.jit.save, or pass a .pt2 / .onnx file") from exc
    loaded = LoadedModel(source=spec, format="torchscript", sha256=sha256_of(path), name=path.stem,
                         module=module)
    ensure_eval(module, loaded)
    loaded.signature = from_torchscript(module)
    loaded.input_names = loaded.signature.required if loaded.signature is not None else None
    return loaded
