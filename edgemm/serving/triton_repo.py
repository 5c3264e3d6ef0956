"""Export bundles as a Triton Inference Server model repository.

    REPO/edgemm-triton.json             what was exported, from which bundles (and lets --force know the folder)
    REPO/<model>/config.pbtxt           triton_config.model_config
    REPO/<model>/1/model.py             edgemm flavor: triton_model.py, copied unchanged
    REPO/<model>/1/bundle/...           edgemm flavor: the whole bundle, manifest and reports included
    REPO/<model>/1/model.onnx (+ data)  native flavor, ONNX Runtime bundles
    REPO/<model>/1/model.plan           native flavor, TensorRT engine bundles

Every bundle is checked (hashes, and the signature when keys are trusted) before a byte is copied, and
every copy is checked again in the staging folder: what lands is what was verified, never a re-export.
The repository is staged beside the destination and renamed into place (``bundle.BundleWriter``), so a
failed or killed export leaves nothing; an existing repository is replaced only with ``force``."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..backends import registry
from ..bundle import BundleWriter
from ..errors import BundleError, InputError
from ..paths import is_within
from ..runtime import parse_io, signing
from ..runtime.manifest import MANIFEST_NAME, UNHASHED, Manifest, load_manifest, safe_relpath, sha256_file
from ..runtime.atomic import write_text_atomic
from . import triton_config
from .triton_ensemble import ensemble_configs, pipeline_parts
from .triton_config import BUNDLE_FOLDER, PYTHON_MODEL_FILE, TritonOptions

REPO_MARKER = "edgemm-triton.json"
REPO_FORMAT = "edgemm-triton-repository"
VERSION = "1"
MODEL_SOURCE = Path(__file__).with_name("triton_model.py")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryWriter(BundleWriter):
    """BundleWriter for a model repository: the marker file is edgemm-triton.json, and --force replaces
    only an empty folder or a repository this exporter wrote, holding nothing but what it lists."""

    MARKER = REPO_MARKER

    def refusal(self, destination: Path) -> str | None:
        return repository_refusal(destination)


def repository_refusal(destination: Path) -> str | None:
    if destination.is_symlink() or not destination.is_dir():
        return "exists and is not a folder"
    entries = sorted(os.listdir(destination))
    if not entries:
        return None
    not_ours = "is not a model repository written by `edgemm export triton`, so --force will not delete it"
    marker = destination / REPO_MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 1 << 20:
            return not_ours
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return not_ours
    if not isinstance(info, dict) or info.get("format") != REPO_FORMAT or not isinstance(info.get("models"), dict):
        return not_ours
    written = set(info["models"])
    for entry in info["models"].values():
        if isinstance(entry, dict) and isinstance(entry.get("models"), list):
            written |= {m for m in entry["models"] if isinstance(m, str)}
    for name in entries:
        if name != REPO_MARKER and name not in written:
            return f"is an exported repository but also holds {name!r}, which it did not write, so --force will not delete it"
        if (destination / name).is_symlink():
            return f"holds a symbolic link {name!r}, so --force will not delete it"
    return None


def model_name(bundle_dir: Path) -> str:
    """The served model's name: the bundle folder's name, refused when Triton or a URL could not carry it."""
    name = Path(os.path.abspath(bundle_dir)).name
    if not _MODEL_NAME.match(name):
        raise InputError(f"{name!r} cannot name a Triton model (letters, digits, '_', '.', '-')", file=bundle_dir,
                         fix="copy or rename the bundle folder")
    return name


def export_triton(bundles: Sequence[os.PathLike], output: os.PathLike, options: TritonOptions | None = None, *,
                  force: bool = False, trusted_keys=None, say=print) -> Path:
    """Write a Triton model repository serving ``bundles`` at ``output``; returns its path."""
    options = options or TritonOptions()
    triton_config.check_options(options)
    if not bundles:
        raise InputError("no bundle given", field="BUNDLE", fix="name at least one bundle folder")
    sources = [Path(b) for b in bundles]
    names = [model_name(b) for b in sources]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InputError(f"two bundles would both be served as {name!r}", file=sources[i],
                             fix="give the bundle folders different names")
    _check_output(Path(output), sources)
    # Everything checked before anything is written: signature, hashes, IO, the config for each flavor.
    policy = signing.resolve_policy(trusted_keys, None)
    if options.require_signature and not policy.keys:
        raise InputError("a required signature needs a trusted key", field="--require-signature",
                         fix="pass --trusted-key PUB")
    plans = []   # (bundle name, source, manifest, [(served model, config, pipeline entry or None)])
    for name, source in zip(names, sources):
        signed = signing.check_bundle(source, policy)
        manifest = load_manifest(source, verify=True)
        if signed is not None:
            signing.bind_manifest(source, manifest, signed)
        if options.flavor == "native" and manifest.sections.get("variants"):
            raise InputError("holds several variants; a native model serves one model file", file=source,
                             field="variants", fix="use --flavor edgemm (the runtime picks the variant)")
        inputs, outputs = parse_io(source, manifest)
        if pipeline_parts(manifest):
            ensemble, parts = ensemble_configs(name, manifest, inputs, outputs, options, source=source,
                                               rows_mix={e["name"]: rows_mix(source, manifest, e) for e in
                                                         pipeline_parts(manifest)})
            models = [(name, ensemble, None)] + parts
        else:
            config = triton_config.model_config(name, manifest, inputs, outputs, options, source=source,
                                                lenient=len(sources) > 1, rows_mix=rows_mix(source, manifest))
            models = [(name, config, None)]
        plans.append((name, source, manifest, models))
    served = [model for *_, models in plans for model, _, _ in models]
    for i, model in enumerate(served):
        if model in served[:i]:
            raise InputError(f"two models would both be served as {model!r} (a bundle and a split bundle's part)",
                             field="BUNDLE", fix="give the bundle folders different names")
    configs = [config for *_, models in plans for _, config, _ in models if config.get("platform") != "ensemble"]
    if options.max_batch is not None and not any(config["max_batch_size"] for config in configs):
        raise InputError("none of the bundles can batch requests (an output spans the batch twice, or the batch "
                         "axis is not shared: see the notes above)", field="--max-batch", fix="leave --max-batch out")
    if (options.preferred_batch or options.max_queue_delay_us) \
            and not any("dynamic_batching" in config for config in configs):
        raise InputError("none of the bundles may have its requests merged by the dynamic batcher",
                         field="--preferred-batch/--max-queue-delay-us", fix="leave the batching flags out")
    with RepositoryWriter(Path(output), force=force, protect={"BUNDLE": sources[0]}) as writer:
        index = {}
        for name, source, manifest, models in plans:
            for model, config, entry in models:
                version = writer.stage / model / VERSION
                version.mkdir(parents=True)   # an ensemble's version folder stays empty, as Triton wants
                if config.get("platform") == "ensemble":
                    pass
                elif options.flavor == "edgemm":
                    _copy_bundle(source, manifest, version / BUNDLE_FOLDER)
                    shutil.copyfile(MODEL_SOURCE, version / PYTHON_MODEL_FILE)
                else:
                    _copy_native(source, manifest, version, entry)
                write_text_atomic(writer.stage / model / "config.pbtxt", triton_config.to_pbtxt(config))
            index[name] = {"bundle": str(source.resolve()), "manifest_sha256": sha256_file(source / MANIFEST_NAME),
                           "flavor": options.flavor, "precision": manifest.precision.label,
                           "backend": manifest.backend.name, "models": [m for m, _, _ in models]}
        info = {"format": REPO_FORMAT, "format_version": 1,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": index}
        write_text_atomic(writer.stage / REPO_MARKER, json.dumps(info, indent=2) + "\n")
        destination = writer.commit()
    for note in options.notes:
        say(f"note: {note}")
    return destination


def rows_mix(source: Path, manifest: Manifest, entry: dict | None = None) -> str | None:
    """Why a row's result depends on the other rows of its batch, or None (the backend's ``rows_mix``,
    e.g. ONNX Runtime's dynamic INT8)."""
    if entry is not None:   # a split bundle's part: its own model file
        files = [entry["backend"].get("model")] if isinstance(entry["backend"].get("model"), str) else []
    else:
        files = [rel for rel in manifest.files if rel.endswith(".onnx")]
    return registry.get(manifest.backend.name).rows_mix(
        files, lambda rel: safe_relpath(source, rel, source=str(source / MANIFEST_NAME)).read_bytes())


