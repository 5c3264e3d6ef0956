"""Which model formats can be pruned, and how a pruned module goes back into the pipeline.

- factories (``package.module:function`` + ``--weights``) and trusted pickles: real ``nn.Module``s.
- ``.pt2`` (torch.export): ``torch.export.unflatten`` restores the module tree, but every layer becomes
  a graph-interpreting module that a dependency graph cannot read; the leaf layers whose graph is a
  single linear / conv / batch-norm / layer-norm / embedding call are turned back into those
  ``nn`` layers (same tensors), which makes MLP and conv channels prunable. Attention heads too, where the
  head count can be read from the program's reshapes (heads.program_heads). The pruned module is exported
  again with the program's dynamic batch.
- TorchScript and ONNX: refused; their graphs fix every shape.
"""

from __future__ import annotations

import copy
import inspect
from typing import Mapping

import numpy as np

from ..errors import InputError, first_line

_FORMAT_NAMES = {"torchscript": "TorchScript", "onnx": "ONNX"}


def can_prune(loaded) -> None:
    """Raise InputError (one line) when ``loaded``'s format cannot be pruned."""
    if loaded.format in _FORMAT_NAMES or not loaded.is_torch:
        what = _FORMAT_NAMES.get(loaded.format, loaded.format)
        raise InputError(f"{what} models cannot be pruned", file=loaded.source, field="--prune",
                         fix="pass the .pt2 or package.module:function with --weights")


def prunable_module(loaded):
    """An ``nn.Module`` that ``prune()`` can work on, for a loaded model of a prunable format."""
    can_prune(loaded)
    program = getattr(loaded, "exported_program", None)
    if program is None:
        return loaded.module
    import torch

    module = torch.export.unflatten(program)
    restore_leaf_layers(module)
    _drop_fake_tensors(module)
    return module.eval()


def with_pruned_module(loaded, module, example_feeds: Mapping[str, np.ndarray]):
    """A copy of ``loaded`` carrying the pruned ``module`` (re-exported for .pt2 inputs)."""
    new = copy.copy(loaded)
    new.notes = list(loaded.notes)
    new.module = module.eval()
    program = getattr(loaded, "exported_program", None)
    if program is not None:
        new.exported_program = _reexport(module, loaded, example_feeds)  # type: ignore[attr-defined]
        new.module = new.exported_program.module()
    return new


def _reexport(module, loaded, example_feeds):
    import torch

    names = loaded.input_names
    # torch.export specializes a dimension of size 1: trace with at least 2 samples.
    tensors = {n: torch.from_numpy(np.ascontiguousarray(np.concatenate([example_feeds[n]] * 2)
                                                        if len(example_feeds[n]) < 2 else example_feeds[n]))
               for n in names}
    dynamic = {}
    for spec in loaded.input_specs or []:
        dims = {axis: torch.export.Dim.AUTO for axis, d in enumerate(spec.shape) if isinstance(d, str)}
        dynamic[spec.name] = dims or None
    # Export the way the program was exported (positional and keyword arguments as in its in_spec).
    convention = loaded.calling_convention(tensors)
    args, kwargs = convention.bind(tensors)
    shapes = {n: dynamic.get(n) for n in names}
    params = inspect.signature(module.forward).parameters
    variadic = any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                   for p in params.values())
    try:
        if variadic:
            # An unflattened program's forward is forward(*args, **kwargs), and torch.export cannot match
            # dynamic shapes to **kwargs ("Must provide a tree_name"): give it the program's own signature.
            _name_forward(module, names[:len(args)], list(kwargs))
        return torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export raises many types
        first = first_line(exc, 200)
        raise InputError(f"cannot export the pruned program again ({first})", file=loaded.source, field="--prune",
                         fix="prune the model's factory (package.module:function --weights FILE) instead") from exc
    finally:
        module.__dict__.pop("forward", None)  # back to the class's forward


