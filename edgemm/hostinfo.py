"""What the host is: CPU model and the ISA features that decide which CPU engine and precision run fast.

Standard library only: the runtime reads ``host_isa()`` on the device to pick a bundle variant.

Features are the Linux kernel's own cpuinfo flag names (x86 ``flags``, Arm ``Features``), so a manifest's
``requires`` reads the same as ``/proc/cpuinfo`` on the device. Hand-parsed rather than a library (py-cpuinfo
shells out and is slow; archspec lacks the newer AMX/Arm flags): the format is one ``key : value`` per line.
"""

from __future__ import annotations

import platform
from pathlib import Path

# x86: matrix engines, BF16/FP16 dot products, INT8 dot products (VNNI), the AVX base.
X86_FEATURES = ("amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "avx_vnni", "avx512f", "avx512bw", "avx2", "fma")
# Arm: int8 dot product (asimddp), int8 matrix multiply (i8mm), BF16, FP16 arithmetic (asimdhp), SVE/SVE2.
ARM_FEATURES = ("asimddp", "i8mm", "bf16", "asimdhp", "sve", "sve2", "svei8mm", "svebf16")
ISA_FEATURES = X86_FEATURES + ARM_FEATURES

# Kept for baselines written before the full feature list (parity/gate/context.py compares this list).
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp",
              "i8mm", "sve")
INT8_DOT = frozenset({"amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "i8mm"})
BF16_DOT = frozenset({"amx_bf16", "avx512_bf16", "bf16"})

# Arm cores have no "model name" in cpuinfo: (implementer, part) -> name, for the cores edgemm targets.
ARM_PARTS = {("0x41", "0xd42"): "Arm Cortex-A78AE (Jetson Orin)", ("0x41", "0xd41"): "Arm Cortex-A78",
             ("0x41", "0xd0c"): "Arm Neoverse N1 (Graviton2)", ("0x41", "0xd40"): "Arm Neoverse V1 (Graviton3)",
             ("0x41", "0xd4f"): "Arm Neoverse V2 (Graviton4, Grace)", ("0x41", "0xd49"): "Arm Neoverse N2",
             ("0x41", "0xd08"): "Arm Cortex-A72", ("0x41", "0xd0b"): "Arm Cortex-A76",
             ("0x41", "0xd8e"): "Arm Neoverse V3 (Jetson Thor)"}

CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> tuple[set[str], dict[str, str]]:
    """(the first processor's flags, its other fields) from /proc/cpuinfo text; keys lowercased."""
    flags: set[str] | None = None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features"):
            if flags is None:  # every core lists the same flags; hybrid cores could differ, take the first
                flags = set(value.split())
        elif key not in fields and value.strip():
            fields[key] = value.strip()
    return flags or set(), fields


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # not Linux (macOS, Windows), or /proc hidden in a sandbox: no features known
        return ""


def host_isa(text: str | None = None) -> frozenset[str]:
    """The ISA features of ``ISA_FEATURES`` this host has (``text``: cpuinfo to read instead of the host's).
    The runtime's variant choice calls this; tests patch it to hide features."""
    flags, _ = parse_cpuinfo(_read_cpuinfo() if text is None else text)
    return frozenset(f for f in ISA_FEATURES if f in flags)


def cpu_info(text: str | None = None, machine: str | None = None) -> dict:
    """The CPU as the manifest records it: model, architecture, every ISA feature of ``ISA_FEATURES`` it
    has, and what they add up to (INT8 dot products, BF16 dot products, AMX)."""
    flags, fields = parse_cpuinfo(_read_cpuinfo() if text is None else text)
    machine = machine or platform.machine()
    # Arm kernels print a generic "ARMv8 Processor" model name at best: the core's part number says more.
    model = ARM_PARTS.get((fields.get("cpu implementer", ""), fields.get("cpu part", ""))) or fields.get("model name")
    if not model and "cpu part" in fields:
        model = f"Arm implementer {fields.get('cpu implementer')} part {fields['cpu part']}"
    isa = [f for f in ISA_FEATURES if f in flags]
    return {
        "machine": machine,
        "model": model or (platform.processor() if text is None else "") or machine,
        "isa": isa,
        "int8_isa": [f for f in INT8_FLAGS if f in flags],
        "vnni": bool(INT8_DOT & flags),
        "bf16": bool(BF16_DOT & flags),
        "amx": "amx_tile" in flags,
    }


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("edgemm", "torch", "onnx", "onnxruntime", "nvidia-modelopt", "onnxslim", "numpy", "tensorrt",
                 "openvino", "nncf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    return out
