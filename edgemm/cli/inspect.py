"""`edgemm inspect`: IO, precision, sizes and op counts of a bundle or a model file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from .options import signature_options, trust_options, verbose_option


def onnx_op_counts(path: Path) -> dict[str, int] | None:
    try:
        import onnx
    except ImportError:  # devices may run without the onnx package
        return None
    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(n.op_type for n in model.graph.node)
    for fn in model.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(counts.most_common())


def inspect_bundle(path: Path, trusted_keys=None, require_signature: bool | None = None) -> dict:
    from ..errors import BundleError
    from ..runtime import parse_io, signing
    from ..runtime.manifest import MANIFEST_NAME, safe_relpath

    # The signature (when keys are trusted) and every file's hash; every listed path stays inside the bundle.
    manifest, checked = signing.verify_before_use(path, trusted_keys, require_signature, note=False)
    source = str(path / MANIFEST_NAME)
    parse_io(path, manifest)   # malformed inputs/outputs: the runtime's one-line BundleError
    recipe = manifest.precision.section.get("recipe", {})
    if not isinstance(recipe, dict):
        raise BundleError(f"must be an object, not {type(recipe).__name__}", file=source, field="precision.recipe",
                          fix="recompile the bundle")
    files = {rel: (path / rel).stat().st_size for rel in manifest.files}
    info = {"kind": "bundle", "path": str(path), "name": manifest.name, "inputs": list(manifest.inputs),
            "outputs": list(manifest.outputs), "precision": manifest.precision.label,
            "recipe": recipe.get("name"),
            "target": manifest.target.name, "backend": dict(manifest.backend.section),   # as written
            "files": files, "total_bytes": sum(files.values()),
            "source": manifest.to_dict().get("source"),   # as written (SourceInfo types only what edgemm reads)
            "created": manifest.created,
            "signature": signing.describe(path, checked)}
    variants = manifest.section("variants")
    if variants:
        from ..hostinfo import host_isa
        from ..runtime.variants import choose_variant

        info["variants"] = [{k: v.get(k) for k in ("name", "engine", "precision", "requires_any", "measured")}
                            | {"backend": v["backend"].get("name")} for v in variants]
        try:
            info["variant_here"] = choose_variant(variants, host_isa()).name
        except LookupError:
            info["variant_here"] = None
    pipeline = manifest.sections.get("pipeline")
    if pipeline:   # a split bundle: its parts, in run order (edgemm/runtime/pipeline.py)
        info["pipeline"] = {"parts": [_part_info(path, manifest, p, source) for p in pipeline["parts"]],
                            "interface": pipeline.get("interface", []),
                            "concurrent": pipeline.get("concurrent", False),
                            "concurrency_measured": bool(pipeline.get("concurrency_tuning"))}
    field = "backend.model" if manifest.backend.model else "backend.onnx"
    onnx_rel = manifest.backend.model or manifest.backend.onnx
    if onnx_rel:
        # Only a listed (hash-checked) file of the bundle is read: never a path from outside it.
        model_path = safe_relpath(path, onnx_rel, source=source, field=field)
        if onnx_rel not in manifest.files:
            raise BundleError(f"{onnx_rel!r} is not a file of the bundle (not listed in files)", file=source,
                              field=field, fix="recompile the bundle")
        try:
            info["ops"] = onnx_op_counts(model_path)
        except Exception as exc:  # noqa: BLE001 - a hash-consistent file that is not ONNX (protobuf errors)
            raise BundleError(f"{onnx_rel!r} is not a readable ONNX model ({type(exc).__name__})",
                              file=model_path, field=field, fix="recompile the bundle") from exc
    return info


def _part_info(path: Path, manifest, part: dict, source: str) -> dict:
    from ..precision import label_of
    from ..runtime.manifest import safe_relpath

    backend = part.get("backend", {})
    rel = backend.get("model") or backend.get("onnx")
    info = {"name": part["name"], "after": part.get("after", []), "precision": label_of(part.get("precision")),
            "placement": part.get("placement"), "inputs": [s["name"] for s in part["inputs"]],
            "outputs": [s["name"] for s in part["outputs"]], "file": rel}
    if isinstance(rel, str) and rel in manifest.files:
        info["ops"] = onnx_op_counts(safe_relpath(path, rel, source=source, field="pipeline.parts"))
    return info


def inspect_model(spec: str, data: str | None = None, weights: str | None = None) -> dict:
    from ..frontends import LoadOptions, detect_format, load_model

    fmt = detect_format(spec)
    if fmt == "pickle":
        from ..errors import SecurityError
        raise SecurityError("is a pickled Python object; inspecting it would run code from the file", file=spec,
                            fix="inspect a TorchScript/.pt2/.onnx model instead")
    loaded = load_model(spec, LoadOptions(weights=weights))
    info = {"kind": "model", "path": spec, "format": loaded.format, "sha256": loaded.sha256}
    specs = _input_specs(loaded, data)
    info["inputs"] = ([s.to_dict() for s in specs] if specs is not None else
                      [{"name": n} for n in (loaded.input_names or [])])
    if loaded.signature is not None:
        info["forward"] = describe_forward(loaded.signature)
    if loaded.onnx_path is not None:
        from ..onnx_io import graph_outputs

        info["outputs"] = graph_outputs(loaded.onnx_path)
    elif specs is not None:
        info["outputs"] = _torch_outputs(loaded, specs, data)
    if fmt != "factory":
        info["total_bytes"] = Path(spec).stat().st_size
    if loaded.onnx_path is not None:
        info["ops"] = onnx_op_counts(loaded.onnx_path)
    if loaded.module is not None and hasattr(loaded.module, "parameters"):
        info["parameters"] = int(sum(p.numel() for p in loaded.module.parameters()))
    return info


def describe_forward(sig) -> str:
    """``forward(input_ids, pixel_values=None, *, flag=False, **kwargs)``: what the model takes."""
    from ..signature import KEYWORD, POSITIONAL

    parts, star = [], False
    for p in sig.params:
        if p.kind == KEYWORD and not star:
            parts.append("*")
            star = True
        text = p.name if p.required else f"{p.name}={p.default!r}"
        parts.append(text)
        if p.kind == POSITIONAL and (p is sig.params[-1] or sig.params[sig.params.index(p) + 1].kind != POSITIONAL):
            parts.append("/")
    if sig.var_keyword:
        parts.append("**kwargs")
    return f"forward({', '.join(parts)})"


def _input_specs(loaded, data):
    """The format's own specs (.pt2, .onnx), else those the data implies (as compile reads them)."""
    if loaded.input_specs:
        return loaded.input_specs
    if data is None:
        return None
    from ..pipeline.inputs import resolve_input_specs
    from ..config import CompileConfig
    from ..data import load_dataset

    return resolve_input_specs(loaded, CompileConfig(model=loaded.source), load_dataset(data, role="--data"))


