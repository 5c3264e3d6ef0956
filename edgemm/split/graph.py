"""Cut a fused ONNX graph at its branch boundaries: one sub-model per encoder tower plus the fusion head.

Which node belongs to which branch comes from ``quant/branches.find_branches`` (module paths + data flow,
``--branch`` overrides), the same classifier ``--precision`` and ``--prune`` use. From it:

- a branch is a *tower*, and becomes a part, when it holds at least ``MIN_TOWER_COMPUTE`` compute nodes
  (MatMul/Gemm/Conv...); a branch that is a lone embedding or projection joins the fusion part. A model
  with no tower left (early fusion: patches and tokens embedded, then one joint transformer) is refused;
- a tower node that reads a tensor made by the fusion part (interleaved fusion, e.g. co-attention) moves
  to fusion, with everything it feeds in the tower, so every part runs after the parts it reads from;
  towers reading each other are allowed when the order stays acyclic, else the split is refused;
- nodes that no graph input reaches, not even through a shape, are constants: every part that needs one
  gets its own copy (``onnx.utils.Extractor`` pulls them in), as does every initializer a part reads
  (weights shared between branches are copied into each part that uses them, and listed);
- a tensor made in one part and read by another is an *interface tensor*: renamed ``<part>.embeds``
  (``<part>.embeds.1`` ... when a part sends several), unless it is a model output, which keeps its name;
  every interface tensor carries the batch on axis 0 (``split/interface.py`` redraws the cut until it does).

The parts are extracted with ``onnx.utils.Extractor`` from the renamed, shape-inferred graph; the only
hand-written piece is the renaming (onnx has no API to rename one tensor across a graph).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..modality import FUSION, MODALITIES, order_branches
from .interface import ShapeProbe, put_batch_first

MIN_TOWER_COMPUTE = 2
# One of these is a tower by itself (a one-layer GRU text encoder does several MatMuls per step inside).
_TOWER_BY_ITSELF = ("LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention")
_SHAPE_ONLY = ("Shape", "Size")


@dataclass
class Part:
    name: str
    inputs: list[str]              # graph inputs and interface tensors it reads, in that order
    outputs: list[str]             # model outputs it makes, then the interface tensors it sends
    after: list[str]               # the parts whose interface tensors it reads
    nodes: int = 0
    compute_nodes: int = 0
    path: Path | None = None       # the extracted FP32 sub-model


@dataclass
class SplitPlan:
    parts: list[Part]
    interface: dict[str, dict]     # tensor -> {"from": part, "to": [parts], "original": old name}
    shared_initializers: dict[str, list[str]] = field(default_factory=dict)  # initializer -> parts reading it
    branch_summary: dict = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)   # branch -> why it joined the fusion part

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]


def split_onnx(fp32_path: Path, out_dir: Path, *, branch_overrides=None, samples=()) -> SplitPlan:
    """Write one FP32 ONNX file per part into ``out_dir`` (``<part>.onnx``) and return the plan.

    ``samples``: feeds at two or more batch sizes, to observe the interface tensors' dims."""
    import onnx

    from ..quant.branches import COMPUTE_OPS, find_branches

    model = onnx.load(str(fp32_path))
    bmap = find_branches(model, overrides=branch_overrides)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    graph_outputs = [o.name for o in graph.output]
    producer = {o: n for n in graph.node for o in n.output if o}

    # Data reach (as find_branches reads it: a Shape/Size output carries no data). A node no data reaches
    # is *free*: a constant or shape arithmetic, copied into every part that needs it.
    data: dict[str, bool] = {n: True for n in graph_inputs}
    data_nodes: set[str] = set()
    for node in graph.node:   # exporter output is topologically sorted (find_branches sorts defensively)
        hit = any(data.get(i, False) for i in node.input if i)
        if hit:
            data_nodes.add(node.name)
        for o in node.output:
            data[o] = hit and node.op_type not in _SHAPE_ONLY

    compute = defaultdict(int)
    for name, branch in bmap.branch_of.items():
        if name in data_nodes and bmap.op_of[name] in COMPUTE_OPS:
            compute[branch] += MIN_TOWER_COMPUTE if bmap.op_of[name] in _TOWER_BY_ITSELF else 1
    towers = [b for b in MODALITIES if compute[b] >= MIN_TOWER_COMPUTE]
    if not towers:
        _refuse_unsplittable(bmap, compute, towers)

    part_of: dict[str, str] = {}
    input_shapes: set[str] = set()   # Shape/Size of a graph input: rebuilt in each part that reads it
    for node in graph.node:
        if node.name not in data_nodes:
            continue
        if node.op_type in _SHAPE_ONLY and node.input[0] in graph_inputs:
            input_shapes.add(node.name)
            continue
        if node.op_type in _SHAPE_ONLY and node.input[0] in producer:
            part_of[node.name] = part_of.get(producer[node.input[0]].name, FUSION)  # its tensor's part
            continue
        branch = bmap.branch_of.get(node.name, FUSION)
        part_of[node.name] = branch if branch in towers else FUSION
    # A tower node reading what fusion made (interleaved fusion) moves to fusion; in graph order, so what
    # it feeds in the tower follows it.
    for node in graph.node:
        if part_of.get(node.name, FUSION) == FUSION:
            continue
        if any(part_of.get(producer[i].name) == FUSION for i in node.input if i in producer):
            part_of[node.name] = FUSION
    # Branches that hold data nodes but are no part: said at compile (a user naming them in --precision or
    # --place otherwise learns it only from an error).
    folded = {b: f"{compute[b]} compute node{'s' if compute[b] != 1 else ''}, a part needs >= {MIN_TOWER_COMPUTE}"
              for b in MODALITIES if b not in towers
              and any(bmap.branch_of.get(n) == b for n in data_nodes if n not in input_shapes)}
    folded.update({t: "it reads what the fusion part computes" for t in towers if t not in part_of.values()})
    towers = [t for t in towers if t in part_of.values()]
    if not towers:
        _refuse_unsplittable(bmap, compute, towers)
    names = order_branches(set(towers) | ({FUSION} if FUSION in part_of.values() else set()))
    if len(names) < 2:   # e.g. two towers of one modality sharing an embedding: one part, nothing cut
        raise InputError(f"every node falls in one part ({names[0]}): nothing to split", field="--split",
                         fix="compile without --split, or name a second tower with --branch BRANCH=MODULE_PATTERN")

    # The boundary, redrawn until every tensor crossing it keeps the batch on axis 0 (split/interface.py).
    probe, redrawn = ShapeProbe(model, samples), set()
    while True:
        readers, own_use, crossing = _boundary(graph, part_of)
        probe.observe(crossing)
        wrong = [t for t in crossing if probe and probe.batch_axis(t) != 0]
        if not wrong:
            break
        if wrong[0] in redrawn:   # each step takes the tensor off the boundary: a repeat is a bug, not a loop
            raise RuntimeError(f"split: the interface tensor {wrong[0]!r} could not be made batch-first")
        redrawn.add(wrong[0])
        put_batch_first(model, wrong[0], part_of, readers, own_use, probe)
    producer = {o: n for n in graph.node for o in n.output if o}
    out_part = {o: part_of[producer[o].name] for o in graph_outputs if o in producer and producer[o].name in part_of}
    after: dict[str, set[str]] = defaultdict(set)
    for tensor in crossing:
        for reader in readers[tensor]:
            after[reader].add(part_of[producer[tensor].name])
    _check_acyclic(names, after)

    renames, interface = {}, {}
    per_part = defaultdict(list)
    for tensor in crossing:
        per_part[part_of[producer[tensor].name]].append(tensor)
    for part, tensors in per_part.items():
        for k, tensor in enumerate(tensors):
            new = tensor if tensor in graph_outputs else f"{part}.embeds" + (f".{k}" if k else "")
            renames[tensor] = new
            interface[new] = {"from": part, "to": order_branches(readers[tensor]), "original": tensor}
    _rename_tensors(model, renames)
    if probe:
        _write_dims(model, {new: probe.dims(info["original"], new) for new, info in interface.items()},
                    {new: probe.dtypes[info["original"]] for new, info in interface.items()})
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    _check_typed(model, list(interface))

    out_dir.mkdir(parents=True, exist_ok=True)
    parts, shared = [], defaultdict(set)
    for name in names:
        outs = [o for o in graph_outputs if out_part.get(o) == name]
        outs += [t for t, info in interface.items() if info["from"] == name and t not in outs]
        if not outs:
            continue
        own = [n for n in model.graph.node if part_of.get(n.name) == name]
        read = {i for n in own for i in n.input}
        ins = [i for i in graph_inputs if i in read]
        local = _rebuild_input_shapes(model, input_shapes, ins, name)
        received = [t for t, info in interface.items() if name in info["to"]]
        ins += [i for i in graph_inputs if i not in ins and _still_reads(local, i, outs, ins + received)]
        ins += received
        sub = onnx.utils.Extractor(local).extract_model(ins, outs)
        _check_self_contained(sub, name, set(ins))
        path = out_dir / f"{name}.onnx"
        onnx.save(sub, str(path))
        for init in sub.graph.initializer:
            if init.name in inits:
                shared[init.name].add(name)
        parts.append(Part(name, ins, outs, order_branches(after[name]), nodes=len(own),
                          compute_nodes=sum(1 for n in own if n.op_type in COMPUTE_OPS), path=path))
    produced = {t for p in parts for t in p.outputs}
    missing = [o for o in graph_outputs if o not in produced]
    if missing:   # an output no fed node makes (a constant output): nothing to split it into
        raise InputError(f"output {missing[0]!r} is a constant, computed from no input", field="--split",
                         fix="drop that output from the model, or compile without --split")
    return SplitPlan(parts, interface, {k: sorted(v) for k, v in shared.items() if len(v) > 1},
                     bmap.summary(), {b: folded[b] for b in order_branches(folded)})


