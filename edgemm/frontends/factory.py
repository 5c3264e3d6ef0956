"""``package.module:function`` factories, with optional weights (.safetensors, or a state_dict .pt
loaded with ``weights_only=True``). Importing the module runs the user's own code, by their choice."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import InputError, SecurityError, first_line
from ..paths import require_regular_file
from ..signature import from_callable
from .base import LoadedModel, LoadOptions, ensure_eval, sha256_of, torch_warnings_logged
from .factory_guard import build, check_factory, check_module_name


def load(spec: str, options: LoadOptions) -> LoadedModel:
    import hashlib

    module_name, func_name = spec.split(":")
    check_module_name(module_name, spec)
    mod = _import(module_name)
    factory = getattr(mod, func_name, None)
    if not callable(factory):
        raise InputError(f"{module_name} has no callable {func_name!r}", field="MODEL",
                         fix="name a function that returns a torch.nn.Module")
    check_factory(factory, spec)
    model = build(factory, spec)
    digest = hashlib.sha256(spec.encode())
    if options.weights:
        wpath = Path(options.weights)
        state = load_state_dict(wpath)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(f"weights do not fit the model ({first_line(exc, None)})", file=wpath,
                             field="state_dict", fix="pass weights saved from this architecture") from exc
        digest.update(sha256_of(wpath).encode())
    loaded = LoadedModel(source=spec, format="factory", sha256=digest.hexdigest(), name=func_name, module=model)
    ensure_eval(model, loaded)
    loaded.signature = from_callable(model.forward, f"{type(model).__name__}.forward()")
    loaded.input_names = loaded.signature.required
    return loaded


def _import(module_name: str):
    """Import the user's module (their code, their choice) without writing __pycache__ beside it: a
    compile touches no file outside its output."""
    import sys

    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import {module_name!r} ({first_line(exc, None)})", field="MODEL",
                         fix="install the package or add its folder to PYTHONPATH") from exc
    except BaseException as exc:  # noqa: BLE001 - the module's own code failed (SyntaxError, SystemExit, ...)
        raise InputError(f"importing {module_name!r} raised {type(exc).__name__}: {first_line(exc, 200, '')}"
                         .rstrip(": "), field="MODEL", fix="fix the module, or import it by hand to see the "
                                                             "traceback") from exc
    finally:
        sys.dont_write_bytecode = saved


def load_state_dict(path: Path) -> dict:
    if not os.path.lexists(path):
        raise InputError("no such weights file", file=path, field="--weights", fix="check the --weights path")
    require_regular_file(path, field="--weights", fix="pass a .safetensors or state_dict .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise InputError(f"not a valid safetensors file ({first_line(exc, None)})", file=path,
                             fix="re-save with safetensors.torch.save_file") from exc
    import pickle

    import torch

    try:
        with torch_warnings_logged(path):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _looks_like_safetensors(path):
            raise InputError(f"is a safetensors file, but its name ends in {path.suffix or '(no suffix)'!r}",
                             file=path, field="--weights", fix="rename it to end in .safetensors") from exc
        raise SecurityError("the weights file holds more than tensors and would run code when unpickled",
                            file=path, fix="save model.state_dict() (or use .safetensors)") from exc
    except Exception as exc:
        raise InputError(f"cannot read weights ({first_line(exc, None)})", file=path,
                         fix="save model.state_dict() with torch.save or safetensors") from exc
    if not isinstance(state, dict):
        raise InputError(f"holds a {type(state).__name__}, not a state_dict", file=path,
                         fix="save model.state_dict()")
    return state


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object of that length."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8
