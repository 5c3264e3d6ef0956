"""The compile pipeline as a short list of stages over one ``Compilation`` state:

    check request -> load model + data -> input specs -> prune        (before anything is written)
    split data -> export to ONNX -> precision (or split) -> package by backend -> tune -> manifest -> parity
                                                                     (inside the staged bundle; commit last)

Each stage is a function ``stage(c: Compilation) -> None`` that reads what earlier stages set on ``c`` and
sets its own fields; the backend is looked up once (``edgemm.backends.registry``) and does its own packaging,
run-time tuning and parity runner. The CLI only builds a CompileConfig. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import CompileConfig
from ..errors import EdgemmError, InputError, ParityError
from .inputs import (batch_of, check_token_ids_onnx, check_token_ids_torch, default_name, resolve_input_specs,
                     sample_feeds, split_calib, timing_batches)
from .sidecar import chosen_output_names, find_task
from .workspace import name_user_files, work_dir

__all__ = ["compile_model", "CompileResult", "Compilation", "PREPARE", "BUILD"]


@dataclass
class CompileResult:
    bundle: Path
    manifest: dict
    report: dict | None


@dataclass
class Compilation:
    """What the stages share. Set in stage order; a stage reads only fields set before it."""

    cfg: CompileConfig
    say: Callable[[str], None]
    target: Any = None
    backend: Any = None            # edgemm.backends.base.Backend
    calib: Any = None              # Dataset | None
    evald: Any = None              # Dataset | None
    loaded: Any = None             # LoadedModel (the pruned one after prune)
    unpruned: Any = None
    specs: list = field(default_factory=list)
    prune_info: dict | None = None
    name: str = ""
    dest: Path | None = None
    writer: Any = None             # BundleWriter (staging folder, lock)
    work: Path | None = None       # scratch folder beside the staging folder
    calib_arrays: dict | None = None
    judge: Any = None              # held-out calibration samples (Dataset) when there is no --eval
    judged_on: dict | None = None
    check_data: Any = None         # what the bundle is judged on
    fp32: Path | None = None
    export_info: dict | None = None
    profile: dict | None = None
    prec: Any = None               # quant.PrecisionResult (None for --split)
    split: Any = None              # split.build.SplitBuild
    backend_section: dict | None = None
    variants: list | None = None
    manifest: Any = None
    report: dict | None = None

    @property
    def held_out(self):
        return self.judge.arrays if self.judge is not None else None


def check_request(c: Compilation) -> None:
    """Refuse what cannot work before any work: config, target, precision/prune specs, input paths."""
    from .. import targets
    from ..backends import registry

    cfg = c.cfg
    cfg.validate()
    c.target = targets.load(cfg.target)   # validate() checked the spec strings too
    for flag, path in (("--calib", cfg.calib), ("--eval", cfg.eval), ("--weights", cfg.weights)):
        if path and not Path(path).exists():
            # Relative paths (command line or --config) are read from the current folder.
            raise InputError(f"no such file or folder (from {Path.cwd()})", file=path, field=flag,
                             fix="check the path (relative paths are read from the current folder)")
    c.backend = registry.get(c.target.backend)


def load_inputs(c: Compilation) -> None:
    """The data sets, the model, and its input specs (then the data re-read against those specs)."""
    from ..data import load_dataset
    from ..frontends import LoadOptions, load_model

    cfg = c.cfg
    calib = load_dataset(cfg.calib, allow_labels=True, role="--calib") if cfg.calib else None
    evald = load_dataset(cfg.eval, allow_labels=True, role="--eval") if cfg.eval else None
    c.say(f"loading {cfg.model}")
    c.loaded = c.unpruned = load_model(cfg.model, LoadOptions(weights=cfg.weights, trust_pickle=cfg.trust_pickle))
    c.specs = resolve_input_specs(c.loaded, cfg, calib)
    if cfg.precision_policy:   # a branch the inputs rule out: refused now, not after the export
        from ..quant.mixed import check_policy_branches

        check_policy_branches(cfg.precision_policy, c.specs, overrides=cfg.branch)
    # Re-read against the final specs: validates them, and a model input named `labels` stays an input.
    c.calib, c.evald = (load_dataset(ds.path, specs=c.specs, allow_labels=True, role=role) if ds is not None else None
                        for ds, role in ((calib, "--calib"), (evald, "--eval")))


def prune(c: Compilation) -> None:
    if c.cfg.prune or c.cfg.sparsity:
        from .prune_stage import prune_stage

        c.loaded, c.prune_info = prune_stage(c.loaded, c.specs, c.calib, c.evald, c.cfg, c.say)
    c.name = c.cfg.name or default_name(c.loaded)
    c.dest = Path(c.cfg.output) if c.cfg.output else Path("engines") / c.name


def choose_data(c: Compilation) -> None:
    """Calibration samples, and what judges the bundle (--eval, or calibration samples held out)."""
    c.calib_arrays, c.judge, c.judged_on = split_calib(c.calib, c.evald, c.cfg, c.specs)
    c.check_data = c.evald or c.judge or c.calib


def export(c: Compilation) -> None:
    """The FP32 ONNX graph: exported from torch (checked against it), or the ONNX input copied inline."""
    from ..onnx_io import copy_inline

    c.fp32 = c.work / "fp32.onnx"
    if c.loaded.is_torch:
        from ..export import export_onnx

        check_token_ids_torch(c.loaded, c.specs, (c.calib, c.evald))
        c.say(f"exporting to ONNX ({c.loaded.format})")
        exp = export_onnx(c.loaded, c.specs, sample_feeds(c.calib or c.evald, c.specs, 2),
                          sample_feeds(c.check_data, c.specs, 3), c.fp32, prefer=c.cfg.exporter,
                          output_names=chosen_output_names(c.cfg, c.loaded))
        c.export_info = {"exporter": exp.exporter, "opset": exp.opset, "notes": exp.notes,
                         "fp32_parity": {k: v.to_dict() for k, v in exp.parity.items()}}
        if c.prune_info and c.prune_info.get("structured"):
            from .prune_stage import onnx_prune_latency

            c.prune_info["comparison"]["onnx_latency"] = onnx_prune_latency(
                c.unpruned, c.fp32, c.work, c.specs, c.calib, c.check_data, c.cfg, c.say)
    else:
        from ..export import name_onnx_file_dims

        copy_inline(c.loaded.onnx_path, c.fp32)
        name_onnx_file_dims(c.fp32, c.specs)
        c.export_info = {"exporter": "none", "notes": ["ONNX input: export skipped"]}
    check_token_ids_onnx(c.fp32, (c.calib, c.evald))


def precision(c: Compilation) -> None:
    """The precision-marked model(s): one graph, or one per part with --split."""
    from .precision_stage import branch_overrides, calibration_profile, precision_stage

    c.profile = calibration_profile(c.fp32, c.calib_arrays, c.specs)
    if c.cfg.split:
        from ..iospec import dynamic_batch_input
        from ..split.build import build_split

        probe = (2, 3) if dynamic_batch_input(c.specs) else (batch_of(c.specs),)
        c.split = build_split(c.fp32, c.work, c.writer.stage, c.cfg, c.target, c.specs, c.calib_arrays, c.held_out,
                              c.name, c.say, branch_overrides=branch_overrides(c.cfg),
                              samples=[sample_feeds(c.check_data, c.specs, b) for b in probe])
        c.backend_section = c.split.backend
        return
    c.prec = precision_stage(c.fp32, c.work, c.cfg, c.target, c.calib_arrays, c.evald, c.loaded, c.say,
                             held_out=c.held_out, batches=timing_batches(c.specs),
                             judge=c.judge)


def package(c: Compilation) -> None:
    """The backend writes its artefacts into the staging folder and says what the manifest records."""
    from ..backends.base import PackageRequest
    from .precision_stage import package_variants

    if c.prec is None:  # --split packaged each part already
        return
    c.backend_section = c.backend.package(c.prec.path, c.writer.stage, c.target, PackageRequest(
        config=c.cfg, specs=c.specs, recipe=c.prec.recipe, bundle_name=c.name))
    if c.cfg.tune_threads:
        c.backend.tune(c.backend_section, c.writer.stage, sample_feeds(c.check_data, c.specs, batch_of(c.specs)), c.say)
    c.variants = package_variants(c.prec, c.backend_section, c.writer.stage) if c.prec.variants else None


def write_manifest(c: Compilation) -> None:
    from ..hostinfo import cpu_info, versions
    from ..onnx_io import graph_outputs
    from .parity_stage import output_heads
    from .precision_stage import exclusions

    cfg, prec, split = c.cfg, c.prec, c.split
    manifest = {
        "name": c.name,
        "source": {"path": Path(c.loaded.source).name if c.loaded.format != "factory" else c.loaded.source,
                   "format": c.loaded.format, "sha256": c.loaded.sha256, "notes": c.loaded.notes},
        "inputs": [s.to_dict() for s in c.specs],
        "outputs": split.outputs if cfg.split else graph_outputs(prec.path),
        "precision": {"simulated_accuracy": False, "exclusions": None, **split.precision} if cfg.split else {
            **prec.precision.to_manifest(), "recipe": prec.recipe, "notes": prec.notes,
            "simulated_accuracy": prec.simulated, "exclusions": exclusions(cfg, prec)},
        "target": {"name": c.target.name, "kind": c.target.kind, "backend": c.target.backend,
                   "compute_capability": c.target.compute_capability},
        "backend": c.backend_section,
        "calibration": None if c.calib is None else {
            "path": Path(cfg.calib).name, "sha256": c.calib.sha256,
            "samples": next(iter(c.calib_arrays.values())).shape[0], "samples_available": c.calib.num_samples,
            "held_out": c.judged_on.get("range") if c.judged_on else None},
        "export": c.export_info,
        "prune": c.prune_info,
        "task": find_task(c.loaded),
        "output_heads": output_heads(c.fp32),  # the FP32 graph: the model's own structure
        "versions": versions(),
        "host": {"cpu": cpu_info()},
    }
    if c.variants:
        manifest["variants"] = c.variants
    if c.profile is not None:  # a named section (edgemm.runtime.calibration_section)
        manifest["calibration_profile"] = c.profile
    if cfg.split:
        manifest["pipeline"] = split.pipeline
    draft, c.manifest = manifest, c.writer.write_manifest(manifest)
    if cfg.split and c.backend.thread_count and cfg.tune_threads:  # CPU thread pools: parts side by side?
        from ..iospec import dynamic_batch_input
        from ..split.build import tune_pipeline

        batches = (1, 8) if dynamic_batch_input(c.specs) else (batch_of(c.specs),)
        tuning = tune_pipeline(c.writer.stage, split.pipeline,
                               {b: sample_feeds(c.check_data, c.specs, b) for b in batches}, c.say)
        draft["backend"] = {**draft["backend"], "intra_op_threads": tuning.pop("intra_op_threads")}
        draft["pipeline"] = {**split.pipeline, "concurrent": tuning.pop("concurrent"), "concurrency_tuning": tuning}
        c.manifest = c.writer.write_manifest(draft)


def parity_gate(c: Compilation) -> None:
    """The bundle against the reference; a failing bundle is not written."""
    from ..parity.thresholds import relax_flags
    from .parity_stage import parity_report

    c.report = parity_report(c.writer.stage, c.manifest, c.loaded, c.specs, c.check_data, c.cfg, c.say,
                             original=c.unpruned if c.prune_info else None, judged_on=c.judged_on)
    if c.report is not None and not c.report.get("passed", True):
        # Whatever judged it (--eval, or calibration samples held out): a failing bundle is not written.
        where = c.judged_on["description"] if c.judged_on else "synthetic inputs"
        raise ParityError(f"bundle fails verification on {where}: " + "; ".join(c.report["failures"]),
                          file=c.cfg.eval or c.cfg.calib or c.cfg.model,
                          fix="use a higher precision, more calibration data, or relax the thresholds ("
                              + relax_flags(c.report["failures"]) + ")")


# Before the bundle writer exists (nothing on disk yet), then inside the staged bundle.
PREPARE: tuple[Callable[[Compilation], None], ...] = (check_request, load_inputs, prune)
BUILD: tuple[Callable[[Compilation], None], ...] = (choose_data, export, precision, package, write_manifest,
                                                     parity_gate)


def compile_model(cfg: CompileConfig, *, say: Callable[[str], None] = print) -> CompileResult:
    try:
        return _compile(cfg, say)
    except EdgemmError as exc:
        renamed = name_user_files(exc, cfg.model)
        if renamed is exc:
            raise
        raise renamed from exc


def _compile(cfg: CompileConfig, say: Callable[[str], None]) -> CompileResult:
    from ..bundle import BundleWriter

    c = Compilation(cfg, say)
    for stage in PREPARE:
        stage(c)
    protect = {"MODEL": cfg.model, "--calib": cfg.calib, "--eval": cfg.eval, "--weights": cfg.weights}
    with BundleWriter(c.dest, force=cfg.force, protect=protect) as c.writer, work_dir(c.writer) as c.work:
        for stage in BUILD:
            stage(c)
        c.writer.commit()
    return CompileResult(c.dest, c.manifest, c.report)
