"""Split bundles (``edgemm compile --split``): one model per modality branch plus the fusion head, run as
a pipeline. numpy + the backend's runtime only, never torch.

    bundle = edgemm.runtime.load("engines/clip-split")
    bundle.parts                                    # ["vision", "text", "fusion"]
    prompts = bundle.part("text").run({"input_ids": ids})   # its interface tensors (and model outputs)
    out = bundle.run({"image": img}, reuse={"text": prompts})   # the text tower is not run again
    bundle.enable_cache(max_entries=256, max_bytes=64 << 20)   # or: remember branch outputs by input hash

The manifest's ``pipeline`` section (written by ``edgemm.split``, described in docs/split.md) lists the parts
in run order, each with its inputs, outputs, the parts it runs after, its precision and placement and its
backend fields (the model or engine file); ``interface`` lists the tensors crossing a cut. Every part file
is hash-checked like any bundle file, and each part opens through the ordinary backend session.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BundleError, EdgemmError, InputError
from ..modality import FUSION
from ..precision import label_of
from ..iospec import TensorSpec, check_array_against_spec, check_feed, check_graph_values, describe_shape
from . import calibration_section
from .manifest import BACKEND_FIELD_TYPES, MANIFEST_NAME, register_section

__all__ = ["PipelineSession", "PipelinePart", "BranchCache", "check_pipeline_section", "PIPELINE_FORMAT"]

PIPELINE_FORMAT = "edgemm-pipeline"
PIPELINE_VERSION = 1


class BranchCache:
    """Branch outputs keyed by a hash of the branch's inputs; bounded by entries and bytes (least recently
    used goes first), safe to share between threads. ``hits``/``misses`` count lookups."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 64 << 20):
        for name, value, example in (("max_entries", max_entries, "256"), ("max_bytes", max_bytes, "64 << 20")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"must be a positive integer, not {value!r}", field=name, fix=f"e.g. {name}={example}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(part: str, feeds: Mapping[str, np.ndarray]) -> str:
        h = hashlib.sha256(part.encode())
        for name in sorted(feeds):
            arr = np.ascontiguousarray(feeds[name])
            h.update(f"\0{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
            h.update(arr.data)
        return h.hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return dict(item[0])

    def put(self, key: str, outputs: Mapping[str, np.ndarray]) -> None:
        size = sum(int(v.nbytes) for v in outputs.values())
        if size > self.max_bytes:
            return  # larger than the whole cache: never kept
        frozen = {}
        for name, value in outputs.items():
            value = np.array(value, copy=True)
            value.flags.writeable = False   # callers share the cached arrays: nobody may change them
            frozen[name] = value
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (frozen, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._items), "bytes": self._bytes,
                    "max_entries": self.max_entries, "max_bytes": self.max_bytes}


class PipelinePart:
    """One part of a split bundle: ``run(feeds)`` returns its outputs (model outputs it makes and the
    interface tensors it sends), keyed by name."""

    def __init__(self, pipeline: "PipelineSession", entry: dict, session, inputs, outputs):
        self._pipeline = pipeline
        self.name: str = entry["name"]
        self.after: list[str] = list(entry.get("after", []))
        self.precision = label_of(entry.get("precision"))   # "int8", "mixed:fp32+int8" (edgemm/precision.py)
        self.placement = entry.get("placement")
        self.inputs: list[TensorSpec] = inputs
        self.outputs: list[TensorSpec] = outputs
        self._session = session

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._pipeline.run_part(self, feeds)

    def __repr__(self) -> str:
        return f"PipelinePart({self.name!r}, inputs={[s.name for s in self.inputs]}, " \
               f"outputs={[s.name for s in self.outputs]})"


class PipelineSession:
    """Runs the parts of a split bundle in order; independent parts run concurrently when the compile
    measured that faster (``pipeline.concurrent``), or as ``concurrent=True/False`` says."""

    def __init__(self, bundle_dir: Path, manifest: dict, open_session, *, concurrent: bool | None = None,
                 **session_options):
        self.path = bundle_dir
        section = check_pipeline_section(manifest, bundle_dir)
        self.graph_inputs = {d["name"]: TensorSpec.from_dict(d) for d in manifest.inputs}
        self.token_vocab = calibration_section.token_rows(manifest.section(calibration_section.SECTION))
        self.output_names = [d["name"] for d in manifest.outputs]
        self.parts: dict[str, PipelinePart] = {}
        for index, entry in enumerate(section["parts"]):
            sub = part_manifest(manifest, entry, bundle_dir / MANIFEST_NAME)
            try:
                session = open_session(bundle_dir, sub, **session_options)
            except EdgemmError as exc:   # the part's session sees its entry as a whole manifest: say which part
                field = f"pipeline.parts[{index}]" + (f".{exc.field}" if exc.field else "")
                raise type(exc)(exc.detail, file=exc.file, field=field, fix=exc.fix) from exc
            inputs = [TensorSpec.from_dict(d, source=str(bundle_dir / MANIFEST_NAME)) for d in entry["inputs"]]
            outputs = [TensorSpec.from_dict(d, source=str(bundle_dir / MANIFEST_NAME)) for d in entry["outputs"]]
            self.parts[entry["name"]] = PipelinePart(self, entry, session, inputs, outputs)
        # What runs the parts (reports name it as for an unsplit bundle), "a+b" when parts run on several.
        names = dict.fromkeys(getattr(p._session, "backend", None) or manifest.backend.name
                              for p in self.parts.values())
        self.backend = "+".join(names)
        self.concurrent = bool(section.get("concurrent", False)) if concurrent is None else bool(concurrent)
        self.levels = _levels(self.parts)
        self.cache: BranchCache | None = None
        width = max(len(level) for level in self.levels)
        self._pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="edgemm-part") if width > 1 else None

    # --- one part -------------------------------------------------------------------------------------------
    def run_part(self, part: PipelinePart, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError(f"feeds must be a dict of name -> numpy array, got {type(feeds).__name__}",
                             field="feeds", fix=f"pass {{{', '.join(repr(s.name) for s in part.inputs)}}}")
        missing = [s.name for s in part.inputs if s.name not in feeds]
        if missing:
            raise InputError(f"part {part.name} needs {', '.join(map(repr, missing))}", field="feeds",
                             fix="part " + part.name + " takes " + ", ".join(
                                 f"{s.name}{describe_shape(s.shape)}:{s.dtype}" for s in part.inputs))
        checked = {}
        for spec in part.inputs:
            value = feeds[spec.name]
            # Graph inputs keep the bundle's contract (ranges); interface tensors only dtype and rank/dims.
            own = self.graph_inputs.get(spec.name)
            check_feed(own or spec, value, where=f"feeds of part {part.name}", enforce_ranges=own is not None)
            if own is not None:   # the checks Bundle.run makes, so a part called alone is no way around them
                check_graph_values(own, value, self.token_vocab.get(spec.name))
            checked[spec.name] = np.ascontiguousarray(value)
        cache = self.cache if part.name != FUSION else None   # towers: what is worth keeping
        key = cache.key(part.name, checked) if cache is not None else None
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                return hit
        outs = part._session.run(checked)
        if len(outs) != len(part.outputs):
            raise BundleError(f"part {part.name} returned {len(outs)} outputs, the manifest lists {len(part.outputs)}",
                              file=self.path / MANIFEST_NAME, field="pipeline.parts", fix="recompile the bundle")
        result = {spec.name: out for spec, out in zip(part.outputs, outs)}
        if key is not None:
            cache.put(key, result)
        return result

    # --- the whole pipeline ---------------------------------------------------------------------------------
    def needed_inputs(self, skip) -> set[str]:
        return {s.name for p in self.parts.values() if p.name not in skip for s in p.inputs
                if s.name in self.graph_inputs}

    def check_reuse(self, reuse: Mapping | None) -> dict[str, dict]:
        if not reuse:
            return {}
        if not isinstance(reuse, Mapping):
            raise InputError(f"reuse must map part names to their outputs, got {type(reuse).__name__}", field="reuse",
                             fix='e.g. reuse={"text": bundle.part("text").run(...)}')
        out = {}
        for name, given in reuse.items():
            part = self.parts.get(name)
            if part is None:
                raise InputError(f"no part {name!r}", field="reuse", fix=f"parts are {', '.join(self.parts)}")
            if not isinstance(given, Mapping):
                raise InputError(f"must be the dict part({name!r}).run(...) returned", field=f"reuse.{name}",
                                 fix=f'pass reuse={{"{name}": bundle.part("{name}").run(feeds)}}')
            missing = [s.name for s in part.outputs if s.name not in given]
            if missing:
                raise InputError(f"lacks {', '.join(map(repr, missing))}", field=f"reuse.{name}",
                                 fix=f'pass the whole dict part("{name}").run(...) returned')
            for spec in part.outputs:
                value = given[spec.name]
                if not isinstance(value, np.ndarray):
                    raise InputError(f"expected a numpy array, got {type(value).__name__}",
                                     field=f"reuse.{name}.{spec.name}", fix="pass the arrays part.run returned")
                check_array_against_spec(spec, value, where=f"reuse.{name}")
            out[name] = {s.name: given[s.name] for s in part.outputs}
        return out

    def run(self, feeds: Mapping[str, np.ndarray], reuse: Mapping[str, dict] | None = None) -> list[np.ndarray]:
        """The model's outputs in manifest order; ``feeds`` already checked against the bundle's inputs."""
        env: dict[str, np.ndarray] = dict(feeds)
        for outputs in (reuse or {}).values():
            env.update(outputs)
        for level in self.levels:
            todo = [p for p in level if p.name not in (reuse or {})]
            if self.concurrent and self._pool is not None and len(todo) > 1:
                futures = [self._pool.submit(_run_beside_reused, p, env, reuse or {}) for p in todo]
                results = [f.result() for f in futures]
            else:
                results = [_run_beside_reused(p, env, reuse or {}) for p in todo]
            for result in results:
                env.update(result)
        return [env[name] for name in self.output_names]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _run_beside_reused(part: PipelinePart, env: Mapping[str, np.ndarray], reuse: Mapping[str, dict]) -> dict:
    """Run ``part`` on its inputs from ``env``; if it fails while reading outputs given in ``reuse``, say so. Reused outputs may
    legitimately have their own batch (24 cached prompts scored against 1 image), so their shapes are not
    refused up front: only a part that cannot combine them with the fresh inputs is (it raised the
    backend's raw error, e.g. ONNX Runtime's Concat shape mismatch)."""
    feeds = {s.name: env[s.name] for s in part.inputs}
    try:
        return part.run(feeds)
    except Exception as exc:  # the backend's error (already an InputError naming 'feeds', or raw)
        reused = {name: outputs for name, outputs in reuse.items()
                  if any(s.name in outputs for s in part.inputs)}
        if not reused:
            raise
        given = "; ".join(f"{name}: " + ", ".join(f"{t} {describe_shape(outputs[t].shape)}" for t in outputs
                                                     if t in feeds) for name, outputs in reused.items())
        fresh = ", ".join(f"{t} {describe_shape(v.shape)}" for t, v in feeds.items()
                          if not any(t in outputs for outputs in reused.values()))
        text = (exc.detail if isinstance(exc, EdgemmError) else str(exc)).strip()
        first = text.splitlines()[0][:240] if text else type(exc).__name__
        raise InputError(f"part {part.name!r} could not combine the reused outputs ({given}) with its other "
                         f"inputs ({fresh}): {first}", field=f"reuse.{next(iter(reused))}",
                         fix="reuse outputs computed for a batch this part can combine with the feeds "
                             "(usually the same samples), or run without reuse") from exc


def _levels(parts: Mapping[str, PipelinePart]) -> list[list[PipelinePart]]:
    """Parts grouped into waves: each wave's parts read only earlier waves (and may run together)."""
    done: set[str] = set()
    levels = []
    left = list(parts.values())
    while left:
        wave = [p for p in left if all(d in done for d in p.after)]
        if not wave:  # check_pipeline_section refuses cycles; kept as a guard
            raise BundleError("the parts' order has a cycle", field="pipeline.parts", fix="recompile the bundle")
        levels.append(wave)
        done |= {p.name for p in wave}
        left = [p for p in left if p.name not in done]
    return levels


def parse_pipeline(section, bad) -> dict:
    """The ``pipeline`` section's structure (registered with the manifest: checked when any bundle loads).
    ``bad(what, field)`` makes the one-line BundleError."""
    if not isinstance(section, dict):
        raise bad("must be an object")
    if section.get("format") != PIPELINE_FORMAT:
        raise bad(f"format must be {PIPELINE_FORMAT!r}", "format")
    version = section.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PIPELINE_VERSION:
        raise bad(f"version {version!r} is not supported by this edgemm (reads 1..{PIPELINE_VERSION})", "version")
    parts = section.get("parts")
    if not isinstance(parts, list) or not parts:
        raise bad("must be a non-empty list", "parts")
    names: list[str] = []
    for i, entry in enumerate(parts):
        where = f"parts[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad("must be an object with a name", where)
        if entry["name"] in names:
            raise bad(f"part {entry['name']!r} is listed twice", where)
        for key in ("inputs", "outputs"):
            specs = entry.get(key)
            if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                                   for s in specs):
                raise bad("must be a non-empty list of tensor specs", f"{where}.{key}")
            for j, spec in enumerate(specs):   # the sessions read dtype and shape of each
                try:
                    TensorSpec.from_dict(spec)
                except InputError as exc:
                    raise bad(exc.detail, f"{where}.{key}[{j}]") from exc
        after = entry.get("after", [])
        if not isinstance(after, list) or not all(a in names for a in after):
            raise bad("must name parts listed before it (the run order)", f"{where}.after")
        if not isinstance(entry.get("backend"), dict):
            raise bad("must be an object (the part's model or engine file)", f"{where}.backend")
        for key, kind in BACKEND_FIELD_TYPES.items():
            value = entry["backend"].get(key)
            if value is not None and not isinstance(value, kind):
                raise bad(f"must be a {kind.__name__}, not {type(value).__name__}", f"{where}.backend.{key}")
        names.append(entry["name"])
    if not isinstance(section.get("concurrent", False), bool):
        raise bad("must be true or false", "concurrent")
    return section


