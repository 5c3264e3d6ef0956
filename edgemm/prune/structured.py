"""Structured pruning per modality branch: attention heads, MLP hidden channels, conv channels, and
the residual width of transformer towers.

The pruned model is a smaller copy with the same inputs and outputs. Channels are coupled through
torch-pruning's dependency graph (a conv's BatchNorm, the next layer's input, a ``torch.cat`` that
joins two branches in a fusion head), so shapes stay consistent across branches. Two passes:

1. heads (``heads.py``), MLP hidden and conv channels: groups whose channels reach nothing but their
   consumers' inputs. Checked exactly: the pruned model must compute the same function as the original
   with the removed channels' consumer weights zeroed, which catches any coupling the graph got wrong.
2. residual width: the groups pass 1 leaves for LayerNorm / embeddings / position parameters. A
   residual stream shared by branches (a text stream that continues through cross-attention fusion
   blocks) is pruned at the smallest ratio among them. LayerNorm statistics change, so no exact check
   exists: the result must run and keep its output shapes, and recovery re-fits it.

Never pruned: groups that reach a model output (every output is marked in the dependency graph, see
_marked_outputs: inputs and outputs keep their shapes), attention score computations, and
index-remapping ops the graph cannot follow (split/unbind/slice/expand). A channel group whose removal
breaks the model is found by bisection and kept; a head or width pass whose result fails its check is
dropped; both are noted in the report and the rest retried.

Long module: the two passes share the dependency graph, the output marks and the bisection; the head and
width details already live in heads.py / hidden.py.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..signature import call_module
from ..errors import InputError, ParityError, first_line
from .branches import branch_of, find_branches
from .dep_budget import Budget, all_groups, walk_failure
from .fastpath import mha_fastpath_off
from .heads import attention_layers, find_attention, head_scores, kept_attention, remove_heads
from .importance import ActivationStats, group_importance
from .measure import branch_costs
from .spec import ratios_for

log = logging.getLogger("edgemm")

ROUND_TO = 8           # kept channel counts are rounded to a multiple of this (GEMM-friendly widths)
# Ops reached by a channel that make removing it change more than its consumers' inputs.
# (Matmuls between activations, softmax, and reductions that may run over the channel axis; spatial
# pooling and elementwise max/min are per channel and safe.)
_UNSAFE_GRAD_FNS = re.compile(r"^(Bmm|Mm|Mv|Dot|Baddbmm|Softmax|LogSoftmax|_Softmax|ScaledDotProduct|"
                              r"_ScaledDotProduct|LinalgVectorNorm|NormBackward|NativeLayerNorm|NativeGroupNorm|"
                              r"StdBackward|VarBackward|Cumsum|Sort|Topk|MaxBackward|MinBackward|Logsumexp)")
# FP32 tolerance of the equivalence check: the pruned GEMMs sum fewer terms in another order.
_EQUIV_RTOL = 1e-3
_EQUIV_ATOL = 1e-4


@dataclass
class _GroupPlan:
    root: object
    root_path: str
    branch: str | None
    kind: str
    channels: int
    drop: list[int]
    spanned: list[str]


def ordered_input_names(module, feeds: Mapping[str, np.ndarray]) -> list[str]:
    """Input names in forward() order when the signature names them all, else the feeds' order."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters]
    except (TypeError, ValueError):
        params = []
    if params and set(feeds) <= set(params):
        return [p for p in params if p in feeds]
    return list(feeds)


