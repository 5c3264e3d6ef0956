"""Modality branches of a fused ONNX graph: which nodes belong to the vision, text or audio tower and
which to the fusion part, so that each branch can get its own precision.

Two signals, combined:
- **data flow**: which graph inputs reach each node. Every input gets a modality from
  ``edgemm.modality`` (name, dtype and shape; a mask takes the modality of the input it is first combined
  with); a node reached by one modality belongs to that tower, a node reached by two or more is fusion.
  Shape-only edges (``Shape``/``Size`` outputs) carry no data and are ignored, so a text tower reading
  the image's batch size stays text. A model fed by one modality has no fusion nodes.
- **module paths**: torch.onnx.export(dynamo=True) records each node's module stack in
  ``node.metadata_props["pkg.torch.onnx.name_scopes"]`` (e.g. ``['', 'text_encoder',
  'text_encoder.layers.0', ..., 'linear_5']``). The outermost module of a node's stack is one unit: if its
  nodes see one modality it is that tower, if they mix modalities (a cross-attention block, an
  ``nn.MultiheadAttention`` with its query from one tower and keys/values from another) it is fusion. A
  module holding a tower deeper inside (a wrapper around the whole model, ViLT's embeddings) is not a
  unit: its children are. Graphs without this metadata (other exporters, hand-made ONNX) fall back to
  data flow alone.

``--branch text=text_encoder.*`` overrides both: the glob is matched against module paths (a module
matches when it or one of its ancestors does, so ``text_encoder`` and ``text_encoder.*`` both take the
whole tower), node names, and graph input names.

Standard library + onnx only.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import InputError
from ..modality import BRANCHES, FUSION, MODALITIES, branch_label, input_modality, resolve_inputs, single_modality

__all__ = ["BRANCHES", "FUSION", "BranchMap", "find_branches", "parse_branch_overrides", "input_modality",
           "node_module_paths", "carry_node_metadata", "COMPUTE_OPS"]

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_NO_MODULE = "_empty_nn_module_stack"
# Ops that carry the compute (and the quantization error): the units precision is decided for. The
# recurrent layers hold their weights in one node: an Embedding + LSTM text tower has no MatMul at all.
COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention", "LSTM", "GRU", "RNN")
_SHAPE_ONLY = ("Shape", "Size")


def node_module_paths(model) -> dict[str, str | None]:
    """node name -> deepest torch module path ('' = the root module), None when not recorded."""
    return {name: (stack[-1] if stack else "") if stack is not None else None
            for name, stack in node_module_stacks(model).items()}


def node_module_stacks(model) -> dict[str, list[str] | None]:
    """node name -> the torch modules it ran in, outermost first (root excluded; [] = the root module
    itself), None when not recorded."""
    out: dict[str, list[str] | None] = {}
    for node in model.graph.node:
        stack = None
        for prop in node.metadata_props:
            if prop.key == SCOPES_KEY:
                stack = _modules_from_scopes(prop.value)
                break
        out[node.name] = stack
    return out


def _modules_from_scopes(value: str) -> list[str] | None:
    """name_scopes is a list printed as Python/JSON: [root '', module paths..., fx node name]."""
    try:
        scopes = json.loads(value.replace("'", '"'))
    except ValueError:
        return None
    if not isinstance(scopes, list) or not scopes:
        return None
    # The last entry names the op, not a module; torch marks ops outside any module with a placeholder.
    return [s for s in scopes[:-1] if isinstance(s, str) and s and not s.startswith(_NO_MODULE)]


def carry_node_metadata(source, target) -> int:
    """Copy node metadata (module paths) from ``source`` onto same-named nodes of ``target``.

    Graph rewriters such as onnxslim drop ``metadata_props`` but keep node names; call this after them
    so per-branch precision keeps its module paths. Returns the number of nodes updated."""
    props = {n.name: list(n.metadata_props) for n in source.graph.node if n.name and len(n.metadata_props)}
    count = 0
    for node in target.graph.node:
        if node.name in props and not len(node.metadata_props):
            for p in props[node.name]:
                node.metadata_props.add(key=p.key, value=p.value)
            count += 1
    return count


def parse_branch_overrides(items: Iterable[str] | Mapping[str, Iterable[str]] | None) -> dict[str, list[str]]:
    """``["text=text_encoder.*", "fusion=head*,norm"]`` -> {"text": ["text_encoder.*"], "fusion": [...]}.

    One-line InputError on bad syntax or an unknown branch."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        pairs = [(k, p) for k, v in items.items() for p in ([v] if isinstance(v, str) else v)]
    else:
        pairs = []
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise InputError(f"{item!r} is not BRANCH=PATTERN", field="--branch",
                                 fix="e.g. --branch text=text_encoder.* (branches: " + ", ".join(BRANCHES) + ")")
            branch, _, patterns = item.partition("=")
            pairs.extend((branch, p) for p in patterns.split(","))
    out: dict[str, list[str]] = {}
    for branch, pattern in pairs:
        branch, pattern = branch.strip().lower(), pattern.strip()
        if branch not in BRANCHES:
            raise InputError(f"unknown branch {branch!r}", field="--branch", fix=f"use one of {', '.join(BRANCHES)}")
        if not pattern:
            raise InputError(f"empty pattern for branch {branch}", field="--branch",
                             fix="e.g. --branch text=text_encoder.*")
        out.setdefault(branch, []).append(pattern)
    return out


