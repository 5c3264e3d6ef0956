"""The lightweight runtime: numpy + ONNX Runtime or TensorRT, never torch.

    bundle = edgemm.runtime.load("engines/my-model")
    outputs = bundle.run({"image": img, "input_ids": ids})   # dict, in the model's output order
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BundleError, DependencyError, EdgemmError, InputError
from ..iospec import (SUPPORTED_DTYPES, TensorSpec, check_feed, check_graph_values, describe_shape,
                      dynamic_batch_input)
from . import calibration_section, signing
from . import variants as _variants  # noqa: F401  (registers the "variants" manifest section)
from . import pipeline as _pipeline  # noqa: F401  (registers the "pipeline" manifest section)
from .manifest import MANIFEST_NAME, Manifest, load_manifest

__all__ = ["load", "Bundle", "MonitoredBundle", "PipelineBundle", "MonitoredPipelineBundle"]
log = logging.getLogger("edgemm")


class Bundle:
    """A loaded, hash-verified bundle. ``run`` is safe to call from several threads."""

    def __init__(self, path: Path, manifest: Manifest, session, signature=None, variant=None):
        self.path = path
        self.manifest = manifest
        self._session = session
        self.signature = signature  # the verified SignatureInfo, or None when no signature was checked
        # The variant this host runs (runtime/variants.py; None for single-variant bundles): its name,
        # why it was chosen, and a warning when the host lacks the ISA features it was measured with.
        self.variant = variant.name if variant else None
        self.variant_choice = variant
        self.inputs, self.outputs = parse_io(path, manifest)
        # The manifest's ranges are the bundle's contract on every backend (TensorRT's optimization
        # profiles need them; ONNX Runtime would run any size, but only sizes in range were promised).
        self._enforce_ranges = True
        # Rows of the embedding table each token input indexes (compile records them with --calib):
        # a call with an id outside is refused (ONNX Runtime would take -1 as the last row, silently).
        self.token_vocab = calibration_section.token_rows(self.calibration_profile)

    @property
    def precision(self) -> str:
        """"int8", or "mixed:fp32+int8" for a mixed build (the manifest holds the structured value)."""
        return self.manifest.precision.label

    @property
    def backend(self) -> str:
        """The backend that runs this bundle here (the chosen variant's, for a multi-variant bundle)."""
        return getattr(self._session, "backend", None) or self.manifest.backend.name

    def check_feeds(self, feeds: Mapping[str, np.ndarray], *, may_omit=()) -> dict[str, np.ndarray]:
        """``may_omit``: inputs that may be left out (those of a split bundle's reused branch)."""
        if not isinstance(feeds, Mapping):
            raise InputError(f"feeds must be a dict of name -> numpy array, got {type(feeds).__name__}",
                             field="feeds", fix=f"pass {{{', '.join(repr(s.name) for s in self.inputs)}}}")
        expected = [s.name for s in self.inputs]
        missing = [n for n in expected if n not in feeds and n not in may_omit]
        extra = [n for n in feeds if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unexpected {', '.join(map(repr, extra))}")
            raise InputError("; ".join(parts), field="feeds",
                             fix="the bundle takes " + ", ".join(
                                 f"{s.name}{describe_shape(s.shape)}:{s.dtype}" for s in self.inputs))
        checked = {}
        batch = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                continue
            value = feeds[spec.name]
            check_feed(spec, value, where="feeds", enforce_ranges=self._enforce_ranges)
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, str):
                    if dim in batch and batch[dim][0] != value.shape[axis]:
                        other = batch[dim][1]
                        raise InputError(f"axis {axis} ({dim}) is {value.shape[axis]} but {other!r} has "
                                         f"{batch[dim][0]}", field=spec.name,
                                         fix=f"give every input the same {dim} size")
                    batch.setdefault(dim, (value.shape[axis], spec.name))
            check_graph_values(spec, value, self.token_vocab.get(spec.name))
            checked[spec.name] = np.ascontiguousarray(value)
        return checked

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = self.check_feeds(feeds)
        outputs = self._session.run(checked)
        if len(outputs) != len(self.outputs):
            raise BundleError(f"the backend returned {len(outputs)} outputs, the manifest lists {len(self.outputs)}",
                              file=self.path / MANIFEST_NAME, field="outputs", fix="recompile the bundle")
        return {spec.name: out for spec, out in zip(self.outputs, outputs)}

    monitor = None  # a MonitoredBundle's Monitor; a plain Bundle is not monitored

    @property
    def calibration_profile(self) -> "calibration_section.CalibrationProfile | None":
        """What the calibration data looked like (compile records it), or None for bundles without one."""
        section = getattr(self.manifest, "section", None)
        return section(calibration_section.SECTION) if section is not None else None

    def stats(self) -> dict:
        raise InputError("this bundle is not monitored", field="monitor",
                         fix="load it with edgemm.runtime.load(path, monitor=True)")

    metrics_text = reset_stats = stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, backend={self.backend}, precision={self.precision})"