def _name_forward(module, positional: list[str], keywords: list[str]) -> None:
    """Give ``module.forward`` (variadic) named parameters: its positional inputs, then keyword-only ones.
    (A ``__signature__`` on a pass-through function: no code is generated.)"""
    inner = type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        return inner(*args, **kwargs)

    kinds = [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in positional]
    kinds += [(n, inspect.Parameter.KEYWORD_ONLY) for n in keywords]
    forward.__signature__ = inspect.Signature([inspect.Parameter(n, k) for n, k in kinds])
    module.forward = forward


def restore_leaf_layers(module) -> int:
    """Replace single-op graph modules of an unflattened program with the ``nn`` layers they came from.
    Returns how many were restored."""
    restored = 0
    for path, sub in list(module.named_modules()):
        if not path or not hasattr(sub, "graph") or any(True for _ in sub.children()):
            continue
        layer = _layer_from_graph(sub)
        if layer is None:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, layer)
        restored += 1
    return restored


def _layer_from_graph(sub):
    import torch
    from torch import nn

    calls = [n for n in sub.graph.nodes if n.op == "call_function"]
    if len(calls) != 1:
        return None
    node = calls[0]
    aten = torch.ops.aten
    args = list(node.args)
    params = dict(sub.named_parameters(recurse=False))
    buffers = dict(sub.named_buffers(recurse=False))

    def tensor_arg(i):
        a = args[i] if i < len(args) else None
        return getattr(a, "target", None) if a is not None else None

    target = node.target
    if target == aten.linear.default:
        w, b = tensor_arg(1), tensor_arg(2)
        layer = nn.Linear(params[w].shape[1], params[w].shape[0], bias=b is not None)
        return _adopt(layer, {"weight": params[w], "bias": params.get(b)})
    convs = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d}
    if target in convs:
        w, b = tensor_arg(1), tensor_arg(2)
        weight = params[w]
        rest = args[3:] + [None] * (4 - len(args[3:]))
        stride, padding, dilation, groups = (r if r is not None else d for r, d in zip(rest, (1, 0, 1, 1)))
        layer = convs[target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=b is not None)
        return _adopt(layer, {"weight": weight, "bias": params.get(b)})
    if target == aten.batch_norm.default and len(args) >= 8 and args[5] is False:
        w, b, mean, var = (tensor_arg(i) for i in range(1, 5))
        rank = _rank(args[0])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
        if cls is None or mean not in buffers or var not in buffers:
            return None
        layer = cls(buffers[mean].shape[0], eps=float(args[7]), momentum=float(args[6]), affine=w is not None)
        layer = _adopt(layer, {"weight": params.get(w), "bias": params.get(b)})
        layer.running_mean, layer.running_var = buffers[mean], buffers[var]
        return layer.eval()
    if target == aten.layer_norm.default:
        shape = tuple(args[1])
        w, b = tensor_arg(2), tensor_arg(3)
        eps = float(args[4]) if len(args) > 4 else 1e-5
        layer = nn.LayerNorm(shape, eps=eps, elementwise_affine=w is not None, bias=b is not None)
        return _adopt(layer, {"weight": params.get(w), "bias": params.get(b)})
    if target == aten.embedding.default:
        w = tensor_arg(0)
        if len(args) > 2 and args[2] not in (-1, None):
            return None  # padding_idx changes gradients only, but keep the layer as it was
        weight = params[w]
        return _adopt(nn.Embedding(weight.shape[0], weight.shape[1]), {"weight": weight})
    return None


def _drop_fake_tensors(module) -> None:
    """Graph nodes carry symbolic example tensors in ``meta``; they cannot be deep-copied (prune()
    copies the model) and running the graph does not need them."""
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            for key in ("val", "example_value", "tensor_meta"):
                node.meta.pop(key, None)


def _adopt(layer, tensors):
    from torch import nn

    for name, value in tensors.items():
        if value is None:
            continue
        setattr(layer, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    return layer


def _rank(node) -> int | None:
    val = getattr(node, "meta", {}).get("val") if node is not None else None
    return len(val.shape) if val is not None and hasattr(val, "shape") else None
