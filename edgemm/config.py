"""The compile configuration: what the CLI builds and the pipeline consumes. JSON round trip, so a
run can be saved (``--dump-config``) and replayed (``--config``).

A config file is nested in sections (``SECTIONS``: precision, calibration, verify, io, prune, tensorrt,
cpu, split) beside a few top-level keys; the flat files of earlier versions (every field at the top) are
still read, and a file may mix both. The file is parsed and type-checked once (``from_file``), and
``validate`` runs its checks once per configuration (the CLI, ``from_file`` and ``compile_model`` all
ask; a changed configuration is checked again). In Python the fields stay flat attributes
(``cfg.opt_level``); ``cfg.section("tensorrt")`` reads one section."""

from __future__ import annotations

import json
import types
import typing
from types import MappingProxyType
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

from .errors import InputError, SecurityError
from .iospec import MAX_BATCH, parse_dynamic_flag
from .precision import QUANTIZED, UNIFORM, check_name

PRECISIONS = UNIFORM   # what a whole model can be built in (edgemm/precision.py)
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_cc")
OPT_LEVELS = range(0, 6)   # TensorRT builder optimization levels (the CLI's --opt-level 0..5)
# Keys that switch on trust in an input's code. Trust comes only from the person at the command line
# (--trust-pickle beside --config) or an explicit Python argument, never from a file that travels with
# the model: --config refuses them set, and --dump-config leaves them out.
COMMAND_LINE_ONLY = ("trust_pickle",)
# The file's layout: section -> {key in the section: CompileConfig field}; the other fields sit at the top
# (TOP_LEVEL). Every field has exactly one place (tests/unit/test_config_sections.py checks it).
SECTIONS = {
    "precision": {"mode": "precision", "per_branch": "precision_policy", "accuracy_target": "accuracy_target",
                  "int8_recipe": "int8_recipe", "exclude": "exclude"},
    "calibration": {"data": "calib", "samples": "calib_samples"},
    "verify": {"eval": "eval", "min_cosine": "min_cosine", "min_top1": "min_top1",
               "max_metric_drop": "max_metric_drop"},
    "io": {"inputs": "inputs", "dynamic": "dynamic", "dynamic_batch": "dynamic_batch", "max_batch": "max_batch",
           "output_names": "output_names", "exporter": "exporter"},
    "prune": {"ratios": "prune", "recover": "recover", "recover_lr": "recover_lr", "sparsity": "sparsity"},
    "tensorrt": {"dla": "dla", "workspace_mb": "workspace_mb", "opt_level": "opt_level",
                 "version_compatible": "version_compatible", "hardware_compatibility": "hardware_compatibility",
                 "cuda_graph": "cuda_graph", "refittable": "refittable", "profile_batches": "profile_batches"},
    "cpu": {"engines": "cpu_engines", "tune_threads": "tune_threads"},
    "split": {"enabled": "split", "place": "place"},
}
TOP_LEVEL = ("model", "output", "name", "target", "weights", "branch", "force", "trust_pickle")
# The compile command's flags whose field is not the flag's own name (``--max-batch`` is ``max_batch``).
# Checks name the flag; a --config file's error names the key the file wrote for that field instead.
FLAG_FIELDS = {"--precision": "precision_policy", "--fp32": "precision", "--fp16": "precision",
               "--int8": "precision", "--fp8": "precision", "--input": "inputs", "--static-batch": "dynamic_batch",
               "--no-thread-tuning": "tune_threads"}


def field_of_flag(flag: str) -> str:
    """The CompileConfig field a compile flag sets: ``--precision`` -> precision_policy."""
    return FLAG_FIELDS.get(flag) or flag.lstrip("-").replace("-", "_")