def _torch_outputs(loaded, specs, data) -> list[dict]:
    """Output names, dtypes and shapes from two runs of the model (batch 2 and 3): an axis that follows
    the batch is ``batch``."""
    from ..pipeline.inputs import sample_feeds
    from ..data import load_dataset
    from ..iospec import dynamic_batch_input
    from ..reference import Reference

    dataset = load_dataset(data, role="--data") if data is not None else None
    ref = Reference(loaded, [s.name for s in specs])
    runs = [ref.run(sample_feeds(dataset, specs, n)) for n in (2, 3)]
    batched = dynamic_batch_input(specs) is not None
    outs = []
    for name, first in runs[0].items():
        second = runs[1].get(name, first)
        shape = []
        for axis, size in enumerate(first.shape):
            other = second.shape[axis] if axis < second.ndim else size
            shape.append("batch" if batched and (size, other) == (2, 3) else
                         int(size) if size == other else f"{name}_dim{axis}")
        outs.append({"name": name, "dtype": str(first.dtype), "shape": shape})
    return outs


@click.command("inspect")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--data", type=click.Path(), default=None,
              help="Model files without input shapes (TorchScript, factories): an .npz whose keys are inputs; "
                   "the model then runs on 2-3 samples to show its outputs.")
@click.option("--weights", type=click.Path(), default=None,
              help="Weights for a package.module:function factory (as for compile and verify).")