class MonitoredBundle(Bundle):
    """A Bundle whose ``run`` is measured (edgemm.runtime.monitor): calls, errors, batch sizes, latency
    and, against the manifest's calibration_profile, out-of-range, non-finite and unknown-token counts.
    A separate class, so that an unmonitored Bundle's ``run`` carries no monitoring code at all."""

    def __init__(self, path: Path, manifest: Manifest, session, signature=None, **monitor_options):
        super().__init__(path, manifest, session, signature)
        from .monitor import Monitor

        self.monitor = Monitor([s.name for s in self.inputs], self.calibration_profile,
                               bundle_name=manifest.name, **monitor_options)
        self._batch_input = dynamic_batch_input(self.inputs) or self.inputs[0].name
        self._plain_run = super().run

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .monitor import timed_run

        return timed_run(self.monitor, self._plain_run, feeds, self._batch_input)

    def stats(self) -> dict:
        """Calls, errors, batch sizes, latency percentiles and per-input drift figures (a fresh dict)."""
        return self.monitor.stats()

    def metrics_text(self) -> str:
        """stats() in the Prometheus text exposition format (edgemm.runtime.metrics_text)."""
        from .metrics_text import render

        return render(self.monitor.stats(), self.monitor.latency_histogram())

    def reset_stats(self) -> None:
        self.monitor.reset()


class PipelineBundle(Bundle):
    """A split bundle (``edgemm compile --split``): ``run`` runs every part and returns what the unsplit
    bundle returns; ``parts``, ``part(name).run(...)``, ``run(feeds, reuse={...})`` and ``enable_cache``
    reach the branches (edgemm/runtime/pipeline.py)."""

    @property
    def parts(self) -> list[str]:
        return list(self._session.parts)

    def part(self, name: str):
        try:
            return self._session.parts[name]
        except (KeyError, TypeError):
            raise InputError(f"no part {name!r}", field="part", fix=f"parts are {', '.join(self.parts)}") from None

    @property
    def cache(self):
        return self._session.cache

    def enable_cache(self, max_entries: int = 256, max_bytes: int = 64 << 20):
        """Keep branch outputs keyed by a hash of the branch's inputs (bounded, thread-safe); returns the
        cache (``cache.stats()``: hits, misses, entries, bytes). ``disable_cache()`` drops it."""
        from .pipeline import BranchCache

        self._session.cache = BranchCache(max_entries, max_bytes)
        return self._session.cache

    def disable_cache(self) -> None:
        self._session.cache = None

    def run(self, feeds: Mapping[str, np.ndarray], reuse: Mapping[str, dict] | None = None) -> dict[str, np.ndarray]:
        """``reuse``: part name -> what ``part(name).run`` returned; that part is not run again and its
        inputs may be left out of ``feeds``."""
        reused = self._session.check_reuse(reuse)
        optional = {s.name for s in self.inputs} - self._session.needed_inputs(reused)
        checked = self.check_feeds(feeds, may_omit=optional)
        outputs = self._session.run(checked, reused)
        return {spec.name: out for spec, out in zip(self.outputs, outputs)}

    def __repr__(self) -> str:
        return f"PipelineBundle({str(self.path)!r}, parts={self.parts}, backend={self.backend})"


