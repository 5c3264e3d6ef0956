"""The bundle manifest: a typed, versioned ``Manifest``, validated once on load. Standard library only
(runs on devices). A bundle's files (hashes, safe paths, the file check) are in bundle_files.py."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import precision as precision_vocabulary
from ..errors import BundleError
from .atomic import create_temp_beside, write_bytes_atomic, write_json_atomic  # noqa: F401 (re-exported)
from .bundle_files import (MANIFEST_NAME, MAX_MANIFEST_BYTES, UNHASHED, read_manifest_text, safe_relpath,  # noqa: F401
                           sha256_file, sha256_files, verify_files as _verify_listed_files)

FORMAT = "edgemm-bundle"
FORMAT_VERSION = 2   # the history is written above Manifest below
REQUIRED_KEYS = ("format", "format_version", "name", "inputs", "outputs", "precision", "target", "backend",
                 "files")
# Types of the backend fields the sessions read (checked here once, so no session trips over them).
BACKEND_FIELD_TYPES = {"model": str, "onnx": str, "engine": str, "built": dict, "options": dict, "providers": list,
                       "build_script": str, "disabled_optimizers": list, "weights": str, "inference_precision": str}


def read_manifest(bundle_dir: os.PathLike) -> "Manifest":
    """Parse manifest.json and validate it once, into a typed ``Manifest`` (no hash check)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError("not a bundle directory", file=bundle_dir,
                          fix="pass the folder `edgemm compile` wrote (e.g. engines/<name>)")
    text = read_manifest_text(path, bundle_dir)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"invalid JSON ({exc.msg})", file=path, field=f"line {exc.lineno} column {exc.colno}",
                          fix="recompile the bundle") from exc
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer longer than Python's digit limit; RecursionError: deep nesting
        raise BundleError(f"cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})", file=path,
                          fix="recompile the bundle") from exc
    return Manifest.from_dict(document, source=path)


# -- the typed manifest ------------------------------------------------------------------------------------
#
# Format versions (a reader reads every version up to FORMAT_VERSION; tests/unit/fixtures/ keeps a v1 one):
#   1  the first bundles: the core sections below; unknown top-level keys were ignored.
#   2  adds "requires": the names of sections a reader must understand to run the bundle (a split
#      pipeline, CPU variants with ISA requirements). A v1 reader would silently ignore such a section
#      and run the bundle wrongly; the version bump makes it refuse instead, and a v2 reader refuses a
#      bundle whose required section it does not know ("upgrade edgemm"). precision.mode of a mixed build
#      is "mixed" with precisions/per_branch beside it (edgemm.precision), no longer "mixed:fp32+int8".
#
# Adding a section (calibration_profile, pipeline, variants, ...): write a torch-free parser
# ``parse(value, bad) -> typed object`` that raises ``bad(what, field)`` on a malformed value, and call
# ``register_section(name, parse, critical=...)`` in a module the readers import (for a section the
# runtime needs, a module under edgemm/runtime/ that edgemm.runtime imports). ``critical=True`` when a
# reader that ignored the section would run the bundle wrongly: the writer then lists it in "requires".
# Read it back with ``manifest.section(name)`` (the parsed object). A section nobody registered is kept
# as is and written back unchanged by ``to_dict()`` (refit/build rewrite manifests they do not fully know).


@dataclass(frozen=True)
class SectionType:
    name: str
    parse: Callable[[Any, Callable[..., BundleError]], Any]
    critical: bool = False


_SECTIONS: dict[str, SectionType] = {}


def register_section(name: str, parse: Callable[[Any, Callable[..., BundleError]], Any], *,
                     critical: bool = False) -> None:
    """Declare a named optional manifest section (see the note above). Registering a name twice with
    another parser is a programming error (two owners of one section)."""
    if name in CORE_KEYS:
        raise ValueError(f"{name!r} is a core manifest key, not an extension section")
    known = _SECTIONS.get(name)
    if known is not None and (known.parse is not parse or known.critical != critical):
        raise ValueError(f"manifest section {name!r} is already registered")
    _SECTIONS[name] = SectionType(name, parse, critical)


def registered_sections() -> dict[str, SectionType]:
    return dict(_SECTIONS)


@dataclass(frozen=True)
class SourceInfo:
    path: str | None = None
    format: str | None = None
    sha256: str | None = None
    notes: tuple = ()


