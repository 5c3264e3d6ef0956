"""Jetson power and clock state, recorded with every TensorRT build (and benchmark) on a Jetson.

TensorRT's builder times tactics on the device: with dynamic frequency scaling the timings, and so the
chosen kernels, vary from build to build. NVIDIA's Best Practices ("Performance Benchmarking": lock
the clocks; on Jetson `sudo nvpmodel -m <mode>` then `sudo jetson_clocks`) say to lock clocks first.
jetson_clocks pins each devfreq governor's min_freq to its max_freq; that is what is checked here.
Standard library only; every probe is optional (a missing tool or file is reported as unknown)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["jetson_state", "warn_if_unlocked", "available_memory_mb"]

_LOG = logging.getLogger("edgemm")
# GPU devfreq nodes: ga10b (Orin), gv11b (Xavier), gb10b (Thor); "gpu" covers renamed nodes.
_GPU_DEVFREQ = re.compile(r"(ga10b|gv11b|gb10b|gp10b|gpu)", re.I)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _nvpmodel() -> str | None:
    tool = shutil.which("nvpmodel")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"NV Power Mode:\s*(.+)", out)
    return match.group(1).strip() if match else None


def jetson_state(root: Path = Path("/")) -> dict | None:
    """{"release", "power_mode", "gpu_clock": {"min_hz", "max_hz", "cur_hz"}, "clocks_locked"} on a Jetson
    (``root``/etc/nv_tegra_release exists), else None. Unknown fields are None."""
    release = _read(root / "etc" / "nv_tegra_release")
    if release is None:
        return None
    clock, locked = None, None
    for node in sorted((root / "sys" / "class" / "devfreq").glob("*")):
        name = _read(node / "name") or node.name
        if not _GPU_DEVFREQ.search(name) and not _GPU_DEVFREQ.search(node.name):
            continue
        values = {k: _read(node / f"{k}_freq") for k in ("min", "max", "cur")}
        if all(v and v.isdigit() for v in values.values()):
            clock = {f"{k}_hz": int(v) for k, v in values.items()}
            locked = clock["min_hz"] == clock["max_hz"]
            break
    return {"release": release.splitlines()[0], "power_mode": _nvpmodel(), "gpu_clock": clock,
            "clocks_locked": locked}


def warn_if_unlocked(state: dict | None, what: str) -> None:
    if state is not None and state.get("clocks_locked") is False:
        _LOG.warning("%s on a Jetson with unlocked GPU clocks (power mode %s): timings vary from run to run; "
                     "lock them first: sudo nvpmodel -m <mode> && sudo jetson_clocks", what,
                     state.get("power_mode") or "unknown")


def available_memory_mb(root: Path = Path("/")) -> int | None:
    """MemAvailable from /proc/meminfo in MiB. On Jetson CPU and GPU share this memory."""
    text = _read(root / "proc" / "meminfo") or ""
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) // 1024 if match else None