class MonitoredPipelineBundle(MonitoredBundle, PipelineBundle):
    """A split bundle loaded with ``monitor=True``: monitored like any bundle and keeps ``part``,
    ``reuse`` and the branch cache (inputs left out for a reused part are simply not measured)."""

    def run(self, feeds: Mapping[str, np.ndarray], reuse: Mapping[str, dict] | None = None) -> dict[str, np.ndarray]:
        from .monitor import timed_run

        return timed_run(self.monitor, lambda f: self._plain_run(f, reuse=reuse), feeds, self._batch_input)


def parse_io(path: Path, manifest: Manifest) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest's input and output specs, refusing anything the runtime could not check feeds against."""
    source = str(path / MANIFEST_NAME)
    specs = {}
    for key in ("inputs", "outputs"):
        specs[key] = []
        for i, d in enumerate(getattr(manifest, key)):
            try:
                spec = TensorSpec.from_dict(d, source=source)
            except EdgemmError as exc:
                raise BundleError(exc.detail, file=source, field=f"{key}[{i}]", fix="recompile the bundle") from exc
            except Exception as exc:  # e.g. "ranges" of the wrong type
                raise BundleError(f"malformed tensor spec ({type(exc).__name__})", file=source,
                                  field=f"{key}[{i}]", fix="recompile the bundle") from exc
            if key == "inputs" and spec.dtype not in SUPPORTED_DTYPES:
                raise BundleError(f"unsupported dtype {spec.dtype!r}", file=source, field=f"inputs[{i}].dtype",
                                  fix="recompile the bundle")
            specs[key].append(spec)
        names = [s.name for s in specs[key]]
        if len(set(names)) != len(names):
            raise BundleError("tensor names are not unique", file=source, field=key, fix="recompile the bundle")
    return specs["inputs"], specs["outputs"]


def _choose_variant(path: Path, manifest: Manifest, wanted: str | None):
    """(manifest as the chosen variant's session sees it, Choice) for a multi-variant CPU bundle."""
    from ..hostinfo import host_isa
    from .variants import choose_variant

    source = path / MANIFEST_NAME
    variants = manifest.section("variants")
    try:
        choice = choose_variant(variants, host_isa(), wanted=wanted)
    except KeyError:
        names = ", ".join(v["name"] for v in variants)
        raise InputError(f"the bundle has no variant {wanted!r}", file=source, field="variant",
                         fix=f"use one of {names}") from None
    except LookupError as exc:
        raise DependencyError(f"no variant of this bundle can run here: {exc}", file=source, field="variants",
                              fix="pip install the backend a variant needs (e.g. 'edgemm[openvino]')") from None
    log.info("bundle %s: running variant %s (%s)", path.name, choice.name, choice.reason)
    for skipped in choice.skipped:
        log.info("bundle %s: skipped variant %s", path.name, skipped)
    if choice.warning:
        log.warning("bundle %s: %s", path.name, choice.warning)
    # The session sees the bundle as if the chosen variant were its only backend (same files and hashes).
    document = manifest.to_dict()
    document["backend"] = variants[choice.index]["backend"]
    return Manifest.from_dict(document, source=source), choice


def _route_by_batch(path: Path, manifest, choice, session, session_options):
    """(session, {batch: variant name} or None): when another variant this host supports measured >= 10%
    faster at a batch size the compile timed, calls of that size go to it (runtime/variants.py)."""
    from ..hostinfo import host_isa
    from .variants import BatchRoutedSession, batch_routes

    variants = manifest.section("variants")
    inputs, _ = parse_io(path, manifest)
    batch_input = dynamic_batch_input(inputs)
    routes = batch_routes(variants, choice.index, host_isa()) if batch_input else None
    if not routes:
        return session, None
    sessions = {choice.index: session}
    for index in set(routes.values()) - {choice.index}:
        document = manifest.to_dict()
        document["backend"] = variants[index]["backend"]
        sessions[index] = _open_session(path, Manifest.from_dict(document, source=path / MANIFEST_NAME),
                                        **session_options)
    named = {batch: variants[index]["name"] for batch, index in routes.items()}
    log.info("bundle %s: calls routed by batch size to the variant measured fastest there: %s", path.name,
             ", ".join(f"batch {b}: {n}" for b, n in named.items()))
    return BatchRoutedSession(sessions, routes, batch_input, choice.index), named


