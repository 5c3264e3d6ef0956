"""TensorRT build options: one serializable record shared by the Python-API builder, the trtexec
command line written into portable bundles, and the manifest. Standard library only."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Mapping, Sequence

from ...errors import InputError
from ...iospec import MAX_BATCH

_LOG = logging.getLogger("edgemm")

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_cc")
# First TensorRT release with HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY (NVIDIA/TensorRT
# release/10.9 python/src/infer/pyCore.cpp and trtexec --hardwareCompatibilityLevel=sameComputeCapability).
SAME_CC_MIN_TRT = (10, 9)
OPT_LEVELS = range(0, 6)   # IBuilderConfig.builder_optimization_level: 0..5, default 3

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRTOptions:
    # Precision already carried by the ONNX file (Q/DQ or AutoCast). Only read when a TensorRT 10 build
    # must fall back to weak typing (DLA), where the matching builder flags are set instead.
    precision: str = "fp32"
    dla_core: int | None = None
    gpu_fallback: bool = True
    workspace_mb: int | None = None
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    sparse_weights: bool = False
    # BuilderFlag.REFIT / trtexec --refit: weights can be swapped later (`edgemm build --refit NEW.onnx`).
    refittable: bool = False
    strongly_typed: bool = True
    cuda_graph: bool = False
    # input name -> (min, opt, max) shapes, for inputs with dynamic dimensions (optimization profile 0)
    profile_shapes: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)
    # Further optimization profiles (1, 2, ...), same inputs as profile 0: e.g. batch 1 for latency in
    # profile 0 and batch 32 for throughput in profile 1. The runtime picks, per call, the first profile
    # whose ranges hold the input shapes.
    extra_profiles: tuple[dict[str, tuple[Shape, Shape, Shape]], ...] = ()

    def __post_init__(self):
        def norm(profile):
            return {str(k): tuple(tuple(int(d) for d in s) for s in v) for k, v in dict(profile).items()}

        object.__setattr__(self, "profile_shapes", norm(self.profile_shapes))
        object.__setattr__(self, "extra_profiles", tuple(norm(p) for p in self.extra_profiles))
        self.check()

    @property
    def profiles(self) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
        """All optimization profiles in index order (empty when no input is dynamic)."""
        return [self.profile_shapes, *self.extra_profiles] if self.profile_shapes else []

    def check(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise InputError(f"builder optimization level {self.opt_level} is outside 0..5", field="opt_level",
                             fix="use 3 (TensorRT's default) or 4-5 for longer builds and faster engines")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise InputError(f"unknown hardware compatibility {self.hardware_compatibility!r}",
                             field="hardware_compatibility", fix=f"use one of {', '.join(HARDWARE_COMPATIBILITY)}")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise InputError(f"workspace of {self.workspace_mb} MiB", field="workspace_mb", fix="use a positive size")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise InputError(f"DLA core {self.dla_core}", field="--dla", fix="DLA cores count from 0")
            if self.hardware_compatibility != "none":
                raise InputError("hardware-compatible engines cannot run on DLA", field="--dla",
                                 fix="drop --dla or the hardware compatibility level")
            if self.precision not in ("fp16", "int8"):
                raise InputError(f"DLA runs fp16 or int8 only, not {self.precision}", field="--dla",
                                 fix="add --int8 or --fp16, or drop --dla")
            refuse_on_dla(refittable=self.refittable, several_profiles=bool(self.extra_profiles),
                          fields=("refittable", "extra_profiles"), names=("refittable", "the extra profiles"))
            # DLA needs min = opt = max; with a range TensorRT quietly runs the layers on the GPU
            # ("DLA Supported Layers and Restrictions": dynamic dimensions are not supported on DLA).
            ranged = sorted(n for n, (lo, opt, hi) in self.profile_shapes.items() if not lo == opt == hi)
            if ranged:
                raise InputError(f"input(s) {', '.join(ranged)} have a min/opt/max range, which DLA cannot run",
                                 field="--dla", fix="give --dynamic MIN:OPT:MAX with MIN = OPT = MAX for --dla")
        if self.extra_profiles:
            for i, extra in enumerate(self.extra_profiles, start=1):
                if set(extra) != set(self.profile_shapes):
                    raise InputError(f"profile {i} covers {sorted(extra)}, profile 0 covers "
                                     f"{sorted(self.profile_shapes)}", field=f"extra_profiles[{i - 1}]",
                                     fix="give every profile the same dynamic inputs")
        for name, triple in [t for p in self.profiles or [self.profile_shapes] for t in p.items()]:
            if len(triple) != 3:
                raise InputError("needs (min, opt, max) shapes", field=f"profile_shapes[{name!r}]")
            lo, opt, hi = triple
            if not (len(lo) == len(opt) == len(hi)):
                raise InputError(f"min/opt/max ranks differ: {lo} {opt} {hi}", field=f"profile_shapes[{name!r}]",
                                 fix="give the three shapes the same rank")
            if any(not (1 <= a <= b <= c) for a, b, c in zip(lo, opt, hi)):
                raise InputError(f"needs 1 <= min <= opt <= max on every axis, got {lo} {opt} {hi}",
                                 field=f"profile_shapes[{name!r}]", fix="fix the --dynamic ranges")
            if "," in name or "'" in name:
                # trtexec splits shape specs on ',' and quotes names with "'" (samples/common/sampleOptions.cpp).
                raise InputError(f"input name {name!r} contains ',' or a quote, which trtexec cannot parse",
                                 field="inputs", fix="rename the input when exporting")

    # -- the version-specific decisions ---------------------------------------------------------
    def weak_typing(self, trt_major: int) -> bool:
        """TensorRT 11 has no weak typing at all. On 10.x edgemm builds strongly typed (precision comes
        from the ONNX file) except for DLA: strongly typed DLA builds arrived with TensorRT 11.4.1
        (https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/release-notes-11/11.4.1.html),
        so a 10.x DLA build uses the precision builder flags (FP16 only: INT8 there means implicit
        quantization, which targets.dla_precision_supported refuses before any work)."""
        if trt_major >= 11:
            return False
        return (not self.strongly_typed) or self.dla_core is not None

    def precision_flags(self, trt_major: int) -> tuple[str, ...]:
        """Weak-typing precision flags (BuilderFlag names) for a TensorRT 10 build; empty otherwise.
        FP16 rides along with INT8/FP8 so layers modelopt left unquantized are not forced to FP32."""
        if not self.weak_typing(trt_major):
            return ()
        return {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16"),
                "fp8": ("FP8", "FP16")}[self.precision]

    # -- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile_shapes"] = {k: [list(s) for s in v] for k, v in self.profile_shapes.items()}
        d["extra_profiles"] = [{k: [list(s) for s in v] for k, v in p.items()} for p in self.extra_profiles]
        return d

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "build options") -> "TensorRTOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown TensorRT option(s) {', '.join(sorted(unknown))}", file=source,
                             field="backend.options", fix="rebuild the bundle with this edgemm version")
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as exc:
            raise InputError(f"malformed TensorRT options ({exc})", file=source, field="backend.options",
                             fix="rebuild the bundle") from exc

    def with_(self, **changes) -> "TensorRTOptions":
        return replace(self, **changes)

    @classmethod
    def from_compile(cls, cfg, target, specs) -> "TensorRTOptions":
        """Options for ``edgemm compile``: the CompileConfig's TensorRT fields over the target's defaults;
        profiles from the input specs' dynamic dims (edgemm.iospec.TensorSpec)."""
        sparsity = getattr(cfg, "sparsity", None)
        return options_for_target(
            target, cfg.precision, dla=getattr(cfg, "dla", False), sparse_weights=bool(sparsity),
            inputs=[s.to_dict() if hasattr(s, "to_dict") else s for s in specs],
            workspace_mb=getattr(cfg, "workspace_mb", None) or target.workspace_mb,
            opt_level=getattr(cfg, "opt_level", 3),
            version_compatible=getattr(cfg, "version_compatible", False),
            hardware_compatibility=getattr(cfg, "hardware_compatibility", "none"),
            cuda_graph=getattr(cfg, "cuda_graph", False),
            refittable=getattr(cfg, "refittable", False),
            profile_batches=parse_profile_batches(getattr(cfg, "profile_batches", None) or ()))