@dataclass
class CompileConfig:
    model: str
    output: str | None = None            # bundle folder; default engines/<name>
    name: str | None = None
    precision: str = "fp32"
    precision_policy: str | None = None  # per branch, e.g. "vision=int8,text=fp16,fusion=fp32"
    branch: list[str] = field(default_factory=list)       # BRANCH=PATTERN overrides of branch detection
    accuracy_target: str | None = None   # e.g. "cosine>=0.998" or "top1-drop<=0.5"
    target: str = "cpu"
    calib: str | None = None
    eval: str | None = None
    weights: str | None = None
    trust_pickle: bool = False
    inputs: list[str] = field(default_factory=list)       # NAME:SHAPE:DTYPE
    dynamic: list[str] = field(default_factory=list)      # NAME:AXIS=MIN:OPT:MAX
    dynamic_batch: bool = True
    max_batch: int | None = None         # None: 64, or a .pt2/.onnx model's own bound
    exporter: str = "dynamo"             # preferred exporter
    output_names: str | None = None      # comma-separated names for tuple outputs
    int8_recipe: str | None = None       # pin a CPU INT8 recipe by name, skipping the search
    exclude: list[str] = field(default_factory=list)      # nodes kept out of INT8/FP8: op:TYPE, module:GLOB, regex
    min_cosine: float | None = None      # accuracy bar for verification / recipe selection
    min_top1: float | None = None        # top-1 agreement bar of class-score outputs (parity/output_kinds.py)
    max_metric_drop: float | None = None # task-metric drop allowed by --eval verification, points
    calib_samples: int = 256             # cap on calibration samples used
    prune: str | None = None             # "0.3" or "vision=0.3,text=0.2"
    recover: int = 0                     # distillation steps after pruning
    recover_lr: float = 1e-3             # AdamW learning rate for recovery (1e-4 suits pretrained towers)
    sparsity: str | None = None          # "2:4" (TensorRT targets with sparse tensor cores)
    dla: bool = False
    workspace_mb: int | None = None
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    cuda_graph: bool = False             # TensorRT runtime: replay CUDA graphs
    refittable: bool = False             # TensorRT: weights swappable later (`edgemm build --refit NEW.onnx`)
    profile_batches: list[str] = field(default_factory=list)  # TensorRT: one profile per MIN:OPT:MAX batch range
    force: bool = False                  # replace an existing bundle
    tune_threads: bool = True            # CPU bundles: record 1 intra-op thread when measured faster
    cpu_engines: str = "auto"            # CPU --int8: "auto" also measures OpenVINO (when installed), "onnxruntime" not
    split: bool = False                  # one model per modality branch + the fusion head (edgemm/split/)
    place: str | None = None             # --split on TensorRT targets: PART=DEVICE, e.g. "vision=dla0,text=gpu"

    def validate(self) -> None:
        """Check the configuration against the target and itself; one-line InputError naming the flag.
        Runs once per configuration: asked again with nothing changed, it returns at once."""
        state = json.dumps({k: v for k, v in asdict(self).items() if k not in COMMAND_LINE_ONLY}, sort_keys=True,
                           default=str)   # the trust switches change no check
        if getattr(self, "_validated_state", None) == state:
            return
        self._check()
        self._validated_state = state

    def _check(self) -> None:
        check_name(self.precision, allowed=PRECISIONS)
        # The target's refusals first: "this device has no FP8" answers a request that could never run,
        # whatever --calib says.
        from . import targets

        target = targets.load(self.target)
        target.validate(self.precision, dla=self.dla)
        if self.sparsity:
            from .prune.sparsity import check_sparsity_target

            check_sparsity_target(target, self.sparsity)
        quantized = self.precision in QUANTIZED or bool(self._policy_precisions() & set(QUANTIZED))
        if quantized and not self.calib:
            raise InputError(f"--{self.precision} needs calibration data; edgemm never calibrates on random data",
                             field="--calib", fix="pass --calib data.npz (keys = input names, axis 0 = samples)")
        if self.exclude:
            from .quant.exclusions import parse_exclude

            parse_exclude(self.exclude)
            if self.precision not in QUANTIZED or self.precision_policy or self.accuracy_target:
                raise InputError("keeps nodes out of a uniform INT8/FP8 quantization", field="--exclude",
                                 fix="use it with --int8 or --fp8 (not with --precision A=B,... or "
                                     "--accuracy-target, which choose the float nodes themselves)")
        if self.accuracy_target and self.precision not in QUANTIZED and not self.precision_policy:
            raise InputError("needs a quantized precision to fall back from", field="--accuracy-target",
                             fix="add --int8 (or --fp8 on FP8 targets)")
        if (self.prune or self.sparsity) and not self.calib:
            raise InputError("pruning and sparsity rank weights on calibration data", field="--calib",
                             fix="pass --calib data.npz")
        if self.recover and not self.prune and not self.sparsity:
            raise InputError("there is nothing to recover from", field="--recover", fix="add --prune or --sparsity")
        if self.recover < 0:
            raise InputError("must be >= 0", field="--recover", fix="e.g. --recover 300")
        if isinstance(self.recover_lr, bool) or not isinstance(self.recover_lr, (int, float)) \
                or not 0 < self.recover_lr <= 1:
            raise InputError(f"must be a number in (0, 1], not {self.recover_lr!r}", field="--recover-lr",
                             fix="e.g. --recover-lr 1e-4")
        if self.calib_samples < 1:
            raise InputError("must be >= 1", field="--calib-samples", fix="e.g. --calib-samples 256")
        if self.max_batch is not None and not 1 <= self.max_batch <= MAX_BATCH:
            raise InputError(f"must be from 1 to {MAX_BATCH}, not {self.max_batch}", field="--max-batch",
                             fix="e.g. --max-batch 64")
        if self.exporter not in ("dynamo", "torchscript"):
            raise InputError(f"unknown exporter {self.exporter!r}", field="--exporter", fix="dynamo or torchscript")
        if self.max_metric_drop is not None and not (0 <= self.max_metric_drop <= 100):
            raise InputError("must be from 0 to 100 points", field="--max-metric-drop", fix="e.g. --max-metric-drop 1.0")
        if self.min_top1 is not None and not (0.0 <= self.min_top1 <= 1.0):
            raise InputError("must lie in [0, 1]", field="--min-top1", fix="e.g. --min-top1 0.95")
        if self.min_cosine is not None and not (-1.0 <= self.min_cosine <= 1.0):
            raise InputError("must lie in [-1, 1]", field="--min-cosine", fix="e.g. --min-cosine 0.99")
        if self.cpu_engines not in ("auto", "onnxruntime"):
            raise InputError(f"unknown value {self.cpu_engines!r}", field="--cpu-engines", fix="auto or onnxruntime")
        if self.opt_level not in OPT_LEVELS:
            raise InputError(f"must be 0..5, not {self.opt_level!r}", field="--opt-level", fix="e.g. --opt-level 3")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise InputError(f"unknown level {self.hardware_compatibility!r}", field="--hardware-compatibility",
                             fix=f"use one of {', '.join(HARDWARE_COMPATIBILITY)}")
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise InputError("must be >= 1", field="--workspace-mb", fix="e.g. --workspace-mb 1024, or leave it out")
        tensorrt_only = [flag for flag, on in (("--refittable", self.refittable), ("--cuda-graph", self.cuda_graph),
                                               ("--profile-batches", self.profile_batches)) if on]
        from .backends import registry

        if tensorrt_only and not registry.get(target.backend).engine_options:
            raise InputError(f"applies to TensorRT targets; {self.target} runs {target.backend}",
                             field=tensorrt_only[0], fix="drop it, or pick a TensorRT --target (see edgemm targets)")
        if self.profile_batches:
            from .backends.tensorrt.options import parse_profile_batches

            batches = parse_profile_batches(self.profile_batches)
            if not self.dynamic_batch:
                raise InputError("needs a dynamic batch axis", field="--profile-batches", fix="drop --static-batch")
            if self.max_batch is not None and max(b[2] for b in batches) > self.max_batch:
                raise InputError(f"a profile reaches batch {max(b[2] for b in batches)} past --max-batch "
                                 f"{self.max_batch}", field="--profile-batches", fix="raise --max-batch")
        if self.dla:
            from .backends.tensorrt.options import refuse_on_dla

            refuse_on_dla(refittable=self.refittable, several_profiles=bool(self.profile_batches))
        if self.place and not self.split:
            raise InputError("places the parts of a split bundle", field="--place", fix="add --split")
        if self.split:
            if self.place:
                from .split.build import parse_placement

                placed = parse_placement(self.place, target)
                on_dla = sorted(part for part, device in placed.items() if device.startswith("dla"))
                if on_dla:  # the same refusals as --dla on a whole model
                    from .backends.tensorrt.options import refuse_on_dla

                    refuse_on_dla(refittable=self.refittable, several_profiles=bool(self.profile_batches),
                                  dla="the DLA placement", parts=", ".join(on_dla))
            if self.accuracy_target:
                # The search ranks layers by what they cost the model's outputs; a split part is quantized
                # alone on its own outputs, and a bar met there bounds nothing the parts after it compute.
                raise InputError("is not available with --split: the search measures the model's outputs, "
                                 "but each part is quantized alone, and a bar met on one part's outputs says "
                                 "nothing of the outputs the parts after it compute from them",
                                 field="--accuracy-target",
                                 fix="choose per-part precisions (--precision vision=int8,text=fp32,fusion=fp32) "
                                     "and keep sensitive nodes with --exclude, or compile without --split")
        self._check_specs(target)
        if self.output is not None:  # before any work: --force must never delete the user's files
            from .bundle import check_destination

            check_destination(self.output, force=self.force, protect={
                "MODEL": self.model, "--calib": self.calib, "--eval": self.eval, "--weights": self.weights})

    def _check_specs(self, target) -> None:
        """The spec strings, here rather than at compile so that a --config file's errors name its key
        (from_file relabels what this raises). Input paths are checked at compile (check_request): a dumped
        config may name files of another machine."""
        for text in self.dynamic:
            parse_dynamic_flag(text)
        if self.precision_policy:
            from .quant.mixed import parse_precision_policy

            try:
                for prec in set(parse_precision_policy(self.precision_policy).values()):
                    target.validate(prec, dla=self.dla)
            except InputError as exc:   # the wrong value is the policy's, whichever check found it
                raise type(exc)(exc.detail, field="--precision", fix=exc.fix) from exc
        if self.accuracy_target:
            from .quant.accuracy_search import parse_accuracy_target

            parse_accuracy_target(self.accuracy_target)
        if self.prune:
            from .prune import parse_prune_spec

            parse_prune_spec(self.prune)

    def _policy_precisions(self) -> set[str]:
        """The precisions ``precision_policy`` names (its values; parsed for real by quant/mixed.py)."""
        if not isinstance(self.precision_policy, str):
            return set()
        return {item.partition("=")[2].strip().lower() for item in self.precision_policy.split(",")}

    def to_dict(self) -> dict:
        return asdict(self)

    def section(self, name: str) -> Mapping:
        """One section of the file layout, read-only: ``cfg.section("tensorrt")["opt_level"]``."""
        return MappingProxyType({key: getattr(self, attr) for key, attr in SECTIONS[name].items()})

    def to_file_dict(self) -> dict:
        """What --dump-config writes: the nested layout, without the trust switches (COMMAND_LINE_ONLY)."""
        flat = asdict(self)
        out = {k: flat[k] for k in TOP_LEVEL if k not in COMMAND_LINE_ONLY}
        out.update({name: {key: flat[attr] for key, attr in keys.items()} for name, keys in SECTIONS.items()})
        return out

    @classmethod
    def from_file(cls, path: Path) -> "CompileConfig":
        from .paths import require_regular_file

        require_regular_file(path, field="--config", fix="pass a JSON file from --dump-config")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            # ValueError: bad JSON or UTF-8, or an integer beyond Python's digit limit; RecursionError: deep nesting
            raise InputError(f"cannot read config ({type(exc).__name__}: {str(exc)[:200]})", file=path,
                             fix="pass a JSON file from --dump-config") from exc
        if not isinstance(data, dict):
            raise InputError("must be a JSON object", file=path, fix="pass a JSON file from --dump-config")
        data, where = _flatten(data, path, {f.name for f in fields(cls)})
        for key in COMMAND_LINE_ONLY:
            if data.get(key) is True:
                flag = "--" + key.replace("_", "-")
                raise SecurityError(f"a config file cannot switch on {flag}: trust in a model's code comes only "
                                    f"from the command line", file=path, field=where[key],
                                    fix=f"remove the key, and type {flag} beside --config if you trust the model")
        if "model" not in data:
            raise InputError("missing key", file=path, field="model", fix="add the model path")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            expected = hints[key]
            if not _has_type(value, expected):
                raise InputError(f"must be {_describe_type(expected)}, not {_describe_value(value)}", file=path,
                                 field=where[key], fix="use the type --dump-config writes for this key")
        cfg = cls(**data)
        try:
            cfg.validate()
        except InputError as exc:
            if exc.file is not None:  # the error names its own file (an output folder, say)
                raise
            # Name the config file and its key (where the file has it, or would) rather than the CLI flag.
            key = field_of_flag(exc.field or "")
            nested = any(k != v for k, v in where.items())
            field_name = (where.get(key) or (_place(key) if nested else key)) if key in hints else exc.field
            raise type(exc)(exc.detail, file=path, field=field_name, fix=exc.fix) from exc
        return cfg


