"""``edgemm compile --split``: cut the FP32 graph into parts (split/graph.py), give each part its own
precision (``--precision BRANCH=MODE`` or the uniform one) calibrated on what reaches it, and package
each part for the target; for TensorRT targets each part gets its own placement (``--place vision=dla0``)
and its own engine build in build.sh. The manifest's ``pipeline`` section (docs/split.md) describes it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..backends import registry
from ..backends.base import PackageRequest
from ..errors import EdgemmError, InputError
from ..modality import BRANCHES, FUSION
from ..precision import LOW_FLOATS, QUANTIZED
from ..runtime.pipeline import PIPELINE_FORMAT, PIPELINE_VERSION
from ..text_numbers import ascii_int
from .graph import SplitPlan, split_onnx

PARTS_DIR = "parts"
PLACEMENTS = ("gpu", "dla", "dla0", "dla1")


@dataclass
class SplitBuild:
    backend: dict        # the manifest's top-level backend section
    precision: dict      # the manifest's precision section (mode over all parts, recipe per part)
    outputs: list[dict]  # the model's outputs (as the unsplit graph names them)
    pipeline: dict       # the manifest's pipeline section
    output_heads: dict   # which outputs a linear head makes (read from the part that makes each)


def parse_placement(text: str | Mapping | None, target) -> dict[str, str]:
    """``"vision=dla0,text=gpu"`` -> {"vision": "dla0", "text": "gpu"}; checked against the target's DLA
    cores (one-line InputError). ``dla`` means ``dla0``."""
    if not text:
        return {}
    if not registry.get(target.backend).part_placement:
        raise InputError(f"target {target.name} runs {target.backend}: parts have no device to choose",
                         field="--place", fix="use --place with a TensorRT target (e.g. --target jetson-agx-orin)")
    items = text.items() if isinstance(text, Mapping) else (i.partition("=")[::2] for i in str(text).split(",") if i.strip())
    out: dict[str, str] = {}
    for part, device in items:
        part, device = str(part).strip().lower(), str(device).strip().lower()
        if part not in BRANCHES or not device:
            raise InputError(f"{part}={device!r} is not PART=DEVICE", field="--place",
                             fix=f"e.g. --place vision=dla0,text=gpu (parts: {', '.join(BRANCHES)})")
        device = "dla0" if device == "dla" else device
        core = ascii_int(device[3:]) if device.startswith("dla") else None
        if device != "gpu" and core is None:
            raise InputError(f"unknown device {device!r} for {part}", field="--place", fix="use gpu, dla0 or dla1")
        if core is not None:
            if target.dla_cores == 0:
                raise InputError(f"target {target.name} has no DLA cores (asked for {part}={device})", field="--place",
                                 fix=f"place {part} on gpu, or use a target with DLA (jetson-agx-orin, jetson-orin-nx)")
            if core >= target.dla_cores:
                raise InputError(f"target {target.name} has DLA cores 0..{target.dla_cores - 1}, not {core}",
                                 field="--place", fix=f"use dla0..dla{target.dla_cores - 1}")
        if part in out:
            raise InputError(f"part {part} is placed twice", field="--place", fix="name each part once")
        out[part] = device
    return out


def part_precision(part: str, cfg) -> str:
    if cfg.precision_policy:
        from ..quant.mixed import DEFAULT_KEY, parse_precision_policy

        policy = parse_precision_policy(cfg.precision_policy)
        return policy.get(part, policy.get(DEFAULT_KEY, "fp32"))
    return cfg.precision


def build_split(fp32: Path, work: Path, stage: Path, cfg, target, specs, calib: dict | None,
                held_out: dict | None, name: str, say: Callable[[str], None], *, branch_overrides=None,
                samples=()) -> SplitBuild:
    """``samples``: feeds at two batch sizes (the interface tensors' dims are observed on them)."""
    from ..onnx_io import graph_outputs, load_graph
    from ..parity.output_kinds import graph_score_outputs

    backend = registry.get(target.backend)
    placement = parse_placement(cfg.place, target)
    say("split: cutting the graph at its branch boundaries")
    plan = split_onnx(fp32, work / "split-fp32", branch_overrides=branch_overrides, samples=samples)
    unknown = [p for p in placement if p not in plan.names]
    if unknown:
        raise InputError(f"the split has no part {unknown[0]!r} (parts: {', '.join(plan.names)})", field="--place",
                         fix="place only the parts the model has")
    if plan.folded:
        say("  folded into the fusion part: " + "; ".join(f"{b} ({why})" for b, why in plan.folded.items()))
    for part in plan.parts:
        say(f"  part {part.name}: {part.compute_nodes} compute nodes, reads {', '.join(part.inputs)}; "
            f"sends {', '.join(part.outputs)}")
    if cfg.precision_policy:
        named = [b for b in _policy_branches(cfg) if b not in plan.names]
        if named:
            why = f"; {named[0]} was folded into fusion: {plan.folded[named[0]]}" if named[0] in plan.folded else ""
            raise InputError(f"the split has no part {named[0]!r} (parts: {', '.join(plan.names)}{why})",
                             field="--precision", fix="name only the parts the model has")
    exclude = _exclude_per_part(plan, fp32, cfg)
    part_calib = _interface_data(plan, calib) if calib is not None else None
    part_held = _interface_data(plan, held_out) if held_out is not None else None
    graph_specs = {s.name: s.to_dict() for s in specs}

    entries, recipes, modes, notes = [], {}, [], []
    (stage / PARTS_DIR).mkdir()
    for part in plan.parts:
        prec = _part_precision_stage(part, cfg, target, part_calib, part_held, work, placement, say,
                                     exclude=exclude.get(part.name, ()))
        modes.append(prec.mode)
        recipes[part.name] = {"mode": prec.mode, **prec.recipe}
        notes += [f"{part.name}: {n}" for n in prec.notes]
        io = graph_outputs(prec.path)
        out_specs = [_with_ranges(d, graph_specs) for d in io]
        in_specs = [graph_specs[i] if i in graph_specs else _interface_spec(prec.path, i, graph_specs)
                    for i in part.inputs]
        device = placement.get(part.name, backend.device)
        fields = backend.package_part(prec.path, stage, part.name, PARTS_DIR, target, PackageRequest(
            config=cfg, specs=in_specs, recipe=prec.recipe, bundle_name=f"{name}-{part.name}"),
            precision=prec.mode, device=device)
        entries.append({"name": part.name, "after": part.after, "inputs": in_specs, "outputs": out_specs,
                        "precision": {"mode": prec.mode, "recipe": prec.recipe.get("name")},
                        "placement": device, "backend": fields, "nodes": part.nodes,
                        "compute_nodes": part.compute_nodes})
    interface = [{"name": t, "from": info["from"], "to": info["to"], "original": info["original"],
                  **{k: v for k, v in _spec_for(entries, t).items() if k in ("dtype", "shape")}}
                 for t, info in plan.interface.items()]
    from ..precision import Precision

    pipeline = {"format": PIPELINE_FORMAT, "version": PIPELINE_VERSION, "order": plan.names, "parts": entries,
                "interface": interface, "concurrent": False, "shared_initializers": plan.shared_initializers,
                "branches": plan.branch_summary}
    outputs = graph_outputs(fp32)
    heads = graph_score_outputs(load_graph(fp32))   # the FP32 graph: the model's own structure (as without --split)
    built = Precision.of(modes, per_branch={e["name"]: e["precision"]["mode"] for e in entries})
    precision = {**built.to_manifest(), "recipe": {"name": "split", "parts": recipes}, "notes": notes,
                 "exclusions": _exclusions(cfg, exclude, recipes)}
    section = {"name": target.backend, **backend.split_section(stage, entries, target, name)}
    return SplitBuild(section, precision, outputs, pipeline, {o["name"]: bool(heads.get(o["name"])) for o in outputs})


def _policy_branches(cfg) -> list[str]:
    from ..quant.mixed import DEFAULT_KEY, parse_precision_policy

    return [b for b in parse_precision_policy(cfg.precision_policy) if b != DEFAULT_KEY]


def _interface_data(plan: SplitPlan, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Graph inputs plus every interface tensor, from running the FP32 parts in order (calibration data
    for the downstream parts: each part is calibrated on what reaches it in the pipeline)."""
    from ..onnx_io import cpu_session

    env = dict(arrays)
    n = used = next(iter(env.values())).shape[0]
    for part in plan.parts:
        sess = cpu_session(part.path)
        # Interface tensors are batch-first (split/interface.py): a model whose batch is fixed runs its
        # own batch per call and the calls' outputs stack along axis 0.
        fixed = {i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
        step = fixed.pop() if len(fixed) == 1 else n
        if step > n:
            raise InputError(f"{n} calibration samples, but the model's batch size is fixed at {step}",
                             field="--calib", fix=f"provide at least {step} samples, or export with a dynamic batch")
        calls = [sess.run(part.outputs, {i: env[i][s:s + step] for i in part.inputs})
                 for s in range(0, n - step + 1, step)]
        env.update({name: np.concatenate([c[k] for c in calls]) for k, name in enumerate(part.outputs)})
        used = min(used, (n // step) * step)   # a fixed batch drops the last partial call, for every tensor
    return {k: v[:used] for k, v in env.items()}


def _exclude_per_part(plan: SplitPlan, fp32: Path, cfg) -> dict[str, list[str]]:
    """--exclude's patterns per part: each part gets those selecting one of its nodes (parts keep the
    exported graph's node names and module paths). A pattern selecting no node anywhere is refused as
    without --split (a typo would quantize what the user asked to keep)."""
    from ..quant.exclusions import parse_exclude, resolve_exclude

    patterns = parse_exclude(cfg.exclude)
    if not patterns:
        return {}
    import onnx

    out = {}
    for part in plan.parts:
        model = onnx.load(str(part.path), load_external_data=False)
        out[part.name] = [p for p in patterns if resolve_exclude(model, [p], strict=False)]
    unmatched = [p for p in patterns if not any(p in found for found in out.values())]
    if unmatched:
        resolve_exclude(onnx.load(str(fp32), load_external_data=False), unmatched)   # the one-line refusal
        raise InputError(f"{unmatched[0]!r} selects only constants, in no part", field="--exclude",
                         fix="select nodes that compute on the inputs")
    return out


def _exclusions(cfg, exclude: dict[str, list[str]], recipes: dict[str, dict]) -> dict | None:
    """What stayed out of quantization, per part (the unsplit manifest's exclusions, part by part)."""
    auto = {name: r["auto_excluded"] for name, r in recipes.items() if r.get("auto_excluded")}
    if not exclude and not auto:
        return None
    from ..quant.exclusions import parse_exclude

    return {"patterns": parse_exclude(cfg.exclude), "per_part": exclude,
            "nodes": sorted({n for r in recipes.values()
                             for n in r.get("excluded_nodes") or r.get("nodes_to_exclude") or []}),
            "automatic": {f"{part}/{node}": why for part, nodes in auto.items() for node, why in nodes.items()}}


def _part_precision_stage(part, cfg, target, calib, held, work: Path, placement, say, *, exclude=()):
    from ..quant import PrecisionRequest, PrecisionResult, apply_precision
    from ..quant.modelopt_qdq import NothingToQuantize

    precision = part_precision(part.name, cfg)
    out = work / f"split-{part.name}.onnx"
    notes = []
    backend = registry.get(target.backend)
    if cfg.precision_policy and not backend.low_float_kernels and precision in LOW_FLOATS:
        # As for --precision without --split (quant/mixed.py): casts would make the part slower, not faster.
        notes.append(f"{precision} runs as fp32 on {backend.title} (it has few {precision} kernels)")
        precision = "fp32"
    if precision == "bf16":
        precision = "fp16"
        notes.append("bf16 is built as fp16 for a split part")
    if precision in QUANTIZED and calib is None:
        raise InputError(f"part {part.name} is {precision} but no calibration data was given", field="--calib",
                         fix="pass --calib data.npz")
    say(f"  precision of {part.name}: {precision}")
    names = part.inputs

    def request(precision: str) -> PrecisionRequest:
        return PrecisionRequest(
            precision=precision, backend=target.backend, workdir=_fresh(work / f"split-prec-{part.name}"),
            calib={n: calib[n] for n in names} if calib is not None else None, int8_recipe=cfg.int8_recipe,
            min_cosine=cfg.min_cosine, dla=placement.get(part.name, "gpu").startswith("dla"), exclude=list(exclude),
            held_out={n: held[n] for n in names} if held is not None else None, log=lambda m: say("    " + m),
            # A part is packaged as its ONNX Runtime model only (no per-part engine variants yet): building
            # and timing OpenVINO candidates for it would be work thrown away.
            cpu_engines="onnxruntime")

    def build(precision: str) -> PrecisionResult:
        try:
            return apply_precision(part.path, out, request(precision))
        except NothingToQuantize:
            raise
        except EdgemmError as e:
            if e.detail.startswith(f"part {part.name}"):
                raise
            # Raised on the part's own file, which the user never sees (errors name the model): say which part.
            raise type(e)(f"part {part.name}: {e.detail}", file=e.file, field=e.field, fix=e.fix) from e

    try:
        result = build(precision)
    except NothingToQuantize as e:
        # TensorRT's recipe (modelopt) refuses a part with no layer it quantizes (e.g. Gather + GRU) where
        # ORT's leaves it unchanged: as on the CPU, the part is built at the best float precision its
        # backend runs fast, rather than failing the whole compile on the one part.
        fallback = "fp16" if backend.low_float_kernels else "fp32"
        say(f"  precision of {part.name}: {fallback} (nothing to quantize as {precision})")
        result = build(fallback)
        notes.append(f"no operator {precision} quantizes here ({e.detail.split(':')[0]}): the part runs {fallback}")
        result.notes = notes + list(result.notes)
        return result
    if result.mode in QUANTIZED and not _has_quantized_ops(result.path):
        # e.g. a text part of only Gather + GRU: the recipe found nothing to quantize, so calling the
        # part int8 would be a false label (inspect, the report, the Triton index all show it).
        notes.append(f"no operator {precision} quantizes here (e.g. Gather, GRU): the part runs fp32")
        result.mode = "fp32"
        # its "INT8 measured 1.00x FP32 latency" note times an fp32 graph against itself: dropped
        result.notes = [n for n in result.notes if not n.startswith(f"{precision.upper()} measured")]
    result.notes = notes + list(result.notes)
    return result


# Operators an INT8/FP8 build leaves in a graph: Q/DQ pairs (static, TensorRT, FP8) and ORT's dynamic
# and QOperator forms (MatMulInteger, DynamicQuantizeMatMul, QLinearConv, ...).
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention", "DynamicQuantizeLSTM"}


def _has_quantized_ops(path: Path) -> bool:
    import onnx

    def walk(graph) -> bool:
        for node in graph.node:
            if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
                return True
            if any(walk(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
                return True
        return False

    return walk(onnx.load(str(path), load_external_data=False).graph)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _with_ranges(d: dict, graph_specs: Mapping[str, dict]) -> dict:
    """An output spec with the ranges of the graph inputs' symbolic dims it shares (batch)."""
    ranges = {}
    for spec in graph_specs.values():
        for dim, r in (spec.get("ranges") or {}).items():
            if dim in d["shape"]:
                ranges[dim] = r
    return {**d, **({"ranges": ranges} if ranges else {})}


def _interface_spec(path: Path, tensor: str, graph_specs) -> dict:
    import onnx

    from ..frontends.onnx_file import ONNX_DTYPES

    model = onnx.load(str(path), load_external_data=False)
    vi = next(i for i in model.graph.input if i.name == tensor)
    t = vi.type.tensor_type
    shape = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or f"{tensor}.dim{axis}")
             for axis, d in enumerate(t.shape.dim)]
    return _with_ranges({"name": tensor, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape},
                        graph_specs)


def _spec_for(entries, tensor: str) -> dict:
    for entry in entries:
        for spec in entry["outputs"]:
            if spec["name"] == tensor:
                return spec
    return {}


def ort_estimate_runner(stage: Path, manifest):
    """A TensorRT split bundle at compile time (no GPU): each part's precision-marked ONNX on ONNX Runtime
    CPU, run as the pipeline runs; None when ORT cannot run a part (FP8, TensorRT-only Q/DQ patterns)."""
    from ..onnx_io import cpu_session
    from ..runtime.pipeline import PipelineSession

    class _OnnxPart:
        def __init__(self, bundle_dir: Path, sub):
            self.session = cpu_session(bundle_dir / sub.backend.onnx)
            self.names = [o["name"] for o in sub.outputs]

        def run(self, feeds):
            return self.session.run(self.names, dict(feeds))

    try:
        session = PipelineSession(stage, manifest, _OnnxPart, concurrent=False)
    except Exception:  # a part ORT cannot load: no estimate rather than a wrong one
        return None
    names = manifest.output_names
    return ((lambda feeds: dict(zip(names, session.run(dict(feeds))))),
            "TensorRT split bundle: accuracy measured by running each part's ONNX on ONNX Runtime CPU, not the engines")


def tune_pipeline(stage: Path, pipeline: dict, feeds_by_batch: Mapping[int, dict], say) -> dict:
    """Time the staged pipeline four ways, interleaved, at each batch: independent parts one after another
    or concurrently (threads), each part on ONNX Runtime's default threads or on one. One thread is kept
    when it beats the default by backends/ort/threads.MIN_GAIN at batch 1 (the rule for unsplit bundles);
    concurrency when, on the chosen threads, it was >= 5% faster at every batch."""
    from ..backends.ort.threads import MIN_GAIN
    from ..parity.latency import measure_interleaved_within
    from ..runtime import load

    towers = [p for p in pipeline["parts"] if not p["after"]]
    ways = {"sequential": (False, 0), "sequential, 1 thread": (False, 1)}
    if len(towers) >= 2:
        ways.update({"concurrent": (True, 0), "concurrent, 1 thread": (True, 1)})
    bundles = {label: load(stage, concurrent=flag, intra_op_threads=threads)
               for label, (flag, threads) in ways.items()}
    table = {}
    try:
        for batch, feeds in feeds_by_batch.items():
            stats = measure_interleaved_within({k: (lambda b=b: b.run(feeds)) for k, b in bundles.items()},
                                               budget_s=4.0, max_iterations=40)
            table[str(batch)] = {k: round(s.p50_ms, 4) for k, s in stats.items()}
    finally:
        for b in bundles.values():
            b._session.close()
    first = table[str(next(iter(feeds_by_batch)))]
    one = first["sequential, 1 thread"] <= (1 - MIN_GAIN) * first["sequential"]
    suffix = ", 1 thread" if one else ""
    concurrent = len(towers) >= 2 and all(row["concurrent" + suffix] < 0.95 * row["sequential" + suffix]
                                          for row in table.values())
    say(f"  runtime: parts {'concurrent' if concurrent else 'one after another'}, "
        f"{'1 intra-op thread' if one else 'ONNX Runtime default threads'} (p50 ms by batch: "
        + "; ".join(f"{b}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()) for b, r in table.items()) + ")")
    return {"concurrent": concurrent, "intra_op_threads": 1 if one else 0, "p50_ms": table,
            "rule": f"1 thread when >= {MIN_GAIN:.0%} faster at the first batch; concurrent when >= 5% faster "
                    "at every batch on the chosen threads"}


__all__ = ["build_split", "parse_placement", "tune_pipeline", "ort_estimate_runner", "SplitBuild"]
