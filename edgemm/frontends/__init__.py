"""Model input formats. One module per format; ``load_model`` picks by file type.

To add a format: write ``frontends/<format>.py`` with ``load(spec, options) -> LoadedModel`` and add a
detection rule in ``detect_format``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ..errors import InputError
from ..paths import require_regular_file
from .base import LoadedModel, LoadOptions, check_zip_crc

__all__ = ["load_model", "LoadedModel", "LoadOptions", "detect_format"]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def detect_format(spec: str) -> str:
    path = Path(spec)
    if not path.exists() and _FACTORY_RE.match(spec):
        return "factory"
    if not path.exists():
        raise InputError("no such file", file=spec,
                         fix="pass a .pt/.jit (TorchScript), .pt2 (torch.export), .onnx file or package.module:function")
    if path.is_dir():
        raise InputError("is a directory, expected a model file", file=spec,
                         fix="pass the model file itself (.pt, .pt2, .onnx)")
    require_regular_file(path, field="MODEL", fix="pass the model file itself (not a pipe, device or socket)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "exported_program"
    if suffix in (".pt", ".pth", ".jit", ".ts"):
        return _sniff_torch_archive(path)
    raise InputError(f"unknown model file type {suffix or '(none)'!r}", file=spec,
                     fix="use .pt/.jit (TorchScript), .pt2 (torch.export), .onnx, or package.module:function")


def _sniff_torch_archive(path: Path) -> str:
    """TorchScript archives hold compiled code under */code/; torch.save pickles do not."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        # Legacy (non-zip) torch.save files are pickles too; let the pickle frontend refuse them.
        return "pickle"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return "exported_program"
    return "pickle"


def load_model(spec: str, options: LoadOptions | None = None) -> LoadedModel:
    options = options or LoadOptions()
    fmt = detect_format(spec)
    if options.weights and fmt != "factory":
        # Only a factory builds a fresh module to load weights into; every file format carries its own,
        # so the flag would be dropped silently and the user would compile weights they did not mean.
        raise InputError(f"applies to a package.module:function factory only; this {fmt} model carries its "
                         f"own weights, so {options.weights} would be ignored", file=spec, field="--weights",
                         fix="drop --weights, or pass the factory that builds this architecture")
    if fmt in ("torchscript", "exported_program", "pickle"):
        check_zip_crc(Path(spec))
    if fmt == "onnx":
        from . import onnx_file as mod
    elif fmt == "exported_program":
        from . import exported_program as mod
    elif fmt == "torchscript":
        from . import torchscript as mod
    elif fmt == "factory":
        from . import factory as mod
    else:
        from . import pickled as mod
    return mod.load(spec, options)
