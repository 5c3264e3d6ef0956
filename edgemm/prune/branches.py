"""Which submodules belong to which modality branch (vision / text / audio / fusion).

Found on a forward pass, not from names alone: every submodule's outputs are recorded with hooks, then
each model input is perturbed in turn; a submodule belongs to the inputs whose perturbation changes its
output. Inputs get their modality from ``edgemm.modality`` (name, dtype and shape; a mask takes the
modality of the input it first meets). A submodule fed by one modality belongs to that branch (with all
its children); one fed by several is ``fusion``. Only when an input's name, dtype and shape do not tell
its modality (inputs called ``x`` and ``y``) does the module name label it: ``image_tower`` says ``vision``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..signature import call_module
from ..errors import InputError
from ..modality import FUSION, name_modality, order_branches, resolve_inputs

_CONTAINERS = ("ModuleList", "ModuleDict", "ParameterList", "ParameterDict")


def input_modalities(input_names: Sequence[str], feeds: Mapping[str, np.ndarray],
                     depends: Mapping[str, set] | None = None) -> dict[str, str | None]:
    """Input name -> modality, from names, dtypes and shapes of ``feeds`` (and which inputs meet in
    which modules, ``depends``, for masks)."""
    specs = {n: (np.asarray(feeds[n]).dtype, list(np.shape(feeds[n]))) for n in input_names}
    return resolve_inputs(specs, None if depends is None else [set(v) for v in depends.values() if v])


def find_branches(module, input_names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Branch name -> module paths (the topmost submodules wholly inside that branch).

    ``feeds`` holds example inputs (batch >= 2 preferred) keyed by ``input_names``, in forward() order.
    """
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise InputError(f"no example data for input {missing[0]!r}", field=f"feeds[{missing[0]!r}]",
                         fix="pass one array per model input")
    depends = _input_dependencies(module, list(input_names), feeds)
    modality = input_modalities(input_names, feeds, depends)
    branches: dict[str, list[str]] = {}

    def labels_of(path: str) -> set[str]:
        return {modality.get(name) or name_modality(path) or name for name in depends.get(path) or ()}

    def holds_tower(mod, path: str) -> bool:
        """A single-modality submodule with layers of its own somewhere inside (not a lone projection)."""
        for name, sub in mod.named_children():
            sub_path = f"{path}.{name}"
            if type(sub).__name__ in _CONTAINERS or depends.get(sub_path) is None:
                if holds_tower(sub, sub_path):
                    return True
                continue
            labels = labels_of(sub_path)
            if (len(labels) == 1 and any(True for _ in sub.children())) or (len(labels) > 1 and holds_tower(sub, sub_path)):
                return True
        return False

    def is_wrapper(parent, child, path: str, prefix: str) -> bool:
        """A multi-input child whose towers are the branches, not itself: it holds a tower at any depth
        (``self.clip = CLIPModel(...)``, ViLT's embeddings), or it is its parent's only input-fed child and
        holds single-modality children. A cross-attention block whose single-modality parts are lone
        projections is not one: it is fusion as a whole."""
        if holds_tower(child, path):
            return True
        fed = [n for n, c in parent.named_children() if depends.get(f"{prefix}{n}")]
        return fed == [path[len(prefix):]] and any(
            len(labels_of(f"{path}.{n}")) == 1 for n, _ in child.named_children())

    def visit(parent, prefix: str) -> None:
        for child_name, child in parent.named_children():
            path = f"{prefix}{child_name}"
            used = depends.get(path)
            if type(child).__name__ in _CONTAINERS or used is None:
                visit(child, path + ".")  # containers run no forward of their own
                continue
            if not used:
                continue  # fed by constants only (or unused): no branch owns it
            labels = labels_of(path)
            if len(labels) > 1 and is_wrapper(parent, child, path, prefix):
                visit(child, path + ".")
                continue
            branch = labels.pop() if len(labels) == 1 else FUSION
            branches.setdefault(branch, []).append(path)

    visit(module, "")
    return {name: sorted(branches[name]) for name in order_branches(branches)}


def branch_of(path: str, branches: Mapping[str, Sequence[str]]) -> str | None:
    """The branch owning module ``path`` (longest matching prefix), or None."""
    best, best_len = None, -1
    for branch, paths in branches.items():
        for p in paths:
            if (path == p or path.startswith(p + ".")) and len(p) > best_len:
                best, best_len = branch, len(p)
    return best


def _input_dependencies(module, input_names: list[str], feeds: Mapping[str, np.ndarray]) -> dict[str, set[str]]:
    """Module path -> the inputs whose perturbation changes that module's outputs."""
    import torch

    baseline = _record_outputs(module, input_names, feeds)
    depends: dict[str, set[str]] = {path: set() for path in baseline}
    for name in input_names:
        changed_feeds = dict(feeds)
        changed_feeds[name] = _perturb(np.asarray(feeds[name]))
        perturbed = _record_outputs(module, input_names, changed_feeds)
        for path, outs in baseline.items():
            other = perturbed.get(path, [])
            if len(other) != len(outs) or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(outs, other)):
                depends[path].add(name)
    return depends


def _record_outputs(module, input_names: list[str], feeds: Mapping[str, np.ndarray]) -> dict:
    import torch

    records: dict[str, list] = {}
    handles = []

    def hook_for(path):
        def hook(_mod, _inp, out):
            records.setdefault(path, []).extend(_tensors(out))
        return hook

    for path, sub in module.named_modules():
        if path:
            handles.append(sub.register_forward_hook(hook_for(path)))
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names)
    try:
        with torch.no_grad():
            call_module(module, input_names, args)
    finally:
        for h in handles:
            h.remove()
    return records


def _tensors(out) -> list:
    import torch
    from torch.utils import _pytree as pytree

    # nn.TransformerEncoder's eval fast path returns nested tensors, which torch.equal cannot compare.
    return [(t.to_padded_tensor(0.0) if t.is_nested else t).detach().clone()
            for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _perturb(array: np.ndarray) -> np.ndarray:
    """A different but valid value for ``array``: other samples' rows for ids and masks (indices stay
    in range), a shift plus noise for floats."""
    if array.dtype.kind == "f":
        rng = np.random.default_rng(0)
        scale = float(array.std()) or 1.0
        return (array + 0.1 * scale + 0.5 * scale * rng.standard_normal(array.shape)).astype(array.dtype)
    if array.dtype == np.bool_:
        return ~array
    if array.ndim and array.shape[0] > 1:
        rolled = np.roll(array, 1, axis=0)
        if not np.array_equal(rolled, array):
            return rolled
    top = int(array.max()) + 1 if array.size else 1
    return ((array.astype(np.int64) + 1) % max(top, 2)).astype(array.dtype)
