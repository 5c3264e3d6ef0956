"""Target device profiles: one TOML data file per device under ``profiles/``, the profile model and
the checks that refuse a request the device cannot serve before any work starts.

    >>> from edgemm.targets import load
    >>> load("jetson-orin-nano").validate("fp8")
    InputError: target jetson-orin-nano does not support fp8 (supports: fp32, fp16, bf16, int8) ...

Standard library only: the runtime and the CLI import this module.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .. import precision as precision_table
from ..errors import InputError
from ..paths import require_regular_file

__all__ = ["TargetProfile", "load", "all_targets", "names", "PRECISIONS", "FP8_MIN_CC", "dla_supported",
           "dla_precision_supported", "version_parts"]

# Precision modes edgemm knows, lowest expected error first (the one table: edgemm/precision.py).
PRECISIONS = precision_table.ORDER
KINDS = ("cpu", "jetson", "datacenter")
# FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell incl. Thor. Orin (8.7) and A100 (8.0) have none.
FP8_MIN_CC = (8, 9)
# DLA executes FP16 and INT8 only.
DLA_PRECISIONS = ("fp16", "int8")
SPARSITY_PATTERNS = ("2:4",)
# Where DLA exists (https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/work-with-dla.html):
# TensorRT 10.x up to 10.7 ("TensorRT 10.7 was the last 10.x release that supported DLA"; JetPack 6 ships
# 10.3), then none in 11.0-11.3, 11.4.0 only on Windows on ARM, and 11.4.1 on AGX Orin with JetPack 7.2.2+
# (11.5 dropped JetPack again). Versions are (major, minor, patch).
DLA_TENSORRT_RANGES = (((10, 0, 0), (10, 8, 0)), ((11, 4, 1), (11, 5, 0)))


def version_parts(text: str) -> tuple[int, ...]:
    """"10.3.0" -> (10, 3, 0); digits only, missing parts are 0 (a build number, 4th part, is dropped)."""
    from ..text_numbers import version_numbers

    parts = version_numbers(text)
    return parts + (0,) * (3 - len(parts))


def dla_supported(tensorrt_version: str) -> bool:
    v = version_parts(tensorrt_version)
    return any(lo <= v < hi for lo, hi in DLA_TENSORRT_RANGES)


def dla_precision_supported(tensorrt_version: str, precision: str) -> bool:
    """DLA INT8 on TensorRT 10.x takes implicit quantization (calibration cache) only, never the explicit
    Q/DQ model edgemm quantizes with modelopt (NVIDIA/Model-Optimizer PR #1661: the 10.x DLA route is
    modelopt Q/DQ -> qdq-translator -> calib.cache + the Q/DQ-free model). 11.4.1 builds DLA strongly typed,
    so the Q/DQ model is what it takes."""
    if not dla_supported(tensorrt_version) or precision not in DLA_PRECISIONS:
        return False
    return not (precision == "int8" and version_parts(tensorrt_version)[0] < 11)

_REQUIRED = ("name", "description", "kind", "backend", "precisions", "default_precision", "dla_cores",
             "sparse_tensor_cores")
_OPTIONAL = ("compute_capability", "memory_mb", "workspace_mb", "tensorrt_versions", "jetpack", "notes")


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    kind: str                      # "cpu" | "jetson" | "datacenter"
    backend: str                   # "onnxruntime" | "tensorrt"
    compute_capability: str | None
    precisions: tuple[str, ...]
    dla_cores: int
    memory_mb: int | None          # None: the host's memory
    workspace_mb: int | None       # TensorRT builder workspace limit
    tensorrt_versions: tuple[str, ...]   # "major.minor.patch" shipped by the device's software stack
    sparse_tensor_cores: bool
    default_precision: str
    jetpack: str | None
    notes: str

    # -- derived facts -------------------------------------------------------------------------
    @property
    def cc(self) -> tuple[int, int] | None:
        return None if self.compute_capability is None else _cc_tuple(self.compute_capability)

    @property
    def tensorrt_majors(self) -> tuple[int, ...]:
        return tuple(sorted({int(v.split(".")[0]) for v in self.tensorrt_versions}))

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def dla_versions(self, precision: str) -> tuple[str, ...]:
        """The listed TensorRT versions that can build a DLA engine in ``precision``."""
        if not self.dla_cores:
            return ()
        return tuple(v for v in self.tensorrt_versions if dla_precision_supported(v, precision))

    # -- the checks compile runs before any work -----------------------------------------------
    def validate(self, precision: str, *, dla: bool | int = False, sparsity: str | bool | None = None) -> None:
        """Raise a one-line InputError when this target cannot serve the request."""
        precision_table.check_name(precision)
        if precision not in self.precisions:
            raise InputError(f"target {self.name} does not support {precision} "
                             f"(supports: {', '.join(self.precisions)})", field="--target",
                             fix=self._precision_fix(precision))
        if dla is not False and dla is not None:
            if self.dla_cores == 0:
                raise InputError(f"target {self.name} has no DLA cores", field="--dla",
                                 fix="drop --dla, or use a target with DLA: " + ", ".join(_dla_targets()))
            if not isinstance(dla, bool) and not (0 <= int(dla) < self.dla_cores):
                raise InputError(f"target {self.name} has DLA cores 0..{self.dla_cores - 1}, not {dla}",
                                 field="--dla", fix=f"use a core between 0 and {self.dla_cores - 1}")
            if precision not in DLA_PRECISIONS:
                raise InputError(f"DLA runs fp16 or int8 only, not {precision}", field="--dla",
                                 fix="add --int8 or --fp16, or drop --dla")
            if not self.dla_versions(precision):
                stack = ", ".join(self.tensorrt_versions)
                if precision == "int8" and self.dla_versions("fp16"):
                    raise InputError(
                        f"DLA INT8 on TensorRT {stack} ({self.name}) takes implicit quantization only, not "
                        f"edgemm's Q/DQ model", field="--dla",
                        fix="use --fp16 with --dla, or a TensorRT 11.4.1 stack (JetPack 7.2.2, AGX Orin), or "
                            "translate the Q/DQ model with NVIDIA's qdq-translator and build it yourself")
                raise InputError(f"TensorRT {stack} ({self.name}) has no DLA support", field="--dla",
                                 fix="DLA needs TensorRT 10.0-10.7 (JetPack 6) or 11.4.1 (JetPack 7.2.2, AGX Orin)")
        if sparsity not in (None, False):
            pattern = "2:4" if sparsity is True else sparsity
            if pattern not in SPARSITY_PATTERNS:
                raise InputError(f"unknown sparsity pattern {pattern!r}", field="--sparsity",
                                 fix=f"use one of {', '.join(SPARSITY_PATTERNS)}")
            if not self.sparse_tensor_cores:
                raise InputError(f"target {self.name} has no sparse tensor cores, 2:4 sparsity would not "
                                 f"run faster", field="--sparsity",
                                 fix="drop --sparsity, or pick an Ampere-or-newer GPU target")

    def _precision_fix(self, precision: str) -> str:
        alternative = f"use --{self.default_precision}"
        if precision == "fp8":
            return (f"{alternative} or a target with compute capability >= "
                    f"{FP8_MIN_CC[0]}.{FP8_MIN_CC[1]} such as h100")
        others = [t.name for t in all_targets() if precision in t.precisions and t.name != self.name]
        return f"{alternative}" + (f" or a target that has it: {', '.join(others)}" if others else "")

    def to_dict(self) -> dict:
        """JSON-ready form (manifest ``target`` section, ``edgemm targets --json``)."""
        d = asdict(self)
        d["precisions"] = list(self.precisions)
        d["tensorrt_versions"] = list(self.tensorrt_versions)
        return d


def _dla_targets() -> list[str]:
    return [t.name for t in all_targets() if t.dla_cores > 0]


# -- loading ---------------------------------------------------------------------------------------

def _profiles_dir():
    return resources.files(__name__).joinpath("profiles")


def names() -> list[str]:
    return sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


# Sizes a profile may state: the workspace is handed to TensorRT's builder, so it must be a real size.
_INT_BOUNDS = {"dla_cores": (0, 8), "memory_mb": (1, 1 << 24), "workspace_mb": (1, 1 << 24)}


def _parse(data: dict, source: str) -> TargetProfile:
    def bad(field: str, detail: str) -> InputError:
        return InputError(detail, file=source, field=field, fix="fix the profile file (see edgemm/targets/profiles)")

    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise bad(sorted(unknown)[0], f"unknown key (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    for key in _REQUIRED:
        if key not in data:
            raise bad(key, "missing key")
    types = {"name": str, "description": str, "kind": str, "backend": str, "precisions": list,
             "default_precision": str, "dla_cores": int, "sparse_tensor_cores": bool, "compute_capability": str,
             "memory_mb": int, "workspace_mb": int, "tensorrt_versions": list, "jetpack": str, "notes": str}
    for key, value in data.items():
        if not isinstance(value, types[key]) or (types[key] is int and isinstance(value, bool)):
            raise bad(key, f"must be {types[key].__name__}, got {type(value).__name__}")
        if key in _INT_BOUNDS and not _INT_BOUNDS[key][0] <= value <= _INT_BOUNDS[key][1]:
            raise bad(key, f"must be from {_INT_BOUNDS[key][0]} to {_INT_BOUNDS[key][1]}, not {str(value)[:40]}")
        if types[key] is list and not all(isinstance(v, str) and len(v) <= 64 for v in value):
            raise bad(key, "must be a list of short strings")
        if types[key] is str and len(value) > 4096:
            raise bad(key, "is longer than 4096 characters")
    profile = TargetProfile(
        name=data["name"], description=data["description"], kind=data["kind"], backend=data["backend"],
        compute_capability=data.get("compute_capability"), precisions=tuple(data["precisions"]),
        dla_cores=data["dla_cores"], memory_mb=data.get("memory_mb"), workspace_mb=data.get("workspace_mb"),
        tensorrt_versions=tuple(data.get("tensorrt_versions", ())),
        sparse_tensor_cores=data["sparse_tensor_cores"], default_precision=data["default_precision"],
        jetpack=data.get("jetpack"), notes=data.get("notes", ""))
    _check_consistency(profile, bad)
    return profile


def _check_consistency(p: TargetProfile, bad) -> None:
    """Facts that must hold for any device; a profile that breaks one is a data error."""
    if p.kind not in KINDS:
        raise bad("kind", f"{p.kind!r} is not one of {', '.join(KINDS)}")
    from ..backends import registry  # standard library only, like this module

    if p.backend not in registry.names():
        raise bad("backend", f"{p.backend!r} is not one of {', '.join(registry.names())}")
    device = registry.get(p.backend).device
    if (p.kind == "cpu") != (device == "cpu"):
        raise bad("backend", f"{p.backend} runs on {device} targets, and this one is of kind {p.kind}")
    for prec in p.precisions:
        if prec not in PRECISIONS:
            raise bad("precisions", f"unknown precision {prec!r} (known: {', '.join(PRECISIONS)})")
    if "fp32" not in p.precisions:
        raise bad("precisions", "every target runs fp32")
    if p.default_precision not in p.precisions:
        raise bad("default_precision", f"{p.default_precision!r} is not in precisions")
    if p.dla_cores < 0 or (p.dla_cores and p.kind != "jetson"):
        raise bad("dla_cores", "only Jetson modules have DLA cores")
    registry.get(p.backend).check_target(p, bad)
    if p.kind == "jetson" and not p.jetpack:
        raise bad("jetpack", "a Jetson target names the JetPack releases it was checked against")


_CACHE: dict[str, TargetProfile] = {}


MAX_PROFILE_BYTES = 1 << 20   # shipped profiles are ~1 KiB


def _load_file(path, source: str) -> TargetProfile:
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise InputError(f"is larger than {MAX_PROFILE_BYTES >> 10} KiB; not a target profile", file=source,
                             fix="pass a TOML profile like those in edgemm/targets/profiles")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read target profile ({exc})", file=source,
                         fix="pass a valid TOML profile") from exc
    except (ValueError, RecursionError) as exc:  # an integer beyond Python's digit limit; nesting too deep
        raise InputError(f"cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})", file=source,
                         fix="pass a TOML profile like those in edgemm/targets/profiles") from exc
    return _parse(data, source)


def load(name: str) -> TargetProfile:
    """A shipped profile by name, or a custom profile from a ``.toml`` path."""
    if name in _CACHE:
        return _CACHE[name]
    if name.endswith(".toml"):
        path = Path(name)
        # stat errors (a name too long, a NUL byte, a FIFO) are one InputError too, not an OSError.
        require_regular_file(path, field="--target",
                             fix="pass a shipped target name (edgemm targets) or an existing .toml profile")
        return _load_file(path, name)
    known = names()
    if name not in known:
        raise InputError(f"unknown target {name!r} (known: {', '.join(known)})", field="--target",
                         fix="run `edgemm targets` to list them, or pass a custom profile .toml")
    profile = _load_file(_profiles_dir().joinpath(f"{name}.toml"), f"targets/profiles/{name}.toml")
    if profile.name != name:
        raise InputError(f"profile says name={profile.name!r}", file=f"targets/profiles/{name}.toml",
                         field="name", fix="the name must match the file name")
    _CACHE[name] = profile
    return profile


def all_targets() -> list[TargetProfile]:
    """Every shipped profile: the host CPU first, then Jetson modules, then datacenter GPUs."""
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted((load(n) for n in names()), key=lambda t: (order[t.kind], t.cc or (0, 0), t.memory_mb or 0, t.name))
