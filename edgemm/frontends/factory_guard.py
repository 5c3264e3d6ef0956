"""What may stand as a model factory (``package.module:function``).

Typing ``mypkg.models:build`` is consent to import ``mypkg.models`` and call ``build``: that is the user's
own code. It is not consent to call whatever a name happens to reach: ``sys:exit`` would end edgemm with
exit 0 and no bundle, ``os:abort`` kill it, ``builtins:breakpoint`` or ``code:interact`` read commands
from stdin, ``shutil:rmtree`` delete files. So a factory must be a Python function (or an ``nn.Module``
subclass) that does not come from the standard library, and anything it raises, ``SystemExit`` and
``KeyboardInterrupt`` included, or returns other than an ``nn.Module``, is one error line.
"""

from __future__ import annotations

import inspect
import sys
import sysconfig
from pathlib import Path

from ..errors import InputError, SecurityError, first_line

_FIX = "name your own function that builds and returns the torch.nn.Module"


def check_module_name(module_name: str, spec: str) -> None:
    """Before importing: the standard library holds no model factories (and importing some of it, such as
    ``antigravity`` or ``this``, already does something)."""
    if _is_stdlib_module(module_name):
        raise SecurityError(f"{spec} names the Python standard library, which holds no model factories",
                            field="MODEL", fix=_FIX)


def check_factory(obj, spec: str) -> None:
    """After importing, before calling: a plain Python function or an nn.Module subclass, not defined in
    the standard library (a user module may re-export ``os.abort``)."""
    import torch

    if inspect.isclass(obj):
        if not issubclass(obj, torch.nn.Module):
            raise InputError(f"{spec} is the class {obj.__qualname__}, not a torch.nn.Module subclass",
                             field="MODEL", fix=_FIX)
    elif not inspect.isfunction(obj):  # builtins (os.abort, sys.exit), bound methods, partials, instances
        raise SecurityError(f"{spec} is a {type(obj).__name__}, not a Python function that builds a model",
                            field="MODEL", fix=_FIX)
    origin = getattr(obj, "__module__", None) or ""
    if _is_stdlib_module(origin) or _in_stdlib_folder(obj):
        raise SecurityError(f"{spec} is {origin}.{getattr(obj, '__qualname__', '?')} from the Python standard "
                            f"library, not a model factory", field="MODEL", fix=_FIX)


def build(factory, spec: str):
    """Call the factory; every way it can fail, exiting and interrupts included, is one line, and what it
    returns must be an nn.Module."""
    import torch

    try:
        model = factory()
    except SystemExit as exc:
        raise InputError(f"{spec} called exit({exc.code!r}) instead of returning a model", field="MODEL",
                         fix=_FIX) from exc
    except BaseException as exc:  # noqa: BLE001 - the user's code: report whatever it raised, in one line
        raise InputError(f"{spec} raised {type(exc).__name__}: {first_line(exc, 200, '')}".rstrip(": "),
                         field="MODEL", fix="fix the factory, or run it by hand to see the traceback") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module", field="MODEL",
                         fix="return the model instance from the factory")
    return model


def _is_stdlib_name(module_name: str) -> bool:
    top = module_name.split(".", 1)[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _is_stdlib_module(module_name: str) -> bool:
    """A standard-library name that resolves to the standard library (a user's own ``test.py`` may shadow
    one). Locating a top-level module runs none of its code."""
    import importlib.util

    top = module_name.split(".", 1)[0]
    if not _is_stdlib_name(top):
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return True
    origin = getattr(spec, "origin", None)
    return spec is None or origin in (None, "built-in", "frozen") or _in_stdlib_path(origin)


def _in_stdlib_folder(obj) -> bool:
    try:
        source = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        return False
    return _in_stdlib_path(source)


def _in_stdlib_path(source: str) -> bool:
    paths = sysconfig.get_paths()
    path = Path(source).resolve()
    inside = lambda keys: any(path.is_relative_to(Path(paths[k]).resolve()) for k in keys)  # noqa: E731
    return inside(("stdlib", "platstdlib")) and not inside(("purelib", "platlib"))  # site-packages may sit inside
