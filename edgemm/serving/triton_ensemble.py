"""A split bundle (``edgemm compile --split``, the manifest's ``pipeline`` section) as a Triton ensemble:
one model per part, named ``<model>.<part>``, and an ensemble ``<model>`` with the bundle's inputs and
outputs whose steps wire the interface tensors from part to part (Triton runs a step as soon as its inputs
exist, so independent branches run concurrently, each with its own instances and dynamic batcher).

Batching is decided once for the whole ensemble: Triton splits a batch along axis 0 at every step, so
either every part and the bundle batch on the same axis (the ensemble's max_batch_size is the smallest
part's) or none does (max_batch_size 0 everywhere, full dims)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath

from ..errors import InputError
from ..iospec import TensorSpec
from ..runtime.manifest import MANIFEST_NAME, Manifest
from . import triton_config
from .triton_config import TritonOptions, find_batching


def pipeline_parts(manifest: Manifest) -> list[dict] | None:
    """The parts of a split bundle in run order, or None for a single-model bundle."""
    section = manifest.section("pipeline")
    return list(section["parts"]) if section else None


def part_model_name(name: str, part: str) -> str:
    return f"{name}.{part}"


def _specs(entry: dict, key: str, source) -> list[TensorSpec]:
    return [TensorSpec.from_dict(d, source=str(source)) for d in entry[key]]


def part_manifest(manifest: Manifest, entry: dict, source) -> Manifest:
    """What triton_config reads of a part: the part's manifest (runtime.pipeline.part_manifest) named as
    its served model, its model file under its base name (native flavor copies it flat into the version
    folder)."""
    from ..runtime.pipeline import part_manifest as runtime_part_manifest

    backend = dict(entry["backend"])
    for key in ("model", "onnx"):
        if isinstance(backend.get(key), str):
            backend[key] = PurePosixPath(backend[key]).name
    part = runtime_part_manifest(manifest, {**entry, "backend": backend}, Path(source or "") / MANIFEST_NAME)
    return replace(part, name=part_model_name(manifest.name, entry["name"]))


def ensemble_configs(name: str, manifest: Manifest, inputs: list[TensorSpec], outputs: list[TensorSpec],
                     options: TritonOptions, *, source: Path, rows_mix: dict) -> tuple[dict, list[tuple[str, dict, dict]]]:
    """(the ensemble's config, [(part model name, its config, its pipeline entry)]). ``rows_mix``: part ->
    why its rows mix (see triton_repo.rows_mix), for parts whose dynamic batcher must stay off."""
    parts = pipeline_parts(manifest)
    specs = {e["name"]: (_specs(e, "inputs", source), _specs(e, "outputs", source)) for e in parts}
    checks = [find_batching(inputs, outputs)] + [find_batching(i, o) for i, o in specs.values()]
    unbatched = next((c.reason for c in checks if not c.max_batch), None)
    # the ensemble's notes say it once, for the whole model
    part_options = replace(options, notes=[], monitor=False)
    # --monitor: the model's inputs are checked where they enter, by the parts reading them (triton_model's
    # MonitoredPart); a part reading interface tensors only has nothing the calibration profile describes.
    graph_inputs = {s.name for s in inputs}
    watching = [e["name"] for e in parts if any(s["name"] in graph_inputs for s in e["inputs"])] \
        if options.monitor else []
    configs = []
    for entry in parts:
        part = entry["name"]
        config = triton_config.model_config(
            part_model_name(name, part), part_manifest(manifest, entry, source), *specs[part],
            replace(part_options, monitor=part in watching), source=source,
            lenient=True, rows_mix=rows_mix.get(part), unbatched=unbatched)
        if options.flavor == "edgemm":
            config.setdefault("parameters", []).append({"key": "edgemm.part", "value": {"string_value": part}})
        configs.append((part_model_name(name, part), config, entry))
    options.notes.extend(n for n in part_options.notes if "dynamic INT8" in n)
    if options.monitor:
        options.notes.append(f"{name}: --monitor checks the model's inputs in the parts reading them "
                             f"({', '.join(part_model_name(name, p) for p in watching)}): their metrics carry "
                             "those models' names")
    max_batch = min(config["max_batch_size"] for _, config, _ in configs)
    if unbatched:
        options.notes.append(f"{name}: max_batch_size 0 for the ensemble and its parts: {unbatched}")
    batched = max_batch > 0
    ensemble = {
        "name": name, "platform": "ensemble", "max_batch_size": max_batch,
        "version_policy": {"latest": {"num_versions": 1}},
        "input": [triton_config.tensor_entry(s, batched, source, "inputs") for s in inputs],
        "output": [triton_config.tensor_entry(s, batched, source, "outputs") for s in outputs],
        "ensemble_scheduling": {"step": [
            {"model_name": model, "model_version": -1,
             "input_map": [{"key": s["name"], "value": s["name"]} for s in entry["inputs"]],
             "output_map": [{"key": s["name"], "value": s["name"]} for s in entry["outputs"]]}
            for model, _, entry in configs]},
    }
    made = {s["name"] for _, _, entry in configs for s in entry["outputs"]}
    missing = [s.name for s in outputs if s.name not in made]
    if missing:
        raise InputError(f"no part makes the output {missing[0]!r}", file=source, field="pipeline.parts",
                         fix="recompile the bundle")
    return ensemble, configs