@dataclass(frozen=True)
class PrecisionInfo:
    """The precision section. ``mode`` as written: "int8", or (format 2) "mixed" with ``precisions`` and
    ``per_branch`` beside it; format-1 bundles wrote "mixed:fp32+int8". edgemm.precision owns the
    vocabulary: ``label`` is its one word for reports, ``value`` its ``Precision`` (raises on a mode this
    edgemm does not know; the runtime never needs it)."""
    mode: Any
    recipe: Mapping = field(default_factory=dict)
    notes: tuple = ()
    simulated_accuracy: Any = None
    exclusions: Any = None
    section: Mapping = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return str(precision_vocabulary.label_of(dict(self.section)))

    @property
    def value(self) -> "precision_vocabulary.Precision":
        return precision_vocabulary.parse(dict(self.section))


@dataclass(frozen=True)
class TargetInfo:
    name: str | None = None
    kind: str | None = None
    backend: str | None = None
    compute_capability: str | None = None


@dataclass(frozen=True)
class BackendInfo:
    """The fields every session reads, typed; backend-specific ones (TensorRT's portable, build_config,
    ...) through ``get``. ``section`` is the backend object as written."""
    name: str
    model: str | None = None
    onnx: str | None = None
    engine: str | None = None
    built: Mapping | None = None
    options: Mapping | None = None
    providers: tuple | None = None
    build_script: str | None = None
    disabled_optimizers: tuple | None = None
    section: Mapping = field(default_factory=dict, repr=False, compare=False)

    def get(self, key: str, default=None):
        return self.section.get(key, default)

    @property
    def model_file(self) -> str | None:
        """The ONNX file the bundle runs or builds from (ORT bundles name it ``model``, TensorRT ``onnx``)."""
        return self.onnx or self.model


@dataclass(frozen=True)
class TaskInfo:
    metric: str
    outputs: tuple[str, ...]


