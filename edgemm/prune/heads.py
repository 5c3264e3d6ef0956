"""Whole-head pruning for multi-head attention modules.

A dependency graph cannot prune heads on its own: the head count lives in a Python attribute that the
module's forward() reads to reshape q/k/v, and torch-pruning's index mapping through ``chunk`` (a fused
key/value projection) couples the wrong channels. So attention modules are recognised by their layout
(a head-count attribute plus named projections), heads are removed from the projections with
torch-pruning's own layer functions, and the attribute is updated. Recognised layouts:

- ``query`` + ``key_value`` (k and v fused, split with chunk) + ``out``            (edgemm zoo)
- ``qkv`` (q, k, v fused in that order) + ``proj`` / ``out`` / ``out_proj``          (timm ViT)
- ``query``/``key``/``value`` or ``q_proj``/``k_proj``/``v_proj`` + an output projection: a child, a
  sibling such as ``attention_output``, or a Linear inside a sibling block (Hugging Face BERT's
  ``attention.self`` + ``attention.output.dense``)

with the head count in ``heads`` / ``num_heads`` / ``num_attention_heads`` / ``n_heads``, or, for the
graph modules of an unflattened ``.pt2`` program, in the literal shapes of its reshapes
(``reshape(q, [B, N, heads, head_dim])``, or ``[B, N, -1, head_dim]`` as Hugging Face writes it): those
literals are rewritten with the new head count. Modules that reshape with module-level constants instead
of attributes, and ``nn.MultiheadAttention`` (q/k/v packed in ``in_proj_weight``), keep their heads (their
MLPs still prune); kept_attention() names them for the report.
Every removal is checked afterwards (see structured.verify_equivalent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEAD_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_heads")
OUT_NAMES = ("out", "out_proj", "o_proj", "proj", "dense", "output")
SIBLING_OUT_NAMES = OUT_NAMES + ("attention_output", "attn_output", "attn_out")
SEPARATE_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
# Attributes holding heads * head_dim that forward() may read; rescaled with the head count.
WIDTH_ATTRS = ("all_head_size", "inner_dim", "attn_dim")


@dataclass
class AttentionSite:
    path: str
    module: object
    head_attr: str
    heads: int
    head_dim: int
    layout: str                               # "kv_fused" | "qkv_fused" | "separate"
    projections: dict = field(default_factory=dict)   # role -> child name
    out: object = None                        # the output projection (nn.Linear)
    out_path: str = ""                        # its path from the model root

    def layer(self, role: str):
        return getattr(self.module, self.projections[role])

    def head_columns(self, heads: list[int]) -> list[int]:
        """Input columns of the output projection that carry ``heads``."""
        return [h * self.head_dim + i for h in heads for i in range(self.head_dim)]


def find_attention(module) -> list[AttentionSite]:
    from torch import nn

    sites = []
    for path, sub in module.named_modules():
        parent_path, _, _ = path.rpartition(".")
        parent = (module.get_submodule(parent_path) if parent_path else module) if path else None
        site = _match(path, sub, parent, parent_path, nn)
        if site is not None:
            sites.append(site)
    return sites


def _linear_children(module, nn) -> dict:
    return {name: m for name, m in module.named_children() if isinstance(m, nn.Linear)}


def _match(path, sub, parent, parent_path, nn):
    head_attr = next((a for a in HEAD_ATTRS if isinstance(getattr(sub, a, None), int)
                      and not isinstance(getattr(sub, a), bool)), None)
    linear = _linear_children(sub, nn)
    layout = _layout(linear)
    if layout is None:
        return None
    kind, roles, width = layout
    if head_attr is not None:
        heads = getattr(sub, head_attr)
    else:
        head_attr, heads = GRAPH_HEADS, program_heads(sub, width)
    if heads is None or heads < 2 or width % heads:
        return None
    out_name = next((n for n in OUT_NAMES if n in linear and linear[n].in_features == width), None)
    out, out_path = (linear[out_name], f"{path}.{out_name}" if path else out_name) if out_name else (None, "")
    if out is None and parent is not None:  # BERT keeps the output projection beside the attention module
        out, out_path = _sibling_out(parent, parent_path, width, nn)
    if out is None:
        return None
    return AttentionSite(path, sub, head_attr, heads, width // heads, kind, roles, out, out_path)


def _sibling_out(parent, parent_path: str, width: int, nn):
    """The output projection beside an attention module: a sibling Linear (``attention_output``), or a
    Linear inside a sibling block (Hugging Face BERT: ``attention.output.dense``)."""
    prefix = f"{parent_path}." if parent_path else ""
    for name, sibling in parent.named_children():
        if name not in SIBLING_OUT_NAMES:
            continue
        if isinstance(sibling, nn.Linear):
            if sibling.in_features == width:
                return sibling, prefix + name
            continue
        inner = _linear_children(sibling, nn)
        child = next((n for n in OUT_NAMES if n in inner and inner[n].in_features == width), None)
        if child is not None:
            return inner[child], f"{prefix}{name}.{child}"
    return None, ""


def _layout(linear: dict):
    """(layout, role -> child name, heads * head_dim) of the q/k/v projections, or None."""
    if "query" in linear and "key_value" in linear:
        width = linear["query"].out_features
        if linear["key_value"].out_features == 2 * width:
            return "kv_fused", {"query": "query", "key_value": "key_value"}, width
        return None
    if "qkv" in linear:
        if linear["qkv"].out_features % 3 == 0:
            return "qkv_fused", {"qkv": "qkv"}, linear["qkv"].out_features // 3
        return None
    for names in SEPARATE_NAMES:
        if all(n in linear for n in names):
            width = linear[names[0]].out_features
            if all(linear[n].out_features == width for n in names):
                return "separate", dict(zip(("q", "k", "v"), names)), width
    return None


def head_scores(site: AttentionSite, stats) -> "list[float]":
    """Importance per head: the output projection's input-channel scores summed over each head."""
    from .importance import channel_scores

    scores = channel_scores(site.out, stats)
    return [float(scores[h * site.head_dim:(h + 1) * site.head_dim].sum()) for h in range(site.heads)]