# Critical: a reader that ignored it would find no model to run (manifest format 2 "requires" it).
register_section("pipeline", parse_pipeline, critical=True)


def check_pipeline_section(manifest, bundle_dir: Path) -> dict:
    """The parsed ``pipeline`` section, with its parts linked to the bundle's IO: every part reads only the
    bundle's inputs and what the parts it runs after (``after``, followed through) make, and some part makes
    every output. Not list order: the runtime runs a part as soon as its ``after`` parts are done, beside
    any other part, so reading from one not named there raced (KeyError, found by fuzzing)."""
    source = bundle_dir / MANIFEST_NAME

    def bad(what: str, field: str) -> BundleError:
        return BundleError(what, file=source, field=field, fix="recompile the bundle; never edit a manifest by hand")

    section = manifest.section("pipeline")
    inputs = {d["name"] for d in manifest.inputs}
    made: set[str] = set()
    ready: dict[str, set[str]] = {}   # part -> what is there when it has run (its own and its after parts')
    for i, entry in enumerate(section["parts"]):
        before = set().union(*(ready[name] for name in entry.get("after", [])))
        unmade = [s["name"] for s in entry["inputs"] if s["name"] not in inputs | before]
        if unmade:
            raise bad(f"reads {unmade[0]!r}, which no input or part it runs after makes",
                      f"pipeline.parts[{i}].inputs")
        ready[entry["name"]] = before | {s["name"] for s in entry["outputs"]}
        made |= ready[entry["name"]]
    missing = [d["name"] for d in manifest.outputs if d["name"] not in made]
    if missing:
        raise bad(f"no part makes the output {missing[0]!r}", "pipeline.parts")
    return section


def part_manifest(manifest, entry: dict, source: Path):
    """The manifest a part's backend session sees: the bundle's, with the part's IO and backend fields
    (same files and hashes), without the sections that describe the whole model."""
    from .manifest import Manifest

    document = manifest.to_dict()
    keep = ("format", "format_version", "name", "precision", "target", "files", "created", "versions", "host")
    part = {k: document[k] for k in keep if k in document}
    part.update(inputs=entry["inputs"], outputs=entry["outputs"], backend={**document["backend"], **entry["backend"]})
    return Manifest.from_dict(part, source=source)