def keep_count(channels: int, ratio: float, round_to: int = ROUND_TO) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``: at least ``ratio`` is removed, and layers of
    ``2 * round_to`` channels and more keep a multiple of ``round_to``: GEMMs keep aligned widths, and ONNX
    Runtime's blocked (NCHWc) convolutions (the pruned cross-attention model ran 1.17x slower with a
    17-channel conv than with 16).
    Rounding the kept count *down* is torch-pruning's ``round_to`` rule: ``--prune 0.3`` then means at
    least 30% of the channels, where rounding to the nearest multiple removed 25% of a 64-wide layer."""
    keep = channels - int(round(ratio * channels))
    if round_to > 1 and channels >= 2 * round_to and keep < channels:
        keep = max(round_to, keep // round_to * round_to)
    return max(1, min(channels, keep))


@mha_fastpath_off()
def prune(module, example_feeds: Mapping[str, np.ndarray], calib: Mapping[str, np.ndarray],
          spec: Mapping[str, float], *, input_names: Sequence[str] | None = None,
          round_to: int = ROUND_TO, width: bool = True) -> tuple[object, dict]:
    """A pruned copy of ``module`` and a report (per branch: ratio, params and FLOPs before/after).

    ``example_feeds``: a small batch (>= 2) used to trace the graph and check the result.
    ``calib``: unlabeled calibration samples (axis 0) that rank channels by what they carry.
    ``spec``: from ``parse_prune_spec``. ``module`` itself is not modified.
    ``width``: also narrow transformer residual streams (pass 2 in the module docstring).
    """
    names = list(input_names) if input_names else ordered_input_names(module, example_feeds)
    _check_feeds(names, example_feeds, "example_feeds")
    _check_feeds(names, calib, "calib")
    module.eval()
    branches = find_branches(module, names, example_feeds)
    ratios = ratios_for(dict(spec), list(branches))
    before = branch_costs(module, names, example_feeds, branches)
    reference = _run(module, names, example_feeds)

    stats = ActivationStats().collect(module, names, calib)
    notes: list[str] = []
    # Head removal relies on recognising the attention layout and width pruning on the graph tracing
    # every use of the residual stream; a stage whose result fails its check is dropped and the rest retried.
    # A channel or width group whose removal breaks the model (a shape baked into forward(),
    # `x.view(-1, 32)`) is found by bisection and kept; the other groups are still pruned.
    stages = {"heads": True, "width": width}
    kept_groups: list[str] = []

    def attempt(**kw):
        return _attempt(module, names, example_feeds, branches, ratios, stats, round_to, reference,
                        keep=frozenset(kept_groups), **kw)

    while True:
        try:
            student, head_report, group_report, skipped, worst = attempt(**stages)
            break
        except _StageFailed as failed:
            if failed.stage in ("channels", "width") and failed.planned:
                in_width = failed.stage == "width"
                culprit = _breaking_group(failed.planned, lambda limit: attempt(
                    heads=stages["heads"], width=in_width, **{"width_limit" if in_width else "limit": limit}))
                if culprit is not None:
                    kept_groups.append(culprit)
                    what = "residual width written by" if in_width else "channels of"
                    notes.append(f"{what} {culprit} kept: pruning them broke the model ({failed.error.detail})")
                    continue
                if not in_width:
                    failed.stage = "heads"  # the groups alone are fine: removing heads is what breaks it
            if failed.stage not in stages or not stages[failed.stage]:
                raise failed.error from failed
            stages[failed.stage] = False
            what = {"heads": "attention heads kept", "width": "residual width kept"}[failed.stage]
            notes.append(f"{what}: pruning them broke the model ({failed.error.detail})")
    for reason, count in skipped.items():
        if "group left whole" in reason:
            notes.append(f"{count} channel group(s): {reason}")
    if stages["heads"] and any(ratios.values()):
        kept = kept_attention(module, {site["path"] for site in head_report["sites"]})
        if kept:
            notes.append(f"attention heads kept in {len(kept)} module(s): " + ", ".join(kept[:4])
                         + (", ..." if len(kept) > 4 else ""))
    # recover() matches hidden states of narrowed residual streams against these teacher channels.
    student._edgemm_streams = [g.pop("_stream") for g in group_report if "_stream" in g]
    after = branch_costs(student, names, example_feeds, branches)
    removed = _removed_fractions(branches, head_report["sites"], group_report)
    report = {
        "spec": dict(spec),
        "branches": {
            b: {"ratio": ratios[b], "modules": list(paths), "removed_fraction": removed[b],
                "params_before": before[b]["params"], "params_after": after[b]["params"],
                "flops_before": before[b]["flops"], "flops_after": after[b]["flops"],
                "heads_removed": sum(s["heads_before"] - s["heads_after"] for s in head_report["sites"]
                                     if s["branch"] == b),
                "channels_removed": sum(g["channels_before"] - g["channels_after"] for g in group_report
                                        if b in g["branches"])}
            for b, paths in branches.items()},
        "total": {"params_before": before["total"]["params"], "params_after": after["total"]["params"],
                  "flops_before": before["total"]["flops"], "flops_after": after["total"]["flops"]},
        "attention": head_report["sites"],
        "groups": group_report,
        "skipped_groups": skipped,
        "check": {"max_abs_diff_vs_masked": worst},
        "notes": notes,
        "flops_note": "matmul/conv FLOPs per sample at the example input shapes",
    }
    return student, report


def _removed_fractions(branches, sites, groups) -> dict[str, float]:
    """Per branch: removed / prunable channels (a head counts as its head_dim channels), over every
    group and attention module the branch owns; what ``--prune RATIO`` asked for, after rounding."""
    before = {b: 0 for b in branches}
    after = {b: 0 for b in branches}
    for site in sites:
        if site["branch"] in before:
            before[site["branch"]] += site["heads_before"] * site["head_dim"]
            after[site["branch"]] += site["heads_after"] * site["head_dim"]
    for group in groups:
        if group["branch"] in before:
            before[group["branch"]] += group["channels_before"]
            after[group["branch"]] += group["channels_after"]
    return {b: round(1 - after[b] / before[b], 4) if before[b] else 0.0 for b in branches}


class _StageFailed(Exception):
    def __init__(self, stage: str, error, planned: Sequence[str] = ()):
        super().__init__(str(error))
        self.stage, self.error, self.planned = stage, error, list(planned)


def _breaking_group(planned: Sequence[str], attempt) -> str | None:
    """The first of the ``planned`` channel groups (root paths, in pruning order) whose removal, after the
    ones before it, makes ``attempt(limit)`` fail; None when pruning none of them fails already.
    Bisection: log2(groups) attempts, each a fresh copy pruned and checked."""
    def fails(limit: int) -> bool:
        try:
            attempt(limit)
        except _StageFailed:
            return True
        return False

    if not planned or fails(0):
        return None
    good, bad = 0, len(planned)  # pruning the first `good` groups works, the first `bad` fails
    while bad - good > 1:
        mid = (good + bad) // 2
        if fails(mid):
            bad = mid
        else:
            good = mid
    return planned[bad - 1]


def _attempt(module, names, feeds, branches, ratios, stats, round_to, reference, heads: bool, width: bool,
             keep: frozenset = frozenset(), limit: int | None = None, width_limit: int | None = None):
    """Prune a copy in two checked passes (``keep``: root paths of groups left whole; ``limit`` /
    ``width_limit``: prune only the first that many channel / width groups). Heads, MLP and conv channels first: the result must compute
    the same function as the original with those channels' consumer weights zeroed. Then the residual
    widths, which LayerNorm couples to every channel (no masked equivalent exists): the result must
    run and keep the output shapes; recovery then re-fits it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecations when copying .pt2 modules
        student = copy.deepcopy(module).eval()
        masked = copy.deepcopy(module).eval()
    # The statistics are keyed by layer object: re-key them onto the copy's layers.
    stats = stats.rekeyed(module, student)
    if heads:
        head_report = _prune_heads(student, masked, branches, ratios, stats)
        try:
            _run_or_fail(student, names, feeds, "after removing attention heads")
        except ParityError as exc:
            raise _StageFailed("heads", exc) from exc
    else:
        head_report = {"sites": [], "layers": attention_layers(find_attention(student))}
    group_report, skipped, planned = _prune_groups(student, masked, names, feeds, branches, ratios, stats,
                                                   round_to, head_report["layers"], width=False, kept_roots=keep,
                                                   limit=limit)
    try:
        got = _run_or_fail(student, names, feeds, "after pruning")
        worst = _check_same_function(reference, _run(masked, names, feeds), got)
    except ParityError as exc:
        if heads and head_report["sites"] and not planned:
            raise _StageFailed("heads", exc) from exc
        raise _StageFailed("channels", exc, planned) from exc
    if width:
        width_planned: list[str] = []
        try:
            width_report, _, width_planned = _prune_groups(
                student, None, names, feeds, branches, ratios, stats, round_to,
                attention_layers(find_attention(student)), width=True, kept_roots=keep, limit=width_limit)
            got = _run_or_fail(student, names, feeds, "after narrowing the residual width")
            _check_interface(reference, got)
        except (ParityError, InputError) as exc:
            raise _StageFailed("width", exc, width_planned) from exc
        group_report += width_report
    for p in student.parameters():  # torch-pruning swaps in new Parameters; keep them trainable
        p.requires_grad_(True)
    return student, head_report, group_report, skipped, worst