def _rebuild_input_shapes(model, shape_nodes: set[str], own_inputs: list[str], part: str):
    """A copy of ``model`` in which every Shape of a graph input this part does not read is rebuilt from
    the part's own inputs: static dims become constants, a symbolic dim is read from an own input that
    carries the same symbol (torch.export names the shared batch dim once, and a text tower may take its
    batch from the image's shape). A shape that cannot be rebuilt keeps reading the other input, which
    then becomes an input of this part (still correct, only less separable)."""
    import copy

    from onnx import helper, numpy_helper

    local = copy.deepcopy(model)
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in vi.type.tensor_type.shape.dim] for vi in local.graph.input}
    where = {}
    for name in own_inputs:
        for axis, dim in enumerate(dims.get(name, [])):
            if isinstance(dim, str):
                where.setdefault(dim, (name, axis))
    nodes = []
    for node in local.graph.node:
        if node.name not in shape_nodes or node.input[0] in own_inputs or node.op_type != "Shape":
            nodes.append(node)
            continue
        shape = dims.get(node.input[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", None)
        picked = shape[start:end] if shape is not None else None
        if picked is None or not picked or any(d is None or (isinstance(d, str) and d not in where) for d in picked):
            nodes.append(node)
            continue
        pieces = []
        for k, dim in enumerate(picked):
            out = f"{node.output[0]}.{part}.{k}"
            if isinstance(dim, str):
                src, axis = where[dim]
                nodes.append(helper.make_node("Shape", [src], [out], name=f"{node.name}.{part}.{k}",
                                              start=axis, end=axis + 1))
            else:
                nodes.append(helper.make_node("Constant", [], [out], name=f"{node.name}.{part}.{k}",
                                              value=numpy_helper.from_array(__import__("numpy").array([dim], "int64"))))
            pieces.append(out)
        nodes.append(helper.make_node("Concat", pieces, [node.output[0]], name=node.name, axis=0))
    del local.graph.node[:]
    local.graph.node.extend(nodes)
    return local


def _still_reads(model, graph_input: str, outputs: list[str], inputs: list[str]) -> bool:
    """Whether computing ``outputs`` from ``inputs`` still needs ``graph_input`` (a shape not rebuilt)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    stack, seen = list(outputs), set()
    while stack:
        t = stack.pop()
        if t in seen or t in inputs:
            continue
        seen.add(t)
        if t == graph_input:
            return True
        if t in producer:
            stack.extend(i for i in producer[t].input if i)
    return False


def _write_dims(model, dims: dict[str, list], dtypes: dict) -> None:
    """Each interface tensor's shape into value_info as observed on the FP32 graph (ShapeProbe.dims):
    exporters' value_info can carry dims specialised to the example batch."""
    from onnx import helper

    for vi in list(model.graph.value_info):
        if vi.name in dims:
            model.graph.value_info.remove(vi)
    outputs = {o.name: o for o in model.graph.output}
    for t, shape in dims.items():
        vi = helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(dtypes[t]), shape)
        if t in outputs:
            outputs[t].CopyFrom(vi)
        else:
            model.graph.value_info.append(vi)


def _boundary(graph, part_of: dict[str, str]):
    """(readers: tensor -> the other parts reading it, own_use: tensors their maker's part reads too,
    crossing: the tensors other parts read, in graph order). A free node (constant or shape arithmetic,
    copied where needed) reads for the parts its consumers are in."""
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    serves: dict[str, set[str]] = defaultdict(set)
    for node in reversed(graph.node):
        if node.name in part_of:
            continue
        for o in node.output:
            for c in consumers.get(o, []):
                serves[node.name] |= {part_of[c.name]} if c.name in part_of else serves[c.name]
    readers: dict[str, set[str]] = defaultdict(set)
    own_use: set[str] = set()
    for node in graph.node:
        users = {part_of[node.name]} if node.name in part_of else serves.get(node.name, set())
        for i in node.input:
            if i in producer and producer[i].name in part_of:
                maker = part_of[producer[i].name]
                readers[i] |= users - {maker}
                if maker in users:
                    own_use.add(i)
    crossing = [t for n in graph.node if n.name in part_of for t in n.output if readers.get(t)]
    return readers, own_use, crossing


def _refuse_unsplittable(bmap, compute, towers) -> None:
    present = [b for b in bmap.present() if b != FUSION]
    if len(present) <= 1 and not compute[FUSION]:
        raise InputError(f"the model has one modality ({', '.join(present) or 'none found'}): nothing to split",
                         field="--split", fix="compile without --split")
    counts = ", ".join(f"{b}: {compute[b]}" for b in present) or "none"
    raise InputError("no separable branches (early fusion): the towers are only input embeddings "
                     f"(compute nodes per branch: {counts}; fusion: {compute[FUSION]}) and everything after them "
                     "sees every modality", field="--split",
                     fix="compile without --split, or name the towers with --branch BRANCH=MODULE_PATTERN")


def _check_acyclic(names, after) -> None:
    state: dict[str, int] = {}

    def visit(n, trail):
        if state.get(n) == 1:
            loop = " -> ".join(trail[trail.index(n):] + [n])
            raise InputError(f"branches read each other ({loop}): no order runs them one after another",
                             field="--split", fix="compile without --split, or regroup nodes with --branch")
        if state.get(n) == 2:
            return
        state[n] = 1
        for dep in sorted(after.get(n, ())):
            visit(dep, trail + [n])
        state[n] = 2

    for name in names:
        visit(name, [])


def _rename_tensors(model, renames: dict[str, str]) -> None:
    """Rename tensors across the graph: node inputs/outputs (subgraphs too), graph IO and value_info.

    Hand-written: onnx offers prefixing every name (onnx.compose.add_prefix), not renaming one tensor."""
    if not renames:
        return

    def walk(graph):
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name in renames:
                    node.input[k] = renames[name]
            for k, name in enumerate(node.output):
                if name in renames:
                    node.output[k] = renames[name]
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.name in renames:
                vi.name = renames[vi.name]

    walk(model.graph)


def _check_typed(model, tensors) -> None:
    known = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    for name in tensors:
        vi = known.get(name)
        if vi is None or not vi.type.tensor_type.elem_type:
            raise InputError(f"ONNX shape inference gives no type for the interface tensor {name!r}", field="--split",
                             fix="compile without --split, or report the model to edgemm")


def _check_self_contained(sub, part: str, inputs: set[str]) -> None:
    """Every tensor a part reads is its input, an initializer or made inside it (Extractor does not look
    into subgraphs' outer-scope names: checked here rather than trusted)."""
    made = inputs | {i.name for i in sub.graph.initializer} | {o for n in sub.graph.node for o in n.output}

    def reads(graph, local):
        for node in graph.node:
            for i in node.input:
                if i and i not in local and i not in made:
                    return i
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    inner = local | {x.name for x in g.input} | {x.name for x in g.initializer} \
                        | {o for n in g.node for o in n.output}
                    missing = reads(g, inner)
                    if missing:
                        return missing
        return None

    missing = reads(sub.graph, set())
    if missing:
        raise InputError(f"part {part} reads {missing!r}, which no part boundary carries", field="--split",
                         fix="compile without --split, or regroup nodes with --branch")