def _module_matches(module: str | None, pattern: str) -> bool:
    if not module:
        return False
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, pattern):
            return True
        if pattern.endswith(".*") and fnmatch.fnmatchcase(prefix, pattern[:-2]):
            return True
    return False


@dataclass
class BranchMap:
    """Every node's branch, with the evidence: module path and the input modalities reaching it."""
    branch_of: dict[str, str]                  # node name -> branch
    module_of: dict[str, str | None]           # node name -> module path (None: not recorded)
    op_of: dict[str, str]                      # node name -> op type
    input_modality: dict[str, str | None]      # graph input -> modality
    source: str                                # "module paths + data flow" | "data flow"
    overrides: dict[str, list[str]] = field(default_factory=dict)
    override_hits: dict[str, int] = field(default_factory=dict)
    unit_of: dict[str, str] = field(default_factory=dict)   # node name -> the module unit that placed it

    def nodes(self, branch: str, *, compute_only: bool = False) -> list[str]:
        return [n for n, b in self.branch_of.items()
                if b == branch and (not compute_only or self.op_of[n] in COMPUTE_OPS)]

    def present(self) -> list[str]:
        """Branches holding at least one compute node, in canonical order."""
        have = {b for n, b in self.branch_of.items() if self.op_of[n] in COMPUTE_OPS}
        return [b for b in BRANCHES if b in have]

    def top_modules(self, branch: str, limit: int = 8) -> list[str]:
        counts = Counter(_container(self.unit_of[n]) if n in self.unit_of else _top_module(self.module_of[n])
                         for n in self.nodes(branch))
        counts.pop(None, None)
        counts.pop("", None)
        return [m for m, _ in counts.most_common(limit)]

    def summary(self) -> dict:
        """JSON-ready table for the manifest: per branch, its inputs, modules and node counts."""
        table = {}
        for branch in BRANCHES:
            nodes = self.nodes(branch)
            if not nodes:
                continue
            table[branch] = {
                "inputs": sorted(i for i, m in self.input_modality.items() if m == branch),
                "modules": self.top_modules(branch),
                "nodes": len(nodes),
                "compute_nodes": len(self.nodes(branch, compute_only=True)),
            }
        return {"found_by": self.source, "branches": table,
                **({"overrides": self.overrides, "override_hits": self.override_hits} if self.overrides else {})}


def _container(path: str) -> str:
    """``image_blocks.0`` -> ``image_blocks``: the layers of a ModuleList are reported as the list."""
    parts = path.split(".")
    while len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts)


def _top_module(path: str | None) -> str | None:
    if path is None:
        return None
    return path.split(".")[0]


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path), load_external_data=False)
    return model_or_path


def find_branches(model_or_path, *, overrides: Mapping[str, list[str]] | None = None,
                  input_modalities: Mapping[str, str] | None = None) -> BranchMap:
    """Assign every node of an ONNX model to vision / text / audio / fusion (see the module doc).

    ``overrides``: branch -> glob patterns (from ``parse_branch_overrides``); a pattern that matches no
    module, node or input is an InputError (a typo would otherwise silently change nothing).
    ``input_modalities``: graph input -> modality, replacing the name/dtype guess. Nodes that no input
    of known modality reaches are fusion (a policy naming a tower then fails with a hint to --branch)."""
    model = _load(model_or_path)
    overrides = {b: list(p) for b, p in (overrides or {}).items()}
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    specs = {}
    for vi in graph.input:
        if vi.name not in inits:
            tt = vi.type.tensor_type
            specs[vi.name] = (tt.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                             for d in tt.shape.dim])
    # Data flow: the set of graph inputs reaching each tensor, then each node.
    reach: dict[str, frozenset] = {n: frozenset([n]) for n in specs}
    node_reach: dict[str, frozenset] = {}
    for node in _toposorted(graph):
        seen = frozenset().union(*(reach.get(i, frozenset()) for i in node.input if i))
        node_reach[node.name] = seen
        out = frozenset() if node.op_type in _SHAPE_ONLY else seen
        for o in node.output:
            reach[o] = out
    modality = resolve_inputs(specs, node_reach.values())
    for name, mod in (input_modalities or {}).items():
        if name not in modality:
            raise InputError(f"the model has no input {name!r}", field="input_modalities",
                             fix=f"inputs are {', '.join(modality)}")
        modality[name] = mod
    hits: Counter = Counter()
    for branch, patterns in overrides.items():  # patterns naming an input set its modality
        for pattern in patterns:
            for name in modality:
                if fnmatch.fnmatchcase(name, pattern) and branch in MODALITIES:
                    modality[name] = branch
                    hits[pattern] += 1
    single = single_modality(modality)

    stacks = node_module_stacks(model)
    modules = {n: (st[-1] if st else "") if st is not None else None for n, st in stacks.items()}
    has_scopes = any(m is not None for m in modules.values())
    ops = {n.name: n.op_type for n in graph.node}
    branch_of: dict[str, str | None] = {name: branch_label(seen, modality, single)
                                        for name, seen in node_reach.items()}
    units = _module_units(stacks, node_reach, modality, single) if has_scopes else {}
    for name, (_path, branch) in units.items():
        branch_of[name] = branch
    _fill_unreached(graph, branch_of)

    for branch, patterns in overrides.items():  # later overrides win over earlier ones
        for pattern in patterns:
            for name in branch_of:
                if _module_matches(modules.get(name), pattern) or fnmatch.fnmatchcase(name, pattern):
                    branch_of[name] = branch
                    hits[pattern] += 1
    missed = [p for ps in overrides.values() for p in ps if not hits[p]]
    if missed:
        tops = sorted({t for t in (_top_module(m) for m in modules.values()) if t})
        hint = (f"top-level modules: {', '.join(tops[:12])}" if tops else
                "this graph records no module paths; match node names (e.g. node_MatMul_*) or input names")
        raise InputError(f"pattern {missed[0]!r} matches no module, node or input", field="--branch",
                         fix=hint)
    return BranchMap(branch_of={n: b or single or FUSION for n, b in branch_of.items()}, module_of=modules, op_of=ops,
                     input_modality=modality, source="module paths + data flow" if has_scopes else "data flow",
                     overrides=overrides, override_hits={p: hits[p] for ps in overrides.values() for p in ps},
                     unit_of={n: path for n, (path, _b) in units.items()})