# The top-level keys this module types; anything else is a named section (registered or kept as is).
CORE_KEYS = frozenset(REQUIRED_KEYS) | {"created", "requires", "source", "calibration", "export", "prune", "task",
                                        "output_heads", "versions", "host"}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest, validated once on load (``from_dict``). Read its fields as attributes; write
    one with ``to_dict()`` (the document as read: unknown sections and the format version preserved)."""
    format_version: int
    name: str
    inputs: tuple[Mapping, ...]       # TensorSpec dicts (edgemm.runtime.parse_io turns them into specs)
    outputs: tuple[Mapping, ...]
    precision: PrecisionInfo
    target: TargetInfo
    backend: BackendInfo
    files: Mapping[str, str]
    created: str | None = None
    requires: tuple[str, ...] = ()
    source: SourceInfo | None = None
    task: TaskInfo | None = None
    calibration: Mapping | None = None
    export: Mapping | None = None
    prune: Mapping | None = None
    output_heads: Any = None
    versions: Mapping = field(default_factory=dict)
    host: Mapping = field(default_factory=dict)
    sections: Mapping[str, Any] = field(default_factory=dict)   # other named sections, as written
    _document: dict = field(default_factory=dict, repr=False, compare=False)
    _parsed: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_names(self) -> list[str]:
        return [d["name"] for d in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [d["name"] for d in self.outputs]

    def section(self, name: str, default=None):
        """A named section: the parsed object when its type is registered, else the value as written."""
        if name not in self.sections:
            return default
        kind = _SECTIONS.get(name)
        if kind is None:
            return self.sections[name]
        if name not in self._parsed:   # registered after this manifest was read
            self._parsed[name] = _parse_section(kind, self.sections[name], None)
        return self._parsed[name]

    def to_dict(self) -> dict:
        """The document (a deep copy): what ``write_json_atomic`` writes back."""
        return copy.deepcopy(self._document)

    # Transitional: mapping-style reads (manifest["backend"]) for code not yet moved to the attributes.
    # (copies, so that no caller edits the validated document in place: edit ``to_dict()`` instead)
    def __getitem__(self, key: str):
        return copy.deepcopy(self._document[key])

    def get(self, key: str, default=None):
        return copy.deepcopy(self._document.get(key, default))

    def __contains__(self, key: str) -> bool:
        return key in self._document

    @classmethod
    def from_dict(cls, document: Any, *, source: os.PathLike | str = MANIFEST_NAME) -> "Manifest":
        return _parse_manifest(document, Path(source))

    @classmethod
    def of(cls, value: Any, *, source: os.PathLike | str = MANIFEST_NAME) -> "Manifest":
        """``value`` when it is a Manifest already, else the document validated (a session opened by hand)."""
        return value if isinstance(value, Manifest) else cls.from_dict(value, source=source)


def _parse_section(kind: SectionType, value: Any, path: Path | None) -> Any:
    def bad(what: str, field: str | None = None) -> BundleError:
        return BundleError(what, file=path, field=f"{kind.name}.{field}" if field else kind.name,
                           fix="recompile the bundle; never edit a manifest by hand")
    return kind.parse(value, bad)


def _parse_manifest(document: Any, path: Path) -> Manifest:
    if not isinstance(document, dict):
        raise BundleError("top level is not an object", file=path, fix="recompile the bundle")
    manifest = document
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise BundleError("missing key", file=path, field=key, fix="recompile the bundle")
    if manifest["format"] != FORMAT:
        raise BundleError(f"format is {manifest['format']!r}, expected {FORMAT!r}", file=path, field="format",
                          fix="pass an edgemm bundle")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise BundleError(f"format_version {version!r} is not supported by this edgemm (reads 1..{FORMAT_VERSION})",
                          file=path, field="format_version", fix="upgrade edgemm or recompile the bundle")
    files = manifest["files"]
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
        raise BundleError("must map relative paths to sha256 hex digests", file=path, field="files",
                          fix="recompile the bundle")
    for key in ("inputs", "outputs"):
        if not isinstance(manifest[key], list) or not manifest[key]:
            raise BundleError("must be a non-empty list", file=path, field=key, fix="recompile the bundle")
    for key in ("precision", "target", "backend"):
        if not isinstance(manifest[key], dict):
            raise BundleError("must be an object", file=path, field=key, fix="recompile the bundle")
    if not isinstance(manifest["backend"].get("name"), str):
        raise BundleError("missing backend name", file=path, field="backend.name", fix="recompile the bundle")
    _check_backend(manifest["backend"], "backend", path)
    _check_sections(manifest, path)
    requires = _check_requires(manifest, version, path)
    sections = {k: v for k, v in manifest.items() if k not in CORE_KEYS}
    parsed = {name: _parse_section(_SECTIONS[name], value, path) for name, value in sections.items()
              if name in _SECTIONS}
    document = copy.deepcopy(manifest)
    return _build(document, version, requires, sections, parsed)


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _build(doc: dict, version: int, requires: tuple, sections: dict, parsed: dict) -> Manifest:
    """The typed view of a validated document (the checks above made every field safe to read)."""
    backend, precision, target = doc["backend"], doc["precision"], doc["target"]
    source = doc.get("source") if isinstance(doc.get("source"), dict) else None
    notes = precision.get("notes")
    task = doc.get("task")
    return Manifest(
        format_version=version, name=doc["name"], inputs=tuple(doc["inputs"]), outputs=tuple(doc["outputs"]),
        precision=PrecisionInfo(
            mode=precision.get("mode"), recipe=precision.get("recipe") if isinstance(precision.get("recipe"), dict)
            else {}, notes=tuple(notes) if isinstance(notes, list) else (),
            simulated_accuracy=precision.get("simulated_accuracy"), exclusions=precision.get("exclusions"),
            section=precision),
        target=TargetInfo(**{k: _optional_str(target.get(k)) for k in ("name", "kind", "backend")},
                          compute_capability=target.get("compute_capability")),
        backend=BackendInfo(
            name=backend["name"], model=backend.get("model"), onnx=backend.get("onnx"), engine=backend.get("engine"),
            built=backend.get("built"), options=backend.get("options"),
            providers=None if backend.get("providers") is None else tuple(backend["providers"]),
            build_script=backend.get("build_script"),
            disabled_optimizers=None if backend.get("disabled_optimizers") is None
            else tuple(backend["disabled_optimizers"]), section=backend),
        files=doc["files"], created=_optional_str(doc.get("created")), requires=requires,
        source=None if source is None else SourceInfo(
            path=_optional_str(source.get("path")), format=_optional_str(source.get("format")),
            sha256=_optional_str(source.get("sha256")),
            notes=tuple(source["notes"]) if isinstance(source.get("notes"), list) else ()),
        task=None if task is None else TaskInfo(task["metric"], tuple(task["outputs"])),
        calibration=doc.get("calibration") if isinstance(doc.get("calibration"), dict) else None,
        export=doc.get("export") if isinstance(doc.get("export"), dict) else None,
        prune=doc.get("prune"), output_heads=doc.get("output_heads"),
        versions=doc.get("versions") if isinstance(doc.get("versions"), dict) else {},
        host=doc.get("host") if isinstance(doc.get("host"), dict) else {},
        sections={k: doc[k] for k in sections}, _document=doc, _parsed=dict(parsed))


def _check_requires(manifest: dict, version: int, path: Path) -> tuple[str, ...]:
    """v2's "requires": every named section must be present and understood by this edgemm."""
    requires = manifest.get("requires")
    if requires is None:
        return ()
    if version < 2 or not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise BundleError("must be a list of section names (format_version 2 and later)", file=path,
                          field="requires", fix="recompile the bundle; never edit a manifest by hand")
    for name in requires:
        if name not in manifest:
            raise BundleError(f"names section {name!r}, which the manifest does not have", file=path,
                              field="requires", fix="recompile the bundle")
        if name not in CORE_KEYS and name not in _SECTIONS:
            raise BundleError(f"the bundle needs manifest section {name!r}, which this edgemm does not know",
                              file=path, field=name, fix="upgrade edgemm to run this bundle")
    return tuple(requires)