@signature_options
@verbose_option
def command(target, as_json, data, weights, trusted_keys, require_signature):
    """Show IO, precision, sizes, op counts and signature of a BUNDLE folder, or a MODEL file."""
    path = Path(target)
    trust = trust_options(trusted_keys, require_signature)
    if path.is_dir():
        if weights:
            from ..errors import InputError
            raise InputError("is a bundle; --weights is for a factory model", file=target, field="--weights",
                             fix="drop --weights, or inspect the model: edgemm inspect pkg.mod:factory --weights W")
        info = inspect_bundle(path, **trust)
    elif trusted_keys or require_signature:
        from ..errors import InputError
        raise InputError("--trusted-key/--require-signature check bundles; this is a model file", file=target,
                         field="--trusted-key", fix="inspect the bundle folder, or drop the flags")
    else:
        info = inspect_model(target, data, weights)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return 0
    _echo(f"{info['kind']}: {info['path']}")
    for key in ("name", "format", "forward", "precision", "recipe", "target", "parameters", "created"):
        if info.get(key) is not None:
            _echo(f"  {key}: {info[key]}")
    if isinstance(info.get("backend"), dict):
        backend = info["backend"]
        extra = ""
        if backend.get("intra_op_threads") == 1:
            extra = " (1 intra-op thread: measured faster at compile)"
        if backend.get("disabled_optimizers"):
            extra += f" (ORT optimizers off: {', '.join(map(str, backend['disabled_optimizers']))})"
        _echo(f"  backend: {backend.get('name')}{extra}")
    if info.get("variants"):
        _echo(f"  variants (fastest first as measured at compile; this host runs {info.get('variant_here')}):")
        for v in info["variants"]:
            need = ", ".join(v.get("requires_any") or []) or "nothing in particular"
            score = (v.get("measured") or {}).get("score")
            measured = f", {score:.2f}x ORT FP32 at compile" if isinstance(score, (int, float)) else ""
            _echo(f"    {v['name']}: {v['backend']} {v.get('precision')}, needs one of {need}{measured}")
    if info.get("pipeline"):
        pipe = info["pipeline"]
        _echo(f"  split: {len(pipe['parts'])} parts, independent ones run "
              + ("concurrently" if pipe["concurrent"] else "one after another")
              # Only a compile that timed the pipeline measured it (not --no-thread-tuning, not TensorRT here).
              + (" (measured at compile)" if pipe["concurrency_measured"] else " (the default: not measured)"))
        for p in pipe["parts"]:
            after = f" after {', '.join(p['after'])}" if p["after"] else ""
            ops = f", {sum(p['ops'].values())} ops" if p.get("ops") else ""
            _echo(f"    part {p['name']}{after}: {p['precision']} on {p['placement']}{ops}; "
                  f"reads {', '.join(p['inputs'])} -> {', '.join(p['outputs'])}")
    for io in ("inputs", "outputs"):
        for t in info.get(io, []):
            shape = "x".join(str(d) for d in t["shape"]) if "shape" in t else "? (pass --data to see shapes)"
            shape = shape or "scalar"
            _echo(f"  {io[:-1]} {t['name']}: {shape} {t.get('dtype', '')}")
    if "signature" in info:
        _echo(f"  signature: {_describe_signature(info['signature'])}")
    if "total_bytes" in info:
        _echo(f"  size: {info['total_bytes'] / 1e6:.2f} MB")
    for rel, size in info.get("files", {}).items():
        _echo(f"    {rel}: {size / 1e6:.2f} MB")
    if info.get("ops"):
        _echo(f"  ops ({sum(info['ops'].values())}): " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    return 0


def _describe_signature(sig: dict) -> str:
    if not sig.get("signed"):
        return "none (unsigned; `edgemm sign BUNDLE --key KEY` signs it)"
    key = (f"certificate sha256:{sig['certificate_sha256']}" if sig.get("certificate_sha256")
           else f"key sha256:{sig['key_fingerprint']}")
    if sig.get("verified"):
        return f"{key}, verified with {sig['trusted_key']} ({sig['files']} files)"
    return f"{key}, not checked (pass --trusted-key KEY.pub to verify it)"


def _echo(line: str) -> None:
    """One line of the human-readable view: names from the file shown with controls escaped."""
    from ..display import printable

    click.echo(printable(line))