def _open_session(path: Path, manifest: Manifest, **kwargs):
    from ..backends import registry  # light: a backend's heavy imports happen inside open_session

    name = manifest.backend.name
    try:
        backend = registry.get(name)
    except InputError:
        raise BundleError(f"unknown backend {name!r}", file=path / "manifest.json", field="backend.name",
                          fix=f"use a bundle made for {' or '.join(registry.names())}, or upgrade edgemm") from None
    return backend.open_session(path, manifest, **kwargs)


def load(path: os.PathLike, *, trusted_keys=None, require_signature: bool | None = None, variant: str | None = None,
         monitor: bool = False, on_drift=None, max_out_of_range: float | None = None, window: int | None = None,
         **session_options) -> Bundle:
    """Verify the signature (when trusted keys are given), every file's hash against the manifest, then
    open the backend session.

    ``trusted_keys``: public key files or PEM bytes (default: EDGEMM_TRUSTED_KEYS); with any, the
    bundle must carry a signature (bundle.sig) made by one of them over every file. ``require_signature``
    defaults to "whenever a key is trusted"; True without keys is refused. Nothing inside the bundle
    can switch the check off.

    ``monitor=True`` returns a MonitoredBundle (``stats()``, ``metrics_text()``, ``reset_stats()``);
    ``on_drift(event)`` is then called once per ``window`` calls (default 1000) in which an input's
    out-of-range (or unknown-token) fraction passed ``max_out_of_range`` (default 0.01) or a value was
    NaN/Inf. See edgemm/runtime/monitor.py.

    A bundle with several ``variants`` (portable CPU bundles) runs the fastest one this host's ISA and
    installed packages support (``bundle.variant`` says which, and the "edgemm" logger why); ``variant``
    names one to run instead."""
    monitor_options = {k: v for k, v in (("on_drift", on_drift), ("max_out_of_range", max_out_of_range),
                                         ("window", window)) if v is not None}
    if monitor_options and not monitor:
        raise InputError(f"{', '.join(monitor_options)} given without monitor=True", field="monitor",
                         fix="pass monitor=True, or drop the monitoring options")
    if monitor:
        from .monitor import check_options

        check_options(**monitor_options)
    path = Path(path)
    # The signature, then the hashes, before the manifest is trusted or a backend reads a byte (the
    # sequence of signing.verify_before_use, spelled out so that load_manifest is this module's).
    policy = signing.resolve_policy(trusted_keys, require_signature)
    signed = signing.check_bundle(path, policy)
    manifest = load_manifest(path, verify=True)
    if signed is not None:
        signing.bind_manifest(path, manifest, signed)
    parse_io(path, manifest)  # before any backend reads a model file
    choice = routes = None
    session_manifest = manifest
    split = manifest.section("pipeline") is not None
    if manifest.section("variants"):
        session_manifest, choice = _choose_variant(path, manifest, variant)
    elif variant is not None:
        raise InputError("the bundle has a single variant", file=path / MANIFEST_NAME, field="variant",
                         fix="leave variant out")
    try:
        if split:
            from .pipeline import PipelineSession

            session = PipelineSession(path, manifest, _open_session, **session_options)
        else:
            session = _open_session(path, session_manifest, **session_options)
            if choice is not None and variant is None:
                session, routes = _route_by_batch(path, manifest, choice, session, session_options)
    except EdgemmError as exc:
        if exc.file is not None:
            raise
        # Backend errors (missing TensorRT, no engine, ...) are about this bundle: say which one.
        raise type(exc)(exc.detail, file=path / MANIFEST_NAME, field=exc.field or "backend", fix=exc.fix) from exc
    if monitor:
        monitored = MonitoredPipelineBundle if split else MonitoredBundle
        bundle = monitored(path, manifest, session, signed, **monitor_options)
    else:
        bundle = (PipelineBundle if split else Bundle)(path, manifest, session, signed)
    bundle.variant, bundle.variant_choice = (choice.name, choice) if choice else (None, None)
    bundle.variant_routes = routes   # {batch: variant} when calls go to the variant fastest at their size
    return bundle