def remove_heads(site: AttentionSite, drop: list[int]) -> None:
    """Remove heads ``drop`` from the projections and update the module's head-count attribute."""
    import torch_pruning as tp

    if not drop:
        return
    width = site.heads * site.head_dim
    rows = site.head_columns(drop)
    if site.layout == "kv_fused":
        tp.prune_linear_out_channels(site.layer("query"), rows)
        tp.prune_linear_out_channels(site.layer("key_value"), rows + [width + r for r in rows])
    elif site.layout == "qkv_fused":
        qkv_rows = [part * width + r for part in range(3) for r in rows]
        tp.prune_linear_out_channels(site.layer("qkv"), qkv_rows)
    else:
        for role in ("q", "k", "v"):
            tp.prune_linear_out_channels(site.layer(role), rows)
    tp.prune_linear_in_channels(site.out, rows)
    new_heads = site.heads - len(drop)
    if site.head_attr == GRAPH_HEADS:
        rewrite_program_heads(site.module, site.heads, new_heads, site.head_dim)
    else:
        setattr(site.module, site.head_attr, new_heads)
    for attr in WIDTH_ATTRS:
        if getattr(site.module, attr, None) == width:
            setattr(site.module, attr, new_heads * site.head_dim)
    site.heads = new_heads


# -- .pt2 programs: the head count is a literal in the graph's reshapes -----------------------------------

GRAPH_HEADS = "<program reshapes>"   # AttentionSite.head_attr of a graph module without a head attribute


def _reshapes(graph):
    import torch

    aten = torch.ops.aten
    kinds = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
    return [n for n in graph.nodes if n.op == "call_function" and n.target in kinds
            and len(n.args) > 1 and isinstance(n.args[1], (list, tuple))]


def program_heads(sub, width: int) -> int | None:
    """The head count of an unflattened program's attention module: every reshape that splits the
    projection width into [..., heads, head_dim] (or [..., -1, head_dim], as Hugging Face's view does)
    must agree on it. None when there is no graph or no such reshape (the module is then left alone)."""
    graph = getattr(sub, "graph", None)
    if graph is None or not hasattr(sub, "finalize"):
        return None
    found = set()
    for node in _reshapes(graph):
        shape = node.args[1]
        if len(shape) >= 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in shape[-2:]):
            heads, head_dim = shape[-2:]
            if heads == -1 and head_dim >= 1 and width % head_dim == 0:
                heads = width // head_dim       # -1 follows the pruned width by itself: nothing to rewrite
            if heads >= 2 and head_dim >= 1 and heads * head_dim == width:
                found.add(heads)
    return found.pop() if len(found) == 1 else None


def kept_attention(module, found: set[str]) -> list[str]:
    """Attention modules whose heads cannot be pruned (their MLPs and widths still can), for the report:
    ``nn.MultiheadAttention`` (q/k/v packed in one parameter, also in a .pt2's graph modules) and q/k/v
    layouts whose head count is neither an attribute nor readable from the reshapes. ``found``: the paths
    find_attention() recognised."""
    from torch import nn

    kept = []
    for path, sub in module.named_modules():
        if path in found or any(path.startswith(f"{p}.") for p in found):
            continue
        if isinstance(sub, nn.MultiheadAttention) or (
                hasattr(sub, "graph") and isinstance(getattr(sub, "in_proj_weight", None), nn.Parameter)):
            kept.append(f"{path or '<model>'} (q/k/v packed in in_proj_weight)")
        elif _layout(_linear_children(sub, nn)) is not None:
            kept.append(f"{path or '<model>'} (head count not found)")
    return kept


def rewrite_program_heads(sub, heads: int, new_heads: int, head_dim: int) -> None:
    """Rewrite the literal shapes of ``sub``'s graph for ``new_heads``: [.., heads, head_dim] splits and
    trailing heads * head_dim merges. Hand-written because no library edits head counts inside an
    exported program; a wrong rewrite fails the equivalence check and the heads are kept."""
    width, new_width = heads * head_dim, new_heads * head_dim
    for node in _reshapes(sub.graph):
        shape = list(node.args[1])
        if len(shape) >= 2 and shape[-2:] == [heads, head_dim]:
            shape[-2] = new_heads
        elif shape and shape[-1] == width:
            shape[-1] = new_width
        else:
            continue
        node.args = (node.args[0], shape, *node.args[2:])
    sub.finalize()  # regenerates the GraphModule code that export tracing runs


def attention_layers(sites: list[AttentionSite]) -> dict:
    """Projection layer -> the direction ("in"/"out") that carries heads, for every recognised attention
    module. Those dims are pruned by head only; the other direction is the residual width."""
    layers = {}
    for site in sites:
        layers[site.out] = "in"
        for role in site.projections:
            layers[site.layer(role)] = "out"
    return layers