def refuse_on_dla(*, refittable: bool, several_profiles: bool, fields=("--refittable", "--profile-batches"),
                  names=("--refittable", "--profile-batches"), dla: str = "--dla", parts: str = "") -> None:
    """What a DLA engine cannot be, one place for the engine options, the compile flags and split parts
    placed on a DLA (where it would otherwise be dropped silently)."""
    where = f" (part {parts} on DLA)" if parts else ""
    if several_profiles:
        raise InputError(f"DLA engines take one static profile{where}", field=fields[1],
                         fix=f"drop {names[1]} or {dla}")
    if refittable:
        # DLA loadables are compiled by the DLA compiler; TensorRT cannot refit their weights.
        raise InputError(f"DLA engines cannot be refitted{where}", field=fields[0], fix=f"drop {names[0]} or {dla}")


def parse_profile_batches(items: Sequence[str]) -> list[tuple[int, int, int]]:
    """``--profile-batches 1:1:1 --profile-batches 8:32:64`` -> [(1, 1, 1), (8, 32, 64)]: one optimization
    profile per entry, the batch axis at MIN:OPT:MAX, every other dynamic axis at its --dynamic range.
    Profile 0 is the first entry (e.g. batch 1 for latency, then a throughput profile)."""
    out = []
    for item in items:
        parts = str(item).split(":")
        try:
            triple = tuple(int(p) for p in parts)
        except ValueError:
            triple = ()
        if len(triple) != 3 or not 1 <= triple[0] <= triple[1] <= triple[2]:
            raise InputError(f"{item!r} is not MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX", field="--profile-batches",
                             fix="e.g. --profile-batches 1:1:1 --profile-batches 8:32:64")
        if triple[2] > MAX_BATCH:
            raise InputError(f"{item!r}: MAX {triple[2]} is past {MAX_BATCH:,}, the largest batch edgemm builds for",
                             field="--profile-batches", fix=f"give a MAX up to {MAX_BATCH}, e.g. 8:32:64")
        out.append(triple)
    if len(set(out)) != len(out):
        raise InputError("the same batch range is given twice", field="--profile-batches",
                         fix="give each optimization profile once")
    return out


