"""How a model's forward() is called: the one calling convention every stage uses.

A forward() has required parameters, optional ones (with a default), keyword-only ones and variadic
``*args`` / ``**kwargs``. Model inputs are the required parameters plus the optional ones the data
names; defaults stay defaults and variadic parameters are never inputs. ``Signature.call`` builds the
positional and keyword arguments from named tensors, so the reference runner, the exporters, pruning and
recovery all call a model the same way (a keyword-exported ``.pt2`` must be called with keywords, a
keyword-only ``forward(self, *, a, b)`` too).

The signature comes from ``inspect.signature`` (factories, pickles), the TorchScript schema, or a
``.pt2``'s ``in_spec`` (its arguments are fixed at export: every one is required, passed the way it was
exported).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .errors import InputError

POSITIONAL = "positional"      # positional-only (or a .pt2's positional argument)
EITHER = "either"              # positional or keyword
KEYWORD = "keyword"            # keyword-only (or a .pt2's keyword argument)
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    default: Any = _NO_DEFAULT

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT


@dataclass(frozen=True)
class Signature:
    params: tuple[Param, ...]
    source: str = "forward()"          # where it was read, for errors
    var_positional: bool = False       # forward(*args): extra positional data is not accepted anyway
    var_keyword: bool = False          # forward(**kwargs): never an input

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def required(self) -> list[str]:
        return [p.name for p in self.params if p.required]

    def select(self, available: Iterable[str], *, where: str | None = None) -> list[str]:
        """The model inputs for data with keys ``available``: required parameters plus the optional ones
        named in the data, in forward() order. Raises InputError naming a missing required input or a
        key that is no parameter."""
        have = list(available)
        missing = [n for n in self.required if n not in have]
        extra = [n for n in have if n not in self.names]
        if missing or extra:
            optional = [p.name for p in self.params if not p.required]
            want = f"required ({', '.join(self.required) or 'none'})"
            if optional:
                want += f", optional ({', '.join(optional)})"
            what = (f"missing required input {missing[0]!r}" if missing
                    else f"{extra[0]!r} is not a parameter of {self.source}")
            raise InputError(f"{what}; model inputs: {want}; got ({', '.join(have)})", file=where,
                             field=(missing or extra)[0],
                             fix="name the data keys / --input after forward()'s parameters")
        return [n for n in self.names if n in have]

    def bind(self, values: Mapping[str, Any]) -> tuple[tuple, dict]:
        """(args, kwargs) for ``module(*args, **kwargs)``. Parameters are passed positionally until the
        first one left out, then by keyword; positional-only ones left out before a given one get their
        defaults."""
        last_positional = max((i for i, p in enumerate(self.params) if p.kind == POSITIONAL and p.name in values),
                              default=-1)
        args: list = []
        kwargs: dict = {}
        gap = False
        for i, p in enumerate(self.params):
            present = p.name in values
            if not present and p.required:
                raise InputError(f"no value for required input {p.name!r}", field=p.name,
                                 fix=f"give every required input of {self.source}: {', '.join(self.required)}")
            if p.kind == KEYWORD:
                if present:
                    kwargs[p.name] = values[p.name]
            elif i <= last_positional:
                args.append(values[p.name] if present else p.default)
            elif not present:
                gap = True
            elif gap:
                kwargs[p.name] = values[p.name]
            else:
                args.append(values[p.name])
        return tuple(args), kwargs

    def call(self, module, values: Mapping[str, Any]):
        """``module`` called with ``values`` (name -> tensor) the way its forward() takes them."""
        args, kwargs = self.bind(values)
        return module(*args, **kwargs)

    def call_ordered(self, module, names: Sequence[str], tensors: Sequence[Any]):
        """``call`` for tensors given in the order of ``names`` (the model inputs)."""
        return self.call(module, dict(zip(names, tensors)))


def positional(names: Sequence[str], source: str = "forward()") -> Signature:
    """A signature of required positional-or-keyword parameters (formats without one of their own)."""
    return Signature(tuple(Param(n, EITHER) for n in names), source)


def from_callable(fn, source: str = "forward()") -> Signature:
    """From ``inspect.signature`` (a bound ``forward``: ``self`` is already gone)."""
    kinds = {inspect.Parameter.POSITIONAL_ONLY: POSITIONAL, inspect.Parameter.POSITIONAL_OR_KEYWORD: EITHER,
             inspect.Parameter.KEYWORD_ONLY: KEYWORD}
    params, var_pos, var_kw = [], False, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            var_pos = True
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        else:
            params.append(Param(p.name, kinds[p.kind], _NO_DEFAULT if p.default is inspect.Parameter.empty
                                else p.default))
    return Signature(tuple(params), source, var_pos, var_kw)


def from_torchscript(module, source: str = "forward()") -> Signature | None:
    """From a ScriptModule's forward schema (``self`` skipped); None when it has none."""
    try:
        arguments = module.forward.schema.arguments[1:]
    except (AttributeError, RuntimeError):
        return None
    params = []
    for a in arguments:
        default = a.default_value if a.has_default_value() else _NO_DEFAULT
        params.append(Param(a.name, KEYWORD if a.kwarg_only else EITHER, default))
    return Signature(tuple(params), source)


def from_program(program, user_inputs: Sequence[str], *, file=None, source: str = "the program") -> Signature:
    """From a torch.export program's ``in_spec`` (``(args, kwargs)``): positional arguments are named by
    their graph inputs, keyword arguments by their keys. A nested argument (a tuple or dict of tensors
    as one argument) is refused in one line."""
    spec = program.call_spec.in_spec
    if spec is None or spec.num_children != 2:
        return positional(user_inputs, source)
    args_spec, kwargs_spec = spec.children()
    leaves = list(args_spec.children()) + list(kwargs_spec.children())
    if any(not c.is_leaf() for c in leaves):
        raise InputError("the program takes a nested argument (a tuple, list or dict of tensors)", file=file,
                         field="inputs",
                         fix="export a wrapper whose forward() takes one tensor per argument")
    n_args = args_spec.num_children
    keys = list(kwargs_spec.context or [])
    if n_args + len(keys) != len(user_inputs):
        return positional(user_inputs, source)
    params = [Param(n, POSITIONAL) for n in user_inputs[:n_args]]
    params += [Param(k, KEYWORD) for k in keys]
    return Signature(tuple(params), source)


_ATTR = "_edgemm_signature"


def attach(module, signature: Signature) -> None:
    """Remember how ``module`` is called (copies made with ``copy.deepcopy`` keep it): a pruned copy or
    an unflattened program (whose forward is ``forward(*args, **kwargs)``) is called like the model."""
    object.__setattr__(module, _ATTR, signature)


def of_module(module, names: Sequence[str]) -> Signature:
    """The attached signature, else forward()'s own, else ``names`` positionally."""
    attached = getattr(module, _ATTR, None)
    if attached is not None:
        return attached
    try:
        sig = from_callable(module.forward)
    except (TypeError, ValueError, AttributeError):
        return positional(names)
    return positional(names) if sig.var_positional or not set(names) <= set(sig.names) else sig


def call_module(module, names: Sequence[str], tensors: Sequence[Any]):
    """``module`` called on ``tensors`` (in the order of the input ``names``) its own way."""
    return of_module(module, names).call_ordered(module, names, tensors)
