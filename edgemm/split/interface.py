"""Interface tensors carry the batch on axis 0.

Each part is calibrated, quantized, judged and served like a whole model, and everything that does it (ONNX
Runtime and modelopt calibration, the held-out recipe choice, Triton's batcher) reads samples along axis 0.
A tensor crossing a cut with its batch elsewhere (CLIP's ``image_embeds.T`` before
``text_embeds @ image_embeds.T``: ``[proj, batch]``; an LSTM's ``h_n``: ``[layers, batch, hidden]``) or with
no batch at all (a Shape) would be sliced along the wrong axis. So, once the cut is drawn:

1. a layout node (Transpose, Reshape, Shape...) making such a tensor moves into the one part reading it,
   when its own part does not read it: what crosses is then its input (CLIP: the batch-first embedding);
2. a tensor still carrying its batch off axis 0 crosses transposed batch-first: a Transpose is added at the
   end of the part making it and its inverse at the start of each part reading it (a copy, no arithmetic);
3. a tensor with no batch axis left (a reduction over the batch) is refused in one line, naming it.

The batch axis is observed, not guessed from names: the FP32 graph runs on the probe feeds (two batch sizes
when the batch is dynamic) with the candidate tensors as extra outputs."""

from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import InputError

# Nodes that only rearrange (or measure) a tensor: cheap to run in the part that reads their output.
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size")


class ShapeProbe:
    """Shapes of named tensors of ``model`` on each probe feed; tensors already seen are not run again."""

    def __init__(self, model, samples: Sequence[Mapping]):
        self.model, self.samples = model, list(samples)
        self.batches = [int(next(iter(feeds.values())).shape[0]) for feeds in self.samples]
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.dtypes: dict[str, object] = {}

    def __bool__(self) -> bool:
        return bool(self.samples)

    def observe(self, tensors: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(tensors) if t not in self.shapes]
        if not todo or not self.samples:
            return
        import copy

        from onnx import helper

        from ..onnx_io import cpu_session

        probe = copy.deepcopy(self.model)
        have = {o.name for o in probe.graph.output}
        for t in todo:
            if t not in have:
                probe.graph.output.append(helper.make_empty_tensor_value_info(t))
        sess = cpu_session(probe.SerializeToString())
        runs = [sess.run(todo, dict(feeds)) for feeds in self.samples]
        for k, t in enumerate(todo):
            self.shapes[t] = [tuple(int(s) for s in run[k].shape) for run in runs]
            self.dtypes[t] = runs[0][k].dtype

    def batch_axis(self, tensor: str) -> int | None:
        """The axis that follows the batch (0 first when several do); None when none does."""
        shapes = self.shapes[tensor]
        ranks = {len(s) for s in shapes}
        if len(ranks) != 1:
            return None
        rank = ranks.pop()
        follow = [a for a in range(rank) if [s[a] for s in shapes] == self.batches]
        if len(set(self.batches)) == 1:   # one probe batch (a fixed-batch model): axis 0 when it fits
            follow = follow[:1] if 0 in follow else follow
        return follow[0] if follow else None

    def dims(self, tensor: str, name: str) -> list:
        """Dims for value_info: ``batch`` where they follow the batch, a symbol where they vary otherwise."""
        shapes = self.shapes[tensor]
        out: list = []
        for axis, size in enumerate(shapes[0]):
            sizes = [s[axis] for s in shapes]
            if len(set(self.batches)) > 1 and sizes == self.batches:
                out.append("batch")
            elif len(set(sizes)) == 1:
                out.append(int(size))
            else:
                out.append(f"{name}.d{axis}")
        return out


def refuse_unbatched(tensor: str, made_by: str, read_by: Sequence[str], probe: ShapeProbe) -> None:
    shapes = ", ".join(f"{list(s)} at batch {b}" for s, b in zip(probe.shapes[tensor], probe.batches))
    raise InputError(f"the tensor {tensor!r} crossing from part {made_by} to {', '.join(read_by)} has no batch axis "
                     f"({shapes}): a part is calibrated and judged sample by sample along axis 0",
                     field="--split", fix="compile without --split, or keep the node making it in one branch with "
                                          "--branch BRANCH=MODULE_PATTERN")


def transpose_pair(tensor: str, axis: int, rank: int, readers: Sequence[str]):
    """(the batch-first tensor's name, the Transpose making it, {reader part: (Transpose restoring the
    layout, the restored tensor's name)}): a copy on each side of the cut."""
    from onnx import helper

    perm = [axis] + [a for a in range(rank) if a != axis]
    inverse = [perm.index(a) for a in range(rank)]
    moved = f"{tensor}.batch_first"
    there = helper.make_node("Transpose", [tensor], [moved], name=f"{tensor}.to_batch_first", perm=perm)
    back = {}
    for part in readers:
        restored = f"{tensor}.in_{part}"
        back[part] = (helper.make_node("Transpose", [moved], [restored], name=f"{tensor}.from_batch_first.{part}",
                                       perm=inverse), restored)
    return moved, there, back


def put_batch_first(model, tensor: str, part_of, readers, own_use, probe: ShapeProbe) -> None:
    """One step towards a batch-first boundary for ``tensor`` (split/interface.py): move the layout node
    making it into the part reading it, else cross it transposed batch-first, else refuse."""
    graph = model.graph
    nodes = list(graph.node)
    maker = next(n for n in nodes if tensor in n.output)
    source, targets = part_of[maker.name], sorted(readers[tensor])
    axis = probe.batch_axis(tensor)
    if maker.op_type in LAYOUT_OPS and len(targets) == 1 and not any(o in own_use for o in maker.output) \
            and all(readers.get(o, set()) <= set(targets) for o in maker.output):
        part_of[maker.name] = targets[0]
        return
    if axis is None:
        refuse_unbatched(tensor, source, targets, probe)
    moved, there, back = transpose_pair(tensor, axis, len(probe.shapes[tensor][0]), targets)
    added = [there] if not any(n.name == there.name for n in nodes) else []
    part_of[there.name] = source
    for part, (node, restored) in back.items():
        if not any(n.name == node.name for n in nodes):
            added.append(node)
        part_of[node.name] = part
        for reader in nodes:
            if part_of.get(reader.name) == part and reader.name != node.name:
                for k, name in enumerate(reader.input):
                    if name == tensor:
                        reader.input[k] = restored
    at = nodes.index(maker) + 1
    nodes[at:at] = added
    del graph.node[:]
    graph.node.extend(nodes)


__all__ = ["LAYOUT_OPS", "ShapeProbe", "put_batch_first", "refuse_unbatched", "transpose_pair"]