def _run_or_fail(model, names, feeds, when: str) -> dict[str, np.ndarray]:
    try:
        return _run(model, names, feeds)
    except Exception as exc:  # a shape baked into the forward code no longer fits
        raise ParityError(f"the model does not run {when} ({first_line(exc, 200)})", field="--prune",
                          fix="report this model to edgemm; prune a different branch meanwhile") from exc


def _check_feeds(names: Sequence[str], feeds: Mapping[str, np.ndarray], role: str) -> None:
    for n in names:
        if n not in feeds:
            raise InputError(f"no data for model input {n!r}", field=f"{role}[{n!r}]",
                             fix="give one array per model input, samples on axis 0")
    sizes = {len(feeds[n]) for n in names}
    if len(sizes) != 1 or 0 in sizes:
        raise InputError(f"inputs have different or zero sample counts {sorted(sizes)}", field=role,
                         fix="give every input the same number of samples on axis 0")


def _run(model, names, feeds) -> dict[str, np.ndarray]:
    import torch

    from ..reference import flatten_outputs

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    with torch.no_grad():
        out = call_module(model, names, args)
    keys, leaves = flatten_outputs(out)
    return {k: v.detach().numpy().copy() for k, v in zip(keys, leaves)}


def _prune_heads(student, masked, branches, ratios, stats) -> dict:
    sites = find_attention(student)
    records = []
    for site in sites:
        # (an attention module that is the whole model owns no branch path; its projections do)
        branch = branch_of(site.path, branches) or branch_of(site.out_path, branches)
        ratio = ratios.get(branch, 0.0) if branch else 0.0
        n_drop = min(site.heads - 1, int(round(ratio * site.heads)))
        heads_before = site.heads
        drop: list[int] = []
        if n_drop > 0:
            scores = head_scores(site, stats)
            drop = sorted(int(h) for h in np.argsort(scores, kind="stable")[:n_drop])
            cols = site.head_columns(drop)
            with _no_grad():
                masked.get_submodule(site.out_path).weight[:, cols] = 0.0
            remove_heads(site, drop)
        records.append({"path": site.path, "branch": branch, "layout": site.layout, "head_dim": site.head_dim,
                        "heads_before": heads_before, "heads_after": site.heads, "removed": drop})
    return {"sites": records, "layers": attention_layers(sites)}


