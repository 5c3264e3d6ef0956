"""The pytree types a torch.export archive needs before it loads.

A program's input and output structures (``in_spec`` / ``out_spec``) are stored as serialized tree specs
that name each container type, e.g. ``transformers.models.clip.modeling_clip.CLIPOutput`` for a Hugging
Face model. torch can only rebuild a type that is registered as a pytree node in this process: Hugging
Face ``ModelOutput`` classes register themselves when their module is imported. So, before loading, read
the names, import the modules of allow-listed, installed libraries (library code the user installed, never
a module the file picks freely), and refuse anything else in one line naming the type and its package.
"""

from __future__ import annotations

import importlib
import json
import re
import zipfile
from pathlib import Path

from ..errors import InputError

# Libraries whose output classes register themselves as pytree nodes when their module is imported.
KNOWN_PACKAGES = {
    "transformers": "transformers",
}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def required_types(path: Path) -> set[str]:
    """Serialized type names in the archive's tree specs (empty when there are none or it is unreadable;
    torch's own loader then reports the damage)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("models/model.json")]
            docs = [zf.read(n) for n in names]
    except Exception:  # noqa: BLE001 - a damaged archive: torch's loader (after the CRC check) reports it
        return set()
    found: set[str] = set()
    for raw in docs:
        try:
            graph = json.loads(raw).get("graph_module", {})
        except (ValueError, AttributeError, RecursionError):  # torch's own loader reports a damaged file
            continue
        if not isinstance(graph, dict):
            continue
        entries = graph.get("module_call_graph")
        for entry in entries if isinstance(entries, list) else []:
            signature = entry.get("signature") if isinstance(entry, dict) else None
            if not isinstance(signature, dict):
                continue
            for key in ("in_spec", "out_spec"):
                spec = signature.get(key)
                if isinstance(spec, str):
                    _collect(_parse_spec(spec), found)
    return found


def register_types(path: Path) -> list[str]:
    """Make every type ``path`` needs known to torch's pytree; return the modules imported. Raises
    InputError naming a type no allow-listed library provides."""
    from torch.utils import _pytree as pytree

    imported = []
    for name in sorted(required_types(path)):
        shown = name if len(name) <= 120 else name[:120] + "..."
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module_name, _, cls_name = name.rpartition(".")
        package = module_name.split(".")[0]
        if package not in KNOWN_PACKAGES or not _DOTTED.match(name):
            raise InputError(f"its inputs/outputs use the type {shown}, which edgemm does not import for an archive "
                             f"(only types of {', '.join(sorted(KNOWN_PACKAGES))})", file=path, field="out_spec",
                             fix="return tensors, tuples or dicts from forward() and export again, or compile the "
                                 "model's factory (package.module:function)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InputError(f"the program returns {name}, from {package}, which is not installed here", file=path,
                             field="out_spec", fix=f"pip install {KNOWN_PACKAGES[package]}") from exc
        cls = getattr(module, cls_name, None)
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and isinstance(cls, type):
            _register(cls)  # e.g. a ModelOutput class not yet instantiated on a registering version
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise InputError(f"the program returns {name}, which {package} here does not provide", file=path,
                             field="out_spec", fix=f"install the {package} version the model was exported with")
        imported.append(module_name)
    return imported


def _register(cls) -> None:
    """Hugging Face ModelOutput subclasses register on creation; older versions only on instantiation."""
    try:
        from transformers.utils.generic import ModelOutput, _register_model_output_pytree_node
    except ImportError:
        return
    if issubclass(cls, ModelOutput):
        _register_model_output_pytree_node(cls)


def _parse_spec(text: str):
    """A serialized tree spec is ``[protocol, {"type", "context", "children_spec"}]`` as JSON."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return doc[1] if isinstance(doc, list) and len(doc) == 2 else None


def _collect(node, found: set[str], depth: int = 0) -> None:
    if not isinstance(node, dict) or depth > 200:
        return
    name = node.get("type")
    if isinstance(name, str) and name:
        found.add(name)
    children = node.get("children_spec")
    for child in children if isinstance(children, list) else []:
        _collect(child, found, depth + 1)
