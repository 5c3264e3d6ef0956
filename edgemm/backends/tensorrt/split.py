"""A TensorRT split bundle (``edgemm compile --split``): one engine build per part, each with its own
placement (GPU or a DLA core), and the bundle's build.sh that builds them all on the device."""

from __future__ import annotations

from pathlib import Path

from ...precision import UNIFORM


def package_part(model_path: Path, stage: Path, part: str, folder: str, target, request, *, precision: str,
                 device: str) -> dict:
    """The part packaged as a portable TensorRT bundle in ``folder/<part>/``; its fields, paths relative to
    the split bundle, with its placement."""
    from .options import TensorRTOptions, options_for_target
    from .package import package

    options = TensorRTOptions.from_compile(request.config, target, request.specs)
    options = options.with_(precision=precision if precision in UNIFORM else options.precision)
    if device.startswith("dla"):
        # DLA pins shapes (options_for_target does it) and runs fp16/int8 only (the target checks).
        target.validate(options.precision, dla=int(device[3:]))
        options = options_for_target(target, options.precision, dla=int(device[3:]), inputs=request.specs,
                                     workspace_mb=options.workspace_mb, opt_level=options.opt_level)
    section = package(model_path, stage / folder / part, target, options, build_now=False,
                      bundle_name=request.bundle_name)
    out = {}
    for key, value in section.items():
        if key in ("onnx", "engine", "build_config", "build_script", "model") and isinstance(value, str):
            out[key] = f"{folder}/{part}/{value}"
        elif key != "name":
            out[key] = value
    out["placement"] = device
    return out


def write_pipeline_build_script(stage: Path, entries: list[dict], target, name: str) -> dict:
    """build.sh at the bundle's top: one engine build per part (each part's own build.sh, which carries
    its placement: --useDLACore=N --allowGPUFallback for DLA parts), engines written beside each other."""
    from .package import BUILD_SCRIPT_NAME

    lines = [
        "#!/usr/bin/env bash",
        f"# Build one TensorRT engine per part of the split bundle {name} (target {target.name}) with trtexec.",
        "# Run it on the target device: ./build.sh [OUT_DIR] writes OUT_DIR/<part>.engine for every part.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'OUT_DIR="${1:-$PWD}"',
        'case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac',
        'mkdir -p "$OUT_DIR"',
    ]
    for entry in entries:
        script = entry["backend"]["build_script"]
        lines.append(f"# part {entry['name']}: placement {entry['placement']}, precision {entry['precision']['mode']}")
        lines.append(f'bash "$HERE/{script}" "$OUT_DIR/{entry["name"]}.engine"')
    lines += ['echo "engines written to $OUT_DIR"', ""]
    path = stage / BUILD_SCRIPT_NAME
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o755)
    return {"build_script": BUILD_SCRIPT_NAME, "portable": True}