def manifest_document(manifest: dict) -> dict:
    """A manifest being written: the format, version and "requires" (the critical sections it holds) added
    in front, then validated as a reader will (a writer bug fails the compile, not the device)."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           **{k: v for k, v in manifest.items() if k not in ("format", "format_version", "requires")}}
    critical = sorted(k for k in doc if k in _SECTIONS and _SECTIONS[k].critical)
    if critical:
        doc["requires"] = critical
    return doc


def _check_backend(section: dict, field: str, path: Path) -> None:
    if not isinstance(section.get("name"), str):
        raise BundleError("missing backend name", file=path, field=f"{field}.name", fix="recompile the bundle")
    for key, kind in BACKEND_FIELD_TYPES.items():
        value = section.get(key)
        if value is not None and not isinstance(value, kind):
            raise BundleError(f"must be a {kind.__name__}, not {type(value).__name__}", file=path,
                              field=f"{field}.{key}", fix="recompile the bundle")


# The optional sections verify and the reports read, field by field: (type, required). "number" is a finite
# int or float, "count" an int >= 0; a dict value is a nested section, a 1-tuple (spec,) a map of names to it.
_NUMBER_OR_NULL = ("number", False)
_PRUNE_SPEC = {
    "comparison": ({
        "branches": (({"params_before": ("number", True), "params_after": ("number", True),
                       "flops_before": ("number", True), "flops_after": ("number", True),
                       "ms_before": _NUMBER_OR_NULL, "ms_after": _NUMBER_OR_NULL},), False),
        "latency": ({"batch": ("count", False), "total_ms_before": ("number", True),
                     "total_ms_after": ("number", True)}, False),
        "onnx_latency": ({"note": ("str", False), "device": ("str", False),
                          "batches": (({"ms_before": ("number", True), "ms_after": ("number", True),
                                        "ratio": ("number", True)},), False)}, False),
        "task": ({"metric": ("str", True), "samples": ("count", True), "before": ("number", True),
                  "after": ("number", True), "drop": ("number", True)}, False),
    }, False),
}


def _check_value(value, spec, field: str, path: Path) -> None:
    def bad(what: str) -> BundleError:
        return BundleError(what, file=path, field=field, fix="recompile the bundle; never edit a manifest by hand")

    if isinstance(spec, tuple):  # a map of names to entries of spec[0]
        if not isinstance(value, dict):
            raise bad(f"must be an object, not {type(value).__name__}")
        for key, item in value.items():
            _check_value(item, spec[0], f"{field}.{key}", path)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise bad(f"must be an object, not {type(value).__name__}")
        for key, (kind, required) in spec.items():
            if value.get(key) is None:
                if required:
                    raise bad(f"{key!r} is missing")
                continue
            _check_value(value[key], kind, f"{field}.{key}", path)
    elif spec == "str":
        if not isinstance(value, str):
            raise bad(f"must be a string, not {type(value).__name__}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (spec == "count" and (not isinstance(value, int) or value < 0)):
            raise bad(f"must be {'a count' if spec == 'count' else 'a finite number'}, not {str(value)[:40]!r}")


def _check_sections(manifest: dict, path: Path) -> None:
    """``task`` and ``prune`` checked in depth (verify and the reports read them), naming the field."""
    task = manifest.get("task")
    if task is not None:
        if not isinstance(task, dict) or not isinstance(task.get("metric"), str):
            raise BundleError("must be an object with a metric name", file=path, field="task",
                              fix="recompile the bundle; never edit a manifest by hand")
        names = {o.get("name") for o in manifest["outputs"] if isinstance(o, dict)}
        outs = task.get("outputs")
        if not isinstance(outs, list) or not outs or not all(isinstance(o, str) and o in names for o in outs):
            raise BundleError(f"must list outputs of the bundle, not {str(outs)[:60]}", file=path,
                              field="task.outputs", fix="recompile the bundle; never edit a manifest by hand")
    prune = manifest.get("prune")
    if prune is not None:
        _check_value(prune, _PRUNE_SPEC, "prune", path)


def load_manifest(bundle_dir: os.PathLike, *, verify: bool = True) -> Manifest:
    manifest = read_manifest(bundle_dir)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def verify_files(bundle_dir: os.PathLike, manifest: Manifest) -> None:
    """Every listed file exists with its hash; no unlisted file sits in the bundle."""
    _verify_listed_files(bundle_dir, manifest.files)
