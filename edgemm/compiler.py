"""The compile pipeline: frontend -> export -> precision -> backend package -> bundle -> parity.

Each stage takes an artefact plus its slice of the config. The CLI only builds a CompileConfig.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import CompileConfig
from . import precision as precision_table
from .backends import registry
from .backends.base import PackageRequest
from .bundle import STAGING_PREFIX
from .data import Dataset, hold_out, load_dataset, specs_from_dataset
from .errors import EdgemmError, InputError, ParityError, first_line
from .frontends import LoadedModel, LoadOptions, load_model
from .iospec import (TensorSpec, apply_dynamic_axes, call_batch, dynamic_batch_input, parse_dynamic_flag,
                     parse_input_flag)
from .onnx_io import copy_inline, graph_outputs, load_graph
from .parity.thresholds import relax_flags

log = logging.getLogger("edgemm")
EXAMPLE_SIDECAR = "edgemm-example.json"   # written by `edgemm example`: names the zoo model and its metric
GENERIC_STEMS = {"model", "module", "net", "network", "checkpoint", "weights", "export", "traced"}


@dataclass
class CompileResult:
    bundle: Path
    manifest: dict
    report: dict | None


def default_name(loaded: LoadedModel) -> str:
    path = Path(loaded.source)
    if loaded.format == "factory":
        return loaded.name
    stem = path.stem
    if stem.lower() in GENERIC_STEMS and path.parent.name not in ("", "."):
        stem = path.parent.resolve().name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-") or "model"


DEFAULT_MAX_BATCH = 64


def resolve_input_specs(loaded: LoadedModel, cfg: CompileConfig, calib: Dataset | None) -> list[TensorSpec]:
    """In order of preference: the format's own specs (.pt2, .onnx), the calibration data, --input."""
    flags = [parse_input_flag(t) for t in cfg.inputs]
    dynamic = [parse_dynamic_flag(t) for t in cfg.dynamic]
    if loaded.input_specs:
        specs = loaded.input_specs
        if flags:
            raise InputError(f"{loaded.format} models carry their own input specs", field="--input",
                             fix="drop --input")
        dynamic_batch = dynamic_batch_input(specs)
        if not cfg.dynamic_batch and dynamic_batch:
            # The program's (or ONNX graph's) own dims decide; silently keeping a dynamic batch would
            # ignore the flag.
            raise InputError(f"axis 0 of {dynamic_batch!r} is dynamic in the model file itself",
                             file=loaded.source, field="--static-batch",
                             fix="drop --static-batch, or export the model with a fixed batch")
        return _apply_ranges(specs, dynamic, cfg.max_batch, loaded.source)
    if flags:
        specs = flags
    elif calib is not None:
        specs = specs_from_dataset(calib)
    else:
        raise InputError("cannot tell the model's input names, shapes and dtypes", file=loaded.source,
                         fix="pass --calib data.npz or --input NAME:SHAPE:DTYPE for every input")
    where = "--input" if flags else (str(calib.path) if calib else "--input")
    if loaded.signature is not None:
        # Required parameters plus the optional ones the data names; defaults stay defaults.
        by_name = {s.name: s for s in specs}
        specs = [by_name[n] for n in loaded.signature.select(by_name, where=where)]
    elif loaded.input_names:
        by_name = {s.name: s for s in specs}
        names = loaded.input_names
        missing = [n for n in names if n not in by_name]
        extra = [n for n in by_name if n not in names]
        if missing or extra:
            raise InputError(f"model inputs are ({', '.join(names)}) but got ({', '.join(by_name)})", file=where,
                             field=(missing or extra)[0], fix="name the data keys / --input after forward()'s arguments")
        specs = [by_name[n] for n in names]
    return apply_dynamic_axes(specs, dynamic, dynamic_batch=cfg.dynamic_batch,
                              max_batch=cfg.max_batch or DEFAULT_MAX_BATCH)


