"""Fully pickled modules (``torch.save(model)``). Unpickling runs code from the file, so it is refused
unless the user passes ``--trust-pickle``; loading always tries ``weights_only=True`` first."""

from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import InputError, SecurityError, first_line
from .base import LoadedModel, LoadOptions, ensure_eval, sha256_of, torch_warnings_logged


def load(spec: str, options: LoadOptions) -> LoadedModel:
    import torch

    path = Path(spec)
    try:
        with torch_warnings_logged(path):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_like_pickle(path):  # garbage bytes, not a refused pickle
            raise InputError(f"cannot read model file ({first_line(exc, None)})", file=path,
                             fix="check that the file was copied whole; re-save the model") from exc
        if not options.trust_pickle:
            raise SecurityError("is a pickled Python object; loading it would run code from the file",
                                file=path, fix="save a TorchScript (.pt) or torch.export (.pt2) model, or pass "
                                               "--trust-pickle if you trust its author") from exc
        obj = _load_trusted(path)
    except Exception as exc:
        raise InputError(f"cannot read model file ({first_line(exc, None)})", file=path,
                         fix="check that the file was copied whole; re-save the model") from exc
    if isinstance(obj, dict):
        raise InputError("holds a state_dict, not a model", file=path,
                         fix="pass package.module:function --weights this_file")
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"holds a {type(obj).__name__}, not a torch.nn.Module", file=path,
                         fix="save the model with torch.jit.save or torch.export.save")
    return _wrap(spec, path, obj)


def _looks_like_pickle(path: Path) -> bool:
    """A torch.save zip archive, or a pickle of any protocol. pickletools only parses the opcodes (it
    never executes them), so this is safe on hostile files."""
    import pickletools

    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            return True
        f.seek(0)
        try:
            for _ in pickletools.genops(f):
                pass
        except Exception:  # garbage: not a pickle
            return False
    return True


def _load_trusted(path: Path):
    import torch

    try:
        with torch_warnings_logged(path):
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"cannot unpickle model ({first_line(exc, None)})", file=path,
                         fix="re-save the model; its classes must be importable here") from exc


def _wrap(spec: str, path: Path, module) -> LoadedModel:
    from ..signature import from_callable

    loaded = LoadedModel(source=spec, format="pickle", sha256=sha256_of(path), name=path.stem, module=module)
    ensure_eval(module, loaded)
    loaded.signature = from_callable(module.forward, f"{type(module).__name__}.forward()")
    loaded.input_names = loaded.signature.required
    loaded.notes.append("loaded a pickled module with --trust-pickle")
    return loaded