def _module_units(stacks, node_reach, modality, single) -> dict[str, tuple[str, str]]:
    """node -> (module path, branch) of the module unit it runs in (see the module doc), for nodes inside one.

    A node's unit is the outermost module of its stack, except that a fusion module holding a tower (a
    single-modality module with layers of its own, at any depth: a wrapper's towers, ViLT's text and
    patch embeddings, the self-attention beside a cross-attention in a decoder layer), or being the only
    input-fed child of its parent with single-modality children, is looked through. A cross-attention
    block whose single-modality parts are lone projections (q from text, k/v from the image) stays one
    fusion unit."""
    module_reach: dict[str, set] = defaultdict(set)
    children: dict[str, set] = defaultdict(set)
    for name, stack in stacks.items():
        if not stack:
            continue
        for parent, child in zip([""] + stack[:-1], stack):
            children[parent].add(child)
            module_reach[child] |= node_reach.get(name, frozenset())

    def label(path: str) -> str | None:
        return branch_label(module_reach[path], modality, single)

    def holds_tower(path: str) -> bool:
        """A single-modality module with layers of its own somewhere inside (not a lone projection)."""
        return any((label(c) in MODALITIES and children.get(c)) or (label(c) == FUSION and holds_tower(c))
                   for c in children[path])

    def is_wrapper(path: str, parent: str) -> bool:
        fed = [c for c in children[parent] if label(c) is not None]
        return holds_tower(path) or (fed == [path] and any(label(c) in MODALITIES for c in children[path]))

    units: dict[str, tuple[str, str]] = {}
    for name, stack in stacks.items():
        parent = ""
        for path in stack or ():
            branch = label(path)
            if branch == FUSION and is_wrapper(path, parent):
                parent = path
                continue
            if branch is not None:
                units[name] = (path, branch)
            break
    return units


def _fill_unreached(graph, branch_of: dict[str, str | None]) -> None:
    """Nodes no input reaches (constant subgraphs) take the branch of their consumers when they agree."""
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node.name)
    for _ in range(len(graph.node)):
        changed = False
        for node in reversed(graph.node):
            if branch_of.get(node.name) is not None:
                continue
            users = {branch_of.get(c) for o in node.output for c in consumers.get(o, [])} - {None}
            if len(users) == 1:
                branch_of[node.name] = users.pop()
                changed = True
            elif len(users) > 1:
                branch_of[node.name] = FUSION
                changed = True
        if not changed:
            break


def _toposorted(graph):
    """ONNX graphs are topologically sorted by spec, but some tools write them otherwise: sort defensively."""
    produced_by = {o: i for i, n in enumerate(graph.node) for o in n.output}
    order, state = [], {}
    nodes = list(graph.node)

    for start in range(len(nodes)):
        if state.get(start):
            continue
        stack = [(start, False)]
        while stack:
            idx, done = stack.pop()
            if done:
                state[idx] = 2
                order.append(nodes[idx])
                continue
            if state.get(idx):
                continue
            state[idx] = 1
            stack.append((idx, True))
            for i in nodes[idx].input:
                dep = produced_by.get(i)
                if dep is not None and not state.get(dep):
                    stack.append((dep, False))
    return order
