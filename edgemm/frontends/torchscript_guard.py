"""What makes a TorchScript archive safe to load and run without ``--trust-pickle``.

TorchScript is a restricted language, but still a program: its operators include ``aten::from_file``
(file-backed, optionally shared, memory), ``aten::save`` and ``prim::PythonOp``. Two moments run it:
- **loading**: ``torch.jit.load`` calls a class's TorchScript ``__setstate__`` while it unpickles the module
  state, and a custom C++ class's native ``__setstate__``; so, before torch sees the file, its source and
  pickles are searched for both (``check_archive``);
- **running**: every method of every class and every function the archive compiles is walked, nested
  blocks and forked subgraphs included, and each node must be an allowed operator (``op_policy``) over
  values that are not custom classes (``check_program``). Walking the whole compilation unit, not only
  what ``forward`` reaches, needs no call-graph resolution and cannot be blown up by inlining.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ..errors import InputError, SecurityError
from .op_policy import TRUST_FIX, operator_refusal, type_refusal

# Members torch reads as code or unpickles: compiled source (code/**.py) and pickles (data.pkl,
# constants.pkl). Debug pickles hold source ranges only; tensor storages (data/N) are raw numbers.
_SCANNED = re.compile(r".*(\.py|(?<!debug)\.pkl)$")
_LOAD_HOOKS = {b"__setstate__": "defines __setstate__, which torch.jit.load runs while it loads the file",
               b"torch.classes": "uses a custom C++ class, whose native code runs while the file loads"}


def check_archive(path: Path) -> None:
    """Refuse an archive whose loading alone would run code from it (before torch.jit.load)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not _SCANNED.fullmatch(info.filename):
                    continue
                data = zf.read(info)
                for needle, why in _LOAD_HOOKS.items():
                    if needle in data:
                        raise SecurityError(f"the program {why}", file=path, field=info.filename, fix=TRUST_FIX)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise InputError(f"not a readable TorchScript archive ({type(exc).__name__}: {exc})", file=path,
                         fix="re-save it with torch.jit.save") from exc


def check_program(unit, path: Path) -> None:
    """Refuse the program if any graph of ``unit`` (the compilation unit ``torch.jit.load`` fills: every
    method and free function the archive defines) calls an operator outside the allow-list, or handles a
    value whose type runs native code of its own."""
    walked: set[str] = set()
    while True:  # reading a function's graph may define more (lazy compilation): walk to a fixed point
        pending = [fn for fn in unit.get_functions() if fn.qualified_name not in walked]
        if not pending:
            return
        for fn in pending:
            walked.add(fn.qualified_name)
            _check_function(fn, path)


def _check_function(fn, path: Path) -> None:
    """Every node of the function's graph, nested blocks and subgraphs included."""
    where = fn.qualified_name
    graph = fn.graph
    for value in graph.inputs():
        _check_value(value, where, path)
    blocks = [graph]
    while blocks:  # iterative: nesting depth is the file's choice
        block = blocks.pop()
        for node in block.nodes():
            kind = node.kind()
            why = operator_refusal(kind)
            if why:
                raise SecurityError(f"calls {kind}, which {why}; edgemm runs only pure tensor "
                                    f"operators without trust", file=path, field=where, fix=TRUST_FIX)
            for value in node.outputs():
                _check_value(value, where, path)
            blocks.extend(node.blocks())
            for attr in node.attributeNames():
                attr_kind = node.kindOf(attr)
                if attr_kind == "g":       # prim::fork / awaitable subgraphs
                    blocks.append(node.g(attr))
                elif attr_kind == "gs":
                    blocks.extend(node.gs(attr))


def _check_value(value, where: str, path: Path) -> None:
    jit_type = value.type()
    why = type_refusal(jit_type)
    if why:
        raise SecurityError(f"handles a value of type {str(jit_type)[:80]}, which {why}", file=path,
                            field=where, fix=TRUST_FIX)