def _check_output(output: Path, sources: list[Path]) -> None:
    """The repository may neither hold a bundle (it would be deleted with --force) nor lie inside one
    (it would change the bundle): both refused before any work."""
    from ..bundle import check_output_location

    check_output_location(output, {f"BUNDLE {s}": s for s in sources})
    try:
        target = Path(os.path.abspath(output)).resolve()
    except (OSError, RuntimeError) as exc:
        raise InputError(f"cannot be resolved ({exc})", file=output, field="-o", fix="choose another -o") from exc
    for source in sources:
        if is_within(target, source.resolve()):
            raise InputError(f"lies inside the bundle {source}; writing there would change it", file=output,
                             field="-o", fix="write the repository outside the bundle")


def _copy_bundle(source: Path, manifest: Manifest, target: Path) -> None:
    """The bundle whole (hashed files, manifest, reports, signature), then its hashes checked again."""
    target.mkdir(parents=True)
    names = list(manifest.files) + [n for n in sorted(UNHASHED) if (source / n).is_file()]
    for rel in names:
        src = safe_relpath(source, rel, source=str(source / MANIFEST_NAME))
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    load_manifest(target, verify=True)  # the copy, not the source: what Triton will load


def _copy_native(source: Path, manifest: Manifest, version: Path, entry: dict | None = None) -> None:
    """The files the native backend reads (the backend's ``triton_files``), each checked against the
    manifest's sha256 after copying. A split bundle's part: its files flat in the version folder."""
    section = manifest.backend.section if entry is None else {**manifest.backend.section, **entry["backend"]}
    copies = registry.get(manifest.backend.name).triton_files(section, manifest.files, part=entry is not None)
    for rel, name in copies.items():
        digest = manifest.files.get(rel)
        if digest is None:
            raise BundleError(f"{rel!r} has no sha256 in the manifest", file=source / MANIFEST_NAME, field="files",
                              fix="recompile the bundle")
        dst = version / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_relpath(source, rel, source=str(source / MANIFEST_NAME)), dst)
        if sha256_file(dst) != digest:
            raise BundleError(f"{rel!r} changed while it was copied", file=source / rel, fix="export again")