def _prune_groups(student, masked, names, feeds, branches, ratios, stats, round_to, attention, *, width: bool,
                  kept_roots: frozenset = frozenset(), limit: int | None = None):
    """Prune every eligible dependency group of ``student`` in place; with ``masked``, zero the removed
    channels' consumer weights there. ``width``: only the residual-stream groups (see _unsafe_reason).
    ``kept_roots``: root paths left whole; ``limit``: prune only the first that many groups.
    Returns (report, skipped reasons -> counts, root paths planned for pruning in order)."""
    import torch
    import torch_pruning as tp
    from torch import nn

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unwrapped parameters": position embeddings, handled as unsafe
            graph = tp.DependencyGraph().build_dependency(
                student, example_inputs=args, output_transform=_marked_outputs,
                forward_fn=lambda model, inputs: call_module(model, names, inputs))
    except Exception as exc:  # torch-pruning traces autograd; some models defeat it
        raise InputError(f"cannot trace the model's channel dependencies ({first_line(exc, 200)})", field="--prune",
                         fix="drop --prune for this model, or report it to edgemm") from exc
    in_fns = {tp.prune_linear_in_channels, tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels}
    plans: list[_GroupPlan] = []
    skipped: dict[str, int] = {}
    roots = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    budget = Budget().watch(graph)

    def walk_failed(_module, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for group in all_groups(graph, roots, budget, walk_failed):
        root = group[0].dep.target.module
        path = graph._module2name.get(root, "")
        reason = _unsafe_reason(group, attention, in_fns, tp, nn, width)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        branch = branch_of(path, branches)
        ratio = ratios.get(branch, 0.0) if branch else 0.0
        spanned = [branch] if branch else []
        if width:  # a residual stream shared by branches (text + fusion) follows the least-pruned one
            spanned = _branches_of_group(group, graph, branches)
            ratio = min((ratios.get(b, 0.0) for b in spanned), default=0.0)
        channels = len(group[0].idxs)
        keep = keep_count(channels, ratio, round_to)
        if keep >= channels:
            continue
        scores = group_importance(group, stats, in_fns)
        drop = sorted(int(i) for i in torch.argsort(scores, stable=True)[:channels - keep])
        kind = "width" if width else "conv" if isinstance(root, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "mlp"
        if path in kept_roots:
            skipped["breaks the model when pruned"] = skipped.get("breaks the model when pruned", 0) + 1
            continue
        plans.append(_GroupPlan(root, path, branch, kind, channels, drop, spanned))
    plans = plans[:limit]

    # Zero the removed channels' consumer weights in the reference copy (original coordinates) ...
    for plan in list(plans) if masked is not None else []:
        fn = graph.get_pruner_of_module(plan.root).prune_out_channels
        try:
            with budget.group():
                group = graph.get_pruning_group(plan.root, fn, plan.drop)
        except Exception as exc:  # noqa: BLE001 - as in all_groups: the group stays whole
            walk_failed(plan.root, walk_failure(exc))
            plans.remove(plan)
            continue
        for item in group:
            if item.dep.handler in in_fns:
                target = masked.get_submodule(graph._module2name[item.dep.target.module])
                with _no_grad():
                    target.weight[:, list(item.idxs)] = 0.0
    # ... then prune; each group is re-derived so concat offsets follow earlier removals.
    report = []
    for plan in plans:
        fn = graph.get_pruner_of_module(plan.root).prune_out_channels
        try:
            with budget.group():
                group = graph.get_pruning_group(plan.root, fn, plan.drop)
        except Exception as exc:  # noqa: BLE001 - re-derived after earlier removals: may walk differently
            walk_failed(plan.root, walk_failure(exc))
            continue
        if not graph.check_pruning_group(group):
            skipped["would empty a layer"] = skipped.get("would empty a layer", 0) + 1
            continue
        group.prune()
        entry = {"root": plan.root_path, "branch": plan.branch, "branches": plan.spanned, "kind": plan.kind,
                 "channels_before": plan.channels, "channels_after": plan.channels - len(plan.drop)}
        if width:  # which teacher channels survive, for hidden-state distillation (recover.py)
            dropped = set(plan.drop)
            entry["_stream"] = {**_writers(group, graph),
                                "kept": [i for i in range(plan.channels) if i not in dropped]}
        report.append(entry)
    return report, skipped, [plan.root_path for plan in plans]


def _marked_outputs(out) -> list:
    """Every output tensor behind an op of its own, so that torch-pruning marks each one as a model output.

    torch-pruning adds its output marker (``_OutputOp``) only when an output's autograd node is new to its
    trace: an output that is also an intermediate it reached from an earlier output (pooled features
    returned *and* fed to the fusion head) or the direct result of a layer (a projection returned as is)
    got no marker, and pruning cut its channels. A fresh node per output makes every group that reaches
    an output carry the marker (through pooling, flatten, norms and identities), so it is kept."""
    import torch
    from torch.utils import _pytree as pytree

    return [t.view_as(t) for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def _member_paths(group, graph) -> list[str]:
    """Module paths of the layers and parameters in a dependency group (ops left out)."""
    paths = []
    for item in group:
        mod = item.dep.target.module
        name = graph._module2name.get(mod)
        if name is not None and name.startswith("_"):  # torch-pruning's own op nodes
            name = None
        if name is None:
            param_name = graph._param_to_name.get(mod)
            name = param_name.rsplit(".", 1)[0] if param_name and "." in param_name else None
        if name and name not in paths:
            paths.append(name)
    return paths


def _writers(group, graph) -> dict:
    """Where a residual stream is written: "writers" (layers and parameters whose outputs feed it:
    Linear/Conv/Embedding outputs, position parameters) and "norms" (LayerNorms applied to it)."""
    from torch import nn

    writers, norms = [], []
    for item in group:
        mod = item.dep.target.module
        if not graph.is_out_channel_pruning_fn(item.dep.handler) and not isinstance(mod, nn.Parameter):
            continue
        if isinstance(mod, nn.Parameter):
            name = graph._param_to_name.get(mod, "")
            path = name.rsplit(".", 1)[0] if "." in name else ""
        else:
            path = graph._module2name.get(mod, "")
        if not path or path.startswith("_"):
            continue
        if isinstance(mod, nn.LayerNorm):
            norms.append(path)
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.Parameter)):
            writers.append(path)
    return {"writers": sorted(set(writers)), "norms": sorted(set(norms))}


def _branches_of_group(group, graph, branches) -> list[str]:
    found = []
    for name in _member_paths(group, graph):
        branch = branch_of(name, branches)
        if branch and branch not in found:
            found.append(branch)
    return found


def _unsafe_reason(group, attention, in_fns, tp, nn, width: bool) -> str | None:
    """Why this group must not be pruned in this pass (None when it may be).

    First pass (``width=False``): internal groups only, whose channels reach nothing but their consumers'
    inputs. Width pass: the groups the first pass left for LayerNorm / embeddings / position parameters,
    i.e. a transformer's residual stream (attention projections may join on their residual side only).
    """
    from torch_pruning import ops

    consumers = 0
    residual = False
    for item in group:
        mod, handler = item.dep.target.module, item.dep.handler
        if mod in attention:
            inner = attention[mod]
            direction = "in" if handler in in_fns else "out"
            if not width or direction == inner:
                return "attention projections (pruned by head)"
        if isinstance(mod, ops._OutputOp):
            return "reaches a model output"
        if isinstance(mod, (nn.GroupNorm, nn.EmbeddingBag, nn.modules.instancenorm._InstanceNorm)):
            return "grouped normalisation"
        if isinstance(mod, (nn.LayerNorm, nn.Embedding, nn.Parameter)):
            if not width:
                return "residual stream / normalised width"
            residual = True
        if isinstance(mod, (nn.MultiheadAttention, nn.RNNBase)):
            return "recurrent or fused attention layer"
        if isinstance(mod, (ops._SplitOp, ops._UnbindOp, ops._SliceOp, ops._ExpandOp, ops._CustomizedOp)):
            return "index-remapping op"
        if isinstance(mod, ops._ElementWiseOp) and _UNSAFE_GRAD_FNS.match(str(mod._grad_fn)):
            return "attention scores / channel reduction"
        if isinstance(mod, nn.Module) and not isinstance(mod, _safe_types()):
            if any(True for _ in mod.parameters(recurse=False)):
                return f"unsupported layer {type(mod).__name__}"
        if handler in in_fns:
            consumers += 1
        limit = _channel_count(mod, handler, tp)
        if limit is not None and item.idxs and max(item.idxs) >= limit:
            return "index mapping out of range"
    if consumers == 0:
        return "no consumer layer"
    if width and not residual:
        return "not a residual stream"
    return None


def _safe_types() -> tuple:
    from torch import nn
    from torch_pruning import ops

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.PReLU,
            nn.LayerNorm, nn.Embedding, ops._ElementWiseOp, ops._ConcatOp, ops._ReshapeOp)


