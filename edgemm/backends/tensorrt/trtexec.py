"""The trtexec command line equivalent to a TensorRTOptions build, and the build.sh that runs it.

Flags were checked against trtexec's parser (samples/common/sampleOptions.cpp) in NVIDIA/TensorRT
release/10.0 ... release/10.16 and 11.x (main):
- valid in 10.x and 11.x: --onnx --saveEngine --skipInference --min/opt/maxShapes --profile --memPoolSize
  --builderOptimizationLevel --timingCacheFile --useDLACore --allowGPUFallback --sparsity --refit
  --versionCompatible --excludeLeanRuntime --hardwareCompatibilityLevel --stronglyTyped
- --stronglyTyped: opt-in on 10.x; on 11.x a deprecated no-op (strong typing is always on), still accepted.
- 11.x removed --fp16 --bf16 --fp8 --int4 --best and --int8/--calib:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-trtexec.html
  so those appear only in the TensorRT 10 DLA command (weak typing, see TensorRTOptions.weak_typing).
- --hardwareCompatibilityLevel=sameComputeCapability exists from 10.9.
- --memPoolSize=workspace:N is MiB in both (11.x adds unit suffixes; a bare number stays MiB).
"""

from __future__ import annotations

import shlex
from typing import Mapping, Sequence

from .options import TensorRTOptions

# trtexec spelling of the hardware compatibility levels.
_HW_LEVEL = {"ampere_plus": "ampere+", "same_cc": "sameComputeCapability"}


def _shape_spec(shapes: Mapping[str, Sequence[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def trtexec_command(onnx_name: str, engine_name: str, options: TensorRTOptions, trt_major: int, *,
                    timing_cache: str | None = None) -> list[str]:
    """argv for trtexec building ``engine_name`` from ``onnx_name`` on TensorRT ``trt_major``."""
    if trt_major < 10:
        raise ValueError("edgemm targets TensorRT 10 and newer")
    cmd = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}", "--skipInference"]
    flags = options.precision_flags(trt_major)
    if flags:
        cmd += [f"--{f.lower()}" for f in flags]
    else:
        cmd.append("--stronglyTyped")
    profiles = options.profiles
    for index, profile in enumerate(profiles):
        if len(profiles) > 1:
            # Several profiles: each group of shape flags follows its --profile=N (trtexec >= 10.0,
            # samples/common/sampleOptions.cpp getOptimizationProfiles).
            cmd.append(f"--profile={index}")
        for i, which in enumerate(("minShapes", "optShapes", "maxShapes")):
            cmd.append(f"--{which}=" + _shape_spec({n: s[i] for n, s in profile.items()}))
    if options.workspace_mb:
        cmd.append(f"--memPoolSize=workspace:{int(options.workspace_mb)}")
    cmd.append(f"--builderOptimizationLevel={options.opt_level}")
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if options.dla_core is not None:
        cmd.append(f"--useDLACore={options.dla_core}")
        if options.gpu_fallback:
            cmd.append("--allowGPUFallback")
    if options.sparse_weights:
        cmd.append("--sparsity=enable")
    if options.refittable:
        cmd.append("--refit")
    if options.version_compatible:
        # Without --excludeLeanRuntime the plan embeds the lean runtime as host code, which edgemm's
        # runtime refuses to load (it never sets engine_host_code_allowed).
        cmd += ["--versionCompatible", "--excludeLeanRuntime"]
    if options.hardware_compatibility != "none":
        cmd.append(f"--hardwareCompatibilityLevel={_HW_LEVEL[options.hardware_compatibility]}")
    return cmd


def render_command(argv: Sequence[str]) -> str:
    """One shell line, each argument quoted where needed."""
    return " ".join(shlex.quote(a) for a in argv)


def build_script(commands: Mapping[int, Sequence[str]], *, bundle_name: str | None, target_name: str,
                 engine_name: str) -> str:
    """build.sh for a portable bundle: detect trtexec's TensorRT major, run the matching command.

    The engine goes OUTSIDE the bundle by default (first argument, else ./<bundle name>.engine): a bundle
    holds only the files its manifest hashes, and ``edgemm build`` is what registers an engine.
    ``bundle_name`` is the manifest's name; None (a caller that does not know it) makes the script read
    the name from the manifest.json beside it when it runs, so it never names another bundle."""
    majors = sorted(commands)
    if bundle_name is not None:
        about = f"bundle {' '.join(str(bundle_name).split())!r}"
        name_lines = [f"NAME={shlex.quote(str(bundle_name))}"]
    else:
        about = "the bundle in this folder"
        name_lines = [
            "# The bundle's name: the top-level \"name\" of manifest.json (written with a 2-space indent).",
            'NAME="$(sed -n \'s/^  "name": "\\([^"\\\\]*\\)",\\{0,1\\}$/\\1/p\' "$HERE/manifest.json" 2>/dev/null '
            '| head -n 1 || true)"',
        ]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine for {about} (target {target_name}) with trtexec.",
        "# Run it on the target device. The engine is written outside the bundle; to run it through the",
        "# edgemm runtime, run `edgemm build <bundle>` instead (it records the engine in manifest.json).",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        *name_lines,
        'STEM="${NAME//[^A-Za-z0-9._-]/-}"',
        'OUT="${1:-$PWD/${STEM:-model}.engine}"',
        'case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if [ ! -x "$TRTEXEC" ]; then echo "build.sh: trtexec not found; set TRTEXEC=/path/to/trtexec" >&2; exit 2; fi',
        "# trtexec prints '[TensorRT vMMmmpp]' before parsing any flag (samples/common/logging.h).",
        'VERSION="$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p\' | head -n 1)"',
        'MAJOR="${TRT_MAJOR:-$(( ${VERSION:-0} / 10000 ))}"',
        "# The Python builder's folder too (builder.timing_cache_dir): one timing cache for both.",
        'CACHE_DIR="${EDGEMM_TIMING_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edgemm/timing}"',
        'mkdir -p "$CACHE_DIR"',
        'cd "$HERE"',
        'case "$MAJOR" in',
    ]
    for major in majors:
        argv = list(commands[major])
        argv[0] = "$TRTEXEC"
        rendered = " ".join(_quote_keeping_vars(a) for a in argv)
        lines += [f"  {major})", f"    {rendered}", "    ;;"]
    lines += [
        "  *)",
        f'    echo "build.sh: trtexec reports TensorRT major ${{MAJOR}}; this bundle has commands for '
        f'{", ".join(str(m) for m in majors)} (target {target_name})" >&2',
        "    exit 2",
        "    ;;",
        "esac",
        'echo "engine written to $OUT"',
        "",
    ]
    return "\n".join(lines)


_SCRIPT_VARS = ("OUT", "CACHE_DIR", "VERSION")


def _quote_keeping_vars(arg: str) -> str:
    """Quote for bash, expanding only build.sh's own variables ($OUT, $CACHE_DIR, $VERSION)."""
    if arg == "$TRTEXEC":
        return '"$TRTEXEC"'
    quoted = arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$", "\\$")
    for var in _SCRIPT_VARS:
        quoted = quoted.replace("\\${" + var + "}", "${" + var + "}")
    return '"' + quoted + '"'