def profile_shapes_from_inputs(inputs: Sequence[Mapping], *, default_batch: tuple[int, int, int] = (1, 1, 8)
                               ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Optimization-profile shapes from manifest input specs (``{"name", "dtype", "shape", "ranges"}``,
    see edgemm.iospec): each symbolic dim takes its (min, opt, max) range; a symbolic dim with no range
    is refused, except ``batch`` which defaults to ``default_batch``. Static inputs get no profile entry."""
    out = {}
    for spec in inputs:
        shape = spec["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        ranges = spec.get("ranges") or {}
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                r = (dim, dim, dim)
            elif dim in ranges:
                r = tuple(ranges[dim])
            elif dim == "batch":
                r = default_batch
            else:
                raise InputError(f"dynamic axis {axis} ({dim!r}) of input {spec['name']!r} has no min:opt:max range",
                                 field="--dynamic",
                                 fix=f"pass --dynamic {spec['name']}:{axis}=MIN:OPT:MAX for TensorRT targets")
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        out[spec["name"]] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def _with_batch_range(inputs: Sequence[Mapping], batch: tuple[int, int, int]) -> list[dict]:
    """The input specs with the symbolic ``batch`` dim's range replaced (refused past the declared one)."""
    out = []
    for spec in inputs:
        spec = dict(spec)
        ranges = dict(spec.get("ranges") or {})
        if "batch" in spec["shape"]:
            declared = ranges.get("batch")
            if declared is not None and (batch[0] < declared[0] or batch[2] > declared[2]):
                raise InputError(f"batch {batch[0]}:{batch[1]}:{batch[2]} lies outside the bundle's batch range "
                                 f"{declared[0]}..{declared[2]}", field="--profile-batches",
                                 fix="keep every profile inside --max-batch (or raise --max-batch)")
            ranges["batch"] = list(batch)
        spec["ranges"] = ranges
        out.append(spec)
    return out


def _check_batch_coverage(inputs: Sequence[Mapping], batches: Sequence[tuple[int, int, int]]) -> None:
    """Every batch size the bundle promises must fall in some profile: the runtime refuses a call that no
    profile holds, so a gap (profiles 1:1:1 and 4:16:32 under a batch range of 1..64) is refused here."""
    declared = next(((spec.get("ranges") or {}).get("batch") for spec in inputs
                     if "batch" in spec["shape"] and (spec.get("ranges") or {}).get("batch")), None)
    if declared is None:
        return
    lo, hi = int(declared[0]), int(declared[2])
    covered, reach = sorted((b[0], b[2]) for b in batches), lo
    for start, end in covered:
        if start > reach:
            break
        reach = max(reach, end + 1)
    if reach <= hi:
        raise InputError(f"no profile holds batch {reach} of the bundle's batch range {lo}..{hi}",
                         field="--profile-batches",
                         fix=f"add a profile covering batch {reach}, or lower --max-batch to {reach - 1}"
                         if reach > lo else f"add a profile starting at batch {lo}")


def options_for_target(target, precision: str, *, dla: bool | int = False, sparse_weights: bool = False,
                       inputs: Sequence[Mapping] = (), profile_batches: Sequence[tuple[int, int, int]] = (),
                       **overrides) -> TensorRTOptions:
    """Defaults a target implies: its workspace budget, DLA core 0 when ``dla`` is True, profiles from
    the inputs' dynamic dims (one per ``profile_batches`` entry when given: the batch axis at that range).
    ``overrides`` set any other field (opt_level, cuda_graph, ...)."""
    dla_core = None if dla is False or dla is None else (0 if dla is True else int(dla))
    extra_profiles = ()
    if profile_batches:
        if not any("batch" in spec["shape"] for spec in inputs):
            raise InputError("the model has no dynamic batch axis", field="--profile-batches",
                             fix="drop --profile-batches (or --static-batch)")
        _check_batch_coverage(inputs, profile_batches)
        shapes = profile_shapes_from_inputs(_with_batch_range(inputs, profile_batches[0]))
        extra_profiles = tuple(profile_shapes_from_inputs(_with_batch_range(inputs, b)) for b in profile_batches[1:])
        overrides = {"extra_profiles": extra_profiles, **overrides}
    else:
        shapes = profile_shapes_from_inputs(inputs)
    if dla_core is not None:
        # DLA runs static shapes only: pin every dynamic input to its opt shape (logged), so a --dla
        # build never falls back to the GPU silently because of a shape range.
        for name, (lo, opt, hi) in list(shapes.items()):
            if not lo == opt == hi:
                _LOG.warning("--dla: input %s pinned to its opt shape %s (DLA needs min = opt = max)", name, list(opt))
                shapes[name] = (opt, opt, opt)
    values = dict(precision=precision, dla_core=dla_core, workspace_mb=target.workspace_mb,
                  sparse_weights=sparse_weights, profile_shapes=shapes)
    values.update(overrides)
    return TensorRTOptions(**values)