def _channel_count(mod, handler, tp):
    from torch import nn

    if isinstance(mod, nn.Linear):
        # == not `is`: the pruning functions are bound methods, a new object at each access
        return mod.in_features if handler == tp.prune_linear_in_channels else mod.out_features
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return mod.in_channels if handler in (tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels) \
            else mod.out_channels
    return None


def _check_interface(reference, got) -> None:
    """Same output names and shapes, finite values."""
    if list(reference) != list(got) or any(reference[k].shape != got[k].shape for k in reference):
        shapes = {k: list(v.shape) for k, v in got.items()}
        raise ParityError(f"pruning changed the model's outputs to {shapes}", field="--prune",
                          fix="report this model to edgemm; prune a different branch meanwhile")
    bad = [k for k, v in got.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise ParityError(f"pruned output {bad[0]!r} is not finite", field="--prune",
                          fix="report this model to edgemm; prune a different branch meanwhile")


def _check_same_function(reference, expected, got) -> float:
    """Output names and shapes unchanged; pruned == original-with-removed-channels-zeroed."""
    _check_interface(reference, got)
    worst = 0.0
    for key, want in expected.items():
        have = got[key]
        if want.dtype.kind != "f":
            if not np.array_equal(want, have):
                raise ParityError(f"output {key!r} differs from the channel-masked model", field="--prune",
                                  fix="report this model to edgemm; prune a different branch meanwhile")
            continue
        if not want.size:
            continue
        diff = float(np.max(np.abs(want - have)))
        worst = max(worst, diff)
        if not diff <= _EQUIV_ATOL + _EQUIV_RTOL * float(np.max(np.abs(want))):  # NaN fails too
            raise ParityError(f"pruned output {key!r} differs from the channel-masked model by {diff:.3g}: the "
                              f"dependency graph coupled channels wrongly for this architecture", field="--prune",
                              fix="report this model to edgemm; prune a different branch meanwhile")
    return worst


class _no_grad:
    def __enter__(self):
        import torch

        self._ctx = torch.no_grad()
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
