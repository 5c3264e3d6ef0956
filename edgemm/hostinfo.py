"""What the host is: CPU model and the ISA flags that decide INT8 speed (VNNI, AMX, ...)."""

from __future__ import annotations

import platform
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp",
              "i8mm", "sve")


def cpu_info() -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key == "model name" and value.strip():
                model = value.strip()
    return {
        "machine": platform.machine(),
        "model": model,
        "int8_isa": [f for f in INT8_FLAGS if f in flags],
        "vnni": bool({"avx512_vnni", "avx_vnni", "asimddp"} & flags),
    }


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("edgemm", "torch", "onnx", "onnxruntime", "nvidia-modelopt", "onnxslim", "numpy", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    return out