def _place(attr: str) -> str:
    """A field's key in the nested layout: "tensorrt.opt_level", or "model" at the top."""
    for name, keys in SECTIONS.items():
        for key, field_name in keys.items():
            if field_name == attr:
                return f"{name}.{key}"
    return attr


def _flatten(data: dict, path: Path, known: set[str]) -> tuple[dict, dict[str, str]]:
    """The file's values by field, and where each was written ("tensorrt.opt_level", or "opt_level" in a
    flat file): a section name holding an object is a section, anything else a flat field."""
    flat, where = {}, {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, item in value.items():
                attr = SECTIONS[key].get(inner)
                if attr is None:
                    raise InputError(f"unknown key {inner!r} in section {key!r}", file=path, field=f"{key}.{inner}",
                                     fix=f"valid keys: {', '.join(SECTIONS[key])}")
                if attr in flat:
                    raise InputError(f"is given twice (also as {where[attr]!r})", file=path, field=f"{key}.{inner}",
                                     fix="keep one of them")
                flat[attr], where[attr] = item, f"{key}.{inner}"
        elif key in known:
            if key in flat:
                raise InputError(f"is given twice (also as {where[key]!r})", file=path, field=key,
                                 fix="keep one of them")
            flat[key], where[key] = value, key
        else:
            raise InputError(f"unknown key {key!r}", file=path, field=key,
                             fix=f"valid keys: {', '.join(sorted(set(TOP_LEVEL) | set(SECTIONS)))}")
    return flat, where


def _has_type(value, expected) -> bool:
    """JSON value against a dataclass annotation: bool is only a real bool, int never a bool, float
    accepts int, list[X] checks its items, Optional allows null."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(expected) or (object,)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe_type(expected) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if origin is list:
        item = typing.get_args(expected)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _describe_type(item))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        expected, getattr(expected, "__name__", str(expected)))


def _describe_value(value) -> str:
    kind = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if isinstance(value, (bool, int, float, str)) else ""
    return f"{kind} {text[:40]}".strip()