def _apply_ranges(specs, dynamic, max_batch, source):
    """Formats with their own symbolic dims: give them ranges; --dynamic may only refine those, and an
    explicit --max-batch lowers the model's own batch bound (never raises it: the program may not run)."""
    from .iospec import DimRange

    out = []
    for spec in specs:
        ranges = dict(spec.ranges)
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and dim not in ranges:
                ranges[dim] = DimRange(1, 1, max_batch or DEFAULT_MAX_BATCH) if axis == 0 else DimRange(1, 1, 4096)
        if max_batch is not None and spec.shape and isinstance(spec.shape[0], str):
            own = ranges[spec.shape[0]]
            if not own.min <= max_batch <= own.max:
                raise InputError(f"the model's own batch range for {spec.name!r} is {own.min}..{own.max}", file=source,
                                 field="--max-batch", fix=f"give a value from {own.min} to {own.max}, or leave it out")
            ranges[spec.shape[0]] = DimRange(own.min, min(own.opt, max_batch), max_batch)
        for d in dynamic:
            if d.input != spec.name:
                continue
            if d.axis >= len(spec.shape) or not isinstance(spec.shape[d.axis], str):
                raise InputError(f"axis {d.axis} of {spec.name!r} is static in the model", field="--dynamic",
                                 fix="re-export the model with that axis dynamic")
            ranges[spec.shape[d.axis]] = d.range
        out.append(TensorSpec(spec.name, spec.dtype, spec.shape, ranges))
    return out


