"""TorchScript archives (torch.jit.save). TorchScript is a restricted language, not pickle, but still a
program: without --trust-pickle, torchscript_guard vets the archive before it loads and its graphs before
anything runs."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, first_line
from ..signature import from_torchscript
from .base import LoadedModel, LoadOptions, ensure_eval, sha256_of
from .torchscript_guard import check_archive, check_program


def load(spec: str, options: LoadOptions) -> LoadedModel:
    path = Path(spec)
    if not options.trust_pickle:
        check_archive(path)
    try:
        module, unit = _import(path)
    except Exception as exc:  # torch raises RuntimeError/ValueError/etc. for corrupt archives
        raise InputError(f"cannot load TorchScript archive ({first_line(exc, None)})", file=path,
                         fix="re-save it with torch.jit.save, or pass a .pt2 / .onnx file") from exc
    if not options.trust_pickle:
        check_program(unit, path)
    loaded = LoadedModel(source=spec, format="torchscript", sha256=sha256_of(path), name=path.stem,
                         module=module)
    ensure_eval(module, loaded)
    loaded.signature = from_torchscript(module)
    loaded.input_names = loaded.signature.required if loaded.signature is not None else None
    return loaded


def _import(path: Path):
    """torch.jit.load, keeping its compilation unit: the only handle on every function the archive
    defines (free functions are reachable from no module attribute). Same calls as torch.jit.load."""
    import torch
    from torch.jit._recursive import wrap_cpp_module

    unit = torch._C.CompilationUnit()
    cpp_module = torch._C.import_ir_module(unit, str(path), torch.device("cpu"), {}, False)
    return wrap_cpp_module(cpp_module), unit