def synth_feeds(specs: list[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Shape-only inputs for tracing when no data is given (never used for calibration)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = s.concrete_shape(batch)
        if np.dtype(s.dtype).kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype == "bool":
            feeds[s.name] = np.ones(shape, dtype=bool)
        else:
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
    return feeds


def sample_feeds(data: Dataset | None, specs, n: int) -> dict[str, np.ndarray]:
    if data is None:
        return synth_feeds(specs, n)
    feeds = {s.name: data.arrays[s.name][:n] for s in specs}
    have = next(iter(feeds.values())).shape[0]
    if have < n:  # tile to reach batch n (torch.export specializes batch 1)
        reps = -(-n // have)
        feeds = {k: np.concatenate([v] * reps)[:n] for k, v in feeds.items()}
    return {k: np.ascontiguousarray(v) for k, v in feeds.items()}


def _output_names(cfg: CompileConfig, loaded: LoadedModel) -> list[str] | None:
    """--output-names, else the zoo example's names; otherwise dict keys or output_<i>."""
    if cfg.output_names:
        names = [n.strip() for n in cfg.output_names.split(",")]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise InputError(f"names must be non-empty and distinct: {cfg.output_names!r}", field="--output-names",
                             fix="e.g. --output-names image_embeds,text_embeds,logits")
        return names
    sidecar = _read_sidecar(loaded)
    return list(sidecar["outputs"]) if sidecar and sidecar.get("outputs") else None


def _read_sidecar(loaded: LoadedModel) -> dict | None:
    if loaded.format == "factory":
        return None
    path = Path(loaded.source).parent / EXAMPLE_SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except ValueError:
        return None


def _find_task(loaded: LoadedModel) -> dict | None:
    from .task import from_sidecar

    return from_sidecar(_read_sidecar(loaded))


def compile_model(cfg: CompileConfig, *, say: Callable[[str], None] = print) -> CompileResult:
    try:
        return _compile(cfg, say)
    except EdgemmError as exc:
        renamed = _name_user_files(exc, cfg.model)
        if renamed is exc:
            raise
        raise renamed from exc


def _compile(cfg: CompileConfig, say: Callable[[str], None]) -> CompileResult:
    from . import targets
    from .hostinfo import cpu_info, versions

    cfg.validate()  # before any work
    target = targets.load(cfg.target)
    if cfg.precision_policy:
        from .quant.mixed import parse_precision_policy

        for prec in set(parse_precision_policy(cfg.precision_policy).values()):
            target.validate(prec, dla=cfg.dla)
    if cfg.accuracy_target:
        from .quant.accuracy_search import parse_accuracy_target

        parse_accuracy_target(cfg.accuracy_target)
    if cfg.prune:
        from .prune import parse_prune_spec

        parse_prune_spec(cfg.prune)
    for flag, path in (("--calib", cfg.calib), ("--eval", cfg.eval), ("--weights", cfg.weights)):
        if path and not Path(path).exists():
            raise InputError("no such file or folder", file=path, field=flag, fix="check the path")

    calib = load_dataset(cfg.calib, allow_labels=True, role="--calib") if cfg.calib else None
    evald = load_dataset(cfg.eval, allow_labels=True, role="--eval") if cfg.eval else None
    say(f"loading {cfg.model}")
    loaded = load_model(cfg.model, LoadOptions(weights=cfg.weights, trust_pickle=cfg.trust_pickle))
    specs = resolve_input_specs(loaded, cfg, calib)
    # Re-read against the final specs: validates them, and a model input named `labels` stays an input.
    calib, evald = (load_dataset(ds.path, specs=specs, allow_labels=True, role=role) if ds is not None else None
                    for ds, role in ((calib, "--calib"), (evald, "--eval")))
    prune_info, unpruned = None, loaded
    if cfg.prune or cfg.sparsity:
        loaded, prune_info = _prune_stage(loaded, specs, calib, evald, cfg, say)
    name = cfg.name or default_name(loaded)
    dest = Path(cfg.output) if cfg.output else Path("engines") / name
    backend = registry.get(target.backend)

    from .bundle import BundleWriter
    protect = {"MODEL": cfg.model, "--calib": cfg.calib, "--eval": cfg.eval, "--weights": cfg.weights}
    with BundleWriter(dest, force=cfg.force, protect=protect) as writer, _work_dir(writer) as work:
        fp32 = work / "fp32.onnx"
        calib_arrays, judge, judged_on = _split_calib(calib, evald, cfg, specs)
        held_out = judge.arrays if judge is not None else None
        check_data = evald or judge or calib
        if loaded.is_torch:
            _check_token_ids_torch(loaded, specs, (calib, evald))
            say(f"exporting to ONNX ({loaded.format})")
            from .export import export_onnx
            exp = export_onnx(loaded, specs, sample_feeds(calib or evald, specs, 2),
                              sample_feeds(check_data, specs, 3), fp32, prefer=cfg.exporter,
                              output_names=_output_names(cfg, loaded))
            export_info = {"exporter": exp.exporter, "opset": exp.opset, "notes": exp.notes,
                           "fp32_parity": {k: v.to_dict() for k, v in exp.parity.items()}}
            if prune_info and prune_info.get("structured"):
                prune_info["comparison"]["onnx_latency"] = _onnx_prune_latency(
                    unpruned, fp32, work, specs, calib, check_data, cfg, say)
        else:
            copy_inline(loaded.onnx_path, fp32)
            export_info = {"exporter": "none", "notes": ["ONNX input: export skipped"]}

        _check_token_ids(fp32, (calib, evald))
        profile = _calibration_profile(fp32, calib_arrays, specs)
        if cfg.split:
            from .split.build import build_split

            probe = (2, 3) if dynamic_batch_input(specs) else (_batch_of(specs),)
            split = build_split(fp32, work, writer.stage, cfg, target, specs, calib_arrays, held_out, name, say,
                                branch_overrides=_branch_overrides(cfg),
                                samples=[sample_feeds(check_data, specs, b) for b in probe])
            prec = None
            backend_section = split.backend
        else:
            prec = _precision_stage(fp32, work, cfg, target, calib_arrays, evald, loaded, say, held_out=held_out,
                                    batches=timing_batches(specs))
            backend_section = backend.package(prec.path, writer.stage, target, PackageRequest(
                config=cfg, specs=specs, recipe=prec.recipe, bundle_name=name))
        if cfg.tune_threads and not cfg.split:
            backend.tune(backend_section, writer.stage, sample_feeds(check_data, specs, _batch_of(specs)), say)
        variants = _package_variants(prec, backend_section, writer.stage) if prec and prec.variants else None
        manifest = {
            "name": name,
            "source": {"path": Path(loaded.source).name if loaded.format != "factory" else loaded.source,
                       "format": loaded.format, "sha256": loaded.sha256, "notes": loaded.notes},
            "inputs": [s.to_dict() for s in specs],
            "outputs": split.outputs if cfg.split else graph_outputs(prec.path),
            "precision": {**split.precision, "simulated_accuracy": False, "exclusions": None} if cfg.split else {
                **prec.precision.to_manifest(), "recipe": prec.recipe, "notes": prec.notes,
                "simulated_accuracy": prec.simulated, "exclusions": _exclusions(cfg, prec)},
            "target": {"name": target.name, "kind": target.kind, "backend": target.backend,
                       "compute_capability": target.compute_capability},
            "backend": backend_section,
            "calibration": None if calib is None else {
                "path": Path(cfg.calib).name, "sha256": calib.sha256,
                "samples": next(iter(calib_arrays.values())).shape[0], "samples_available": calib.num_samples,
                "held_out": judged_on.get("range") if judged_on else None},
            "export": export_info,
            "prune": prune_info,
            "task": _find_task(loaded),
            "output_heads": _output_heads(fp32),  # the FP32 graph: the model's own structure
            "versions": versions(),
            "host": {"cpu": cpu_info()},
        }
        if variants:
            manifest["variants"] = variants
        if profile is not None:  # a named section (edgemm.runtime.calibration_section)
            manifest["calibration_profile"] = profile
        if cfg.split:
            manifest["pipeline"] = split.pipeline
        draft, manifest = manifest, writer.write_manifest(manifest)
        if cfg.split and backend.thread_count and cfg.tune_threads:  # CPU thread pools: parts side by side?
            from .split.build import tune_concurrency

            batches = (1, 8) if dynamic_batch_input(specs) else (_batch_of(specs),)
            tuning = tune_concurrency(writer.stage, split.pipeline,
                                      {b: sample_feeds(check_data, specs, b) for b in batches}, say)
            draft["pipeline"] = {**split.pipeline, "concurrent": tuning.pop("concurrent"), "concurrency_tuning": tuning}
            manifest = writer.write_manifest(draft)
        report = _parity_report(writer.stage, manifest, loaded, specs, check_data, cfg, say,
                                original=unpruned if prune_info else None, judged_on=judged_on)
        if report is not None and not report.get("passed", True):
            # Whatever judged it (--eval, or calibration samples held out): a failing bundle is not written.
            where = judged_on["description"] if judged_on else "synthetic inputs"
            raise ParityError(f"bundle fails verification on {where}: " + "; ".join(report["failures"]),
                              file=cfg.eval or cfg.calib or cfg.model,
                              fix="use a higher precision, more calibration data, or relax the thresholds ("
                                  + relax_flags(report["failures"]) + ")")
        writer.commit()
    return CompileResult(dest, manifest, report)


def _split_calib(calib: Dataset | None, evald: Dataset | None, cfg: CompileConfig, specs):
    """(calibration arrays, held-out Dataset or None, what judges the bundle): without --eval, compile
    calibrates on part of --calib and judges on samples it did not calibrate on (edgemm.data.hold_out)."""
    judged_on = None
    if evald is not None:
        judged_on = {"source": "--eval", "samples": evald.num_samples,
                     "description": f"{evald.num_samples} samples of {Path(cfg.eval).name} (--eval)"}
    if calib is None:
        return None, None, judged_on
    if evald is not None:
        return {s.name: calib.arrays[s.name][:cfg.calib_samples] for s in specs}, None, judged_on
    split = hold_out(calib.num_samples, cap=cfg.calib_samples, multiple=_batch_of(specs))
    labels = calib.labels[split.judge] if calib.labels is not None else None
    judge = Dataset(calib.path, {s.name: calib.arrays[s.name][split.judge] for s in specs}, labels, calib.sha256)
    judged_on = {"source": "--calib", "samples": judge.num_samples, "range": [split.judge.start, split.judge.stop],
                 "description": split.describe(Path(cfg.calib).name)}
    return {s.name: calib.arrays[s.name][split.calibrate] for s in specs}, judge, judged_on


def _output_heads(path: Path) -> dict[str, bool]:
    """Which outputs a linear head or score function makes (parity.output_kinds): read by verify too."""
    from .parity.output_kinds import graph_score_outputs

    return graph_score_outputs(load_graph(path))


def _exclude_patterns(cfg: CompileConfig) -> list[str]:
    from .quant.exclusions import parse_exclude

    return parse_exclude(cfg.exclude)


def _exclusions(cfg: CompileConfig, prec) -> dict | None:
    """What stayed out of quantization and why: the user's --exclude and the automatic exclusions."""
    auto = prec.recipe.get("auto_excluded") or {}
    if not cfg.exclude and not auto:
        return None
    return {"patterns": _exclude_patterns(cfg), "nodes": list(prec.recipe.get("excluded_nodes") or []),
            "automatic": auto}


_STAGED_PATH = re.compile(r"[^\s'\"(]*" + re.escape(STAGING_PREFIX) + r"[^\s'\")]*")


def _name_user_files(exc: EdgemmError, model: str) -> EdgemmError:
    """An error raised on a staged or scratch file names the user's model instead: the staging folder is
    gone by the time the user reads the message."""
    file = exc.file if exc.file and STAGING_PREFIX not in exc.file else (model if exc.file else None)
    detail = _STAGED_PATH.sub("the exported ONNX graph", exc.detail)
    fix = _STAGED_PATH.sub("the exported ONNX graph", exc.fix) if exc.fix else exc.fix
    if (file, detail, fix) == (exc.file, exc.detail, exc.fix):
        return exc
    renamed = type(exc)(detail, file=file, field=exc.field, fix=fix)
    return renamed


def _check_token_ids(onnx_path: Path, datasets) -> None:
    """Every integer input that indexes an embedding holds ids within its table (data.check_token_ids)."""
    from .data import check_token_ids
    from .onnx_graph import embedding_sizes

    datasets = [d for d in datasets if d is not None]
    if not datasets:
        return
    vocab = embedding_sizes(load_graph(onnx_path))
    for ds in datasets:
        check_token_ids(ds, vocab)


def _check_token_ids_torch(loaded, specs, datasets) -> None:
    """Before the model runs (export runs it on the first samples): an integer input's ids must be below
    the largest embedding table in the module, or no embedding can take them. The exact table each
    input feeds is checked on the exported graph (_check_token_ids)."""
    module = loaded.module
    modules = getattr(module, "modules", None)
    if modules is None:
        return
    rows = []
    for m in modules():
        if type(m).__name__ == "Embedding" or getattr(m, "original_name", None) == "Embedding":
            weight = getattr(m, "weight", None)
            if weight is not None and getattr(weight, "ndim", 0) == 2:
                rows.append(int(weight.shape[0]))
    if not rows:
        return
    from .data import check_token_ids

    from .modality import input_modality, is_mask

    # Only integer inputs that are text (token ids), never masks or uint8 images: those may hold values
    # above every table's size legitimately.
    integer = {s.name: max(rows) for s in specs if s.dtype.startswith(("int", "uint"))
               and not is_mask(s.name, s.dtype) and input_modality(s.name, s.dtype, s.shape) == "text"}
    for ds in (d for d in datasets if d is not None):
        check_token_ids(ds, integer, largest=True)


@contextlib.contextmanager
def _work_dir(writer):
    """Scratch space beside the staging folder, owned by the same lock, so that the sweep of a later
    compile removes it if this one is killed (a TMPDIR folder would leak)."""
    path = writer.sibling("work")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timing_batches(specs) -> tuple[int, ...]:
    """The batch sizes choices are timed at: the fixed batch, or 1 and 8 within the declared batch range
    (the winner changes with batch: issue #20)."""
    first = specs[0] if specs else None
    if first is None or not first.shape or isinstance(first.shape[0], int):
        return (_batch_of(specs),)
    rng = first.ranges.get(first.shape[0])
    low, high = (rng.min, rng.max) if rng is not None else (1, 8)
    return tuple(sorted({max(low, 1), max(min(8, high), 1)}))


def _precision_stage(fp32: Path, work: Path, cfg: CompileConfig, target, calib_arrays, evald, loaded, say, *,
                     held_out=None, batches=(1,)):
    """One precision everywhere, one per modality branch (--precision a=b,...), or the accuracy-aware
    search (--accuracy-target). ``held_out``: calibration samples kept for judging (no --eval)."""
    from .quant import PrecisionRequest, apply_precision

    out = work / "model.onnx"
    label = cfg.precision_policy or cfg.precision
    say(f"precision: {label} for {target.backend} (target {target.name})")
    if cfg.accuracy_target:
        from .quant.accuracy_search import accuracy_aware, parse_accuracy_target

        goal = parse_accuracy_target(cfg.accuracy_target)
        if evald is not None:
            eval_feeds, labels = dict(evald.arrays), evald.labels
        else:  # the held-out calibration samples, so the search is not judged on what it calibrated on
            n = next(iter(calib_arrays.values())).shape[0] + next(iter(held_out.values())).shape[0]
            if n < 8:
                raise InputError(f"only {n} calibration samples to search on", field="--accuracy-target",
                                 fix="pass --eval EVAL.npz (or at least 8 calibration samples)")
            eval_feeds, labels = held_out, None
        task = _find_task(loaded)
        metric = (task["metric"], task["outputs"]) if task else None
        return accuracy_aware(fp32, out, calib_arrays, eval_feeds, goal, target, labels=labels, metric=metric,
                              workdir=work / "accuracy-search", mode=cfg.precision if cfg.precision in
                              precision_table.QUANTIZED else "int8", policy=cfg.precision_policy,
                              branch_overrides=_branch_overrides(cfg), int8_recipe=cfg.int8_recipe, log=say)
    if cfg.precision_policy:
        from .quant.mixed import apply_mixed

        return apply_mixed(fp32, out, cfg.precision_policy, calib_arrays, target,
                           branch_overrides=_branch_overrides(cfg), workdir=work / "mixed",
                           int8_recipe=cfg.int8_recipe, log=say)
    return apply_precision(fp32, out, PrecisionRequest(
        precision=cfg.precision, backend=target.backend, calib=calib_arrays, workdir=work,
        int8_recipe=cfg.int8_recipe, min_cosine=cfg.min_cosine, min_top1=cfg.min_top1, dla=cfg.dla,
        exclude=_exclude_patterns(cfg),
        held_out=held_out, batches=tuple(batches), cpu_engines=cfg.cpu_engines, log=say))


def _prune_stage(loaded: LoadedModel, specs, calib: Dataset, evald: Dataset | None, cfg: CompileConfig, say):
    """Structured pruning / 2:4 sparsity on the torch module, then recovery by distillation, then the
    before/after comparison (on --eval when given: held-out data, and the task metric when it has labels).
    The rest of the pipeline (export, parity) then works on the pruned model."""
    from .prune import (apply_2to4, can_prune, parse_prune_spec, prunable_module, prune, recover, recovery_warnings,
                        with_pruned_module)
    from .prune.compare import compare, summary_lines
    from .signature import attach

    can_prune(loaded)
    module = prunable_module(loaded)
    attach(module, loaded.calling_convention())  # an unflattened .pt2 takes (*args, **kwargs)
    names = [s.name for s in specs]
    calib_arrays = {n: calib.arrays[n][:cfg.calib_samples] for n in names}
    # Recovery is training: every calibration sample helps (the --calib-samples cap is for quantization).
    train_arrays = {n: calib.arrays[n] for n in names}
    example = sample_feeds(calib, specs, 2)
    info: dict = {}
    student = module
    if cfg.prune:
        say(f"pruning: {cfg.prune}")
        student, info["structured"] = prune(module, example, calib_arrays, parse_prune_spec(cfg.prune),
                                            input_names=names)
        for note in info["structured"]["notes"]:
            say(f"  note: {note}")
    if cfg.sparsity:
        import copy

        if student is module:
            student = copy.deepcopy(module)
        say("sparsity: 2:4")
        info["sparsity"] = apply_2to4(student, calib_arrays, input_names=names)
    if cfg.recover:
        say(f"recovery: {cfg.recover} distillation steps on the calibration set (lr {cfg.recover_lr:g})")
        cautions = recovery_warnings(calib.num_samples, cfg.recover, held_out=evald is not None)
        for caution in cautions:
            say(f"  warning: {caution}")
        info["recovery"] = recover(student, module, train_arrays, cfg.recover, input_names=names,
                                   keep_zeros=bool(cfg.sparsity), lr=cfg.recover_lr)
        info["recovery"]["warnings"] = cautions
    data = evald or calib
    output_names = _output_names(cfg, loaded)
    task = _find_task(loaded)
    task_t = (task["metric"], task["outputs"]) if task else None  # else compare() guesses from output names
    info["comparison"] = compare(module, student, names, {n: data.arrays[n] for n in names},
                                 info.get("structured"), labels=data.labels if evald is not None else None,
                                 task=task_t, output_names=output_names)
    # What pruning kept and why, and how far recovery can be trusted: into the report with the figures.
    notes = (info.get("structured") or {}).get("notes", []) + (info.get("recovery") or {}).get("warnings", [])
    if notes:
        info["comparison"]["notes"] = notes
    for line in summary_lines(info["comparison"]):
        say(f"  {line}")
    return with_pruned_module(loaded, student, example), info


def _onnx_prune_latency(unpruned: LoadedModel, pruned_fp32: Path, work: Path, specs, calib, data, cfg, say) -> dict:
    """Export the unpruned model too and time both FP32 graphs in ONNX Runtime (batch 1 and the compare
    batch, or the fixed batch): the latency the bundle gains, where torch eager timing can hide it."""
    from .export import export_onnx
    from .prune.compare import LATENCY_BATCH, onnx_latency, onnx_summary

    batches = (1, LATENCY_BATCH) if dynamic_batch_input(specs) else (_batch_of(specs),)
    before = work / "unpruned" / "fp32.onnx"
    before.parent.mkdir()
    say("  exporting the unpruned model too, to time both graphs in ONNX Runtime")
    try:
        export_onnx(unpruned, specs, sample_feeds(calib or data, specs, 2), sample_feeds(data, specs, 3), before,
                    prefer=cfg.exporter, output_names=_output_names(cfg, unpruned))
        result = onnx_latency(before, pruned_fp32, {b: sample_feeds(data, specs, b) for b in batches})
    except Exception as exc:  # a measurement, never a reason to fail the compile
        first = first_line(exc, 200, default="")
        result = {"note": f"not measured ({type(exc).__name__}: {first})"}
    finally:
        shutil.rmtree(before.parent, ignore_errors=True)
    say(f"  {onnx_summary(result)}")
    return result


def _calibration_profile(fp32: Path, calib_arrays, specs) -> dict | None:
    """What the calibration samples look like, for the runtime's drift monitor (edgemm.calibration_profile)."""
    if not calib_arrays:
        return None
    from .calibration_profile import build_profile

    static = dynamic_batch_input(specs) is None
    return build_profile(fp32, calib_arrays, _batch_of(specs) if static else call_batch(specs, 32),
                         static_batch=static)


def _batch_of(specs) -> int:
    first = specs[0].shape[0] if specs and specs[0].shape else 1
    return first if isinstance(first, int) and first > 0 else 1


def _branch_overrides(cfg: CompileConfig):
    if not cfg.branch:
        return None
    from .quant.branches import parse_branch_overrides

    return parse_branch_overrides(cfg.branch)


def _package_variants(prec, fallback_section: dict, stage: Path) -> list[dict]:
    """The CPU engine search's faster variants written into the bundle, fastest first, then the ORT model
    (the fallback, which the top-level ``backend`` section also names)."""
    from .backends import openvino as ovb
    from .quant.cpu_engines import fallback_variant
    from .runtime import variants as _registers_the_section  # noqa: F401 (manifest "requires" lists it)

    out = []
    for variant in prec.variants:
        section = ovb.save_variant(variant["model"], stage, variant["name"], variant["inference_precision"])
        out.append({k: v for k, v in variant.items() if k not in ("model", "inference_precision")} |
                   {"backend": section})
    engines = prec.recipe["engines"]
    row = next(r for r in engines["table"] if r["name"] == engines["fallback"])
    from .quant.cpu_engines import EngineRow

    out.append(fallback_variant(EngineRow(**row), fallback_section))
    return out


def _parity_report(stage: Path, manifest: dict, loaded: LoadedModel, specs, data: Dataset | None,
                   cfg: CompileConfig, say, original: LoadedModel | None = None,
                   judged_on: dict | None = None) -> dict | None:
    """Bundle vs reference on the eval set (or the calibration set): the bundle's parity report.

    ``original``: the unpruned model of a pruned compile. The reference is then the pruned model (the
    thresholds judge what precision changed), and ``vs_original`` adds the bundle against the unpruned
    model: what the user gets in the end, pruning included (against the pruned model alone a pruned FP32
    bundle reads cosine 1.000)."""
    from .parity.thresholds import defaults_for, with_overrides
    from .parity.verify import add_compile_sections, evaluate, write_reports
    from .task import guess as guess_task
    from .reference import Reference

    if data is None:
        data = Dataset(Path("synthetic"), synth_feeds(specs, 8, seed=1), None, "")
    ref = Reference(loaded, [s.name for s in specs],
                    None if loaded.onnx_path else [o["name"] for o in manifest["outputs"]])
    runner = registry.get(manifest["backend"]["name"]).parity_runner(stage, manifest)
    if runner is None:
        say("parity: skipped (this bundle cannot run on this machine; see report)")
        report = {"passed": True, "skipped": "bundle cannot run here (portable TensorRT bundle); "
                                              "run `edgemm verify` on the device", "outputs": {}, "failures": []}
        write_reports(stage, report)
        return report
    run, simulated = runner
    thresholds = with_overrides(defaults_for(manifest["precision"]), min_cosine=cfg.min_cosine,
                                min_top1_agreement=cfg.min_top1, max_metric_drop=cfg.max_metric_drop)
    if cfg.accuracy_target:
        # The search already held the bundle to the user's own target on this data; the per-precision
        # defaults would judge it by a bar the user did not ask for. The report still shows every figure.
        thresholds = with_overrides(thresholds, min_cosine=cfg.min_cosine if cfg.min_cosine is not None else -1.0,
                                    min_top1_agreement=0.0, max_metric_drop=float("inf"))
    task = manifest.get("task")
    heads = manifest.get("output_heads")
    task_t = (task["metric"], task["outputs"]) if task else guess_task([o["name"] for o in manifest["outputs"]],
                                                                         heads)
    say(f"parity: bundle vs reference on {judged_on['description'] if judged_on else 'synthetic inputs'}")
    report = evaluate(run, ref.run, data, thresholds, output_names=[o["name"] for o in manifest["outputs"]],
                      task=task_t if data.labels is not None else None, heads=heads, batch_size=call_batch(specs))
    if judged_on:
        report["judged_on"] = judged_on
    report["bundle"] = {"name": manifest["name"], "precision": precision_table.parse(manifest["precision"]).label,
                        "backend": manifest["backend"]["name"], "target": manifest["target"]["name"]}
    if manifest.get("variants"):   # a portable CPU bundle: the gate judged the variant this host runs
        from .hostinfo import host_isa
        from .runtime.variants import choose_variant

        choice = choose_variant(manifest["variants"], host_isa())
        report["bundle"].update(backend=manifest["variants"][choice.index]["backend"]["name"], variant=choice.name)
        say(f"  judged variant {choice.name} ({choice.reason}); the bundle also carries "
            f"{', '.join(v['name'] for v in manifest['variants'] if v['name'] != choice.name)}")
    if simulated:
        report["simulated"] = simulated
    if original is not None:
        report["vs_original"] = _vs_original(run, original, specs, manifest, data, thresholds, task_t, say)
    add_compile_sections(report, manifest)
    if cfg.accuracy_target:
        report["accuracy_target"] = {"expr": cfg.accuracy_target,
                                     "met": manifest["precision"]["recipe"].get("met"),
                                     "measured": manifest["precision"]["recipe"].get("measured")}
    write_reports(stage, report)
    return report


def _vs_original(run, original: LoadedModel, specs, manifest: dict, data: Dataset, thresholds, task_t, say) -> dict:
    """The pruned bundle against the unpruned model: figures only (pruning's loss was asked for; the
    gate stays on the bundle vs the pruned model, which isolates precision)."""
    from .parity.verify import evaluate, vs_original_lines
    from .reference import Reference

    names = [o["name"] for o in manifest["outputs"]]
    ref = Reference(original, [s.name for s in specs], None if original.onnx_path else names)
    got = evaluate(run, ref.run, data, thresholds, output_names=names, batch_size=call_batch(specs),
                   task=task_t if data.labels is not None else None, heads=manifest.get("output_heads"))
    section = {"reference": "unpruned source model", "samples": got["samples"],
               "outputs": {n: {k: v for k, v in o.items() if k != "passed"} for n, o in got["outputs"].items()}}
    if "task" in got:
        section["task"] = got["task"]
    for line in vs_original_lines(section):
        say(line)
    return section
